"""The join process alone, fed synthetic plans and results produced straight to its input topic.

- Per fan-out width (9, 100, 1000 tasks, ~20,000 results each): results/s of one join (first produce to
  last final seen, read_committed), its CPU ms per result (user + system, at the last final and once it
  is idle again), changelog bytes per workflow and their ratio to the final event's size.
- The longest clock tick (``JoinState.due``), in-process: 1,000,000 markers expiring over a simulated day.
- Restart: from starting a new join to "imagefork ready" after 100,000 finished and 1,000 open workflows;
  then the open ones must complete exactly once. Uses the stack in KAFKA_BOOTSTRAP_SERVERS / S3_* if set,
  else starts (and stops) its own LocalStack. Writes docs/join-bench.{json,md}; the last line printed is
  ``join: N results/s, X ms CPU/result (9-wide), Y (1000-wide)``.
"""
from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import re
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from streams import serde  # noqa: E402
from streams.adapters.kafka import client_config, ensure_topics, producer_config  # noqa: E402
from streams.config import Config  # noqa: E402
from streams.core.join import JoinState, Marker  # noqa: E402
from streams.core.models import COMPLETED, SUCCEEDED, TaskOutput, TaskResult, WorkflowPlan, descriptors_of  # noqa: E402
from streams.stack.local import LocalStack  # noqa: E402
from streams.stack.processes import WorkerProcess  # noqa: E402

GOALS = {"results_per_s": 2000, "cpu_ratio": 1.5, "tick_ms": 50, "restart_s": 10}
REF = "image_convert_resize_png_300x300_{}"
RESTORED = re.compile(r"join: restored (\d+) partitions \((\d+) workflows\) in ([\d.]+)s")
WORKERS: list[WorkerProcess] = []  # every join started; main stops them all in the end
log = functools.partial(print, file=sys.stderr, flush=True)


# --- in: synthetic events; out: what the join wrote ---------------------------------------------
def plan_event(wf: str, width: int, now: int) -> tuple[bytes, bytes]:
    tasks = descriptors_of({"taskRefs": [REF.format(i) for i in range(width)]})
    plan = WorkflowPlan(wf, f"http://127.0.0.1:9000/sources/{wf}.png", tasks,
                        submittedAt=now, deadline=now + 3_600_000, correlationId=f"bench-{wf}", runId="run-1")
    return wf.encode(), serde.encode_join_event("WorkflowPlan", plan.to_dict())


def result_event(wf: str, i: int, now: int) -> tuple[bytes, bytes]:
    ref = REF.format(i)
    out = TaskOutput(taskRef=ref, format="png", width=300, height=300, bytes=48_213, contentType="image/png",
                     s3Uri=f"s3://imagefork/{wf}/{ref}.png", url=f"http://127.0.0.1:9000/imagefork/{wf}/{ref}.png")
    res = TaskResult(wf, ref, SUCCEEDED, attempts=1, finishedAt=now, output=out, runId="run-1")
    return wf.encode(), serde.encode_join_event("TaskResult", res.to_dict())


def new_ids(n: int) -> list[str]:
    return [f"wf-{uuid.uuid4().hex[:12]}" for _ in range(n)]


def produce(config: Config, events: list[tuple[bytes, bytes]]) -> None:
    """Keyed by workflow id, murmur2_random: each event lands on the partition the join reads it from."""
    producer, errors = Producer(producer_config(config)), []
    for key, value in events:
        while True:
            try:
                producer.produce(config.topics.events, value, key, on_delivery=lambda e, _m: e and errors.append(e))
                break
            except BufferError:
                producer.poll(0.05)
    if producer.flush(120) or errors:
        raise RuntimeError(f"producing the events failed: {len(producer)} unsent, errors {errors[:3]}")


def reader(config: Config, topic: str) -> Consumer:
    """A read_committed consumer of every partition of ``topic``, from the beginning."""
    consumer = Consumer(client_config(config, **{"group.id": f"{config.namespace}bench-reader",
                                                 "enable.auto.commit": False, "isolation.level": "read_committed"}))
    parts = consumer.list_topics(topic, timeout=30).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
    return consumer


