"""Offsets that never pass unfinished work, for the Faust agents (planner, resize and their retry agents).

faust-streaming 0.15's ``Consumer._new_offset`` commits one offset past a message still in flight: it
withholds a commit only when ``min(acked) - committed > 1`` (so the message *at* the committed offset may
be unfinished), and checks nothing when nothing was committed yet (upstream issue #606, PR #707). And a
stream acks its current event when its agent is cancelled (a SIGTERM), so Faust's final commit on stop
passes every message that was still being worked on. A planner or resize worker stopped or killed then
loses the request or task it was working on.

:class:`InFlight` is our own ledger of the messages an agent has started and not finished (the message
policy keeps it: ``begin`` before the handler, ``end`` once the message is processed, retried or
dead-lettered). :func:`new_offset` replaces Faust's computation: a commit advances only over the contiguous
run of acked offsets that starts at the committed offset (or, when nothing is committed, at the lowest
offset this consumer was handed), and never reaches a message Faust has not seen acked or that the ledger
holds. A message cancelled mid-way stays in the ledger, so it is read again by the partition's next owner.
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict


class InFlight:
    """(topic, partition) -> offsets started and not finished, in this process."""

    def __init__(self):
        self._lock = threading.Lock()
        self._held: dict[tuple[str, int], dict[int, int]] = defaultdict(dict)  # offset -> count

    def begin(self, topic: str, partition: int, offset: int) -> None:
        with self._lock:
            held = self._held[(topic, partition)]
            held[offset] = held.get(offset, 0) + 1

    def end(self, topic: str, partition: int, offset: int) -> None:
        with self._lock:
            held = self._held.get((topic, partition))
            if held is None or offset not in held:
                return
            held[offset] -= 1
            if held[offset] <= 0:
                del held[offset]

    def count(self) -> int:
        """Messages started and not finished, all partitions."""
        with self._lock:
            return sum(sum(held.values()) for held in self._held.values())

    def lowest(self, topic: str, partition: int, at_least: int = 0) -> int | None:
        with self._lock:
            held = [o for o in self._held.get((topic, partition), ()) if o >= at_least]
            return min(held) if held else None


IN_FLIGHT = InFlight()


class Drain:
    """A stop that lets the work in flight finish (``IMAGEFORK_SHUTDOWN_GRACE_S``): once ``start``ed, no agent
    starts another message (it waits, unacked, so no commit passes it), and ``wait`` returns when every
    message being worked on is done. Messages only waiting for their not-before time on a retry topic
    (``parked``) are not waited for: the stop hands them back, as it does whatever the grace did not finish."""

    def __init__(self):
        self.started = False
        self.parked = 0

    def start(self) -> None:
        self.started = True

    def busy(self) -> int:
        return IN_FLIGHT.count() - self.parked

    async def hold(self) -> None:
        """An agent that would start a message while draining waits here until the stop cancels it."""
        await asyncio.Event().wait()

    async def wait(self, grace_s: float, poll_s: float = 0.05) -> bool:
        """True when nothing is being worked on any more; False when ``grace_s`` passed first."""
        end = time.monotonic() + grace_s
        while self.busy() > 0:
            if time.monotonic() >= end:
                return False
            await asyncio.sleep(poll_s)
        return True


DRAIN = Drain()


def first_unfinished(consumer, tp, since: int = 0) -> int | None:
    """The lowest offset of ``tp`` from ``since`` on that this consumer was handed and has not finished:
    unacked by its stream, or held by the ledger (a message whose agent was cancelled is acked by Faust but
    not finished). Below ``since`` (the committed offset) lie only leftovers of an earlier assignment of the
    partition, which its owner since then has committed past: they hold nothing up."""
    lowest = IN_FLIGHT.lowest(tp.topic, tp.partition, since)
    for message in list(consumer._unacked_messages):
        # a second delivery of an offset (the partition came back to this consumer after a rebalance, and
        # was read again from the committed offset) is marked acked when its agent is done with it, but
        # Faust takes only a first delivery out of this set: the acked one stays there as long as
        # something holds it (an idle agent's last event), and must not hold the commits up
        if message.tp == tp and not message.acked and message.offset >= since \
                and (lowest is None or message.offset < lowest):
            lowest = message.offset
    return lowest


def new_offset(self, tp) -> int | None:
    """The offset to commit for ``tp`` (the next one to read), or None: the end of the run of acked
    offsets that starts at the committed offset and stops before the first unfinished message."""
    acked = self._acked[tp]
    if not acked:
        return None
    gaps = self._gap[tp]  # offsets the fetcher saw no message for (compaction, transaction markers)
    if gaps:
        top = max(acked)
        for entry in sorted(gaps.overlap(0, top + 1), key=lambda e: e.begin):
            acked.extend(range(entry.begin, entry.end))
        gaps.chop(0, top + 1)
    acked.sort()
    committed = self._committed_offset[tp]  # None when nothing is committed (Faust maps 0 to None too)
    start = committed if committed is not None else acked[0]
    stop = first_unfinished(self, tp, committed or 0)
    run: list[int] = []
    expected = start
    for offset in acked:
        if offset < expected:
            run.append(offset)  # a duplicate or an offset below the start: dropped with the run
            continue
        if offset != expected or (stop is not None and offset >= stop):
            break
        run.append(offset)
        expected = offset + 1
    if expected == start:
        _held_too_long(self, tp, start, acked, stop)
        return None  # the message at the committed offset is not finished
    _HELD.pop(tp, None)
    acked[:len(run)] = []
    self._acked_index[tp].difference_update(run)
    return expected


_HELD: dict = {}  # tp -> (the offset its commits wait at, since when, said so already)
HELD_WARNING_S = 60.0


def _held_too_long(consumer, tp, at: int, acked: list[int], stop: int | None) -> None:
    """Say once (a warning) when a partition's commits have waited at one offset for HELD_WARNING_S, and
    why: the message there is in the ledger (being worked on, or cancelled), not acked yet, or not seen."""
    now = time.monotonic()
    offset, since, said = _HELD.get(tp, (None, now, False))
    if offset != at:
        _HELD[tp] = (at, now, False)
        return
    if said or now - since < HELD_WARNING_S:
        return
    _HELD[tp] = (at, since, True)
    unacked = sorted(m.offset for m in list(consumer._unacked_messages) if m.tp == tp)[:5]
    import logging
    logging.getLogger("imagefork").warning(
        "commits of %s[%d] wait at offset %d for %.0fs: in the ledger from %s, unacked %s, acked %s",
        tp.topic, tp.partition, at, now - since, IN_FLIGHT.lowest(tp.topic, tp.partition, 0), unacked,
        sorted(acked)[:5])


_installed = False


def install() -> None:
    """Replace Faust's offset computation (once per process)."""
    global _installed
    if not _installed:
        from faust.transport import consumer as faust_consumer  # start-up: Faust only where a Faust role runs
        faust_consumer.Consumer._new_offset = new_offset
        _installed = True
