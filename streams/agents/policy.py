"""One error policy for every agent on a loop of ours: each message ends processed, retried or dead-lettered.

An agent's handler decodes, calls the core and sends; it returns ``PROCESSED``, or a ``RetryLater`` (run it
again later: a source that did not answer, a task that failed transiently), which the policy carries out on
the agent's retry topic with ``imagefork.attempts`` + 1 and a not-before time; or it raises:

- ``Reject``: the message can never be processed (it does not decode, it is not for us): dead-lettered at
  once with its code.
- ``SendRejected``: the broker refused an output for good (too large, not authorised, no such topic):
  dead-lettered at once, code ``SEND_REJECTED``.
- anything else (a bug, a dependency that failed in a way nobody classified): the original message goes
  to the agent's retry topic with ``imagefork.attempts`` + 1 and a not-before time, so waiting never blocks
  its partition; after ``IMAGEFORK_MAX_RETRIES`` it is dead-lettered as ``INTERNAL`` with its attempts.

Dead letters keep the original key, bytes and headers, and add code, reason, source topic/partition/offset
and attempts. If even the dead-letter topic cannot be written, the dead letter is tried again with a
growing pause (up to a minute) for as long as the process runs: the message stays in flight, so no commit
passes it (``adapters/agent_loop.Offsets``), and a stop hands it to the partition's next owner, never dropped.
"""
from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from streams.adapters.kafka import dead_letter_headers
from streams.adapters.inflight import DRAIN, IN_FLIGHT
from streams.adapters.agent_loop import Lane
from streams.agents.common import SendRejected, TopicLike, backoff_s, log, now_ms, send
from streams.config import Config
from streams.metrics import DEAD_LETTERS, MESSAGES, RETRIES, STAGE_SECONDS

ATTEMPTS = "imagefork.attempts"
NOT_BEFORE = "imagefork.not-before"


class Disposition(enum.Enum):
    PROCESSED = "processed"
    RETRIED = "retried"
    DEAD_LETTERED = "dead_lettered"


class Reject(Exception):
    """This message can never be processed; ``code`` says why in one word."""

    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class Message:
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes]
    where: dict[str, str]
    timestamp_ms: int = 0  # the record's timestamp (0: unknown)

    @property
    def attempts(self) -> int:
        return header_int(self.headers, ATTEMPTS, 1)


def header_int(headers: dict, name: str, default: int) -> int:
    raw = headers.get(name)
    try:
        return int(raw.decode() if isinstance(raw, (bytes, bytearray)) else raw)
    except (TypeError, ValueError, AttributeError, UnicodeDecodeError):
        return default


def _position(msg: Message) -> tuple[str, int, int] | None:
    try:
        return msg.where["topic"], int(msg.where["partition"]), int(msg.where["offset"])
    except (KeyError, ValueError):
        return None


def message_of_record(record) -> Message:
    """A confluent-kafka record as a :class:`Message` (adapters/agent_loop.py hands these over)."""
    headers = {k: (v if isinstance(v, bytes) else str(v or "").encode()) for k, v in record.headers() or ()}
    where = {"topic": record.topic(), "partition": str(record.partition()), "offset": str(record.offset())}
    _kind, stamp = record.timestamp()
    return Message(record.key(), record.value(), headers, where, stamp if stamp and stamp > 0 else 0)


@dataclass(frozen=True)
class RetryLater:
    """A handler's answer: run this message again in ``delay_s``, from the agent's retry topic. ``value`` and
    ``headers`` replace the message's own bytes and add to its headers (a task's next attempt is in its record)."""
    code: str  # why: the label of imagefork_retries_total
    delay_s: float
    key: bytes | None = None
    value: bytes | None = None
    headers: dict[str, bytes] = field(default_factory=dict)


Handler = Callable[[Message], Awaitable["Disposition | RetryLater | None"]]


