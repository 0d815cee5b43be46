"""The join's transactional session: the producer and its fencing, the checkpoint of the open transaction
(the offsets it commits and what runs once it is committed), and the records the broker refuses."""
from __future__ import annotations

import fcntl
import logging
import os
import queue
import socket
import tempfile
import threading
import time
from pathlib import Path

from confluent_kafka import KafkaError, KafkaException, Producer, TopicPartition

from streams.adapters.kafka import MAX_MESSAGE_BYTES, producer_config
from streams.config import Config

log = logging.getLogger("imagefork")

# Errors a record meets again on every send (too large, not allowed, no such topic): a transaction holding it
# aborts each time. Counted per record; past IMAGEFORK_JOIN_MAX_ABORTS the record is degraded or left out.
REFUSALS = frozenset({
    KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE, KafkaError.INVALID_RECORD,
    KafkaError.POLICY_VIOLATION, KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.UNKNOWN_TOPIC_OR_PART,
    KafkaError._UNKNOWN_TOPIC, KafkaError._UNKNOWN_PARTITION,
})
TOO_LARGE = frozenset({KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE})


class JoinFatal(RuntimeError):
    """The join cannot go on (fenced by another instance with the same transactional id, or the
    broker refused the transaction for good); the process exits and a supervisor restarts it."""


class StuckCall(KafkaException):
    """A librdkafka call that did not return in time (see :func:`bounded`): its producer is given up."""

    def __init__(self, what: str, timeout_s: float):
        super().__init__(KafkaError(KafkaError._TIMED_OUT, f"{what} did not return within {timeout_s:.0f}s",
                                    retriable=True))


class _Caller:
    """One helper thread that runs calls handed to it, one at a time (a thread started per call cost 250 µs of
    CPU, twice per transaction). A call that is late leaves its thread to it: the next call gets a new one."""

    def __init__(self):
        self.calls: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._serve, name="join librdkafka calls", daemon=True).start()

    def _serve(self) -> None:
        while True:
            call, done, box = self.calls.get()
            try:
                box["result"] = call()
            except BaseException as exc:  # handed to the caller
                box["error"] = exc
            finally:
                done.set()


_caller: _Caller | None = None
_caller_lock = threading.Lock()


def bounded(what: str, call, timeout_s: float):
    """Run a blocking librdkafka call and give up on it ``timeout_s`` later, whether it returned or not.

    ``send_offsets_to_transaction`` can wait forever for a group coordinator it lost across a broker
    restart (librdkafka #5456, #5511). The call runs in a helper thread; when it is late, :class:`StuckCall`
    is raised and the caller replaces the producer (the same transactional id fences the old one)."""
    global _caller
    with _caller_lock:
        caller = _caller = _caller or _Caller()
    done = threading.Event()
    box: dict = {}
    caller.calls.put((call, done, box))
    if not done.wait(timeout_s):
        with _caller_lock:
            if _caller is caller:  # its thread is inside the late call: the next call gets a thread of its own
                _caller = None
        raise StuckCall(what, timeout_s)
    if "error" in box:
        raise box["error"]
    return box.get("result")


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


def retrying(what: str, call, patience_s: float = 30.0):
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


class Checkpoint:
    """The open transaction: what it holds besides the records already produced into it."""

    def __init__(self):
        self.close()

    def begin(self) -> None:
        self.open, self.since = True, time.monotonic()

    def close(self) -> None:
        self.open, self.since = False, 0.0
        self.offsets: dict[int, int] = {}  # next offset per events partition, committed with it
        self.after: list[tuple[str, str]] = []  # (workflow id, run id) whose staged source goes once committed
        self.orphans: list[tuple[str, str, str]] = []  # (uri, workflow, run): outputs made after a cancel's final
        self.sweeps: list[tuple[str, str, frozenset[str]]] = []  # (workflow, run, URIs listed) of cancelled runs
        self.events = 0
        self.finals = 0  # final events wait in it: commit at once
        self.finished: list[tuple[str, float]] = []  # (status, seconds) of its final events, counted once committed
        self.refused: list[tuple[str, bytes | None, KafkaError]] = []  # records the broker refused for good


