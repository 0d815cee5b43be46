"""A running pipeline for a test: its own namespace, real worker processes, a client."""
from __future__ import annotations

import contextlib
import io
import os
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource
from PIL import Image

from streams import cli, serde
from streams.adapters.kafka import client_config, ensure_topics, read_to_end, watermarks
from streams.adapters.objectstore import ObjectStore
from streams.client import Client, Follower, consume_completed
from streams.config import Config
from streams.stack.processes import WorkerProcess, wait_for_log

FAST = {
    "IMAGEFORK_FETCH_ALLOW": "127.0.0.0/8",
    "IMAGEFORK_PARTITIONS": "4",
    "IMAGEFORK_RETRY_DELAY_S": "0.5",
    "IMAGEFORK_RETRY_MAX_DELAY_S": "2",
    "IMAGEFORK_WORKFLOW_TIMEOUT_S": "120",
    "IMAGEFORK_RESIZE_CONCURRENCY": "2",
    "IMAGEFORK_LOG_LEVEL": "info",
    "IMAGEFORK_REPAIR_AFTER_S": "5",
    "IMAGEFORK_SOURCE_S3_ALLOW": "imagefork/inputs/",  # the stack's bucket; tests put s3:// sources there
}


def s3_prefixes(namespace: str) -> dict[str, str]:
    """Output and staging prefixes of the namespace's own. With fixed workflow ids and shared prefixes, a
    persistent S3 endpoint would still hold a previous run's objects under the same keys: the join's
    repair (which looks a workflow's outputs up by key) or ``check_outputs`` could take them for this
    run's and hide a lost result. The namespace is unique per test (per Pipeline)."""
    ns = namespace.strip(".")
    return {"IMAGEFORK_OUTPUT_PREFIX": f"{ns}/", "IMAGEFORK_STAGING_PREFIX": f"_staging/{ns}/"}


