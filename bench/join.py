"""The join process alone, fed synthetic plans and results produced straight to its input topic.

Measures:
- throughput per fan-out width (9, 100, 1000 tasks per workflow, ~20,000 results each): results/s of
  one join process (first produce to last final event seen with read_committed), its CPU ms per result
  (user + system of the process), changelog bytes per workflow and their ratio to the final event's size;
- the longest clock tick (``JoinState.due``), in-process, with 1,000,000 finished markers expiring
  over a simulated day and 1,000 open workflows timing out;
- the restart: wall time from starting a new join to its "imagefork ready" line after 100,000
  finished and 1,000 open workflows (and the restore part, from its log), then that the open ones
  still complete, exactly once each.

Uses the stack in KAFKA_BOOTSTRAP_SERVERS / S3_* when set, else starts (and stops) its own LocalStack.
Prints a table whose last line is ``join: N results/s, X ms CPU/result (9-wide), Y (1000-wide)``;
writes docs/join-bench.json and docs/join-bench.md.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import psutil
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from streams import serde  # noqa: E402
from streams.adapters.kafka import client_config, ensure_topics, producer_config  # noqa: E402
from streams.config import Config  # noqa: E402
from streams.core.join import JoinState, Marker  # noqa: E402
from streams.core.models import COMPLETED, SUCCEEDED, TaskOutput, TaskResult, WorkflowPlan  # noqa: E402
from streams.stack.local import LocalStack  # noqa: E402
from streams.stack.processes import WorkerProcess  # noqa: E402

GOALS = {"results_per_s": 2000, "cpu_ratio": 1.5, "longest_tick_ms": 50, "restart_s": 10}
RESTORED = re.compile(r"join: restored (\d+) partitions \((\d+) workflows\) in ([\d.]+)s")
NOTABLE = re.compile(r" (WARNING|ERROR|CRITICAL) |^%[0-4]\|")  # our logger's level, librdkafka's own
WORKERS: list[WorkerProcess] = []  # every join started, stopped in main's finally


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- synthetic events ---------------------------------------------------------------------------
def ref(i: int) -> str:
    return f"image_convert_resize_png_300x300_{i}"


def plan_event(wf: str, width: int, now: int) -> tuple[bytes, bytes]:
    plan = WorkflowPlan(workflowId=wf, fileLocation=f"http://127.0.0.1:9000/sources/{wf}.png",
                        taskRefs=tuple(ref(i) for i in range(width)), submittedAt=now,
                        deadline=now + 3_600_000, correlationId=f"bench-{wf}", runId="run-1")
    return wf.encode(), serde.encode_join_event("WorkflowPlan", plan.to_dict())


def result_event(wf: str, i: int, now: int) -> tuple[bytes, bytes]:
    r = ref(i)
    out = TaskOutput(taskRef=r, format="png", width=300, height=300, bytes=48_213, contentType="image/png",
                     s3Uri=f"s3://imagefork/{wf}/{r}.png", url=f"http://127.0.0.1:9000/imagefork/{wf}/{r}.png")
    res = TaskResult(workflowId=wf, taskRef=r, status=SUCCEEDED, attempts=1, finishedAt=now, output=out,
                     runId="run-1")
    return wf.encode(), serde.encode_join_event("TaskResult", res.to_dict())


def new_ids(n: int) -> list[str]:
    return [f"wf-{uuid.uuid4().hex[:12]}" for _ in range(n)]


def produce(config: Config, events: list[tuple[bytes, bytes]]) -> None:
    """Produce keyed events to the join's input (murmur2_random: the keys land where the join reads)."""
    errors = []
    producer = Producer(producer_config(config))
    topic = config.topics.events
    for n, (key, value) in enumerate(events):
        while True:
            try:
                producer.produce(topic, value, key, on_delivery=lambda err, _m: err and errors.append(err))
                break
            except BufferError:
                producer.poll(0.05)
        if n % 5000 == 0:
            producer.poll(0)
    if producer.flush(120) or errors:
        raise RuntimeError(f"producing to {topic} failed: {len(producer)} unsent, errors {errors[:3]}")


# --- reading ------------------------------------------------------------------------------------
def reader(config: Config, topic: str, eof: bool = False) -> Consumer:
    consumer = Consumer(client_config(config, **{
        "group.id": f"{config.namespace}bench-reader", "enable.auto.commit": False,
        "isolation.level": "read_committed", "enable.partition.eof": eof}))
    parts = consumer.list_topics(topic, timeout=30).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
    return consumer


