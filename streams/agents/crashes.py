"""Resize's crash ledger: a task that kills its worker process is found, isolated, and ends FAILED.

Before a resize worker decodes anything of a source, it writes a row for that source in the task's
partition (key: the partition and offset of the first task of it, value: the source, how many times that
task was started, how many sandboxes it killed) and waits for the broker's ack; the row stays while tasks of
that source run there, and a tombstone follows once none has for ``MARKER_LINGER_S`` (the next task of the
same source, the common case of a request's many outputs, writes nothing). A worker that dies in a decoder
(a segfault, an out-of-memory kill) leaves its rows behind. The partition's next owner reads them when it
takes the partition over: those sources are *suspects*: each of their tasks runs alone in a one-process
sandbox under a memory limit (agents/resize.py keeps one per resize slot), so a death there is seen,
blamed on exactly that task, and counted in a row of the task's own (key: its partition and offset).
After ``IMAGEFORK_MAX_CRASHES`` sandbox deaths the task ends FAILED with ``WORKER_CRASHED``. A worker
killed from outside (SIGKILL, a deploy) only makes its sources suspects: their tasks run once more in the
sandbox and succeed.

The ledger is a compacted topic with the task topic's partitioning, so it only holds the rows of sources
in flight (and tombstones until compaction), and those of tasks that ended ``WORKER_CRASHED``: their
message may be delivered again (its offset not committed yet when its partition moved), and its next
reader must end it at once, and treat its source as a suspect, rather than decode it in-process.
(Measured, docs/breakdown.md: a row and a tombstone per task, each waited for, cost 7 ms of a tiny
task's 17.)
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

from streams.adapters.ledger import read_partition
from streams.agents.common import TopicLike, log, send
from streams.config import Config
from streams.metrics import WORKER_CRASHES


@dataclass
class Entry:
    partition: int
    key: bytes
    source: str
    starts: int = 0
    crashes: int = 0

    def value(self) -> bytes:
        return json.dumps({"source": self.source, "starts": self.starts, "crashes": self.crashes}).encode()


@dataclass
class Marker:
    """A source's row in one partition while its tasks run there: written once, tombstoned when idle."""
    key: bytes
    written: asyncio.Future
    running: int = 0
    idle_since: float = 0.0


MARKER_LINGER_S = 1.0  # a source's row outlives its last task by this much (the next task writes nothing)
STALE_S = 300.0  # a dead worker's source row no task of that source came back for is tombstoned after this
now_s = time.monotonic