class Pipeline:
    def __init__(self, stack_env: dict[str, str], namespace: str, log_dir: Path, **overrides: str):
        self.env = {**stack_env, **FAST, "IMAGEFORK_NAMESPACE": namespace, **s3_prefixes(namespace), **overrides}
        self.config = Config.from_env({**os.environ, **self.env})
        self.log_dir = log_dir
        self.workers: list[WorkerProcess] = []
        self.followers: list[Follower] = []
        ensure_topics(self.config)
        self.store = ObjectStore(self.config)
        self.store.ensure_bucket()
        self.client = Client(self.config)
        self._admin: AdminClient | None = None

    def start(self, role: str, name: str | None = None, wait: bool = True, host=None, **env: str) -> WorkerProcess:
        """Start a worker of ``role`` (on ``host``, a tests/hosts.py Host, when given)."""
        worker = WorkerProcess(role, {**self.env, **env}, self.log_dir, name=name or f"{role}-{len(self.workers)}",
                               prefix=host.prefix() if host is not None else ())
        self.workers.append(worker)
        if wait:
            assert wait_for_log(worker, "imagefork ready", 120), f"{role} did not start:\n{worker.log_tail(40)}"
        return worker

    def start_together(self, *specs: str | tuple[str, dict]) -> list[WorkerProcess]:
        """Start several workers at once (a start is mostly waiting on the broker, so side by side is
        faster than one after the other) and wait until each is ready. A spec is a role, or (role,
        settings) where the setting ``name`` names the worker, ``host`` is its host (tests/hosts.py) and the
        rest is its environment."""
        workers = []
        for spec in specs:
            role, env = (spec, {}) if isinstance(spec, str) else spec
            env = dict(env)
            workers.append(self.start(role, name=env.pop("name", None), wait=False, host=env.pop("host", None),
                                      **env))
        for w in workers:
            assert wait_for_log(w, "imagefork ready", 180), f"{w.name} did not start:\n{w.log_tail(40)}"
        return workers

    def start_all(self) -> "Pipeline":
        """Join, resize and planner, each ready; if one does not start, the ones that did are stopped."""
        try:
            self.start_together("join", "resize", "planner")
        except BaseException:
            self.stop()
            raise
        return self

    def follower(self) -> Follower:
        """A Follower that ``stop`` closes if the test did not (say, its wait timed out)."""
        follower = Follower(self.config)
        self.followers.append(follower)
        return follower

    def submit(self, request: dict, workflow_id: str | None = None, **kw) -> str:
        return self.client.submit(request, workflow_id or f"wf-{uuid.uuid4().hex[:12]}", **kw)

    def finals_for(self, ids, settle: float = 3.0, timeout: float = 60.0, drain: bool = True):
        """Every final event for ``ids`` committed on the completed topic, read to the end offsets
        (``consume_completed``), counted only once the pipeline is drained (``wait_drained``): a re-run
        task's late result that would cause a second final event has been handled by then, and that
        event committed. ``settle`` only lengthens the timeout."""
        if drain:
            self.wait_drained(timeout=max(120.0, timeout))
        return consume_completed(self.config, ids, timeout=max(timeout, settle))

    # role -> the topics its consumer group reads
    INPUTS = {"planner": ("requests", "requests_batch", "request_retries"),
              "resize": ("tasks", "tasks_batch", "retries"), "join": ("events",)}

    def drain_state(self) -> dict[tuple[str, str, int], tuple[int, int]]:
        """(group, topic, partition) -> (committed offset, end offset) for every input topic of every role
        with a live worker in this pipeline (a role never started has nothing to drain)."""
        if self._admin is None:
            self._admin = AdminClient(client_config(self.config))
        roles = {w.role for w in self.workers if w.alive()}
        state = {}
        probe = Consumer(client_config(self.config, **{"group.id": f"drain-{uuid.uuid4().hex}",
                                                     "enable.auto.commit": False}))
        try:
            for role in sorted(roles & set(self.INPUTS)):
                group = self.config.group_id(role)
                for name in self.INPUTS[role]:
                    topic = getattr(self.config.topics, name)
                    meta = self._admin.list_topics(topic, timeout=30).topics[topic]
                    parts = sorted(meta.partitions)
                    request = ConsumerGroupTopicPartitions(group, [TopicPartition(topic, p) for p in parts])
                    answer = self._admin.list_consumer_group_offsets([request])[group].result(30)
                    committed = {tp.partition: tp.offset for tp in answer.topic_partitions}
                    for p in parts:
                        _low, high = watermarks(probe, TopicPartition(topic, p))
                        state[(group, topic, p)] = (max(committed.get(p, -1), 0), high)
        finally:
            probe.close()
        return state

    def wait_drained(self, timeout: float = 180.0) -> None:
        """Wait until every live role's group has committed its offsets up to the end of each of its input
        topics, and nothing new was produced to them across two looks a second apart. The join commits its
        offsets in the transaction that holds what the events caused, so after this every final event those
        events will ever cause is on the completed topic (exactly-once counts are taken after this)."""
        state: dict = {"last": None}

        def drained() -> bool:
            try:
                now = self.drain_state()
            except KafkaException:
                return False  # e.g. a coordinator moving: look again
            state["now"] = now
            behind = {k: v for k, v in now.items() if v[0] < v[1]}
            if behind:
                state["last"], state["behind"] = None, behind
                return False
            ends = {k: v[1] for k, v in now.items()}
            if state["last"] == ends:
                return True
            state["last"] = ends
            return False

        assert wait_until(drained, timeout, interval=1.0), \
            f"the pipeline did not drain within {timeout:.0f}s; behind: {state.get('behind')}\n{self.logs()}"

    def set_topic_config(self, topic: str, name: str, value: str) -> None:
        """Change one setting of a topic of this pipeline (say, shrink its ``max.message.bytes``)."""
        if self._admin is None:
            self._admin = AdminClient(client_config(self.config))
        res = ConfigResource("topic", topic, incremental_configs=[
            ConfigEntry(name, value, incremental_operation=AlterConfigOpType.SET)])
        for future in self._admin.incremental_alter_configs([res]).values():
            future.result(30)

    def output_keys(self, workflow_id: str) -> list[str]:
        return self.store.list_keys(f"{self.config.output_prefix}{workflow_id}/")

    def staged_keys(self, workflow_id: str) -> list[str]:
        return self.store.list_keys(f"{self.config.staging_prefix}{workflow_id}/")

    def object(self, key: str) -> bytes:
        return self.store.client.get_object(Bucket=self.config.bucket, Key=key)["Body"].read()

    def check_outputs(self, final) -> None:
        """Every listed output exists, decodes to its declared format and size, under the workflow's prefix."""
        for out in final.outputs:
            key = out.s3Uri.split("/", 3)[3]
            assert key.startswith(f"{self.config.output_prefix}{final.workflowId}/"), key
            data = self.object(key)
            assert len(data) == out.bytes
            im = Image.open(io.BytesIO(data))
            assert im.size == (out.width, out.height)
            assert im.format == {"jpg": "JPEG", "jpeg": "JPEG"}.get(out.format, out.format.upper())
            head = self.store.head(key)
            assert head["ContentType"] == out.contentType
            # the object says which options were applied, as the output record does (repair reads them)
            from streams.join.repair import applied_options
            options = applied_options(head["Metadata"].get("imagefork-options", ""))
            if out.options.resizeMode:  # a record written by a worker (a repaired one may predate the metadata)
                assert (options.get("options"), options.get("frames", 1)) == (out.options, out.frames), (options, out)

    # --- evidence that the join has handled events -------------------------------------------
    def events(self, workflow_id: str) -> list[tuple[int, int, str]]:
        """(partition, offset, kind) of every event of the workflow on the events topic now."""
        found = []
        for msg in read_to_end(self.config, self.config.topics.events):
            if msg.key() == workflow_id.encode():
                try:
                    kind, _body = serde.decode_join_event(msg.value() or b"")
                except serde.SerdeError:
                    continue
                found.append((msg.partition(), msg.offset(), kind))
        return found

    def join_committed(self) -> dict[int, int]:
        """The join group's committed offsets on the events topic, per partition. The join commits them in
        the transaction that holds what the events caused (state rows, final events), so an offset past an
        event means its effects are committed too."""
        group, topic = self.config.group_id("join"), self.config.topics.events
        if self._admin is None:
            self._admin = AdminClient(client_config(self.config))
        meta = self._admin.list_topics(topic, timeout=30).topics[topic]
        request = ConsumerGroupTopicPartitions(group, [TopicPartition(topic, p) for p in meta.partitions])
        try:
            answer = self._admin.list_consumer_group_offsets([request])[group].result(30)
        except KafkaException:
            return {}  # e.g. the group's coordinator is moving: the caller asks again
        return {tp.partition: tp.offset for tp in answer.topic_partitions if tp.offset >= 0}

    def wait_join_handled(self, workflow_id: str, plans: int, results: int, timeout: float = 120.0) -> None:
        """Wait until the events topic holds at least ``plans`` plans and ``results`` results of the
        workflow and the join has committed its offsets past every one of them. Counting final events
        after this cannot miss one that those events caused: it is committed, in the same transaction."""
        state = {}

        def handled() -> bool:
            state["events"] = events = self.events(workflow_id)
            kinds = Counter(kind for _p, _o, kind in events)
            if kinds["WorkflowPlan"] < plans or kinds["TaskResult"] < results:
                return False
            state["committed"] = committed = self.join_committed()
            return all(committed.get(p, -1) > offset for p, offset, _kind in events)

        assert wait_until(handled, timeout, interval=0.5), \
            f"the join did not handle the events of {workflow_id} within {timeout:.0f}s: {state}\n{self.logs()}"

    def open_ledger_rows(self) -> set[tuple[int, bytes]]:
        """(partition, key) of the tasks a resize worker has started and not finished, from the crash
        ledger (agents/crashes.py: a row at the start of a task, a tombstone at its end)."""
        rows = {}
        for msg in read_to_end(self.config, self.config.topics.task_attempts):
            rows[(msg.partition(), msg.key())] = msg.value()
        return {row for row, value in rows.items() if value is not None}

    # --- the end ---------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop every worker (SIGKILL if SIGTERM does not do), close the followers and the client.
        Safe to call twice."""
        errors = []
        for w in self.workers:  # all asked at once: each takes a second or two to leave its groups
            w.terminate()
        for w in self.workers:
            try:
                w.stop(timeout=15)
            except Exception as exc:  # stop the others all the same
                errors.append(f"{w.name}: {exc!r}")
        for f in self.followers:
            f.close()
        if self.client.producer is not None:
            self.client.close()
        if not any(w.alive() for w in self.workers):
            self._remove_join_locks()
        assert not errors, errors

    def _remove_join_locks(self) -> None:
        """A join takes a slot lock file named after its group (streams/join/session.py: instance_id) in a folder
        every join of the user shares; this pipeline's group is its own, so once its joins are gone,
        their files would only pile up."""
        group = self.config.group_id("join")
        folder = Path(tempfile.gettempdir()) / f"imagefork-locks-{os.getuid()}"
        for path in folder.glob("*.lock"):
            slot = path.name[len(group) + 1:-len(".lock")]
            if path.name.startswith(f"{group}-") and slot.isdigit():
                path.unlink(missing_ok=True)

    def logs(self) -> str:
        return "\n".join(f"--- {w.name}\n{w.log_tail(30)}" for w in self.workers)


def wait_until(predicate, timeout: float, interval: float = 0.2) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval)
    return False


def run_cli(env: dict[str, str], *argv: str) -> tuple[int, str, str]:
    """``imagefork ARGV`` in this process with ``env`` set; (exit code, stdout, stderr)."""
    import pytest
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(list(argv))
    return code, out.getvalue(), err.getvalue()
