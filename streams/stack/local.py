"""Fetch (once, with mvn, into a cache outside the repo), start, probe and stop
a single-node Apache Kafka 4.x in KRaft mode and S3Proxy with its filesystem backend.

Everything listens on 127.0.0.1 on free ports. The state folder holds the data,
the logs, the processes we started (with a marker in their command line, so
``down`` never kills a stranger) and ``stack.env``, the KEY=VALUE file that
points every imagefork process at this stack.

Kafka has four client listeners, each on its own port: PLAINTEXT (``KAFKA_BOOTSTRAP_SERVERS``,
what every process uses by default), SASL_PLAINTEXT (``IMAGEFORK_STACK_SASL_BOOTSTRAP``), SSL
(``IMAGEFORK_STACK_SSL_BOOTSTRAP``) and SASL_SSL (``IMAGEFORK_STACK_SASL_SSL_BOOTSTRAP``), to try the
client security settings against. Both SASL listeners take SCRAM-SHA-256, SCRAM-SHA-512 and PLAIN for
one user (``IMAGEFORK_STACK_SASL_USERNAME``, ``IMAGEFORK_STACK_SASL_PASSWORD``): its SCRAM credentials
are created when the storage is formatted (KRaft keeps them in the metadata log), PLAIN checks the
same password in the listeners' JAAS config. The TLS listeners present a certificate for 127.0.0.1
and localhost signed by a CA the stack makes at its first start (``IMAGEFORK_STACK_CA_FILE``; openssl,
keys mode 0600 in ``tls/``). The broker and the controller talk PLAINTEXT among themselves.

``up(brokers=3)`` (``imagefork stack up --brokers 3``) starts three such nodes instead, each broker and
controller (a static quorum of three voters), each with its own ports, data folder and log; the
bootstrap settings list the three addresses, and the internal topics have 3 replicas, 2 in sync at least.
"""
from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from streams.errors import ImageforkError

KAFKA_VERSION = os.environ.get("IMAGEFORK_KAFKA_VERSION", "4.1.1")
S3PROXY_VERSION = os.environ.get("IMAGEFORK_S3PROXY_VERSION", "2.6.0")
LOG4J_VERSION = "2.24.3"

ACCESS_KEY = "imagefork"
SECRET_KEY = "imagefork-local-secret"
BUCKET = "imagefork"

# the SASL listeners' user: its SCRAM credentials are created by ``kafka-storage format --add-scram``,
# PLAIN checks the same password in the listeners' JAAS config. SASL_MECHANISM is the one the stack
# names (IMAGEFORK_STACK_SASL_MECHANISM); the listeners take all of SASL_MECHANISMS.
SASL_MECHANISM = "SCRAM-SHA-256"
SCRAM_MECHANISMS = ("SCRAM-SHA-256", "SCRAM-SHA-512")
SASL_MECHANISMS = (*SCRAM_MECHANISMS, "PLAIN")
SASL_USERNAME = "imagefork"
# bumped when the storage must be formatted differently (an older or unmarked data folder is formatted
# again) or Kafka started differently (a running Kafka of an older layout is restarted by ``up``).
# 2: the SCRAM user above. 3: its SCRAM-SHA-512 credential, PLAIN, the SSL and SASL_SSL listeners.
KAFKA_LAYOUT = 3
PORTS = ("kafka", "sasl", "ssl", "sasl_ssl", "controller", "s3")
# each Kafka node's own ports: node 1's are the names above (a single-broker stack is as it always was),
# node n's (``up(brokers=3)``) the same names with "-n" (kafka-2, controller-2, ...)
NODE_PORTS = ("kafka", "sasl", "ssl", "sasl_ssl", "controller")
MAX_BROKERS = 5
# the listeners' names in server.properties (each is its security protocol) and their ports
LISTENERS = (("PLAINTEXT", "kafka"), ("SASL_PLAINTEXT", "sasl"), ("SSL", "ssl"), ("SASL_SSL", "sasl_ssl"))
CERT_DAYS = 3650


def node_suffix(node: int) -> str:
    """Node 1 keeps the single-broker stack's names (``kafka``, ``kafka-data``, ``server.properties``);
    node n gets "-n" (``kafka-2``, ``kafka-data-2``, ``server-2.properties``)."""
    return "" if node == 1 else f"-{node}"


def port_names(brokers: int = 1) -> tuple[str, ...]:
    return PORTS + tuple(f"{name}{node_suffix(n)}" for n in range(2, brokers + 1) for name in NODE_PORTS)


def node_ports(ports: dict, node: int) -> dict[str, int]:
    """Node ``node``'s ports under the plain names (kafka, sasl, ssl, sasl_ssl, controller)."""
    return {name: ports[f"{name}{node_suffix(node)}"] for name in NODE_PORTS}


