"""``make bench``: the pipeline against a plain process pool doing the same work, on this machine.

Prints, in one run:
- baseline: N seed requests' resize-encode-upload work in a plain pool (processes, and threads), no Kafka;
- pipeline: the same N requests through Kafka with W = 1 and W = 2 resize workers
  (requests/s, images/s, end-to-end latency p50/p95/p99, CPU seconds per image, peak RSS per role);
- idle latency: the seed request alone, end to end, against its pure compute time / cores;
- ratios. Writes docs/bench.json, docs/bench.md and docs/bench.png. The last line is
  ``throughput ratio pipeline/baseline: X.XX``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from streams.adapters.kafka import ensure_topics  # noqa: E402
from streams.adapters.objectstore import ObjectStore  # noqa: E402
from streams.adapters.source import fetch_http  # noqa: E402
from streams.agents import resize_job  # noqa: E402
from streams.client import Client, Follower  # noqa: E402
from streams.config import Config  # noqa: E402
from streams.core.imaging import OutputSpec, prepare_source, resize_image  # noqa: E402
from streams.core.planning import parse_request, plan_tasks  # noqa: E402
from streams.demo import SAMPLE, seed_request  # noqa: E402
from streams.stack.local import LocalStack  # noqa: E402
from streams.stack.processes import FileServer, WorkerProcess, wait_for_log  # noqa: E402

CORES = os.cpu_count() or 1
STACK_PIDS: dict[str, dict] = {}


def pct(values, q):
    values = sorted(values)
    if not values:
        return float("nan")
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


class TreeSampler:
    """Peak RSS and CPU seconds of process trees, sampled in a thread."""

    def __init__(self, pids: dict[str, list[int]]):
        self.pids = pids
        self.peak = {role: 0 for role in pids}
        self._stop = threading.Event()
        self.cpu_start = self.cpu()
        self.roles_start = self.cpu_by_role()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _procs(self, pid):
        try:
            p = psutil.Process(pid)
            return [p] + p.children(recursive=True)
        except psutil.Error:
            return []

    def cpu_by_role(self) -> dict[str, float]:
        out = {}
        for role, pids in self.pids.items():
            total = 0.0
            for pid in pids:
                for p in self._procs(pid):
                    try:
                        t = p.cpu_times()
                        total += t.user + t.system
                    except psutil.Error:
                        pass
            out[role] = total
        return out

    def cpu(self) -> float:
        return sum(v for k, v in self.cpu_by_role().items() if k in ("planner", "resize", "join"))

    def _run(self):
        while not self._stop.is_set():
            for role, pids in self.pids.items():
                rss = 0
                for pid in pids:
                    for p in self._procs(pid):
                        try:
                            rss += p.memory_info().rss
                        except psutil.Error:
                            pass
                # per process of the role: the largest tree
                self.peak[role] = max(self.peak[role], rss // max(1, len(pids)))
            self._stop.wait(0.1)

    def stop(self) -> tuple[dict[str, int], float]:
        cpu = self.cpu() - self.cpu_start
        now = self.cpu_by_role()
        self.role_cpu = {k: round(now[k] - self.roles_start.get(k, 0.0), 2) for k in now}
        self._stop.set()
        self.thread.join()
        return self.peak, cpu


def staged_tasks(config: Config, store: ObjectStore, url: str, n: int) -> list[dict]:
    """What the planner does for N requests (fetch once each, stage), as plain task dicts."""
    tasks = []
    req = parse_request(seed_request(url), max_dimension=10000, max_tasks=1000)
    for i in range(n):
        wf = f"base-{uuid.uuid4().hex[:8]}"
        data = fetch_http(url, config.limits, config.fetch_allow_networks)
        key = f"{config.staging_prefix}{wf}/source"
        store.put(key, data, "application/octet-stream")
        tasks += [t.to_dict() for t in plan_tasks(req, wf, source_uri=store.uri(key), deadline=2**62)]
    return tasks


def baseline(config: Config, url: str, n: int, kind: str) -> dict:
    store = ObjectStore(config)
    start = time.perf_counter()
    tasks = staged_tasks(config, store, url, n)
    if kind == "process":
        import multiprocessing
        pool = ProcessPoolExecutor(CORES, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=resize_job.init, initargs=(config,))
        list(pool.map(resize_job.run, tasks[:CORES]))  # warm the processes (imports), not timed
        start = time.perf_counter()
        tasks = staged_tasks(config, store, url, n)
    else:
        resize_job.init(config)
        pool = ThreadPoolExecutor(CORES)
    results = list(pool.map(resize_job.run, tasks))
    elapsed = time.perf_counter() - start
    pool.shutdown()
    assert all(r["ok"] for r in results), [r for r in results if not r["ok"]][:2]
    return {"kind": kind, "requests": n, "images": len(results), "seconds": elapsed,
            "requests_per_s": n / elapsed, "images_per_s": len(results) / elapsed}


def compute_time_of_seed(config: Config) -> float:
    """Pure compute of one seed request in one process: decode once, 9 resize+encode (no I/O)."""
    data = SAMPLE.read_bytes()
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        im = prepare_source(data, config.limits)
        for fmt in ("png", "jpg", "webp"):
            for s in (300, 200, 1200):
                resize_image(im, OutputSpec(fmt, s, s, True), config.limits, config.encoding)
        best = min(best, time.perf_counter() - t)
    return best


def run_pipeline(env: dict, config: Config, url: str, n: int, w: int, slots: int, log_dir: Path,
                 idle_runs: int) -> dict:
    ns = f"bench{w}x{slots}-{uuid.uuid4().hex[:6]}."
    env = {**env, "IMAGEFORK_NAMESPACE": ns, "IMAGEFORK_RESIZE_CONCURRENCY": str(slots)}
    cfg = Config.from_env({**os.environ, **env})
    ensure_topics(cfg)
    workers = {"join": [WorkerProcess("join", env, log_dir, f"{ns}join")],
               "planner": [WorkerProcess("planner", env, log_dir, f"{ns}planner")],
               "resize": [WorkerProcess("resize", env, log_dir, f"{ns}resize{i}") for i in range(w)]}
    try:
        for ws in workers.values():
            for wp in ws:
                if not wait_for_log(wp, "imagefork ready", 120):
                    raise RuntimeError(f"{wp.name} did not start: {wp.log_tail()}")
        client = Client(cfg)
        # warm-up: one request end to end (pools, connections)
        follower = Follower(cfg)
        follower.wait([client.submit(seed_request(url))], 120)
        # idle latency: one request at a time
        idle = []
        for _ in range(idle_runs):
            t = time.perf_counter()
            wf = client.submit(seed_request(url))
            follower.wait([wf], 120)
            idle.append(time.perf_counter() - t)
        # throughput: N at once
        sampler = TreeSampler({**{role: [p.pid for p in ws] for role, ws in workers.items()},
                               **{name: [svc["pid"]] for name, svc in STACK_PIDS.items()}})
        sent, arrived = {}, {}
        start = time.perf_counter()
        ids = []
        for _ in range(n):
            wf = client.submit(seed_request(url))
            sent[wf] = time.perf_counter()
            ids.append(wf)
        pending = set(ids)
        deadline = time.monotonic() + 600
        while pending and time.monotonic() < deadline:
            follower.pump(0.05, set(ids))
            for wf in list(pending):
                if wf in follower.finals:
                    arrived[wf] = time.perf_counter()
                    pending.discard(wf)
        elapsed = time.perf_counter() - start
        peak, cpu = sampler.stop()
        follower.close()
        finals = [follower.finals[i] for i in ids if i in follower.finals]
        assert len(finals) == n and all(f.status == "COMPLETED" for f in finals), "pipeline run incomplete"
        lat = [arrived[i] - sent[i] for i in ids]
        return {"w": w, "slots": slots, "requests": n, "images": 9 * n, "seconds": elapsed, "requests_per_s": n / elapsed,
                "images_per_s": 9 * n / elapsed, "latency_p50": pct(lat, .5), "latency_p95": pct(lat, .95),
                "latency_p99": pct(lat, .99), "idle_latency_p50": pct(idle, .5),
                "idle_latencies": idle, "cpu_s_per_image": cpu / (9 * n),
                "peak_rss_mb": {k: round(v / 2**20, 1) for k, v in peak.items()},
                "cpu_seconds_by_process": sampler.role_cpu}
    finally:
        for ws in workers.values():
            for wp in ws:
                wp.stop()


def write_reports(out: Path, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=2))
    b = report["baseline"]
    lines = [f"# Benchmark ({report['machine']})", "",
             f"`{report['command']}`, {report['date']}; N = {report['requests']} seed requests "
             f"(9 images each), {CORES} cores.", "",
             "| run | requests/s | images/s | p50 s | p95 s | p99 s | idle p50 s | CPU s/image | peak RSS MB (planner/resize/join) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for k in ("process", "thread"):
        x = b[k]
        lines.append(f"| baseline ({k} pool) | {x['requests_per_s']:.2f} | {x['images_per_s']:.1f} | | | | | | |")
    for p in report["pipeline"]:
        r = p["peak_rss_mb"]
        lines.append(f"| pipeline W={p['w']}, {p['slots']} slot(s) each | {p['requests_per_s']:.2f} | {p['images_per_s']:.1f} | "
                     f"{p['latency_p50']:.2f} | {p['latency_p95']:.2f} | {p['latency_p99']:.2f} | "
                     f"{p['idle_latency_p50']:.3f} | {p['cpu_s_per_image']:.3f} | "
                     f"{r.get('planner')}/{r.get('resize')}/{r.get('join')} |")
    lines += ["", "Where the CPU went during each throughput run (seconds, process trees):", "",
              "| run | " + " | ".join(report["pipeline"][0]["cpu_seconds_by_process"]) + " |",
              "|---|" + "---|" * len(report["pipeline"][0]["cpu_seconds_by_process"])]
    for p in report["pipeline"]:
        lines.append(f"| W={p['w']}x{p['slots']} | " + " | ".join(str(v) for v in p["cpu_seconds_by_process"].values()) + " |")
    lines += ["", "| ratio | value |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in report["ratios"].items()]
    lines += ["", f"Seed request compute time (decode once + 9 resize/encode, one process): "
              f"{report['seed_compute_s']:.3f} s; / cores = {report['seed_compute_s'] / CORES:.3f} s."]
    (out / "bench.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        scaling = [p for p in report["pipeline"] if p["slots"] == 1]
        ws = [p["w"] for p in scaling]
        fig, ax1 = plt.subplots(figsize=(6, 4))
        ax1.plot(ws, [p["images_per_s"] for p in scaling], "o-", label="pipeline images/s (1 slot per worker)")
        best = max(b.values(), key=lambda x: x["images_per_s"])
        ax1.axhline(best["images_per_s"], color="gray", ls="--", label=f"baseline images/s ({best['kind']} pool)")
        ax1.set_xlabel("resize workers (W)")
        ax1.set_ylabel("images/s")
        ax1.set_xticks(ws)
        ax2 = ax1.twinx()
        ax2.plot(ws, [p["latency_p50"] for p in scaling], "s-", color="tab:red", label="p50 latency (s)")
        ax2.set_ylabel("p50 end-to-end latency under load (s)")
        fig.legend(loc="lower center", ncol=3, fontsize=7)
        fig.tight_layout(rect=(0, 0.08, 1, 1))
        fig.savefig(out / "bench.png", dpi=110)
    except ImportError:
        pass


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=12)
    ap.add_argument("--idle-runs", type=int, default=7)
    ap.add_argument("--runs", default=f"1x{Config().resize_slots},1x{CORES},1x1,2x1",
                    help="resize workers x slots per worker, comma separated")
    ap.add_argument("--out", default=str(ROOT / "docs"))
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="imagefork-bench-"))
    stack = LocalStack(tmp / "stack")
    print("starting the local stack...", file=sys.stderr)
    env = {**stack.up(), "IMAGEFORK_FETCH_ALLOW": "127.0.0.0/8", "IMAGEFORK_PARTITIONS": "6"}
    STACK_PIDS.update(json.loads(stack.state_file.read_text())["services"])
    os.environ.update(env)
    server = FileServer(SAMPLE.parent)
    try:
        config = Config.from_env()
        ObjectStore(config).ensure_bucket()
        url = server.url(SAMPLE.name)
        seed_compute = compute_time_of_seed(config)
        print(f"seed compute (one process): {seed_compute:.3f}s", file=sys.stderr)
        base = {k: baseline(config, url, args.requests, k) for k in ("process", "thread")}
        for k, v in base.items():
            print(f"baseline {k}: {v['requests_per_s']:.2f} requests/s, {v['images_per_s']:.1f} images/s",
                  file=sys.stderr)
        pipes = []
        for run in args.runs.split(","):
            w, slots = (int(x) for x in run.split("x"))
            p = run_pipeline(env, config, url, args.requests, w, slots, tmp / "logs", args.idle_runs)
            print(f"pipeline W={w}x{slots}: {p['requests_per_s']:.2f} requests/s, p50 {p['latency_p50']:.2f}s, "
                  f"idle p50 {p['idle_latency_p50']:.3f}s", file=sys.stderr)
            pipes.append(p)
        best_base = max(base.values(), key=lambda x: x["requests_per_s"])
        best_pipe = max(pipes, key=lambda x: x["requests_per_s"])
        ratios = {
            "throughput pipeline/baseline (best W / best pool)": best_pipe["requests_per_s"] / best_base["requests_per_s"],
            "baseline thread/process": base["thread"]["requests_per_s"] / base["process"]["requests_per_s"],
            "idle p50 latency / (compute / cores)": pipes[0]["idle_latency_p50"] / (seed_compute / CORES),
            "idle p50 latency - compute / cores (s)": pipes[0]["idle_latency_p50"] - seed_compute / CORES,
        }
        one = {p["w"]: p for p in pipes if p["slots"] == 1}
        if 1 in one and 2 in one:
            ratios["W=2 / W=1 throughput (1 slot per worker)"] = one[2]["requests_per_s"] / one[1]["requests_per_s"]
        report = {"machine": f"{CORES} cores, {round(psutil.virtual_memory().total / 2**30)} GiB, "
                             f"{os.uname().sysname} {os.uname().machine}",
                  "command": "make bench", "date": time.strftime("%Y-%m-%d"), "requests": args.requests,
                  "seed_compute_s": seed_compute, "baseline": base, "pipeline": pipes, "ratios": ratios}
        write_reports(Path(args.out), report)
        print((Path(args.out) / "bench.md").read_text())
        print(f"throughput ratio pipeline/baseline: "
              f"{ratios['throughput pipeline/baseline (best W / best pool)']:.2f}")
        return 0
    finally:
        server.close()
        stack.down()


if __name__ == "__main__":
    raise SystemExit(main())
