"""Asyncio agents on a confluent-kafka consumer: the planner's and resize's loop. It replaced Faust (issue 20:
Faust's loop and aiokafka's sends were a third of a resize worker's busy time, its rebalances stopped every member
of the group, and its commits passed messages still in flight, faust-streaming #606).

One consumer per process, with the ``range`` assignor: each topic's partitions are shared out evenly (the
sticky assignors balance a member's total over all its topics, and gave one of two workers every partition
of the tasks topic and the other none). Its rebalances are eager: every member gives its partitions back,
after letting the records it is running on them finish for up to ``REVOKE_WAIT_S``. A thread of its own polls
it and hands each record to the asyncio loop, where its lane's handler runs; a lane (a topic) runs at most
its ``concurrency`` records at once and reads a few times that ahead (past that its partitions pause, so
the broker keeps the rest). Offsets are committed only over a contiguous run of finished records per
partition (:class:`Offsets`): a record being worked on is never committed past, whatever finishes after
it. A SIGTERM or SIGINT drains (``IMAGEFORK_SHUTDOWN_GRACE_S``): nothing new starts, the work in flight
finishes, what is finished is committed, and the consumer leaves its group; a second signal stops at once.
Sends go through :class:`Outbox`: one idempotent producer, each send an awaitable settled by its delivery
report."""
from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Awaitable, Callable

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from streams.adapters.kafka import (
    MAX_MESSAGE_BYTES, client_config, describe_assignment, group_timing, producer_config,
)
from streams.adapters.inflight import DRAIN
from streams.config import Config

log = logging.getLogger("imagefork")
COMMIT_EVERY_S = 0.5
READ_AHEAD = 4  # records a lane reads ahead, in multiples of its concurrency (see AgentLoop._flow)
REJOIN_AFTER_S = 30.0  # lost partitions and no assignment for this long (or 3 session timeouts): join again
# a paused lane reads again while it still holds this many times its concurrency: its slots keep work queued
# through the fetch a resume starts (resumed only once it ran dry, two slots idled some 10 % of a bench run)
RESUME_AT = 2
REVOKE_WAIT_S = 2.0  # how long a rebalance waits for the records running on the partitions it takes away


class Offsets:
    """Per partition, the offsets taken in order and whether each is done: what may be committed is the
    offset after the longest done prefix."""

    def __init__(self):
        self._open: dict[tuple[str, int], dict[int, bool]] = {}
        self.lock = threading.Lock()

    def take(self, topic: str, partition: int, offset: int, done: bool = False) -> None:
        with self.lock:
            self._open.setdefault((topic, partition), {})[offset] = done

    def done(self, topic: str, partition: int, offset: int) -> None:
        with self.lock:
            offsets = self._open.get((topic, partition))
            if offsets is not None and offset in offsets:  # gone: its partition was revoked meanwhile
                offsets[offset] = True

    def committable(self, only: set[tuple[str, int]] | None = None) -> list[TopicPartition]:
        out = []
        with self.lock:
            for (topic, p), offsets in self._open.items():
                if only is not None and (topic, p) not in only:
                    continue
                upto = None
                for offset in sorted(offsets):
                    if not offsets[offset]:
                        break
                    upto = offset
                    del offsets[offset]
                if upto is not None:
                    out.append(TopicPartition(topic, p, upto + 1))
        return out

    def drop(self, keys: set[tuple[str, int]]) -> None:
        with self.lock:
            for key in keys:
                self._open.pop(key, None)

    def under_way(self, topic: str | None = None) -> int:
        with self.lock:
            return sum(1 for (t, _p), offsets in self._open.items() if topic is None or t == topic
                       for done in offsets.values() if not done)


# librdkafka's codes for a record no retry gets through, under the names agents/common.send knows them by
_REFUSALS = {
    KafkaError.MSG_SIZE_TOO_LARGE: "MessageSizeTooLargeError",
    KafkaError.RECORD_LIST_TOO_LARGE: "RecordTooLargeError",
    KafkaError.TOPIC_AUTHORIZATION_FAILED: "TopicAuthorizationFailedError",
    KafkaError.CLUSTER_AUTHORIZATION_FAILED: "ClusterAuthorizationFailedError",
    KafkaError.INVALID_RECORD: "InvalidRecordError",
    KafkaError.TOPIC_EXCEPTION: "InvalidTopicError",
    KafkaError.UNKNOWN_TOPIC_OR_PART: "UnknownTopicOrPartitionError",
    KafkaError._UNKNOWN_TOPIC: "UnknownTopicOrPartitionError",
}
_ERRORS: dict[str, type] = {}


