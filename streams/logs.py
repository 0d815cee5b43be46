"""Logging for every process: one line format (or JSON lines) for imagefork's lines and every library's,
nothing but text, and filters that keep a broker's absence or a library's retries to a line each."""
from __future__ import annotations

import json
import logging
import re
import socket
import sys
import threading
import time


# --- logging: one line format for every logger, and nothing but text ----------------------------
# CSI sequences (colours, cursor) and control characters other than tab and newline
_TERMINAL_CODES = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|[\x00-\x08\x0b-\x1f\x7f]")


class LineFormatter(logging.Formatter):
    """``time role[pid] LEVEL message`` for imagefork's lines and every library's alike; a library's
    line names it (``boto3: ...``; librdkafka's come through ``imagefork.kafka``). Terminal control
    codes (colours, a spinner's cursor and backspaces) are dropped: a log is text, on a TTY or in a file."""

    def __init__(self, role: str):
        super().__init__(f"%(asctime)s {role}[%(process)d] %(levelname)s %(source)s%(message)s")

    def format(self, record: logging.LogRecord) -> str:
        record.source = source_of(record.name)
        return _TERMINAL_CODES.sub("", super().format(record))


class JsonFormatter(logging.Formatter):
    """IMAGEFORK_LOG_FORMAT=json: one JSON object per line, ``time`` (ISO 8601, UTC), ``role``, ``pid``,
    ``level``, ``logger``, ``message``, and ``workflowId`` / ``taskRef`` when the line is about one (a
    workflow's lines say ``workflow ID ...``, a task's ``task ID/REF ...``), ``exception`` with a trace."""

    _TASK = re.compile(r"\btask (?P<wf>[A-Za-z0-9][A-Za-z0-9._:-]*)/(?P<ref>[A-Za-z0-9._:-]+)")
    _WORKFLOW = re.compile(r"\bworkflow (?P<wf>[A-Za-z0-9][A-Za-z0-9._:-]*)")

    def __init__(self, role: str):
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        message = _TERMINAL_CODES.sub("", record.getMessage())
        line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
                "role": self.role, "pid": record.process, "level": record.levelname,
                "logger": "librdkafka" if record.name == "imagefork.kafka" else record.name, "message": message}
        task = self._TASK.search(message)
        if task:
            line["workflowId"], line["taskRef"] = task["wf"], task["ref"]
        else:
            flow = self._WORKFLOW.search(message)
            if flow:
                line["workflowId"] = flow["wf"]
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def source_of(logger: str) -> str:
    if logger == "imagefork.kafka":
        return "librdkafka: "
    if logger == "imagefork" or logger.startswith("imagefork."):
        return ""
    return f"{logger.split('.')[0]}: "


class TransientRetries(logging.Filter):
    """A client's retry line that is normal for a moment, while the broker's transaction coordinator loads
    or moves (at every broker start): librdkafka logs it at WARNING ("GETPID ... Coordinator load in
    progress: retrying") and retries on its own. Such a line goes to DEBUG; one still coming after
    ``patience_s`` shows as a WARNING."""

    def __init__(self, patience_s: float = 30.0, clock=time.monotonic):
        super().__init__()
        self.patience_s, self.clock = patience_s, clock
        self.spells: dict[tuple, tuple[float, float]] = {}  # (logger, template) -> (first, last) seen

    def filter(self, record: logging.LogRecord) -> bool:
        if not is_transient(record):
            return True
        now, key = self.clock(), (record.name, str(record.msg))
        first, last = self.spells.get(key, (now, now))
        if now - last > self.patience_s:
            first = now  # a new spell
        self.spells[key] = (first, now)
        level = logging.DEBUG if now - first < self.patience_s else logging.WARNING
        record.levelno, record.levelname = level, logging.getLevelName(level)
        return logging.getLogger(record.name).isEnabledFor(level)


