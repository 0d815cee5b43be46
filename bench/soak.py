"""Memory soak of the resize worker (issue 20, item 4): does its RSS stay within its memory budget?

Starts the local stack (Kafka + S3Proxy), a file server for the sample image and one worker per role
(planner, resize with its default slots, join); sends N seed requests at a fixed rate, each with a
fileLocation of its own (``sample.png?n=<i>``: every request is a new source to the resize worker's
cache), follows every final event, and samples every few seconds (jittered) the RSS of each role's
process tree and, from the resize worker's /metrics, its decoded-source cache (bytes, hits, misses).

Prints the RSS series (a row per 30 s; per 10 s in a short run), the resize worker's peak RSS, its RSS at
the last final event and after a tail of idle sampling, the least-squares slope of its RSS over the
second half of the soak (first request sent .. last final event) with its standard error, the budget,
the cache hit rate, and the checks (PASS/FAIL):

- peak resize RSS <= budget + 150 MB;
- second-half slope < 1 MB/min;
- every request got exactly one final event, COMPLETED.

Exit code 1 if a check fails. The run is added to docs/soak.json (runs keyed by their settings and
commit; a run with the same ones replaces the earlier one) and docs/soak.md is written from it.

    .venv/bin/python bench/soak.py                                  # 400 requests at 2/s, ~4 min
    .venv/bin/python bench/soak.py --requests 60 --rate 4           # quick, ~1 min
    .venv/bin/python bench/soak.py --budget-mb 384                  # a 512 MB container's budget?
    .venv/bin/python bench/soak.py --budget-mb 384 --idle-s 120     # ... with the budget binding

The seed soak's cache holds what 10 s of requests bring (~60-120 MB): under any budget above that,
the budget never binds; ``--idle-s 120`` makes the cache want 240 sources (740 MB) at 2/s, so it has to
evict. A slope from a 400-request run is known to within a few MB/min only (its standard error is
printed); a 20-minute soak (``--requests 2400``) brings that to about 0.4-1.

Diagnosis, nothing in streams/ changed for it (a sitecustomize.py on the resize worker's PYTHONPATH):
``--trace`` writes the resize worker's heap every interval (glibc's mallinfo2: bytes in use and held
free; the Python allocator's blocks; the object types that grew; with ``--tracemalloc N`` the allocation
sites too, at a heavy cost in speed) and adds it to the report; ``--malloc-trim-s S`` calls glibc's
malloc_trim(0) in it every S seconds; ``--worker-env KEY=VALUE`` (repeatable) passes a variable to the
workers (e.g. ``MALLOC_MMAP_THRESHOLD_=131072``); ``--note`` puts a line in the run's section.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import shlex
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from streams.adapters.kafka import ensure_topics  # noqa: E402
from streams.adapters.objectstore import ObjectStore  # noqa: E402
from streams.client import Client, Follower  # noqa: E402
from streams.config import Config  # noqa: E402
from streams.demo import SAMPLE, seed_request  # noqa: E402
from streams.stack.local import LocalStack  # noqa: E402
from streams.stack.processes import FileServer, WorkerProcess, wait_for_log  # noqa: E402

CORES = os.cpu_count() or 1
MB = 2 ** 20
HEADROOM_MB = 150  # what the resize worker may hold beyond its budget: interpreter, libraries, clients
SLOPE_LIMIT_MB_MIN = 1.0
ROLES = ("planner", "resize", "join")


# --- sampling ------------------------------------------------------------------------------------

def tree(pid: int) -> list[psutil.Process]:
    try:
        p = psutil.Process(pid)
        return [p] + p.children(recursive=True)
    except psutil.Error:
        return []


def tree_memory(pid: int) -> dict[str, float]:
    """RSS of a process tree, its anonymous part (the heap; the rest is mapped files: libraries), and its
    CPU seconds."""
    rss = anon = cpu = 0
    for p in tree(pid):
        try:
            rss += p.memory_info().rss
            t = p.cpu_times()
            cpu += t.user + t.system
            status = Path(f"/proc/{p.pid}/status").read_text()
            m = re.search(r"^RssAnon:\s+(\d+) kB", status, re.M)
            anon += int(m.group(1)) * 1024 if m else 0
        except (psutil.Error, OSError):
            pass
    return {"rss": rss, "anon": anon, "cpu": cpu}


_METRIC = re.compile(r'^(imagefork_source_cache_bytes|imagefork_source_cache_lookups_total)(\{result="(\w+)"\})? '
                     r'([0-9.eE+-]+)$', re.M)


def scrape_cache(url: str | None) -> dict | None:
    """The resize worker's cache gauge and lookup counters, from its /metrics (None: no answer)."""
    if not url:
        return None
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    out = {"bytes": 0.0, "hit": 0.0, "miss": 0.0}
    for name, _labels, result, value in _METRIC.findall(text):
        if name == "imagefork_source_cache_bytes":
            out["bytes"] = float(value)
        elif result in ("hit", "miss"):
            out[result] = float(value)
    return out


