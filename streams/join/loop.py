"""The join's read-process-write loop (the shape of confluent-kafka's ``eos-transactions.py``): poll a
batch of the events topic, apply it inside the open transaction, commit with the consumed offsets; on
assignment restore, on revocation commit first, on loss or a failed commit abort and restore."""
from __future__ import annotations

import logging
import signal
import time

from confluent_kafka import Consumer, KafkaError, KafkaException

from streams.adapters.http import advertised_url, serve
from streams.adapters.kafka import client_config, group_timing
from streams.adapters.objectstore import ObjectStore
from streams.config import Config
from streams.core.models import now_ms
from streams.join.apply import Applier
from streams.join.cancels import CancelForwarder
from streams.join.cleanup import SourceCleaner
from streams.join.partitions import ConsumerFailed, Partitions
from streams.join.queries import CLIENT_ID, query_routes, readiness_of
from streams.join.repair import Repairer
from streams.join.session import JoinFatal, Session, instance_id
from streams.metrics import OPEN_WORKFLOWS, WORKFLOW_SECONDS, WORKFLOWS

log = logging.getLogger("imagefork")


def consumer_settings(config: Config, group: str, url: str) -> dict:
    """The join's consumer: read_committed, offsets committed only inside its transactions."""
    # No static membership (group.instance.id): after a broker restart librdkafka can fence the consumer
    # against itself ("Static consumer fenced by other consumer with same group.instance.id").
    return client_config(config, **{
        "group.id": group,
        "enable.auto.commit": False,
        "isolation.level": "read_committed",
        "auto.offset.reset": "earliest",
        "partition.assignment.strategy": "cooperative-sticky",
        **group_timing(config),
        "fetch.wait.max.ms": 100,
        # the group's description names each member's client id: the API finds a partition's owner there
        **({"client.id": f"{CLIENT_ID} {url}"} if url else {}),
    })


def fetch_batch(consumer, size: int, timeout: float) -> list:
    """Up to ``size`` messages: the first waited for up to ``timeout``, the rest what is there already."""
    first = consumer.poll(timeout)
    if first is None:
        return []
    batch = [first, *(consumer.consume(size - 1, timeout=0) if size > 1 else [])]
    for msg in batch:
        err = msg.error()
        if err is not None and err.fatal():
            raise ConsumerFailed(str(err))
    return batch


def group_of(consumer):
    """The group's metadata a transaction's offsets are sent with (the broker checks our generation)."""
    try:
        group = consumer.consumer_group_metadata()
    except KafkaException as exc:
        raise ConsumerFailed(str(exc)) from None
    if not consumer.memberid():
        # out of the group already (the lost-partitions callback has not run yet): committing now would
        # bypass the generation check
        raise KafkaException(KafkaError(KafkaError._STATE, "not a member of the join group"))
    return group


def counted(txn, states: dict) -> None:
    """The metrics of a committed transaction."""
    for status, seconds in txn.finished:
        WORKFLOWS.labels(status).inc()
        WORKFLOW_SECONDS.labels(status).observe(seconds)
    OPEN_WORKFLOWS.set(sum(len(s.open) for s in list(states.values())))


