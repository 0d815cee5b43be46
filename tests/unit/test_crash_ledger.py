"""The crash ledger's rows as the next owner of a partition reads them (a compacted topic, simulated by a
dict): a task that ended WORKER_CRASHED keeps its row, so a redelivery of its message, wherever it lands,
ends at once instead of being decoded in-process (seen in CI: a poison task finished in a sandbox, its
offset not committed yet, was delivered again to a fresh worker and killed it)."""
import asyncio

import pytest

from streams.agents import crashes, resize
from streams.agents.cancels import CancelWatch
from streams.agents.lanes import LaneGate
from streams.agents.policy import Message
from streams.config import Config
from streams.core.models import ResizeTask
from streams import serde


class Topic:
    def get_topic_name(self):
        return "ledger"


@pytest.fixture
def broker(monkeypatch):
    """The ledger topic: key -> last value (a tombstone deletes), per partition."""
    table: dict[int, dict[bytes, bytes]] = {}

    async def send(topic, *, key, value, partition=None, headers=None):
        rows = table.setdefault(partition, {})
        if value is None:
            rows.pop(key, None)
        else:
            rows[key] = value

    monkeypatch.setattr(crashes, "send", send)
    monkeypatch.setattr(crashes, "read_partition", lambda _cfg, _topic, p: dict(table.get(p, {})))
    return table


def test_a_killer_task_keeps_its_row_and_others_lose_theirs(broker):
    async def go():
        ledger = crashes.CrashLedger(Config(), Topic(), "tasks")
        good, _ = await ledger.begin(2, 0, "s3://b/good")
        await ledger.end(good)
        await ledger.sweep(linger_s=0)  # the good source's row goes once none of its tasks runs
        killer, _ = await ledger.begin(2, 1, "s3://b/poison")
        await ledger.crashed(killer)
        await ledger.crashed(killer)
        await ledger.end(killer, keep=True)
        # the partition's next owner: the killer's row is there, with its crashes; its source is a suspect
        fresh = crashes.CrashLedger(Config(), Topic(), "tasks")
        again, suspect = await fresh.begin(2, 1, "s3://b/poison")
        other, other_suspect = await fresh.begin(2, 5, "s3://b/poison")
        return again, suspect, other_suspect

    again, suspect, other_suspect = asyncio.run(go())
    # the good task's row went; the killer's stays, and the second task of its source wrote none
    assert set(broker[2]) == {b"2:1"}
    assert again.crashes == 2 and suspect and other_suspect


def test_a_redelivered_killer_ends_worker_crashed_without_running(broker, monkeypatch):
    config = Config(max_crashes=2)
    resizer = resize.Resizer.__new__(resize.Resizer)
    resizer.config, resizer.ledger = config, crashes.CrashLedger(config, Topic(), "tasks")
    resizer.ledgers, resizer.gate = {"interactive": resizer.ledger}, LaneGate("resize", 1, 0.2)
    resizer.cancels = CancelWatch(config)  # not started: no run is cancelled
    reported, ran = [], []

    async def report(task, outcome):
        reported.append(outcome)

    async def run(*args, **kwargs):
        ran.append(args)
        raise AssertionError("a known killer must not run again")

    resizer.report, resizer.run = report, run
    broker[3] = {b"3:7": crashes.Entry(3, b"3:7", "s3://b/poison", starts=3, crashes=2).value()}
    task = ResizeTask("wf", "r", 0, 1, "s3://b/poison", "http://x/p", "png", 8, 8, True, "wf/r.png",
                      deadline=2 ** 62)
    msg = Message(key=b"wf/r", value=serde.encode("ResizeTask", task.to_dict()), headers={},
                  where={"topic": "tasks", "partition": "3", "offset": "7"})
    asyncio.run(resizer.handle(msg))
    assert not ran and [o["code"] for o in reported] == ["WORKER_CRASHED"]
    assert b"3:7" in broker[3]  # and it stays for the next redelivery


def test_one_row_per_source_while_its_tasks_run_then_a_tombstone(broker, monkeypatch):
    """A request's many tasks of one source write one row (acknowledged before the first decode), not a row
    and a tombstone each; the row goes once none of them has run for a moment (measured: docs/breakdown.md)."""
    writes = []
    real = crashes.send

    async def counting(topic, **kw):
        writes.append(kw["key"])
        await real(topic, **kw)

    monkeypatch.setattr(crashes, "send", counting)

    async def go():
        ledger = crashes.CrashLedger(Config(), Topic(), "tasks")
        entries = await asyncio.gather(*(ledger.begin(4, offset, "s3://b/wide") for offset in range(50)))
        assert set(broker[4]) == {b"4:0"} and len(writes) == 1
        for entry, suspect in entries:
            assert not suspect
            await ledger.end(entry)
        assert set(broker[4]) == {b"4:0"}  # still there: the next task of the source would write nothing
        await asyncio.sleep(crashes.MARKER_LINGER_S * 1.6)
        return ledger

    asyncio.run(go())
    assert broker[4] == {} and writes == [b"4:0", b"4:0"]


def test_a_dead_workers_source_row_moves_to_the_next_owner_and_then_goes(broker):
    """The next owner takes the source for a suspect; once its own row for that source is written (a task of
    it came back), the dead worker's row is tombstoned, and its own goes when the source is done."""
    broker[1] = {b"1:3": crashes.Entry(1, b"1:3", "s3://b/src", starts=1).value()}

    async def go():
        ledger = crashes.CrashLedger(Config(), Topic(), "tasks")
        entry, suspect = await ledger.begin(1, 8, "s3://b/src")
        assert suspect and set(broker[1]) == {b"1:8"}
        await ledger.end(entry)
        await ledger.sweep(linger_s=0)

    asyncio.run(go())
    assert broker[1] == {}
