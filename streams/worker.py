"""Run one role as a Faust worker, or all three as child processes."""
from __future__ import annotations

import faulthandler
import logging
import os
import signal
import subprocess
import sys
import time

from streams.config import Config, metrics_address


def run_role(role: str, config: Config) -> int:
    import faust

    from streams.adapters.kafka import ensure_topics
    from streams.adapters.schemas import install_resolver, publish_schemas
    from streams.agents import join, planner, resize
    from streams.app import create_app, declare_topics

    # imagefork's own lines (ready, planned, task done, warnings) always show at INFO on stderr;
    # IMAGEFORK_LOG_LEVEL sets Faust's and the libraries' level.
    own = logging.getLogger("imagefork")
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(f"%(asctime)s {role}[%(process)d] %(levelname)s %(message)s"))
    own.addHandler(handler)
    own.propagate = False
    own.setLevel(min(logging.INFO, logging.getLevelName(config.log_level.upper())))
    created = ensure_topics(config)
    if created:
        logging.getLogger("imagefork").info("created topics %s", ", ".join(created))
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>`: every thread's stack to the log
    check_storage(config)
    serve_metrics(config)
    # before any write: a reader older than this worker finds its schemas there (a rolling deploy)
    publish_schemas(config)
    install_resolver(config)
    if role == "join":  # a transactional confluent-kafka loop, not a Faust app (see agents/join.py)
        return join.run(config)
    app = create_app(role, config)
    topics = declare_topics(app, config)
    {"planner": planner.register, "resize": resize.register}[role](app, config, topics)
    log = logging.getLogger("imagefork")

    async def ready(sender, **kwargs):
        log.info("imagefork ready: %s (%d partitions assigned)", role, len(app.consumer.assignment()))

    app.on_rebalance_complete.connect(ready)
    worker = faust.Worker(app, loglevel=config.log_level, quiet=True)
    worker.execute_from_commandline()
    return 0


class StartError(RuntimeError):
    """A worker cannot start; the message says which dependency and where, in one line."""


def check_storage(config: Config) -> None:
    """Every role writes to S3: probe it (and create the bucket) before taking any work."""
    from streams.adapters.objectstore import ObjectStore
    from streams.core.errors import PipelineError
    try:
        ObjectStore(config).ensure_bucket()
    except PipelineError as exc:
        where = config.s3_endpoint_url or f"AWS ({config.s3_region})"
        raise StartError(f"S3 at {where} cannot be used: {exc.message}") from None


def serve_metrics(config: Config) -> None:
    """Prometheus metrics of this process on IMAGEFORK_METRICS_LISTEN (prometheus-client's own server)."""
    address = metrics_address(config)
    if address:
        from prometheus_client import start_http_server
        start_http_server(address[1], addr=address[0])
        logging.getLogger("imagefork").info("metrics on http://%s:%d/metrics", *address)


def run_all(config: Config) -> int:
    """``worker all``: one child process per role; if one dies, stop the others and exit non-zero."""
    from streams.adapters.kafka import ensure_topics
    ensure_topics(config)  # a broker that refuses us or is away is one line here, not one per child
    address = metrics_address(config)

    def env(i: int) -> dict | None:  # each child serves its metrics on the next port
        return {**os.environ, "IMAGEFORK_METRICS_LISTEN": f"{address[0]}:{address[1] + i}"} if address else None

    children = {role: subprocess.Popen([sys.executable, "-m", "streams", "worker", role], env=env(i))
                for i, role in enumerate(("join", "resize", "planner"))}

    def stop(*_):
        for child in children.values():
            if child.poll() is None:
                child.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    code = 0
    try:
        while all(c.poll() is None for c in children.values()):
            time.sleep(0.5)
        code = next((c.returncode for c in children.values() if c.returncode not in (None, 0)), 0)
    finally:
        stop()
        for child in children.values():
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
    return code
