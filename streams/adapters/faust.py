"""The Faust apps, one per role, each its own consumer group, and their data folders; nothing else."""
from __future__ import annotations

import asyncio
import atexit
import fcntl
import glob
import logging
import os
import shutil
import tempfile

import faust
from aiokafka.errors import KafkaError

from streams.adapters import offsets
from streams.adapters.kafka import Topics, faust_credentials, replication_factor, topics_of
from streams.config import Config

log = logging.getLogger("imagefork")
ROLES = ("planner",)  # the Faust role; resize, the join and webhooks run confluent-kafka loops of their own


async def partition_count(topic: faust.TopicT, timeout_s: float = 5.0) -> int:
    """The topic's partitions as the app's producer knows them (its metadata, fetched when missing); 0 when
    they cannot be known now (the caller then lets the keys decide)."""
    try:
        producer = topic.app.producer._ensure_producer()  # Faust's own aiokafka producer
        return len(await asyncio.wait_for(producer.partitions_for(topic.get_topic_name()), timeout_s) or ())
    except (asyncio.TimeoutError, AttributeError, KafkaError) as exc:
        log.warning("partitions of %s not known (%s: %s); its records go where their keys hash",
                    topic.get_topic_name(), type(exc).__name__, exc)
        return 0


def idempotent_producers() -> None:
    """Faust's aiokafka producers with ``enable_idempotence`` (and acks=all, which it requires). Faust
    asks for it only in its exactly-once mode (``Producer._settings_extra``); at least once, a producer
    retrying a batch whose ack was lost (a broker gone mid-request) would write it twice. Installed once,
    for every Faust app of the process."""
    from faust.transport.drivers import aiokafka as driver
    if getattr(driver.Producer, "_imagefork_idempotent", False):
        return
    settings_extra = driver.Producer._settings_extra

    def _settings_extra(self):
        return {**settings_extra(self), "acks": "all", "enable_idempotence": True}

    driver.Producer._settings_extra = _settings_extra
    driver.Producer._imagefork_idempotent = True
    rewind_refused_sequences()


def refresh_metadata_on_stale_leaders() -> None:
    """aiokafka 0.14 finds the start of a partition with no committed offset by asking its leader; when the
    answer is NotLeaderForPartition (leadership moved: a broker restarted, or the controller handed the
    partition back to its preferred leader) it asks the same node again, every retry backoff, until the
    metadata's own refresh (``metadata_max_age_ms``, 5 minutes): every partition in that request waits that
    long. Here a stale-leader answer asks for new metadata at once, as aiokafka's other offset look-ups do.
    Pinned by tests/unit/test_aiokafka_patches.py."""
    from aiokafka.consumer import fetcher
    from aiokafka.errors import KafkaError
    if getattr(fetcher.Fetcher, "_imagefork_refreshes", False):
        return
    ask = fetcher.Fetcher._proc_offset_request

    async def refreshing(self, node_id, topic_data):
        try:
            return await ask(self, node_id, topic_data)
        except KafkaError as exc:
            if getattr(exc, "invalid_metadata", False):
                self._client.force_metadata_update()
            raise

    fetcher.Fetcher._proc_offset_request = refreshing
    fetcher.Fetcher._imagefork_refreshes = True


# what a broker answers for a batch it refused before appending it (it kept nothing of it)
_REFUSED_UNWRITTEN = ("MessageSizeTooLargeError", "RecordListTooLargeError", "CorruptRecordException",
                      "InvalidTopicError", "TopicAuthorizationFailedError", "InvalidTimestampError",
                      "InvalidRequiredAcksError", "UnsupportedForMessageFormatError", "PolicyViolationError")


