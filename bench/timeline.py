"""Where the time of one seed request goes, end to end, on an idle stack.

Starts the local stack and one worker per role, sends warm-up requests, then R requests one at a
time, and prints for the last one the timeline read from the Kafka record timestamps of every
message of the workflow (request, plan, tasks, results, final event), plus the client's view.

    .venv/bin/python bench/timeline.py [--runs 15]      # writes docs/timeline.md
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from streams import serde  # noqa: E402
from streams.adapters.kafka import ensure_topics, read_to_end  # noqa: E402
from streams.client import Client, Follower  # noqa: E402
from streams.config import Config  # noqa: E402
from streams.demo import SAMPLE, seed_request  # noqa: E402
from streams.stack.local import LocalStack  # noqa: E402
from streams.stack.processes import FileServer, WorkerProcess, wait_for_log  # noqa: E402


def timelines(cfg: Config, wfs: set[str], timeout: float = 120.0) -> dict[str, list[tuple[float, str]]]:
    """Each workflow's records (request, tasks, plan and results, final event) as (Kafka record timestamp in
    seconds, what), in time order; every topic read to its end once (adapters/kafka.read_to_end)."""
    out: dict[str, list[tuple[float, str]]] = {wf: [] for wf in wfs}
    for topic in (cfg.topics.requests, cfg.topics.tasks, cfg.topics.events, cfg.topics.completed):
        for msg in read_to_end(cfg, topic, timeout):
            wf = (msg.key() or b"").decode(errors="replace").split("/", 1)[0]
            if wf not in out:
                continue
            what = topic.rsplit(".", 1)[-1]
            if topic == cfg.topics.events:
                what = serde.decode_join_event(msg.value())[0]
            out[wf].append((msg.timestamp()[1] / 1000, what))
    return {wf: sorted(rows) for wf, rows in out.items()}


def hops(rows: list[tuple[float, str]], sent: float) -> dict[str, float]:
    """ms after ``sent`` (epoch seconds) of the first record of each kind, and of the last task and result."""
    out: dict[str, float] = {}
    for t, what in rows:
        out.setdefault(what, round((t - sent) * 1000))
    for t, what in rows:
        if what in ("tasks", "TaskResult"):
            out[f"last {what}"] = round((t - sent) * 1000)
    return out


@contextmanager
def idle_pipeline(namespace: str):
    """The local stack (its topics made), a file server for the sample and one worker per role, all ready; all
    stopped after. Yields ``cfg``, ``url`` (the sample's), ``stack``, ``workers`` (role -> WorkerProcess)."""
    tmp = Path(tempfile.mkdtemp(prefix="imagefork-bench-"))
    stack = LocalStack(tmp / "stack")
    with ExitStack() as undo:  # undone in reverse, each step even when one before it fails
        undo.callback(shutil.rmtree, tmp, ignore_errors=True)
        undo.callback(stack.down)
        env = {**stack.up(), "IMAGEFORK_FETCH_ALLOW": "127.0.0.0/8", "IMAGEFORK_NAMESPACE": namespace}
        os.environ.update(env)
        cfg = Config.from_env()
        ensure_topics(cfg)
        server = FileServer(SAMPLE.parent)
        undo.callback(server.close)
        workers = {}
        for role in ("join", "resize", "planner"):
            workers[role] = WorkerProcess(role, env, tmp / "logs")
            undo.callback(workers[role].stop)
        for w in workers.values():
            assert wait_for_log(w, "imagefork ready", 120), w.log_tail()
        yield SimpleNamespace(cfg=cfg, url=server.url(SAMPLE.name), stack=stack, workers=workers)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args()
    with idle_pipeline("tl.") as pipe:
        cfg, url = pipe.cfg, pipe.url
        client, follower = Client(cfg), Follower(cfg)
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
        rows = timelines(cfg, {wf})[wf]
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


if __name__ == "__main__":
    raise SystemExit(main())
