"""Read one partition of a small compacted topic to its end (the resize crash ledger)."""
from __future__ import annotations

from streams.adapters.kafka import committed_records
from streams.config import Config


def read_partition(config: Config, topic: str, partition: int, timeout_s: float = 30.0) -> dict[bytes, bytes]:
    """The live rows of ``topic[partition]``: the last value of each key, tombstoned keys left out."""
    rows: dict[bytes, bytes] = {}
    for msg in committed_records(config, topic, partitions=[partition], timeout=timeout_s):
        if msg.value() is None:
            rows.pop(msg.key(), None)
        else:
            rows[msg.key()] = msg.value()
    return rows
