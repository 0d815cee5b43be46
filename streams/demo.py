"""``make demo``: the seed request end to end on the local stack, then everything stopped (or, with
``--keep-stack``, the stack and the workers left running until ``imagefork demo --stop``)."""
from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

from streams.config import Config

SAMPLE = Path(__file__).parent / "assets" / "sample.png"
SEED_SIZES = [{"width": 300, "height": 300}, {"width": 200, "height": 200}, {"width": 1200, "height": 1200}]
# the demo's printed links are presigned for this long unless IMAGEFORK_PRESIGN_TTL_S says otherwise
DEMO_PRESIGN_TTL_S = "3600"
STOP_COMMAND = "imagefork demo --stop"


def seed_request(location: str) -> dict:
    return {"fileLocation": location, "outputFormats": ["png", "jpg", "webp"],
            "outputSizes": SEED_SIZES, "maintainAspectRatio": True}


def say(msg: str) -> None:
    print(f"==> {msg}", file=sys.stderr, flush=True)


def demo_stack_dir() -> Path:
    """The demo's own stack folder, beside the default one (``imagefork stack up`` never touches it)."""
    from streams.stack.local import default_state_dir
    return default_state_dir().parent / "demo-stack"


def stop_demo() -> int:
    """``imagefork demo --stop``: the workers and the stack a ``--keep-stack`` demo left running."""
    from streams.stack.local import LocalStack
    from streams.stack.processes import stop_kept_workers
    stack = LocalStack(demo_stack_dir())
    stopped = [f"worker {name}" for name in stop_kept_workers(stack.dir)] + stack.down()
    print(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'} ({stack.dir})")
    return 0


def run_demo(keep_stack: bool = False) -> int:
    from streams.cli import output_links, print_final, progress_bar
    from streams.client import Client, Follower
    from streams.stack.local import LocalStack
    from streams.stack.processes import FileServer, WorkerProcess, keep_workers, stop_kept_workers, wait_for_log

    stack = LocalStack(demo_stack_dir())
    # workers a previous --keep-stack demo left: this run starts its own
    stop_kept_workers(stack.dir)
    if not stack.running():
        shutil.rmtree(stack.dir, ignore_errors=True)  # every demo starts from empty topics and bucket
    say("starting the local stack (Apache Kafka in KRaft mode + S3Proxy; fetched with mvn on first use)")
    env = stack.up()
    for k, v in env.items():
        say(f"  {k}={v}")
    logs = stack.dir / "workers"
    server = FileServer(SAMPLE.parent)
    env = {**env, "IMAGEFORK_FETCH_ALLOW": "127.0.0.0/8", "IMAGEFORK_PARTITIONS": "6",
           "IMAGEFORK_PRESIGN_TTL_S": os.environ.get("IMAGEFORK_PRESIGN_TTL_S") or DEMO_PRESIGN_TTL_S}
    workers: list[WorkerProcess] = []
    finished = False
    try:
        os.environ.update(env)
        config = Config.from_env()
        from streams.adapters.kafka import ensure_topics
        ensure_topics(config)
        say(f"starting the workers (planner, resize, join); logs in {logs}")
        workers = [WorkerProcess(role, env, logs) for role in ("join", "resize", "planner")]
        for w in workers:
            if not wait_for_log(w, "imagefork ready", 120):
                say(f"worker {w.role} did not come up:\n{w.log_tail()}")
                return 1
        request = seed_request(server.url(SAMPLE.name))
        say(f"serving the sample image (Hubble Deep Field, 900x900 PNG) at {request['fileLocation']}")
        follower = Follower(config)
        client = Client(config)
        started = time.monotonic()
        workflow_id = client.submit(request)
        say(f"submitted workflow {workflow_id}: png, jpg, webp x 300x300, 200x200, 1200x1200")
        final = follower.wait([workflow_id], 300, progress_bar())[workflow_id]
        follower.close()
        client.close()
        del client, follower  # librdkafka handles go before the broker does
        print_final(final, links=output_links(config, final), ttl_s=config.presign_ttl_s)
        say(f"done in {time.monotonic() - started:.2f}s (end to end, as the client saw it)")
        finished = True
        return 0 if final.status == "COMPLETED" else 1
    finally:
        server.close()
        if keep_stack and finished:
            keep_workers(stack.dir, workers)
            say(f"kept running: Kafka, S3Proxy and the workers ({', '.join(w.role for w in workers)}; "
                f"logs in {logs})")
            say(f"  more requests: set -a; . {stack.env_file}; set +a; "
                f"IMAGEFORK_PRESIGN_TTL_S={env['IMAGEFORK_PRESIGN_TTL_S']} imagefork submit request.json --wait")
            say(f"  stop them all: {STOP_COMMAND}   (the same: imagefork stack down --dir {stack.dir})")
        else:
            say("stopping the workers" + (" (the stack is kept; stop it with: "
                                          f"{STOP_COMMAND})" if keep_stack else " and the stack"))
            for w in workers:
                w.terminate()  # all at once, then each waited for
            for w in workers:
                w.stop()
            if not keep_stack:
                stack.down()
