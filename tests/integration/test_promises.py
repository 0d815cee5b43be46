"""Promises of the README and docs/ that no other test holds, on real processes, the real broker and the real S3 server.

- retries that run out end FAILED with their attempts (a source answering 503, an upload that always
  fails), and a source retry keeps the deadline of the first submission;
- staged sources are deleted when a workflow ends, and ``s3://`` sources are read in place;
- every output object carries its ``imagefork-*`` metadata;
- a bad message key is REJECTED under that same id; an unexpected planner error goes round the planner's
  retry topic and is then dead-lettered as INTERNAL with its attempts;
- a resubmission after the end is not run again (no second final event; its staged source deleted);
- the output URL forms in final events (endpoint, S3_PUBLIC_URL, AWS virtual-host);
- the process pool: the seed request, and a pool process killed by a decoder ends WORKER_CRASHED while
  the worker lives on.

Every wait is for evidence (a final event, a committed offset, a record on a topic, an object gone), bounded.
"""
from __future__ import annotations

import http.server
import json
import os
import socket
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, ConsumerGroupTopicPartitions, KafkaError, TopicPartition
from confluent_kafka.admin import AdminClient

from streams import serde
from streams.adapters.kafka import client_config
from streams.config import Config
from streams.core.models import WorkflowCompleted
from streams.core.planning import staging_key
from streams.demo import seed_request
from streams.stack.local import free_port
from tests.integration.pipeline import Pipeline, wait_until

pytestmark = pytest.mark.integration

HERE = Path(__file__).resolve().parent
CRASH_PLUGIN = str(HERE / "crashplugin")
FAULT_PLUGIN = str(HERE / "faultplugin")
SMALL = [{"width": 120, "height": 120}, {"width": 64, "height": 48}]


def small(location: str, formats=("png", "jpg")) -> dict:
    return {"fileLocation": location, "outputFormats": list(formats), "outputSizes": SMALL,
            "maintainAspectRatio": True}


def now_ms() -> int:
    return int(time.time() * 1000)


# --- reading the topics ---------------------------------------------------------------------------------
def read_topic(config: Config, topic: str, key: Callable[[bytes], bool] | None = None,
               timeout: float = 60.0) -> list:
    """Every record of ``topic`` (whose key passes ``key``) from the beginning to the end as it is now,
    read_committed (the completed topic is written in transactions)."""
    consumer = Consumer(client_config(config, **{
        "group.id": f"promises-audit-{uuid.uuid4()}", "enable.auto.commit": False,
        "isolation.level": "read_committed", "enable.partition.eof": True}))
    try:
        parts = sorted(consumer.list_topics(topic, timeout=30).topics[topic].partitions)
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        at_end: set[int] = set()
        found = []
        deadline = time.monotonic() + timeout
        while len(at_end) < len(parts):
            assert time.monotonic() < deadline, f"{topic} was not read to its end within {timeout}s"
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            if msg.error() is not None:
                if msg.error().code() == KafkaError._PARTITION_EOF:
                    at_end.add(msg.partition())
                continue
            if key is None or key(msg.key() or b""):
                found.append(msg)
        return found
    finally:
        consumer.close()


def finals_of(config: Config, workflow_id: str) -> list[WorkflowCompleted]:
    """Every committed final event of ``workflow_id`` on the completed topic (read to its end)."""
    return [WorkflowCompleted.from_dict(serde.decode("WorkflowCompleted", m.value()))
            for m in read_topic(config, config.topics.completed, lambda k: k == workflow_id.encode())]


def plans_of(config: Config, workflow_id: str) -> list[tuple[int, int, dict]]:
    """(partition, offset, plan) of every plan of ``workflow_id`` on the events topic, in offset order."""
    plans = []
    for m in read_topic(config, config.topics.events, lambda k: k == workflow_id.encode()):
        kind, body = serde.decode_join_event(m.value())
        if kind == "WorkflowPlan":
            plans.append((m.partition(), m.offset(), body))
    return sorted(plans, key=lambda p: p[1])


def tasks_of(config: Config, workflow_id: str) -> list[dict]:
    return [serde.decode("ResizeTask", m.value())
            for m in read_topic(config, config.topics.tasks, lambda k: k.startswith(f"{workflow_id}/".encode()))]


