"""A rolling restart of every role under steady load (issue 22, item 3), on hosts.

Root only (tests/hosts.py): three Kafka nodes, S3Proxy, the join, the planner and two resize workers, each
on a host of its own. The seed request is submitted once a second (``--rate``) from start to end. First a
steady phase as long as the roll; then one host at a time, every ``--every`` seconds (60 by default): each
Kafka node (SIGTERM, a clean shutdown, then started again), then the join, the planner and each resize
worker (SIGTERM: a deploy, then a new process on the same host). Afterwards: every request ends COMPLETED,
exactly once (counted after the join has committed past every event), and the latency p50/p99 of the
requests submitted during the roll against those of the same number submitted in the steady phase.
Writes docs/roll.json and docs/roll.md; the last line printed is
``roll: p99 X s during the roll, Y s steady (Z.ZZx), N requests, 0 lost, 0 twice``.
"""
from __future__ import annotations

import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from drain import pct  # noqa: E402
from join import wait_join_committed  # noqa: E402
from scale import Run, hosts_parser, log, no_hosts, write_report  # noqa: E402
from streams.adapters.objectstore import ObjectStore  # noqa: E402
from streams.client import Client, Follower, consume_completed  # noqa: E402
from streams.demo import SAMPLE, seed_request  # noqa: E402
from streams.stack.processes import WorkerProcess, wait_for_log  # noqa: E402
from tests.hosts import Hosts, HostStack  # noqa: E402
from timeline import hops, timelines  # noqa: E402

SLOWEST = 12  # requests of the roll whose records are shown hop by hop


class Load(threading.Thread):
    """Submits the seed request every 1/rate seconds until stopped; remembers when each was sent."""

    def __init__(self, client: Client, location: str, rate: float):
        super().__init__(daemon=True)
        self.client, self.location, self.period = client, location, 1.0 / rate
        self.sent: dict[str, float] = {}
        self.phase: dict[str, str] = {}
        self.now_phase = "steady"
        self.step: dict[str, str] = {}
        self.now_step = "steady"
        self.halt = threading.Event()

    def run(self) -> None:
        next_at = time.perf_counter()
        while not self.halt.is_set():
            wf = self.client.submit(seed_request(self.location), timeout_s=120)
            self.sent[wf] = time.perf_counter()
            self.phase[wf] = self.now_phase
            self.step[wf] = self.now_step
            next_at += self.period
            self.halt.wait(max(0.0, next_at - time.perf_counter()))


def restart_worker(run: Run, name: str) -> None:
    old = next(w for w in run.workers if w.name.endswith(name) and w.alive())
    old.stop(timeout=60)
    run.workers.remove(old)
    host = run.host_of[name]
    new = WorkerProcess(old.role, run.env, run.log_dir, f"{old.name}+", prefix=host.prefix())
    run.workers.append(new)
    if not wait_for_log(new, "imagefork ready", 180):
        raise RuntimeError(f"{new.name} did not start again:\n{new.log_tail(30)}")


def restart_kafka(stack: HostStack, node: int) -> None:
    proc = stack.procs.pop(f"kafka-{node}")
    proc.send_signal(signal.SIGTERM)  # a clean shutdown: leadership moves first
    proc.wait(120)
    stack.start_kafka(node)


