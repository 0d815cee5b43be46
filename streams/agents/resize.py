"""Resize: task -> pool (fetch staged source, resize, encode, upload) -> result to the join.

Transient failures go to the retry topic with a not-before time, so waiting
never blocks a partition; the retry agent puts them back on the task topic.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import faust

from streams import serde
from streams.agents import resize_job
from streams.agents.common import backoff_s, dead_letter_headers, log, now_ms, origin, send
from streams.app import Topics
from streams.config import Config
from streams.core.models import FAILED, SUCCEEDED, ResizeTask, TaskError, TaskOutput, TaskResult
from streams.serde import SerdeError


def make_pool(config: Config) -> Executor:
    if config.resize_pool == "thread":
        resize_job.init(config)
        return ThreadPoolExecutor(max_workers=config.resize_slots, thread_name_prefix="resize")
    import multiprocessing
    ctx = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(max_workers=config.resize_slots, mp_context=ctx,
                               initializer=resize_job.init, initargs=(config,))


class Resizer:
    def __init__(self, config: Config, topics: Topics):
        self.config = config
        self.topics = topics
        self.pool: Executor | None = None

    def ensure_pool(self) -> Executor:
        if self.pool is None:
            self.pool = make_pool(self.config)
        return self.pool

    async def handle(self, value: bytes, where: dict[str, str]) -> None:
        try:
            task = ResizeTask.from_dict(serde.decode("ResizeTask", value))
        except SerdeError as exc:
            log.error("dropping undecodable task at %s: %s", where, exc)
            await send(self.topics.dead_letter, key=None, value=value,
                       headers=dead_letter_headers("NOT_A_TASK", str(exc), where))
            return
        if now_ms() >= task.deadline:
            return await self.report(task, {"ok": False, "code": "DEADLINE_EXCEEDED", "transient": False,
                                            "message": "the workflow deadline passed before this task ran"})
        outcome = await self.run(task)
        if not outcome["ok"] and outcome["transient"] and task.attempt <= self.config.retry.max_retries:
            return await self.schedule_retry(task, outcome)
        await self.report(task, outcome)

    async def run(self, task: ResizeTask) -> dict:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self.ensure_pool(), resize_job.run, task.to_dict())
        except BrokenProcessPool:
            # a worker process died (killed, or a decoder crashed): start a fresh pool; the task retries
            log.error("resize pool broke while running %s/%s; restarting it", task.workflowId, task.taskRef)
            broken, self.pool = self.pool, None
            if broken is not None:
                broken.shutdown(wait=False, cancel_futures=True)
            return {"ok": False, "code": "WORKER_CRASHED", "transient": True,
                    "message": "the resize process died while working on this task"}

    async def schedule_retry(self, task: ResizeTask, outcome: dict) -> None:
        delay = backoff_s(self.config.retry, task.attempt)
        log.warning("task %s/%s attempt %d failed (%s: %s); retry in %.1fs", task.workflowId, task.taskRef,
                    task.attempt, outcome["code"], outcome["message"], delay)
        retry = ResizeTask(**{**task.to_dict(), "attempt": task.attempt + 1,
                              "notBefore": now_ms() + int(delay * 1000)})
        await send(self.topics.retries, key=f"{task.workflowId}/{task.taskRef}".encode(),
                   value=serde.encode("ResizeTask", retry.to_dict()))

    async def report(self, task: ResizeTask, outcome: dict) -> None:
        if outcome["ok"]:
            result = TaskResult(task.workflowId, task.taskRef, SUCCEEDED, task.attempt, now_ms(),
                                output=TaskOutput.from_dict(outcome["output"]), runId=task.runId)
        else:
            result = TaskResult(task.workflowId, task.taskRef, FAILED, task.attempt, now_ms(),
                                error=TaskError(task.taskRef, outcome["code"], outcome["message"], task.attempt),
                                runId=task.runId)
        await send(self.topics.events, key=task.workflowId.encode(),
                   value=serde.encode_join_event("TaskResult", result.to_dict()))
        log.info("task %s/%s %s (attempt %d)", task.workflowId, task.taskRef, result.status, task.attempt)

    async def release(self, value: bytes) -> None:
        """Retry topic: wait until the task's not-before time (or its deadline), then put it back."""
        try:
            task = ResizeTask.from_dict(serde.decode("ResizeTask", value))
        except SerdeError as exc:
            log.error("dropping undecodable retry: %s", exc)
            return
        wait_ms = min(task.notBefore, task.deadline) - now_ms()
        if wait_ms > 0:
            await asyncio.sleep(wait_ms / 1000)
        await send(self.topics.tasks, key=f"{task.workflowId}/{task.taskRef}".encode(), value=value)


def register(app: faust.App, config: Config, topics: Topics) -> Resizer:
    resizer = Resizer(config, topics)

    @app.agent(topics.tasks, concurrency=config.resize_slots, name="imagefork.resize")
    async def resize_tasks(stream):
        async for event in stream.events():
            where = origin(event)
            try:
                await resizer.handle(event.value, where)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("resize failed on %s", where)

    @app.agent(topics.retries, concurrency=64, name="imagefork.retry")
    async def release_retries(stream):
        async for event in stream.events():
            try:
                await resizer.release(event.value)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("retry release failed")

    @app.task
    async def warm_up():
        resizer.ensure_pool()

    return resizer
