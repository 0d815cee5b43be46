"""The one error policy (agents/policy.py): every message ends processed, retried or dead-lettered."""
import asyncio

import pytest

from streams.agents.common import send
from streams.agents.policy import ATTEMPTS, NOT_BEFORE, Disposition, Message, MessagePolicy, Reject
from streams.config import Config, Retry


class MessageSizeTooLargeError(Exception):
    """Named as agent_loop.send_error names librdkafka's MSG_SIZE_TOO_LARGE: the broker refuses the record for good."""


class FakeTopic:
    def __init__(self, name: str, fail_with: list[Exception] | None = None):
        self.name = name
        self.sent: list[dict] = []
        self.fail_with = list(fail_with or [])

    def get_topic_name(self) -> str:
        return self.name

    async def send(self, **kw):
        if self.fail_with:
            raise self.fail_with.pop(0)
        self.sent.append(kw)
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


def make(max_retries=2):
    config = Config(retry=Retry(max_retries=max_retries, delay_s=0.01, max_delay_s=0.01))
    dlq, retry = FakeTopic("x.dlq"), FakeTopic("x.retry")
    return MessagePolicy("test", config, dead_letter=dlq, retry_topic=retry), dlq, retry


def msg(attempts: int | None = None) -> Message:
    headers = {"mine": b"1"} if attempts is None else {"mine": b"1", ATTEMPTS: str(attempts).encode()}
    return Message(b"k", b"v", headers, {"topic": "in", "partition": "3", "offset": "42"})


def run(coro):
    return asyncio.run(coro)


def test_processed():
    policy, dlq, retry = make()

    async def ok(m):
        return Disposition.PROCESSED
    assert run(policy.process(msg(), ok)) is Disposition.PROCESSED
    assert dlq.sent == [] and retry.sent == []


def test_reject_is_dead_lettered_at_once_with_key_bytes_headers_and_origin():
    policy, dlq, retry = make()

    async def bad(m):
        raise Reject("NOT_A_TASK", "garbage")
    assert run(policy.process(msg(), bad)) is Disposition.DEAD_LETTERED
    (letter,) = dlq.sent
    h = letter["headers"]
    assert (letter["key"], letter["value"]) == (b"k", b"v")
    assert h["mine"] == b"1" and h["imagefork.error.code"] == b"NOT_A_TASK"
    assert h["imagefork.source.topic"] == b"in" and h["imagefork.source.partition"] == b"3"
    assert h["imagefork.source.offset"] == b"42" and h[ATTEMPTS] == b"1"
    assert retry.sent == []


def test_unexpected_error_goes_round_the_retry_topic_then_to_the_dead_letters():
    policy, dlq, retry = make(max_retries=2)

    async def boom(m):
        raise RuntimeError("bug")
    assert run(policy.process(msg(), boom)) is Disposition.RETRIED
    assert retry.sent[0]["headers"][ATTEMPTS] == b"2" and int(retry.sent[0]["headers"][NOT_BEFORE]) > 0
    assert run(policy.process(msg(2), boom)) is Disposition.RETRIED
    assert run(policy.process(msg(3), boom)) is Disposition.DEAD_LETTERED
    h = dlq.sent[0]["headers"]
    assert h["imagefork.error.code"] == b"INTERNAL" and b"RuntimeError: bug" in h["imagefork.error.reason"]
    assert h[ATTEMPTS] == b"3"


def test_a_refused_record_fails_fast_into_the_dead_letters():
    policy, dlq, _retry = make()
    out = FakeTopic("x.events", fail_with=[MessageSizeTooLargeError("too big")])

    async def produces(m):
        await send(out, key=m.key, value=b"x" * 10)
    assert run(asyncio.wait_for(policy.process(msg(), produces), 5)) is Disposition.DEAD_LETTERED
    assert dlq.sent[0]["headers"]["imagefork.error.code"] == b"SEND_REJECTED"


