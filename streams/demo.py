"""``make demo``: the seed request end to end on the local stack, then everything stopped."""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from streams.config import Config

SAMPLE = Path(__file__).parent / "assets" / "sample.png"
SEED_SIZES = [{"width": 300, "height": 300}, {"width": 200, "height": 200}, {"width": 1200, "height": 1200}]


def seed_request(location: str) -> dict:
    return {"fileLocation": location, "outputFormats": ["png", "jpg", "webp"],
            "outputSizes": SEED_SIZES, "maintainAspectRatio": True}


def run_demo(keep_stack: bool = False) -> int:
    from streams.cli import print_final, progress_bar
    from streams.client import Client, Follower
    from streams.stack.local import LocalStack, default_state_dir
    from streams.stack.processes import FileServer, WorkerProcess, wait_for_log

    say = lambda msg: print(f"==> {msg}", file=sys.stderr, flush=True)  # noqa: E731
    stack = LocalStack(default_state_dir().parent / "demo-stack")
    if not stack.running():
        import shutil
        shutil.rmtree(stack.dir, ignore_errors=True)  # every demo starts from empty topics and bucket
    say("starting the local stack (Apache Kafka in KRaft mode + S3Proxy; fetched with mvn on first use)")
    env = stack.up()
    for k, v in env.items():
        say(f"  {k}={v}")
    work = Path(tempfile.mkdtemp(prefix="imagefork-demo-"))
    server = FileServer(SAMPLE.parent)
    env = {**env, "IMAGEFORK_FETCH_ALLOW": "127.0.0.0/8", "IMAGEFORK_PARTITIONS": "6"}
    workers: list[WorkerProcess] = []
    try:
        import os
        os.environ.update(env)
        config = Config.from_env()
        from streams.adapters.kafka import ensure_topics
        ensure_topics(config)
        say(f"starting the workers (planner, resize, join); logs in {work}")
        workers = [WorkerProcess(role, env, work) for role in ("join", "resize", "planner")]
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
        print_final(final)
        say(f"done in {time.monotonic() - started:.2f}s (end to end, as the client saw it)")
        return 0 if final.status == "COMPLETED" else 1
    finally:
        say("stopping the workers" + ("" if keep_stack else " and the stack"))
        for w in workers:
            w.stop()
        server.close()
        if not keep_stack:
            stack.down()
