"""Run one role (the planner, resize, the join and the webhook role on confluent-kafka loops; the API), or all
of them as child processes."""
from __future__ import annotations

import faulthandler
import logging
import os
import signal
import socket
import subprocess
import sys
import time


from streams.adapters.kafka import ensure_topics
from streams.adapters.lag import register_lag
from streams.adapters.objectstore import ObjectStore
from streams.adapters.schemas import install_resolver, publish_schemas
from streams.config import Config, metrics_address
from streams.core.errors import PipelineError
from streams.errors import StartError
from streams.logs import setup_logging


def run_role(role: str, config: Config) -> int:
    setup_logging(role, config.log_level, fmt=config.log_format, bootstrap=config.bootstrap_servers)
    if role == "api":  # an API that may not or cannot listen says so before anything touches Kafka
        from streams import api  # start-up: only the API's process loads it
        api.preflight(config)
    created = ensure_topics(config)
    if created:
        logging.getLogger("imagefork").info("created topics %s", ", ".join(created))
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>`: every thread's stack to the log
    check_storage(config)
    if role != "api":  # the consumer lag of the role's own group (the API registers every role's)
        register_lag(config, [role])
    # before any write: a reader older than this worker finds its schemas there (a rolling deploy)
    publish_schemas(config)
    install_resolver(config)
    # each role imports only its own modules (start-up cost: an API process does not load Pillow, for one)
    if role == "api":  # aiohttp: the HTTP API and the dashboard (streams/api/)
        return api.run(config)
    if role == "join":  # a transactional confluent-kafka loop (streams/join/)
        from streams.join import loop  # start-up: only the join's process loads it
        return loop.run(config)
    if role == "webhook":  # a confluent-kafka consumer and a pool of callers (streams/agents/webhooks.py)
        from streams.agents import webhooks  # start-up: only the webhook role's process loads it
        return webhooks.run(config)
    if role == "resize":  # asyncio agents on a confluent-kafka consumer (streams/adapters/agent_loop.py)
        from streams.agents import resize  # start-up: only the resize role's process loads it
        return resize.run(config)
    if role == "planner":  # the same loop as resize
        from streams.agents import planner  # start-up: only the planner's process loads it
        return planner.run(config)
    raise ValueError(f"unknown role {role!r}")


def check_storage(config: Config) -> None:
    """Every role writes to S3: probe it (and create the bucket) before taking any work."""
    try:
        ObjectStore(config).ensure_bucket()
    except PipelineError as exc:
        where = config.s3_endpoint_url or f"AWS ({config.s3_region})"
        raise StartError(f"S3 at {where} cannot be used: {exc.message}") from None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_all(config: Config) -> int:
    """``worker all``: one child process per role (and the API); if one dies, stop the others and exit
    non-zero."""
    ensure_topics(config)  # a broker that refuses us or is away is one line here, not one per child
    # the webhook role runs when it has a secret to sign with
    roles = ("join", "resize", "planner", *(("webhook",) if config.webhook_secret else ()))
    address = metrics_address(config)
    # each child serves its metrics on IMAGEFORK_METRICS_LISTEN's port and the next two (free loopback
    # ports when it is not set), and the API's /metrics carries them all, each sample labelled with its role
    listen = {role: (address[0], address[1] + i) if address and address[1] else
              (address[0] if address else "127.0.0.1", _free_port()) for i, role in enumerate(roles)}
    peers = ",".join(f"{role}=http://{'127.0.0.1' if host in ('0.0.0.0', '', '::') else host}:{port}/metrics"
                     for role, (host, port) in listen.items())

    children = {role: subprocess.Popen([sys.executable, "-m", "streams", "worker", role],
                                       env={**os.environ, "IMAGEFORK_METRICS_LISTEN": "%s:%d" % listen[role]})
                for role in roles}
    print(f"imagefork: worker all: every role's metrics at http://{config.api_listen}/metrics (label role); each "
          f"role's own: {', '.join(f'{r} %s:%d' % listen[r] for r in roles)}", file=sys.stderr, flush=True)

    def start_api() -> subprocess.Popen:  # it serves its own /metrics on IMAGEFORK_API_LISTEN, and the roles'
        return subprocess.Popen([sys.executable, "-m", "streams", "worker", "api"],
                                env={**{k: v for k, v in os.environ.items() if k != "IMAGEFORK_METRICS_LISTEN"},
                                     "IMAGEFORK_METRICS_PEERS": peers})

    children["api"] = start_api()
    api_since = time.monotonic()

    asked: list[int] = []  # the signal that asked us to stop

    def stop(*_):
        for child in children.values():
            if child.poll() is None:
                child.terminate()

    def stop_asked(signum, _frame):
        asked.append(signum)
        stop()

    signal.signal(signal.SIGTERM, stop_asked)
    signal.signal(signal.SIGINT, stop_asked)
    pipeline = [c for role, c in children.items() if role != "api"]
    ended: list[int] = []
    api_gone = False
    try:
        # the pipeline's roles stand or fall together; the API is a view of them: if it cannot start
        # (its port taken, say), it says why and the pipeline goes on; if it dies after a good run (a
        # client library's abort, say), it is started again
        while all(c.poll() is None for c in pipeline):
            if not api_gone and not asked and children["api"].poll() is not None:
                code, ran = children["api"].returncode, time.monotonic() - api_since
                if ran >= config.api_restart_after_s:
                    print(f"imagefork: worker all: the API exited ({code}) after {ran:.0f}s; starting it again",
                          file=sys.stderr, flush=True)
                    children["api"], api_since = start_api(), time.monotonic()
                else:
                    api_gone = True
                    print(f"imagefork: worker all: the API exited ({code}); the pipeline goes on without it",
                          file=sys.stderr, flush=True)
            time.sleep(0.5)
        ended = [c.returncode for c in pipeline if c.poll() is not None]  # before we stop the others
    finally:
        stop()
        for child in children.values():
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
    # a child still starting when we passed our SIGTERM on dies of it (-15): that is the stop we asked for
    clean = (0, -signal.SIGTERM) if asked else (0,)
    code = next((c for c in ended if c not in clean), 0)
    return code if code >= 0 else 128 - code