def join_committed_offset(config: Config, partition: int) -> int:
    """The offset the join's group has committed (in its transactions) on an events partition."""
    admin = AdminClient(client_config(config))
    group = config.group_id("join")
    request = ConsumerGroupTopicPartitions(group, [TopicPartition(config.topics.events, partition)])
    answer = admin.list_consumer_group_offsets([request], require_stable=True)[group].result(30)
    return answer.topic_partitions[0].offset


def follow(p: Pipeline, requests: dict[str, dict], timeout: float = 120) -> dict[str, WorkflowCompleted]:
    follower = p.follower()
    try:
        for wf, req in requests.items():
            p.submit(req, wf)
        return follower.wait(list(requests), timeout)
    finally:
        follower.close()


def counts(port: int, name: str) -> dict[frozenset, float]:
    """Every sample of the counter ``name`` on a worker's /metrics: labels -> value."""
    import re
    import urllib.request
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {frozenset(re.findall(r'(\w+)="([^"]*)"', m[1] or "")): float(m[2])
            for m in re.finditer(rf"^{name}(?:\{{(.*)\}})? (\S+)$", text, re.M)}


def count(port: int, name: str, **labels: str) -> float:
    """The value of ``name`` with exactly ``labels`` on a worker's /metrics (0 while never counted)."""
    return counts(port, name).get(frozenset(labels.items()), 0.0)


def staged_source_goes(p: Pipeline, key: str, timeout: float = 30) -> None:
    assert wait_until(lambda: p.store.head(key) is None, timeout, 0.3), \
        f"staged source {key} still there {timeout}s after the end\n{p.logs()}"


# --- test doubles -----------------------------------------------------------------------------------
class Source:
    """A loopback HTTP source answering ``status`` (with no body) every time; it records when it was asked."""

    def __init__(self, status: int = 503):
        calls = self.calls = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                calls.append(now_ms())
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, name: str = "photo.png") -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class UploadCutter:
    """A loopback TCP forwarder to S3 that reads the method of each HTTP request going through: with
    ``cut_uploads`` set, a PUT (an upload) drops the connection before it reaches S3, while GETs (the staged
    source) pass. It counts the requests by method."""

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.cut_uploads = False
        self.uploads_cut = 0
        self.methods: Counter = Counter()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, src, dst, requests: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if requests:
                    method = data.split(b" ", 1)[0]
                    if method in (b"GET", b"PUT", b"HEAD", b"POST", b"DELETE"):
                        with self._lock:
                            self.methods[method.decode()] += 1
                            if method == b"PUT" and self.cut_uploads:
                                self.uploads_cut += 1
                                break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self) -> None:
        self.listener.close()


# === the shared pipeline (conftest's `pipeline`: join, resize, planner with the FAST settings) =========
@pytest.fixture(scope="module")
def always_503(pipeline):
    """One request whose source answers 503 every time, to its final event."""
    source = Source(503)
    try:
        wf = f"always-503-{uuid.uuid4().hex[:6]}"
        final = follow(pipeline, {wf: small(source.url())}, 90)[wf]
    finally:
        source.close()
    parked = read_topic(pipeline.config, pipeline.config.topics.request_retries, lambda k: k == wf.encode())
    return SimpleNamespace(final=final, calls=source.calls, parked=[dict(m.headers()) for m in parked],
                           retries=pipeline.config.retry.max_retries)


def test_a_source_that_always_answers_503_ends_failed_with_its_attempts(always_503):
    """IMAGEFORK_MAX_RETRIES is 3: four fetches, parked on the request retry topic in between (with the
    attempt, the not-before time and the first submission time), then FAILED with the code, the status
    and the attempts in the error."""
    final, retries = always_503.final, always_503.retries
    assert final.status == "FAILED" and final.outputs == () and final.taskCount == 0, final
    assert len(final.errors) == 1, final.errors
    error = final.errors[0]
    assert (error.taskRef, error.code) == ("", "SOURCE_UNAVAILABLE"), error
    assert "503" in error.message and f"after {retries + 1} attempts" in error.message, error.message
    assert len(always_503.calls) == retries + 1, always_503.calls
    headers = always_503.parked
    assert sorted(int(h["imagefork.attempts"]) for h in headers) == list(range(2, retries + 2)), headers
    assert {int(h["imagefork.submitted-at"]) for h in headers} == {final.submittedAt}
    assert all(int(h["imagefork.not-before"]) > final.submittedAt for h in headers)