def test_a_broker_away_is_waited_out():
    out = FakeTopic("x.events", fail_with=[ConnectionError("away"), ConnectionError("away")])
    run(send(out, key=b"k", value=b"v"))
    assert len(out.sent) == 1


def test_when_even_the_dead_letter_topic_fails_the_message_stays_in_flight_until_it_takes_it():
    """Every way out failed: the message is never acked. It stays in flight (no commit passes its offset)
    and the dead letter is tried again until the topic takes it."""
    from streams.adapters.inflight import IN_FLIGHT
    policy, dlq, _retry = make()
    policy.DEAD_LETTER_PAUSE_S = (0.05, 0.05)
    dlq.fail_with = [MessageSizeTooLargeError("no"), ConnectionError("away")]

    async def bad(m):
        raise Reject("X", "y")

    before = IN_FLIGHT.count()

    async def watch():
        task = asyncio.ensure_future(policy.process(msg(), bad))
        await asyncio.sleep(0.02)
        held = IN_FLIGHT.count() - before
        return held, await task
    held, outcome = run(watch())
    assert held == 1 and outcome is Disposition.DEAD_LETTERED and len(dlq.sent) == 1
    assert IN_FLIGHT.count() == before


def test_a_message_cancelled_mid_way_stays_in_flight():
    from streams.adapters.inflight import IN_FLIGHT
    policy, _dlq, _retry = make()
    before = IN_FLIGHT.count()

    async def slow(m):
        await asyncio.sleep(10)

    async def cancel():
        task = asyncio.ensure_future(policy.process(Message(b"k", b"v", {}, {"topic": "c", "partition": "1",
                                                                             "offset": "7"}), slow))
        await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    run(cancel())
    assert IN_FLIGHT.count() == before + 1
    IN_FLIGHT.end("c", 1, 7)
    assert IN_FLIGHT.count() == before  # the process-wide ledger as it was: a drain later in this process waits for nothing


def test_a_handlers_retry_later_goes_to_the_retry_topic_with_its_value_key_and_headers():
    """The one retry path: a handler's RetryLater (a source that did not answer, a transient task failure)
    is sent by the policy, with the attempts + 1 and the not-before time, counted under the agent's role."""
    from streams import metrics
    from streams.agents.policy import RetryLater
    policy, dlq, retry = make()
    policy.role = "metrics-role"
    counted = metrics.RETRIES.labels("metrics-role", "SOURCE_UNAVAILABLE")
    before = counted._value.get()

    async def later(m):
        return RetryLater("SOURCE_UNAVAILABLE", 2.0, key=b"wf", value=b"again", headers={"run": b"r1"})
    assert run(policy.process(msg(2), later)) is Disposition.RETRIED
    (sent,) = retry.sent
    h = sent["headers"]
    assert (sent["key"], sent["value"]) == (b"wf", b"again")
    assert h["mine"] == b"1" and h["run"] == b"r1" and h[ATTEMPTS] == b"3"
    from streams.core.models import now_ms
    assert now_ms() + 1000 < int(h[NOT_BEFORE]) <= now_ms() + 2000
    assert counted._value.get() == before + 1 and dlq.sent == []


def test_a_retry_topic_that_refuses_sends_the_message_to_the_dead_letters():
    from streams.agents.policy import RetryLater
    policy, dlq, retry = make()
    retry.fail_with = [MessageSizeTooLargeError("too big")]

    async def later(m):
        return RetryLater("SOURCE_UNAVAILABLE", 0.01)
    assert run(asyncio.wait_for(policy.process(msg(), later), 5)) is Disposition.DEAD_LETTERED
    h = dlq.sent[0]["headers"]
    assert h["imagefork.error.code"] == b"INTERNAL" and b"the retry was refused" in h["imagefork.error.reason"]
    assert (dlq.sent[0]["key"], dlq.sent[0]["value"]) == (b"k", b"v")  # the original, not the retry's bytes