class Finals:
    """The completed topic's final events: [(status, outputs)] and the latest size, by workflow id."""
    def __init__(self, config: Config):
        self.consumer = reader(config, config.topics.completed)
        self.seen: dict[str, list[tuple[str, int]]] = {}
        self.sizes: dict[str, int] = {}
        self.last = 0.0  # perf_counter when the latest final was seen

    def pump(self, timeout: float) -> None:
        # consume() waits out its whole timeout unless the batch fills: short waits keep `last` precise
        end, batch = time.monotonic() + timeout, []
        while not batch and time.monotonic() < end:
            batch = [m for m in self.consumer.consume(10_000, 0.01) if m.error() is None]
        for msg in batch:
            final = serde.decode("WorkflowCompleted", msg.value())
            self.seen.setdefault(final["workflowId"], []).append((final["status"], len(final["outputs"])))
            self.sizes[final["workflowId"]] = len(msg.value())
            self.last = time.perf_counter()

    def wait(self, ids: list[str], timeout: float = 600.0) -> None:
        pending, end = set(ids) - self.seen.keys(), time.monotonic() + timeout
        while pending:
            if time.monotonic() > end:
                raise RuntimeError(f"{len(pending)} of {len(ids)} workflows have no final event after {timeout:.0f}s")
            self.pump(0.2)
            pending.difference_update(self.seen.keys())

    def check(self, ids: list[str], width: int, settle: float = 2.0) -> None:
        """Exactly one COMPLETED final with ``width`` outputs each (waiting ``settle`` s for duplicates)."""
        end = time.monotonic() + settle
        while time.monotonic() < end:
            self.pump(0.2)
        bad = [(wf, self.seen.get(wf)) for wf in ids if self.seen.get(wf) != [(COMPLETED, width)]]
        if bad:
            raise AssertionError(f"{len(bad)} of {len(ids)} workflows did not get exactly one COMPLETED final "
                                 f"with {width} outputs, e.g. {bad[:3]}")


def topic_bytes(config: Config, topic: str, timeout: float = 300.0) -> tuple[int, int]:
    """(records, key + value bytes) of a whole topic."""
    consumer = reader(config, topic)
    ends = {tp.partition: consumer.get_watermark_offsets(tp, timeout=30)[1] for tp in consumer.assignment()}
    pending, records, size, end = {p for p, high in ends.items() if high > 0}, 0, 0, time.monotonic() + timeout
    while pending and time.monotonic() < end:
        batch = [m for m in consumer.consume(10_000, 0.5) if m.error() is None]
        records, size = records + len(batch), size + sum(len(m.key() or b"") + len(m.value() or b"") for m in batch)
        if not batch:  # at the end? (the last offsets may be transaction markers, which no message reports)
            at = consumer.position([TopicPartition(topic, p) for p in pending])
            pending -= {tp.partition for tp in at if tp.offset >= ends[tp.partition]}
    consumer.close()
    if pending:
        raise RuntimeError(f"{topic} partitions {sorted(pending)} not read to their end in {timeout:.0f}s")
    return records, size


# --- the join process ---------------------------------------------------------------------------
def namespace(base_env: dict[str, str]) -> tuple[dict[str, str], Config]:
    env = {**base_env, "IMAGEFORK_NAMESPACE": f"bj{uuid.uuid4().hex[:8]}."}
    config = Config.from_env({**os.environ, **env})
    ensure_topics(config)
    return env, config


def start_join(env: dict[str, str], log_dir: Path, name: str, timeout: float = 180.0) -> tuple[WorkerProcess, float]:
    """Start a join; return it and the seconds from starting the process to its "imagefork ready" line."""
    started = time.monotonic()
    worker = WorkerProcess("join", env, log_dir, name)
    WORKERS.append(worker)
    while "imagefork ready" not in worker.log_path.read_text(errors="replace"):
        if not worker.alive() or time.monotonic() - started > timeout:
            worker.stop()
            raise RuntimeError(f"join {name} did not get ready:\n{worker.log_tail(40)}")
        time.sleep(0.01)
    return worker, time.monotonic() - started


def cpu_s(worker: WorkerProcess, until_idle: bool = False) -> float:
    """User + system seconds; ``until_idle``: once the work it queued (e.g. cleanup threads) is done."""
    before, now, end = -1.0, sum(psutil.Process(worker.pid).cpu_times()[:2]), time.monotonic() + 120
    while until_idle and now - before > 0.05 and time.monotonic() < end:  # 0.05 of 0.5 s: an idle join
        time.sleep(0.5)
        before, now = now, cpu_s(worker)
    return now