def test_the_request_error_carries_the_attempt_count_in_its_field(always_503):
    """docs/failure-semantics.md, Retries: "The attempt count is in the result and in each error"
    (TaskError.attempts)."""
    error = always_503.final.errors[0]
    assert error.attempts == always_503.retries + 1, f"the request's error says attempts={error.attempts}: {error}"


def test_the_staged_source_is_deleted_when_the_workflow_ends(pipeline, files):
    wf = f"staged-{uuid.uuid4().hex[:6]}"
    final = follow(pipeline, {wf: small(files.url("sample.png"))})[wf]
    assert final.status == "COMPLETED", final.errors
    (_p, _o, plan), = plans_of(pipeline.config, wf)
    key = staging_key(pipeline.config.staging_prefix, wf, plan["runId"])
    assert key == f"{pipeline.config.staging_prefix}{wf}/{plan['runId']}/source"
    # the tasks read the source from there (so it was staged) ...
    tasks = tasks_of(pipeline.config, wf)
    assert len(tasks) == 4 and {t["sourceUri"] for t in tasks} == {pipeline.store.uri(key)}
    # ... and it goes once the final event is committed
    staged_source_goes(pipeline, key)
    assert pipeline.store.list_keys(f"{pipeline.config.staging_prefix}{wf}/") == []


def test_an_s3_source_is_read_in_place_and_not_staged(pipeline, files):
    wf = f"s3-in-place-{uuid.uuid4().hex[:6]}"
    source_key = f"inputs/{wf}.png"  # IMAGEFORK_SOURCE_S3_ALLOW lists imagefork/inputs/
    pipeline.store.put(source_key, (files.folder / "sample.png").read_bytes(), "image/png")
    location = pipeline.store.uri(source_key)
    final = follow(pipeline, {wf: small(location)})[wf]
    assert final.status == "COMPLETED", final.errors
    tasks = tasks_of(pipeline.config, wf)
    assert len(tasks) == 4 and {t["sourceUri"] for t in tasks} == {location}
    assert pipeline.store.list_keys(f"{pipeline.config.staging_prefix}{wf}/") == []
    # the join cleans staged copies only: the requester's own object stays
    assert pipeline.store.head(source_key) is not None


def test_every_output_object_carries_its_metadata_and_endpoint_url(pipeline, files):
    """imagefork-task/-format/-width/-height/-run on every object, matching the final event (repair reads
    them); with S3_ENDPOINT_URL alone the URLs are {endpoint}/{bucket}/{key}."""
    wf = f"metadata-{uuid.uuid4().hex[:6]}"
    final = follow(pipeline, {wf: small(files.url("alpha.png"), ("png", "jpg", "webp"))})[wf]
    assert final.status == "COMPLETED", final.errors
    (_p, _o, plan), = plans_of(pipeline.config, wf)
    assert len(final.outputs) == 6
    keys = []
    for out in final.outputs:
        key = out.s3Uri.split("/", 3)[3]
        keys.append(key)
        meta = pipeline.store.head(key)["Metadata"]
        options = json.loads(meta.pop("imagefork-options"))  # what was applied, as the output record says
        assert meta == {"imagefork-task": out.taskRef, "imagefork-format": out.format,
                        "imagefork-width": str(out.width), "imagefork-height": str(out.height),
                        "imagefork-run": plan["runId"]}, (key, meta)
        assert options == {"frames": out.frames, "options": out.options.said()} and out.options.resizeMode == "fit"
        endpoint = pipeline.config.s3_endpoint_url.rstrip("/")
        assert out.url == f"{endpoint}/{pipeline.config.bucket}/{key}"
    assert sorted(pipeline.store.list_keys(f"{pipeline.config.output_prefix}{wf}/")) == sorted(keys)
    assert final.fileLocations == tuple(o.url for o in final.outputs)
    pipeline.check_outputs(final)