class Sampler:
    """Every ``interval`` s on average, in a thread: each role's tree RSS and the resize worker's cache
    metrics."""

    def __init__(self, pids: dict[str, int], metrics_url: str | None, interval: float, progress):
        self.pids, self.metrics_url, self.interval, self.progress = pids, metrics_url, interval, progress
        self.samples: list[dict] = []
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="soak sampler", daemon=True)

    def start(self) -> "Sampler":
        self.t0, self.wall0 = time.monotonic(), time.time()
        self.thread.start()
        return self

    def sample(self) -> dict:
        row = {"t": round(time.monotonic() - self.t0, 1), **self.progress()}
        for role, pid in self.pids.items():
            mem = tree_memory(pid)
            row[f"{role}_rss_mb"] = round(mem["rss"] / MB, 1)
            if role == "resize":
                row["resize_anon_mb"] = round(mem["anon"] / MB, 1)
                row["resize_cpu_s"] = round(mem["cpu"], 2)
        cache = scrape_cache(self.metrics_url)
        if cache is not None:
            row.update(cache_mb=round(cache["bytes"] / MB, 1), hits=int(cache["hit"]), misses=int(cache["miss"]))
        self.samples.append(row)
        return row

    def _run(self) -> None:
        # a jittered period: the cache's sweeper runs every IMAGEFORK_SOURCE_IDLE_S / 2 (5 s), and samples
        # taken at a steady 5 s drift slowly against it, reading its sawtooth at a creeping phase (a 20-minute
        # soak showed the cache, and RSS with it, "growing" 1.3 MB/min that way)
        while True:
            self.sample()
            if self._stop.wait(self.interval * random.uniform(0.7, 1.3)):
                return

    def stop(self) -> list[dict]:
        self._stop.set()
        self.thread.join()
        return self.samples


def slope_mb_per_min(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MB) points, in MB per minute."""
    return fit(points)[0]


def fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares slope of (seconds, MB) points and its standard error, both in MB per minute: RSS
    jumps by several MB from one sample to the next (the images in flight), so a short window's slope is
    known only to within a few MB/min."""
    n = len(points)
    if n < 3:
        return float("nan"), float("nan")
    mt = sum(t for t, _ in points) / n
    mv = sum(v for _, v in points) / n
    den = sum((t - mt) ** 2 for t, _ in points)
    if den == 0:
        return float("nan"), float("nan")
    b = sum((t - mt) * (v - mv) for t, v in points) / den
    resid = sum((v - mv - b * (t - mt)) ** 2 for t, v in points)
    return 60 * b, 60 * (resid / (n - 2) / den) ** 0.5


# --- following ------------------------------------------------------------------------------------

class CountingFollower(Follower):
    """A Follower that also counts the final events per workflow id (Follower keeps the first only)."""

    def __init__(self, config: Config):
        super().__init__(config)
        self.final_count: dict[str, int] = {}

    def _take(self, msg, wanted, progress) -> None:
        if msg.topic() == self.config.topics.completed:
            key = (msg.key() or b"").decode("utf-8", "replace")
            if wanted is None or key in wanted:
                self.final_count[key] = self.final_count.get(key, 0) + 1
        super()._take(msg, wanted, progress)


# --- the resize worker's tracing, when asked (--trace) ------------------------------------------------

