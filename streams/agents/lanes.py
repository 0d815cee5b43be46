"""One set of slots for both priority lanes (the rule: ``core/lanes.py``): a handler runs inside
``async with gate.slot(lane)``, and waits there, oldest first within its lane, until the rule gives its
lane a slot. The waiting and running counts are ``imagefork_lane_tasks{role,lane,state}``."""
from __future__ import annotations

import asyncio
from collections import deque
from contextlib import asynccontextmanager

from streams.adapters.inflight import DRAIN
from streams.core.lanes import BATCH, INTERACTIVE, LANES, batch_every, batch_floor, next_lane
from streams.metrics import LANE_TASKS


class LaneGate:
    def __init__(self, role: str, slots: int, share: float):
        self.role, self.slots, self.floor = role, slots, batch_floor(slots, share)
        self.every = batch_every(share) if self.floor == 0 else 0  # one slot: batch by turns
        self.streak = 0  # interactive turns in a row while batch work waited
        self.running = {INTERACTIVE: 0, BATCH: 0}
        self.waiting: dict[str, deque[asyncio.Future]] = {INTERACTIVE: deque(), BATCH: deque()}

    def _show(self) -> None:
        for lane in LANES:
            LANE_TASKS.labels(self.role, lane, "running").set(self.running[lane])
            LANE_TASKS.labels(self.role, lane, "waiting").set(len(self.waiting[lane]))

    def _wake(self) -> None:
        while True:
            lane = next_lane(self.running, {k: len(v) for k, v in self.waiting.items()}, self.slots, self.floor,
                             self.streak, self.every)
            if lane is None:
                break
            waiter = self.waiting[lane].popleft()
            if waiter.done():  # its handler was cancelled while it waited
                continue
            self.streak = self.streak + 1 if lane == INTERACTIVE and self.waiting[BATCH] else 0
            self.running[lane] += 1
            waiter.set_result(None)
        self._show()

    def _release(self, lane: str) -> None:
        self.running[lane] -= 1
        self._wake()

    @asynccontextmanager
    async def slot(self, lane: str):
        waiter = asyncio.get_running_loop().create_future()
        self.waiting[lane].append(waiter)
        self._wake()
        try:
            await waiter
        except BaseException:  # cancelled (a stop): a slot given meanwhile goes back
            if waiter.done() and not waiter.cancelled():
                self._release(lane)
            else:
                waiter.cancel()
                if waiter in self.waiting[lane]:
                    self.waiting[lane].remove(waiter)
                self._show()
            raise
        try:
            yield
        finally:
            self._release(lane)

    @asynccontextmanager
    async def slot_unless_draining(self, lane: str):
        """``slot``, for a message that does nothing before it has one: waiting for it is only waiting, so a
        draining stop does not wait for it (``DRAIN.parked``), and one that gets its slot once the drain began
        gives it back and waits to be cancelled: its offset is not committed, the partition's next owner runs it."""
        DRAIN.parked += 1
        parked = True
        try:
            async with self.slot(lane):
                if not DRAIN.started:
                    DRAIN.parked -= 1
                    parked = False
                    yield
                    return
            await DRAIN.hold()
        finally:
            if parked:
                DRAIN.parked -= 1
