"""Consumer lag of the roles' groups, read from the brokers: a Prometheus collector and a status report.

The lag of a partition is its end offset (the last stable offset: read_committed, as the join reads) less
the group's committed offset; a partition the group never committed is read from its start (every group
resets to earliest), so its lag is every record still there. A scrape reads the offsets at most once per
``cache_s`` and waits at most ``timeout_s`` for them: a broker away gives no lag samples and one more
``imagefork_lag_scrape_errors_total``, never a scrape that hangs.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from prometheus_client import REGISTRY
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from streams.adapters.kafka import KafkaUnavailable, client_config
from streams.config import Config
from streams.metrics import LAG_SCRAPE_ERRORS

log = logging.getLogger("imagefork")

ROLES = ("planner", "resize", "join")


def role_topics(config: Config, role: str) -> tuple[str, ...]:
    """The topics a role's group consumes (any other topic it committed offsets for is shown too)."""
    t = config.topics
    return {"planner": (t.requests, t.requests_batch, t.request_retries), "resize": (t.tasks, t.tasks_batch, t.retries),
            "join": (t.events,), "webhook": (t.completed, t.webhook_redeliver)}.get(role, ())


def lane_topics(config: Config) -> dict[str, str]:
    """The topics of the priority lanes (core/lanes.py), and each one's lane."""
    t = config.topics
    return {t.requests: "interactive", t.tasks: "interactive", t.requests_batch: "batch", t.tasks_batch: "batch"}


@dataclass(frozen=True)
class PartitionLag:
    topic: str
    partition: int
    committed: int | None  # None: the group never committed an offset here
    end: int
    start: int = 0  # the first offset still there: where a group without a commit starts

    @property
    def lag(self) -> int:
        return max(0, self.end - (self.start if self.committed is None else self.committed))


@dataclass(frozen=True)
class Member:
    member_id: str
    client_id: str
    host: str
    assigned: tuple[tuple[str, int], ...]  # (topic, partition)


@dataclass
class GroupStatus:
    role: str
    group: str
    partitions: list[PartitionLag] = field(default_factory=list)
    state: str = ""  # only when described (status report)
    members: list[Member] = field(default_factory=list)
    error: str = ""  # this group's offsets could not be read

    @property
    def lag(self) -> int:
        return sum(p.lag for p in self.partitions)


def _one_line(exc: BaseException) -> str:
    arg = exc.args[0] if exc.args else None
    text = arg.str() if callable(getattr(arg, "str", None)) else str(exc)  # a KafkaError's own text
    return " ".join(f"{type(exc).__name__}: {text or 'timed out'}".split())[:300]


def _state_name(state) -> str:
    name = getattr(state, "name", str(state))
    return "".join(word.title() for word in name.split("_"))  # PREPARING_REBALANCE -> PreparingRebalance


def read_groups(admin, config: Config, roles, timeout_s: float = 4.0, describe: bool = False) -> list[GroupStatus]:
    """Committed and end offsets of each role's group, all within ``timeout_s``. Raises KafkaUnavailable when
    the cluster cannot be read at all; a group whose offsets cannot be read has its ``error`` set."""
    from confluent_kafka import ConsumerGroupTopicPartitions, IsolationLevel, TopicPartition
    from confluent_kafka.admin import OffsetSpec

    deadline = time.monotonic() + timeout_s

    def left() -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise KafkaUnavailable(f"Kafka at {config.bootstrap_servers} did not answer within {timeout_s:g} s")
        return remaining

    try:
        topics = admin.list_topics(timeout=left()).topics
        groups = [GroupStatus(role, config.group_id(role)) for role in roles]
        asked = {g.group: admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(g.group)],
                                                            request_timeout=left())[g.group] for g in groups}
        described = admin.describe_consumer_groups([g.group for g in groups], request_timeout=left()) \
            if describe else {}
        committed: dict[str, dict[tuple[str, int], int | None]] = {}
        for g in groups:
            mine = committed[g.group] = {(t, p): None for t in role_topics(config, g.role)
                                         if t in topics and topics[t].error is None for p in topics[t].partitions}
            try:
                answer = asked[g.group].result(timeout=left())
            except KafkaUnavailable:
                raise
            except Exception as exc:  # this group only (its coordinator moving, say)
                g.error = _one_line(exc)
                continue
            for tp in answer.topic_partitions or ():
                if tp.error is None:
                    mine[(tp.topic, tp.partition)] = tp.offset if tp.offset >= 0 else None
        wanted = {key for offsets in committed.values() for key in offsets}
        never = {key for offsets in committed.values() for key, offset in offsets.items() if offset is None}
        ends = admin.list_offsets({TopicPartition(t, p): OffsetSpec.latest() for t, p in wanted},
                                  isolation_level=IsolationLevel.READ_COMMITTED, request_timeout=left()) \
            if wanted else {}
        starts = admin.list_offsets({TopicPartition(t, p): OffsetSpec.earliest() for t, p in never},
                                    request_timeout=left()) if never else {}
        end, start = _offsets(ends, left), _offsets(starts, left)
        for g in groups:
            if not g.error:
                g.partitions = [PartitionLag(t, p, offset, end[(t, p)], start.get((t, p), 0))
                                for (t, p), offset in sorted(committed[g.group].items()) if (t, p) in end]
            if describe:
                try:
                    d = described[g.group].result(timeout=left())
                except KafkaUnavailable:
                    raise
                except Exception as exc:
                    g.error = g.error or _one_line(exc)
                    continue
                g.state = _state_name(d.state)
                g.members = sorted((Member(m.member_id, m.client_id, m.host, tuple(sorted(
                    (tp.topic, tp.partition) for tp in (m.assignment.topic_partitions if m.assignment else ()) or ())))
                    for m in d.members), key=lambda m: (m.assigned, m.member_id))
        return groups
    except KafkaUnavailable:
        raise
    except Exception as exc:  # a KafkaException (timed out, transport) or a future that timed out
        raise KafkaUnavailable(f"cannot read the consumer groups at {config.bootstrap_servers}: "
                               f"{_one_line(exc)}") from None