def rewind_refused_sequences() -> None:
    """An idempotent aiokafka producer numbers a batch when it sends it, and never takes the number back:
    after a batch the broker refused (a record over the topic's ``max.message.bytes``), every later batch
    to that partition is out of sequence (``OutOfOrderSequenceNumber``), and the partition is shut for the
    life of the producer (aiokafka 0.14; the Java client rewinds, ``adjustSequencesDueToFailedBatch``).
    Here the partition's next number goes back to the refused batch's first, which is safe: aiokafka has
    one batch in flight per partition, and these errors mean the broker appended none of it."""
    from aiokafka.producer import sender
    handler = sender.SendProduceReqHandler
    if getattr(handler, "_imagefork_rewinds", False):
        return
    handle_response = handler.handle_response

    def rewinding(self, response):
        handle_response(self, response)
        txn = self._sender._txn_manager
        if txn is None or txn.transactional_id is not None:  # not idempotent, or a transaction's to abort
            return
        for tp, batch in self._batches.items():
            future = batch.future
            if (future.done() and not future.cancelled() and future.exception() is not None
                    and type(future.exception()).__name__ in _REFUSED_UNWRITTEN):
                txn._sequence_numbers[tp] = max(0, txn.sequence_number(tp) - batch.record_count)

    handler.handle_response = rewinding
    handler._imagefork_rewinds = True


def create_app(role: str, config: Config) -> faust.App:
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}: choose one of {', '.join(ROLES)}")
    offsets.install()  # commits never pass a message still in flight (faust-streaming #606)
    idempotent_producers()
    refresh_metadata_on_stale_leaders()
    return faust.App(
        config.group_id(role),
        broker=[f"kafka://{server.strip()}" for server in config.bootstrap_servers.split(",")],
        broker_credentials=faust_credentials(config),
        key_serializer="raw",
        value_serializer="raw",
        web_enabled=False,
        datadir=data_dir(role),
        store="memory://",
        topic_partitions=config.partitions,
        # what ensure_topics chose for this cluster (3 on a 3-broker one), for the topics Faust declares
        topic_replication_factor=replication_factor(config),
        # planner and resize are at-least-once (idempotent outputs); the join is transactional on its own
        # (streams/join/); see docs/failure-semantics.md
        processing_guarantee="at_least_once",
        producer_acks=-1,
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=0.5,
        # a killed worker's partitions move to the others after this long
        broker_session_timeout=config.session_timeout_s,
        broker_heartbeat_interval=max(0.5, config.session_timeout_s / 5),
        stream_wait_empty=False,
        table_standby_replicas=0,
        table_cleanup_interval=3600.0,
    )


_held: list[int] = []  # the locks on this process's data folders live as long as the process


def data_dir(role: str) -> str:
    """A data folder of this process's own for Faust, which creates one at start even with the memory
    store (and writes nothing there). It is removed when the process exits; one left by a process that
    could not clean up (SIGKILL, the OOM killer) is removed by the next worker that starts here, or by
    whoever reaps the dead one (``remove_stale_data_dirs``). The process holds a lock on its folder while
    it lives, which is how a dead process's folder is told from a live one's."""
    remove_stale_data_dirs()
    # made under a name the sweep does not look at, locked, then renamed, so a sweep by a process starting
    # beside this one never takes it between creation and lock (pinned by tests/unit/test_data_dir.py).
    # The lock is on the folder itself: it survives the rename.
    hidden = tempfile.mkdtemp(prefix=f".imagefork-{role}-")
    fd = os.open(hidden, os.O_RDONLY | os.O_DIRECTORY)  # not inherited by exec'd children (PEP 446)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    folder = os.path.join(os.path.dirname(hidden), os.path.basename(hidden)[1:])
    os.rename(hidden, folder)
    _held.append(fd)
    atexit.register(_remove_if_owner, folder, os.getpid())
    return folder


def _remove_if_owner(folder: str, owner: int) -> None:
    if os.getpid() == owner:  # not in a forked child that inherited the exit handler
        shutil.rmtree(folder, ignore_errors=True)


def remove_stale_data_dirs(tmp: str | None = None) -> list[str]:
    """Remove the data folders whose process is gone (no lock on them); the paths removed."""
    removed = []
    for role in ROLES:
        for path in glob.glob(os.path.join(tmp or tempfile.gettempdir(), f"imagefork-{role}-*")):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # its process is alive
            finally:
                os.close(fd)  # on both paths: a lock taken here is released with it
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def declare_topics(app: faust.App, config: Config) -> Topics:
    return topics_of(config, lambda name: app.topic(name, key_type=bytes, value_type=bytes,
                                                    partitions=config.partitions, replicas=replication_factor(config)))