class Session:
    """One transactional producer at a time (a new one with the same id when the old one is stuck or its
    transaction must go) and the checkpoint of its open transaction."""

    # a transactional call given CALL_TIMEOUT_S that has not returned after CALL_PATIENCE_S is stuck: a commit
    # takes milliseconds, so seconds are patience enough (a false alarm costs an abort and a replay, never a
    # second final event)
    CALL_TIMEOUT_S = 8.0
    CALL_PATIENCE_S = 10.0

    def __init__(self, config: Config, transactional_id: str):
        self.config = config
        self.producer_config = producer_config(config, **{
            "transactional.id": transactional_id,
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
        self._retired: list[Producer] = []  # kept: destroying one with a request in flight can block
        self._stuck: set[int] = set()  # ids of retired producers with a call that never returned
        self.txn = Checkpoint()
        # (topic, key) -> (aborted transactions it was refused in, the last refusal); cleared by a commit
        self.refusals: dict[tuple[str, bytes | None], tuple[int, KafkaError]] = {}
        self.aborts_in_a_row = 0

    # --- the producer --------------------------------------------------------------------------
    def init_transactions(self, patience_s: float = 300.0) -> None:
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

    def new_producer(self, reason: str) -> None:
        """Replace a producer stuck in a transaction: the new one takes the same transactional id, which
        aborts whatever the old one left open."""
        log.info("join: %s; starting a new transactional producer", reason)
        old, self.producer = self.producer, Producer(self.producer_config)
        if id(old) not in self._stuck:  # a stuck one may be inside a call: leave it alone
            try:
                old.purge()
            except Exception:  # it is broken already
                pass
        self._retired.append(old)
        self.init_transactions()

    def drop(self) -> None:
        """Forget the open transaction. Not abort_transaction(): after a broker restart it could hang;
        a new producer with the same transactional id makes the broker abort it (epoch bump), always."""
        if self.txn.open:
            self.txn.close()
            self.new_producer("the open transaction is dropped")

    def close(self) -> None:
        self.producer.flush(10)

    # --- the transaction -----------------------------------------------------------------------
    def begin(self) -> Checkpoint:
        if not self.txn.open:
            self.producer.begin_transaction()
            self.txn.begin()
        return self.txn

    def produce(self, topic: str, key: bytes | None, value: bytes | None, partition: int | None = None,
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

    def commit(self, topic: str, offsets: dict[int, int], group) -> None:
        """Commit the open transaction with ``offsets`` of ``topic`` for ``group`` (its metadata: the broker
        checks the generation). Raises KafkaException (a StuckCall when a call did not return)."""
        try:
            if offsets:
                tps = [TopicPartition(topic, p, o) for p, o in offsets.items()]
                producer = self.producer
                # one attempt each: a call retried after a time-out could block far past its own timeout
                bounded("send_offsets_to_transaction",
                        lambda: producer.send_offsets_to_transaction(tps, group, self.CALL_TIMEOUT_S),
                        self.CALL_PATIENCE_S)
            producer = self.producer
            bounded("commit_transaction", lambda: producer.commit_transaction(self.CALL_TIMEOUT_S),
                    self.CALL_PATIENCE_S)
        except StuckCall as exc:
            self._stuck.add(id(self.producer))
            log.warning("join: %s; giving its producer up", exc.args[0].str())
            raise
        self.refusals.clear()
        self.aborts_in_a_row = 0

    def aborted(self, err: KafkaError) -> None:
        """Count an aborted transaction and the records refused in it, say so, and drop it."""
        self.aborts_in_a_row += 1
        if id(self.producer) not in self._stuck:
            self.producer.poll(0)  # the refused records' delivery reports, if the commit left them unserved
        for topic, key, refusal in self.txn.refused:
            tries = self.refusals.get((topic, key), (0, None))[0]
            self.refusals[(topic, key)] = (tries + 1, refusal)
        refused = {f"{topic}:{key!r}: {refusal.name()}" for topic, key, refusal in self.txn.refused}
        log.warning("join: transaction aborted (%s%s); restoring from the changelog", err,
                    f"; refused: {', '.join(sorted(refused))}" if refused else "")
        self.drop()

    def refused(self, topic: str, key: bytes | None) -> tuple[int, KafkaError | None]:
        """How many aborted transactions a record for ``topic`` and ``key`` was refused in, and why."""
        return self.refusals.get((topic, key), (0, None))

    def given_up(self, topic: str, key: bytes | None, what: str) -> bool:
        """Whether a record for ``topic`` and ``key`` was refused in enough aborted transactions to be left
        out (a notice or a dead letter: the partition must go on)."""
        tries, err = self.refused(topic, key)
        if tries < self.config.join_max_aborts:
            return False
        log.error("join: %s refused %d times by %s (%s): left out", what, tries, topic, err)
        return True
