"""Where a task's time goes: the resize and planner steps, per task, at the seed's sizes and at 1,000 tiny outputs.

Starts the local stack and one worker per role (resize with its default slots), each serving /metrics, and
runs two workloads one after the other:
- seed: R seed requests one at a time (9 outputs each, an idle stack);
- wide: one request of 1,000 tiny jpgs (16-215 px).
For each it reads the workers' ``imagefork_stage_seconds`` (the wall time of each step of a message,
streams/metrics.py) and ``imagefork_compute_cpu_seconds`` before and after, and the CPU of every process
tree, and prints the mean per task of each step, the wall time, and the per-task overhead: the resize
tree's CPU outside decode/resize/encode, divided by the tasks. Writes docs/breakdown.md and .json.

    .venv/bin/python bench/breakdown.py [--runs 10] [--wide 1000]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import psutil
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from streams.adapters.kafka import ensure_topics  # noqa: E402
from streams.adapters.objectstore import ObjectStore  # noqa: E402
from streams.client import Client, Follower  # noqa: E402
from streams.config import Config  # noqa: E402
from streams.demo import SAMPLE, seed_request  # noqa: E402
from streams.stack.local import LocalStack  # noqa: E402
from streams.stack.processes import FileServer, WorkerProcess, wait_for_log  # noqa: E402

RESIZE_STEPS = ("loop", "slot_wait", "ledger", "pool_wait", "fetch", "decode", "resize_encode", "upload_wait", "upload",
                "result_send")
PLANNER_STEPS = ("loop", "fetch", "stage", "plan_send", "task_send")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict:
    """{(role, stage): (sum, count)} of imagefork_stage_seconds, and the compute CPU counter."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict = {"cpu": 0.0}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "imagefork_stage_seconds_sum":
                out.setdefault((s.labels["role"], s.labels["stage"]), [0.0, 0])[0] = s.value
            elif s.name == "imagefork_stage_seconds_count":
                out.setdefault((s.labels["role"], s.labels["stage"]), [0.0, 0])[1] = s.value
            elif s.name == "imagefork_compute_cpu_seconds_total":
                out["cpu"] = s.value
    return out