class Finals:
    """Every final event on the completed topic, from the beginning: (status, outputs) by workflow id."""

    def __init__(self, config: Config):
        self.consumer = reader(config, config.topics.completed)
        self.seen: dict[str, list[tuple[str, int]]] = {}
        self.sizes: dict[str, int] = {}
        self.last = 0.0  # perf_counter when the latest final was seen

    def pump(self, timeout: float) -> None:
        # consume() waits for its whole timeout unless the batch fills: short waits keep `last` precise
        end = time.monotonic() + timeout
        batch = self.consumer.consume(10_000, 0.01)
        while not batch and time.monotonic() < end:
            batch = self.consumer.consume(10_000, 0.01)
        for msg in batch:
            if msg.error() is not None:
                continue
            final = serde.decode("WorkflowCompleted", msg.value())
            self.seen.setdefault(final["workflowId"], []).append((final["status"], len(final["outputs"])))
            self.sizes[final["workflowId"]] = len(msg.value())
            self.last = time.perf_counter()

    def wait(self, ids: list[str], timeout: float = 600.0) -> None:
        pending = set(ids) - self.seen.keys()
        end = time.monotonic() + timeout
        while pending:
            if time.monotonic() > end:
                raise RuntimeError(f"{len(pending)} of {len(ids)} workflows have no final event after {timeout:.0f}s")
            self.pump(0.2)
            pending.difference_update(self.seen.keys())

    def check(self, ids: list[str], width: int, settle: float = 2.0) -> None:
        """Exactly one COMPLETED final with ``width`` outputs per workflow (after ``settle`` s for duplicates)."""
        end = time.monotonic() + settle
        while time.monotonic() < end:
            self.pump(0.2)
        bad = [(wf, self.seen.get(wf)) for wf in ids if self.seen.get(wf) != [(COMPLETED, width)]]
        if bad:
            raise AssertionError(f"{len(bad)} of {len(ids)} workflows did not get exactly one COMPLETED final "
                                 f"with {width} outputs, e.g. {bad[:3]}")

    def close(self) -> None:
        self.consumer.close()


def topic_bytes(config: Config, topic: str, timeout: float = 300.0) -> tuple[int, int]:
    """(records, key + value bytes) of a topic from the beginning to its end, read_committed."""
    consumer = reader(config, topic, eof=True)
    parts = [tp.partition for tp in consumer.assignment()]
    ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=30)[1] for p in parts}
    pending = {p for p in parts if ends[p] > 0}
    records = size = 0
    end = time.monotonic() + timeout
    try:
        while pending and time.monotonic() < end:
            batch = consumer.consume(10_000, 0.5)
            for msg in batch:
                if msg.error() is not None:
                    if msg.error().code() == KafkaError._PARTITION_EOF:
                        pending.discard(msg.partition())
                    continue
                records += 1
                size += len(msg.key() or b"") + len(msg.value() or b"")
            if not batch and pending:  # the last offsets may be transaction markers
                done = consumer.position([TopicPartition(topic, p) for p in pending])
                pending -= {tp.partition for tp in done if tp.offset >= ends[tp.partition]}
        if pending:
            raise RuntimeError(f"{topic} partitions {sorted(pending)} not read to the end in {timeout:.0f}s")
    finally:
        consumer.close()
    return records, size


# --- the join process ---------------------------------------------------------------------------
def namespace(base_env: dict[str, str]) -> tuple[dict[str, str], Config]:
    env = {**base_env, "IMAGEFORK_NAMESPACE": f"bj{uuid.uuid4().hex[:8]}."}
    config = Config.from_env({**os.environ, **env})
    ensure_topics(config)
    return env, config


def start_join(env: dict[str, str], log_dir: Path, name: str, timeout: float = 180.0) -> tuple[WorkerProcess, float]:
    """Start a join process; return it and the seconds from the start to its "imagefork ready" line."""
    started = time.monotonic()
    worker = WorkerProcess("join", env, log_dir, name)
    WORKERS.append(worker)
    while "imagefork ready" not in worker.log_path.read_text(errors="replace"):
        if not worker.alive() or time.monotonic() - started > timeout:
            worker.stop()
            raise RuntimeError(f"join {name} did not get ready:\n{worker.log_tail(40)}")
        time.sleep(0.01)
    return worker, time.monotonic() - started