def kafka_properties(node: int, brokers: int, ports: dict, data: Path | str, keystore: Path | str | None,
                     password: str, addresses: dict[int, str] | None = None) -> str:
    """server.properties of node ``node`` of a ``brokers``-node KRaft cluster: every node is broker and
    controller, the voters are all nodes' CONTROLLER listeners (a static quorum). With 3 nodes or more the
    internal topics (and topics created without settings) have 3 replicas and 2 in sync replicas at least;
    a single node's file is the single-broker stack's as it always was. ``addresses``: each node's address
    (default 127.0.0.1); with no ``keystore``, the PLAINTEXT listener alone (hosts of tests/hosts.py)."""
    own = node_ports(ports, node)
    address = {n: (addresses or {}).get(n, "127.0.0.1") for n in range(1, brokers + 1)}
    listeners = LISTENERS if keystore is not None else LISTENERS[:1]
    client = ",".join(f"{name}://{address[node]}:{own[port]}" for name, port in listeners)
    voters = ",".join(f"{n}@{address[n]}:{node_ports(ports, n)['controller']}" for n in range(1, brokers + 1))
    replicas = min(3, brokers)
    min_isr = 2 if replicas >= 3 else 1
    sasl_lines = []
    for listener in ("sasl_plaintext", "sasl_ssl") if keystore is not None else ():
        # SCRAM is checked against the credentials in the metadata log, PLAIN against its JAAS users
        sasl_lines.append(f"listener.name.{listener}.sasl.enabled.mechanisms={','.join(SASL_MECHANISMS)}")
        sasl_lines += [f"listener.name.{listener}.{m.lower()}.sasl.jaas.config="
                       "org.apache.kafka.common.security.scram.ScramLoginModule required;"
                       for m in SCRAM_MECHANISMS]
        sasl_lines.append(f"listener.name.{listener}.plain.sasl.jaas.config="
                          "org.apache.kafka.common.security.plain.PlainLoginModule required "
                          f'user_{SASL_USERNAME}="{password}";')
    cluster = [f"default.replication.factor={replicas}", f"min.insync.replicas={min_isr}"] if brokers > 1 else []
    return "\n".join([
        "process.roles=broker,controller",
        f"node.id={node}",
        f"controller.quorum.voters={voters}",
        f"listeners={client},CONTROLLER://{address[node]}:{own['controller']}",
        f"advertised.listeners={client}",
        "controller.listener.names=CONTROLLER",
        "inter.broker.listener.name=PLAINTEXT",
        "listener.security.protocol.map=" + ",".join(f"{name}:{name}" for name, _ in listeners)
        + ",CONTROLLER:PLAINTEXT",
        *([f"sasl.enabled.mechanisms={','.join(SASL_MECHANISMS)}",
           *sasl_lines,
           # the TLS listeners (SSL, SASL_SSL): the stack's own certificate, no client certificates asked
           "ssl.keystore.type=PEM",
           f"ssl.keystore.location={keystore}",
           "ssl.client.auth=none"] if keystore is not None else []),
        f"log.dirs={data}",
        "num.partitions=6",
        f"offsets.topic.replication.factor={replicas}",
        "offsets.topic.num.partitions=6",
        f"transaction.state.log.replication.factor={replicas}",
        f"transaction.state.log.min.isr={min_isr}",
        "transaction.state.log.num.partitions=6",
        *cluster,
        "group.initial.rebalance.delay.ms=0",
        "auto.create.topics.enable=true",
        "log.retention.hours=24",
        "log.segment.bytes=67108864",
        "",
    ])


class StackError(ImageforkError, RuntimeError):
    """One clear line saying what is missing or what failed."""