def tree_cpu(pid: int) -> float:
    try:
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
    except psutil.Error:
        return 0.0
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def wide_request(url: str, n: int) -> dict:
    sizes = [{"width": 16 + i % 200, "height": 16 + (i * 7 + i // 200) % 200} for i in range(n)]
    return {"fileLocation": url, "outputFormats": ["jpg"], "outputSizes": sizes, "maintainAspectRatio": True}


class Measure:
    def __init__(self, ports: dict[str, int], pids: dict[str, int]):
        self.ports, self.pids = ports, pids

    def snapshot(self) -> dict:
        return {"metrics": {role: scrape(port) for role, port in self.ports.items()},
                "cpu": {role: tree_cpu(pid) for role, pid in self.pids.items()}, "t": time.perf_counter()}

    @staticmethod
    def delta(a: dict, b: dict, tasks: int, requests: int) -> dict:
        steps = {}
        for role, names, per in (("resize", RESIZE_STEPS, tasks), ("planner", PLANNER_STEPS, requests)):
            after, before = b["metrics"][role], a["metrics"][role]
            for name in names:
                s1, c1 = after.get((role, name), (0.0, 0))
                s0, c0 = before.get((role, name), (0.0, 0))
                steps[f"{role}.{name}"] = {"ms_per_unit": 1000 * (s1 - s0) / max(1, per), "count": c1 - c0}
        cpu = {role: round(b["cpu"][role] - a["cpu"][role], 3) for role in b["cpu"]}
        compute = b["metrics"]["resize"]["cpu"] - a["metrics"]["resize"]["cpu"]
        return {"tasks": tasks, "requests": requests, "wall_s": b["t"] - a["t"], "steps": steps, "cpu_s": cpu,
                "compute_cpu_s": round(compute, 3),
                "overhead_ms_per_task": 1000 * (cpu["resize"] - compute) / max(1, tasks)}


def write(out: Path, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "breakdown.json").write_text(json.dumps(report, indent=1))
    lines = ["# Where a task's time goes", "",
             f"`{report['command']}`, {report['date']}; {report['machine']}; one worker per role, resize with "
             f"{report['slots']} slots (threads), the local stack (Kafka, S3Proxy) on the same cores.", "",
             "Wall time of each step, in ms per task (resize) or per request (planner), from the workers' "
             "`imagefork_stage_seconds`. `resize.loop` is the time a task waits from its consumer handing it "
             "over to its start (its lane's read-ahead: a backlog shows here), and `planner.loop` the same for "
             "a request; `ledger` covers the crash-ledger row and its ack; `pool_wait` is "
             "the pool's own queueing and hand-off; `slot_wait` the wait for one of the worker's slots; `upload_wait` "
             "an output's wait, out of its slot, for one of its lane's upload threads.", "",
             "| step | " + " | ".join(report["runs"]) + " |", "|---|" + "---|" * len(report["runs"])]
    names = [f"resize.{s}" for s in RESIZE_STEPS] + [f"planner.{s}" for s in PLANNER_STEPS]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(f"{r['steps'][name]['ms_per_unit']:.2f}"
                                              for r in report["runs"].values()) + " |")
    lines += ["", "| per run | " + " | ".join(report["runs"]) + " |", "|---|" + "---|" * len(report["runs"])]
    rows = [("tasks", lambda r: str(r["tasks"])), ("wall s", lambda r: f"{r['wall_s']:.2f}"),
            ("wall ms per task", lambda r: f"{1000 * r['wall_s'] / r['tasks']:.2f}"),
            ("resize compute CPU s (decode, resize, encode)", lambda r: f"{r['compute_cpu_s']:.2f}"),
            ("**resize overhead CPU ms per task** (tree CPU - compute)",
             lambda r: f"**{r['overhead_ms_per_task']:.2f}**")]
    rows += [(f"CPU s: {role}", (lambda role: lambda r: f"{r['cpu_s'][role]:.2f}")(role))
             for role in report["pids"]]
    for label, fn in rows:
        lines.append(f"| {label} | " + " | ".join(fn(r) for r in report["runs"].values()) + " |")
    (out / "breakdown.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10, help="seed requests, one at a time")
    ap.add_argument("--wide", type=int, default=1000, help="outputs of the wide request")
    ap.add_argument("--out", default=str(ROOT / "docs"))
    ap.add_argument("--profile", metavar="FILE", help="py-spy (if installed) samples the resize worker during the "
                    "wide request into FILE (collapsed stacks, CPU only)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="imagefork-breakdown-"))
    stack = LocalStack(tmp / "stack")
    print("starting the local stack...", file=sys.stderr)
    env = {**stack.up(), "IMAGEFORK_FETCH_ALLOW": "127.0.0.0/8", "IMAGEFORK_PARTITIONS": "6",
           "IMAGEFORK_MAX_TASKS": str(max(1000, args.wide)), "IMAGEFORK_NAMESPACE": f"bd-{uuid.uuid4().hex[:6]}."}
    services = json.loads(stack.state_file.read_text())["services"]
    os.environ.update(env)
    server = FileServer(SAMPLE.parent)
    workers: list[WorkerProcess] = []
    try:
        config = Config.from_env()
        ObjectStore(config).ensure_bucket()
        ensure_topics(config)
        url = server.url(SAMPLE.name)
        ports = {role: free_port() for role in ("planner", "resize", "join")}
        for role, port in ports.items():
            workers.append(WorkerProcess(role, {**env, "IMAGEFORK_METRICS_LISTEN": f"127.0.0.1:{port}"},
                                         tmp / "logs", f"bd-{role}"))
        for wp in workers:
            if not wait_for_log(wp, "imagefork ready", 120):
                raise RuntimeError(f"{wp.name} did not start: {wp.log_tail()}")
        pids = {wp.role: wp.pid for wp in workers}
        pids.update({name: svc["pid"] for name, svc in services.items()})
        measure = Measure(ports, pids)
        client, follower = Client(config), Follower(config)
        for _ in range(2):  # warm-up: pools, connections, the first decode
            follower.wait([client.submit(seed_request(url))], 120)
        runs = {}
        before = measure.snapshot()
        for _ in range(args.runs):
            final = follower.wait([client.submit(seed_request(url))], 120)
            assert all(f.status == "COMPLETED" for f in final.values()), final
        runs["seed (9 outputs), one at a time"] = Measure.delta(before, measure.snapshot(), 9 * args.runs, args.runs)
        time.sleep(1)
        before = measure.snapshot()
        spy = None
        if args.profile:
            import shutil
            import subprocess
            spy = subprocess.Popen([shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy"), "record",
                                    "--format", "raw", "-o", args.profile, "-r", "200", "--threads",
                                    "-p", str(pids["resize"])], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1)
        final = follower.wait([client.submit(wide_request(url, args.wide))], 600)
        if spy is not None:
            import signal
            spy.send_signal(signal.SIGINT)
            spy.wait(30)
        assert all(f.status == "COMPLETED" for f in final.values()), [f.status for f in final.values()]
        runs[f"one request of {args.wide} tiny jpgs"] = Measure.delta(before, measure.snapshot(), args.wide, 1)
        follower.close()
        report = {"command": "python bench/breakdown.py" + (f" --runs {args.runs}" if args.runs != 10 else "")
                  + (f" --wide {args.wide}" if args.wide != 1000 else ""),
                  "date": time.strftime("%Y-%m-%d"), "slots": config.resize_slots,
                  "machine": f"{os.cpu_count()} cores, {os.uname().sysname} {os.uname().machine}",
                  "pids": list(pids), "runs": runs}
        write(Path(args.out), report)
        print((Path(args.out) / "breakdown.md").read_text())
        return 0
    finally:
        for wp in workers:
            wp.stop()
        server.close()
        stack.down()


if __name__ == "__main__":
    raise SystemExit(main())