def test_a_bad_message_key_is_rejected_under_that_same_id(pipeline, files):
    """The key names S3 keys: a slash or 200 characters are REJECTED, and the final event is under that
    very key (not the document's workflowId), so the sender finds it."""
    ids = [f"has/slash-{uuid.uuid4().hex[:6]}", "k" * 190 + uuid.uuid4().hex[:10], "spa ce"]
    request = {**small(files.url("sample.png")), "workflowId": "a-fine-id"}
    finals = follow(pipeline, {wf: request for wf in ids}, 90)
    for wf in ids:
        final = finals[wf]
        assert final.workflowId == wf and final.status == "REJECTED", final
        assert final.taskCount == 0 and final.outputs == ()
        assert [(e.taskRef, e.code) for e in final.errors] == [("", "REQUEST_INVALID")], final.errors
        assert "message key" in final.errors[0].message and "128" in final.errors[0].message
    assert pipeline.store.list_keys(f"{pipeline.config.output_prefix}{ids[0]}") == []
    assert pipeline.store.list_keys(f"{pipeline.config.staging_prefix}{ids[0]}") == []


def test_a_resubmission_after_the_end_is_not_run_again(pipeline, files):
    """Submit, wait for the final event, submit the same id again: the submitter is answered at once (a
    RunIgnored notice, and the first run's final event as the answer); once the join has taken the second
    plan (its committed offset is past it, and a later transaction is committed), the completed topic still
    holds exactly one final event, the first run's, and the second run's staged source is gone."""
    wf = f"resubmit-{uuid.uuid4().hex[:6]}"
    request = small(files.url("sample.png"), ("webp",))
    first = follow(pipeline, {wf: request})[wf]
    assert first.status == "COMPLETED", first.errors
    follower = pipeline.follower()
    try:
        pipeline.submit(request, wf)
        answer = follower.wait([wf], 60)[wf]
        notice = follower.notices[wf]
    finally:
        follower.close()
    assert answer == first
    assert notice["reason"] == "finished" and notice["takenStatus"] == "COMPLETED"
    plans: list = []

    def both_planned() -> bool:
        plans[:] = plans_of(pipeline.config, wf)
        return len(plans) >= 2

    assert wait_until(both_planned, 60, 1), f"the planner never planned the resubmission\n{pipeline.logs()}"
    (_p1, _o1, plan1), (partition, offset, plan2) = plans[:2]
    assert plan1["runId"] != plan2["runId"] and len(plan2["taskRefs"]) == 2
    assert (notice["runId"], notice["takenRunId"]) == (plan2["runId"], plan1["runId"])
    assert wait_until(lambda: join_committed_offset(pipeline.config, partition) > offset, 60, 0.5), \
        f"the join never committed past the second plan ({partition}/{offset})\n{pipeline.logs()}"
    # a final event committed after that proves the transaction that took the second plan is complete
    sentinel = f"sentinel-{uuid.uuid4().hex[:6]}"
    assert follow(pipeline, {sentinel: {"fileLocation": "ftp://nowhere"}}, 60)[sentinel].status == "REJECTED"
    finals = finals_of(pipeline.config, wf)
    assert finals == [first], finals
    # the second run's source was staged (its tasks read it from there) and is deleted
    second_key = staging_key(pipeline.config.staging_prefix, wf, plan2["runId"])
    second_tasks = [t for t in tasks_of(pipeline.config, wf) if t["runId"] == plan2["runId"]]
    assert len(second_tasks) == 2 and {t["sourceUri"] for t in second_tasks} == {pipeline.store.uri(second_key)}
    staged_source_goes(pipeline, second_key)
    assert pipeline.store.list_keys(f"{pipeline.config.staging_prefix}{wf}/") == []


# === a short deadline: join and planner only =========================================================
TIMEOUT_S = 6