def cache_dir() -> Path:
    base = os.environ.get("IMAGEFORK_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "imagefork")
    return Path(base)


def default_state_dir() -> Path:
    return Path(os.environ.get("IMAGEFORK_STACK_DIR") or cache_dir() / "stack")


# --- fetching ----------------------------------------------------------------
_POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>imagefork.stack</groupId><artifactId>{name}</artifactId><version>1</version>
  <packaging>pom</packaging>
  <dependencies>
{deps}
  </dependencies>
</project>
"""
_DEP = "    <dependency><groupId>{g}</groupId><artifactId>{a}</artifactId><version>{v}</version></dependency>"

COMPONENTS = {
    "kafka": [("org.apache.kafka", "kafka_2.13", KAFKA_VERSION),
              ("org.apache.logging.log4j", "log4j-slf4j-impl", LOG4J_VERSION)],
    "s3proxy": [("org.gaul", "s3proxy", S3PROXY_VERSION)],
    # Kafka's command-line tools (kafka-topics.sh), for the Kafka image only (streams/stack/images.py)
    "kafka-tools": [("org.apache.kafka", "kafka-tools", KAFKA_VERSION)],
}
# what a first fetch says it brings: the jars of each (43 MB each for Kafka 4.1.1 and S3Proxy 2.6.0);
# the very first mvn run also puts Maven's own plugins in ~/.m2 (some 106 MB there in all, about a
# minute on a cold machine)
LABELS = {"kafka": f"Kafka {KAFKA_VERSION}", "s3proxy": f"S3Proxy {S3PROXY_VERSION}",
          "kafka-tools": f"Kafka's tools {KAFKA_VERSION}"}
ABOUT_MB = {"kafka": 45, "s3proxy": 45, "kafka-tools": 20}


def _say(message: str) -> None:
    """A line for the user on stderr (stdout of ``stack up`` is the KEY=VALUE lines)."""
    print(f"imagefork: {message}", file=sys.stderr, flush=True)


def _require(tool: str, why: str) -> str:
    path = shutil.which(tool)
    if not path:
        raise StackError(f"{tool} is not on PATH: {why}")
    return path


def fetch(component: str) -> Path:
    """The folder of jars for ``component``, fetched from Maven Central on first use."""
    deps = COMPONENTS[component]
    version = "-".join(v for _, _, v in deps)
    libs = cache_dir() / component / version / "libs"
    marker = libs.parent / ".complete"
    if marker.exists():
        return libs
    mvn = _require("mvn", "Maven is needed to fetch Kafka and S3Proxy from Maven Central")
    libs.parent.mkdir(parents=True, exist_ok=True)
    if libs.exists():
        shutil.rmtree(libs)
    pom = libs.parent / "pom.xml"
    pom.write_text(_POM.format(name=component, deps="\n".join(_DEP.format(g=g, a=a, v=v) for g, a, v in deps)))
    _say(f"fetching {LABELS[component]} from Maven Central with mvn, once: about {ABOUT_MB[component]} MB "
         f"(and Maven's own plugins the first time), kept in {libs.parent} and ~/.m2")
    started = time.monotonic()
    # quiet: mvn prints nothing but its errors (no download progress, no colours)
    proc = subprocess.run([mvn, "-q", "-B", "--no-transfer-progress", "-f", str(pom), "dependency:copy-dependencies",
                           f"-DoutputDirectory={libs}", "-DincludeScope=runtime"],
                          capture_output=True, text=True)
    took = time.monotonic() - started
    if proc.returncode != 0 or not any(libs.glob("*.jar")):
        output = (proc.stdout + proc.stderr).strip()
        log = libs.parent / "mvn.log"
        log.write_text(output + "\n")
        lines = output.splitlines()
        errors = [line for line in lines if line.startswith("[ERROR]")] or lines[-10:]
        for line in errors[:20]:
            print(f"  {line}", file=sys.stderr, flush=True)
        said = "its errors are above, all of its output is in" if errors else "it said nothing; see"
        raise StackError(f"mvn could not fetch {component} ({', '.join(f'{g}:{a}:{v}' for g, a, v in deps)}) "
                         f"in {took:.0f}s (exit code {proc.returncode}): {said} {log}")
    marker.write_text(time.strftime("%Y-%m-%dT%H:%M:%S"))
    _say(f"fetched {LABELS[component]} in {took:.0f}s")
    return libs


# --- helpers -------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(names) -> dict[str, int]:
    """A free port for each name, all different: each socket is held until all are picked (one after
    the other, the system may hand out a port just released again)."""
    sockets = []
    try:
        for _ in names:
            s = socket.socket()
            sockets.append(s)
            s.bind(("127.0.0.1", 0))
        return {name: s.getsockname()[1] for name, s in zip(names, sockets)}
    finally:
        for s in sockets:
            s.close()


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _alive(pid: int, marker: str) -> bool:
    """Whether ``pid`` is still one of ours: its command line has the marker as a whole argument (a
    stack in ``/x/stack-2`` is not the one in ``/x/stack``, a reused pid is nobody's)."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return marker.encode() in args


def _java() -> str:
    java = _require("java", "Java 17+ is needed to run Kafka and S3Proxy")
    out = subprocess.run([java, "-version"], capture_output=True, text=True).stderr
    try:
        major = int(out.split('"')[1].split(".")[0])
    except (IndexError, ValueError):
        major = 0
    if major and major < 17:
        raise StackError(f"Java 17+ is needed to run Kafka 4, found {out.splitlines()[0]}")
    return java


class LocalStack:
    def __init__(self, state_dir: Path | str | None = None):
        self.dir = Path(state_dir) if state_dir else default_state_dir()
        self.state_file = self.dir / "state.json"
        self.env_file = self.dir / "stack.env"
        # how kafka-data was formatted (layout, cluster id, the SCRAM user and its password)
        self.format_file = self.dir / "kafka-format.json"

    # --- state ---
    def _load(self) -> dict:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}

    def _save(self, state: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.state_file.write_text(json.dumps(state, indent=2))
        os.chmod(self.state_file, 0o600)  # its env holds the SCRAM password

    @property
    def marker(self) -> str:
        return f"-Dimagefork.stack={self.dir.resolve()}"

    def running(self) -> bool:
        state = self._load()
        services = state.get("services") or {}
        return bool(services) and all(_alive(s["pid"], self.marker) for s in services.values())

    def kafka_running(self) -> bool:
        """Whether a Kafka node of this stack is running (any of them, with ``up(brokers=3)``)."""
        services = self._load().get("services") or {}
        return any(_alive(svc["pid"], self.marker) for name, svc in services.items() if _is_kafka(name))

    def brokers(self) -> int:
        """How many Kafka nodes the stack was started with (1 for a stack of an older imagefork)."""
        return int(self._load().get("brokers") or 1)

    def env(self) -> dict[str, str]:
        state = self._load()
        return dict(state.get("env", {}))

    def _outdated(self, brokers: int = 1) -> bool:
        """A Kafka started by an older imagefork (another layout: without the SASL listener, without the
        TLS listeners), or with another number of brokers: ``up`` restarts it."""
        state = self._load()
        return "kafka" in (state.get("services") or {}) and (
            state.get("layout") != KAFKA_LAYOUT or int(state.get("brokers") or 1) != brokers)

    @property
    def tls_dir(self) -> Path:
        return self.dir / "tls"

    @property
    def ca_file(self) -> Path:
        """The CA that signed the TLS listeners' certificate (what a client's KAFKA_SSL_CAFILE names)."""
        return self.tls_dir / "ca.pem"

    # --- up / down ---
    def up(self, timeout: float = 120.0, *, kafka: bool = True, brokers: int = 1) -> dict[str, str]:
        """Start Kafka and S3Proxy (or S3Proxy alone, with ``kafka=False``) and wait until both answer.

        ``brokers``: that many Kafka nodes, each broker and controller (a static quorum of them all), on
        ports of their own; a running stack with another count is stopped and started again (its data
        folders are formatted again: its topics are lost)."""
        if not 1 <= brokers <= MAX_BROKERS:
            raise StackError(f"the local stack runs 1 to {MAX_BROKERS} brokers, not {brokers}")
        if self.running() and not self._outdated(brokers):
            return self.env()
        if self.running() and self.brokers() != brokers and "kafka" in (self._load().get("services") or {}):
            _say(f"the stack in {self.dir} runs {self.brokers()} broker(s): restarting it with {brokers} "
                 f"(its topics are lost)")
        self.down(quiet=True)
        java = _java()
        kafka_libs = fetch("kafka") if kafka else None
        s3_libs = fetch("s3proxy")
        self.dir.mkdir(parents=True, exist_ok=True)
        state = self._load()
        ports = state.get("ports") or {}
        names = port_names(brokers if kafka else 1)
        if sorted(ports) != sorted(names) or len(set(ports.values())) != len(names) \
                or any(_port_open(p) for p in ports.values()):
            ports = free_ports(names)
        state = {"ports": ports, "services": {}, "env": {}, "layout": KAFKA_LAYOUT if kafka else None}
        if kafka and brokers > 1:
            state["brokers"] = brokers
        self._save(state)
        nodes = range(1, (brokers if kafka else 1) + 1)

        def bootstrap(port: str) -> str:
            return ",".join(f"127.0.0.1:{node_ports(ports, n)[port]}" for n in nodes)
        try:
            if kafka:
                started = self._start_kafka(java, kafka_libs, ports, nodes=list(nodes), brokers=brokers)
                for node, svc in zip(nodes, started):
                    state["services"][f"kafka{node_suffix(node)}"] = svc
                self._save(state)
            state["services"]["s3proxy"] = self._start_s3proxy(java, s3_libs, ports)
            self._save(state)
            env = {
                "KAFKA_BOOTSTRAP_SERVERS": bootstrap("kafka"),
                "S3_ENDPOINT_URL": f"http://127.0.0.1:{ports['s3']}",
                "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_REGION": "us-east-1",
                "S3_BUCKET": BUCKET,
            }
            if kafka:
                sasl = self.sasl_credentials()
                env.update({
                    "IMAGEFORK_STACK_SASL_BOOTSTRAP": bootstrap("sasl"),
                    "IMAGEFORK_STACK_SSL_BOOTSTRAP": bootstrap("ssl"),
                    "IMAGEFORK_STACK_SASL_SSL_BOOTSTRAP": bootstrap("sasl_ssl"),
                    "IMAGEFORK_STACK_CA_FILE": str(self.ca_file),
                    "IMAGEFORK_STACK_SASL_MECHANISM": sasl["mechanism"],
                    "IMAGEFORK_STACK_SASL_MECHANISMS": ",".join(SASL_MECHANISMS),
                    "IMAGEFORK_STACK_SASL_USERNAME": sasl["username"],
                    "IMAGEFORK_STACK_SASL_PASSWORD": sasl["password"],
                })
            state["env"] = env
            self._save(state)
            if kafka:
                self._wait_kafka(env["KAFKA_BOOTSTRAP_SERVERS"], timeout, brokers=brokers)
                self._wait_kafka_sasl(env, timeout)
                self._wait_kafka_sasl(env, timeout, tls=True)
            else:
                del env["KAFKA_BOOTSTRAP_SERVERS"]
            self._wait_s3(env, timeout)
        except BaseException:
            self.down(quiet=True)
            raise
        self.env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
        os.chmod(self.env_file, 0o600)  # it holds the SCRAM password
        return env

    def down(self, quiet: bool = False) -> list[str]:
        state = self._load()
        services = state.get("services", {})
        stopped = []
        if sum(map(_is_kafka, services)) > 1:
            # a cluster's nodes all at once: stopped one after the other, the last ones lose their quorum
            # and wait for it in their shutdown until they are killed
            for name, svc in services.items():
                if _alive(svc["pid"], self.marker):
                    stopped.append(name)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(svc["pid"], signal.SIGTERM)
        for name, svc in services.items():
            if self._stop_pid(svc["pid"]) and name not in stopped:
                stopped.append(name)
        if state:
            state["services"] = {}
            self._save(state)
        return stopped

    def _stop_pid(self, pid: int, grace: float = 15.0) -> bool:
        if not _alive(pid, self.marker):
            return False
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return False
        end = time.monotonic() + grace
        while time.monotonic() < end and _alive(pid, self.marker):
            _reap(pid)
            time.sleep(0.1)
        if _alive(pid, self.marker):
            os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)
        _reap(pid)
        return True

    # --- Kafka, for the broker-restart tests ---
    def stop_kafka(self, node: int = 1, *, kill: bool = False) -> None:
        """Stop Kafka node ``node`` (SIGTERM; with ``kill``, SIGKILL at once: a broker that dies)."""
        state = self._load()
        svc = state["services"].pop(f"kafka{node_suffix(node)}", None)
        if svc:
            if kill and _alive(svc["pid"], self.marker):
                os.kill(svc["pid"], signal.SIGKILL)
                end = time.monotonic() + 10
                while time.monotonic() < end and _alive(svc["pid"], self.marker):
                    _reap(svc["pid"])
                    time.sleep(0.05)
            else:
                self._stop_pid(svc["pid"])
        self._save(state)

    def start_kafka(self, timeout: float = 120.0, node: int = 1) -> None:
        state = self._load()
        brokers = int(state.get("brokers") or 1)
        (svc,) = self._start_kafka(_java(), fetch("kafka"), state["ports"], nodes=[node], brokers=brokers)
        state["services"][f"kafka{node_suffix(node)}"] = svc
        self._save(state)
        self._wait_kafka(state["env"]["KAFKA_BOOTSTRAP_SERVERS"], timeout)

    def _spawn(self, name: str, argv: list[str], env: dict | None = None) -> int:
        log = open(self.dir / f"{name}.log", "ab")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=self.dir, env={**os.environ, **(env or {})}, start_new_session=True)
        log.close()
        return proc.pid

    def _start_kafka(self, java: str, libs: Path, ports: dict, *, nodes: list[int] | None = None,
                     brokers: int = 1) -> list[dict]:
        """Start Kafka nodes ``nodes`` (default: node 1) of a ``brokers``-node cluster, each formatted first
        if it is not already (``_format_kafka``); their services, in the same order."""
        nodes = nodes or [1]
        keystore = self._ensure_certificates()
        files = {n: (self.dir / f"kafka-data{node_suffix(n)}", self.dir / f"server{node_suffix(n)}.properties")
                 for n in range(1, brokers + 1)}

        def write_props(node: int) -> None:
            data, props = files[node]
            self._write_private(props, kafka_properties(node, brokers, ports, data, keystore,
                                                        self.sasl_credentials().get("password", "")))
        log4j = self.dir / "log4j2.properties"
        log4j.write_text("rootLogger.level=WARN\nrootLogger.appenderRef.stdout.ref=STDOUT\n"
                         "appender.stdout.type=Console\nappender.stdout.name=STDOUT\n"
                         "appender.stdout.layout.type=PatternLayout\n"
                         "appender.stdout.layout.pattern=[%d] %p %m (%c)%n\n")
        base = [java, self.marker, "-Xms256m", "-Xmx768m", "-XX:+UseG1GC", "-XX:TieredStopAtLevel=1",
                f"-Dlog4j2.configurationFile={log4j}", "-Djava.awt.headless=true", "-cp", f"{libs}/*"]
        # PLAIN's password (in server.properties) is the SCRAM user's, which a first format makes: the
        # format reads the file (its log.dirs, its listeners) and the file is written again after it.
        # Every node of the cluster is formatted together (one cluster id), whichever are started.
        for n in files:
            write_props(n)
        self._format_kafka(base, files[1][1], files[1][0], others=[files[n] for n in files if n != 1],
                           brokers=brokers)
        started = []
        for node in nodes:
            write_props(node)
            pid = self._spawn(f"kafka{node_suffix(node)}", base + ["kafka.Kafka", str(files[node][1])])
            own = node_ports(ports, node)
            started.append({"pid": pid, "port": own["kafka"], "sasl_port": own["sasl"], "ssl_port": own["ssl"],
                            "sasl_ssl_port": own["sasl_ssl"]})
        return started

    def _format_record(self) -> dict:
        try:
            return json.loads(self.format_file.read_text())
        except (OSError, ValueError):
            return {}

    def sasl_credentials(self) -> dict[str, str]:
        """The SCRAM user of the SASL listener: mechanism, username, password."""
        return dict(self._format_record().get("sasl") or {})

    @staticmethod
    def _write_private(path: Path, text: str) -> None:
        """Write a file only its owner may read (a key, a password), created so from the start."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # a file that was there before keeps its mode otherwise
        with os.fdopen(fd, "w") as f:
            f.write(text)

    def _ensure_certificates(self) -> Path:
        """The TLS listeners' keystore (its key, its certificate, the CA's), made with openssl at the first
        start into ``tls/``: a CA (``ca.pem``; its key ``ca-key.pem``) and a certificate it signs for
        127.0.0.1 and localhost. Made again, CA and all, when a file is missing or the certificate ends
        within a day. Keys and the keystore are mode 0600."""
        tls = self.tls_dir
        keystore, ca, ca_key = tls / "broker-keystore.pem", self.ca_file, tls / "ca-key.pem"
        openssl = _require("openssl", "the local stack makes its TLS certificates with openssl")
        if all(p.exists() for p in (keystore, ca, ca_key)) and subprocess.run(
                [openssl, "x509", "-in", str(keystore), "-noout", "-checkend", "86400"],
                capture_output=True).returncode == 0:
            return keystore
        tls.mkdir(parents=True, exist_ok=True)

        def run(*args: str, stdin: bytes | None = None) -> bytes:
            proc = subprocess.run([openssl, *args], input=stdin, capture_output=True)
            if proc.returncode != 0:
                raise StackError(f"openssl {args[0]} failed making the stack's TLS certificates: "
                                 f"{proc.stderr.decode(errors='replace').strip()[-300:]}")
            return proc.stdout

        def new_key() -> bytes:  # PKCS#8 PEM, unencrypted: what Kafka's PEM keystore reads
            return run("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256")

        ca_key_pem, broker_key_pem = new_key(), new_key()
        self._write_private(ca_key, ca_key_pem.decode())
        broker_key = tls / "broker-key.pem"
        self._write_private(broker_key, broker_key_pem.decode())
        ca_pem = run("req", "-x509", "-new", "-key", str(ca_key), "-sha256", "-days", str(CERT_DAYS),
                     "-subj", f"/CN=imagefork local stack CA {uuid.uuid4().hex[:8]}",
                     "-addext", "basicConstraints=critical,CA:TRUE",
                     "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        ca.write_bytes(ca_pem)
        os.chmod(ca, 0o644)
        csr = run("req", "-new", "-key", str(broker_key), "-subj", "/CN=localhost")
        ext = tls / "broker.ext"
        ext.write_text("basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
                       "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n")
        try:
            cert = run("x509", "-req", "-CA", str(ca), "-CAkey", str(ca_key), "-set_serial",
                       f"0x{secrets.token_hex(16)}", "-days", str(CERT_DAYS), "-sha256", "-extfile", str(ext),
                       stdin=csr)
        finally:
            ext.unlink(missing_ok=True)
        broker_key.unlink()
        self._write_private(keystore, (broker_key_pem + cert + ca_pem).decode())
        return keystore

    def _format_kafka(self, base: list[str], props: Path, data: Path, *,
                      others: list[tuple[Path, Path]] = (), brokers: int = 1) -> None:
        """Format ``data`` (node 1's, with its properties ``props``), and the other nodes' data folders
        (``others``: (data folder, its properties) of nodes 2...) with one cluster id and the SCRAM user,
        unless they are all formatted already with this layout and this number of brokers.

        A folder formatted by an older imagefork (no record, or an older layout) has no SCRAM user
        and cannot get one at format time; one formatted for another number of brokers has another
        quorum: they are formatted again (their topics are lost; it is a local test stack)."""
        record = self._format_record()
        files = [(data, props), *others]
        formatted = all((folder / "meta.properties").exists() for folder, _ in files)
        if formatted and record.get("layout") == KAFKA_LAYOUT and record.get("sasl", {}).get("password") \
                and int(record.get("brokers") or 1) == brokers:
            return
        self.format_file.unlink(missing_ok=True)
        # every node's folder, and those of nodes a larger cluster here had before
        stale = [folder for folder, _ in files] + [
            folder for folder in self.dir.glob("kafka-data-*")
            if folder.name.rsplit("-", 1)[1].isdigit() and int(folder.name.rsplit("-", 1)[1]) > brokers]
        for folder in stale:
            if folder.exists():
                shutil.rmtree(folder)
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        password = secrets.token_hex(16)  # hex: nothing to quote in the --add-scram syntax
        scram = [arg for m in SCRAM_MECHANISMS
                 for arg in ("--add-scram", f"{m}=[name={SASL_USERNAME},password={password}]")]
        def format_node(node_props: Path) -> subprocess.CompletedProcess:
            return subprocess.run(base + ["kafka.tools.StorageTool", "format", f"--cluster-id={cluster_id}",
                                          "-c", str(node_props), *scram], capture_output=True, text=True)
        # a cluster's nodes side by side: each format is a JVM start (a few seconds)
        with ThreadPoolExecutor(len(files)) as pool:
            procs = list(pool.map(format_node, [node_props for _, node_props in files]))
        for proc in procs:
            if proc.returncode != 0:
                raise StackError(f"Kafka storage format failed: {(proc.stdout + proc.stderr).strip()[-300:]}")
        record = {"layout": KAFKA_LAYOUT, "cluster_id": cluster_id,
                  "sasl": {"mechanism": SASL_MECHANISM, "username": SASL_USERNAME, "password": password}}
        if brokers > 1:
            record["brokers"] = brokers
        fd = os.open(self.format_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=2)

    def _start_s3proxy(self, java: str, libs: Path, ports: dict) -> dict:
        endpoint = f"http://127.0.0.1:{ports['s3']}"
        pid = self._spawn("s3proxy", s3proxy_argv(java, self.marker, libs, self.dir, endpoint))
        return {"pid": pid, "port": ports["s3"]}

    def _wait_kafka(self, bootstrap: str, timeout: float, brokers: int = 1) -> None:
        """Kafka answers, and the metadata names ``brokers`` brokers (every node registered)."""
        from confluent_kafka.admin import AdminClient
        end = time.monotonic() + timeout
        admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
        while time.monotonic() < end:
            self._check_alive("kafka")
            try:
                meta = admin.list_topics(timeout=2)
                # the controller must also accept topic creation
                if len(meta.brokers) >= brokers:
                    return
            except Exception:
                pass
            time.sleep(0.5)
        raise StackError(f"Kafka did not answer on {bootstrap} within {timeout:.0f}s; see {self.dir}/kafka.log")

    def _wait_kafka_sasl(self, env: dict, timeout: float, *, tls: bool = False) -> None:
        """The SASL listener accepts the SCRAM user (the PLAINTEXT one answers already); with ``tls``, the
        SASL_SSL listener does, over TLS checked against the stack's CA, with SCRAM-SHA-512."""
        from confluent_kafka.admin import AdminClient
        bootstrap = env["IMAGEFORK_STACK_SASL_SSL_BOOTSTRAP" if tls else "IMAGEFORK_STACK_SASL_BOOTSTRAP"]
        errors: list = []
        settings = {"security.protocol": "SASL_PLAINTEXT", "sasl.mechanisms": env["IMAGEFORK_STACK_SASL_MECHANISM"]}
        if tls:
            settings = {"security.protocol": "SASL_SSL", "sasl.mechanisms": "SCRAM-SHA-512",
                        "ssl.ca.location": env["IMAGEFORK_STACK_CA_FILE"]}
        admin = AdminClient({"bootstrap.servers": bootstrap, **settings,
                             "sasl.username": env["IMAGEFORK_STACK_SASL_USERNAME"],
                             "sasl.password": env["IMAGEFORK_STACK_SASL_PASSWORD"],
                             "log_level": 0, "error_cb": errors.append})
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self._check_alive("kafka")
            try:
                admin.list_topics(timeout=2)
                return
            except Exception:
                admin.poll(0)
                time.sleep(0.5)
        last = errors[-1].str() if errors else "no answer"
        raise StackError(f"Kafka's {settings['security.protocol']} listener on {bootstrap} did not accept the "
                         f"stack's {settings['sasl.mechanisms']} user "
                         f"{env['IMAGEFORK_STACK_SASL_USERNAME']} within {timeout:.0f}s ({last}); "
                         f"see {self.dir}/kafka.log")

    def _wait_s3(self, env: dict, timeout: float) -> None:
        import boto3
        from botocore.config import Config as BotoConfig
        end = time.monotonic() + timeout
        s3 = boto3.session.Session().client(
            "s3", endpoint_url=env["S3_ENDPOINT_URL"], aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY, region_name="us-east-1",
            config=BotoConfig(s3={"addressing_style": "path"}, retries={"max_attempts": 1}, connect_timeout=1))
        last = None
        while time.monotonic() < end:
            self._check_alive("s3proxy")
            try:
                existing = [b["Name"] for b in s3.list_buckets().get("Buckets", [])]
                if BUCKET not in existing:
                    s3.create_bucket(Bucket=BUCKET)
                return
            except Exception as exc:
                last = exc
                time.sleep(0.5)
        raise StackError(f"S3Proxy did not answer on {env['S3_ENDPOINT_URL']} within {timeout:.0f}s ({last}); "
                         f"see {self.dir}/s3proxy.log")

    def _check_alive(self, name: str) -> None:
        services = self._load().get("services", {})
        for svc_name in (n for n in services if n == name or (name == "kafka" and _is_kafka(n))):
            self._check_one_alive(svc_name, services[svc_name])

    def _check_one_alive(self, name: str, svc: dict) -> None:
        if svc and not _still_starting(svc["pid"], self.marker):
            log = self.dir / f"{name}.log"
            lines = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
            # a JVM ends its log with stack frames: the bind error, if any, is well above them
            bind = next((line.strip() for line in lines if "Address already in use" in line), "")
            hint = " (port in use?)" if bind else ""
            raise StackError(f"{name} exited at start{hint}: {(bind or ' | '.join(lines[-3:]))[-400:]}")


def s3proxy_argv(java: str, marker: str, libs: Path, folder: Path, endpoint: str) -> list[str]:
    """S3Proxy's command line, serving ``endpoint`` from a filesystem backend in ``folder/s3-data`` (its
    configuration files written in ``folder``)."""
    data = folder / "s3-data"
    data.mkdir(parents=True, exist_ok=True)
    conf = folder / "s3proxy.conf"
    conf.write_text("\n".join([
        f"s3proxy.endpoint={endpoint}",
        "s3proxy.authorization=aws-v2-or-v4",
        f"s3proxy.identity={ACCESS_KEY}",
        f"s3proxy.credential={SECRET_KEY}",
        "jclouds.provider=filesystem",
        f"jclouds.filesystem.basedir={data}",
        "",
    ]))
    logback = folder / "logback.xml"
    # S3Proxy's jar logs every Jetty event at DEBUG otherwise, which costs more than the requests
    logback.write_text('<configuration><appender name="O" class="ch.qos.logback.core.ConsoleAppender">'
                       '<encoder><pattern>%d %level %logger{20}: %msg%n</pattern></encoder></appender>'
                       '<root level="WARN"><appender-ref ref="O"/></root></configuration>\n')
    return [java, marker, "-Xmx512m", f"-Dlogback.configurationFile={logback}", "-cp", f"{libs}/*",
            "org.gaul.s3proxy.Main", "--properties", str(conf)]


def _is_kafka(service: str) -> bool:
    return service == "kafka" or service.startswith("kafka-")


def _still_starting(pid: int, marker: str, looks: int = 5, pause_s: float = 0.2) -> bool:
    """Whether a service just spawned is still there. Its command line is read several times before it is
    given up: the java launcher may exec itself again at start, and for that moment /proc shows no marker
    (seen on a loaded machine: a Kafka taken for dead that went on to start)."""
    for look in range(looks):
        if _alive(pid, marker):
            return True
        try:
            os.kill(pid, 0)
        except OSError:
            return False  # gone for good
        if _zombie(pid):
            return False
        time.sleep(pause_s)
    return False


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