SITECUSTOMIZE = '''
\"\"\"bench/soak.py --trace, in the resize worker: every SOAK_TRACE_EVERY s a line of this process's heap to
SOAK_TRACE_DIR/trace-PID.jsonl: glibc's mallinfo2 (what malloc holds from the kernel, in use and free), the
Python object allocator's blocks, and every SOAK_TRACE_DEEP_EVERY lines the object types that grew (and,
with SOAK_TRACEMALLOC=N frames, the allocation sites that grew) since the soak began (the bench writes
SOAK_TRACE_DIR/started then). With SOAK_MALLOC_TRIM_S, an experiment: glibc's malloc_trim(0) every that many
seconds (what a trim in the source cache's sweeper would do).\"\"\"
import os
if os.environ.get("SOAK_MALLOC_TRIM_S"):
    import ctypes, threading, time

    def _trim(every=float(os.environ["SOAK_MALLOC_TRIM_S"]), libc=ctypes.CDLL("libc.so.6")):
        while True:
            time.sleep(every)
            libc.malloc_trim(0)

    threading.Thread(target=_trim, name="soak malloc_trim", daemon=True).start()
if os.environ.get("SOAK_TRACE_DIR"):
    import ctypes, gc, json, sys, threading, time

    frames = int(os.environ.get("SOAK_TRACEMALLOC", "0"))
    if frames:
        import tracemalloc
        tracemalloc.start(frames)

    class _Mallinfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                  "fsmblks", "uordblks", "fordblks", "keepcost")]

    try:
        _libc = ctypes.CDLL("libc.so.6")
        _libc.mallinfo2.restype = _Mallinfo2
    except (OSError, AttributeError):
        _libc = None

    def _mallinfo():
        if _libc is None:
            return {}
        m = _libc.mallinfo2()
        return {f: getattr(m, f) for f, _ in _Mallinfo2._fields_}

    def _types():
        counts = {}
        for o in gc.get_objects():
            name = type(o).__name__
            counts[name] = counts.get(name, 0) + 1
        return counts

    def _loop():
        folder = os.environ["SOAK_TRACE_DIR"]
        every = float(os.environ.get("SOAK_TRACE_EVERY", "5"))
        deep_every = int(os.environ.get("SOAK_TRACE_DEEP_EVERY", "6"))
        path = os.path.join(folder, f"trace-{os.getpid()}.jsonl")
        base_types = base_snap = None
        n = 0
        while True:
            rec = {"wall": time.time(), "pid": os.getpid(), "threads": threading.active_count(),
                   "py_blocks": sys.getallocatedblocks(), "mallinfo2": _mallinfo()}
            if (base_types is None or n % deep_every == 0) and os.path.exists(os.path.join(folder, "started")):
                types = _types()
                if base_types is None:
                    base_types = types
                grew = sorted(((k, v - base_types.get(k, 0)) for k, v in types.items()), key=lambda g: -g[1])
                rec["objects"] = sum(types.values())
                rec["type_growth"] = [g for g in grew[:15] if g[1] > 0]
                if frames:
                    snap = tracemalloc.take_snapshot()
                    rec["traced_bytes"] = tracemalloc.get_traced_memory()[0]
                    if base_snap is None:
                        base_snap = snap
                    rec["top"] = [{"size_diff": st.size_diff, "count_diff": st.count_diff,
                                   "traceback": [f"{fr.filename}:{fr.lineno}" for fr in st.traceback][-6:]}
                                  for st in snap.compare_to(base_snap, "traceback")[:12]]
            with open(path, "a") as f:
                f.write(json.dumps(rec) + "\\n")
            n += 1
            time.sleep(every)

    threading.Thread(target=_loop, name="soak trace", daemon=True).start()
'''


# --- the soak ------------------------------------------------------------------------------------

