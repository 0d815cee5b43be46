"""Join: a transactional read-process-write loop on confluent-kafka (the pattern of its EOS example).

It reads the events topic (plans and results) in batches and keeps the state of the partitions it
owns in memory (:class:`streams.core.join.JoinState`). **One Kafka transaction** at a time holds
the changelog rows (a compacted topic, written to the partition number of the event that caused
them), the final events, any dead letters and the consumed offsets; it commits as soon as it holds a
final event, else after the commit interval or a full batch. A crash anywhere
aborts the open transaction: the next owner of a partition restores its state from the changelog
as of the last committed transaction and resumes from the offsets committed in that same
transaction, so each workflow's final event is committed exactly once. Readers of the completed
topic use ``isolation.level=read_committed``.

Why not Faust here: faust-streaming 0.15's ``exactly_once`` duplicated final events and lost
results under the repeated-SIGKILL test (see the README), and its table rewrote a whole JSON state
per result (9-14 ms of CPU). This loop spends about 0.2 ms per result whatever the fan-out
(bench/join.py).
"""
from __future__ import annotations

import fcntl
import gc
import json
import os
import signal
import socket
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer, TopicPartition

from streams import serde
from streams.adapters.changelog import ChangelogReader, load_state, row_key, row_value
from streams.adapters.http import advertised_url, serve
from streams.adapters.kafka import MAX_MESSAGE_BYTES, client_config, partition_for, producer_config
from streams.adapters.objectstore import ObjectStore
from streams.agents.cleanup import SourceCleaner
from streams.agents.common import dead_letter_headers, log, now_ms
from streams.agents.repair import Repairer
from streams.config import Config
from streams.core.join import MARKER, Ignored, JoinState, Outcome, describe, open_summaries
from streams.core.models import FAILED, TaskError, TaskResult, WorkflowCompleted, WorkflowPlan
from streams.core.planning import staging_key
from streams.metrics import DEAD_LETTERS, MESSAGES, OPEN_WORKFLOWS, WORKFLOW_SECONDS, WORKFLOWS
from streams.serde import SerdeError


class ConsumerFailed(RuntimeError):
    """The consumer hit a fatal error: the join rejoins the group with a new one."""


class JoinFatal(RuntimeError):
    """The join cannot go on (fenced by another instance with the same transactional id, or the
    broker refused the transaction for good); the process exits and a supervisor restarts it."""


def bounded(what: str, call, timeout_s: float):
    """Run a blocking librdkafka call and give up on it ``timeout_s`` later, whether it returned or not.

    Its own timeout is not enough: ``send_offsets_to_transaction`` can wait forever for a group
    coordinator it lost across a broker restart (librdkafka #5456, #5511: the coordinator request's
    timeout is never checked; seen here as a join that stopped committing after the broker-restart
    test). The call runs in a helper thread; when it is late, :class:`StuckCall` is raised and the
    caller replaces the producer (a new one with the same transactional id fences the old one and aborts
    its transaction), leaving the helper thread blocked where it is."""
    done = threading.Event()
    box: dict = {}

    def target():
        try:
            box["result"] = call()
        except BaseException as exc:  # handed to the caller
            box["error"] = exc
        finally:
            done.set()

    threading.Thread(target=target, name=f"join {what}", daemon=True).start()
    if not done.wait(timeout_s):
        raise StuckCall(what, timeout_s)
    if "error" in box:
        raise box["error"]
    return box.get("result")


class StuckCall(KafkaException):
    """A librdkafka call that did not return in time (see :func:`bounded`): its producer is given up."""

    def __init__(self, what: str, timeout_s: float):
        super().__init__(KafkaError(KafkaError._TIMED_OUT, f"{what} did not return within {timeout_s:.0f}s",
                                    retriable=True))