class CrashLedger:
    def __init__(self, config: Config, topic: TopicLike, tasks_topic: str):
        self.config = config
        self.topic = topic
        self.tasks_topic = tasks_topic
        self._rows: dict[int, dict[bytes, Entry]] = {}
        self._locks: dict[int, asyncio.Lock] = {}
        self._markers: dict[tuple[int, str], Marker] = {}
        self._sweeper: asyncio.Task | None = None
        # the source rows a dead worker left, by (partition, source): tombstoned once this worker's own row
        # for that source is written (a task of it came back), or after STALE_S (none came back: all done)
        self._stale: dict[tuple[int, str], tuple[float, set[bytes]]] = {}
        self.suspects: set[str] = set()

    def forget(self, partitions: set[int]) -> None:
        """Partitions this worker no longer owns: their next owner reads their rows afresh."""
        for p in partitions:
            self._rows.pop(p, None)

    async def release(self, partitions: set[int]) -> None:
        """Partitions this worker gives up: tombstone their idle source rows first, so their next owner does
        not take those sources for suspects; then forget them."""
        for where in [w for w in self._stale if w[0] in partitions]:
            del self._stale[where]  # the next owner reads them, and judges them, itself
        await self.sweep(linger_s=0.0, partitions=partitions)
        self.forget(partitions)

    async def _partition(self, partition: int) -> dict[bytes, Entry]:
        rows = self._rows.get(partition)
        if rows is not None:
            return rows
        async with self._locks.setdefault(partition, asyncio.Lock()):
            if partition not in self._rows:
                raw = await asyncio.to_thread(read_partition, self.config, self.topic.get_topic_name(), partition)
                self._rows[partition] = rows = {}
                for key, value in raw.items():
                    entry = _entry(partition, key, value)
                    if entry is None:
                        continue
                    rows[key] = entry
                    if entry.crashes == 0:  # a source's row: its evidence moves to this worker's own row
                        self._stale.setdefault((partition, entry.source), (time.monotonic(), set()))[1].add(key)
                    self.suspects.add(entry.source)
                    WORKER_CRASHES.labels("suspected").inc()
                    log.warning("task at %s[%s] was in flight when its worker died (started %d times, %d "
                                "sandboxes killed); its source now runs in the sandbox", self.tasks_topic,
                                key.decode(), entry.starts, entry.crashes)
            return self._rows[partition]

    async def begin(self, partition: int, offset: int, source: str) -> tuple[Entry, bool]:
        """Record a start before the work (the source's row, acknowledged, unless it is there already);
        returns the task's entry and whether the task is a suspect."""
        rows = await self._partition(partition)
        key = f"{partition}:{offset}".encode()
        entry = rows.get(key) or Entry(partition, key, source)
        suspect = entry.starts > 0 or source in self.suspects
        entry.starts += 1
        marker = self._markers.get((partition, source))
        if marker is None:
            marker = Marker(key, asyncio.ensure_future(
                send(self.topic, key=key, value=Entry(partition, key, source, entry.starts, entry.crashes).value(),
                     partition=partition)))
            self._markers[(partition, source)] = marker
        marker.running += 1
        try:
            await asyncio.shield(marker.written)
        except BaseException:
            self._done(partition, source)
            if marker.written.done() and marker.written.exception() is not None:
                self._markers.pop((partition, source), None)  # the next task writes it afresh
            raise
        stale = self._stale.pop((partition, source), None)
        if stale:
            await asyncio.gather(*(send(self.topic, key=k, value=None, partition=partition)
                                   for k in stale[1] - {marker.key}))
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.ensure_future(self._sweep_forever())
        return entry, suspect

    def _done(self, partition: int, source: str) -> None:
        marker = self._markers.get((partition, source))
        if marker is not None:
            marker.running -= 1
            if marker.running <= 0:
                marker.idle_since = asyncio.get_running_loop().time()

    async def sweep(self, linger_s: float = MARKER_LINGER_S, partitions: set[int] | None = None) -> int:
        """Tombstone the rows of sources no task has run for ``linger_s`` (in ``partitions``: all)."""
        now = asyncio.get_running_loop().time()
        idle = [(where, m) for where, m in self._markers.items()
                if m.running <= 0 and now - m.idle_since >= linger_s and m.written.done()
                and (partitions is None or where[0] in partitions)]
        for where, _marker in idle:
            del self._markers[where]
        # a row that also counts its task's sandbox deaths stays (the task's own entry says so)
        gone = [(where[0], m.key) for where, m in idle if not self._kept(where[0], m.key)]
        for where in [w for w, (read, _keys) in self._stale.items() if now_s() - read >= STALE_S
                      and (partitions is None or w[0] in partitions)]:
            gone += [(where[0], key) for key in self._stale.pop(where)[1] if not self._kept(where[0], key)]
        if gone:
            await asyncio.gather(*(send(self.topic, key=key, value=None, partition=p) for p, key in gone))
        return len(gone)

    def _kept(self, partition: int, key: bytes) -> bool:
        entry = self._rows.get(partition, {}).get(key)
        return entry is not None and entry.crashes > 0

    async def _sweep_forever(self) -> None:
        while self._markers or self._stale:
            await asyncio.sleep(MARKER_LINGER_S / 2)
            try:
                await self.sweep()
            except Exception as exc:  # a row left behind only makes its source a suspect for the next owner
                log.warning("could not tombstone crash-ledger rows (%s: %s)", type(exc).__name__, exc)

    async def crashed(self, entry: Entry) -> None:
        """A sandbox died on this task: count it in a row of its own, where the next owner will see it."""
        entry.crashes += 1
        self.suspects.add(entry.source)
        self._rows.setdefault(entry.partition, {})[entry.key] = entry
        WORKER_CRASHES.labels("observed").inc()
        await send(self.topic, key=entry.key, value=entry.value(), partition=entry.partition)

    async def end(self, entry: Entry, keep: bool = False) -> None:
        """The task is done. A row of its own (its sandbox deaths, or one read from the ledger) goes (a
        tombstone), unless ``keep`` (a task that killed its sandboxes: its row stays for whoever sees the
        message again); its source's row goes once no task of that source has run for a moment."""
        self._done(entry.partition, entry.source)
        if keep:
            return
        rows = self._rows.get(entry.partition)
        own = rows.pop(entry.key, None) if rows is not None else None
        if own is not None:
            marker = self._markers.get((entry.partition, entry.source))
            if marker is None or marker.key != entry.key:  # else the source's row, tombstoned when idle
                await send(self.topic, key=entry.key, value=None, partition=entry.partition)


def _entry(partition: int, key: bytes, value: bytes) -> Entry | None:
    try:
        row = json.loads(value)
        return Entry(partition, key, str(row["source"]), int(row["starts"]), int(row["crashes"]))
    except (ValueError, KeyError, TypeError):
        log.warning("ignoring an unreadable crash-ledger row %r", key)
        return None
