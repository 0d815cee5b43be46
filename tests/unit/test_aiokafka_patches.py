"""What streams/adapters/faust.py changes in aiokafka 0.14 under Faust (the refused batch's sequence numbers have a
test against the real broker: tests/integration/test_producers.py)."""
import asyncio
from types import SimpleNamespace

import pytest
from aiokafka.consumer.fetcher import Fetcher
from aiokafka.errors import NotLeaderForPartitionError

from streams.adapters.faust import refresh_metadata_on_stale_leaders


class FakeClient:
    """A leader that says it is not the leader any more, and a record of metadata refreshes."""

    def __init__(self):
        self.refreshes = 0

    async def send(self, node_id, request):
        return SimpleNamespace(API_VERSION=1, topics=[("t", [(0, NotLeaderForPartitionError.errno, -1, -1)])])

    def force_metadata_update(self):
        self.refreshes += 1


def test_a_stale_leader_in_an_offset_look_up_asks_for_new_metadata_at_once():
    """Before: the fetcher asked the same node again every retry backoff until the metadata's own refresh
    (5 minutes): a resize worker read nothing for 4 minutes after a broker's rolling restart."""
    refresh_metadata_on_stale_leaders()
    fetcher = object.__new__(Fetcher)
    fetcher._client = FakeClient()
    fetcher._isolation_level = 0
    with pytest.raises(NotLeaderForPartitionError):
        asyncio.run(fetcher._proc_offset_request(1, {"t": [(0, -2)]}))
    assert fetcher._client.refreshes == 1