class JoinWorker:
    TICK_BUDGET = 2000  # timeouts and expiries per clock pass, at most; the rest on the next pass

    def __init__(self, config: Config, url: str = ""):
        self.config = config
        self.url = url  # where the API asks this process about the workflows it owns (its client id says it)
        self.topic = config.topics.events
        self.instance, self._lock = instance_id(config)
        group = config.group_id("join")
        self.consumer_config = consumer_settings(config, group, url)
        self.consumer = Consumer(self.consumer_config)
        self.session = Session(config, f"{group}-{self.instance}")
        self.partitions = Partitions(config)
        self.stats = {"events": 0, "finals": 0, "transactions": 0, "aborts": 0}
        self.apply = Applier(config, self.session, self.stats)
        store = ObjectStore(config)
        self.repair = Repairer(config, store)
        self.cleanup = SourceCleaner(store, config.output_prefix)
        self.cancels = CancelForwarder(config)
        self.stopping = False
        self.ready = False

    # --- the loop ------------------------------------------------------------------------------
    def run(self) -> int:
        problem = self.partitions.check(self.consumer)
        if problem:
            raise JoinFatal(problem)
        self.session.init_transactions()
        self._subscribe()
        self.cancels.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._stop)
        last_repair = 0.0
        try:
            while not self.stopping:
                try:
                    self._step()
                except ConsumerFailed as exc:
                    self._rejoin(str(exc))
                mono = time.monotonic()
                if mono - last_repair >= 1.0:
                    last_repair = mono
                    self.repair.scan(self.partitions, self.consumer)
            if self.session.txn.open:
                self._commit()
        finally:
            self._close()
        return 0

    def _stop(self, *_):
        self.stopping = True

    def _subscribe(self) -> None:
        self.consumer.subscribe([self.topic], on_assign=self._assigned, on_revoke=self._revoked, on_lost=self._lost)

    def _step(self) -> None:
        """One turn: read what is there, apply it, commit when it is time."""
        interval = self.config.join_commit_interval_ms / 1000
        txn = self.session.txn
        wait = 0.2 if not txn.open else max(0.0, txn.since + interval - time.monotonic())
        batch = fetch_batch(self.consumer, self.config.join_batch, wait)
        now = now_ms()
        due = any((t := s.next_due()) is not None and t <= now and self._clock_ready(p)
                  for p, s in self.partitions.states.items())
        repaired = self.repair.take()
        if batch or repaired or due:
            # a final event is committed before the lock goes: a query never sees a finish that may roll back
            with self.partitions.lock:
                self._process(batch, repaired, due)
                if txn.open and txn.finals:
                    self._commit()
        if txn.open and (txn.finals or txn.events >= self.config.join_batch
                         or time.monotonic() - txn.since >= interval):
            self._commit()

    def _clock_ready(self, p: int) -> bool:
        read = self.session.txn.offsets.get(p, self.partitions.positions.get(p, 0))
        return self.partitions.clock_ready(self.consumer, p, read)

    def _process(self, batch: list, repaired: list, tick: bool) -> None:
        """Apply a batch, repaired results and the clock's outcomes inside the open transaction (one is
        begun if none is open): state rows, final events, dead letters, and the batch's offsets."""
        states = self.partitions.states
        now = now_ms()
        with self.partitions.lock:
            try:
                txn = self.session.begin()
                for msg in batch:
                    p = msg.partition()
                    if msg.error() is not None:
                        log.warning("join: consumer error: %s", msg.error())
                        continue
                    state = states.get(p)
                    if state is None:
                        continue  # not ours any more: its new owner reads it from the committed offset
                    self.apply.event(p, state, msg, now)
                    txn.offsets[p] = msg.offset() + 1
                    txn.events += 1
                for p, results in repaired:
                    state = states.get(p)
                    for result in results if state is not None else ():
                        self.apply.outcome(p, state.record_result(result, now))
                if tick:
                    budget = self.TICK_BUDGET  # shared by the partitions: one pass stays short
                    for p, state in states.items():
                        if not self._clock_ready(p):
                            continue
                        for outcome in state.due(now, limit=max(1, budget)):
                            self.apply.outcome(p, outcome)
                            budget -= 1
            except KafkaException as exc:
                self._abort(exc.args[0])
            except Exception as exc:  # a bug in this loop: nothing of the transaction is committed; start again
                log.exception("join: batch failed")
                self._abort(KafkaError(KafkaError._FAIL, f"{type(exc).__name__}: {exc}"))
                time.sleep(1.0)

    def _commit(self) -> bool:
        """Commit the open transaction with its offsets; when it cannot commit, abort it and restore."""
        txn = self.session.txn
        try:
            offsets = self.partitions.offsets(txn.offsets)
            self.session.commit(self.topic, offsets, group_of(self.consumer) if offsets else None)
        except KafkaException as exc:
            self._abort(exc.args[0])
            return False
        self.stats["transactions"] += 1
        self.stats["events"] += txn.events
        self.partitions.positions.update(txn.offsets)
        counted(txn, self.partitions.states)
        self.cleanup.committed(txn.after, txn.orphans, txn.sweeps, self.config.staging_prefix)
        txn.close()
        return True

    def _abort(self, err: KafkaError) -> None:
        """The transaction cannot commit: abort it and rebuild the owned partitions from what is
        committed (the in-memory state ran ahead of it)."""
        if err.fatal():
            raise JoinFatal(f"join transaction failed for good: {err}") from None
        self.stats["aborts"] += 1
        txn = self.session.txn
        staged = list(txn.after)  # its commit may have gone through all the same (a call timed out)
        self.cleanup.committed([], list(txn.orphans), list(txn.sweeps), "")  # a cancelled run's, either way
        self.session.aborted(err)
        if self.session.aborts_in_a_row > 1:  # the same failure again: no hot loop of restores
            time.sleep(min(5.0, 0.2 * 2 ** min(self.session.aborts_in_a_row, 5)))
        self.partitions.rewind(self.consumer)
        self.cleanup.finished_after_all(staged, self.partitions.states, self.partitions.of,
                                        self.config.staging_prefix)

    # --- partitions come and go ------------------------------------------------------------
    def _assigned(self, consumer, partitions) -> None:
        if partitions and self.session.txn.open:
            self._commit()  # what was handled for the partitions we keep, before the new ones are read
        added = self.partitions.assign(consumer, partitions)
        owned = len(self.partitions.states)
        if not self.ready or added:
            log.info("imagefork ready: join (%d partitions assigned: %s %d, added %s)", owned, self.topic, owned,
                     sorted(added))
        self.ready = True

    def _revoked(self, consumer, partitions) -> None:
        # called from inside poll(), still in the old generation: what was handled so far is committed
        # now, before the partitions go (their next owner resumes from these offsets)
        if self.session.txn.open:
            self._commit()
        self.partitions.revoke(partitions)

    def _lost(self, consumer, partitions) -> None:
        # taken while we could not answer: the open transaction cannot commit (its generation is gone)
        self.partitions.lose(partitions)
        if self.session.txn.open:
            self._abort(KafkaError(KafkaError._FAIL, "partitions lost"))

    def _rejoin(self, reason: str) -> None:
        """The consumer failed for good (a fatal error): drop the open transaction and every partition's
        state, and join the group again with a new consumer (the partitions come back restored)."""
        log.warning("join: the consumer failed (%s); joining the group again", reason)
        self.session.drop()
        self.partitions.clear()
        try:
            self.consumer.close()
        except Exception as exc:  # it is broken already
            log.debug("join: closing the failed consumer: %s", exc)
        self.consumer = Consumer(self.consumer_config)
        self.partitions.new_reader()
        self._subscribe()

    def _close(self) -> None:
        log.info("join: stopping after %(events)d events, %(finals)d final events, %(transactions)d "
                 "transactions, %(aborts)d aborted", self.stats)
        try:
            self.consumer.close()  # leaves the group: the partitions move at once
        except KafkaException as exc:
            log.warning("join: closing the consumer: %s", exc)
        self.session.close()
        self.partitions.close()
        self.repair.close()
        self.cancels.close()
        self.cleanup.close()


def run(config: Config) -> int:
    box: dict = {}

    def readiness() -> tuple[bool, str]:
        w = box.get("worker")
        return readiness_of(w) if w is not None else (False, "starting")

    # always served (the API routes its queries here), on a free loopback port unless configured
    server = serve(config, "join", readiness, query_routes(box), default_listen="127.0.0.1:0")
    worker = JoinWorker(config, url=advertised_url(server.host, server.port, config.advertised_url))
    box["worker"] = worker
    try:
        return worker.run()
    except JoinFatal as exc:
        log.error("join: %s", exc)
        return 2
    except (KafkaException, TimeoutError) as exc:  # e.g. the state could not be restored: start again later
        log.error("join: stopped: %s: %s", type(exc).__name__, exc)
        return 3
