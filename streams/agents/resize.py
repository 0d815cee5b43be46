"""Resize: task -> pool (fetch staged source, resize, encode, upload) -> result to the join.

Transient failures go to the retry topic with a not-before time, so waiting
never blocks a partition; the retry agent puts them back on the task topic.
A task that kills its process is isolated and ends WORKER_CRASHED (agents/crashes.py).
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import replace
from typing import Callable

from streams import serde
from streams.adapters.agent_loop import AgentLoop
from streams.adapters.kafka import Topics
from streams.agents import resize_job
from streams.agents.cancels import CancelWatch
from streams.agents.common import backoff_s, log, now_ms, run_agents, send
from streams.agents.crashes import CrashLedger, Entry
from streams.agents.lanes import LaneGate
from streams.agents.policy import (
    Disposition, Message, MessagePolicy, Reject, RetryLater, policy_lane, wait_not_before,
)
from streams.cgroups import cpu_cores, cpu_limit
from streams.config import Config
from streams.core.errors import DeadlineExceeded
from streams.core.lanes import BATCH, INTERACTIVE, lane_of
from streams.core.models import FAILED, SUCCEEDED, ResizeTask, SourceFacts, TaskError, TaskOutput, TaskResult
from streams.metrics import COMPUTE_CPU, OUTPUTS_REUSED, STAGE_SECONDS, TASK_SECONDS, TASKS, add_io
from streams.serde import SerdeError


SANDBOX_TIMEOUT_S = 120.0  # a suspect's run, at most (a task's real work takes seconds)


def _process_pool(config: Config, workers: int, initializer) -> ProcessPoolExecutor:
    import multiprocessing
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=initializer, initargs=(config,))


def make_pool(config: Config) -> Executor:
    quota = cpu_limit()
    log.info("resize: %d slots, a %s pool (%d cores%s; IMAGEFORK_RESIZE_CONCURRENCY sets the slots)",
             config.resize_slots, config.resize_pool, cpu_cores(),
             f": the container's quota of {quota:g}" if quota is not None else "")
    if config.resize_pool == "thread":
        resize_job.init(config)
        return ThreadPoolExecutor(max_workers=config.resize_slots, thread_name_prefix="resize")
    return _process_pool(config, config.resize_processes, resize_job.init_pooled)


def crashed_outcome(entry: Entry) -> dict:
    return {"ok": False, "code": "WORKER_CRASHED", "transient": False,
            "message": f"processing this task killed {entry.crashes} sandboxed worker process(es) "
                       f"(and was started {entry.starts} times); it is not tried again"}


class Resizer:
    def __init__(self, config: Config, topics: Topics):
        self.config = config
        self.topics = topics
        self.pool: Executor | None = None
        # a thread pool's tasks upload here, out of their compute slots, one pool per lane so that interactive
        # uploads never queue behind batch ones (a process pool's job uploads in its own process)
        self.uploads: dict[str, Executor] = {}
        self.job_fn = resize_job.make if config.resize_pool == "thread" else resize_job.run
        # one-process pools, each running one suspect at a time, so a sandbox death has one culprit
        self.sandboxes: list[Executor | None] = [None] * config.resize_processes
        self._free_sandboxes: asyncio.Queue[int] | None = None
        self.ledger = CrashLedger(config, topics.task_attempts, topics.tasks.get_topic_name())
        # each lane's task topic has its own ledger: a row names a partition and offset of its own topic
        self.ledgers = {INTERACTIVE: self.ledger,
                        BATCH: CrashLedger(config, topics.task_attempts_batch, topics.tasks_batch.get_topic_name())}
        self.gate = LaneGate("resize", config.resize_slots, config.batch_share)
        self.cancels = CancelWatch(config)

    def ensure_pool(self) -> Executor:
        if self.pool is None:
            self.pool = make_pool(self.config)
        if not self.uploads and self.config.resize_pool == "thread":
            # two uploads a slot: a slow PUT does not hold up the next task's
            self.uploads = {lane: ThreadPoolExecutor(max_workers=2 * self.config.resize_slots,
                                                     thread_name_prefix=f"upload-{lane}")
                            for lane in (INTERACTIVE, BATCH)}
        return self.pool

    def close(self) -> None:
        self.pool = _shut(self.pool)
        for pool in self.uploads.values():
            _shut(pool)
        self.uploads = {}
        self.sandboxes = [_shut(pool) for pool in self.sandboxes]
        self.cancels.close()

    async def handle(self, msg: Message, lane: str = INTERACTIVE) -> Disposition | RetryLater:
        try:
            task = ResizeTask.from_dict(serde.decode("ResizeTask", msg.value or b""))
        except SerdeError as exc:
            raise Reject("NOT_A_TASK", str(exc)) from None
        return await self._handle(msg, task, self.ledgers[lane], lane)

    async def _handle(self, msg: Message, task: ResizeTask, ledger: CrashLedger, lane: str) -> Disposition | RetryLater:
        stages: dict[str, float] = {}
        entry, begin = None, None
        try:
            if not self.cancels.cancelled(task.workflowId, task.runId) and now_ms() < task.deadline:
                # the source's crash-ledger row goes out now, and its ack lands while the task waits for a slot
                begin = asyncio.ensure_future(ledger.begin(int(msg.where["partition"]), int(msg.where["offset"]),
                                                           task.sourceUri))
            # a slot (interactive first; batch with what is left, and its share) while the task computes; its
            # result's send and ack wait outside, so the next task's work starts meanwhile
            waiting = time.perf_counter()
            async with self.gate.slot_unless_draining(lane):
                slot_wait = time.perf_counter() - waiting
                if self.cancels.cancelled(task.workflowId, task.runId):
                    return self.skip(task)
                if begin is None or now_ms() >= task.deadline:
                    outcome = {"ok": False, "code": DeadlineExceeded.code, "transient": False,
                               "message": "the workflow deadline passed before this task ran"}
                else:
                    started = time.perf_counter()
                    entry, suspect = await begin
                    begun = time.perf_counter()
                    outcome = crashed_outcome(entry) if entry.crashes >= self.config.max_crashes else \
                        await self.run(task, entry, sandboxed=suspect, ledger=ledger)
                    stages = outcome.get("stages", {})  # the upload's, outside the slot, joins them
                    COMPUTE_CPU.inc(stages.pop("cpu", 0.0))
                    stages["pool_wait"] = max(0.0, time.perf_counter() - begun - sum(stages.values()))
                    stages["ledger"] = begun - started
                    stages["slot_wait"] = slot_wait
            if "upload" in outcome:  # made in the slot; its upload waits outside, while the next task computes
                outcome["made_at"] = time.perf_counter()
                outcome = await asyncio.get_running_loop().run_in_executor(self.uploads[lane], resize_job.deliver,
                                                                           outcome)
            add_io(outcome.pop("io", ()))
            stages = outcome.pop("stages", None) or stages
            if not outcome["ok"] and outcome["code"] == "CANCELLED":
                return self.skip(task, started=True)
            if not outcome["ok"] and outcome["transient"] and task.attempt <= self.config.retry.max_retries:
                return self.retry(task, outcome)
            sending = time.perf_counter()
            await self.report(task, outcome)
            if stages:
                stages["result_send"] = time.perf_counter() - sending
            return Disposition.PROCESSED
        finally:
            if entry is None and begin is not None:  # it never ran (cancelled, drained, past its deadline)
                entry = await _settled(begin)
            # a task that killed its sandboxes keeps its row: a redelivery of its message (its offset not
            # committed yet when its partition moved) ends WORKER_CRASHED at once wherever it lands, and
            # its source stays a suspect there, instead of being decoded in-process
            if entry is not None:
                ending = time.perf_counter()
                await ledger.end(entry, keep=entry.crashes >= self.config.max_crashes)
                if stages:
                    stages["ledger"] += time.perf_counter() - ending
                    for stage, seconds in stages.items():
                        STAGE_SECONDS.labels("resize", stage).observe(seconds)

    def skip(self, task: ResizeTask, started: bool = False) -> Disposition:
        """A task of a cancelled run: no result (the join ended the run; its final event lists what was made)."""
        log.info("task %s/%s %s: its run %s was cancelled", task.workflowId, task.taskRef,
                 "stopped" if started else "skipped", task.runId)
        TASKS.labels("CANCELLED", "CANCELLED").inc()
        return Disposition.PROCESSED

    def job(self, task: ResizeTask) -> dict:
        """The task as the pool's job reads it, with the flag file that says its run was cancelled."""
        return {**task.to_dict(), "cancelFlag": self.cancels.flag(task.workflowId, task.runId)}

    async def run(self, task: ResizeTask, entry: Entry, *, sandboxed: bool, ledger: CrashLedger | None = None) -> dict:
        loop = asyncio.get_running_loop()
        while not sandboxed:
            try:
                return await loop.run_in_executor(self.ensure_pool(), self.job_fn, self.job(task))
            except BrokenProcessPool:
                # a pool process died (killed, or a decoder crashed): which task did it is not known,
                # so every task it held becomes a suspect and runs once more, alone, in the sandbox
                log.error("resize pool broke while running %s/%s; restarting it", task.workflowId, task.taskRef)
                self.pool = _shut(self.pool)
                sandboxed = True
        if self._free_sandboxes is None:
            self._free_sandboxes = asyncio.Queue()
            for i in range(len(self.sandboxes)):
                self._free_sandboxes.put_nowait(i)
        slot = await self._free_sandboxes.get()
        try:
            while entry.crashes < self.config.max_crashes:
                if self.sandboxes[slot] is None:
                    self.sandboxes[slot] = _process_pool(self.config, 1, resize_job.init_sandbox)
                limit_s = max(1.0, min(SANDBOX_TIMEOUT_S, (task.deadline - now_ms()) / 1000))
                try:
                    return await asyncio.wait_for(
                        loop.run_in_executor(self.sandboxes[slot], resize_job.run, self.job(task)), limit_s)
                except asyncio.TimeoutError:
                    # a sandbox that hangs must not hold its slot: kill it; the task is retried
                    self.sandboxes[slot] = _shut(self.sandboxes[slot], kill=True)
                    log.error("task %s/%s hung in its sandbox; killed it", task.workflowId, task.taskRef)
                    return {"ok": False, "code": "WORKER_HUNG", "transient": True,
                            "message": f"the sandboxed run did not finish within {limit_s:.0f}s"}
                except BrokenProcessPool:
                    self.sandboxes[slot] = _shut(self.sandboxes[slot])
                    log.error("task %s/%s killed its sandbox (%d)", task.workflowId, task.taskRef, entry.crashes + 1)
                    await (ledger or self.ledger).crashed(entry)
        finally:
            self._free_sandboxes.put_nowait(slot)
        return crashed_outcome(entry)

    def retry(self, task: ResizeTask, outcome: dict) -> RetryLater:
        """The task's next attempt (its record says which, and when it may start) from the retry topic."""
        delay = backoff_s(self.config.retry, task.attempt)
        log.warning("task %s/%s attempt %d failed (%s: %s); retry in %.1fs", task.workflowId, task.taskRef,
                    task.attempt, outcome["code"], outcome["message"], delay)
        again = replace(task, attempt=task.attempt + 1, notBefore=now_ms() + int(delay * 1000))
        return RetryLater(outcome["code"], delay, key=f"{task.workflowId}/{task.taskRef}".encode(),
                          value=serde.encode("ResizeTask", again.to_dict()))

    async def report(self, task: ResizeTask, outcome: dict) -> None:
        facts = SourceFacts.from_dict(outcome["facts"]) if outcome.get("facts") else None
        if outcome["ok"]:
            result = TaskResult(task.workflowId, task.taskRef, SUCCEEDED, task.attempt, now_ms(),
                                output=TaskOutput.from_dict(outcome["output"]), runId=task.runId,
                                deadline=task.deadline, facts=facts)
        else:
            result = TaskResult(task.workflowId, task.taskRef, FAILED, task.attempt, now_ms(),
                                error=TaskError(task.taskRef, outcome["code"], outcome["message"], task.attempt),
                                runId=task.runId, deadline=task.deadline, facts=facts)
        await send(self.topics.events, key=task.workflowId.encode(),
                   value=serde.encode_join_event("TaskResult", result.to_dict()))
        log.info("task %s/%s %s (attempt %d)%s", task.workflowId, task.taskRef, result.status, task.attempt,
                 f", reused {result.output.reusedFrom}" if result.output and result.output.reused else "")
        TASKS.labels(result.status, "" if outcome["ok"] else outcome["code"]).inc()
        if outcome["ok"] and result.output.reused:
            OUTPUTS_REUSED.inc()
        elif outcome["ok"] and "seconds" in outcome:
            TASK_SECONDS.labels(result.output.format).observe(outcome["seconds"])

    async def release(self, msg: Message) -> Disposition:
        """Retry topic: wait until the task's not-before time (or its deadline), then put it back."""
        try:
            task = ResizeTask.from_dict(serde.decode("ResizeTask", msg.value or b""))
        except SerdeError as exc:
            raise Reject("NOT_A_TASK", str(exc)) from None
        await wait_not_before(msg, min(task.notBefore, task.deadline))
        if self.cancels.cancelled(task.workflowId, task.runId):
            return self.skip(task)
        lane = self.topics.tasks_batch if lane_of(task.priority) == BATCH else self.topics.tasks
        await send(lane, key=f"{task.workflowId}/{task.taskRef}".encode(), value=msg.value, headers=msg.headers)
        return Disposition.PROCESSED


