"""Run one role as a Faust worker, or all three as child processes."""
from __future__ import annotations

import faulthandler
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

from streams.config import Config, metrics_address


# --- logging: one line format for every logger, and nothing but text ----------------------------
# CSI sequences (colours, cursor) and control characters other than tab and newline
_TERMINAL_CODES = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|[\x00-\x08\x0b-\x1f\x7f]")


class LineFormatter(logging.Formatter):
    """``time role[pid] LEVEL message`` for imagefork's lines and every library's alike; a library's
    line names it (``aiokafka: ...``; librdkafka's come through ``imagefork.kafka``). Terminal control
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
    """A client's retry line that is normal for a moment, while the broker's group or transaction
    coordinator loads or moves (at every broker start): aiokafka logs it at ERROR ("Group Coordinator
    Request failed: CoordinatorNotAvailableError"), librdkafka at WARNING ("GETPID ... Coordinator load in
    progress: retrying"). Both clients retry on their own. Such a line goes to DEBUG; one still coming
    after ``patience_s`` shows as a WARNING."""

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
    """While the broker does not answer, the Kafka clients log their reconnects (aiokafka: "Unable connect to
    node", "Unable to update metadata", heartbeats; librdkafka: "Connect to ... failed") many times a minute
    for as long as it lasts. The first such line becomes one WARNING that says so, where, and when the broker
    last answered; the rest are dropped; one line says when it is back. The broker is watched with a TCP
    connect to the first bootstrap address every ``every_s`` (while it is there: "last seen"; while it is
    away: "back")."""

    FAILURES = re.compile(
        r"Connect call failed|Connection at \S+ closed|Unable connect to node|Unable to update metadata|"
        r"NodeNotReadyError|KafkaConnectionError|Connection refused|Unable to request metadata|"
        r"All broker connections are down|Connect to ipv4|Connect to ipv6")

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
        if not (record.name.startswith("aiokafka") or record.name == "imagefork.kafka"):
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
    ... failed: Connection refused" per reconnect, aiokafka's "Unable to update metadata from [1]": 25,000
    lines in 4 minutes in one worker's log). A library's line whose text, digits aside, was written less
    than ``every_s`` ago is held back; the next one written says how many were."""

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
    if record.name.startswith("aiokafka"):  # aiokafka retries these itself
        retried = [type(a).__name__ for a in args if isinstance(a, Exception) and getattr(a, "retriable", False)]
        return bool(retried) and (str(record.msg).startswith("Group Coordinator Request failed")
                                  or any("Coordinator" in name for name in retried))
    if record.name == "imagefork.kafka":  # confluent-kafka calls log(level, "%s [%s] %s", facility, client, text)
        return len(args) == 3 and args[0] == "GETPID" and str(args[2]).endswith(": retrying")
    return False


def setup_logging(role: str, level: str, stream=None, fmt: str = "text", bootstrap: str = "") -> logging.Handler:
    """One handler on the root logger for every line of the process: the libraries' at ``level``
    (IMAGEFORK_LOG_LEVEL; Faust's own INFO lines only at debug), imagefork's own (ready, planned, task
    done, warnings) at INFO or below."""
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
    # Faust's own INFO lines (each service of its tree starting and stopping, some 25 lines each way)
    # show at debug only; aiokafka's (group joined, partitions assigned) stay at info
    framework = threshold if threshold <= logging.DEBUG else max(threshold, logging.WARNING)
    logging.getLogger("faust").setLevel(framework)
    logging.getLogger("mode").setLevel(framework)
    logging.getLogger("imagefork").setLevel(min(logging.INFO, threshold))
    return handler


def describe_assignment(partitions) -> str:
    """``13 partitions assigned: imagefork.requests 6 + imagefork.requests.retry 6 + ...-__assignor-__leader 1``:
    the count per topic, so a total above IMAGEFORK_PARTITIONS is no mystery (a Faust consumer also holds
    its app's one-partition leader topic)."""
    per_topic: dict[str, int] = {}
    for tp in partitions:
        per_topic[tp.topic] = per_topic.get(tp.topic, 0) + 1
    topics = sorted(per_topic, key=lambda t: ("__" in t, t))  # Faust's own topics last
    listed = " + ".join(f"{t} {per_topic[t]}" for t in topics)
    total = sum(per_topic.values())
    return f"{total} partition{'s' if total != 1 else ''} assigned" + (f": {listed}" if listed else "")


def run_role(role: str, config: Config) -> int:
    from streams.adapters.kafka import ensure_topics
    from streams.adapters.schemas import install_resolver, publish_schemas
    from streams.metrics import install

    setup_logging(role, config.log_level, fmt=config.log_format, bootstrap=config.bootstrap_servers)
    created = ensure_topics(config)
    if created:
        logging.getLogger("imagefork").info("created topics %s", ", ".join(created))
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>`: every thread's stack to the log
    check_storage(config)
    install(config, role)
    # before any write: a reader older than this worker finds its schemas there (a rolling deploy)
    publish_schemas(config)
    install_resolver(config)
    if role == "api":  # aiohttp: the HTTP API and the dashboard (streams/api.py)
        from streams import api
        return api.run(config)
    if role == "join":  # a transactional confluent-kafka loop, not a Faust app (see agents/join.py)
        from streams.agents import join
        return join.run(config)
    return run_faust_role(role, config)


def run_faust_role(role: str, config: Config) -> int:
    from streams.adapters.http import serve
    from streams.agents import planner, resize
    from streams.app import create_app, declare_topics

    app = create_app(role, config)
    topics = declare_topics(app, config)
    {"planner": planner.register, "resize": resize.register}[role](app, config, topics)
    log = logging.getLogger("imagefork")
    assigned: dict[str, str] = {}

    async def ready(sender, **kwargs):
        assigned["detail"] = describe_assignment(app.consumer.assignment())
        log.info("imagefork ready: %s (%s)", role, assigned["detail"])

    def readiness() -> tuple[bool, str]:
        if "detail" not in assigned:
            return False, "joining its consumer group"
        if getattr(app, "rebalancing", False):
            return False, "rebalancing"
        return True, assigned["detail"]

    app.on_rebalance_complete.connect(ready)
    serve(config, role, readiness)
    faust_worker(app, grace_s=config.shutdown_grace_s).execute_from_commandline()
    return 0


def faust_worker(app, grace_s: float = 0.0, **kwargs):
    """Faust's worker for ``app``: its lines go through ``setup_logging``, not through mode's own set-up
    (another format, colour codes, print() turned into log lines), and it has no spinner (mode's writes
    cursor codes and backspaces even into a file). A SIGTERM or SIGINT drains first (``Drain``): no
    message is started any more, and the work in flight has ``grace_s`` to finish before Faust stops (and
    commits); a second signal stops at once. What is not finished is handed back to the partition's next
    owner, never committed past."""
    import asyncio

    import faust

    from streams.adapters.offsets import DRAIN
    log = logging.getLogger("imagefork")

    class Worker(faust.Worker):
        def _schedule_shutdown(self, signal_: signal.Signals) -> None:
            if DRAIN.started or grace_s <= 0 or self._signal_stop_time:
                return super()._schedule_shutdown(signal_)
            DRAIN.start()
            log.info("stopping (%s): finishing %d message(s) in flight, for up to %.0fs "
                     "(IMAGEFORK_SHUTDOWN_GRACE_S)", signal_.name, DRAIN.busy(), grace_s)
            asyncio.ensure_future(self._drain_then_stop(signal_), loop=self.loop)

        async def _drain_then_stop(self, signal_: signal.Signals) -> None:
            started = time.monotonic()
            if await DRAIN.wait(grace_s):
                log.info("stopping: the work in flight finished in %.1fs", time.monotonic() - started)
            else:
                log.warning("stopping: %d message(s) still in flight after %.0fs; they go back to their "
                            "partitions' next owner", DRAIN.busy(), grace_s)
            await asyncio.sleep(2 * app.conf.broker_commit_interval)  # the last finished offsets are committed
            super()._schedule_shutdown(signal_)

    worker = Worker(app, quiet=True, override_logging=False, **kwargs)
    worker.spinner = None
    return worker


class StartError(RuntimeError):
    """A worker cannot start; the message says which dependency and where, in one line."""


def check_storage(config: Config) -> None:
    """Every role writes to S3: probe it (and create the bucket) before taking any work."""
    from streams.adapters.objectstore import ObjectStore
    from streams.core.errors import PipelineError
    try:
        ObjectStore(config).ensure_bucket()
    except PipelineError as exc:
        where = config.s3_endpoint_url or f"AWS ({config.s3_region})"
        raise StartError(f"S3 at {where} cannot be used: {exc.message}") from None


# an API that ran this long before it died is started again; one that died sooner cannot start (its port taken)
API_RESTART_AFTER_S = float(os.environ.get("IMAGEFORK_API_RESTART_AFTER_S", "30"))


def _free_port() -> int:
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_all(config: Config) -> int:
    """``worker all``: one child process per role (and the API); if one dies, stop the others and exit
    non-zero."""
    from streams.adapters.kafka import ensure_topics
    ensure_topics(config)  # a broker that refuses us or is away is one line here, not one per child
    roles = ("join", "resize", "planner")
    address = metrics_address(config)
    # each child serves its metrics on IMAGEFORK_METRICS_LISTEN's port and the next two (free loopback
    # ports when it is not set), and the API's /metrics carries them all, each sample labelled with its role
    listen = {role: (address[0], address[1] + i) if address and address[1] else
              (address[0] if address else "127.0.0.1", _free_port()) for i, role in enumerate(roles)}
    peers = ",".join(f"{role}=http://{'127.0.0.1' if host in ('0.0.0.0', '', '::') else host}:{port}/metrics"
                     for role, (host, port) in listen.items())

    children = {role: subprocess.Popen([sys.executable, "-m", "streams", "worker", role],
                                       env={**os.environ, "IMAGEFORK_METRICS_LISTEN": "%s:%d" % listen[role]})
                for role in roles}
    print(f"imagefork: worker all: every role's metrics at http://{config.api_listen}/metrics (label role); each "
          f"role's own: {', '.join(f'{r} %s:%d' % listen[r] for r in roles)}", file=sys.stderr, flush=True)

    def start_api() -> subprocess.Popen:  # it serves its own /metrics on IMAGEFORK_API_LISTEN, and the roles'
        return subprocess.Popen([sys.executable, "-m", "streams", "worker", "api"],
                                env={**{k: v for k, v in os.environ.items() if k != "IMAGEFORK_METRICS_LISTEN"},
                                     "IMAGEFORK_METRICS_PEERS": peers})

    children["api"] = start_api()
    api_since = time.monotonic()

    asked: list[int] = []  # the signal that asked us to stop

    def stop(*_):
        for child in children.values():
            if child.poll() is None:
                child.terminate()

    def stop_asked(signum, _frame):
        asked.append(signum)
        stop()

    signal.signal(signal.SIGTERM, stop_asked)
    signal.signal(signal.SIGINT, stop_asked)
    pipeline = [c for role, c in children.items() if role != "api"]
    ended: list[int] = []
    api_gone = False
    try:
        # the pipeline's roles stand or fall together; the API is a view of them: if it cannot start
        # (its port taken, say), it says why and the pipeline goes on; if it dies after a good run (a
        # client library's abort, say), it is started again
        while all(c.poll() is None for c in pipeline):
            if not api_gone and not asked and children["api"].poll() is not None:
                code, ran = children["api"].returncode, time.monotonic() - api_since
                if ran >= API_RESTART_AFTER_S:
                    print(f"imagefork: worker all: the API exited ({code}) after {ran:.0f}s; starting it again",
                          file=sys.stderr, flush=True)
                    children["api"], api_since = start_api(), time.monotonic()
                else:
                    api_gone = True
                    print(f"imagefork: worker all: the API exited ({code}); the pipeline goes on without it",
                          file=sys.stderr, flush=True)
            time.sleep(0.5)
        ended = [c.returncode for c in pipeline if c.poll() is not None]  # before we stop the others
    finally:
        stop()
        for child in children.values():
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
    # a child still starting when we passed our SIGTERM on dies of it (-15): that is the stop we asked for
    clean = (0, -signal.SIGTERM) if asked else (0,)
    code = next((c for c in ended if c not in clean), 0)
    return code if code >= 0 else 128 - code