def instance_id(config: Config) -> tuple[str, object | None]:
    """A stable transactional id suffix: ``IMAGEFORK_JOIN_INSTANCE``, else the host name and the first
    free slot on this host (a lock file), so a restarted join reuses its id and its predecessor's
    open transaction is aborted at once instead of after the transaction timeout."""
    if config.join_instance:
        return config.join_instance, None
    folder = Path(tempfile.gettempdir()) / f"imagefork-locks-{os.getuid()}"
    folder.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname() or "host"
    for slot in range(1024):
        handle = open(folder / f"{config.group_id('join')}-{slot}.lock", "w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            continue
        return f"{host}-{slot}", handle  # the lock lives as long as the handle (the process)
    raise JoinFatal("no free join slot on this host (1024 joins running?)")


class Txn:
    """The open transaction: what it holds besides the records already produced into it."""

    def __init__(self):
        self.close()

    def begin(self) -> None:
        self.open, self.since = True, time.monotonic()

    def close(self) -> None:
        self.open, self.since = False, 0.0
        self.offsets: dict[int, int] = {}  # next offset per events partition, committed with it
        self.after: list[tuple[str, str]] = []  # (workflow id, run id) whose staged source goes once committed
        self.events = 0
        self.finals = 0  # final events wait in it: commit at once
        self.finished: list[tuple[str, float]] = []  # (status, seconds) of its final events, counted once committed
        self.refused: list[tuple[str, bytes | None, KafkaError]] = []  # records the broker refused for good


# Errors a record meets again on every send (too large, not allowed, no such topic): a transaction holding it
# aborts each time. Counted per record; past IMAGEFORK_JOIN_MAX_ABORTS the record is degraded or left out.
REFUSALS = frozenset({
    KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE, KafkaError.INVALID_RECORD,
    KafkaError.POLICY_VIOLATION, KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.UNKNOWN_TOPIC_OR_PART,
    KafkaError._UNKNOWN_TOPIC, KafkaError._UNKNOWN_PARTITION,
})
TOO_LARGE = frozenset({KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE})


class JoinWorker:
    TICK_BUDGET = 2000  # timeouts and expiries per clock pass, at most; the rest on the next pass
    # a transactional call given CALL_TIMEOUT_S that has not returned after CALL_PATIENCE_S is stuck: after a
    # broker restart send_offsets_to_transaction waited out the whole patience (45 s then) before the first
    # workflow's final event was visible; a commit takes milliseconds, so seconds are patience enough (a
    # false alarm costs an abort and a replay, never a second final event)
    CALL_TIMEOUT_S = 8.0
    CALL_PATIENCE_S = 10.0

    def __init__(self, config: Config, url: str = ""):
        self.config = config
        self.url = url  # where the API asks this process about the workflows it owns (its client id says it)
        self.topics = config.topics
        # counted as read (an aborted transaction's events are read, and counted, again)
        self._processed = MESSAGES.labels("join", "processed")
        self._dead_lettered = MESSAGES.labels("join", "dead_lettered")
        self.timeout_ms = int(config.workflow_timeout_s * 1000)
        self.retention_ms = int(config.finished_retention_s * 1000)
        self.late_grace_ms = int(config.late_result_grace_s * 1000)
        self.instance, self._lock = instance_id(config)
        group = config.group_id("join")
        # No static membership (group.instance.id): it would hand a restarted join its partitions
        # without waiting out the dead one's session, but after a broker restart librdkafka fenced the
        # consumer against itself ("Static consumer fenced by other consumer with same
        # group.instance.id", a fatal error) in our broker-restart test.
        self.consumer_config = client_config(config, **{
            "group.id": group,
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "auto.offset.reset": "earliest",
            "partition.assignment.strategy": "cooperative-sticky",
            "session.timeout.ms": int(config.session_timeout_s * 1000),
            "heartbeat.interval.ms": max(500, int(config.session_timeout_s * 1000 / 5)),
            "fetch.wait.max.ms": 100,
            # the group's description (AdminClient) names each member's client id: the API finds the
            # owner of a workflow's partition there, and asks it at this URL
            **({"client.id": f"{CLIENT_ID} {url}"} if url else {}),
        })
        self.consumer = Consumer(self.consumer_config)
        self.producer_config = producer_config(config, **{
            "transactional.id": f"{group}-{self.instance}",
            "transaction.timeout.ms": int(config.transaction_timeout_s * 1000),
            "acks": "all",
            "linger.ms": 2,
            # a 1,000-wide final event is some 300 KB: compressed batches, and room for long ids and URLs
            "compression.type": "lz4",
            "message.max.bytes": MAX_MESSAGE_BYTES,
            # only a failed delivery calls back (into Python): the records the broker refuses
            "delivery.report.only.error": True,
            "on_delivery": self._delivered,
        })
        self.producer = Producer(self.producer_config)
        self._retired: list[Producer] = []
        self._stuck: set[int] = set()  # ids of retired producers with a call that never returned
        self.reader = ChangelogReader(client_config(config), self.topics.join_state,
                                      settle_s=config.transaction_timeout_s + 5)
        self.store = ObjectStore(config)
        self.repair = Repairer(config, self.store)
        self.cleanup = SourceCleaner(self.store)
        self.states: dict[int, JoinState] = {}
        # held while the loop changes the states, and by a query (from the HTTP thread) while it reads them
        self.lock = threading.RLock()
        self.partition_count = 0
        self.txn = Txn()
        self.positions: dict[int, int] = {}  # next offset to read, per owned partition
        # per owned partition: the end offset it had when it was assigned (or restored); its clock waits
        # until the join has read that far, so no deadline is judged on a backlog not read yet
        self.catchup: dict[int, int] = {}
        # (topic, key) -> (aborted transactions it was refused in, the last refusal); cleared by a commit
        self.refusals: dict[tuple[str, bytes | None], tuple[int, KafkaError]] = {}
        self.aborts_in_a_row = 0
        self.stopping = False
        self.ready = False
        self.stats = {"events": 0, "finals": 0, "transactions": 0, "aborts": 0}

    # --- partitions come and go ------------------------------------------------------------
    def _assigned(self, consumer, partitions) -> None:
        parts = [tp.partition for tp in partitions]
        if parts and self.txn.open:
            self._commit()  # what was handled for the partitions we keep, before the new ones are read
        if parts:
            # committed() waits for a transaction that is still committing offsets to these partitions
            # (require_stable), so the changelog read next is at least as new as the offsets we resume at
            try:
                committed = consumer.committed(partitions, timeout=max(60.0, 3 * self.config.transaction_timeout_s))
                self._restore(parts)
                self._set_catchup(parts)
            except (KafkaException, TimeoutError) as exc:
                raise ConsumerFailed(f"restoring partitions {parts} failed: {exc}") from None
            for tp in committed:
                self.positions[tp.partition] = tp.offset if tp.offset >= 0 else 0
        if not self.ready or parts:
            log.info("imagefork ready: join (%d partitions assigned: %s %d, added %s)", len(self.states),
                     self.topics.events, len(self.states), sorted(parts))
        self.ready = True

    def _revoked(self, consumer, partitions) -> None:
        # called from inside poll(), still in the old generation: what was handled so far is committed
        # now, before the partitions go (their next owner resumes from these offsets)
        if self.txn.open:
            self._commit()
        self._drop(partitions)
        if partitions:
            log.info("join: %d partitions revoked, %d kept", len(partitions), len(self.states))

    def _lost(self, consumer, partitions) -> None:
        # the partitions were taken while we could not answer: the open transaction cannot commit (its
        # generation is gone); abort it and rebuild what we keep from the committed state
        self._drop(partitions)
        log.warning("join: %d partitions lost", len(partitions))
        if self.txn.open:
            self._abort(KafkaError(KafkaError._FAIL, "partitions lost"))

    def _drop(self, partitions) -> None:
        with self.lock:
            for tp in partitions:
                self.states.pop(tp.partition, None)
                self.positions.pop(tp.partition, None)
                self.catchup.pop(tp.partition, None)

    def _set_catchup(self, parts: list[int]) -> None:
        """Take each partition's end offset now: its clock starts once the join has read up to it."""
        for p in parts:
            tp = TopicPartition(self.topics.events, p)
            try:
                _low, high = self.consumer.get_watermark_offsets(tp, timeout=30)
            except KafkaException:  # the broker away (an abort across its restart): the last end we heard of
                _low, high = self.consumer.get_watermark_offsets(tp, cached=True)
            if high is not None and high >= 0:
                self.catchup[p] = high

    def _clock_ready(self, p: int) -> bool:
        """Whether partition ``p``'s clock may run: the join has read its backlog, as of its assignment."""
        target = self.catchup.get(p)
        if target is None:
            return True
        read = self.txn.offsets.get(p, self.positions.get(p, 0))
        if read < target:
            # the consumer's position also passes what no message stands for (transaction markers, aborted
            # records); everything it returned up to it is in the batch applied before this clock pass
            fetched = self.consumer.position([TopicPartition(self.topics.events, p)])[0].offset
            if fetched < target:
                return False
        del self.catchup[p]
        log.info("join: partition %d caught up (offset %d): its clock runs", p, target)
        return True

    def _restore(self, parts: list[int]) -> None:
        started = time.monotonic()
        rows = self.reader.read(parts)
        now = now_ms()
        count = 0
        for p in parts:
            state = JoinState(default_timeout_ms=self.timeout_ms, retention_ms=self.retention_ms,
                              late_grace_ms=self.late_grace_ms)
            load_state(rows[p], state, now)
            with self.lock:
                self.states[p] = state
            count += len(state.open) + len(state.finished)
        # The state's big containers (a million markers, their expiry queue) go to the collector's
        # permanent generation: full collections no longer walk them (a 100-500 ms pause each, measured
        # in bench/join.py). Reference counting still frees them when a partition is revoked.
        gc.collect()
        gc.freeze()
        log.info("join: restored %d partitions (%d workflows) in %.2fs", len(parts), count,
                 time.monotonic() - started)

    # --- the loop ------------------------------------------------------------------------------
    def run(self) -> int:
        self._check_partitions()
        self._init_transactions()
        self._subscribe()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._stop)
        last_repair = 0.0
        try:
            while not self.stopping:
                try:
                    self._step()
                except ConsumerFailed as exc:
                    self._rejoin(str(exc))
                mono = time.monotonic()
                if mono - last_repair >= 1.0:
                    last_repair = mono
                    self._consider_repairs()
            if self.txn.open:
                self._commit()
        finally:
            self._close()
        return 0

    def _stop(self, *_):
        self.stopping = True

    def _subscribe(self) -> None:
        self.consumer.subscribe([self.topics.events], on_assign=self._assigned, on_revoke=self._revoked,
                                on_lost=self._lost)

    def _step(self) -> None:
        """One turn: read what is there, apply it, commit when it is time."""
        interval = self.config.join_commit_interval_ms / 1000
        txn = self.txn
        wait = 0.2 if not txn.open else max(0.0, txn.since + interval - time.monotonic())
        batch = self._fetch(wait)
        now = now_ms()
        due = any((t := s.next_due()) is not None and t <= now and self._clock_ready(p)
                  for p, s in self.states.items())
        repaired = self.repair.take()
        if batch or repaired or due:
            # a final event is committed before the lock goes: a query never sees a finish that may roll back
            with self.lock:
                self._process(batch, repaired, due)
                if txn.open and txn.finals:
                    self._commit()
        if txn.open and (txn.finals or txn.events >= self.config.join_batch
                         or time.monotonic() - txn.since >= interval):
            self._commit()

    def _rejoin(self, reason: str) -> None:
        """The consumer failed for good (a fatal error): drop the open transaction and every partition's
        state, and join the group again with a new consumer (the partitions come back restored)."""
        log.warning("join: the consumer failed (%s); joining the group again", reason)
        self._drop_transaction()
        with self.lock:
            self.states.clear()
            self.positions.clear()
        try:
            self.consumer.close()
        except Exception as exc:  # it is broken already
            log.debug("join: closing the failed consumer: %s", exc)
        self.consumer = Consumer(self.consumer_config)
        self.reader.close()
        self.reader = ChangelogReader(client_config(self.config), self.topics.join_state,
                                      settle_s=self.config.transaction_timeout_s + 5)
        self._subscribe()

    def _drop_transaction(self) -> None:
        """Forget the open transaction. Not abort_transaction(): after a broker restart it could hang;
        a new producer with the same transactional id makes the broker abort it (epoch bump), always."""
        if self.txn.open:
            self.txn.close()
            self._new_producer("the open transaction is dropped")

    def _new_producer(self, reason: str) -> None:
        """Replace a producer stuck in a transaction (e.g. across a broker restart): the new one takes
        the same transactional id, which aborts whatever the old one left open."""
        log.info("join: %s; starting a new transactional producer", reason)
        old, self.producer = self.producer, Producer(self.producer_config)
        if id(old) not in self._stuck:  # a stuck one may be inside a call: leave it alone
            try:
                old.purge()
            except Exception:  # it is broken already
                pass
        # kept, not destroyed: destroying a producer with a transactional request in flight can block
        # (this happens rarely: a crash-free join replaces its producer only around broker failures)
        self._retired.append(old)
        self._init_transactions()

    def _init_transactions(self, patience_s: float = 300.0) -> None:
        """Register the transactional id (fencing any other producer with it), again with a new
        producer while the broker is away or the call does not return."""
        give_up = time.monotonic() + patience_s
        while True:
            producer = self.producer
            try:
                bounded("init_transactions", lambda: producer.init_transactions(60), 90)
                return
            except StuckCall as exc:
                self._stuck.add(id(producer))
                self._retired.append(producer)
                self.producer = Producer(self.producer_config)
                log.warning("join: %s; starting a new transactional producer", exc.args[0].str())
                if time.monotonic() > give_up:
                    raise JoinFatal(f"no transactional producer: {exc.args[0]}") from None
            except KafkaException as exc:
                if exc.args[0].fatal() or time.monotonic() > give_up:
                    raise JoinFatal(f"no transactional producer: {exc.args[0]}") from None
                time.sleep(1.0)

    def _retrying(self, what: str, call, patience_s: float = 30.0):
        """Run a Kafka call, again while it fails with a retriable error (a broker away)."""
        give_up = time.monotonic() + patience_s
        delay = 0.2
        while True:
            try:
                return call()
            except KafkaException as exc:
                err = exc.args[0]
                if err.fatal():
                    raise JoinFatal(f"cannot {what}: {err}") from None
                if not err.retriable() or err.txn_requires_abort() or time.monotonic() > give_up:
                    raise
                log.warning("join: could not %s (%s); retrying in %.1fs", what, err, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _fetch(self, timeout: float) -> list:
        first = self.consumer.poll(timeout)
        if first is None:
            return []
        rest = self.consumer.consume(self.config.join_batch - 1, timeout=0) if self.config.join_batch > 1 else []
        batch = [first, *rest]
        for msg in batch:
            err = msg.error()
            if err is not None and err.fatal():
                raise ConsumerFailed(str(err))
        return batch

    def _process(self, batch: list, repaired: list, tick: bool) -> None:
        """Apply a batch, repaired results and the clock's outcomes inside the open transaction (one is
        begun if none is open): state rows, final events, dead letters, and the batch's offsets."""
        with self.lock:
            self._process_locked(batch, repaired, tick)

    def _process_locked(self, batch: list, repaired: list, tick: bool) -> None:
        txn = self.txn
        now = now_ms()
        try:
            if not txn.open:
                self.producer.begin_transaction()
                txn.begin()
            for msg in batch:
                p = msg.partition()
                if msg.error() is not None:
                    log.warning("join: consumer error: %s", msg.error())
                    continue
                state = self.states.get(p)
                if state is None:
                    continue  # not ours any more: its new owner reads it from the committed offset
                self._handle(p, state, msg, now, txn.after)
                txn.offsets[p] = msg.offset() + 1
                txn.events += 1
            for p, results in repaired:
                state = self.states.get(p)
                for result in results if state is not None else ():
                    self._apply(p, state.record_result(result, now), None, None, txn.after)
            if tick:
                budget = self.TICK_BUDGET  # shared by the partitions: one pass stays short
                for p, state in self.states.items():
                    if not self._clock_ready(p):
                        continue
                    for outcome in state.due(now, limit=max(1, budget)):
                        self._apply(p, outcome, None, None, txn.after)
                        budget -= 1
        except KafkaException as exc:
            self._abort(exc.args[0])
        except Exception as exc:  # a bug in this loop: nothing of the transaction is committed; start again
            log.exception("join: batch failed")
            self._abort(KafkaError(KafkaError._FAIL, f"{type(exc).__name__}: {exc}"))
            time.sleep(1.0)

    def _commit(self) -> bool:
        """Commit the open transaction with its offsets (retrying while the broker is away); when it
        cannot commit, abort it and restore."""
        txn = self.txn
        try:
            # Every transaction carries the offsets of every partition we own, with the group's metadata,
            # even one with nothing read (a clock pass, a repaired result): the broker then checks our
            # generation (KIP-447), so a join that was frozen while its partitions moved on is fenced
            # here, before its final events or changelog rows can be committed beside the new owner's.
            offsets = {p: o for p, o in self.positions.items() if p in self.states}
            offsets.update(txn.offsets)
            if offsets:
                tps = [TopicPartition(self.topics.events, p, o) for p, o in offsets.items()]
                try:
                    group = self.consumer.consumer_group_metadata()
                except KafkaException as exc:
                    raise ConsumerFailed(str(exc)) from None
                if not self.consumer.memberid():
                    # out of the group already (the lost-partitions callback has not run yet): committing
                    # now would bypass the generation check
                    raise KafkaException(KafkaError(KafkaError._STATE, "not a member of the join group"))
                # one attempt each: a call retried after a time-out could block far past its own timeout
                # (seen across a broker restart); a failed commit aborts through a new producer instead
                producer = self.producer
                bounded("send_offsets_to_transaction",
                        lambda: producer.send_offsets_to_transaction(tps, group, self.CALL_TIMEOUT_S),
                        self.CALL_PATIENCE_S)
            producer = self.producer
            bounded("commit_transaction", lambda: producer.commit_transaction(self.CALL_TIMEOUT_S),
                    self.CALL_PATIENCE_S)
        except KafkaException as exc:
            if isinstance(exc, StuckCall):
                self._stuck.add(id(self.producer))
                log.warning("join: %s; giving its producer up", exc.args[0].str())
            self._abort(exc.args[0])
            return False
        self.stats["transactions"] += 1
        self.stats["events"] += txn.events
        self.refusals.clear()
        self.aborts_in_a_row = 0
        self.positions.update(txn.offsets)
        for status, seconds in txn.finished:
            WORKFLOWS.labels(status).inc()
            WORKFLOW_SECONDS.labels(status).observe(seconds)
        OPEN_WORKFLOWS.set(sum(len(s.open) for s in list(self.states.values())))
        for workflow_id, run_id in txn.after:
            self.cleanup.delete(staging_key(self.config.staging_prefix, workflow_id, run_id))
        txn.close()
        return True

    def _handle(self, p: int, state: JoinState, msg, now: int, after: list) -> None:
        raw = msg.value()
        try:
            kind, body = serde.decode_join_event(raw if raw is not None else b"")
            if msg.key() != body["workflowId"].encode():
                raise SerdeError(f"the key {msg.key()!r} is not the workflow id {body['workflowId']!r} "
                                 "(the join's state is partitioned by workflow id)")
        except SerdeError as exc:
            return self._dead_letter(msg, "NOT_A_JOIN_EVENT", str(exc))
        self._processed.inc()
        if kind not in ("WorkflowPlan", "TaskResult"):
            return  # DeadlineCheck: the clock is internal now; older producers' ticks change nothing
        try:
            if kind == "WorkflowPlan":
                record = WorkflowPlan.from_dict(body)
                outcome = state.record_plan(record, now)
            else:
                record = TaskResult.from_dict(body)
                outcome = state.record_result(record, now)
        except Exception as exc:  # a bug must not stop the partition: park the event with the reason
            log.exception("join failed on %s", body.get("workflowId"))
            return self._dead_letter(msg, "INTERNAL", f"{type(exc).__name__}: {exc}")
        if outcome.late:
            return self._dead_letter(msg, "LATE_RESULT", (
                f"a result of task {record.taskRef} for workflow {record.workflowId}, which the join does not know: "
                f"its deadline passed {(now - record.deadline) / 1000:.0f}s ago, past the "
                f"{self.late_grace_ms / 1000:.0f}s grace (its workflow finished long ago, or was never planned)"))
        self._apply(p, outcome, record, raw, after)

    def _apply(self, p: int, outcome: Outcome, record, raw: bytes | None, after: list) -> None:
        produce = self._produce
        topic = self.topics.join_state
        for row in outcome.rows:
            produce(topic, row_key(row), row_value(row, raw if row.value is record else None), p)
        final = outcome.final
        if final is not None:
            self._emit(final)
            if final.taskCount and not final.fileLocation.startswith("s3://"):  # its source was staged
                run_id = next((r.value.runId for r in outcome.rows if r.kind == MARKER and r.value), "")
                after.append((final.workflowId, run_id))
        if outcome.discarded is not None:
            after.append(outcome.discarded)
        if outcome.notice is not None:
            self._notify(outcome.notice)

    def _emit(self, final: WorkflowCompleted) -> None:
        key = final.workflowId.encode()
        tries, err = self.refusals.get((self.topics.completed, key), (0, None))
        if tries >= 2 * self.config.join_max_aborts:
            # the degraded event was refused as often: the topic takes nothing from us (an ACL, a deleted
            # topic). The workflow ends here without its final event, said loudly, not in an endless loop.
            log.error("join: the final event of %s was refused %d times (%s); the workflow ends %s without it",
                      final.workflowId, tries, err, final.status)
            DEAD_LETTERS.labels("join", "FINAL_UNDELIVERABLE").inc()
            return
        if tries >= self.config.join_max_aborts:
            final = degraded(final, err)
            log.error("join: the final event of %s was refused %d times (%s); sending it %s %s without its "
                      "outputs", final.workflowId, tries, err, final.status, final.errors[0].code)
        self._produce(self.topics.completed, key, serde.encode("WorkflowCompleted", final.to_dict()))
        mirror = self.config.completed_json_topic
        if mirror and not self._given_up(mirror, key, f"the JSON mirror of {final.workflowId}'s final event"):
            self._produce(mirror, key, json.dumps(final.document(), separators=(",", ":")).encode())
        self.stats["finals"] += 1
        self.txn.finals += 1
        self.txn.finished.append((final.status, max(0.0, (final.completedAt - final.submittedAt) / 1000)))
        log.info("workflow %s %s: %d of %d outputs", final.workflowId, final.status,
                 len(final.outputs), final.taskCount)

    def _notify(self, ignored: Ignored) -> None:
        """Tell a resubmission's submitter at once that its run is not taken (clients read the notices
        topic beside the completed one): no second final event, no silent wait."""
        taken = ignored.taken
        if self._given_up(self.topics.notices, ignored.workflowId.encode(), "notice"):
            return
        self._produce(self.topics.notices, ignored.workflowId.encode(), serde.encode("RunIgnored", {
            "workflowId": ignored.workflowId, "runId": ignored.runId, "reason": ignored.reason,
            "takenRunId": taken.runId, "takenStatus": taken.status, "takenFinishedAt": taken.at,
            "at": now_ms()}))
        log.info("workflow %s: run %s not taken (the id's run %s is %s)", ignored.workflowId, ignored.runId,
                 taken.runId, taken.status if ignored.reason == "finished" else "still running")

    def _dead_letter(self, msg, code: str, reason: str) -> None:
        where = {"topic": msg.topic(), "partition": str(msg.partition()), "offset": str(msg.offset())}
        if self._given_up(self.topics.dead_letter, msg.key(), f"dead letter ({code}: {reason}) of {where}"):
            return
        log.warning("join: dead-lettered %s: %s", where, reason)
        headers = [*(msg.headers() or []), *dead_letter_headers(code, reason, where).items(),
                   ("imagefork.attempts", b"1"), ("imagefork.agent", b"join")]
        self._produce(self.topics.dead_letter, msg.key(), msg.value(), None, headers)
        DEAD_LETTERS.labels("join", code).inc()
        self._dead_lettered.inc()

    def _produce(self, topic: str, key: bytes | None, value: bytes | None, partition: int | None = None,
                 headers=None) -> None:
        kwargs = {"key": key, "value": value}
        if partition is not None:
            kwargs["partition"] = partition
        if headers:
            kwargs["headers"] = headers
        while True:
            try:
                self.producer.produce(topic, **kwargs)
                return
            except BufferError:  # the local queue is full: let deliveries drain
                self.producer.poll(0.05)
            except KafkaException as exc:  # refused before it left (say, over message.max.bytes)
                if exc.args[0].code() in REFUSALS:
                    self.txn.refused.append((topic, key, exc.args[0]))
                raise

    def _delivered(self, err, msg) -> None:
        """A record the broker did not take (the producer reports only those)."""
        if err is not None and err.code() in REFUSALS:
            self.txn.refused.append((msg.topic(), msg.key(), err))

    def _given_up(self, topic: str, key: bytes | None, what: str) -> bool:
        """Whether a record for ``topic`` and ``key`` was refused in enough aborted transactions to be left
        out (a notice or a dead letter: the partition must go on)."""
        tries, err = self.refusals.get((topic, key), (0, None))
        if tries < self.config.join_max_aborts:
            return False
        log.error("join: %s refused %d times by %s (%s): left out", what, tries, topic, err)
        return True

    def _abort(self, err: KafkaError) -> None:
        """The transaction cannot commit: abort it and rebuild the owned partitions from what is
        committed (the in-memory state ran ahead of it)."""
        if err.fatal():
            raise JoinFatal(f"join transaction failed for good: {err}") from None
        self.stats["aborts"] += 1
        self.aborts_in_a_row += 1
        staged = list(self.txn.after)  # its commit may have gone through all the same (a call that timed out)
        if id(self.producer) not in self._stuck:
            self.producer.poll(0)  # the refused records' delivery reports, if the commit left them unserved
        for topic, key, refusal in self.txn.refused:
            tries = self.refusals.get((topic, key), (0, None))[0]
            self.refusals[(topic, key)] = (tries + 1, refusal)
        refused = {f"{topic}:{key!r}: {refusal.name()}" for topic, key, refusal in self.txn.refused}
        log.warning("join: transaction aborted (%s%s); restoring from the changelog", err,
                    f"; refused: {', '.join(sorted(refused))}" if refused else "")
        self._drop_transaction()
        if self.aborts_in_a_row > 1:  # the same failure again: no hot loop of restores
            time.sleep(min(5.0, 0.2 * 2 ** min(self.aborts_in_a_row, 5)))
        parts = sorted(self.states)
        if not parts:
            return
        with self.lock:
            self.states.clear()
        tps = [TopicPartition(self.topics.events, p) for p in parts]
        try:
            committed = self._retrying("read the committed offsets", lambda: self.consumer.committed(tps, timeout=60))
        except KafkaException as exc:
            raise ConsumerFailed(str(exc)) from None
        self._restore(parts)
        self._delete_finished_staging(staged)
        try:
            self._set_catchup(parts)
            for tp in committed:
                offset = tp.offset if tp.offset >= 0 else OFFSET_BEGINNING
                self.consumer.seek(TopicPartition(self.topics.events, tp.partition, offset))
                self.positions[tp.partition] = max(0, tp.offset)
        except KafkaException as exc:  # cannot rewind: start over with fresh assignments
            raise ConsumerFailed(f"rewinding to the committed offsets failed: {exc}") from None

    def _delete_finished_staging(self, staged: list[tuple[str, str]]) -> None:
        """The staged sources of runs that the restored (committed) state shows finished: their finish was
        committed after all, and no replay will finish them again to delete their sources."""
        for workflow_id, run_id in staged:
            state = self.states.get(partition_for(workflow_id.encode(), self.partition_count))
            marker = state.marker(workflow_id) if state is not None else None
            if marker is not None and marker.runId == run_id:
                self.cleanup.delete(staging_key(self.config.staging_prefix, workflow_id, run_id))

    # --- repair --------------------------------------------------------------------------------
    def _consider_repairs(self) -> None:
        now = now_ms()
        after_ms = self.repair.after_ms
        for p, state in self.states.items():
            if not self._caught_up(p):
                continue  # results may still be on their way in this partition
            stalled = state.stalled(now, after_ms)
            if stalled:
                self.repair.consider(p, stalled)
        self.repair.forget({wf for s in self.states.values() for wf in s.open})

    def _caught_up(self, p: int) -> bool:
        _low, high = self.consumer.get_watermark_offsets(TopicPartition(self.topics.events, p), cached=True)
        return high is not None and high >= 0 and self.positions.get(p, -1) >= high

    # --- queries (from the HTTP thread) ----------------------------------------------------------
    QUERY_PATIENCE_S = 1.0  # a query waits this long at most for a batch and its commit (it runs on the HTTP loop)

    def query(self, workflow_id: str) -> tuple[int, dict]:
        """What the state says of one workflow, if its partition is this process's (else 409: ask its
        owner), as of the last batch applied. Finishes are answered once committed (the batch that makes
        one holds the lock until its transaction commits); progress may be ahead of the last commit."""
        if not self.ready or not self.partition_count:
            return 503, {"error": "NOT_READY", "message": "the join is starting"}
        p = partition_for(workflow_id.encode(), self.partition_count)
        if not self.lock.acquire(timeout=self.QUERY_PATIENCE_S):
            return 503, {"error": "BUSY", "message": "the join is committing a batch; ask again"}
        try:
            state = self.states.get(p)
            if state is None:
                return 409, {"error": "NOT_OWNER", "message": f"partition {p} is not this join's",
                             "owned": False, "partition": p}
            return 200, {"owned": True, "partition": p, **describe(state, workflow_id)}
        finally:
            self.lock.release()

    def open_workflows(self, limit: int) -> dict | None:
        """The open workflows of this process's partitions, or None while a batch commits past the patience."""
        if not self.lock.acquire(timeout=self.QUERY_PATIENCE_S):
            return None
        try:
            return {"partitions": sorted(self.states),
                    "workflows": open_summaries(list(self.states.values()), limit)}
        finally:
            self.lock.release()

    def readiness(self) -> tuple[bool, str]:
        if not self.ready:
            return False, "joining its consumer group and restoring its partitions"
        return True, f"{len(self.states)} partitions of {self.topics.events} restored: {sorted(self.states)}"

    # --- around --------------------------------------------------------------------------------
    def _check_partitions(self, patience_s: float = 30.0) -> None:
        """The events and state topics exist (a topic just created may take a moment to show in the
        metadata) and the state topic has a partition for every events partition."""
        give_up = time.monotonic() + patience_s
        while True:
            meta = self.consumer.list_topics(timeout=30).topics
            events, state = meta.get(self.topics.events), meta.get(self.topics.join_state)
            if events and state and not events.error and not state.error and events.partitions:
                break
            if time.monotonic() > give_up:
                raise JoinFatal(f"topics {self.topics.events} and {self.topics.join_state} must exist "
                                "(run `imagefork topics`)")
            time.sleep(0.5)
        self.partition_count = len(events.partitions)
        if len(state.partitions) < len(events.partitions):
            raise JoinFatal(f"{self.topics.join_state} has {len(state.partitions)} partitions but "
                            f"{self.topics.events} has {len(events.partitions)}: they must match")

    def _close(self) -> None:
        log.info("join: stopping after %(events)d events, %(finals)d final events, %(transactions)d "
                 "transactions, %(aborts)d aborted", self.stats)
        try:
            self.consumer.close()  # leaves the group: the partitions move at once
        except KafkaException as exc:
            log.warning("join: closing the consumer: %s", exc)
        self.producer.flush(10)
        self.reader.close()
        self.repair.close()
        self.cleanup.close()


def degraded(final: WorkflowCompleted, err: KafkaError | None) -> WorkflowCompleted:
    """The final event the completed topic refused, made as small as it can be: FAILED with one error
    saying why, without the per-output list and the request (the outputs stay in the bucket)."""
    too_large = err is not None and err.code() in TOO_LARGE
    code = "FINAL_TOO_LARGE" if too_large else "FINAL_REFUSED"
    message = (f"the final event ({final.status}, {len(final.outputs)} of {final.taskCount} outputs) was refused by "
               f"the completed topic: {err.str() if err is not None else 'unknown error'}; sent without its outputs")
    return replace(final, status=FAILED, fileLocations=(), outputs=(), request="",
                   errors=(TaskError(taskRef="", code=code, message=message[:1000]),))


CLIENT_ID = "imagefork-join"


def query_routes(box: dict) -> list:
    """The join's own HTTP routes (``box["worker"]`` answers once it exists): the API's interactive
    queries, answered from the partitions this process owns."""
    from aiohttp import web

    def worker():
        return box.get("worker")

    async def one(request):
        w = worker()
        if w is None:
            return web.json_response({"error": "NOT_READY", "message": "the join is starting"}, status=503)
        status, body = w.query(request.match_info["id"])
        return web.json_response(body, status=status)

    async def listing(request):
        w = worker()
        if w is None:
            return web.json_response({"error": "NOT_READY", "message": "the join is starting"}, status=503)
        try:
            limit = max(1, min(1000, int(request.query.get("limit", "100"))))
        except ValueError:
            limit = 100
        listing = w.open_workflows(limit)
        if listing is None:
            return web.json_response({"error": "BUSY", "message": "the join is committing a batch; ask again"},
                                     status=503)
        return web.json_response(listing)

    return [web.get("/internal/workflows/{id}", one), web.get("/internal/open", listing)]


def run(config: Config) -> int:
    box: dict = {}

    def readiness() -> tuple[bool, str]:
        w = box.get("worker")
        return w.readiness() if w is not None else (False, "starting")

    # always served (the API routes its queries here), on a free loopback port unless configured
    server = serve(config, "join", readiness, query_routes(box), default_listen="127.0.0.1:0")
    worker = JoinWorker(config, url=advertised_url(server.host, server.port, config.advertised_url))
    box["worker"] = worker
    try:
        return worker.run()
    except JoinFatal as exc:
        log.error("join: %s", exc)
        return 2
    except (KafkaException, TimeoutError) as exc:  # e.g. the state could not be restored: start again later
        log.error("join: stopped: %s: %s", type(exc).__name__, exc)
        return 3