def cpu_s(worker: WorkerProcess) -> float:
    t = psutil.Process(worker.pid).cpu_times()
    return t.user + t.system


def notable_lines(worker: WorkerProcess) -> list[str]:
    lines = worker.log_path.read_text(errors="replace").splitlines()
    return [line for line in lines if NOTABLE.search(line)]


def width_run(base_env: dict[str, str], log_dir: Path, width: int, results: int) -> dict:
    env, config = namespace(base_env)
    ids = new_ids(max(1, results // width))
    now = int(time.time() * 1000)
    events = ([plan_event(wf, width, now) for wf in ids]
              + [result_event(wf, i, now) for i in range(width) for wf in ids])  # round-robin
    n_results = len(ids) * width
    worker, _ = start_join(env, log_dir, f"{config.namespace}join-{width}")
    finals = Finals(config)
    try:
        cpu0, t0 = cpu_s(worker), time.perf_counter()
        produce(config, events)
        finals.wait(ids)
        seconds, cpu = finals.last - t0, cpu_s(worker) - cpu0
        finals.check(ids, width)
        worker.stop()
        records, size = topic_bytes(config, config.topics.join_state)
    finally:
        worker.stop()
        finals.close()
    final_size = sum(finals.sizes[wf] for wf in ids) / len(ids)
    changelog = size / len(ids)
    row = {"width": width, "workflows": len(ids), "results": n_results, "seconds": seconds,
           "results_per_s": n_results / seconds, "cpu_ms_per_result": 1000 * cpu / n_results,
           "changelog_records": records, "changelog_bytes_per_workflow": changelog,
           "final_bytes_mean": final_size, "changelog_to_final": changelog / final_size,
           "log_notable": notable_lines(worker)}
    log(f"width {width}: {row['results_per_s']:.0f} results/s, {row['cpu_ms_per_result']:.3f} ms CPU/result, "
        f"changelog {changelog:.0f} B/workflow ({records} records), final {final_size:.0f} B")
    return row


def restart_run(base_env: dict[str, str], log_dir: Path, markers: int, n_open: int) -> dict:
    env, config = namespace(base_env)
    done, still = new_ids(markers), new_ids(n_open)
    now = int(time.time() * 1000)
    fill = [e for wf in done for e in (plan_event(wf, 1, now), result_event(wf, 0, now))]
    fill += [plan_event(wf, 9, now) for wf in still] + [result_event(wf, i, now) for i in range(4) for wf in still]
    first, _ = start_join(env, log_dir, f"{config.namespace}join-a")
    second = first
    finals = Finals(config)
    try:
        t0 = time.perf_counter()
        produce(config, fill)
        finals.wait(done, timeout=1800)
        fill_s = time.perf_counter() - t0
        log(f"restart: {markers} finished + {n_open} open workflows in {fill_s:.1f}s; restarting the join")
        first.stop()
        if first.proc.returncode != 0:
            raise RuntimeError(f"the first join exited with {first.proc.returncode}:\n{first.log_tail(20)}")
        second, ready_s = start_join(env, log_dir, f"{config.namespace}join-b")
        text = second.log_path.read_text(errors="replace")
        match = RESTORED.search(text[:text.index("imagefork ready")])
        if match is None:
            raise RuntimeError(f"no restore line before the ready line:\n{second.log_tail(20)}")
        parts, restored, restore_s = int(match[1]), int(match[2]), float(match[3])
        early = [wf for wf in still if wf in finals.seen]
        if early or restored != markers + n_open:
            raise AssertionError(f"restored {restored} workflows (want {markers + n_open}); "
                                 f"{len(early)} open workflows already final")
        produce(config, [result_event(wf, i, now) for i in range(4, 9) for wf in still])
        finals.wait(still)
        finals.check(still, 9)
        total = sum(len(v) for v in finals.seen.values())
        if total != markers + n_open:
            raise AssertionError(f"{total} final events for {markers + n_open} workflows (duplicates after restart)")
        second.stop()
    finally:
        first.stop()
        second.stop()
        finals.close()
    row = {"finished": markers, "open": n_open, "fill_seconds": fill_s, "ready_seconds": ready_s,
           "restore_seconds": restore_s, "restored_partitions": parts, "restored_workflows": restored,
           "log_notable": notable_lines(first) + notable_lines(second)}
    log(f"restart: ready in {ready_s:.2f}s (restore {restore_s:.2f}s, {restored} workflows); "
        f"{n_open} open workflows completed once each")
    return row


# --- the clock, in-process ----------------------------------------------------------------------
def tick_run(markers: int = 1_000_000, n_open: int = 1000, ticks: int = 500) -> dict:
    """A day of ticks over ``markers`` finished markers (finished evenly over the previous day, so about
    markers / ticks expire per tick) and ``n_open`` 9-wide workflows whose deadlines fall in that day."""
    day = 86_400_000
    t0 = 1_700_000_000_000
    state = JoinState(default_timeout_ms=3_600_000, retention_ms=day)
    rss0 = psutil.Process().memory_info().rss
    for i in range(markers):
        at, wf = t0 + i * day // markers, f"wf-{i:012x}"
        state.finished[wf] = Marker(COMPLETED, at, "r")
        state._expiry.append((at, wf))
    refs = tuple(ref(i) for i in range(9))
    for k in range(n_open):
        wf = f"open-{k:08x}"
        state.record_plan(WorkflowPlan(wf, f"http://127.0.0.1:9000/sources/{wf}.png", refs, t0,
                                       t0 + day + k * day // n_open, runId="r"), t0)
    rss_mb = (psutil.Process().memory_info().rss - rss0) / 2**20
    t = time.perf_counter()
    if state.due(t0 + 1000):
        raise AssertionError("something was due before its time")
    idle_ms = 1000 * (time.perf_counter() - t)
    gen2 = []  # full collections during the ticks: they pause the join too
    def on_gc(phase, info, started=[0.0]):  # noqa: E306, B006
        if info["generation"] == 2:
            if phase == "start":
                started[0] = time.perf_counter()
            else:
                gen2.append(1000 * (time.perf_counter() - started[0]))
    gc.callbacks.append(on_gc)
    times, outcomes, k = [], Counter(), 0
    try:
        while state.finished or state.open:
            k += 1
            now = t0 + day + k * day // ticks
            t = time.perf_counter()
            due = state.due(now)
            times.append(1000 * (time.perf_counter() - t))
            outcomes.update("final" if o.final else "marker" for o in due)
    finally:
        gc.callbacks.remove(on_gc)
    times.sort()
    row = {"markers": markers, "open": n_open, "ticks": len(times), "idle_tick_ms": idle_ms,
           "longest_tick_ms": times[-1], "p99_tick_ms": times[int(0.99 * (len(times) - 1))],
           "mean_tick_ms": sum(times) / len(times), "ticks_over_goal": sum(t > GOALS["longest_tick_ms"] for t in times),
           "expired": outcomes["marker"], "timed_out": outcomes["final"], "state_rss_mb": rss_mb,
           "gen2_collections_ms": [round(x, 1) for x in gen2]}
    log(f"ticks: longest {times[-1]:.1f} ms over {len(times)} ticks, idle {idle_ms:.3f} ms, "
        f"{len(gen2)} full GC(s) during the ticks")
    return row


# --- report -------------------------------------------------------------------------------------
def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def markdown(report: dict) -> str:
    lines = [f"# Join benchmark ({report['machine']})", "", f"`{report['command']}`, {report['date']}, "
             f"{report['partitions']} partitions, one join process.", "",
             "| width | workflows | results | results/s | CPU ms/result | changelog B/workflow | final B | changelog/final |",
             "|---|---|---|---|---|---|---|---|"]
    for w in report["widths"]:
        lines.append(f"| {w['width']} | {w['workflows']} | {w['results']} | {w['results_per_s']:.0f} | "
                     f"{w['cpu_ms_per_result']:.3f} | {w['changelog_bytes_per_workflow']:.0f} | "
                     f"{w['final_bytes_mean']:.0f} | {w['changelog_to_final']:.2f} |")
    lines += ["", "| goal | target | measured | |", "|---|---|---|---|"]
    lines += [f"| {g['name']} | {g['target']} | {g['value']} | {g['verdict']} |" for g in report["goals"]]
    if report.get("tick"):
        t = report["tick"]
        lines.append(f"\nClock: {t['markers']:,} markers + {t['open']:,} open workflows ({t['state_rss_mb']:.0f} MB), "
                     f"{t['ticks']} ticks: longest {t['longest_tick_ms']:.1f} ms, p99 {t['p99_tick_ms']:.1f} ms, "
                     f"mean {t['mean_tick_ms']:.2f} ms, nothing due {t['idle_tick_ms']:.3f} ms; "
                     f"{len(t['gen2_collections_ms'])} full GC(s) during the ticks.")
    if report.get("restart"):
        r = report["restart"]
        lines.append(f"\nRestart: {r['finished']:,} finished + {r['open']:,} open workflows (filled in "
                     f"{r['fill_seconds']:.0f} s); new process ready in {r['ready_seconds']:.2f} s, of which the "
                     f"restore {r['restore_seconds']:.2f} s; the open workflows then completed exactly once each.")
    return "\n".join(lines) + "\n"


def goals(report: dict) -> list[dict]:
    out = []
    widths = {w["width"]: w for w in report["widths"]}
    if widths:
        first = widths[min(widths)]
        out.append({"name": f"results/s ({first['width']}-wide)", "target": f">= {GOALS['results_per_s']}",
                    "value": f"{first['results_per_s']:.0f}", "verdict": verdict(first["results_per_s"] >= GOALS["results_per_s"])})
        cpus = [w["cpu_ms_per_result"] for w in widths.values()]
        ratio = max(cpus) / min(cpus)
        out.append({"name": f"CPU/result, widest / narrowest ({min(widths)} to {max(widths)})",
                    "target": f"<= {GOALS['cpu_ratio']}x", "value": f"{ratio:.2f}x",
                    "verdict": verdict(ratio <= GOALS["cpu_ratio"])})
    if report.get("tick"):
        v = report["tick"]["longest_tick_ms"]
        out.append({"name": "longest tick", "target": f"<= {GOALS['longest_tick_ms']} ms", "value": f"{v:.1f} ms",
                    "verdict": verdict(v <= GOALS["longest_tick_ms"])})
    if report.get("restart"):
        v = report["restart"]["ready_seconds"]
        out.append({"name": "restart to ready", "target": f"<= {GOALS['restart_s']} s", "value": f"{v:.2f} s",
                    "verdict": verdict(v <= GOALS["restart_s"])})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", default="9,100,1000")
    ap.add_argument("--results", type=int, default=20_000, help="results per width (about)")
    ap.add_argument("--markers", type=int, default=100_000, help="finished workflows before the restart")
    ap.add_argument("--open", type=int, default=1000, help="open workflows across the restart")
    ap.add_argument("--skip-restart", action="store_true")
    ap.add_argument("--skip-tick", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "docs"))
    args = ap.parse_args()
    widths = [int(w) for w in args.widths.split(",") if w]
    tmp = Path(tempfile.mkdtemp(prefix="imagefork-join-bench-"))
    stack = None
    if not os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        log("no KAFKA_BOOTSTRAP_SERVERS: starting a local stack...")
        stack = LocalStack(tmp / "stack")
        os.environ.update(stack.up())
    partitions = os.environ.get("IMAGEFORK_PARTITIONS", "4")
    base_env = {"IMAGEFORK_PARTITIONS": partitions, "IMAGEFORK_WORKFLOW_TIMEOUT_S": "3600",
                "IMAGEFORK_REPAIR_AFTER_S": "3600"}  # nothing times out or looks lost during a run
    log(f"join logs in {tmp / 'logs'}")
    report = {"machine": f"{os.cpu_count()} cores, {round(psutil.virtual_memory().total / 2**30)} GiB, "
                         f"{os.uname().sysname} {os.uname().machine}",
              "command": "python bench/join.py " + " ".join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d"),
              "partitions": int(partitions), "widths": [], "tick": None, "restart": None}
    try:
        for width in widths:
            report["widths"].append(width_run(base_env, tmp / "logs", width, args.results))
        if not args.skip_tick:
            report["tick"] = tick_run()
        if not args.skip_restart:
            report["restart"] = restart_run(base_env, tmp / "logs", args.markers, args.open)
    finally:
        for worker in WORKERS:
            worker.stop()
        if stack is not None:
            stack.down()
    report["goals"] = goals(report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "join-bench.json").write_text(json.dumps(report, indent=2))
    (out / "join-bench.md").write_text(markdown(report))
    print(markdown(report))
    by_width = {w["width"]: w for w in report["widths"]}
    if 9 in by_width and 1000 in by_width:
        print(f"join: {by_width[9]['results_per_s']:.0f} results/s, {by_width[9]['cpu_ms_per_result']:.3f} ms "
              f"CPU/result (9-wide), {by_width[1000]['cpu_ms_per_result']:.3f} (1000-wide)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