@pytest.fixture(scope="module")
def short_deadline(stack_env, tmp_path_factory):
    """A 6 s workflow deadline, a planner that would retry a source 100 times every 0.5 s, no resize."""
    p = Pipeline(stack_env, f"dl{uuid.uuid4().hex[:8]}.", tmp_path_factory.mktemp("logs-deadline"),
                 IMAGEFORK_WORKFLOW_TIMEOUT_S=str(TIMEOUT_S), IMAGEFORK_MAX_RETRIES="100",
                 IMAGEFORK_RETRY_POLICY="fixed", IMAGEFORK_RETRY_DELAY_S="0.5")
    try:
        p.start_together(("join", {}), ("planner", {}))
        yield p
    finally:
        p.stop()


def test_a_source_retry_keeps_the_deadline_of_the_first_submission(short_deadline):
    """A source that answers 503 for longer than the deadline: the retries stop at the first submission's
    deadline, not a deadline renewed by each retry, and the final event keeps the first submission time."""
    p = short_deadline
    source = Source(503)
    try:
        wf = f"deadline-{uuid.uuid4().hex[:6]}"
        before = now_ms()
        final = follow(p, {wf: small(source.url())}, 120)[wf]
    finally:
        source.close()
    calls = source.calls
    assert final.status in ("FAILED", "TIMED_OUT"), final
    assert len(calls) >= 3, calls  # it was retried
    assert before <= final.submittedAt <= calls[0], (before, final.submittedAt, calls[0])  # the first submission
    # a deadline renewed by each retry would keep it going for 100 retries (50 s and more)
    took = final.completedAt - final.submittedAt
    assert took <= TIMEOUT_S * 1000 + 5000, f"ended {took} ms after the first submission ({len(calls)} fetches)"
    late = [c - final.submittedAt for c in calls if c > final.submittedAt + TIMEOUT_S * 1000 + 2000]
    assert not late, f"fetched {late} ms after the first submission, past its {TIMEOUT_S} s deadline"
    if final.status == "FAILED":
        assert [e.code for e in final.errors] == ["SOURCE_UNAVAILABLE"], final.errors
        assert f"after {len(calls)} attempts" in final.errors[0].message, final.errors


def test_a_timed_out_workflow_deletes_its_staged_source(short_deadline, files):
    p = short_deadline
    wf = f"timed-out-{uuid.uuid4().hex[:6]}"
    final = follow(p, {wf: small(files.url("sample.png"), ("png",))}, 60)[wf]
    assert final.status == "TIMED_OUT" and {e.code for e in final.errors} == {"TIMED_OUT"}, final
    (_p, _o, plan), = plans_of(p.config, wf)
    key = staging_key(p.config.staging_prefix, wf, plan["runId"])
    assert {t["sourceUri"] for t in tasks_of(p.config, wf)} == {p.store.uri(key)}
    staged_source_goes(p, key)


# === faults: a planner with an injected bug, a resize worker on the process pool ======================
PUBLIC_URL = "https://cdn.imagefork.test/media"


@pytest.fixture(scope="module")
def faulty(stack_env, tmp_path_factory):
    """The planner raises RuntimeError when it plans the magic workflow (tests/integration/faultplugin); the
    join's first send_offsets_to_transaction never returns (the same plugin); the resize worker runs
    IMAGEFORK_RESIZE_POOL=process with the crash plugin and S3_PUBLIC_URL set."""
    logs = tmp_path_factory.mktemp("logs-faulty")
    magic = f"planner-bug-{uuid.uuid4().hex[:6]}"
    fault_log = logs / "faults.txt"
    join_fault_log = logs / "join-faults.txt"
    p = Pipeline(stack_env, f"ft{uuid.uuid4().hex[:8]}.", logs, IMAGEFORK_MAX_RETRIES="2",
                 IMAGEFORK_RETRY_POLICY="fixed", IMAGEFORK_RETRY_DELAY_S="0.3", IMAGEFORK_SESSION_TIMEOUT_S="6")
    ports = SimpleNamespace(planner=free_port(), resize=free_port())  # their /metrics
    try:
        join, _planner, resize = p.start_together(
            ("join", {"PYTHONPATH": FAULT_PLUGIN, "IMAGEFORK_FAULT_JOIN_HANG": "1",
                         "IMAGEFORK_FAULT_LOG": str(join_fault_log)}),
            ("planner", {"PYTHONPATH": os.pathsep.join([FAULT_PLUGIN, CRASH_PLUGIN]),
                         "IMAGEFORK_FAULT_WORKFLOW_ID": magic, "IMAGEFORK_FAULT_LOG": str(fault_log),
                         "IMAGEFORK_METRICS_LISTEN": f"127.0.0.1:{ports.planner}"}),
            ("resize", {"PYTHONPATH": CRASH_PLUGIN, "IMAGEFORK_RESIZE_POOL": "process",
                        "IMAGEFORK_RESIZE_CONCURRENCY": "2", "S3_PUBLIC_URL": PUBLIC_URL,
                        "IMAGEFORK_METRICS_LISTEN": f"127.0.0.1:{ports.resize}"}))
        yield SimpleNamespace(p=p, magic=magic, fault_log=fault_log, join_fault_log=join_fault_log, join=join,
                              resize=resize, ports=ports)
    finally:
        p.stop()


