"""Priority lanes: a request's ``priority`` (``interactive``, the default, or ``batch``) sends it, and its
tasks, to a lane of their own (``imagefork.requests.batch``, ``imagefork.tasks.batch``). A process serves
both lanes from one set of slots (``agents/lanes.py``): a free slot goes to interactive work first, and to
batch work only when no interactive work runs or waits (a request's tasks come a few at a time: a slot
given to batch between two of them would make the next wait, and share the cores meanwhile); while
interactive work is under way, batch work keeps a share of the slots (``IMAGEFORK_BATCH_SHARE``, at least
one slot), so a backfill is slowed by interactive traffic, never stopped by it. No I/O here."""
from __future__ import annotations

import math

INTERACTIVE, BATCH = "interactive", "batch"
LANES = (INTERACTIVE, BATCH)


def batch_floor(slots: int, share: float) -> int:
    """The slots batch work keeps while interactive work runs or waits: ``share`` of them, at least one, and
    never all of them (one slot alone is shared by turns: ``batch_every``)."""
    return min(max(1, math.floor(slots * share + 1e-9)), slots - 1)


def batch_every(share: float) -> int:
    """With one slot: batch takes every this many-th turn while interactive work waits."""
    return max(2, round(1 / share))


def next_lane(running: dict[str, int], waiting: dict[str, int], slots: int, floor: int,
              streak: int = 0, every: int = 0) -> str | None:
    """The lane whose oldest waiter takes a free slot now; None when no slot is free or nobody waits.
    ``streak``: interactive turns given in a row while batch work waited; at ``every`` (one slot, no
    floor), batch takes the next turn."""
    if running[INTERACTIVE] + running[BATCH] >= slots:
        return None
    if waiting[BATCH] and (running[BATCH] < floor or (every and streak >= every - 1)):
        return BATCH  # below its share (or its turn): batch first, or a steady interactive stream starves it
    if waiting[INTERACTIVE]:
        return INTERACTIVE
    return BATCH if waiting[BATCH] and not running[INTERACTIVE] else None


def lane_of(priority: str) -> str:
    """A task's or request's lane from its ``priority`` field ("" and unknown values: interactive)."""
    return BATCH if (priority or "").strip().lower() == BATCH else INTERACTIVE
