#!/bin/bash
# Two revisions of the pipeline, benchmarked alternately on this machine (a noisy one: each pair back to
# back, so drift hits both): bench/compare.sh OLD [NEW] [ROUNDS]. NEW defaults to HEAD, ROUNDS to 3. Each
# round runs bench/pipeline.py (12 seed requests, one resize worker of 2 slots) and bench/join.py (9- and
# 100-wide, 60,000 results: at 10,000 a run lasted about 1.5 s and measured the join's first fetch and last
# commit more than its rate, 6,000 against 12,000 results/s for the same code) from a clone of each revision
# with this checkout's .venv; logs and reports go to
# ${OUT:-/tmp/imagefork-compare}/, and the last lines printed are the medians and the change of each figure.
set -eu
old=$1 new=${2:-HEAD} rounds=${3:-3}
root=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-/tmp/imagefork-compare}
rm -rf "$out" && mkdir -p "$out"
for v in old new; do
  git clone -q "$root" "$out/$v" && git -C "$out/$v" checkout -q "$([ $v = old ] && echo "$old" || echo "$new")"
  ln -s "$root/.venv" "$out/$v/.venv"
done
for i in $(seq 1 "$rounds"); do
  for v in old new; do
    d=$out/$v
    (cd "$d" && PYTHONPATH=$d timeout 900 .venv/bin/python bench/pipeline.py --requests 12 --idle-runs 5 \
       --runs 1x2 --out "$out/report-pipeline-$v-$i" > "$out/pipeline-$v-$i.log" 2>&1)
    (cd "$d" && PYTHONPATH=$d timeout 900 .venv/bin/python bench/join.py --widths 9,100 --results 60000 \
       --skip-restart --skip-tick --out "$out/report-join-$v-$i" > "$out/join-$v-$i.log" 2>&1)
    echo "round $i: $v done" >&2
  done
done
"$root/.venv/bin/python" - "$out" "$rounds" <<'PY'
import re, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
figures = {"pipeline requests/s": ("pipeline", r"pipeline W=1x2: ([\d.]+) requests/s"),
           "ratio pipeline/baseline": ("pipeline", r"throughput ratio pipeline/baseline: ([\d.]+)"),
           "idle p50 s": ("pipeline", r"idle p50 ([\d.]+)s"),
           "join 9-wide results/s": ("join", r"width 9: (\d+) results/s"),
           "join 100-wide results/s": ("join", r"width 100: (\d+) results/s")}
for name, (kind, pattern) in figures.items():
    med = {}
    for v in ("old", "new"):
        found = [re.search(pattern, open(f"{out}/{kind}-{v}-{i}.log").read()) for i in range(1, rounds + 1)]
        med[v] = statistics.median(float(m.group(1)) for m in found if m)
    print(f"{name}: old {med['old']:g}, new {med['new']:g}, {100 * (med['new'] - med['old']) / med['old']:+.1f} %")
PY