async def _settled(begin: asyncio.Future) -> Entry | None:
    """The entry a ledger start that was not waited for made, once it is made (None: it failed)."""
    try:
        entry, _suspect = await asyncio.shield(begin)
        return entry
    except BaseException:  # its own failure; or this task cancelled meanwhile: its row goes when idle, or stays
        return None


def _shut(pool: Executor | None, kill: bool = False) -> None:
    if pool is not None:
        if kill:  # the executor has no kill of its own: end its processes, then the pool sees them gone
            for process in list(getattr(pool, "_processes", {}).values()):
                process.kill()
        pool.shutdown(wait=False, cancel_futures=True)
    return None


def run(config: Config) -> int:
    """The resize role: its agents on a confluent-kafka loop (adapters/agent_loop.py), until a signal."""
    async def setup(topics: Topics) -> tuple[AgentLoop, Callable[[], None]]:
        resizer = Resizer(config, topics)
        policies = {name: MessagePolicy(name, config, dead_letter=topics.dead_letter, retry_topic=topics.retries)
                    for name in ("resize", "resize.batch", "resize.retry")}

        async def revoked(keys: set[tuple[str, int]]) -> None:
            for ledger in resizer.ledgers.values():
                mine = {p for t, p in keys if t == ledger.tasks_topic}
                try:
                    await asyncio.wait_for(ledger.release(mine), 5.0)
                except Exception as exc:  # rows left behind only make their sources suspects for the next owner
                    log.warning("crash-ledger rows of revoked %s partitions not tombstoned (%s: %s)",
                                ledger.tasks_topic, type(exc).__name__, exc)
                    ledger.forget(mine)

        def lost(keys: set[tuple[str, int]]) -> None:
            for ledger in resizer.ledgers.values():
                ledger.forget({p for t, p in keys if t == ledger.tasks_topic})

        # a lane's tasks: its slots' worth computing (resizer.gate, shared by both lanes) and, beside them, one
        # per pool process and (a thread pool) one per slot, uploading or sending their results meanwhile
        slots = config.resize_slots + config.resize_processes + \
            (config.resize_slots if config.resize_pool == "thread" else 0)
        agents = AgentLoop(config, "resize", [
            policy_lane(topics.tasks, policies["resize"], resizer.handle, slots),
            policy_lane(topics.tasks_batch, policies["resize.batch"], lambda msg: resizer.handle(msg, BATCH), slots),
            policy_lane(topics.retries, policies["resize.retry"], resizer.release, 64),
        ], on_revoked=revoked, on_lost=lost)
        resizer.cancels.start()
        resizer.ensure_pool()
        return agents, resizer.close

    return run_agents(config, "resize", setup)