class SendFailed(Exception):
    """A record the broker did not take; the class's name says why (see ``_REFUSALS``)."""


def send_error(err: KafkaError) -> SendFailed:
    name = _REFUSALS.get(err.code(), "SendFailed")
    kind = _ERRORS.get(name) or _ERRORS.setdefault(name, type(name, (SendFailed,), {}))
    return kind(err.str())


class Outbox:
    """The process's producer (idempotent, acks=all): ``send`` returns a future of the loop that its delivery
    report settles. A thread of its own serves the reports."""

    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop):
        # linger 1 ms: a task's result and its crash-ledger row are waited for, one at a time
        self.producer = Producer(producer_config(config, **{"linger.ms": 1,
                                                            "message.max.bytes": MAX_MESSAGE_BYTES + 65536}))
        self.loop = loop
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="outbox", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._closing.is_set():
            self.producer.poll(0.1)

    def send(self, topic: str, key: bytes | None, value: bytes | None, headers: dict | None = None,
             partition: int | None = None) -> asyncio.Future:
        future = self.loop.create_future()
        loop = self.loop

        def delivered(err, _msg):
            loop.call_soon_threadsafe(_settle, future, None if err is None else send_error(err))

        kwargs = {"key": key, "value": value, "on_delivery": delivered}
        if headers:
            kwargs["headers"] = headers
        if partition is not None:
            kwargs["partition"] = partition
        try:
            self.producer.produce(topic, **kwargs)
        except BufferError as exc:  # the local queue is full: agents/common.send tries again shortly
            future.set_exception(SendFailed(f"the producer's queue is full: {exc}"))
        except KafkaException as exc:
            future.set_exception(send_error(exc.args[0]))
        return future

    def close(self, timeout_s: float = 10.0) -> int:
        """Deliver what is queued (up to ``timeout_s``); the records left undelivered."""
        left = self.producer.flush(timeout_s)
        self._closing.set()
        self._thread.join(2)
        return left


def _settle(future: asyncio.Future, error: Exception | None) -> None:
    if not future.done():
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)


class KafkaTopic:
    """A topic to send to, as agents/common.send uses one."""

    PARTITIONS_TTL_S = 60.0  # how long a topic's partition count is trusted before it is asked again

    def __init__(self, name: str, outbox: Outbox):
        self.name, self.outbox = name, outbox
        self._partitions = (0, 0.0)  # (count, when it was learnt)

    def get_topic_name(self) -> str:
        return self.name

    async def partition_count(self, timeout_s: float = 5.0) -> int:
        """The topic's partitions from the producer's metadata (asked again after ``PARTITIONS_TTL_S``); 0 when
        they cannot be known now (the caller then lets the keys decide)."""
        count, learnt = self._partitions
        if count and time.monotonic() - learnt < self.PARTITIONS_TTL_S:
            return count
        try:
            meta = await asyncio.to_thread(self.outbox.producer.list_topics, self.name, timeout_s)
            topic = meta.topics.get(self.name)
            if topic is None or topic.error is not None:
                raise KafkaException(topic.error if topic is not None else "not in the metadata")
            count = len(topic.partitions)
        except KafkaException as exc:
            log.warning("partitions of %s not known (%s); its records go where their keys hash", self.name, exc)
            return 0
        self._partitions = (count, time.monotonic())
        return count

    async def send(self, *, key: bytes | None, value: bytes | None, headers: dict | None = None,
                   partition: int | None = None, force: bool = True) -> asyncio.Future:
        return self.outbox.send(self.name, key, value, headers, partition)


@dataclass(frozen=True)
class Lane:
    """A topic and its handler: ``handle(record, taken_at)``, where ``taken_at`` is when the consumer handed
    the record over (``time.perf_counter``); it must dispose of the record (it is committed once it returns)."""
    topic: str
    concurrency: int
    handle: Callable[[object, float], Awaitable[None]]