def metrics_url_of(worker: WorkerProcess, timeout: float = 30.0) -> str | None:
    """The /metrics URL a worker listening on port 0 logged at its start."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        m = re.search(r"http://([\d.]+):(\d+)/metrics", worker.log_path.read_text(errors="replace"))
        if m:
            return f"http://{m.group(1)}:{m.group(2)}/metrics"
        time.sleep(0.2)
    return None


def soak(args, env: dict, url: str, tmp: Path) -> dict:
    ns = f"soak-{uuid.uuid4().hex[:6]}."
    env = {**env, "IMAGEFORK_NAMESPACE": ns, "IMAGEFORK_SOURCE_IDLE_S": str(args.idle_s),
           **dict(kv.split("=", 1) for kv in args.worker_env)}
    if args.budget_given:
        env["IMAGEFORK_MEMORY_BUDGET_MB"] = str(args.budget_mb)
    cfg = Config.from_env({**os.environ, **env})
    ensure_topics(cfg)
    resize_env = {**env, "IMAGEFORK_METRICS_LISTEN": "127.0.0.1:0"}
    if args.trace or args.malloc_trim_s:
        site = tmp / "trace-site"
        site.mkdir(parents=True, exist_ok=True)
        (site / "sitecustomize.py").write_text(textwrap.dedent(SITECUSTOMIZE))
        resize_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    if args.trace:
        resize_env.update(SOAK_TRACE_DIR=str(tmp), SOAK_TRACE_EVERY=str(args.interval),
                          SOAK_TRACEMALLOC=str(args.tracemalloc))
    if args.malloc_trim_s:
        resize_env["SOAK_MALLOC_TRIM_S"] = str(args.malloc_trim_s)
    log_dir = tmp / "logs"
    workers = {"join": WorkerProcess("join", env, log_dir, f"{ns}join"),
               "planner": WorkerProcess("planner", env, log_dir, f"{ns}planner"),
               "resize": WorkerProcess("resize", resize_env, log_dir, f"{ns}resize")}
    sampler = follower = None
    try:
        for wp in workers.values():
            if not wait_for_log(wp, "imagefork ready", 120):
                raise RuntimeError(f"{wp.name} did not start: {wp.log_tail()}")
        metrics_url = metrics_url_of(workers["resize"])
        client = Client(cfg)
        follower = CountingFollower(cfg)
        follower.wait([client.submit(seed_request(url + "?n=warm-up"))], 120)  # the pipeline answers
        ids: list[str] = []
        state = {"sent": 0, "done": 0}
        sampler = Sampler({role: wp.pid for role, wp in workers.items()}, metrics_url, args.interval,
                          lambda: dict(state)).start()
        (tmp / "started").touch()  # --trace: the resize worker's heap growth is counted from here
        start = time.monotonic()
        late = 0.0  # how far behind its schedule the last request went out
        for i in range(args.requests):
            due = start + i / args.rate
            while (now := time.monotonic()) < due:
                follower.pump(min(0.05, due - now), None)
            late = max(late, time.monotonic() - due)
            ids.append(client.submit(seed_request(f"{url}?n={i}")))
            state["sent"] = len(ids)
            state["done"] = sum(1 for w in ids if w in follower.finals)
        sent_s = time.monotonic() - start
        wanted = set(ids)
        deadline = time.monotonic() + args.finish_timeout
        while not wanted <= set(follower.finals) and time.monotonic() < deadline:
            follower.pump(0.2, None)
            state["done"] = sum(1 for w in ids if w in follower.finals)
        soak_s = time.monotonic() - start
        sampler.sample()  # the end of the soak
        follower.pump(3.0, None)  # a second final event of any of them would come now
        if args.tail_s > 0:  # after the load: the cache empties after IMAGEFORK_SOURCE_IDLE_S
            time.sleep(args.tail_s)
            follower.pump(0.5, None)
        samples = sampler.stop()
        heap = read_heap(tmp / f"trace-{workers['resize'].pid}.jsonl", sampler.wall0) if args.trace else []
        sampler = None
        finals = {w: follower.finals.get(w) for w in ids}
        counts = [follower.final_count.get(w, 0) for w in ids]
        statuses: dict[str, int] = {}
        for f in finals.values():
            key = f.status if f is not None else "MISSING"
            statuses[key] = statuses.get(key, 0) + 1
        latency = sorted((f.completedAt - f.submittedAt) / 1000 for f in finals.values() if f is not None)
        return {"namespace": ns, "metrics_url": metrics_url, "samples": samples, "heap": heap, "sent_s": round(sent_s, 1),
                "soak_s": round(soak_s, 1), "max_send_lateness_s": round(late, 2), "statuses": statuses,
                "exactly_one_final": sum(1 for c in counts if c == 1), "duplicate_finals": sum(1 for c in counts if c > 1),
                "latency_p50_s": latency[len(latency) // 2] if latency else None,
                "latency_max_s": latency[-1] if latency else None, "resize_slots": cfg.resize_slots,
                "resize_pool": cfg.resize_pool, "log_dir": str(log_dir)}
    finally:
        if sampler is not None:
            sampler.stop()
        if follower is not None:
            follower.close()
        for wp in workers.values():
            wp.terminate()
        for wp in workers.values():
            wp.stop()


def read_heap(path: Path, wall0: float) -> list[dict]:
    """The resize worker's heap lines (--trace), on the soak's clock, in MB."""
    out = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # the last line, half written when the worker stopped
        m = rec.get("mallinfo2") or {}
        row = {"t": round(rec["wall"] - wall0, 1), "threads": rec["threads"], "py_blocks": rec["py_blocks"]}
        if m:
            row.update(malloc_heap_mb=round(m["arena"] / MB, 1), malloc_mmap_mb=round(m["hblkhd"] / MB, 1),
                       malloc_used_mb=round(m["uordblks"] / MB, 1), malloc_free_mb=round(m["fordblks"] / MB, 1))
        for k in ("objects", "type_growth", "traced_bytes", "top"):
            if k in rec:
                row[k] = rec[k]
        out.append(row)
    return out


def summarize(args, run: dict) -> dict:
    samples, soak_s = run["samples"], run["soak_s"]
    during = [s for s in samples if s["t"] <= soak_s + 1]
    second = [(s["t"], s["resize_rss_mb"]) for s in during if s["t"] >= soak_s / 2]
    peak = {role: max(s[f"{role}_rss_mb"] for s in samples) for role in ROLES}
    end = during[-1]
    last = samples[-1]
    hits, misses = last.get("hits"), last.get("misses")
    cpu = end["resize_cpu_s"] - samples[0]["resize_cpu_s"]
    hit_rate = hits / (hits + misses) if hits is not None and hits + misses else None
    slope, slope_se = fit(second)
    beyond = slope_mb_per_min([(s["t"], s["resize_rss_mb"] - s.get("cache_mb", 0)) for s in during
                               if s["t"] >= soak_s / 2])
    limit = args.budget_mb + HEADROOM_MB
    complete = run["statuses"].get("COMPLETED", 0) == args.requests and run["exactly_one_final"] == args.requests
    checks = {
        f"peak resize RSS <= budget + {HEADROOM_MB} MB ({peak['resize']:.0f} <= {limit})": peak["resize"] <= limit,
        f"second-half slope < {SLOPE_LIMIT_MB_MIN:g} MB/min ("
        + (f"{slope:+.2f})" if slope == slope else f"not measured: {len(second)} samples in the second half)"):
            slope < SLOPE_LIMIT_MB_MIN,
        f"every request exactly one final event, COMPLETED ({run['exactly_one_final']}/{args.requests} one, "
        f"statuses {run['statuses']})": complete,
    }
    return {"peak_rss_mb": peak, "resize_rss_end_mb": end["resize_rss_mb"],
            "resize_rss_after_tail_mb": last["resize_rss_mb"], "resize_peak_anon_mb": max(s.get("resize_anon_mb", 0) for s in samples),
            "peak_cache_mb": max((s.get("cache_mb", 0) for s in samples), default=None),
            "cache_mb_after_tail": last.get("cache_mb"),
            "second_half_slope_mb_per_min": round(slope, 3), "second_half_slope_se_mb_per_min": round(slope_se, 3),
            "second_half_points": len(second),
            "second_half_slope_beyond_cache_mb_per_min": round(beyond, 3),
            "resize_cpu_s_per_request": round(cpu / args.requests, 3), "hits": hits, "misses": misses, "hit_rate": round(hit_rate, 4) if hit_rate is not None else None,
            "limit_mb": limit, "checks": checks, "passed": all(checks.values())}


def table(samples: list[dict], heap: list[dict] = (), every: float | None = None) -> list[str]:
    """A row per 30 s (per 10 s in a run under 3 minutes) and the last sample."""
    if every is None:
        every = 30.0 if samples and samples[-1]["t"] > 180 else 10.0
    rows = ["| t s | sent | done | planner RSS MB | resize RSS MB | (anon) | join RSS MB | cache MB | hits | misses |"
            + (" malloc in use / free MB |" if heap else ""),
            "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if heap else "")]
    picked, next_t = [], 0.0
    for s in samples:
        if s["t"] >= next_t:
            picked.append(s)
            next_t = (s["t"] // every + 1) * every
    if samples and picked[-1] is not samples[-1]:
        picked.append(samples[-1])
    for s in picked:
        rows.append(f"| {s['t']:.0f} | {s['sent']} | {s['done']} | {s['planner_rss_mb']:.0f} | {s['resize_rss_mb']:.0f} | "
                    f"{s.get('resize_anon_mb', 0):.0f} | {s['join_rss_mb']:.0f} | {s.get('cache_mb', '-')} | "
                    f"{s.get('hits', '-')} | {s.get('misses', '-')} |" + (heap_cell(s["t"], heap) if heap else ""))
    return rows


def code_version() -> str:
    """The commit the soak ran (with a note when streams/ had uncommitted changes); SOAK_CODE_VERSION when
    this is no git checkout (a ``git archive`` copy, say)."""
    try:
        git = ["git", "-C", str(ROOT)]
        commit = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(git + ["status", "--porcelain", "--", "streams"], capture_output=True, text=True,
                               check=True).stdout.strip()
        return commit + (" + uncommitted changes in streams/" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("SOAK_CODE_VERSION", "unknown")


def heap_cell(t: float, heap: list[dict]) -> str:
    h = min(heap, key=lambda h: abs(h["t"] - t))
    return f" {h.get('malloc_used_mb', '-')} / {h.get('malloc_free_mb', '-')} |"


def run_key(r: dict) -> str:
    s = r["settings"]
    extra = list(s.get("worker_env") or []) + (["trace"] if s.get("trace") else []) \
        + ([f"malloc_trim every {s['malloc_trim_s']:g} s"] if s.get("malloc_trim_s") else [])
    return " ".join([f"{s['requests']}@{s['rate']:g}/s budget {s['budget_mb']} idle {s['idle_s']:g}"] + extra
                    + [f"code {r.get('code', 'unknown').split()[0]}"])


def run_section(r: dict) -> list[str]:
    s, res, run = r["settings"], r["result"], r["run"]
    lines = [f"## {run_key(r)}: {'PASS' if res['passed'] else 'FAIL'}", "",
             f"`{r['command']}`, {r['date']}, code {r.get('code', 'unknown')}, {r['machine']}; run time {r['wall_s']:.0f} s (stack and workers "
             f"included). Resize worker: {run['resize_slots']} slot(s), {run['resize_pool']} pool, "
             + (f"IMAGEFORK_MEMORY_BUDGET_MB={s['budget_mb']}" if s.get("budget_given", True) else
                f"budget {s['budget_mb']} MB (its default: IMAGEFORK_MEMORY_BUDGET_MB not set)")
             + f", IMAGEFORK_SOURCE_IDLE_S={s['idle_s']:g}"
             + (f", {' '.join(s['worker_env'])}" if s.get("worker_env") else "") + ".", "",
             *([r["note"], ""] if r.get("note") else []),
             f"{s['requests']} seed requests (9 outputs each, a distinct fileLocation each) sent in {run['sent_s']:.0f} s "
             f"(at most {run['max_send_lateness_s']:.2f} s behind schedule); the last final event at "
             f"{run['soak_s']:.0f} s; end-to-end latency p50 {run['latency_p50_s']:.2f} s, max "
             f"{run['latency_max_s']:.2f} s. Samples every {s['interval']:g} s (on average, jittered); {s['tail_s']:g} s more after the "
             f"last final event. RSS is each role's process tree; (anon) is the resize worker's anonymous memory "
             f"(its heap, no mapped files).", ""]
    lines += table(run["samples"], run.get("heap") or [])
    p = res["peak_rss_mb"]
    lines += ["", "| result | value |", "|---|---|",
              f"| peak RSS MB (planner / resize / join) | {p['planner']:.0f} / {p['resize']:.0f} / {p['join']:.0f} |",
              f"| resize RSS at the last final event, after the tail (MB) | {res['resize_rss_end_mb']:.0f}, "
              f"{res['resize_rss_after_tail_mb']:.0f} |",
              f"| resize second-half slope (least squares, {res['second_half_points']} samples) | "
              f"{res['second_half_slope_mb_per_min']:+.2f} MB/min (standard error "
              f"{res.get('second_half_slope_se_mb_per_min', float('nan')):.2f}) |",
              f"| the same, of resize RSS minus the cache's bytes | "
              f"{res['second_half_slope_beyond_cache_mb_per_min']:+.2f} MB/min |",
              f"| budget (IMAGEFORK_MEMORY_BUDGET_MB), limit budget + {HEADROOM_MB} | {s['budget_mb']} MB, "
              f"{res['limit_mb']} MB |",
              f"| resize CPU seconds per request (its process tree) | {res.get('resize_cpu_s_per_request', '-')} |",
              f"| cache peak, after the tail (MB) | {res['peak_cache_mb']}, {res['cache_mb_after_tail']} |",
              f"| cache hits / misses (hit rate) | {res['hits']} / {res['misses']} "
              f"({(res['hit_rate'] or 0) * 100:.1f}%) |",
              f"| final events | {run['statuses']}, exactly one for {run['exactly_one_final']}, "
              f"duplicates {run['duplicate_finals']} |", ""]
    lines += [f"- {'PASS' if ok else 'FAIL'}: {name}" for name, ok in res["checks"].items()]
    se = res.get("second_half_slope_se_mb_per_min", float("nan"))
    if abs(res["second_half_slope_mb_per_min"] - SLOPE_LIMIT_MB_MIN) < 2 * se:
        lines.append(f"- note: the slope is within two standard errors ({2 * se:.1f} MB/min) of "
                     f"{SLOPE_LIMIT_MB_MIN:g} MB/min: this run does not decide that check (a longer soak narrows "
                     f"the error; a quiet 20-minute one to about 0.4)")
    return lines + [""]


def dump_json(obj, indent: int = 0) -> str:
    """JSON with nested objects indented and each item of a list of objects (a sample, a heap line) on
    one line: a 20-minute run's 250 samples take 250 lines, not 3,000."""
    pad, inner = "  " * indent, "  " * (indent + 1)
    if isinstance(obj, dict) and obj:
        items = [f"{inner}{json.dumps(k)}: {dump_json(v, indent + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}" + ("\n" if indent == 0 else "")
    if isinstance(obj, list) and obj and all(isinstance(x, dict) for x in obj) and indent > 1:
        return "[\n" + ",\n".join(inner + json.dumps(x) for x in obj) + f"\n{pad}]"
    if isinstance(obj, list) and obj and any(isinstance(x, (dict, list)) or (isinstance(x, str) and len(x) > 80)
                                             for x in obj):
        return "[\n" + ",\n".join(inner + dump_json(x, indent + 1) for x in obj) + f"\n{pad}]"
    return json.dumps(obj)


def experimental(r: dict) -> bool:
    s = r["settings"]
    return bool(s.get("worker_env") or s.get("malloc_trim_s") or s.get("tracemalloc"))


def write_reports(out: Path, record: dict | None) -> None:
    """Add ``record`` to out/soak.json (None: add nothing) and write out/soak.md from it."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "soak.json"
    try:
        stored = json.loads(path.read_text())
        runs = stored["runs"]
    except (OSError, ValueError, KeyError):
        stored, runs = {}, []
    summary = stored.get("summary") or []  # paragraphs written by hand into soak.json: what the runs say
    if record is not None:
        runs = [r for r in runs if run_key(r) != run_key(record)] + [record]
    # the plain runs first (--trace's heap lines cost next to nothing), then the experiments (allocator
    # settings, tracemalloc); the newest first in each
    runs = sorted(sorted(runs, key=lambda r: r["date"], reverse=True), key=experimental)
    path.write_text(dump_json({**({"summary": summary} if summary else {}), "runs": runs}))
    lines = ["# Resize worker memory soak", "",
             "`bench/soak.py` (issue 20, item 4): the local stack, one worker per role, N seed requests at a fixed "
             "rate, each a new source to the resize worker's decoded-source cache; the RSS of each role's process "
             f"tree every few seconds. Checks: peak resize RSS <= IMAGEFORK_MEMORY_BUDGET_MB + {HEADROOM_MB} MB; "
             f"resize RSS slope over the soak's second half < {SLOPE_LIMIT_MB_MIN:g} MB/min; every request one "
             "final event, COMPLETED. One section per setting (and commit), the latest run of each.", "",
             "Reading the numbers: RSS moves by 10-20 MB from one sample to the next (the images in flight, the "
             "cache's sources coming and going), so the slope of a 400-request run's second half (100 s) has a "
             "standard error of 3-7 MB/min and its sign is chance; a 20-minute soak brings it to about 0.4. "
             "*After the tail* is RSS once the load has stopped and (at IMAGEFORK_SOURCE_IDLE_S=10) the cache has emptied: what it keeps above the "
             "first sample is memory the allocator holds free, not objects (the `--trace` runs show glibc's free "
             "bytes beside the bytes in use).", ""]
    if summary:
        lines += ["## What the runs say", ""] + [x for p in summary for x in (p, "")]
    lines += [
             "| run | date | resize slots | peak resize RSS MB | at the last final event | after the tail | "
             "2nd-half slope MB/min (SE) | checks |", "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        res = r["result"]
        lines.append(f"| {run_key(r)} | {r['date']} | {r['run']['resize_slots']} | {res['peak_rss_mb']['resize']:.0f} | "
                     f"{res['resize_rss_end_mb']:.0f} | {res['resize_rss_after_tail_mb']:.0f} | "
                     f"{res['second_half_slope_mb_per_min']:+.2f} ({res.get('second_half_slope_se_mb_per_min', float('nan')):.2f}) | "
                     + ", ".join(("PASS" if ok else "FAIL") for ok in res["checks"].values()) + " |")
    lines.append("")
    for r in runs:
        lines += run_section(r)
    (out / "soak.md").write_text("\n".join(lines))


def command_line(argv: list[str]) -> str:
    """How the run was started, for the report: quoted, without ``--out`` (where the report went)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--out":
            skip = True
        elif not arg.startswith("--out="):
            kept.append(arg)
    return shlex.join([".venv/bin/python", "bench/soak.py"] + kept)


def default_budget_mb(env: dict) -> int:
    """The budget a resize worker takes when IMAGEFORK_MEMORY_BUDGET_MB is not set: ``Config.memory_budget``
    (bytes: the setting, else sized from this machine's memory limit) where there is one, else the
    ``memory_budget_mb`` default."""
    config = Config.from_env(env)
    budget = getattr(config, "memory_budget", None)
    return budget >> 20 if isinstance(budget, int) else config.memory_budget_mb


def main() -> int:
    # stopped (SIGTERM, or ^C even where a shell started us with SIGINT ignored): workers and stack go too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--rate", type=float, default=2.0, help="requests per second")
    ap.add_argument("--budget-mb", type=int, default=None,
                    help="IMAGEFORK_MEMORY_BUDGET_MB (default: not set, the worker's own default, read from Config)")
    ap.add_argument("--idle-s", type=float, default=Config().source_idle_s, help="IMAGEFORK_SOURCE_IDLE_S")
    ap.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    ap.add_argument("--tail-s", type=float, default=15.0, help="sampling on after the last final event")
    ap.add_argument("--finish-timeout", type=float, default=600.0)
    ap.add_argument("--worker-env", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--trace", action="store_true",
                    help="the resize worker's heap (glibc mallinfo2, Python blocks, object types) every interval")
    ap.add_argument("--tracemalloc", type=int, default=0, metavar="FRAMES",
                    help="with --trace: tracemalloc too, FRAMES deep (slows the worker down a lot)")
    ap.add_argument("--malloc-trim-s", type=float, default=0.0, metavar="S",
                    help="experiment: glibc malloc_trim(0) in the resize worker every S seconds")
    ap.add_argument("--note", default="", help="a line of text for this run's section in docs/soak.md")
    ap.add_argument("--render", action="store_true", help="only write soak.md again from soak.json")
    ap.add_argument("--out", default=str(ROOT / "docs"), help="where soak.json and soak.md go; '' for nowhere")
    args = ap.parse_args()
    if args.render:
        write_reports(Path(args.out), None)
        return 0
    args.budget_given = args.budget_mb is not None
    if not args.budget_given:
        args.budget_mb = default_budget_mb({**os.environ, **dict(kv.split("=", 1) for kv in args.worker_env)})
    began = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="imagefork-soak-"))
    stack = LocalStack(tmp / "stack")
    server = None
    ok = False
    try:
        print("starting the local stack...", file=sys.stderr, flush=True)
        env = {**stack.up(), "IMAGEFORK_FETCH_ALLOW": "127.0.0.0/8"}
        os.environ.update(env)
        ObjectStore(Config.from_env()).ensure_bucket()
        server = FileServer(SAMPLE.parent)
        print(f"soak: {args.requests} requests at {args.rate:g}/s, budget {args.budget_mb} MB, idle {args.idle_s:g} s",
              file=sys.stderr, flush=True)
        run = soak(args, env, server.url(SAMPLE.name), tmp)
        result = summarize(args, run)
        command = command_line(sys.argv[1:])
        record = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M"), "code": code_version(),
                  "machine": f"{CORES} cores, {round(psutil.virtual_memory().total / 2**30)} GiB, "
                             f"{os.uname().sysname} {os.uname().machine}",
                  "wall_s": round(time.monotonic() - began, 1),
                  "settings": {"requests": args.requests, "rate": args.rate, "budget_mb": args.budget_mb,
                               "budget_given": args.budget_given,
                               "idle_s": args.idle_s, "interval": args.interval, "tail_s": args.tail_s,
                               "worker_env": args.worker_env, "trace": args.trace,
                               "tracemalloc": args.tracemalloc, "malloc_trim_s": args.malloc_trim_s},
                  "note": args.note, "run": run, "result": result}
        print("\n".join(run_section(record)))
        if args.out:
            write_reports(Path(args.out), record)
        if args.trace:
            print(f"trace files: {tmp}/trace-*.jsonl", file=sys.stderr)
        ok = result["passed"]
        return 0 if ok else 1
    finally:
        if server is not None:
            server.close()
        stack.down()
        if ok and not args.trace:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"logs kept in {tmp}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