def _offsets(futures: dict, left) -> dict[tuple[str, int], int]:
    """The offsets that were answered (a partition gone since, say, is left out)."""
    out = {}
    for tp, future in futures.items():
        try:
            out[(tp.topic, tp.partition)] = future.result(timeout=left()).offset
        except KafkaUnavailable:
            raise
        except Exception:
            if all(not f.done() for f in futures.values()):
                raise
    return out


def admin_client(config: Config):
    from confluent_kafka.admin import AdminClient
    return AdminClient(client_config(config))


# --- the Prometheus collector ---------------------------------------------------------------------

class LagCollector(Collector):
    """``imagefork_consumer_lag`` and ``imagefork_consumer_committed_offset`` per group, topic and
    partition, for the roles added; the offsets are read at most once per ``cache_s``."""

    def __init__(self, config: Config, cache_s: float = 5.0, timeout_s: float = 4.0, admin=None):
        self.config, self.cache_s, self.timeout_s = config, cache_s, timeout_s
        self.roles: list[str] = []
        self._admin = admin
        self._lock = threading.Lock()
        self._groups: list[GroupStatus] = []
        self._read_at = float("-inf")
        self._failing = False

    def add(self, roles) -> None:
        with self._lock:
            self.roles.extend(r for r in roles if r not in self.roles)
            self._read_at = float("-inf")

    def describe(self):
        return []  # nothing is read at registration; the families are made at each scrape

    def collect(self):
        lag = GaugeMetricFamily("imagefork_consumer_lag", "Records of a partition its consumer group has not "
                                "committed yet (end offset, read_committed, less the committed offset)",
                                labels=["group", "topic", "partition"])
        committed = GaugeMetricFamily("imagefork_consumer_committed_offset", "A consumer group's committed "
                                      "offset in a partition", labels=["group", "topic", "partition"])
        by_lane = GaugeMetricFamily("imagefork_lane_lag", "Records a role's group has not committed yet in each "
                                    "priority lane's topic (interactive, batch)", labels=["role", "lane"])
        lanes = lane_topics(self.config)
        for g in self.groups():
            for p in g.partitions:
                labels = [g.group, p.topic, str(p.partition)]
                lag.add_metric(labels, p.lag)
                if p.committed is not None:
                    committed.add_metric(labels, p.committed)
            for lane, value in lanes_of(g, lanes).items():
                by_lane.add_metric([g.role, lane], value)
        yield lag
        yield committed
        yield by_lane

    def groups(self) -> list[GroupStatus]:
        """The last reading, taken anew when older than ``cache_s`` (by one scrape; the others wait for it)."""
        if not self._lock.acquire(timeout=self.timeout_s + 1):
            return []
        try:
            if time.monotonic() - self._read_at < self.cache_s:
                return self._groups
            try:
                if self._admin is None:
                    self._admin = admin_client(self.config)
                self._admin.poll(0)  # serve the client's queued log lines (they reach the logger only here)
                groups = read_groups(self._admin, self.config, self.roles, self.timeout_s)
                failed = [g for g in groups if g.error]
                problem = "; ".join(f"{g.group}: {g.error}" for g in failed)
            except Exception as exc:
                groups, failed, problem = [], [None], _one_line(exc)
            if failed:
                LAG_SCRAPE_ERRORS.inc()
                if not self._failing:
                    log.warning("consumer lag not read (%s); the lag metrics have no samples meanwhile", problem)
            elif self._failing:
                log.info("consumer lag read again")
            self._failing = bool(failed)
            self._groups, self._read_at = groups, time.monotonic()
            return groups
        finally:
            self._lock.release()