def pool_processes(pid: int) -> list[int]:
    """The children of ``pid`` that are multiprocessing's spawned workers."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            for child in (task / "children").read_text().split():
                if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                    found.append(int(child))
        except OSError:
            pass
    return found


def test_a_transactional_call_that_never_returns_costs_the_join_its_producer_not_a_workflow(faulty, files):
    """librdkafka's send_offsets_to_transaction can block past its timeout for good (#5456; it stopped
    a join across a broker restart). Injected here: the join gives the call up, replaces its producer
    (fencing the stuck one), restores from the changelog and commits every final event exactly once."""
    p = faulty.p
    ids = [f"hang-{i}-{uuid.uuid4().hex[:6]}" for i in range(3)]
    finals = follow(p, {wf: small(files.url("sample.png")) for wf in ids}, 120)
    assert faulty.join_fault_log.read_text().split() == ["join-hang"]
    assert "giving its producer up" in faulty.join.log_path.read_text(), faulty.join.log_tail(40)
    for wf in ids:
        assert finals[wf].status == "COMPLETED", finals[wf].errors
        assert len(finals_of(p.config, wf)) == 1
        p.check_outputs(finals[wf])


def test_the_process_pool_completes_the_seed_request_with_public_urls(faulty, files):
    p = faulty.p
    wf = f"pool-seed-{uuid.uuid4().hex[:6]}"
    final = follow(p, {wf: seed_request(files.url("sample.png"))}, 180)[wf]
    assert final.status == "COMPLETED", final.errors
    assert len(final.outputs) == 9
    p.check_outputs(final)
    # S3_PUBLIC_URL is the base of the URLs in the final event (path style)
    assert final.fileLocations == tuple(f"{PUBLIC_URL}/{p.config.bucket}/{o.s3Uri.split('/', 3)[3]}"
                                        for o in final.outputs)
    # the work ran in pool processes: spawned children of the resize worker
    assert pool_processes(faulty.resize.pid), "the resize worker has no pool processes"


def test_a_pool_process_killed_by_a_decoder_ends_worker_crashed_and_the_worker_lives(faulty, files):
    """IMAGEFORK_RESIZE_POOL=process: the crash plugin aborts the pool process that decodes the poison; the
    pool breaks, its tasks run again alone in the sandbox, which dies twice (IMAGEFORK_MAX_CRASHES): FAILED
    WORKER_CRASHED. The worker process itself never dies, and the requests around it complete."""
    p = faulty.p
    (files.folder / "pool-poison.crashme").write_bytes(b"CRASHME\n" + b"\x00" * 64)
    tag = uuid.uuid4().hex[:6]
    poison, good = f"pool-poison-{tag}", [f"pool-good-{tag}-{i}" for i in range(2)]
    pid = faulty.resize.pid
    crashes_before = {kind: count(faulty.ports.resize, "imagefork_worker_crashes_total", kind=kind)
                      for kind in ("observed", "suspected")}
    finals = follow(p, {good[0]: small(files.url("sample.png")),
                        poison: small(files.url("pool-poison.crashme"), ("png",)),
                        good[1]: small(files.url("alpha.png"))}, 240)
    assert faulty.resize.alive() and faulty.resize.pid == pid, faulty.resize.log_tail(40)
    final = finals[poison]
    assert final.status == "FAILED" and final.outputs == (), final
    assert [e.code for e in final.errors] == ["WORKER_CRASHED"] * 2, final.errors
    for wf in good:
        assert finals[wf].status == "COMPLETED", finals[wf].errors
        p.check_outputs(finals[wf])
    log = faulty.resize.log_path.read_text(errors="replace")
    assert "resize pool broke" in log and "killed its sandbox" in log, faulty.resize.log_tail(40)
    assert [f.workflowId for f in finals_of(p.config, poison)] == [poison]
    # imagefork_worker_crashes_total counts the sandboxes that died: each error says how many its task killed
    # (IMAGEFORK_MAX_CRASHES each: 2 x 2); no worker process died, so none is suspected
    import re
    killed = sum(int(re.search(r"killed (\d+) sandboxed worker process", e.message)[1]) for e in final.errors)
    assert killed == 2 * p.config.max_crashes, final.errors
    crashes = {kind: count(faulty.ports.resize, "imagefork_worker_crashes_total", kind=kind) - n
               for kind, n in crashes_before.items()}
    assert crashes == {"observed": killed, "suspected": 0}, crashes


def test_an_unexpected_planner_error_is_retried_then_dead_lettered_as_internal(faulty, files):
    """A bug in the planner (RuntimeError while planning the magic workflow): the request goes round the
    planner's retry topic (IMAGEFORK_MAX_RETRIES=2), then to the dead letters as INTERNAL with
    imagefork.attempts 3, its key and bytes; no final event; requests after it complete."""
    p, magic = faulty.p, faulty.magic
    t = p.config.topics
    request = small(files.url("sample.png"))
    after = f"after-bug-{uuid.uuid4().hex[:6]}"
    planner_port = faulty.ports.planner
    before = {agent: count(planner_port, "imagefork_messages_total", agent=agent, outcome="retried")
              for agent in ("planner", "planner.retry")}
    follower = p.follower()
    try:
        p.submit(request, magic)
        p.submit(small(files.url("sample.png"), ("webp",)), after)
        assert follower.wait([after], 120)[after].status == "COMPLETED"
    finally:
        follower.close()
    letters: list = []

    def dead_lettered() -> bool:
        letters[:] = read_topic(p.config, t.dead_letter, lambda k: k == magic.encode())
        return bool(letters)

    assert wait_until(dead_lettered, 60, 1), f"no dead letter for {magic}\n{p.logs()}"
    assert len(letters) == 1, [dict(m.headers()) for m in letters]
    letter = letters[0]
    h = dict(letter.headers())
    assert letter.key() == magic.encode() and json.loads(letter.value()) == request
    assert h["imagefork.error.code"] == b"INTERNAL", h
    assert b"RuntimeError" in h["imagefork.error.reason"] and b"injected planner fault" in h["imagefork.error.reason"]
    assert h["imagefork.attempts"] == b"3", h
    assert h["imagefork.agent"] == b"planner.retry" and h["imagefork.source.topic"] == t.request_retries.encode()
    assert faulty.fault_log.read_text().split() == [magic] * 3  # planned three times, failed three times
    parked = read_topic(p.config, t.request_retries, lambda k: k == magic.encode())
    assert sorted(int(dict(m.headers())["imagefork.attempts"]) for m in parked) == [2, 3]
    assert all(m.value() == letter.value() for m in parked)
    assert finals_of(p.config, magic) == []
    # imagefork_messages_total{outcome="retried"} counts those two parkings: the first attempt's (read from the
    # request topic, agent planner), the second's (read from the retry topic, agent planner.retry)
    retried = {agent: count(planner_port, "imagefork_messages_total", agent=agent, outcome="retried") - n
               for agent, n in before.items()}
    assert retried == {"planner": 1.0, "planner.retry": 1.0} and sum(retried.values()) == len(parked), retried


# === S3 through a forwarder: no S3_ENDPOINT_URL (AWS URLs), and uploads that fail ======================
@pytest.fixture(scope="module")
def via_forwarder(stack_env, tmp_path_factory):
    """The resize worker has no S3_ENDPOINT_URL (so its URLs are AWS's virtual-host form); botocore's own
    AWS_ENDPOINT_URL_S3 sends its requests through an UploadCutter to the real S3 server."""
    cutter = UploadCutter(int(stack_env["S3_ENDPOINT_URL"].rsplit(":", 1)[1]))
    p = Pipeline(stack_env, f"fw{uuid.uuid4().hex[:8]}.", tmp_path_factory.mktemp("logs-forwarder"),
                 IMAGEFORK_MAX_RETRIES="2", IMAGEFORK_RETRY_POLICY="fixed", IMAGEFORK_RETRY_DELAY_S="0.3")
    port = free_port()  # the resize worker's /metrics
    try:
        p.start_together(("join", {}), ("planner", {}),
                       ("resize", {"S3_ENDPOINT_URL": "", "S3_PUBLIC_URL": "",
                                   "IMAGEFORK_METRICS_LISTEN": f"127.0.0.1:{port}",
                                   "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{cutter.port}",
                                   "IMAGEFORK_CONNECT_TIMEOUT_S": "2", "IMAGEFORK_READ_TIMEOUT_S": "5"}))
        yield SimpleNamespace(p=p, cutter=cutter, port=port)
    finally:
        p.stop()
        cutter.close()


def test_without_an_endpoint_the_final_event_has_aws_virtual_host_urls(via_forwarder, files):
    p, cutter = via_forwarder.p, via_forwarder.cutter
    wf = f"aws-urls-{uuid.uuid4().hex[:6]}"
    final = follow(p, {wf: small(files.url("sample.png"))})[wf]
    assert final.status == "COMPLETED", final.errors
    region, bucket = p.config.s3_region, p.config.bucket
    assert final.fileLocations == tuple(f"https://{bucket}.s3.{region}.amazonaws.com/{o.s3Uri.split('/', 3)[3]}"
                                        for o in final.outputs)
    assert cutter.methods["PUT"] >= 4  # the uploads went through the configured endpoint
    p.check_outputs(final)


def test_an_upload_that_always_fails_ends_failed_with_its_attempts(via_forwarder, files):
    """Every PUT of the resize worker is cut: each task is tried 1 + IMAGEFORK_MAX_RETRIES (2) times through
    the task retry topic, then FAILED with STORAGE_UNAVAILABLE and attempts 3; the staged source goes."""
    p, cutter = via_forwarder.p, via_forwarder.cutter
    wf = f"upload-fails-{uuid.uuid4().hex[:6]}"
    retried_before = count(via_forwarder.port, "imagefork_messages_total", agent="resize", outcome="retried")
    cutter.cut_uploads = True
    try:
        final = follow(p, {wf: small(files.url("sample.png"), ("png",))}, 120)[wf]
    finally:
        cutter.cut_uploads = False
    assert final.status == "FAILED" and final.outputs == () and final.taskCount == 2, final
    tasks = tasks_of(p.config, wf)
    refs = sorted(t["taskRef"] for t in tasks if t["attempt"] == 1)
    assert sorted(e.taskRef for e in final.errors) == refs, final.errors
    for e in final.errors:
        assert e.code == "STORAGE_UNAVAILABLE" and e.attempts == 3, e
        assert "upload" in e.message, e
    assert cutter.uploads_cut >= 2 * 3, cutter.uploads_cut
    # each retry went round the task retry topic and back onto the task topic
    retried = sorted((t["taskRef"], t["attempt"]) for t in tasks if t["attempt"] > 1)
    assert retried == [(ref, a) for ref in refs for a in (2, 3)], retried
    # and imagefork_messages_total{agent="resize",outcome="retried"} counts each of those 4 retries, by value
    # (the attempts 1 and 2 of each task ended retried; its attempt 3 ended processed, FAILED)
    assert count(via_forwarder.port, "imagefork_messages_total", agent="resize", outcome="retried") \
        - retried_before == len(retried)
    (_p, _o, plan), = plans_of(p.config, wf)
    staged_source_goes(p, staging_key(p.config.staging_prefix, wf, plan["runId"]))
    assert p.store.list_keys(f"{p.config.output_prefix}{wf}/") == []
