"""The join's changelog: a compacted topic, one small row per plan, per task result and per
finished marker, written to the same partition number as the event that caused it.

Keys: ``P`` + workflow id (the plan), ``R`` + workflow id + ``NUL`` + task ref (one result),
``F`` + workflow id (the finished marker), ``C`` + workflow id (a cancel waiting for its plan). Plan and result rows hold the event's own bytes (an
Avro ``JoinEvent``), so the hot path writes what it read without encoding it again; a marker is
an Avro ``JoinMarker``. A ``None`` value is a tombstone.
"""
from __future__ import annotations

import time

from confluent_kafka import OFFSET_BEGINNING, Consumer, IsolationLevel, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from streams import segments, serde
from streams.core.join import CANCEL, MARKER, PLAN, RESULT, JoinState, Marker, Row, restore
from streams.core.models import Cancellation, TaskResult, WorkflowPlan

_PREFIX = {PLAN: b"P", RESULT: b"R", MARKER: b"F", CANCEL: b"C"}
_EVENT = {PLAN: "WorkflowPlan", RESULT: "TaskResult", CANCEL: "Cancellation"}


def row_key(row: Row) -> bytes:
    key = _PREFIX[row.kind] + row.workflowId.encode()
    return key + b"\x00" + row.taskRef.encode() if row.kind == RESULT else key


def row_value(row: Row, raw: bytes | None = None) -> bytes | None:
    """The row's bytes; ``raw`` is the event that carried ``row.value`` (written as it came)."""
    if row.value is None:
        return None
    if row.kind == MARKER:
        m = row.value
        return serde.encode("JoinMarker", {"status": m.status, "at": m.at, "runId": m.runId, "kept": list(m.kept)})
    if raw is not None:
        return raw
    return serde.encode_join_event(_EVENT[row.kind], row.value.to_dict())


def load_state(rows: dict[bytes, bytes], state: JoinState, now: int) -> None:
    """Fill ``state`` from the rows that survive (key -> last value)."""
    plans, results, markers, cancels = [], [], {}, []
    for key, value in rows.items():
        tag = key[:1]
        if tag == b"F":
            m = serde.decode("JoinMarker", value)
            markers[key[1:].decode()] = Marker(m["status"], m["at"], m.get("runId") or "", tuple(m.get("kept") or ()))
            continue
        kind, body, passed = segments.decode_join_event_passing(value)
        if tag == b"P" and kind == "WorkflowPlan":
            plans.append(WorkflowPlan.from_dict(body))
        elif tag == b"R" and kind == "TaskResult":
            results.append(TaskResult.from_dict(body, passed))
        elif tag == b"C" and kind == "Cancellation":
            cancels.append(Cancellation.from_dict(body))
    restore(state, plans, results, markers, now, cancels)


class ChangelogReader:
    """Reads changelog partitions from the start to their committed end (read_committed)."""

    def __init__(self, client_config: dict, topic: str, settle_s: float = 15.0):
        self.topic = topic
        self.settle_s = settle_s  # how long a transaction still open on a partition is waited for
        # the last read's waits, for its log line: seconds a previous owner's open transaction was waited
        # for, and end look-ups asked again (a leader moving)
        self.settled_s, self.lookups_retried = 0.0, 0
        self.client_config = client_config
        self.admin = AdminClient(client_config)
        self.consumer = Consumer({**client_config, "group.id": f"{topic}.restore", "enable.auto.commit": False,
                                  "isolation.level": "read_committed", "enable.partition.eof": True,
                                  "fetch.max.bytes": 64 * 1024 * 1024, "fetch.wait.max.ms": 10,
                                  "max.partition.fetch.bytes": 16 * 1024 * 1024})

    def read(self, partitions: list[int], timeout_s: float = 300.0) -> dict[int, dict[bytes, bytes]]:
        """The surviving rows per partition (a tombstone removes its key), read to the end."""
        rows: dict[int, dict[bytes, bytes]] = {p: {} for p in partitions}
        self.settled_s, self.lookups_retried = 0.0, 0
        if not partitions:
            return rows
        ends = self.settled_ends(partitions)
        pending = {p for p in partitions if ends[p] > 0}
        if not pending:
            return rows
        self.consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in pending])
        give_up = time.monotonic() + timeout_s
        try:
            while pending:
                if time.monotonic() > give_up:
                    raise TimeoutError(f"changelog {self.topic} partitions {sorted(pending)} not read "
                                       f"to their end within {timeout_s:.0f}s")
                batch = self.consumer.consume(10_000, timeout=0.1)
                for msg in batch:
                    err = msg.error()
                    p = msg.partition()
                    if err is not None:
                        if err.code() == KafkaError._PARTITION_EOF:
                            pending.discard(p)
                        continue
                    table = rows[p]
                    value = msg.value()
                    if value is None:
                        table.pop(msg.key(), None)
                    else:
                        table[msg.key()] = value
                    if msg.offset() + 1 >= ends[p]:
                        pending.discard(p)
                if not batch and pending:
                    # the last offsets may be transaction markers, which no message reports
                    for tp in self.consumer.position([TopicPartition(self.topic, p) for p in pending]):
                        if tp.offset >= ends[tp.partition]:
                            pending.discard(tp.partition)
        finally:
            self.consumer.unassign()
        return rows

    def settled_ends(self, partitions: list[int]) -> dict[int, int]:
        """The committed ends, once no transaction is open on these partitions any more (at most
        ``settle_s``). A previous owner's last transaction may have committed its consumed offsets before
        the broker wrote its marker here: read too early, its rows would be missing from the restored
        state although its offsets say they were applied. Only the partition's owner writes to it, so
        an open transaction is the previous owner's: it ends by committing, or by its timeout."""
        started, waited = time.monotonic(), False
        give_up = started + self.settle_s
        while True:
            committed = self.committed_ends(partitions)
            written = self.committed_ends(partitions, IsolationLevel.READ_UNCOMMITTED)
            open_ = [p for p in partitions if committed[p] < written[p]]
            if not open_ or time.monotonic() > give_up:
                self.settled_s = time.monotonic() - started if waited else 0.0
                return committed
            waited = True
            time.sleep(0.1)

    def committed_ends(self, partitions: list[int],
                       isolation: IsolationLevel = IsolationLevel.READ_COMMITTED) -> dict[int, int]:
        """The last stable offset of each partition: the end of what committed transactions wrote.
        (The high watermark would include the records of a transaction still open, which a
        read_committed reader can never pass until that transaction ends.)"""
        asked = {TopicPartition(self.topic, p): OffsetSpec.latest() for p in partitions}
        give_up = time.monotonic() + 60
        while True:
            try:
                futures = self.admin.list_offsets(asked, isolation_level=isolation, request_timeout=30)
                return {tp.partition: future.result().offset for tp, future in futures.items()}
            except KafkaException:  # leaders not known yet (a topic just made), or stale (a broker restarted:
                if time.monotonic() > give_up:  # FENCED_LEADER_EPOCH): ask again with a fresh client
                    raise
                self.lookups_retried += 1
                time.sleep(0.5)
                self.admin = AdminClient(self.client_config)

    def close(self) -> None:
        try:
            self.consumer.close()
        except Exception:  # closing a client that failed: nothing more to do
            pass
