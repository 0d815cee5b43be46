"""The events partitions a join owns: their state restored from the changelog, where reading resumes, and
when each one's clock may run (once the backlog it had at its assignment is read)."""
from __future__ import annotations

import gc
import logging
import threading
import time

from confluent_kafka import OFFSET_BEGINNING, KafkaException, TopicPartition

from streams.adapters.changelog import ChangelogReader, load_state
from streams.adapters.kafka import client_config, partition_for, watermarks
from streams.config import Config
from streams.core.join import JoinState
from streams.core.models import now_ms
from streams.join.session import retrying

log = logging.getLogger("imagefork")


class ConsumerFailed(RuntimeError):
    """The consumer hit a fatal error: the join rejoins the group with a new one."""


class Partitions:
    def __init__(self, config: Config):
        self.config = config
        self.topic = config.topics.events
        self.states: dict[int, JoinState] = {}
        # held while the loop changes the states, and by a query (from the HTTP thread) while it reads them
        self.lock = threading.RLock()
        self.count = 0  # the events topic's partitions (all of them, not only ours)
        self.positions: dict[int, int] = {}  # next offset to read, per owned partition
        # per owned partition: the end offset it had when it was assigned (or restored); its clock waits
        # until the join has read that far, so no deadline is judged on a backlog not read yet
        self.catchup: dict[int, int] = {}
        self.reader = self._reader()

    def _reader(self) -> ChangelogReader:
        return ChangelogReader(client_config(self.config), self.config.topics.join_state,
                               settle_s=self.config.transaction_timeout_s + 5)

    def new_reader(self) -> None:
        self.reader.close()
        self.reader = self._reader()

    def check(self, consumer, patience_s: float = 30.0) -> str | None:
        """The events and state topics exist (a topic just created may take a moment to show in the
        metadata) and the state topic has a partition for every events partition; else why not."""
        state_topic = self.config.topics.join_state
        give_up = time.monotonic() + patience_s
        while True:
            meta = consumer.list_topics(timeout=30).topics
            events, state = meta.get(self.topic), meta.get(state_topic)
            if events and state and not events.error and not state.error and events.partitions:
                break
            if time.monotonic() > give_up:
                return f"topics {self.topic} and {state_topic} must exist (run `imagefork topics`)"
            time.sleep(0.5)
        self.count = len(events.partitions)
        if len(state.partitions) < len(events.partitions):
            return (f"{state_topic} has {len(state.partitions)} partitions but {self.topic} has "
                    f"{len(events.partitions)}: they must match")
        return None

    def offsets(self, read: dict[int, int]) -> dict[int, int]:
        """What a transaction commits: the next offset of every partition we own (``read``: those it read).
        Every transaction carries them all, with the group's metadata, even one with nothing read (a clock
        pass, a repaired result): the broker then checks our generation (KIP-447), so a join that was frozen
        while its partitions moved on is fenced there, before its final events or rows are committed beside
        the new owner's."""
        offsets = {p: o for p, o in self.positions.items() if p in self.states}
        offsets.update(read)
        return offsets

    def of(self, workflow_id: str) -> int:
        return partition_for(workflow_id.encode(), self.count)

    def restore(self, parts: list[int]) -> None:
        """Each partition's state as of the last committed transaction, from the changelog."""
        started = time.monotonic()
        rows = self.reader.read(parts)
        now = now_ms()
        count = 0
        for p in parts:
            state = JoinState(default_timeout_ms=int(self.config.workflow_timeout_s * 1000),
                              retention_ms=int(self.config.finished_retention_s * 1000),
                              late_grace_ms=int(self.config.late_result_grace_s * 1000))
            load_state(rows[p], state, now)
            with self.lock:
                self.states[p] = state
            count += len(state.open) + len(state.finished)
        # the state's big containers go to the collector's permanent generation: full collections no
        # longer walk them (a 100-500 ms pause each, bench/join.py); reference counting still frees them
        gc.collect()
        gc.freeze()
        waits = [f"{self.reader.settled_s:.2f}s waiting for a previous owner's open transaction"] \
            if self.reader.settled_s else []
        waits += [f"{self.reader.lookups_retried} end look-up(s) asked again"] if self.reader.lookups_retried else []
        log.info("join: restored %d partitions (%d workflows) in %.2fs%s", len(parts), count,
                 time.monotonic() - started, f" ({', '.join(waits)})" if waits else "")

    # --- the consumer's callbacks (the loop commits or aborts the open transaction around them) ----------
    def assign(self, consumer, partitions) -> list[int]:
        """Restore the partitions just assigned; the ones added."""
        parts = [tp.partition for tp in partitions]
        if parts:
            # committed() waits for a transaction that is still committing offsets to these partitions
            # (require_stable), so the changelog read next is at least as new as the offsets we resume at
            try:
                committed = consumer.committed(partitions, timeout=max(60.0, 3 * self.config.transaction_timeout_s))
                self.restore(parts)
                self.set_catchup(consumer, parts)
            except (KafkaException, TimeoutError) as exc:
                raise ConsumerFailed(f"restoring partitions {parts} failed: {exc}") from None
            for tp in committed:
                self.positions[tp.partition] = tp.offset if tp.offset >= 0 else 0
        return parts

    def revoke(self, partitions) -> None:
        self.drop(tp.partition for tp in partitions)
        if partitions:
            log.info("join: %d partitions revoked, %d kept", len(partitions), len(self.states))

    def lose(self, partitions) -> None:
        self.drop(tp.partition for tp in partitions)
        log.warning("join: %d partitions lost", len(partitions))

    def rewind(self, consumer) -> None:
        """After an abort: every owned partition's state as committed, and reading from its committed offset."""
        parts = sorted(self.states)
        if not parts:
            return
        with self.lock:
            self.states.clear()
        tps = [TopicPartition(self.topic, p) for p in parts]
        try:
            committed = retrying("read the committed offsets", lambda: consumer.committed(tps, timeout=60))
        except KafkaException as exc:
            raise ConsumerFailed(str(exc)) from None
        self.restore(parts)
        try:
            self.set_catchup(consumer, parts)
            for tp in committed:
                offset = tp.offset if tp.offset >= 0 else OFFSET_BEGINNING
                consumer.seek(TopicPartition(self.topic, tp.partition, offset))
                self.positions[tp.partition] = max(0, tp.offset)
        except KafkaException as exc:  # cannot rewind: start over with fresh assignments
            raise ConsumerFailed(f"rewinding to the committed offsets failed: {exc}") from None

    def drop(self, parts) -> None:
        with self.lock:
            for p in parts:
                self.states.pop(p, None)
                self.positions.pop(p, None)
                self.catchup.pop(p, None)

    def clear(self) -> None:
        with self.lock:
            self.states.clear()
            self.positions.clear()

    def set_catchup(self, consumer, parts: list[int]) -> None:
        """Take each partition's end offset now: its clock starts once the join has read up to it."""
        for p in parts:
            tp = TopicPartition(self.topic, p)
            try:
                _low, high = watermarks(consumer, tp)
            except KafkaException:  # the broker away (an abort across its restart): the last end we heard of
                _low, high = consumer.get_watermark_offsets(tp, cached=True)
            if high is not None and high >= 0:
                self.catchup[p] = high

    def clock_ready(self, consumer, p: int, read: int) -> bool:
        """Whether partition ``p``'s clock may run: the join has read (``read``: the next offset) its backlog,
        as of its assignment."""
        target = self.catchup.get(p)
        if target is None:
            return True
        if read < target:
            # the consumer's position also passes what no message stands for (transaction markers, aborted
            # records); everything it returned up to it is in the batch applied before this clock pass
            fetched = consumer.position([TopicPartition(self.topic, p)])[0].offset
            if fetched < target:
                return False
        del self.catchup[p]
        log.info("join: partition %d caught up (offset %d): its clock runs", p, target)
        return True

    def caught_up(self, consumer, p: int) -> bool:
        """Whether the join has read partition ``p`` to its end (as last heard): no result is on its way."""
        _low, high = consumer.get_watermark_offsets(TopicPartition(self.topic, p), cached=True)
        return high is not None and high >= 0 and self.positions.get(p, -1) >= high

    def close(self) -> None:
        self.reader.close()
