"""What the source facts cost, against the seed request's own compute, in this process (issue 25's goal:
under 10 %).

The seed request's compute: the sample photo decoded once and its 9 outputs (png, jpg, webp x 300, 200,
1200) resized and encoded, as a resize worker does it. The facts: what the one task of a run that reports
them adds (SHA-256 and the header's facts, then colours, BlurHash and pHash of the decoded frame). CPU
time of this thread, runs alternated, medians printed with their ratio; the last line is
``facts / seed request compute: X.X %``.

    .venv/bin/python bench/facts.py [--runs 7]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from streams.config import Encoding, Limits  # noqa: E402
from streams.core.imaging import OutputSpec, open_image, prepare, resize_image  # noqa: E402
from streams.core.imaging.facts import pixel_facts, source_info  # noqa: E402
from streams.demo import SAMPLE  # noqa: E402

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
    pixel_facts(frame)  # imports imagehash and scipy once, as a worker does at its first facts task
    seed, facts, each = [], [], {k: [] for k in parts}
    for _ in range(args.runs):
        seed.append(cpu(lambda: seed_compute(data)))
        for name, fn in parts.items():
            each[name].append(cpu(fn))
        facts.append(sum(each[name][-1] for name in parts))
    s, f = statistics.median(seed), statistics.median(facts)
    print(f"source: {SAMPLE.name}, {len(data)} bytes, {frame.width}x{frame.height}; {args.runs} runs, CPU medians")
    print(f"seed request compute (decode + 9 resize/encode): {s * 1000:8.1f} ms")
    for name, values in each.items():
        print(f"  facts: {name:<24} {statistics.median(values) * 1000:8.2f} ms")
    print(f"facts, all of them:                              {f * 1000:8.1f} ms")
    print(f"facts / seed request compute: {100 * f / s:.1f} %")


if __name__ == "__main__":
    main()
