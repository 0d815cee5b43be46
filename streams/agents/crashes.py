"""Resize's crash ledger: a task that kills its worker process is found, isolated, and ends FAILED.

A resize worker writes a row for each task before it works on it (key: the task message's partition and
offset, value: its source, how many times it was started, how many sandboxes it killed) and a tombstone
when it is done. A worker that dies in a decoder (a segfault, an out-of-memory kill) leaves its rows
behind. The partition's next owner reads them when it takes the partition over: those tasks, and every
task of the same source, are *suspects*: each runs alone in a one-process sandbox under a memory limit
(agents/resize.py keeps one per resize slot), so a death there is seen, blamed on exactly that task,
and counted. After ``IMAGEFORK_MAX_CRASHES``
sandbox deaths the task ends FAILED with ``WORKER_CRASHED``. A worker killed from outside (SIGKILL,
a deploy) only makes its tasks suspects: they run once more in the sandbox and succeed.

The ledger is a compacted topic with the task topic's partitioning, so it only holds the rows of tasks
in flight (and tombstones until compaction), and those of tasks that ended ``WORKER_CRASHED``: their
message may be delivered again (its offset not committed yet when its partition moved), and its next
reader must end it at once, and treat its source as a suspect, rather than decode it in-process.
"""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

import faust

from streams.adapters.kafka import client_config
from streams.adapters.ledger import read_partition
from streams.agents.common import log, send
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


class CrashLedger:
    def __init__(self, config: Config, topic: faust.TopicT, tasks_topic: str):
        self.config = config
        self.topic = topic
        self.tasks_topic = tasks_topic
        self._rows: dict[int, dict[bytes, Entry]] = {}
        self._locks: dict[int, asyncio.Lock] = {}
        self.suspects: set[str] = set()

    def forget(self, partitions: set[int]) -> None:
        """Partitions this worker no longer owns: their next owner reads their rows afresh."""
        for p in partitions:
            self._rows.pop(p, None)

    async def _partition(self, partition: int) -> dict[bytes, Entry]:
        rows = self._rows.get(partition)
        if rows is not None:
            return rows
        async with self._locks.setdefault(partition, asyncio.Lock()):
            if partition not in self._rows:
                raw = await asyncio.to_thread(read_partition, client_config(self.config),
                                              self.topic.get_topic_name(), partition)
                self._rows[partition] = rows = {}
                for key, value in raw.items():
                    entry = _entry(partition, key, value)
                    if entry is None:
                        continue
                    rows[key] = entry
                    self.suspects.add(entry.source)
                    WORKER_CRASHES.labels("suspected").inc()
                    log.warning("task at %s[%s] was in flight when its worker died (started %d times, %d "
                                "sandboxes killed); its source now runs in the sandbox", self.tasks_topic,
                                key.decode(), entry.starts, entry.crashes)
            return self._rows[partition]

    async def begin(self, partition: int, offset: int, source: str) -> tuple[Entry, bool]:
        """Record a start before the work; returns the entry and whether the task is a suspect."""
        rows = await self._partition(partition)
        key = f"{partition}:{offset}".encode()
        entry = rows.get(key) or Entry(partition, key, source)
        suspect = entry.starts > 0 or source in self.suspects
        entry.starts += 1
        rows[key] = entry
        await send(self.topic, key=key, value=entry.value(), partition=partition)
        return entry, suspect

    async def crashed(self, entry: Entry) -> None:
        """A sandbox died on this task: count it where the next owner will see it."""
        entry.crashes += 1
        self.suspects.add(entry.source)
        WORKER_CRASHES.labels("observed").inc()
        await send(self.topic, key=entry.key, value=entry.value(), partition=entry.partition)

    async def end(self, entry: Entry, keep: bool = False) -> None:
        """The task is done: its row goes (a tombstone), unless ``keep`` (a task that killed its sandboxes:
        its row, already written with its crash count, stays for whoever sees the message again)."""
        if keep:
            return
        rows = self._rows.get(entry.partition)
        if rows is not None:
            rows.pop(entry.key, None)
        await send(self.topic, key=entry.key, value=None, partition=entry.partition)


def _entry(partition: int, key: bytes, value: bytes) -> Entry | None:
    try:
        row = json.loads(value)
        return Entry(partition, key, str(row["source"]), int(row["starts"]), int(row["crashes"]))
    except (ValueError, KeyError, TypeError):
        log.warning("ignoring an unreadable crash-ledger row %r", key)
        return None
