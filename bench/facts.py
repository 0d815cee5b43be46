"""What the source facts cost, against the seed request's own compute, in this process (issue 25's goal:
under 10 %); and what reuse saves when the seed request is sent again (goal: at least 90 % of its resize
CPU).

The seed request's compute: the sample photo decoded once and its 9 outputs (png, jpg, webp x 300, 200,
1200) resized and encoded, as a resize worker does it. The facts: what the one task of a run that reports
them adds (SHA-256 and the header's facts, then colours, BlurHash and pHash of the decoded frame). CPU
time of this thread, runs alternated, medians printed with their ratio. Reuse: the seed's 9 tasks through
the resize job (``streams/agents/resize_job.py``, as a resize worker runs them, with ``IMAGEFORK_REUSE=prefix``)
against an in-memory bucket, under one workflow id and then under another: the second run's CPU against
the first's. The last lines are ``facts / seed request compute: X.X %`` and ``reuse saves: X.X %``.

    .venv/bin/python bench/facts.py [--runs 7]
"""
from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from streams.agents import resize_job  # noqa: E402
from streams.config import Config, Encoding, Limits  # noqa: E402
from streams.core.errors import SourceNotFound  # noqa: E402
from streams.core.imaging import OutputSpec, open_image, prepare, resize_image  # noqa: E402
from streams.core.imaging.facts import pixel_facts, source_info  # noqa: E402
from streams.core.planning import parse_request, plan_tasks  # noqa: E402
from streams.demo import SAMPLE, seed_request  # noqa: E402

LIM, ENC = Limits(), Encoding()
SIZES = (300, 200, 1200)
FORMATS = ("png", "jpg", "webp")


def cpu(fn) -> float:
    started = time.thread_time()
    fn()
    return time.thread_time() - started


def seed_compute(data: bytes) -> None:
    source = prepare(data, LIM, max_box=(max(SIZES), max(SIZES)))
    for fmt in FORMATS:
        for side in SIZES:
            resize_image(source, OutputSpec(fmt, side, side), LIM, ENC)


class MemoryBucket:
    """What the resize job asks of the object store, in a dict (no network in the measure)."""

    def __init__(self):
        self.objects: dict[str, tuple[bytes, str, dict]] = {}

    def uri(self, key):
        return f"s3://bench/{key}"

    def url(self, key):
        return f"http://s3/bench/{key}"

    def put(self, key, data, content_type, metadata=None):
        self.objects[key] = (data, content_type, metadata or {})

    def get(self, uri, max_bytes):
        key = uri.split("/", 3)[3]
        if key not in self.objects:
            raise SourceNotFound(f"{uri}: not found")
        return self.objects[key][0]

    def head(self, key):
        return {"ContentLength": len(self.objects[key][0])} if key in self.objects else None

    def copy(self, source_key, key, content_type, metadata):
        self.objects[key] = (self.objects[source_key][0], content_type, metadata)


def reuse_runs(data: bytes, runs: int) -> tuple[list[float], list[float]]:
    """CPU of the seed's tasks made, then of the same tasks under another id (reused), ``runs`` times."""
    resize_job.init(Config(reuse="prefix", output_prefix="out/"))
    made, reused = [], []
    for run in range(runs):
        store = resize_job._store = MemoryBucket()
        store.put("staging/source", data, "image/png")
        sha = hashlib.sha256(data).hexdigest()
        request = parse_request(seed_request("http://x/sample.png"), max_dimension=10000, max_tasks=1000)
        for wf, into in ((f"first-{run}", made), (f"again-{run}", reused)):
            tasks = [{**t.to_dict(), "sourceUri": "s3://bench/staging/source", "sourceSha256": sha}
                     for t in plan_tasks(request, wf, source_uri="", deadline=2**62, output_prefix="out/")]
            resize_job._budget = resize_job.MemoryBudget(Config().memory_budget)  # no source cached across runs
            outcomes = []
            into.append(cpu(lambda: outcomes.extend(resize_job.run(t) for t in tasks)))
            assert all(o["ok"] for o in outcomes), outcomes
            assert all(o["output"]["reused"] == wf.startswith("again") for o in outcomes), "reuse as expected"
    return made, reused


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    data = SAMPLE.read_bytes()
    frame = prepare(data, LIM).frames[0]
    parts = {
        "sha256 and header": lambda: source_info(open_image(data, LIM), data, LIM),
        "colors": lambda: pixel_facts(frame, ("colors",)),
        "placeholder (BlurHash)": lambda: pixel_facts(frame, ("placeholder",)),
        "phash": lambda: pixel_facts(frame, ("phash",)),
    }
    together = lambda: pixel_facts(frame)  # noqa: E731 - what a facts task runs: one resize shared by the three
    pixel_facts(frame)  # imports imagehash and scipy once, as a worker does at its first facts task
    seed, facts, each = [], [], {k: [] for k in parts}
    for _ in range(args.runs):
        seed.append(cpu(lambda: seed_compute(data)))
        for name, fn in parts.items():
            each[name].append(cpu(fn))
        facts.append(each["sha256 and header"][-1] + cpu(together))
    s, f = statistics.median(seed), statistics.median(facts)
    print(f"source: {SAMPLE.name}, {len(data)} bytes, {frame.width}x{frame.height}; {args.runs} runs, CPU medians")
    print(f"seed request compute (decode + 9 resize/encode): {s * 1000:8.1f} ms")
    for name, values in each.items():
        print(f"  facts: {name:<24} {statistics.median(values) * 1000:8.2f} ms")
    print(f"facts, all of them (one task's, the pixel facts in one call): {f * 1000:8.1f} ms")
    print(f"facts / seed request compute: {100 * f / s:.1f} %")
    made, reused = reuse_runs(data, args.runs)
    m, r = statistics.median(made), statistics.median(reused)
    print(f"the seed's 9 tasks, made: {m * 1000:.1f} ms CPU; sent again under another id, reused: {r * 1000:.1f} ms")
    print(f"reuse saves: {100 * (1 - r / m):.1f} %")


if __name__ == "__main__":
    main()
