"""Operations on a running pipeline: the dead-letter topic read as a table, and dead letters sent back.

A dead letter (agents/policy.py, join/apply.py) is the original message (key, value, headers) plus
headers saying why and where it came from: ``imagefork.error.code``, ``imagefork.error.reason``,
``imagefork.source.topic|partition|offset``, ``imagefork.attempts``, ``imagefork.agent``. Its own place
on the dead-letter topic (topic/partition/offset) is its id: it never changes while the record is kept.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass

from streams.adapters.kafka import KafkaUnavailable, client_config, producer_config, read_to_end
from streams.config import Config
from streams.errors import ImageforkError

HEADER_PREFIX = "imagefork."  # the pipeline's own headers: dropped on replay
# agents whose dead letters hold a request (their value is what `imagefork submit` sends)
REQUEST_AGENTS = ("planner", "planner.batch", "planner.retry")


class OpsError(ImageforkError, RuntimeError):
    """One line for the user: an unknown id, a dead letter that cannot go where it was asked to."""


@dataclass(frozen=True)
class DeadLetter:
    id: str  # topic/partition/offset of the dead letter itself
    timestamp_ms: int
    agent: str
    code: str
    reason: str
    origin_topic: str
    origin_partition: str
    origin_offset: str
    attempts: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]  # all of them, as written

    @property
    def origin(self) -> str:
        return "/".join((self.origin_topic, self.origin_partition, self.origin_offset)) if self.origin_topic else ""

    @property
    def time(self) -> str:
        """UTC, to the second."""
        if self.timestamp_ms <= 0:
            return ""
        moment = datetime.datetime.fromtimestamp(self.timestamp_ms / 1000, datetime.timezone.utc)
        return moment.strftime("%Y-%m-%d %H:%M:%S")

    @property
    def key_text(self) -> str:
        return "" if self.key is None else self.key.decode("utf-8", "replace")

    def replay_headers(self) -> list[tuple[str, bytes]]:
        """The original message's headers without the pipeline's own (``imagefork.*``: why it was
        dead-lettered, its attempts, its run id and retry times), so a replay is a new submission."""
        return [(k, v) for k, v in self.headers if not k.startswith(HEADER_PREFIX)]

    def to_dict(self) -> dict:
        return {"id": self.id, "time": self.time, "timestampMs": self.timestamp_ms, "agent": self.agent,
                "code": self.code, "reason": self.reason, "origin": self.origin, "key": self.key_text or None,
                "attempts": self.attempts, "valueBytes": len(self.value or b""),
                "headers": {k: v.decode("utf-8", "replace") for k, v in self.headers if v is not None}}


def dead_letter_of(msg) -> DeadLetter:
    """A consumed record of the dead-letter topic (a confluent-kafka Message) as a ``DeadLetter``."""
    headers = tuple((k, v if v is not None else b"") for k, v in (msg.headers() or []))
    last = {k: v.decode("utf-8", "replace") for k, v in headers}  # a header written twice: the last one
    try:
        attempts = int(last.get(f"{HEADER_PREFIX}attempts", "1"))
    except ValueError:
        attempts = 1
    _kind, timestamp = msg.timestamp()
    return DeadLetter(
        id=f"{msg.topic()}/{msg.partition()}/{msg.offset()}", timestamp_ms=timestamp or 0,
        agent=last.get(f"{HEADER_PREFIX}agent", ""), code=last.get(f"{HEADER_PREFIX}error.code", ""),
        reason=last.get(f"{HEADER_PREFIX}error.reason", ""),
        origin_topic=last.get(f"{HEADER_PREFIX}source.topic", ""),
        origin_partition=last.get(f"{HEADER_PREFIX}source.partition", ""),
        origin_offset=last.get(f"{HEADER_PREFIX}source.offset", ""),
        attempts=attempts, key=msg.key(), value=msg.value(), headers=headers)


def read_dead_letters(config: Config, timeout: float = 60.0, answer_s: float = 10.0) -> list[DeadLetter]:
    """Every committed dead letter on the topic now, read to its end (``read_to_end``), oldest first. A
    broker that does not answer within ``answer_s`` raises ``KafkaUnavailable``."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    try:  # a quick look first: the reader would wait its full metadata timeout for a broker that is away
        AdminClient(client_config(config)).list_topics(config.topics.dead_letter, timeout=answer_s)
    except KafkaException as exc:
        err = exc.args[0] if exc.args else exc
        raise KafkaUnavailable(f"Kafka at {config.bootstrap_servers} did not answer within {answer_s:g} s: "
                               f"{err.str() if hasattr(err, 'str') else err}") from None
    letters = [dead_letter_of(m) for m in read_to_end(config, config.topics.dead_letter, timeout)]
    return sorted(letters, key=lambda d: (d.timestamp_ms, d.id))


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())  # a reason with newlines stays on its row
    return text if len(text) <= width else text[:width - 3] + "..."