def width_run(base_env: dict[str, str], log_dir: Path, width: int, results: int) -> dict:
    env, config = namespace(base_env)
    ids, now = new_ids(max(1, results // width)), int(time.time() * 1000)
    events = ([plan_event(wf, width, now) for wf in ids]  # all plans, then the results round-robin
              + [result_event(wf, i, now) for i in range(width) for wf in ids])
    n = len(ids) * width
    worker, _ = start_join(env, log_dir, f"{config.namespace}join-{width}")
    finals = Finals(config)
    try:
        cpu0, t0 = cpu_s(worker), time.perf_counter()
        produce(config, events)
        finals.wait(ids)
        seconds, cpu, idle_cpu = finals.last - t0, cpu_s(worker) - cpu0, cpu_s(worker, until_idle=True) - cpu0
        finals.check(ids, width)
        worker.stop()
        records, size = topic_bytes(config, config.topics.join_state)
    finally:
        worker.stop()
        finals.consumer.close()
    final = sum(finals.sizes[wf] for wf in ids) / len(ids)
    log(f"width {width}: {n / seconds:.0f} results/s, {1000 * cpu / n:.3f} ms CPU/result")
    return {"width": width, "workflows": len(ids), "results": n, "seconds": seconds, "results_per_s": n / seconds,
            "cpu_ms_per_result": 1000 * cpu / n, "cpu_ms_per_result_until_idle": 1000 * idle_cpu / n,
            "changelog_records": records, "changelog_bytes_per_workflow": size / len(ids), "final_bytes_mean": final,
            "changelog_to_final": size / len(ids) / final, "exit_code": worker.proc.returncode}


def wait_join_committed(config: Config, timeout: float = 300.0) -> None:
    """Until the join group has committed its offsets to the end of the events topic: everything fed to it is
    in its committed state (finals seen for the finished workflows say nothing of the open ones' events)."""
    from confluent_kafka import ConsumerGroupTopicPartitions
    from confluent_kafka.admin import AdminClient
    admin, topic, group = AdminClient(client_config(config)), config.topics.events, config.group_id("join")
    probe = Consumer(client_config(config, **{"group.id": f"bench-probe-{uuid.uuid4().hex}"}))
    try:
        parts = sorted(admin.list_topics(topic, timeout=30).topics[topic].partitions)
        ends = {p: probe.get_watermark_offsets(TopicPartition(topic, p), timeout=30)[1] for p in parts}
        give_up = time.monotonic() + timeout
        while time.monotonic() < give_up:
            request = ConsumerGroupTopicPartitions(group, [TopicPartition(topic, p) for p in parts])
            answer = admin.list_consumer_group_offsets([request])[group].result(30)
            if all(tp.offset >= ends[tp.partition] for tp in answer.topic_partitions):
                return
            time.sleep(0.5)
        raise AssertionError(f"the join did not commit up to the end of {topic} within {timeout:.0f}s")
    finally:
        probe.close()


def restart_run(base_env: dict[str, str], log_dir: Path, markers: int, n_open: int) -> dict:
    env, config = namespace(base_env)
    done, still, now = new_ids(markers), new_ids(n_open), int(time.time() * 1000)
    fill = [e for wf in done for e in (plan_event(wf, 1, now), result_event(wf, 0, now))]
    fill += [plan_event(wf, 9, now) for wf in still] + [result_event(wf, i, now) for i in range(4) for wf in still]
    first, _ = start_join(env, log_dir, f"{config.namespace}join-a")
    second, finals = first, Finals(config)
    try:
        t0 = time.perf_counter()
        produce(config, fill)
        finals.wait(done, timeout=3600)
        wait_join_committed(config)  # the open workflows' events too: the restart must restore all of them
        fill_s = time.perf_counter() - t0
        log(f"restart: {markers} finished + {n_open} open workflows in {fill_s:.1f}s; restarting the join")
        stop_s = time.monotonic()
        first.stop()  # SIGTERM, SIGKILL after 20 s
        stop_s, code = time.monotonic() - stop_s, first.proc.returncode
        second, ready_s = start_join(env, log_dir, f"{config.namespace}join-b")
        text = second.log_path.read_text(errors="replace")
        match = RESTORED.search(text[:text.index("imagefork ready")])
        if match is None or int(match[2]) != markers + n_open:
            raise AssertionError(f"want {markers + n_open} workflows restored before the ready line:\n{text[-2000:]}")
        produce(config, [result_event(wf, i, now) for i in range(4, 9) for wf in still])
        finals.wait(still)
        finals.check(still, 9)
        if (total := sum(len(v) for v in finals.seen.values())) != markers + n_open:
            raise AssertionError(f"{total} final events for {markers + n_open} workflows")
    finally:
        first.stop()
        second.stop()
        finals.consumer.close()
    log(f"restart: ready in {ready_s:.2f}s (restore {match[3]}s); the first join stopped in {stop_s:.1f}s, exit {code}")
    return {"finished": markers, "open": n_open, "fill_seconds": fill_s, "ready_seconds": ready_s,
            "restore_seconds": float(match[3]), "restored_workflows": int(match[2]), "first_stop_seconds": stop_s,
            "first_exit_code": code}


# --- the clock, in-process ----------------------------------------------------------------------
def tick_run(markers: int = 1_000_000, n_open: int = 1000, ticks: int = 500) -> dict:
    """A day of ticks: ``markers`` that finished evenly over the day before and ``n_open`` 9-wide workflows
    whose deadlines fall in the day, so about markers / ticks expire per tick."""
    day, t0, rss0 = 86_400_000, 1_700_000_000_000, psutil.Process().memory_info().rss
    state = JoinState(default_timeout_ms=3_600_000, retention_ms=day)
    # what the join does after each restore (streams/join/partitions.py); the markers below then arrive as
    # live ones would, after it: the worst case for the collector
    gc.collect()
    gc.freeze()
    for i in range(markers):
        at, wf = t0 + i * day // markers, f"wf-{i:012x}"
        state.remember(wf, Marker(COMPLETED, at, "r"))
    nine = descriptors_of({"taskRefs": [REF.format(i) for i in range(9)]})
    for k in range(n_open):
        state.record_plan(WorkflowPlan(f"open-{k:08x}", "http://127.0.0.1:9000/sources/open.png", nine, t0,
                                       t0 + day + k * day // n_open), t0)
    rss_mb = (psutil.Process().memory_info().rss - rss0) / 2**20
    t = time.perf_counter()
    assert not state.due(t0 + 1000), "nothing is due yet"
    idle_ms = 1000 * (time.perf_counter() - t)
    times, with_gc, timed_out, k = [], [], 0, 0
    # the day, then until the last of its markers is gone (due() does at most 2,000 of each kind per call)
    while k < ticks or state.open or len(state.finished) > timed_out:
        k += 1
        full_gcs, t = gc.get_stats()[2]["collections"], time.perf_counter()
        due = state.due(t0 + day + k * day // ticks)
        times.append(1000 * (time.perf_counter() - t))
        with_gc.append(gc.get_stats()[2]["collections"] > full_gcs)  # a full GC pauses the join's loop too
        timed_out += sum(1 for o in due if o.final)
    log(f"ticks: longest {max(times):.1f} ms of {len(times)}, {sum(with_gc)} with a full GC")
    return {"markers": markers, "open": n_open, "ticks": len(times), "idle_tick_ms": idle_ms,
            "longest_tick_ms": max(times), "mean_tick_ms": sum(times) / len(times),
            "longest_tick_without_full_gc_ms": max((t for t, g in zip(times, with_gc) if not g), default=0.0),
            "ticks_with_full_gc_ms": [round(t, 1) for t, g in zip(times, with_gc) if g], "state_rss_mb": rss_mb}


# --- report -------------------------------------------------------------------------------------
def markdown(report: dict) -> str:
    """The table per width, then each measure with its goal and verdict."""
    ok, ws, t, r = {True: "ok", False: "MISSED"}, report["widths"], report["tick"], report["restart"]
    lines = [f"# Join benchmark ({report['machine']})", "", f"`{report['command']}`, {report['date']}, "
             f"{report['partitions']} partitions, one join process.", "",
             "| width | workflows | results | results/s | CPU ms/result | until idle | changelog B/workflow "
             "| final B | changelog/final |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {w['width']} | {w['workflows']} | {w['results']} | {w['results_per_s']:.0f} | "
              f"{w['cpu_ms_per_result']:.3f} | {w['cpu_ms_per_result_until_idle']:.3f} | "
              f"{w['changelog_bytes_per_workflow']:.0f} | {w['final_bytes_mean']:.0f} | {w['changelog_to_final']:.2f} |"
              for w in ws]
    rows = []  # (measure, value, goal and verdict, or "" where there is no goal)
    if ws:
        v, cpus = ws[0]["results_per_s"], [w["cpu_ms_per_result"] for w in ws]
        rows += [(f"results/s ({ws[0]['width']}-wide)", f"{v:.0f}", f">= 2,000: {ok[v >= GOALS['results_per_s']]}"),
                 (f"CPU/result, max/min over widths {[w['width'] for w in ws]}", f"{max(cpus) / min(cpus):.2f}x",
                  f"<= 1.5x: {ok[max(cpus) / min(cpus) <= GOALS['cpu_ratio']]}")]
    if t:
        rows += [(f"longest tick, {t['markers']:,} markers + {t['open']:,} open ({t['state_rss_mb']:.0f} MB)",
                  f"{t['longest_tick_ms']:.1f} ms", f"<= 50 ms: {ok[t['longest_tick_ms'] <= GOALS['tick_ms']]}"),
                 (f"longest tick without a full GC / mean of {t['ticks']} / nothing due (ticks with a full GC, ms: "
                  f"{t['ticks_with_full_gc_ms']})", f"{t['longest_tick_without_full_gc_ms']:.1f} / "
                  f"{t['mean_tick_ms']:.2f} / {t['idle_tick_ms']:.3f} ms", "")]
    if r:
        rows += [(f"restart to ready, {r['finished']:,} finished + {r['open']:,} open", f"{r['ready_seconds']:.2f} s",
                  f"<= 10 s: {ok[r['ready_seconds'] <= GOALS['restart_s']]}"),
                 (f"the restore (its log) / feeding the join / stopping it (exit {r['first_exit_code']})",
                  f"{r['restore_seconds']:.2f} / {r['fill_seconds']:.0f} / {r['first_stop_seconds']:.1f} s", "")]
    lines += ["", "| measure | value | goal |", "|---|---|---|", *(f"| {m} | {v} | {g} |" for m, v, g in rows)]
    return "\n".join(lines) + "\n"


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
    tmp, stack = Path(tempfile.mkdtemp(prefix="imagefork-join-bench-")), None
    partitions = os.environ.get("IMAGEFORK_PARTITIONS", "4")
    base_env = {"IMAGEFORK_PARTITIONS": partitions, "IMAGEFORK_WORKFLOW_TIMEOUT_S": "3600",
                "IMAGEFORK_REPAIR_AFTER_S": "3600"}  # nothing times out or looks lost during a run
    report = {"machine": f"{os.cpu_count()} cores, {round(psutil.virtual_memory().total / 2**30)} GiB",
              "command": " ".join(["python bench/join.py", *sys.argv[1:]]), "date": time.strftime("%Y-%m-%d"),
              "partitions": int(partitions), "goals": GOALS, "widths": [], "tick": None, "restart": None}
    try:
        if not os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
            log("KAFKA_BOOTSTRAP_SERVERS is not set: starting a local stack...")
            stack = LocalStack(tmp / "stack")
            os.environ.update(stack.up())
        log(f"join logs in {tmp / 'logs'}")
        for width in (int(w) for w in args.widths.split(",") if w):
            report["widths"].append(width_run(base_env, tmp / "logs", width, args.results))
        report["tick"] = None if args.skip_tick else tick_run()
        report["restart"] = None if args.skip_restart else restart_run(base_env, tmp / "logs", args.markers, args.open)
    finally:
        for worker in WORKERS:
            worker.stop()
        if stack is not None:
            stack.down()
    (out := Path(args.out)).mkdir(parents=True, exist_ok=True)
    (out / "join-bench.json").write_text(json.dumps(report, indent=2))
    (out / "join-bench.md").write_text(md := markdown(report))
    print(md)
    if 9 in (w := {row["width"]: row for row in report["widths"]}) and 1000 in w:
        print(f"join: {w[9]['results_per_s']:.0f} results/s, {w[9]['cpu_ms_per_result']:.3f} ms CPU/result "
              f"(9-wide), {w[1000]['cpu_ms_per_result']:.3f} (1000-wide)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
