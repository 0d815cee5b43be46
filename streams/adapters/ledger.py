"""Read one partition of a small compacted topic to its end (the resize crash ledger)."""
from __future__ import annotations

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition


def read_partition(client_config: dict, topic: str, partition: int, timeout_s: float = 30.0) -> dict[bytes, bytes]:
    """The live rows of ``topic[partition]``: the last value of each key, tombstoned keys left out."""
    consumer = Consumer({**client_config, "group.id": f"{topic}.reader", "enable.auto.commit": False,
                         "enable.partition.eof": True, "log_level": 3})
    rows: dict[bytes, bytes] = {}
    try:
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=timeout_s)
        if high <= low:
            return rows
        consumer.assign([TopicPartition(topic, partition, OFFSET_BEGINNING)])
        while True:
            msg = consumer.poll(timeout_s)
            if msg is None:
                raise KafkaException(f"no answer reading {topic}[{partition}] within {timeout_s:.0f}s")
            if msg.error():
                if msg.error().code() == msg.error()._PARTITION_EOF:
                    return rows
                raise KafkaException(msg.error())
            if msg.value() is None:
                rows.pop(msg.key(), None)
            else:
                rows[msg.key()] = msg.value()
            if msg.offset() + 1 >= high:
                return rows
    finally:
        consumer.close()