_collector: LagCollector | None = None
_collector_lock = threading.Lock()


def register_lag(config: Config, roles, registry=REGISTRY) -> LagCollector:
    """Export the consumer lag of ``roles``' groups from this process (one collector, however often called)."""
    global _collector
    with _collector_lock:
        if _collector is None:
            _collector = LagCollector(config)
            registry.register(_collector)
        _collector.add(roles)
        return _collector


# --- the status report ----------------------------------------------------------------------------

def status_report(config: Config, timeout_s: float = 10.0) -> str:
    """Each role's group: its state, its members with their partitions' offsets and lag, and totals.
    Raises KafkaUnavailable (a one-line message) when the cluster does not answer."""
    admin = admin_client(config)
    return format_status(read_groups(admin, config, ROLES, timeout_s, describe=True), lane_topics(config))


def lanes_of(g: GroupStatus, lanes: dict[str, str]) -> dict[str, int]:
    """A group's lag per priority lane (none for a role without lanes)."""
    out: dict[str, int] = {}
    for p in g.partitions:
        if p.topic in lanes:
            out[lanes[p.topic]] = out.get(lanes[p.topic], 0) + p.lag
    return out


def format_status(groups: list[GroupStatus], lanes: dict[str, str] | None = None) -> str:
    lines: list[str] = []
    for g in groups:
        if lines:
            lines.append("")
        members = f"{len(g.members)} member{'' if len(g.members) == 1 else 's'}"
        lines.append(f"{g.role}  group {g.group}  {g.state or 'state unknown'}, {members}, lag {g.lag}")
        if g.error:
            lines.append(f"  offsets not read: {g.error}")
        by_key = {(p.topic, p.partition): p for p in g.partitions}
        shown: set[tuple[str, int]] = set()
        rows: list[tuple[str, ...]] = []
        for m in g.members:
            member_id = m.member_id[len(m.client_id) + 1:] if m.member_id.startswith(f"{m.client_id}-") else m.member_id
            rows.append((f"  member {m.client_id or '-'} on {m.host or '-'} ({member_id})",))
            for key in m.assigned:
                shown.add(key)
                rows.append(_row(key, by_key.get(key)))
            if not m.assigned:
                rows.append(("    no partitions",))
        rest = [key for key in by_key if key not in shown]
        if rest:
            rows.append(("  not assigned to a member",))
            rows.extend(_row(key, by_key[key]) for key in rest)
        lines.extend(_aligned(rows))
        lines.append(f"  total: lag {g.lag} over {len(g.partitions)} partitions, "
                     f"committed in {sum(p.committed is not None for p in g.partitions)}")
        by_lane = lanes_of(g, lanes or {})
        if by_lane:
            lines.append("  lanes: " + ", ".join(f"{lane} lag {lag}" for lane, lag in sorted(
                by_lane.items(), key=lambda kv: kv[0] != "interactive")))
    lines.append("")
    lines.append(f"all roles: lag {sum(g.lag for g in groups)}"
                 + ("" if not any(g.error for g in groups) else
                    f" (offsets not read for {', '.join(g.role for g in groups if g.error)})"))
    return "\n".join(lines)


def _row(key: tuple[str, int], p: PartitionLag | None) -> tuple[str, ...]:
    topic, partition = key
    if p is None:
        return (f"    {topic}", str(partition), "committed -", "end -", "lag -")
    return (f"    {topic}", str(partition), f"committed {'-' if p.committed is None else p.committed}",
            f"end {p.end}", f"lag {p.lag}")


def _aligned(rows: list[tuple[str, ...]]) -> list[str]:
    """Rows of partition columns aligned (member lines, of one column, are left as they are)."""
    table = [r for r in rows if len(r) > 1]
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))] if table else []
    out = []
    for r in rows:
        if len(r) == 1:
            out.append(r[0])
        else:
            out.append("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) if i == 1 else cell.ljust(w)
                                 for i, (cell, w) in enumerate(zip(r, widths))).rstrip())
    return out