class MessagePolicy:
    """The wrapper every agent's loop uses; ``retry_topic`` takes messages whose handling failed."""

    def __init__(self, agent: str, config: Config, *, dead_letter: TopicLike, retry_topic: TopicLike,
                 retry_headers: Callable[[Message], dict[str, bytes]] | None = None):
        self.agent = agent
        self.role = agent.partition(".")[0]  # planner.retry -> planner
        self.config = config
        self.dead_letter_topic = dead_letter
        self.retry_topic = retry_topic
        self.retry_headers = retry_headers

    async def process(self, msg: Message, handler: Handler) -> Disposition:
        """Handle one message to one of its three ends. It is in flight (no commit passes it) until then;
        cancelled on the way (a stop), it stays so, and the partition's next owner reads it again."""
        where = _position(msg)
        if where is not None:
            IN_FLIGHT.begin(*where)
        outcome = await self._dispose(msg, handler)
        if where is not None:
            IN_FLIGHT.end(*where)
        MESSAGES.labels(self.agent, outcome.value).inc()
        return outcome

    async def _dispose(self, msg: Message, handler: Handler) -> Disposition:
        try:
            answer = await handler(msg) or Disposition.PROCESSED
            if isinstance(answer, RetryLater):
                return await self.park(msg, answer, self.role)
            return answer
        except asyncio.CancelledError:
            raise
        except Reject as exc:
            return await self.dead_letter(msg, exc.code, exc.reason)
        except SendRejected as exc:
            return await self.dead_letter(msg, "SEND_REJECTED", str(exc))
        except Exception as exc:
            log.exception("%s failed on %s (attempt %d)", self.agent, msg.where, msg.attempts)
            return await self.retry_or_dead_letter(msg, f"{type(exc).__name__}: {exc}")

    async def retry_or_dead_letter(self, msg: Message, reason: str) -> Disposition:
        if msg.attempts > self.config.retry.max_retries:
            return await self.dead_letter(msg, "INTERNAL", reason)
        delay = backoff_s(self.config.retry, msg.attempts)
        log.warning("%s: retrying %s in %.1fs (attempt %d failed: %s)", self.agent, msg.where, delay,
                    msg.attempts, reason[:300])
        retry = RetryLater("INTERNAL", delay, headers=self.retry_headers(msg) if self.retry_headers else {})
        return await self.park(msg, retry, self.agent, reason)

    async def park(self, msg: Message, retry: RetryLater, label: str, reason: str = "") -> Disposition:
        """The one way to the retry topic: the message (or ``retry.value``) with its attempts + 1 and the
        time it may run again; a retry topic that refuses it sends it to the dead letters."""
        headers = {**msg.headers, **retry.headers, ATTEMPTS: str(msg.attempts + 1).encode(),
                   NOT_BEFORE: str(now_ms() + int(retry.delay_s * 1000)).encode()}
        key = msg.key if retry.key is None else retry.key
        value = msg.value if retry.value is None else retry.value
        try:
            await send(self.retry_topic, key=key, value=value, headers=headers)
        except Exception as exc:  # the retry topic refused it: park it where a person will look
            why = f"{reason or retry.code}; then the retry was refused: {type(exc).__name__}: {exc}"
            return await self.dead_letter(msg, "INTERNAL", why)
        RETRIES.labels(label, retry.code).inc()
        return Disposition.RETRIED

    DEAD_LETTER_PAUSE_S = (1.0, 60.0)  # the first and the longest pause between tries of a refused dead letter

    async def dead_letter(self, msg: Message, code: str, reason: str) -> Disposition:
        log.warning("%s dead-lettered %s: %s: %s", self.agent, msg.where, code, reason[:300])
        headers = {**msg.headers, **dead_letter_headers(code, reason, msg.where),
                   ATTEMPTS: str(msg.attempts).encode(), "imagefork.agent": self.agent.encode()}
        pause, longest = self.DEAD_LETTER_PAUSE_S
        while True:
            try:
                await send(self.dead_letter_topic, key=msg.key, value=msg.value, headers=headers)
                break
            except Exception as exc:  # every way out failed: keep the message, and keep trying
                log.error("%s: the dead-letter topic refused %s (%s: %s); trying again in %.0fs, the message "
                          "stays uncommitted", self.agent, msg.where, type(exc).__name__, exc, pause)
                DEAD_LETTERS.labels(self.agent, "REFUSED").inc()
                await asyncio.sleep(pause)
                pause = min(longest, pause * 2)
        DEAD_LETTERS.labels(self.agent, code).inc()
        return Disposition.DEAD_LETTERED


async def wait_not_before(msg: Message, not_before_ms: int = 0) -> None:
    """A retry topic's agent: sleep until the message's not-before time (the header's or the record's)."""
    wait_ms = max(header_int(msg.headers, NOT_BEFORE, 0), not_before_ms) - now_ms()
    if wait_ms > 0:
        DRAIN.parked += 1  # only waiting: a draining stop hands it back rather than wait for it
        try:
            await asyncio.sleep(wait_ms / 1000)
            if DRAIN.started:
                await DRAIN.hold()
        finally:
            DRAIN.parked -= 1


def policy_lane(topic: TopicLike, policy: MessagePolicy, handler: Handler, concurrency: int) -> Lane:
    """An agent on adapters/agent_loop.py: each record of ``topic`` through ``policy`` to ``handler``, at most
    ``concurrency`` at once; the time from the consumer's hand-over to the start is the ``loop`` stage."""
    async def handle(record, taken_at: float) -> None:
        STAGE_SECONDS.labels(policy.agent, "loop").observe(time.perf_counter() - taken_at)
        await policy.process(message_of_record(record), handler)
    return Lane(topic.get_topic_name(), concurrency, handle)