def dead_letter_table(letters: list[DeadLetter], reason_width: int = 60, line_width: int = 0) -> list[str]:
    """One row per dead letter under a header: id, time (UTC), agent, code, origin, key, attempts, reason
    (clipped to ``reason_width``, or with ``line_width`` to what the other columns leave of it, 20 at
    least; ``--json`` has it whole)."""
    head = ("id", "time (UTC)", "agent", "code", "origin", "key", "attempts", "reason")
    rows = [head] + [(d.id, d.time, d.agent, d.code, d.origin, _clip(d.key_text, 40), str(d.attempts), d.reason)
                     for d in letters]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head) - 1)]
    if line_width:
        reason_width = max(20, line_width - sum(w + 2 for w in widths))
    rows = [row[:-1] + (_clip(row[-1], reason_width),) for row in rows]
    widths.append(max(len(r[-1]) for r in rows))
    lines = []
    for n, row in enumerate(rows):
        cells = [c.rjust(w) if i == 6 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def find_dead_letters(letters: list[DeadLetter], ids: list[str], topic: str) -> list[DeadLetter]:
    """The dead letters named by ``ids`` (``topic/partition/offset``, or ``partition/offset`` of the
    dead-letter topic), in the order given, each once. An id not on the topic raises ``OpsError``."""
    by_id = {d.id: d for d in letters}
    chosen: list[DeadLetter] = []
    for given in ids:
        full = given if given.count("/") >= 2 else f"{topic}/{given}"
        found = by_id.get(full)
        if found is None:
            raise OpsError(f"no dead letter {given} on {topic} (ids are topic/partition/offset as "
                           f"`imagefork dlq list` prints them; a record past the topic's retention is gone)")
        if found not in chosen:
            chosen.append(found)
    return chosen


def replay_target(letter: DeadLetter, to: str | None, config: Config) -> str:
    """The topic ``letter`` goes back to: the request topic (``to`` None), the topic it came from
    (``to == "origin"``), or the topic named. Only a request goes to the request topic (a task or a join
    event there would only be dead-lettered again as NOT_A_REQUEST)."""
    requests = config.topics.requests
    if to == "origin":
        if not letter.origin_topic:
            raise OpsError(f"dead letter {letter.id} does not say where it came from "
                           f"(no {HEADER_PREFIX}source.topic header): give --to TOPIC")
        return letter.origin_topic
    target = to or requests
    if target == requests and not is_request(letter, config):
        raise OpsError(f"dead letter {letter.id} came from {letter.origin_topic or 'an unknown topic'} "
                       f"(agent {letter.agent or 'unknown'}): it is not a request; replay it with --to origin")
    return target


def is_request(letter: DeadLetter, config: Config) -> bool:
    t = config.topics
    if letter.origin_topic:
        return letter.origin_topic in (t.requests, t.requests_batch, t.request_retries)
    return letter.agent in REQUEST_AGENTS


@dataclass(frozen=True)
class Sent:
    letter: DeadLetter
    topic: str
    partition: int
    offset: int


def replay(config: Config, plan: list[tuple[DeadLetter, str]], timeout: float = 30.0) -> list[Sent]:
    """Produce each dead letter's original key and value (and its headers but the pipeline's own) to its
    topic; return where each landed, in order. Raises ``OpsError`` if the broker did not take them all."""
    from confluent_kafka import Producer

    producer = Producer(producer_config(config))
    results: dict[int, Sent | str] = {}

    def delivered(n: int, letter: DeadLetter):
        def report(err, msg):
            results[n] = str(err) if err is not None else Sent(letter, msg.topic(), msg.partition(), msg.offset())
        return report

    for n, (letter, topic) in enumerate(plan):
        producer.produce(topic, key=letter.key, value=letter.value, headers=letter.replay_headers(),
                         on_delivery=delivered(n, letter))
    producer.flush(timeout)
    sent = [results[n] for n in range(len(plan)) if isinstance(results.get(n), Sent)]
    failed = [(plan[n][0].id, results.get(n, "not delivered within %.0fs" % timeout))
              for n in range(len(plan)) if not isinstance(results.get(n), Sent)]
    if failed:
        done = "; sent: " + ", ".join(s.letter.id for s in sent) if sent else ""
        raise OpsError(f"{len(failed)} of {len(plan)} not sent to {config.bootstrap_servers}: "
                       f"{failed[0][0]}: {failed[0][1]}{done}")
    return sent


def attached_workers(config: Config, timeout: float = 5.0) -> list[str]:
    """The imagefork consumer groups that have members on this broker, one line each ("imagefork-resize: 2
    (127.0.0.1)"): what ``stack down`` is about to cut off. Empty when the broker does not answer."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient(client_config(config))
    try:
        listed = admin.list_consumer_groups(request_timeout=timeout).result()
        ids = sorted(g.group_id for g in listed.valid if "imagefork-" in g.group_id)
        if not ids:
            return []
        described = admin.describe_consumer_groups(ids, request_timeout=timeout)
        lines = []
        for group in ids:
            members = described[group].result().members
            if members:
                hosts = sorted({m.host.lstrip("/") for m in members})
                lines.append(f"{group}: {len(members)} ({', '.join(hosts)})")
        return lines
    except Exception:  # the broker is already gone or busy: nothing to say about who was attached
        return []
