"""imagefork against a Celery chord over Redis, and a plain in-process pool, on the same workload, in one run.

    .venv/bin/python bench/peer.py                      # make bench: about 6-8 minutes on 2 cores
    .venv/bin/python bench/peer.py --idle-runs 5 --burst 10 --wide 200 --rounds 1   # quick: about 2 minutes

One local stack (Kafka + S3Proxy), the bench's own redis-server (no persistence, a free loopback port),
a loopback file server with the sample image, and, all up at once:
- baseline: the planner's and resize role's work in this process (fetch, stage to S3, then a pool of
  threads running imagefork's own resize job: get the staged source, decode once, resize, encode, upload);
- imagefork: planner, join and one resize worker with its default slots (3 per core), over Kafka;
- celery (cached): one Celery worker (``celery -A bench.peer_tasks worker --concurrency 2 --pool
  prefork``); a chord per request, one task per output (fetch over HTTP, decode, resize/encode, upload to
  S3Proxy), the decoded source kept per request in each worker process; the callback gathers the
  outputs' locations (the final event);
- celery (per-task decode): the same chord, every task fetching and decoding the source itself.

Measured for each, the sides taking turns (this machine is shared: turns spread its noise evenly):
(1) the seed request (3 formats x 3 sizes) alone, p50 end to end; (2) B seed requests sent at once,
requests/s; (3) one request of N tiny jpgs (16..215 px, distinct sizes), wall time; (4) CPU per seed
request during (2), per process tree: broker, workers, S3Proxy, this process (client, file server,
sampler); (5) per-task overhead: the workers' CPU during (3) less the baseline's CPU for the same N tasks,
/ N. (2) and (3) run ``--rounds`` times per side and the best round counts. Writes docs/peer.md and
docs/peer.json; the last line is
``idle p50 imagefork/celery(cached): X.XX  throughput imagefork/celery(cached): Y.YY``.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.pipeline import CORES, TreeSampler, pct  # noqa: E402
from streams.adapters.kafka import ensure_topics  # noqa: E402
from streams.adapters.objectstore import ObjectStore  # noqa: E402
from streams.adapters.source import fetch_http  # noqa: E402
from streams.agents import resize_job  # noqa: E402
from streams.client import Client, Follower  # noqa: E402
from streams.config import Config  # noqa: E402
from streams.core.imaging import prepare  # noqa: E402
from streams.core.planning import parse_request, plan_tasks  # noqa: E402
from streams.demo import SAMPLE, seed_request  # noqa: E402
from streams.stack.local import LocalStack, free_port  # noqa: E402
from streams.stack.processes import FileServer, WorkerProcess, wait_for_log  # noqa: E402

SLOTS = CORES  # celery: --concurrency = cores (its default); baseline: a thread per core
IMAGEFORK_SLOTS = Config().resize_slots  # imagefork: one resize worker with its default slots (3 per core)
WORKER_ROLES = ("planner", "resize", "join")
SIDES = ("baseline", "imagefork", "celery_cached", "celery_per_task")
LABELS = {"baseline": "in-process baseline", "imagefork": f"imagefork (1 resize worker x {IMAGEFORK_SLOTS} slots)",
          "celery_cached": "celery chord, decode cached", "celery_per_task": "celery chord, decode per task"}
ME = psutil.Process()


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def my_cpu() -> float:
    t = ME.cpu_times()
    return t.user + t.system


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy (every process, every core)."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)


class Window:
    """One measured stretch: CPU of the given process trees (TreeSampler: per role, and peak RSS), of this
    process, and of the whole machine, so that what other processes took meanwhile shows (``other``)."""

    def __init__(self, pids: dict[str, list[int]]):
        self.sampler = TreeSampler(pids)
        self.me0, self.machine0, self.t0 = my_cpu(), machine_busy(), time.perf_counter()

    def stop(self) -> "Window":
        self.seconds = time.perf_counter() - self.t0
        self.me = my_cpu() - self.me0
        self.peak, _ = self.sampler.stop()
        self.roles = self.sampler.role_cpu
        self.other = max(0.0, machine_busy() - self.machine0 - self.me - sum(self.roles.values()))
        return self

    def parts(self, roles: dict[str, list[str]]) -> dict[str, float]:
        """CPU seconds by part (each a list of roles), with this process's as ``bench process``."""
        out = {part: round(sum(self.roles.get(r, 0.0) for r in rs), 3) for part, rs in roles.items()}
        out["bench process"] = round(self.me, 3)
        return out


