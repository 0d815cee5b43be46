"""What every agent shares: the clock, logging, a send that rides out a broker restart, and the process around
a role's agents."""
from __future__ import annotations

import asyncio
import logging
import random
from typing import Awaitable, Callable

from streams.adapters.agent_loop import AgentLoop, KafkaTopic, Outbox
from streams.adapters.http import serve
from streams.adapters.kafka import Topics, topics_of
from streams.config import Config

from streams.core.models import now_ms
from streams.core.planning import retry_delay_s

log = logging.getLogger("imagefork")
# a topic with get_topic_name() and an async send() whose result is awaited for the ack
# (adapters/agent_loop.KafkaTopic)
TopicLike = object
__all__ = ["log", "now_ms", "backoff_s", "send", "send_all", "SendRejected", "run_agents"]


def backoff_s(retry, attempt: int) -> float:
    """The configured delay before the next attempt, with jitter."""
    return retry_delay_s(attempt, policy=retry.policy, delay_s=retry.delay_s, max_delay_s=retry.max_delay_s,
                         jitter=random.random())


class SendRejected(RuntimeError):
    """The broker refused a record for good: retrying cannot help (the policy dead-letters the input)."""


# errors that no retry cures (the names agent_loop.send_error gives librdkafka's codes); an unknown topic gets a
# short patience (it may be being created)
_NEVER_RETRIED = {"MessageSizeTooLargeError", "RecordTooLargeError", "TopicAuthorizationFailedError",
                  "ClusterAuthorizationFailedError", "TransactionalIdAuthorizationFailed", "InvalidTopicError",
                  "SaslAuthenticationFailedError", "InvalidRecordError", "CorruptRecordException"}
_UNKNOWN_TOPIC_PATIENCE_S = 30.0


async def send(topic: TopicLike, *, key: bytes | None, value: bytes, headers: dict | None = None,
               patience_s: float = 600.0, partition: int | None = None) -> None:
    """Send and wait for the broker's ack; retry (with backoff) while the broker is away.

    An agent only moves on (and so commits the input's offset) once its outputs are
    acknowledged: at-least-once end to end. A record the broker refuses for good raises
    ``SendRejected`` at once instead of blocking its partition.
    """
    delay, waited = 0.2, 0.0
    while True:
        try:
            pending = await topic.send(key=key, value=value, headers=headers, partition=partition, force=True)
            await pending
            return
        except (asyncio.CancelledError, AttributeError, TypeError, NameError):
            raise
        except Exception as exc:  # librdkafka's delivery errors while a broker is away (agent_loop.send_error)
            kind = type(exc).__name__
            if kind in _NEVER_RETRIED or (kind == "UnknownTopicOrPartitionError"
                                          and waited >= _UNKNOWN_TOPIC_PATIENCE_S):
                raise SendRejected(f"{topic.get_topic_name()} refused a record of {len(value or b'')} bytes: "
                                   f"{kind}: {exc}") from None
            if waited >= patience_s:
                raise
            log.warning("send to %s failed (%s: %s); retrying in %.1fs",
                        topic.get_topic_name(), type(exc).__name__, exc, delay)
            await asyncio.sleep(delay)
            waited += delay
            delay = min(delay * 2, 5.0)


async def send_all(topic: TopicLike, records: list[tuple[bytes | None, bytes]],
                   partitions: list[int | None] | None = None) -> None:
    """Send many records and wait for all their acks at once (in the producer's batches), not one by
    one: a request's 1,000 tasks took 2.2 s sent one at a time, and 0.1 s this way (docs/breakdown.md).
    Each record rides out a broker restart as ``send`` does; the first refusal is raised once all are done.
    ``partitions``: each record's partition (None: its key's)."""
    spots = partitions or [None] * len(records)
    results = await asyncio.gather(*(send(topic, key=key, value=value, partition=spot)
                                     for (key, value), spot in zip(records, spots)), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


def run_agents(config: Config, role: str,
               setup: Callable[[Topics], Awaitable[tuple[AgentLoop, Callable[[], None]]]]) -> int:
    """A role's process (the planner, resize): one producer and the topics that send through it; ``setup(topics)``
    returns the role's :class:`AgentLoop` and what to close once it stopped. Its health and readiness are served,
    and it runs until a signal (drained first: adapters/agent_loop.py)."""
    async def main() -> None:
        outbox = Outbox(config, asyncio.get_running_loop())
        agents, close = await setup(topics_of(config, lambda name: KafkaTopic(name, outbox)))
        serve(config, role, agents.readiness)
        try:
            await agents.run()
        finally:
            left = outbox.close()
            if left:
                log.warning("%s: %d record(s) not delivered at the stop; their inputs are read again", role, left)
            close()

    asyncio.run(main())
    return 0
