"""The idempotent aiokafka producers of the Faust roles (streams/adapters/faust.py), against the real broker: a batch
the broker refuses for good must not shut its partition for the rest of the producer's life."""
from __future__ import annotations

import asyncio
import uuid

import pytest
from confluent_kafka.admin import AdminClient, NewTopic

from streams.adapters.faust import idempotent_producers

pytestmark = pytest.mark.integration


def test_a_refused_record_leaves_its_partition_open_to_the_next(stack_env):
    """A record over the topic's max.message.bytes is refused (the planner dead-letters its request as
    SEND_REJECTED); the next record to the same partition, from the same idempotent producer, is written.
    Without the rewind (aiokafka 0.14 keeps the refused batch's sequence numbers), the broker answers every
    later batch of that partition with OutOfOrderSequenceNumber: a planner whose plan was once too large
    never sends to that events partition again (CI: a replayed request that never ended)."""
    from aiokafka import AIOKafkaProducer
    from aiokafka.errors import MessageSizeTooLargeError

    idempotent_producers()
    bootstrap = stack_env["KAFKA_BOOTSTRAP_SERVERS"]
    topic = f"refused-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, 1, 1, config={"max.message.bytes": "1024"})])[topic].result(30)

    async def run() -> list:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, acks="all",
                                    request_timeout_ms=10000)
        await producer.start()
        try:
            first = await producer.send_and_wait(topic, b"small", key=b"k")
            with pytest.raises(MessageSizeTooLargeError):
                await producer.send_and_wait(topic, b"x" * 4000, key=b"k")
            after = [await asyncio.wait_for(producer.send_and_wait(topic, f"after {i}".encode(), key=b"k"), 20)
                     for i in range(3)]
            return [first, *after]
        finally:
            await producer.stop()

    written = asyncio.run(run())
    assert [m.offset for m in written] == [0, 1, 2, 3], written
    admin.delete_topics([topic])[topic].result(30)