def other_load(*windows: Window) -> float:
    """Cores' worth of CPU that processes outside the bench used during ``windows`` (0: a quiet machine)."""
    return round(sum(w.other for w in windows) / max(1e-9, sum(w.seconds for w in windows)), 2)


def wide_request(url: str, n: int) -> dict:
    """N tiny jpgs, every size distinct: widths 16..215, heights 16..215 (a shifted cycle per 200)."""
    sizes = [{"width": 16 + i % 200, "height": 16 + (i % 200 + (i // 200) * 41) % 200} for i in range(n)]
    return {"fileLocation": url, "outputFormats": ["jpg"], "outputSizes": sizes, "maintainAspectRatio": True}


def plan(config: Config, doc: dict, wf: str, source_uri: str, prefix: str = "") -> list[dict]:
    """imagefork's own task records for ``doc``, largest first (as the planner sends them)."""
    req = parse_request(doc, max_dimension=config.limits.max_dimension,
                        max_tasks=max(config.limits.max_tasks, len(doc["outputSizes"]) * len(doc["outputFormats"])))
    tasks = plan_tasks(req, wf, source_uri=source_uri, deadline=2**62, output_prefix=prefix)
    return [t.to_dict() for t in sorted(tasks, key=lambda t: t.width * t.height, reverse=True)]


def per(parts: dict[str, float], n: int) -> dict[str, float]:
    """CPU seconds by part -> ms per request."""
    return {part: round(1000 * v / n, 2) for part, v in parts.items()}


# --- the four sides: each sends one seed request and waits, or sends many at once and waits --------------

class Side:
    name = ""
    pids: dict[str, list[int]] = {}  # process trees to account, by role
    parts: dict[str, list[str]] = {}  # broker / workers / s3proxy: roles
    rss_roles: tuple[str, ...] = ()

    def run(self, docs: list[dict]) -> dict:
        """Send ``docs`` at once and wait for every final event; anything worth keeping about it."""
        raise NotImplementedError

    def cpu(self, window: Window) -> dict[str, float]:
        return window.parts(self.parts)


class Baseline(Side):
    """What the planner and the resize role do, in this process: fetch and stage each source, then run
    imagefork's resize job (get the staged source, decode once per process, resize, encode, upload) on
    a pool of threads."""
    name = "baseline"

    def __init__(self, config: Config, stack_pids: dict):
        self.config = config
        self.store = ObjectStore(config)
        resize_job.init(config)
        self.pool = ThreadPoolExecutor(SLOTS)
        self.pids = {"s3proxy": [stack_pids["s3proxy"]["pid"]]}
        self.parts = {"broker": [], "workers": [], "s3proxy": ["s3proxy"]}

    def run(self, docs: list[dict]) -> dict:
        tasks = []
        for doc in docs:
            wf = f"peer-base-{uuid.uuid4().hex[:10]}"
            data = fetch_http(doc["fileLocation"], self.config.limits, self.config.fetch_allow_networks)
            key = f"{self.config.staging_prefix}{wf}/source"
            self.store.put(key, data, "application/octet-stream")
            tasks += plan(self.config, doc, wf, self.store.uri(key))
        results = list(self.pool.map(resize_job.run, tasks))
        bad = [r for r in results if not r["ok"]]
        assert not bad, bad[:2]
        return {}

    def cpu(self, window: Window) -> dict[str, float]:
        out = window.parts(self.parts)
        out["workers"], out["bench process"] = out["bench process"], 0.0  # the work ran here, in this process
        return out

    def close(self) -> None:
        self.pool.shutdown()


class Imagefork(Side):
    """Planner, join and one resize worker with its default slots, over Kafka; this process submits and follows."""
    name = "imagefork"
    rss_roles = WORKER_ROLES

    def __init__(self, env: dict, stack_pids: dict, log_dir: Path):
        ns = f"peer-{uuid.uuid4().hex[:6]}."
        env = {**env, "IMAGEFORK_NAMESPACE": ns, "IMAGEFORK_RESIZE_CONCURRENCY": str(IMAGEFORK_SLOTS)}
        self.cfg = Config.from_env({**os.environ, **env})
        ensure_topics(self.cfg)
        self.client = self.follower = None
        self.workers = {role: WorkerProcess(role, env, log_dir, f"{ns}{role}") for role in WORKER_ROLES}
        self.pids = {**{role: [wp.pid] for role, wp in self.workers.items()},
                     "kafka": [stack_pids["kafka"]["pid"]], "s3proxy": [stack_pids["s3proxy"]["pid"]]}
        self.parts = {"broker": ["kafka"], "workers": list(WORKER_ROLES), "s3proxy": ["s3proxy"]}

    def ready(self) -> None:
        for wp in self.workers.values():
            if not wait_for_log(wp, "imagefork ready", 120):
                raise RuntimeError(f"{wp.name} did not start: {wp.log_tail()}")
        self.client, self.follower = Client(self.cfg), Follower(self.cfg)

    def run(self, docs: list[dict]) -> dict:
        ids = [self.client.submit(doc) for doc in docs]
        finals = self.follower.wait(ids, 900)
        for doc, wf in zip(docs, ids):
            f = finals[wf]
            n = len(doc["outputFormats"]) * len(doc["outputSizes"])
            assert f.status == "COMPLETED" and len(f.outputs) == n, (f.status, len(f.outputs), f.errors[:2])
        return {}

    def close(self) -> None:
        if self.follower is not None:
            self.follower.close()
        if self.client is not None:
            self.client.close()
        for wp in self.workers.values():
            wp.terminate()
        for wp in self.workers.values():
            wp.stop()


class CeleryChord(Side):
    """A chord per request: one ``peer.resize`` task per output, ``peer.collect`` as its callback."""
    rss_roles = ("celery",)

    def __init__(self, config: Config, worker: "CeleryWorker", redis: "Redis", stack_pids: dict, cached: bool):
        from bench import peer_tasks
        self.tasks, self.config, self.cached = peer_tasks, config, cached
        self.name = "celery_cached" if cached else "celery_per_task"
        self.prefix = f"peer-celery-{'cached' if cached else 'each'}/"
        self.pids = {"celery": [worker.pid], "redis": [redis.pid], "s3proxy": [stack_pids["s3proxy"]["pid"]]}
        self.parts = {"broker": ["redis"], "workers": ["celery"], "s3proxy": ["s3proxy"]}

    def run(self, docs: list[dict]) -> dict:
        from celery import chord
        from celery.result import AsyncResult
        t, c0 = time.perf_counter(), my_cpu()
        sent = []
        for doc in docs:
            wf = f"peer-{uuid.uuid4().hex[:12]}"
            url = doc["fileLocation"]
            tasks = plan(self.config, doc, wf, url, self.prefix)
            header = [self.tasks.resize.s(task, url, self.cached) for task in tasks]
            sent.append((chord(header)(self.tasks.collect.s(wf)).id, len(tasks)))
        info = {"sent_in_s": round(time.perf_counter() - t, 3), "send_cpu_s": round(my_cpu() - c0, 3)}
        for callback_id, n in sent:
            # by the callback's id, as a service that stored it would wait: ``get`` on the chord's own
            # result object also checks its parent group of N results, again and again (10 s of this
            # process's CPU and some 40,000 redis commands for a 1,000-task chord, measured)
            out = AsyncResult(callback_id, app=self.tasks.app).get(timeout=900)
            assert out["status"] == "COMPLETED" and out["count"] == n, out
        return info


def rotated(sides: list[Side], i: int) -> list[Side]:
    """Each round starts with the next side, so that no side always follows the same one."""
    k = i % len(sides)
    return sides[k:] + sides[:k]


def measure(sides: list[Side], url: str, args) -> dict[str, dict]:
    """The three measures, interleaved: the idle runs alternate between the sides, and each of the
    ``rounds`` burst and wide runs goes through every side in turn; the best round is reported."""
    for side in sides:
        for _ in range(2):
            side.run([seed_request(url)])  # warm-up: imports, pools, connections, S3Proxy's JIT
    idle: dict[str, list[float]] = {s.name: [] for s in sides}
    for i in range(args.idle_runs):
        for side in rotated(sides, i):
            t = time.perf_counter()
            side.run([seed_request(url)])
            idle[side.name].append(time.perf_counter() - t)
    say("idle p50: " + ", ".join(f"{n} {pct(v, .5) * 1000:.0f} ms" for n, v in idle.items()))
    bursts: dict[str, list[dict]] = {s.name: [] for s in sides}
    wides: dict[str, list[dict]] = {s.name: [] for s in sides}
    for i in range(args.rounds):
        for side in rotated(sides, i):
            w = Window(side.pids)
            side.run([seed_request(url)] * args.burst)
            w.stop()
            bursts[side.name].append({
                "seconds": w.seconds, "requests_per_s": args.burst / w.seconds,
                "cpu_ms_per_request": per(side.cpu(w), args.burst), "other_load_cores": other_load(w),
                "peak_rss_mb": round(sum(w.peak[r] for r in side.rss_roles) / 2**20, 1) if side.rss_roles else None})
            say(f"round {i + 1}: {side.name}: {args.burst} at once, {args.burst / w.seconds:.2f} requests/s "
                f"(other processes: {other_load(w):.2f} cores)")
        for side in rotated(sides, i):
            w = Window(side.pids)
            info = side.run([wide_request(url, args.wide)])
            w.stop()
            wides[side.name].append({"seconds": w.seconds, "cpu_s": side.cpu(w), "other_load_cores": other_load(w),
                                     **({"by process": w.roles} if side.name == "imagefork" else {}),
                                     **({"chord": info} if info else {})})
            say(f"round {i + 1}: {side.name}: {args.wide}-output request {w.seconds:.2f} s "
                f"(other processes: {other_load(w):.2f} cores)")
    results = {}
    for side in sides:
        burst = max(bursts[side.name], key=lambda r: r["requests_per_s"])
        wide = min(wides[side.name], key=lambda r: r["seconds"])
        results[side.name] = {
            "idle_latencies": idle[side.name], "idle_p50_s": pct(idle[side.name], .5),
            "requests_per_s": burst["requests_per_s"], "burst_seconds": burst["seconds"],
            "cpu_ms_per_request": burst["cpu_ms_per_request"], "peak_rss_mb": burst["peak_rss_mb"],
            "wide_seconds": wide["seconds"], "wide_cpu_s": wide["cpu_s"],
            "other_load_cores": {"burst": burst["other_load_cores"], "wide": wide["other_load_cores"]},
            "rounds": {"burst": bursts[side.name], "wide": wides[side.name]}}
        if "chord" in wide:
            results[side.name]["wide_chord"] = wide["chord"]
    return results


def idle_cost(sides: list[Side], seconds: float = 5.0) -> dict[str, dict[str, float]]:
    """CPU that each system's processes use with nothing to do (% of one core), all of them idle at once."""
    pids = {}
    for side in sides:
        pids.update(side.pids)
    w = Window(pids)
    time.sleep(seconds)
    w.stop()
    out = {}
    for side in sides:
        if side.name in ("imagefork", "celery_cached"):
            parts = side.cpu(w)
            out[side.name] = {k: round(100 * parts[k] / w.seconds, 1) for k in ("broker", "workers")}
    return out


# --- Celery over Redis --------------------------------------------------------------------------------
class Redis:
    """Debian's redis-server on a free loopback port: no RDB snapshots, no AOF, in its own session."""

    def __init__(self, folder: Path):
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not Path(binary).exists():
            raise SystemExit("bench/peer.py needs redis-server: `make redis` (as root) or apt-get install redis-server")
        self.port = free_port()
        folder.mkdir(parents=True, exist_ok=True)
        self.log = folder / "redis.log"
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--daemonize", "no", "--dir", str(folder), "--logfile", str(self.log)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
        self.url = f"redis://127.0.0.1:{self.port}"
        import redis
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=1)
        end = time.monotonic() + 30
        while True:
            try:
                client.ping()
                break
            except redis.RedisError:
                if self.proc.poll() is not None or time.monotonic() > end:
                    raise RuntimeError(f"redis-server did not start: {self.log.read_text(errors='replace')[-2000:]}")
                time.sleep(0.1)
        client.close()
        self.version = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout.split()[2].removeprefix("v=")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        _stop_group(self.proc, 10)


def _stop_group(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM to the process's own group (it leads a session of its own), SIGKILL after ``grace``."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the leader if it is still there, and any child left behind
    except ProcessLookupError:
        pass
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        pass


class CeleryWorker:
    ARGV = ["-A", "bench.peer_tasks", "worker", "--concurrency", str(SLOTS), "--pool", "prefork",
            "--loglevel", "WARNING", "--without-gossip", "--without-mingle", "--without-heartbeat",
            "--hostname", "peer@%h"]

    def __init__(self, env: dict, log_dir: Path):
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log = log_dir / "celery-worker.log"
        out = open(self.log, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "celery", *self.ARGV], cwd=ROOT,
                                     env={**os.environ, **env, "PYTHONPATH": str(ROOT)}, stdin=subprocess.DEVNULL,
                                     stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        out.close()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, n: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        _stop_group(self.proc, 20)  # SIGTERM: Celery's warm shutdown


def decode_cpu_s(config: Config) -> float:
    """CPU of one fetch-free decode of the sample (what the per-task variant repeats for every task)."""
    data = SAMPLE.read_bytes()
    best = float("inf")
    for _ in range(5):
        t = time.process_time()
        prepare(data, config.limits, max_box=(215, 215))
        best = min(best, time.process_time() - t)
    return best


def sample_text() -> str:
    from PIL import Image
    with Image.open(SAMPLE) as im:
        return f"streams/assets/{SAMPLE.name}, {im.width}x{im.height} {im.format}, {SAMPLE.stat().st_size / 1e6:.1f} MB"


# --- report -------------------------------------------------------------------------------------------

def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def derive(report: dict, wide: int) -> None:
    """Per-task overhead and the ratios, in place."""
    sides = report["results"]
    base_cpu = sides["baseline"]["wide_cpu_s"]["workers"]
    for name in SIDES[1:]:
        s = sides[name]
        s["overhead_ms_per_task"] = round(1000 * (s["wide_cpu_s"]["workers"] - base_cpu) / wide, 3)
        s["broker_ms_per_task"] = round(1000 * s["wide_cpu_s"]["broker"] / wide, 3)
        s["orchestration_cpu_ms_per_request"] = round(s["cpu_ms_per_request"]["broker"]
                                                      + s["cpu_ms_per_request"]["workers"], 1)
    each = sides["celery_per_task"]
    each["overhead_less_decodes_ms_per_task"] = round(
        each["overhead_ms_per_task"] - 1000 * report["decode_cpu_s"] * (wide - 1) / wide, 3)
    sides["baseline"]["orchestration_cpu_ms_per_request"] = sides["baseline"]["cpu_ms_per_request"]["workers"]
    i, c, b = sides["imagefork"], sides["celery_cached"], sides["baseline"]
    report["ratios"] = {
        "idle p50 imagefork/celery(cached)": ratio(i["idle_p50_s"], c["idle_p50_s"]),
        "throughput imagefork/celery(cached)": ratio(i["requests_per_s"], c["requests_per_s"]),
        f"{wide}-output wall time imagefork/celery(cached)": ratio(i["wide_seconds"], c["wide_seconds"]),
        "CPU per seed request, broker + workers, imagefork/celery(cached)":
            ratio(i["orchestration_cpu_ms_per_request"], c["orchestration_cpu_ms_per_request"]),
        "per-task overhead imagefork/celery(cached)": ratio(i["overhead_ms_per_task"], c["overhead_ms_per_task"]),
        "throughput imagefork/baseline": ratio(i["requests_per_s"], b["requests_per_s"]),
        "throughput celery(cached)/baseline": ratio(c["requests_per_s"], b["requests_per_s"]),
        "throughput celery(per-task decode)/baseline": ratio(sides["celery_per_task"]["requests_per_s"], b["requests_per_s"]),
        "idle p50 imagefork/baseline": ratio(i["idle_p50_s"], b["idle_p50_s"]),
        "idle p50 celery(cached)/baseline": ratio(c["idle_p50_s"], b["idle_p50_s"]),
    }


def write_reports(out: Path, report: dict) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "peer.json").write_text(json.dumps(report, indent=2) + "\n")
    r, a = report["results"], report["args"]
    b = r["baseline"]
    dash = "–"
    v = report["versions"]
    lines = [
        f"# imagefork against a Celery chord over Redis ({report['machine']})", "",
        f"`{report['command']}`, {report['date']}, {report['minutes']:.1f} min. Celery {v['celery']} (kombu "
        f"{v['kombu']}, redis-py {v['redis']}) over Debian's redis-server {v['redis-server']} (broker db 0, "
        f"results db 1, no persistence); one worker, `--concurrency {SLOTS} --pool prefork --without-gossip "
        "--without-mingle --without-heartbeat`, Celery's defaults otherwise (JSON, acks on receipt, prefetch 4). "
        f"imagefork: planner, join and one resize worker with {IMAGEFORK_SLOTS} slots (threads, its default) over Kafka (KRaft, one "
        f"broker). Baseline: the same fetch, stage, decode-once, resize, encode and upload in this process, "
        f"{SLOTS} threads, no broker. Everything on the same {CORES} cores with S3Proxy, both brokers and both "
        "sets of workers up throughout (each idles while the other works: see the idle cost below).", "",
        f"Workload: the seed request (3 formats x 3 sizes of {report['sample']}, served over loopback HTTP), "
        f"{a['idle_runs']} times alone per side, the sides taking turns; {a['burst']} of them sent at once; one "
        f"request of {a['wide']} distinct tiny jpgs (16..215 px, maintainAspectRatio). The last two ran "
        f"{a['rounds']} round(s), the sides in turn, each round starting with the next side; the best round of "
        "each side is shown.", "",
        f"| run | idle p50 ms | {a['burst']} at once: requests/s | vs baseline "
        f"| {a['wide']} tiny jpgs: s | CPU ms / seed request: broker + workers | overhead ms / task "
        "| peak RSS MB, workers | other processes, cores |",
        "|---|---|---|---|---|---|---|---|---|"]
    for name in SIDES:
        s = r[name]
        over = f"{s['overhead_ms_per_task']:.2f}" if "overhead_ms_per_task" in s else dash
        if name == "celery_per_task":
            over += f" ({s['overhead_less_decodes_ms_per_task']:.2f} less its {a['wide'] - 1} extra decodes)"
        rss = dash if s.get("peak_rss_mb") is None else f"{s['peak_rss_mb']:.0f}"
        lines.append(f"| {LABELS[name]} | {s['idle_p50_s'] * 1000:.0f} | {s['requests_per_s']:.2f} | "
                     f"{s['requests_per_s'] / b['requests_per_s']:.2f} | {s['wide_seconds']:.2f} | "
                     f"{s['orchestration_cpu_ms_per_request']:.0f} | {over} | {rss} | "
                     f"{s['other_load_cores']['burst']:.2f} / {s['other_load_cores']['wide']:.2f} |")
    ic = report["idle_cost_pct_of_a_core"]
    lines += ["", "Other processes: the cores' worth of CPU that processes outside the side being measured took "
              "during its burst / wide run (this machine is shared; the other system's idle processes count "
              "here too). Idle cost, % of one core with nothing to do: imagefork "
              f"{ic['imagefork']['broker']:.1f} (Kafka) + {ic['imagefork']['workers']:.1f} (its three workers), "
              f"Celery {ic['celery_cached']['broker']:.1f} (redis-server) + {ic['celery_cached']['workers']:.1f} "
              "(the worker and its children)."]
    lines += ["", f"CPU per seed request during the {a['burst']}-at-once run, ms, by process tree (broker: Kafka's "
              "JVM or redis-server; workers: imagefork's planner + resize + join, or the Celery worker and its "
              f"{SLOTS} children, or the baseline's own work; bench process: the client, the file server serving "
              "the sources and the sampler):", "",
              "| run | broker | workers | S3Proxy | bench process |", "|---|---|---|---|---|"]
    for name in SIDES:
        c = r[name]["cpu_ms_per_request"]
        lines.append(f"| {LABELS[name]} | {c['broker']:.0f} | {c['workers']:.0f} | {c['s3proxy']:.0f} | "
                     f"{c['bench process']:.0f} |")
    lines += ["", f"CPU seconds during the {a['wide']}-output request:", "",
              "| run | broker | workers | S3Proxy | bench process |", "|---|---|---|---|---|"]
    for name in SIDES:
        c = r[name]["wide_cpu_s"]
        lines.append(f"| {LABELS[name]} | {c['broker']:.2f} | {c['workers']:.2f} | {c['s3proxy']:.2f} | "
                     f"{c['bench process']:.2f} |")
    lines += ["", f"Per-task overhead = (workers' CPU during the {a['wide']}-output request - the baseline's "
              f"{b['wide_cpu_s']['workers']:.2f} s for the same tasks) / {a['wide']}. The broker's own CPU is "
              "apart: " + ", ".join(f"{LABELS[n]} {r[n]['broker_ms_per_task']:.2f} ms/task" for n in SIDES[1:])
              + f". One decode of the sample costs {report['decode_cpu_s'] * 1000:.0f} ms of CPU; the per-task "
              "variant pays it, and a fetch, for every task. Celery's client sends the chord's tasks itself (in the "
              "bench process column: "
              + "; ".join(f"{LABELS[n].split(', ')[1]}: {r[n]['wide_chord']['send_cpu_s']:.2f} s of CPU over "
                          f"{r[n]['wide_chord']['sent_in_s']:.2f} s" for n in SIDES[2:])
              + f", for {a['wide']} tasks); imagefork's planner fans out inside the workers. The client waits "
              "for the chord's callback by its id: `get()` on the chord's own result object also polls its "
              f"parent group of {a['wide']} results over and over (about 10 s of client CPU and 40,000 redis "
              "commands for 1,000 tasks, measured once).", "",
              "| ratio | value |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in report["ratios"].items()]
    text = "\n".join(lines) + "\n"
    (out / "peer.md").write_text(text)
    return text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--idle-runs", type=int, default=15, help="seed requests one at a time per side, after warm-up")
    ap.add_argument("--burst", type=int, default=30, help="seed requests sent at once")
    ap.add_argument("--wide", type=int, default=1000, help="outputs of the one wide request of tiny jpgs")
    ap.add_argument("--rounds", type=int, default=2, help="burst and wide runs per side (the best is reported)")
    ap.add_argument("--out", default=str(ROOT / "docs"))
    args = ap.parse_args()
    if not 1 <= args.wide <= 40000 or min(args.burst, args.idle_runs, args.rounds) < 1:
        ap.error("--wide must be 1..40000, --burst, --idle-runs and --rounds at least 1")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that every finally below runs
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="imagefork-peer-"))
    stack = LocalStack(tmp / "stack")
    server = redis = worker = base = fork = None
    ok = False
    try:
        say("starting the local stack (Kafka, S3Proxy), redis-server, the Celery worker and imagefork's workers...")
        env = {**stack.up(), "IMAGEFORK_FETCH_ALLOW": "127.0.0.0/8", "IMAGEFORK_PARTITIONS": "6",
               "IMAGEFORK_MAX_TASKS": str(max(1000, args.wide))}
        stack_pids = json.loads(stack.state_file.read_text())["services"]
        os.environ.update(env)
        server = FileServer(SAMPLE.parent)
        config = Config.from_env()
        ObjectStore(config).ensure_bucket()
        url = server.url(SAMPLE.name)
        redis = Redis(tmp / "redis")
        os.environ["IMAGEFORK_PEER_REDIS"] = redis.url
        worker = CeleryWorker({**env, "IMAGEFORK_PEER_REDIS": redis.url}, tmp / "logs")
        fork = Imagefork(env, stack_pids, tmp / "logs")
        from bench import peer_tasks
        try:
            peer_tasks.ping.delay().get(timeout=90)
        except Exception as exc:
            raise RuntimeError(f"the Celery worker did not answer ({exc!r}): {worker.log_tail()}") from None
        fork.ready()
        base = Baseline(config, stack_pids)
        sides = [base, fork, CeleryChord(config, worker, redis, stack_pids, cached=True),
                 CeleryChord(config, worker, redis, stack_pids, cached=False)]
        results = measure(sides, url, args)
        idle = idle_cost(sides)
        import celery
        import kombu
        import redis as redis_py
        argv = " ".join(shlex.quote(a) for a in sys.argv[1:])
        report = {
            "machine": f"{CORES} cores, {round(psutil.virtual_memory().total / 2**30)} GiB, "
                       f"{os.uname().sysname} {os.uname().machine}",
            "command": f".venv/bin/python bench/peer.py {argv}".strip() + (" (make bench)" if not argv else ""),
            "date": time.strftime("%Y-%m-%d"), "minutes": (time.monotonic() - started) / 60,
            "args": {"idle_runs": args.idle_runs, "burst": args.burst, "wide": args.wide, "rounds": args.rounds,
                     "slots": SLOTS},
            "versions": {"celery": celery.__version__, "kombu": kombu.__version__, "redis": redis_py.__version__,
                         "redis-server": redis.version},
            "sample": sample_text(), "decode_cpu_s": decode_cpu_s(config), "idle_cost_pct_of_a_core": idle,
            "results": results}
        derive(report, args.wide)
        print(write_reports(Path(args.out), report))
        q = report["ratios"]
        print(f"idle p50 imagefork/celery(cached): {q['idle p50 imagefork/celery(cached)']:.2f}  "
              f"throughput imagefork/celery(cached): {q['throughput imagefork/celery(cached)']:.2f}")
        ok = True
        return 0
    finally:
        if base is not None:
            base.close()
        if fork is not None:
            fork.close()
        tasks_module = sys.modules.get("bench.peer_tasks")
        if tasks_module is not None and redis is not None:
            gc.collect()  # the client's result subscriptions end while redis-server still answers
            try:
                consumer = tasks_module.app.backend.result_consumer
                consumer.stop()
                consumer._pubsub = None  # results freed at exit then have no subscription to end
            except Exception:  # noqa: BLE001 (nothing to keep it for)
                pass
        if worker is not None:
            worker.stop()
        if redis is not None:
            redis.stop()
        if server is not None:
            server.close()
        stack.down()
        if ok:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            say(f"logs kept in {tmp}")


if __name__ == "__main__":
    raise SystemExit(main())
