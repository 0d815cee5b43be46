"""Resize writes a task's crash-ledger row while the task waits for its slot (agents/resize.py): the row's ack
lands before the slot is taken, instead of holding the slot while the pool stands idle (docs/performance.md:
5.5 ms of a two-slot worker's 80 ms a task). A task that never runs (cancelled, past its deadline) ends its
ledger entry all the same, so its source's row goes once idle."""
import asyncio
from types import SimpleNamespace

from streams.agents import resize
from streams.agents.common import now_ms
from streams.agents.crashes import Entry
from streams.agents.policy import Disposition
from streams.config import Config
from streams.core.lanes import INTERACTIVE
from streams.core.models import ResizeTask


class _Topic:
    def get_topic_name(self):
        return "tasks"


class _Ledger:
    def __init__(self, events):
        self.events = events

    async def begin(self, partition, offset, source):
        self.events.append(("begin", offset))
        await asyncio.sleep(0.01)  # the broker's ack
        self.events.append(("acked", offset))
        return Entry(partition, f"{partition}:{offset}".encode(), source), False

    async def end(self, entry, keep=False):
        self.events.append(("end", int(entry.key.split(b":")[1])))


def _task(name: str, deadline_ms: int) -> ResizeTask:
    return ResizeTask(workflowId="wf", taskRef=name, index=0, total=1, sourceUri="s3://b/_staging/wf/source",
                      fileLocation="https://example.test/a.png", format="png", width=8, height=8,
                      maintainAspectRatio=True, outputKey=f"out/{name}.png", deadline=deadline_ms)


def _resizer(events, cancelled=lambda: False):
    config = Config.from_env({"IMAGEFORK_RESIZE_CONCURRENCY": "1"})
    r = resize.Resizer(config, SimpleNamespace(task_attempts=_Topic(), tasks=_Topic(), task_attempts_batch=_Topic(),
                                               tasks_batch=_Topic()))
    r.cancels = SimpleNamespace(cancelled=lambda *_: cancelled(), flag=lambda *_: "", close=lambda: None)

    async def run(task, entry, **_):
        events.append(("run", task.taskRef))
        return {"ok": False, "code": "X", "transient": False, "message": "test", "stages": {}}

    async def report(task, outcome):
        events.append(("report", task.taskRef))
    r.run, r.report = run, report
    return r


def _msg(offset: int):
    return SimpleNamespace(where={"partition": "0", "offset": str(offset)})


async def _hold_the_slot(r) -> tuple[asyncio.Future, asyncio.Event]:
    """Another task holds the worker's only slot until the event is set."""
    release = asyncio.Event()

    async def busy():
        async with r.gate.slot_unless_draining(INTERACTIVE):
            await release.wait()
    holder = asyncio.ensure_future(busy())
    await asyncio.sleep(0)
    return holder, release


def test_the_row_is_written_and_acked_while_the_task_waits_for_its_slot():
    async def go():
        events = []
        r, ledger = _resizer(events), _Ledger(events)
        holder, release = await _hold_the_slot(r)
        handled = asyncio.ensure_future(r._handle(_msg(7), _task("t7", now_ms() + 60_000), ledger, INTERACTIVE))
        await asyncio.sleep(0.05)
        assert events == [("begin", 7), ("acked", 7)]  # before any slot was free
        release.set()
        assert await handled == Disposition.PROCESSED
        assert events[2:] == [("run", "t7"), ("report", "t7"), ("end", 7)]
        await holder

    asyncio.run(go())


def test_a_task_cancelled_while_it_waited_ends_its_entry_and_one_past_its_deadline_writes_none():
    async def go():
        events, cancelled = [], [False]
        r, ledger = _resizer(events, lambda: cancelled[0]), _Ledger(events)
        holder, release = await _hold_the_slot(r)
        handled = asyncio.ensure_future(r._handle(_msg(8), _task("t8", now_ms() + 60_000), ledger, INTERACTIVE))
        await asyncio.sleep(0.05)
        cancelled[0] = True
        release.set()
        assert await handled == Disposition.PROCESSED
        assert events == [("begin", 8), ("acked", 8), ("end", 8)]  # skipped: never ran, its entry ended
        await holder
        cancelled[0] = False
        events.clear()
        assert await r._handle(_msg(9), _task("t9", now_ms() - 1), ledger, INTERACTIVE) == Disposition.PROCESSED
        assert events == [("report", "t9")]  # DEADLINE_EXCEEDED reported; no row for work that never starts

    asyncio.run(go())