class AgentLoop:
    """The consumer, its thread and the lanes' records in the process (see the module's docstring).
    Longer than 200 lines because its two sides (the consumer's thread and the asyncio loop) share one set of counts
    (read ahead, running, finished offsets, paused lanes): split, the protocol between them would be spread
    over two classes."""

    def __init__(self, config: Config, role: str, lanes: list[Lane], *,
                 on_revoked: Callable[[set[tuple[str, int]]], Awaitable[None]] | None = None,
                 on_lost: Callable[[set[tuple[str, int]]], None] | None = None):
        self.config, self.role = config, role
        self.lanes = {lane.topic: lane for lane in lanes}
        self.on_revoked, self.on_lost = on_revoked, on_lost
        self.consumer = Consumer(client_config(config, **{
            "group.id": config.group_id(role),
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "partition.assignment.strategy": "range",
            **group_timing(config),
            # tasks are small records: a few MB read ahead is plenty (librdkafka's default is 64 MB)
            "queued.max.messages.kbytes": 4096,
            # a fetch brings a few records of each partition (at least one producer batch), not the whole
            # backlog of the first: handed over partition by partition, a burst of requests ran one partition's
            # share of every request before the next partition's, and every request ended late
            "max.partition.fetch.bytes": 4096,
        }))
        self.offsets = Offsets()
        self.held = {topic: 0 for topic in self.lanes}  # records handed to the loop and not finished
        self._held_lock = threading.Lock()
        self.queued: dict[str, deque] = {topic: deque() for topic in self.lanes}  # (record, taken_at) not started
        self.running = {topic: 0 for topic in self.lanes}
        self.active: dict[tuple[str, int], int] = {}  # records running per partition
        self.paused: set[str] = set()
        self.assigned: set[tuple[str, int]] = set()
        self.ready = False
        self.detail = "joining its consumer group"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = threading.Event()
        self._stopped_at = 0.0  # when a second signal asked to stop at once
        self._tasks: set[asyncio.Task] = set()
        self._lost_at = 0.0  # when partitions were last lost with none assigned since (0: not waiting)

    def readiness(self) -> tuple[bool, str]:
        return self.ready, self.detail

    # --- the loop's side --------------------------------------------------------------------------
    async def run(self) -> None:
        """Until a signal (drained first) or a consumer that failed for good (raised)."""
        self._loop = loop = asyncio.get_running_loop()
        stop = loop.create_future()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._signalled, sig, stop)
        self._subscribe()
        polled = loop.run_in_executor(None, self._poll_forever)  # its own thread, ends when closing is set
        done, _ = await asyncio.wait([stop, polled], return_when=asyncio.FIRST_COMPLETED)
        if polled in done:  # the consumer failed: the process ends, and its supervisor starts it again
            polled.result()
        grace = self.config.shutdown_grace_s
        if DRAIN.busy() and not self._stopped_at:
            if await self._drained(grace):
                log.info("stopping: the work in flight finished")
            else:
                log.warning("stopping: %d message(s) still in flight; they go back to their partitions' "
                            "next owner", DRAIN.busy())
        self._closing.set()  # the thread commits what is finished and leaves the group
        await polled
        for task in list(self._tasks):
            task.cancel()

    async def _drained(self, grace_s: float) -> bool:
        end = time.monotonic() + grace_s
        while DRAIN.busy() > 0:
            if time.monotonic() >= end or self._stopped_at:
                return False
            await asyncio.sleep(0.05)
        return True

    def _signalled(self, sig: signal.Signals, stop: asyncio.Future) -> None:
        if DRAIN.started:  # the second signal: stop at once
            self._stopped_at = time.monotonic()
            log.info("stopping at once (%s again)", sig.name)
            return
        DRAIN.start()
        self._hand_back()
        log.info("stopping (%s): finishing %d message(s) in flight, for up to %.0fs (IMAGEFORK_SHUTDOWN_GRACE_S)",
                 sig.name, DRAIN.busy(), self.config.shutdown_grace_s)
        if not stop.done():
            stop.set_result(sig)

    def _start(self, msg, taken_at: float) -> None:
        self.queued[msg.topic()].append((msg, taken_at))
        self._pump(msg.topic())

    def _pump(self, topic: str) -> None:
        """Start the lane's queued records while it has fewer than ``concurrency`` running."""
        queue, lane = self.queued[topic], self.lanes[topic]
        while queue and self.running[topic] < lane.concurrency and not DRAIN.started:
            msg, taken_at = queue.popleft()
            self.running[topic] += 1
            where = (topic, msg.partition())
            self.active[where] = self.active.get(where, 0) + 1
            task = asyncio.ensure_future(self._work(msg, taken_at))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _hand_back(self) -> None:
        """Draining: the records read ahead and not started stay for the partitions' next owner."""
        for topic, queue in self.queued.items():
            with self._held_lock:
                self.held[topic] -= len(queue)
            queue.clear()

    def _drop_queued(self, keys: set[tuple[str, int]]) -> None:
        for topic, queue in self.queued.items():
            kept = deque(item for item in queue if (topic, item[0].partition()) not in keys)
            with self._held_lock:
                self.held[topic] -= len(queue) - len(kept)
            self.queued[topic] = kept

    async def _work(self, msg, taken_at: float) -> None:
        topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
        try:
            await self.lanes[topic].handle(msg, taken_at)
            self.offsets.done(topic, partition, offset)
        except asyncio.CancelledError:  # a stop: not done, so the partition's next owner reads it again
            raise
        except Exception:  # the handler disposes of every record; one that raised is read again after a restart
            log.exception("%s: handling %s[%d:%d] failed", self.role, topic, partition, offset)
        finally:
            self.running[topic] -= 1
            self.active[(topic, partition)] -= 1
            with self._held_lock:
                self.held[topic] -= 1
            self._pump(topic)

    # --- the consumer's thread --------------------------------------------------------------------
    def _poll_forever(self) -> None:
        last_commit = time.monotonic()
        try:
            while not self._closing.is_set():
                room = self._flow()
                # the first record waited for, the rest only what is there already (consume() alone would
                # wait out its whole timeout for a full batch)
                first = self.consumer.poll(0.05 if self.paused else 0.25)
                if first is not None:
                    self._take(first)
                    for msg in self.consumer.consume(room - 1, 0) if room > 1 else ():
                        self._take(msg)
                self._rejoin_if_stuck(time.monotonic())
                if time.monotonic() - last_commit >= COMMIT_EVERY_S:
                    self._commit(asynchronous=True)
                    last_commit = time.monotonic()
        finally:
            self._commit(asynchronous=False)
            try:
                self.consumer.close()  # leaves the group (the revoke callback runs): the partitions move at once
            except KafkaException as exc:
                log.warning("%s: closing the consumer: %s", self.role, exc)

    def _subscribe(self) -> None:
        self.consumer.subscribe(list(self.lanes), on_assign=self._assigned, on_revoke=self._revoked,
                                on_lost=self._lost)

    def _rejoin_if_stuck(self, now: float) -> None:
        """Partitions lost across a broker restart and no assignment since, long after the group could have
        given one: librdkafka can stay waiting for its unassign to complete and never join again (a CI run
        saw resize hold nothing for two minutes while the planner rejoined in 11 s; confluent-kafka-python
        #1305). Subscribing again starts a fresh join."""
        if self._lost_at and now - self._lost_at >= max(REJOIN_AFTER_S, 3 * self.config.session_timeout_s):
            log.warning("%s: no partitions since they were lost %.0fs ago; joining the group again",
                        self.role, now - self._lost_at)
            self._lost_at = now
            self.consumer.unsubscribe()
            self._subscribe()

    def _take(self, msg) -> None:
        err = msg.error()
        if err is not None:
            if err.fatal():
                raise KafkaException(err)
            if err.code() != KafkaError._PARTITION_EOF:
                log.warning("%s: consumer: %s", self.role, err)
            return
        if DRAIN.started:  # a stop is draining this process: the record stays for the partition's next owner
            return
        topic = msg.topic()
        self.offsets.take(topic, msg.partition(), msg.offset())
        with self._held_lock:
            self.held[topic] += 1
        self._loop.call_soon_threadsafe(self._start, msg, time.perf_counter())

    def _flow(self) -> int:
        """Each lane reads ahead up to ``READ_AHEAD`` times its concurrency: past that its partitions pause, and
        they read again once it holds ``RESUME_AT`` times its concurrency or less (librdkafka drops what a paused
        partition had fetched). Draining, every partition pauses. Returns how many records the open lanes have
        room for."""
        with self._held_lock:
            held = dict(self.held)
        full = set()
        for topic, lane in self.lanes.items():
            if DRAIN.started or held[topic] >= READ_AHEAD * lane.concurrency or \
                    (topic in self.paused and held[topic] > RESUME_AT * lane.concurrency):
                full.add(topic)
        for topic in full | self.paused:
            tps = [TopicPartition(t, p) for t, p in self.assigned if t == topic]
            try:
                if topic in full:  # again each turn: partitions assigned since are paused too
                    self.consumer.pause(tps)
                else:
                    self.consumer.resume(tps)
            except KafkaException as exc:
                log.debug("%s: pausing/resuming %s: %s", self.role, topic, exc)
        self.paused = full
        room = sum(READ_AHEAD * lane.concurrency - held[t] for t, lane in self.lanes.items() if t not in full)
        return max(1, min(room, 500))

    def _commit(self, asynchronous: bool, only: set[tuple[str, int]] | None = None) -> None:
        ready = self.offsets.committable(only)
        if not ready:
            return
        try:
            self.consumer.commit(offsets=ready, asynchronous=asynchronous)
        except KafkaException as exc:  # a rebalance under way: what finished is done again by the next owner
            log.warning("%s: committing offsets: %s", self.role, exc)

    def _assigned(self, consumer, partitions) -> None:
        # assigned here rather than after the callback, so that they can be resumed at once: a partition
        # paused when it was taken away comes back paused otherwise (lost across a broker restart, it stayed
        # paused for good); the next turn pauses again what a full lane should not read
        consumer.assign(partitions)
        self._lost_at = 0.0
        if partitions:
            consumer.resume(partitions)
        self.paused = set()
        self.assigned |= {(tp.topic, tp.partition) for tp in partitions}
        self.detail = describe_assignment([TopicPartition(t, p) for t, p in sorted(self.assigned)])
        if not self.ready or partitions:
            log.info("imagefork ready: %s (%s)", self.role, self.detail)
            self._holding()
        self.ready = True

    def _holding(self) -> None:
        """Which partitions this member holds now, each time they change: ``topic[0,2,4]`` per topic."""
        held: dict[str, list[int]] = {}
        for topic, p in sorted(self.assigned):
            held.setdefault(topic, []).append(p)
        log.info("%s: now holding %s", self.role,
                 " ".join(f"{t}[{','.join(map(str, ps))}]" for t, ps in held.items()) or "nothing")

    def _revoked(self, consumer, partitions) -> None:
        # in the old generation still: what was read ahead is dropped, what runs gets REVOKE_WAIT_S to finish,
        # and what finished is committed before the partitions go (whoever gets them starts after it)
        keys = {(tp.topic, tp.partition) for tp in partitions}
        if self._loop is not None and keys:
            self._loop.call_soon_threadsafe(self._drop_queued, keys)
            end = time.monotonic() + REVOKE_WAIT_S
            while any(self.active.get(k, 0) for k in keys) and time.monotonic() < end:
                time.sleep(0.01)
        self._commit(asynchronous=False, only=keys)
        self._gone(keys)
        if self.on_revoked is not None and keys and self._loop is not None:
            try:
                asyncio.run_coroutine_threadsafe(self.on_revoked(keys), self._loop).result(10)
            except Exception as exc:  # what it leaves undone its next owner sees
                log.warning("%s: on revocation: %s: %s", self.role, type(exc).__name__, exc)

    def _lost(self, consumer, partitions) -> None:
        keys = {(tp.topic, tp.partition) for tp in partitions}
        log.warning("%s: %d partitions lost (taken while this worker did not answer)", self.role, len(keys))
        self._lost_at = time.monotonic()
        self._gone(keys)
        if self.on_lost is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self.on_lost, keys)

    def _gone(self, keys: set[tuple[str, int]]) -> None:
        """Partitions no longer ours: their records under way finish, those read ahead are dropped, and the next
        owner reads them all again."""
        self.offsets.drop(keys)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._drop_queued, keys)
        self.assigned -= keys
        self.detail = describe_assignment([TopicPartition(t, p) for t, p in sorted(self.assigned)])
        if keys:
            self._holding()
