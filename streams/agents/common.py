"""What every agent shares: the clock, logging, and a send that rides out a broker restart."""
from __future__ import annotations

import asyncio
import logging
import time

import faust

log = logging.getLogger("imagefork")


def now_ms() -> int:
    return int(time.time() * 1000)


async def send(topic: faust.TopicT, *, key: bytes | None, value: bytes, headers: dict | None = None,
               patience_s: float = 600.0) -> None:
    """Send and wait for the broker's ack; retry (with backoff) while the broker is away.

    An agent only moves on (and so commits the input's offset) once its outputs are
    acknowledged: at-least-once end to end.
    """
    delay, waited = 0.2, 0.0
    while True:
        try:
            pending = await topic.send(key=key, value=value, headers=headers, force=True)
            await pending
            return
        except (asyncio.CancelledError, AttributeError, TypeError, NameError):
            raise
        except Exception as exc:  # aiokafka raises several error types while a broker is away
            if waited >= patience_s:
                raise
            log.warning("send to %s failed (%s: %s); retrying in %.1fs",
                        topic.get_topic_name(), type(exc).__name__, exc, delay)
            await asyncio.sleep(delay)
            waited += delay
            delay = min(delay * 2, 5.0)
