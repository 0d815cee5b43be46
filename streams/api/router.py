"""The join's state over HTTP: the API's Kafka adapter that finds, in the join group's description, the
join process owning a workflow's partition (each join's client id carries the URL of its endpoints), and
asks it (``/internal/workflows/{id}``, ``/internal/open``)."""
from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from streams.adapters.kafka import client_config, partition_for
from streams.api.directory import Unavailable
from streams.config import Config
from streams.join.queries import CLIENT_ID

log = logging.getLogger("imagefork")


class JoinRouter:
    """Which join process owns a workflow's partition, and its answer."""

    def __init__(self, config: Config, session: aiohttp.ClientSession):
        self.config, self.session = config, session
        self.admin = AdminClient(client_config(config))
        self.group = config.group_id("join")
        self.owners: dict[int, str] = {}  # events partition -> join URL
        self.urls: list[str] = []
        self.partitions = 0
        self.fresh_at = 0.0
        self.describing = asyncio.Lock()

    def _describe(self, timeout_s: float = 10.0) -> None:
        try:
            self._describe_with(self.admin, timeout_s)
        except Exception:
            # a client whose calls failed (the broker away, restarted) may stay stuck timing out after the
            # broker is back: the next look uses a new one
            self.admin = AdminClient(client_config(self.config))
            raise

    def _describe_with(self, admin: AdminClient, timeout_s: float = 10.0) -> None:
        topic = self.config.topics.events
        meta = admin.list_topics(topic, timeout=timeout_s).topics.get(topic)
        partitions = len(meta.partitions) if meta is not None and meta.error is None else 0
        group = admin.describe_consumer_groups([self.group], request_timeout=timeout_s)[self.group].result()
        owners, urls = {}, []
        for member in group.members:
            name, _, url = (member.client_id or "").partition(" ")
            if name != CLIENT_ID or not url:
                continue
            urls.append(url)
            for tp in member.assignment.topic_partitions:
                if tp.topic == topic:
                    owners[tp.partition] = url
        self.owners, self.urls, self.partitions, self.fresh_at = owners, urls, partitions, time.monotonic()

    async def refresh(self, max_age_s: float = 2.0, timeout_s: float = 10.0) -> None:
        if time.monotonic() - self.fresh_at > max_age_s:
            async with self.describing:  # many requests at once: one look at the group serves them all
                if time.monotonic() - self.fresh_at > max_age_s:
                    await asyncio.to_thread(self._describe, timeout_s)

    async def ask(self, workflow_id: str, patience_s: float = 15.0) -> dict:
        """The owner's answer for ``workflow_id`` (state open, finished or unknown); asks again while the
        partition has no owner or its owner has not restored it (a rebalance), up to ``patience_s``."""
        give_up = time.monotonic() + patience_s
        last = "no join process is running"
        while True:
            try:
                # a broker away: each Kafka call waits no longer than the caller's patience (a submit's
                # look-up, 3 s, waited the calls' own 10 s before its produce got its 10 s)
                await self.refresh(timeout_s=min(10.0, max(1.0, give_up - time.monotonic())))
                if not self.urls and time.monotonic() - self.fresh_at < 1.0:
                    # the group, just described, has no join at all: nothing to wait for
                    raise Unavailable(f"no join process is running (the group {self.group} has no members)")
                if self.partitions:
                    url = self.owners.get(partition_for(workflow_id.encode(), self.partitions))
                    if url is None:
                        last = "the workflow's partition has no join process (a rebalance, or none running)"
                    else:
                        async with self.session.get(f"{url}/internal/workflows/{workflow_id}",
                                                    timeout=aiohttp.ClientTimeout(total=5)) as resp:
                            body = await resp.json()
                            if resp.status == 200:
                                return body
                            last = f"the join at {url} answered {resp.status}: {body.get('message')}"
            except (aiohttp.ClientError, asyncio.TimeoutError, KafkaException, ValueError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() > give_up:
                raise Unavailable(last)
            self.fresh_at = 0.0  # ask the group again
            await asyncio.sleep(0.25)

    async def open_workflows(self, limit: int) -> list[dict]:
        """What every join holds open (at most ``limit`` each); none when the group cannot be described
        (the broker away: the list shows the finished ones, and the log says so)."""
        try:
            await self.refresh()
        except KafkaException as exc:
            log.warning("api: the open workflows cannot be listed now: %s", exc)
            return []

        async def one(url):
            try:
                async with self.session.get(f"{url}/internal/open", params={"limit": str(limit)},
                                            timeout=aiohttp.ClientTimeout(total=5)) as resp:
                    return (await resp.json()).get("workflows", []) if resp.status == 200 else []
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                return []

        lists = await asyncio.gather(*(one(u) for u in self.urls))
        return [w for found in lists for w in found]