def main() -> int:
    ap = hosts_parser(__doc__, 0.5)
    ap.add_argument("--rate", type=float, default=1.0, help="requests per second")
    ap.add_argument("--every", type=float, default=60.0, help="seconds between two restarts")
    ap.add_argument("--per-role", type=int, default=2,
                    help="hosts of each role (join, planner, resize): a deploy restarts one while the others work")
    args = ap.parse_args()
    if no_hosts("roll.py"):
        return 2
    folder = Path(tempfile.mkdtemp(prefix="imagefork-roll-"))
    with Hosts() as hosts:
        stack = HostStack(hosts, folder / "stack", brokers=3)
        try:
            run = Run(hosts, stack, folder / "logs", partitions=6)
            try:
                names = [(role, f"{role}{i}", args.cpu if role == "resize" else None)
                         for role in ("join", "planner", "resize") for i in range(1, args.per_role + 1)]
                for role, name, cpu in names:
                    run.start(role, name, cpu)
                run.ready()
                store = ObjectStore(run.config)
                key = f"inputs/{run.config.namespace}sample.png"
                store.put(key, SAMPLE.read_bytes(), "image/png")
                location = f"s3://{run.config.bucket}/{key}"
                client, follower = Client(run.config), Follower(run.config)
                follower.wait([client.submit(seed_request(location))], 300)  # warm
                steps = [("kafka", n) for n in sorted(stack.kafka_hosts)] + [("worker", name) for _r, name, _c in names]
                load = Load(client, location, args.rate)
                failures: list[BaseException] = []

                def roller() -> None:
                    try:
                        time.sleep(args.every * len(steps))  # the steady phase, as long as the roll
                        load.now_phase = "roll"
                        for kind, what in steps:
                            started = time.monotonic()
                            log(f"restarting {kind} {what}")
                            load.now_step = f"{kind} {what}"
                            restart_kafka(stack, what) if kind == "kafka" else restart_worker(run, what)
                            log(f"  {kind} {what} back in {time.monotonic() - started:.1f}s")
                            time.sleep(max(0.0, args.every - (time.monotonic() - started)))
                    except BaseException as exc:  # reported by the main thread
                        failures.append(exc)
                    finally:
                        load.halt.set()

                rolling = threading.Thread(target=roller, daemon=True)
                load.start()
                rolling.start()
                arrived: dict[str, float] = {}
                deadline = None
                while True:  # this thread reads the final events as they come (their arrival times)
                    follower.pump(0.2)
                    now = time.perf_counter()
                    for wf in follower.finals.keys() - arrived.keys():
                        arrived[wf] = now
                    if failures:
                        raise failures[0]
                    if load.halt.is_set() and not load.is_alive():
                        deadline = deadline or time.monotonic() + 600
                        if set(load.sent) <= arrived.keys() or time.monotonic() > deadline:
                            break
                ids = list(load.sent)
                wait_join_committed(run.config)
                finals = consume_completed(run.config, ids, timeout=120)
                slowest = sorted((wf for wf in ids if load.phase[wf] == "roll" and wf in arrived),
                                 key=lambda wf: load.sent[wf] - arrived[wf])[:SLOWEST]
                try:
                    records = timelines(run.config, set(slowest))
                except Exception as exc:  # the report goes on without its hop-by-hop table
                    log(f"the slowest requests' records were not read: {type(exc).__name__}: {exc}")
                    slowest, records = [], {}
            finally:
                run.stop()
        finally:
            stack.close()
    counts = Counter(f.workflowId for f in finals)
    lost = [wf for wf in ids if counts[wf] == 0]
    twice = [wf for wf in ids if counts[wf] > 1]
    bad = [f.workflowId for f in finals if f.status != "COMPLETED"]
    latency = {wf: arrived.get(wf, float("inf")) - load.sent[wf] for wf in ids}
    roll = [latency[wf] for wf in ids if load.phase[wf] == "roll"]
    steady = [latency[wf] for wf in ids if load.phase[wf] == "steady"][-len(roll):]
    report = {"requests": len(ids), "lost": len(lost), "twice": len(twice), "not_completed": len(bad),
              "every_s": args.every, "rate": args.rate, "per_role": args.per_role,
              "steady": {"n": len(steady), "p50": round(pct(steady, 0.5), 3), "p99": round(pct(steady, 0.99), 3)},
              "roll": {"n": len(roll), "p50": round(pct(roll, 0.5), 3), "p99": round(pct(roll, 0.99), 3)}}
    report["p99_ratio"] = round(report["roll"]["p99"] / report["steady"]["p99"], 2)
    by_step: dict[str, list[float]] = {}
    for wf in ids:
        if load.phase[wf] == "roll":
            by_step.setdefault(load.step[wf], []).append(latency[wf])
    report["steps"] = {step: {"n": len(xs), "p50": round(pct(xs, 0.5), 3), "max": round(max(xs), 3),
                              "over_3x_steady_p99": sum(x > 3 * report["steady"]["p99"] for x in xs)}
                       for step, xs in by_step.items()}
    report["slowest"] = [{"workflow": wf, "step": load.step[wf], "seconds": round(latency[wf], 3),
                          "ms": hops(records[wf], records[wf][0][0] if records[wf] else 0.0)} for wf in slowest]
    kinds = ("WorkflowPlan", "tasks", "last tasks", "TaskResult", "last TaskResult", "completed")
    write_report(args.out, "roll", report,
        "# A rolling restart under steady load (bench/roll.py)\n\n"
        f"The seed request at {args.rate}/s; one host restarted every {args.every:.0f} s: the three Kafka nodes, "
        f"then each of the {args.per_role} join, {args.per_role} planner and {args.per_role} resize hosts.\n\n"
        "| | requests | p50 s | p99 s |\n|---|---|---|---|\n"
        f"| steady | {report['steady']['n']} | {report['steady']['p50']} | {report['steady']['p99']} |\n"
        f"| during the roll | {report['roll']['n']} | {report['roll']['p50']} | {report['roll']['p99']} |\n\n"
        "Requests sent while each host restarted (and the minute after it):\n\n"
        "| host restarted | requests | p50 s | max s | over 3x steady p99 |\n|---|---|---|---|---|\n"
        + "".join(f"| {step} | {v['n']} | {v['p50']} | {v['max']} | {v['over_3x_steady_p99']} |\n"
                  for step, v in report["steps"].items()) + "\n"
        f"p99 during the roll / steady: {report['p99_ratio']}x; lost {len(lost)}, twice {len(twice)}, "
        f"not COMPLETED {len(bad)} of {len(ids)}.\n\n"
        f"The {len(slowest)} slowest requests of the roll, hop by hop (ms after the request's record, from the "
        "records' Kafka timestamps; the client's wait in the last column):\n\n"
        "| host restarted | plan | first task | last task | first result | last result | final | client s |\n"
        "|---|---|---|---|---|---|---|---|\n"
        + "".join(f"| {x['step']} | " + " | ".join(str(x["ms"].get(k, "-")) for k in kinds) + f" | {x['seconds']} |\n"
                  for x in report["slowest"]))
    print(f"roll: p99 {report['roll']['p99']} s during the roll, {report['steady']['p99']} s steady "
          f"({report['p99_ratio']}x), {len(ids)} requests, {len(lost)} lost, {len(twice)} twice")
    return 0 if not (lost or twice or bad) else 1


if __name__ == "__main__":
    sys.exit(main())
