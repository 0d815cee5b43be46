"""Where the time of one seed request goes, end to end, on an idle stack.

Starts the local stack and one worker per role, sends warm-up requests, then R requests one at a
time, and prints for the last one the timeline read from the Kafka record timestamps of every
message of the workflow (request, plan, tasks, results, final event), plus the client's view.

    .venv/bin/python bench/timeline.py [--runs 15]      # writes docs/timeline.md
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from confluent_kafka import Consumer, TopicPartition

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from streams import serde  # noqa: E402
from streams.adapters.kafka import ensure_topics  # noqa: E402
from streams.client import Client, Follower  # noqa: E402
from streams.config import Config  # noqa: E402
from streams.demo import SAMPLE, seed_request  # noqa: E402
from streams.stack.local import LocalStack  # noqa: E402
from streams.stack.processes import FileServer, WorkerProcess, wait_for_log  # noqa: E402


def timeline(cfg: Config, wf: str) -> list[tuple[float, str]]:
    consumer = Consumer({"bootstrap.servers": cfg.bootstrap_servers, "group.id": f"tl-{uuid.uuid4()}",
                         "enable.auto.commit": False})
    events = []
    for topic in (cfg.topics.requests, cfg.topics.tasks, cfg.topics.events, cfg.topics.completed):
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, 0) for p in parts])
        end = time.monotonic() + 2
        while time.monotonic() < end:
            msg = consumer.poll(0.1)
            if msg is None or msg.error() or not (msg.key() or b"").decode().startswith(wf):
                continue
            what = topic.rsplit(".", 1)[-1]
            if topic == cfg.topics.events:
                what = serde.decode_join_event(msg.value())[0]
            events.append((msg.timestamp()[1] / 1000, what))
    consumer.close()
    return sorted(events)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="imagefork-timeline-"))
    stack = LocalStack(tmp / "stack")
    env = {**stack.up(), "IMAGEFORK_FETCH_ALLOW": "127.0.0.0/8", "IMAGEFORK_NAMESPACE": "tl."}
    os.environ.update(env)
    cfg = Config.from_env()
    ensure_topics(cfg)
    server = FileServer(SAMPLE.parent)
    workers = [WorkerProcess(r, env, tmp / "logs") for r in ("join", "resize", "planner")]
    try:
        for w in workers:
            assert wait_for_log(w, "imagefork ready", 120), w.log_tail()
        client, follower = Client(cfg), Follower(cfg)
        url = server.url(SAMPLE.name)
        for _ in range(3):
            follower.wait([client.submit(seed_request(url))], 60)
        e2e = []
        for _ in range(args.runs):
            t0 = time.time()
            wf = client.submit(seed_request(url))
            follower.wait([wf], 60)
            t1 = time.time()
            e2e.append(t1 - t0)
        follower.close()
        rows = timeline(cfg, wf)
        lines = ["# One seed request, end to end", "",
                 f"`.venv/bin/python bench/timeline.py --runs {args.runs}`: idle stack, one worker per role, "
                 f"{os.cpu_count()} cores. End to end as the client sees it: p50 "
                 f"{statistics.median(e2e) * 1000:.0f} ms, min {min(e2e) * 1000:.0f} ms over {args.runs} runs.", "",
                 "Timeline of the last run (Kafka record timestamps, ms after the client sent the request):", "",
                 "| ms | record |", "|---|---|"]
        lines += [f"| {(t - t0) * 1000:.0f} | {what} |" for t, what in rows]
        lines += [f"| {(t1 - t0) * 1000:.0f} | the client has the final event |"]
        out = ROOT / "docs" / "timeline.md"
        out.write_text("\n".join(lines) + "\n")
        print(out.read_text())
        return 0
    finally:
        for w in workers:
            w.stop()
        server.close()
        stack.down()


if __name__ == "__main__":
    raise SystemExit(main())