class BrokerAway(logging.Filter):
    """While the broker does not answer, the Kafka clients log their reconnects (librdkafka: "Connect to ...
    failed: Connection refused", "brokers are down") many times a minute
    for as long as it lasts. The first such line becomes one WARNING that says so, where, and when the broker
    last answered; the rest are dropped; one line says when it is back. The broker is watched with a TCP
    connect to the first bootstrap address every ``every_s`` (while it is there: "last seen"; while it is
    away: "back")."""

    FAILURES = re.compile(
        r"Connection refused|All broker connections are down|brokers are down|Connect to ipv4|Connect to ipv6")

    def __init__(self, bootstrap: str, every_s: float = 2.0, clock=time.time, reachable=None):
        super().__init__()
        self.bootstrap, self.every_s, self.clock = bootstrap, every_s, clock
        self.reachable = reachable or self._tcp
        self.last_seen = clock()
        self.away_since: float | None = None
        self._lock = threading.Lock()
        self._watch: threading.Thread | None = None

    def _tcp(self) -> bool:
        host, _, port = self.bootstrap.split(",")[0].strip().rpartition(":")
        try:
            with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=2):
                return True
        except (OSError, ValueError):
            return False

    def watch(self) -> None:
        """Start the watcher thread (once)."""
        if self._watch is None:
            self._watch = threading.Thread(target=self._watch_forever, name="broker watch", daemon=True)
            self._watch.start()

    def _watch_forever(self) -> None:
        while True:
            self.check()
            time.sleep(self.every_s)

    def check(self) -> None:
        if not self.reachable():
            return
        with self._lock:
            self.last_seen, away_since, self.away_since = self.clock(), self.away_since, None
        if away_since is not None:
            logging.getLogger("imagefork").info("Kafka at %s is back, after %.0fs away", self.bootstrap,
                                                self.last_seen - away_since)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != "imagefork.kafka":
            return True
        if self.away_since is not None:
            return record.levelno < logging.WARNING  # what the clients say while it is away: said once already
        try:
            text = record.getMessage()
        except Exception:
            return True
        if not self.FAILURES.search(text) or self.reachable():
            return True  # not the broker gone (one connection dropped, say): the line as it is
        with self._lock:
            if self.away_since is not None:
                return False
            self.away_since = self.clock()
        seen = time.strftime("%H:%M:%S", time.localtime(self.last_seen))
        record.name, record.levelno, record.levelname = "imagefork", logging.WARNING, "WARNING"
        record.msg, record.args = (f"Kafka at {self.bootstrap} does not answer (last seen {seen}, "
                                   f"{self.away_since - self.last_seen:.0f}s ago; first error: {text[:200]}); "
                                   f"the clients retry on their own, and one line here says when it is back"), None
        return True


class RepeatedLines(logging.Filter):
    """A broker away makes the clients repeat one line many times a second (librdkafka's "Connect to
    ... failed: Connection refused" per reconnect: 25,000 lines in 4 minutes in one worker's log). A library's
    line whose text, digits aside, was written less than ``every_s`` ago is held back; the next one written
    says how many were."""

    _NUMBERS = re.compile(r"\d+")

    def __init__(self, every_s: float = 10.0, clock=time.monotonic):
        super().__init__()
        self.every_s, self.clock = every_s, clock
        self.seen: dict[tuple[str, str], tuple[float, int]] = {}  # key -> (last written, held back since)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("imagefork") and record.name != "imagefork.kafka":
            return True  # our own lines are few and each one counts
        try:
            text = record.getMessage()
        except Exception:  # a library's bad format string: let the handler report it
            return True
        key = (record.name, self._NUMBERS.sub("#", text))
        now = self.clock()
        last, held = self.seen.get(key, (None, 0))
        if last is not None and now - last < self.every_s:
            self.seen[key] = (last, held + 1)
            return False
        if len(self.seen) > 1000:  # many different lines: forget the old ones
            self.seen.clear()
        self.seen[key] = (now, 0)
        if held:
            record.msg, record.args = f"{text} ({held} more like it held back)", None
        return True


def is_transient(record: logging.LogRecord) -> bool:
    args = record.args if isinstance(record.args, tuple) else ()
    if record.name == "imagefork.kafka":  # confluent-kafka calls log(level, "%s [%s] %s", facility, client, text)
        return len(args) == 3 and args[0] == "GETPID" and str(args[2]).endswith(": retrying")
    return False


def setup_logging(role: str, level: str, stream=None, fmt: str = "text", bootstrap: str = "") -> logging.Handler:
    """One handler on the root logger for every line of the process: the libraries' at ``level``
    (IMAGEFORK_LOG_LEVEL), imagefork's own (ready, planned, task done, warnings) at INFO or below."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(role) if fmt == "json" else LineFormatter(role))
    if bootstrap:  # a worker: a broker away is one line, and its return another
        away = BrokerAway(bootstrap)
        handler.addFilter(away)
        away.watch()
    handler.addFilter(TransientRetries())
    handler.addFilter(RepeatedLines())
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    threshold = logging.getLevelName(level.upper())
    root.setLevel(threshold)
    logging.getLogger("imagefork").setLevel(min(logging.INFO, threshold))
    return handler
