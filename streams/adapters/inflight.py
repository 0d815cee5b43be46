"""The messages this process is working on, and a stop that lets them finish.

:class:`InFlight` counts the messages an agent has started and not finished (the message policy keeps it:
``begin`` before the handler, ``end`` once the message is processed, retried or dead-lettered); the offsets
themselves are committed by ``adapters/agent_loop.Offsets``, never past one of them. :data:`DRAIN` is a stop
(SIGTERM, a deploy) under way: nothing new starts, and the stop waits for what is busy (``IMAGEFORK_SHUTDOWN_
GRACE_S``), not for a message only waiting for its not-before time on a retry topic (``parked``)."""
from __future__ import annotations

import asyncio
import threading
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


IN_FLIGHT = InFlight()


class Drain:
    """A stop that lets the work in flight finish: once ``start``ed, no agent starts another message, and
    ``busy`` counts what the stop waits for. A message waiting for a slot or for its not-before time is
    ``parked``: the stop hands it back (its offset is not committed) rather than wait for it."""

    def __init__(self):
        self.started = False
        self.parked = 0

    def start(self) -> None:
        self.started = True

    def busy(self) -> int:
        return IN_FLIGHT.count() - self.parked

    async def hold(self) -> None:
        """A parked message whose wait ended once the drain began waits here until the stop cancels it."""
        await asyncio.Event().wait()


DRAIN = Drain()
