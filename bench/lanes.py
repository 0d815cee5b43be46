"""Priority lanes under a backfill: interactive seed requests behind a backlog of batch tasks.

On the local stack, one join, one planner and one resize worker (default slots):
1. idle: ``--interactive`` seed requests, one at a time, nothing else running: their end-to-end p50;
2. a backlog of ``--batch-tasks`` seed-size tasks (seed requests with ``"priority": "batch"``) is sent at
   once; the batch lane's throughput alone is measured over ``--window`` seconds (task results on the events topic);
3. the same interactive seed requests, sent one at a time behind that backlog: their p50, and the batch
   lane's throughput meanwhile;
4. the rest of the backlog is cancelled (``imagefork cancel``'s record), and the stack stopped.

Prints both p50s and their ratio (goal: at most 2), the batch throughput alone and during the interactive
requests, the share of it lost, and the backlog left when the last interactive request ended (it must still
be draining). ``python bench/lanes.py [--batch-tasks 5000] [--interactive 20]``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.pipeline import pct  # noqa: E402
from streams import serde  # noqa: E402
from streams.adapters.kafka import ensure_topics, read_to_end  # noqa: E402
from streams.adapters.objectstore import ObjectStore  # noqa: E402
from streams.client import Client, Follower  # noqa: E402
from streams.config import Config  # noqa: E402
from streams.core.models import Cancellation, now_ms  # noqa: E402
from streams.demo import SAMPLE, seed_request  # noqa: E402
from streams.stack.local import LocalStack  # noqa: E402
from streams.stack.processes import FileServer, WorkerProcess, wait_for_log  # noqa: E402


def one_at_a_time(client: Client, follower: Follower, url: str, n: int) -> list[float]:
    latencies = []
    for _ in range(n):
        started = time.perf_counter()
        wf = client.submit(seed_request(url))
        follower.wait([wf], 120)
        latencies.append(time.perf_counter() - started)
    return latencies


def results(config: Config, ids: set[str]) -> tuple[int, float]:
    """How many task results of ``ids`` are on the events topic now, and when that was counted."""
    count = 0
    for msg in read_to_end(config, config.topics.events):
        if (msg.key() or b"").decode() in ids:
            kind, _body = serde.decode_join_event(msg.value() or b"")
            count += kind == "TaskResult"
    return count, time.monotonic()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch-tasks", type=int, default=5000)
    ap.add_argument("--interactive", type=int, default=20)
    ap.add_argument("--window", type=float, default=30.0, help="seconds the batch lane is measured alone")
    ap.add_argument("--out", default=None, help="write the figures as JSON here too")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="imagefork-lanes-"))
    stack = LocalStack(tmp / "stack")
    print("starting the local stack...", file=sys.stderr)
    env = {**stack.up(), "IMAGEFORK_FETCH_ALLOW": "127.0.0.0/8", "IMAGEFORK_PARTITIONS": "6",
           "IMAGEFORK_NAMESPACE": f"lanes-{uuid.uuid4().hex[:6]}.", "IMAGEFORK_WORKFLOW_TIMEOUT_S": "3600"}
    os.environ.update(env)
    server = FileServer(SAMPLE.parent)
    workers = []
    try:
        config = Config.from_env()
        ensure_topics(config)
        ObjectStore(config).ensure_bucket()
        url = server.url(SAMPLE.name)
        workers = [WorkerProcess(role, env, tmp / "logs", role) for role in ("join", "planner", "resize")]
        for w in workers:
            if not wait_for_log(w, "imagefork ready", 120):
                raise RuntimeError(f"{w.name} did not start: {w.log_tail()}")
        client, follower = Client(config), Follower(config)
        follower.wait([client.submit(seed_request(url))], 120)  # warm-up
        idle = one_at_a_time(client, follower, url, args.interactive)
        print(f"idle: interactive p50 {pct(idle, .5):.3f}s", file=sys.stderr)

        per_request = len(seed_request(url)["outputFormats"]) * len(seed_request(url)["outputSizes"])
        batch = [client.submit({**seed_request(url), "priority": "batch"})
                 for _ in range(max(1, args.batch_tasks // per_request))]
        print(f"backlog: {len(batch)} batch requests, {len(batch) * per_request} tasks", file=sys.stderr)
        time.sleep(5)  # the backlog planned and flowing
        ids = set(batch)
        first, start = results(config, ids)
        time.sleep(args.window)
        last, end = results(config, ids)
        alone = (last - first) / (end - start)
        print(f"batch alone: {alone:.1f} tasks/s", file=sys.stderr)

        first, start = results(config, ids)
        behind = one_at_a_time(client, follower, url, args.interactive)
        last, end = results(config, ids)
        during = (last - first) / (end - start)
        left = len(batch) * per_request - last
        print(f"behind the backlog: interactive p50 {pct(behind, .5):.3f}s; batch {during:.1f} tasks/s; "
              f"{left} batch tasks left", file=sys.stderr)
        for wf in batch:
            client.cancel(Cancellation(wf, "", "bench over", "bench", now_ms()), 30)
        follower.close()
        client.close()
        report = {"command": "python bench/lanes.py", "batch_tasks": len(batch) * per_request,
                  "interactive": args.interactive, "idle_p50_s": pct(idle, .5), "behind_p50_s": pct(behind, .5),
                  "behind_p95_s": pct(behind, .95), "ratio": pct(behind, .5) / pct(idle, .5),
                  "batch_alone_tasks_per_s": alone, "batch_during_tasks_per_s": during,
                  "batch_lost": 1 - during / alone if alone else None, "batch_tasks_left": left}
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report, indent=2))
        print(f"interactive p50 behind a backlog of {report['batch_tasks']} batch tasks: {report['behind_p50_s']:.3f}s, "
              f"idle {report['idle_p50_s']:.3f}s: ratio {report['ratio']:.2f} (goal <= 2); batch throughput lost "
              f"meanwhile: {100 * (report['batch_lost'] or 0):.0f}%; backlog still draining: {left > 0}")
        return 0
    finally:
        for w in workers:
            w.stop()
        server.close()
        stack.down()


if __name__ == "__main__":
    raise SystemExit(main())
