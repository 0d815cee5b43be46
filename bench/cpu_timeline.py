"""Where the cores go during one idle seed request: CPU by process per 10 ms, from the kernel's scheduler
switches (``perf record -e sched:sched_switch``), beside the request's Kafka timeline (bench/timeline.py).

Starts the local stack and one worker per role, warms them (5 requests alone, then ``--bursts`` x 12 at once:
the JVMs compile their hot code meanwhile), sends ``--runs`` seed requests one at a time, each recorded on its
own, and reports the median run: the CPU ms each process used in each 10 ms, the totals, the busiest threads
and the request's hops. A stretch where the request's work keeps only one core busy shows as ~10 ms a bucket.
Root, and Linux's ``perf`` (Debian's linux-perf); not in ``make bench``.

    sudo .venv/bin/python bench/cpu_timeline.py [--runs 7] [--bursts 8]   # writes docs/cpu-timeline.md
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable

ROOT = Path(__file__).resolve().parents[1]

BUCKET_S = 0.010
_SWITCH = re.compile(r"^\s*\[(\d+)\]\s+([\d.]+):.*prev_pid=(\d+).*next_pid=(\d+)")


def parse_switches(text: str) -> list[tuple[int, float, int, int]]:
    """``perf script -F cpu,time,event,trace`` lines of sched_switch as (cpu, seconds, prev tid, next tid); a
    thread's name may hold spaces ("C2 CompilerThre"), so only the numbers are read. Switches written some other
    way (perf's sched_switch plugin prints ``comm:pid [prio]``) are an error, not an empty timeline."""
    out, seen = [], 0
    for line in text.splitlines():
        m = _SWITCH.match(line)
        if m:
            out.append((int(m[1]), float(m[2]), int(m[3]), int(m[4])))
        seen += "sched_switch" in line
    if seen and not out:
        raise ValueError(f"perf's sched_switch lines are not in the expected form: {text.splitlines()[0][:200]}")
    return out


def busy(switches: Iterable[tuple[int, float, int, int]], t0: float, t1: float,
         who: Callable[[int], tuple[str, str]], bucket: float = BUCKET_S) -> tuple[dict[int, Counter], Counter]:
    """CPU ms by process in each ``bucket`` of [t0, t1] (bucket k starts at t0 + k x bucket), and by (process,
    thread) over all of it. A CPU runs a thread from one switch to the next; tid 0 is the idle task. The recording
    must cover the window: a CPU's first switch says what ran there before it, and what still runs after its last
    one runs to t1."""
    per_bucket: dict[int, Counter] = defaultdict(Counter)
    per_thread: Counter = Counter()
    running: dict[int, tuple[int, float]] = {}

    def ran(tid: int, since: float, until: float) -> None:
        a, b = max(since, t0), min(until, t1)
        if not tid or a >= b:
            return
        role, thread = who(tid)
        per_thread[(role, thread)] += (b - a) * 1000
        k = int((a - t0) // bucket)
        while a < b:
            end = min(b, t0 + (k + 1) * bucket)
            if end > a:  # a float landing on a bucket's edge moves on to the next
                per_bucket[k][role] += (end - a) * 1000
                a = end
            k += 1

    ordered = sorted(switches, key=lambda s: s[1])
    if not ordered or ordered[0][1] > t0:
        raise ValueError("the recording began after the window did: its first switch is later than t0")
    for cpu, ts, prev, nxt in ordered:
        tid, since = running.get(cpu, (prev, t0))
        ran(tid, since, ts)
        running[cpu] = (nxt, ts)
    for tid, since in running.values():
        ran(tid, since, t1)
    return dict(per_bucket), per_thread


def threads_of(pids: dict[int, str]) -> dict[int, tuple[str, str]]:
    """Every thread of the given processes: tid -> (its process's name, the thread's own name)."""
    out = {}
    for pid, role in pids.items():
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/comm") as f:
                    out[int(tid)] = (role, f.read().strip())
            except OSError:  # gone since the listing
                continue
    return out


@contextmanager
def recording(out: Path):
    """``perf record`` of every CPU's switches into ``out`` while the block runs (it is recording when the block
    starts), stopped however the block ends."""
    log = out.with_suffix(".log")
    with open(log, "wb") as err:
        perf = subprocess.Popen(["perf", "record", "-q", "-k", "CLOCK_MONOTONIC", "-e", "sched:sched_switch", "-a",
                                 "-o", str(out)], stdout=subprocess.DEVNULL, stderr=err)
    try:
        time.sleep(0.5)  # it scans every task before it records
        if perf.poll() is not None:
            raise RuntimeError(f"perf record stopped at once ({perf.returncode}): {log.read_text()[-500:]}")
        yield
    finally:
        if perf.poll() is None:
            perf.send_signal(signal.SIGINT)
            try:
                perf.wait(30)
            except subprocess.TimeoutExpired:
                perf.kill()
                perf.wait()


@contextmanager
def _removed(path: Path):
    try:
        yield
    finally:
        shutil.rmtree(path, ignore_errors=True)


def report(runs: list[dict], args) -> str:
    mid = sorted(runs, key=lambda r: r["ms"])[len(runs) // 2]
    roles = sorted({r for row in mid["buckets"].values() for r in row})
    total: Counter = Counter()
    lines = ["# Where the cores go during one seed request (bench/cpu_timeline.py)", "",
             f"`sudo .venv/bin/python bench/cpu_timeline.py --runs {args.runs} --bursts {args.bursts}`, "
             f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores: the local stack and one worker per role, warmed "
             f"with 5 requests and {args.bursts} x 12 at once, then {args.runs} seed requests alone, each under "
             "`perf record -e sched:sched_switch`. End to end as the client saw them: "
             + ", ".join(f"{r['ms']:.0f}" for r in runs) + f" ms; the median run ({mid['ms']:.0f} ms) below.", "",
             "Its Kafka records, ms after the client sent it: "
             + ", ".join(f"{k} {v}" for k, v in mid["hops"].items()) + ".", "",
             "CPU ms each process used in each 10 ms (two cores offer 20):", "",
             "| ms | " + " | ".join(roles) + " | all |", "|---" * (len(roles) + 2) + "|"]
    for k in sorted(mid["buckets"]):
        row = mid["buckets"][k]
        total.update(row)
        lines.append(f"| {k * 10} | " + " | ".join(f"{row.get(r, 0):.1f}" for r in roles)
                     + f" | {sum(row.values()):.1f} |")
    lines.append("| **all** | " + " | ".join(f"**{total.get(r, 0):.0f}**" for r in roles)
                 + f" | **{sum(total.values()):.0f}** |")
    lines += ["", "The busiest threads (ms): " + ", ".join(
        f"{role} {thread} {ms:.1f}" for (role, thread), ms in mid["threads"].most_common(12)) + "."]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--bursts", type=int, default=8)
    args = ap.parse_args()
    if os.geteuid() != 0 or not shutil.which("perf"):
        print("cpu_timeline: needs root and Linux's perf (apt-get install linux-perf)", file=sys.stderr)
        return 2
    if not os.path.exists("/sys/kernel/tracing/events"):
        subprocess.run(["mount", "-t", "tracefs", "nodev", "/sys/kernel/tracing"], check=False)
    sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

    from streams.client import Client, Follower
    from streams.demo import seed_request
    from timeline import hops, idle_pipeline, timelines

    tmp = Path(tempfile.mkdtemp(prefix="imagefork-cputl-"))
    runs: list[dict] = []
    with idle_pipeline("ctl.") as pipe, _removed(tmp):
        cfg, url = pipe.cfg, pipe.url
        pids = {w.pid: r for r, w in pipe.workers.items()}
        pids.update({svc["pid"]: name
                     for name, svc in json.loads(pipe.stack.state_file.read_text())["services"].items()})
        pids[os.getpid()] = "client"
        client, follower = Client(cfg), Follower(cfg)
        for _ in range(5):
            follower.wait([client.submit(seed_request(url))], 60)
        for _ in range(args.bursts):
            follower.wait([client.submit(seed_request(url)) for _ in range(12)], 120)
        time.sleep(1.0)
        for i in range(args.runs):
            data = tmp / f"sched-{i}.data"
            with recording(data):
                t0, sent = time.monotonic(), time.time()
                wf = client.submit(seed_request(url))
                follower.wait([wf], 60)
                t1 = time.monotonic()
                time.sleep(0.1)
            names = threads_of(pids)
            text = subprocess.run(["perf", "script", "-i", str(data), "-F", "cpu,time,event,trace"],
                                  capture_output=True, text=True, check=True).stdout
            buckets, threads = busy(parse_switches(text), t0, t1, lambda tid: names.get(tid, ("other", "?")))
            runs.append({"wf": wf, "sent": sent, "ms": (t1 - t0) * 1000, "buckets": buckets, "threads": threads})
            print(f"run {i + 1}: {runs[-1]['ms']:.0f} ms", flush=True)
            data.unlink()
        follower.close()
        rows = timelines(cfg, {r["wf"] for r in runs})
        for r in runs:
            r["hops"] = hops(rows[r["wf"]], r["sent"])
        text = report(runs, args)
        (ROOT / "docs" / "cpu-timeline.md").write_text(text)
        print(text)
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
