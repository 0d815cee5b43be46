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

import contextlib
import json
import os
import signal
import subprocess
from pathlib import Path

from streams.stack.common import (
    StackError, alive, cache_dir, check_started, default_state_dir, free_port, free_ports, is_kafka, port_open,
    say, stop_pid, write_private,
)
from streams.stack.fetch import COMPONENTS, KAFKA_VERSION, S3PROXY_VERSION, fetch
from streams.stack.fetch import java as find_java
from streams.stack.kraft import (
    KAFKA_LAYOUT, MAX_BROKERS, NODE_PORTS, PORTS, SASL_MECHANISMS, format_kafka, format_record, kafka_command,
    kafka_properties, node_ports, node_suffix, port_names, wait_kafka, wait_kafka_sasl,
)
from streams.stack.s3 import ACCESS_KEY, BUCKET, SECRET_KEY, s3proxy_argv, wait_s3
from streams.stack.tls import ensure_certificates

# what callers take from here (the CLI, the demo, the hosts harness, the image builder, the tests)
__all__ = ["ACCESS_KEY", "BUCKET", "COMPONENTS", "KAFKA_LAYOUT", "KAFKA_VERSION", "NODE_PORTS", "PORTS",
           "S3PROXY_VERSION", "SECRET_KEY", "LocalStack", "StackError", "cache_dir", "default_state_dir", "fetch",
           "find_java", "free_port", "free_ports", "kafka_command", "kafka_properties", "node_suffix", "s3proxy_argv"]


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
        return bool(services) and all(alive(s["pid"], self.marker) for s in services.values())

    def kafka_running(self) -> bool:
        """Whether a Kafka node of this stack is running (any of them, with ``up(brokers=3)``)."""
        return any(alive(svc["pid"], self.marker) for name, svc in (self._load().get("services") or {}).items()
                   if is_kafka(name))

    def brokers(self) -> int:
        """How many Kafka nodes the stack was started with (1 for a stack of an older imagefork)."""
        return int(self._load().get("brokers") or 1)

    def env(self) -> dict[str, str]:
        return dict(self._load().get("env", {}))

    def _outdated(self, brokers: int = 1) -> bool:
        """A Kafka of another layout (an older imagefork's) or broker count: ``up`` restarts it."""
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
            say(f"the stack in {self.dir} runs {self.brokers()} broker(s): restarting it with {brokers} "
                f"(its topics are lost)")
        self.down(quiet=True)
        java = find_java()
        kafka_libs = fetch("kafka") if kafka else None
        s3_libs = fetch("s3proxy")
        self.dir.mkdir(parents=True, exist_ok=True)
        state = self._load()
        ports = state.get("ports") or {}
        names = port_names(brokers if kafka else 1)
        if sorted(ports) != sorted(names) or len(set(ports.values())) != len(names) \
                or any(port_open(p) for p in ports.values()):
            ports = free_ports(names)
        state = {"ports": ports, "services": {}, "env": {}, "layout": KAFKA_LAYOUT if kafka else None}
        if kafka and brokers > 1:
            state["brokers"] = brokers
        self._save(state)
        nodes = list(range(1, (brokers if kafka else 1) + 1))
        try:
            if kafka:
                started = self._start_kafka(java, kafka_libs, ports, nodes=nodes, brokers=brokers)
                for node, svc in zip(nodes, started):
                    state["services"][f"kafka{node_suffix(node)}"] = svc
                self._save(state)
            state["services"]["s3proxy"] = self._start_s3proxy(java, s3_libs, ports)
            self._save(state)
            env = stack_env(ports, nodes, self.ca_file, self.sasl_credentials() if kafka else None)
            state["env"] = env
            self._save(state)
            if kafka:
                log = self.dir / "kafka.log"
                wait_kafka(env["KAFKA_BOOTSTRAP_SERVERS"], timeout, self._kafka_alive, log, brokers=brokers)
                wait_kafka_sasl(env, timeout, self._kafka_alive, log)
                wait_kafka_sasl(env, timeout, self._kafka_alive, log, tls=True)
            wait_s3(env, timeout, lambda: self._check_alive("s3proxy"), self.dir / "s3proxy.log")
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
        if sum(map(is_kafka, services)) > 1:
            # a cluster's nodes all at once: stopped one after the other, the last ones lose their quorum
            # and wait for it in their shutdown until they are killed
            for name, svc in services.items():
                if alive(svc["pid"], self.marker):
                    stopped.append(name)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(svc["pid"], signal.SIGTERM)
        for name, svc in services.items():
            if stop_pid(svc["pid"], self.marker) and name not in stopped:
                stopped.append(name)
        if state:
            state["services"] = {}
            self._save(state)
        return stopped

    # --- Kafka, for the broker-restart tests ---
    def stop_kafka(self, node: int = 1, *, kill: bool = False) -> None:
        """Stop Kafka node ``node`` (SIGTERM; with ``kill``, SIGKILL at once: a broker that dies)."""
        state = self._load()
        svc = state["services"].pop(f"kafka{node_suffix(node)}", None)
        if svc:
            stop_pid(svc["pid"], self.marker, kill=kill)
        self._save(state)

    def start_kafka(self, timeout: float = 120.0, node: int = 1) -> None:
        state = self._load()
        brokers = int(state.get("brokers") or 1)
        (svc,) = self._start_kafka(find_java(), fetch("kafka"), state["ports"], nodes=[node], brokers=brokers)
        state["services"][f"kafka{node_suffix(node)}"] = svc
        self._save(state)
        wait_kafka(state["env"]["KAFKA_BOOTSTRAP_SERVERS"], timeout, self._kafka_alive, self.dir / "kafka.log")

    def _spawn(self, name: str, argv: list[str], env: dict | None = None) -> int:
        log = open(self.dir / f"{name}.log", "ab")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=self.dir, env={**os.environ, **(env or {})}, start_new_session=True)
        log.close()
        return proc.pid

    def _start_kafka(self, java: str, libs: Path, ports: dict, *, nodes: list[int] | None = None,
                     brokers: int = 1) -> list[dict]:
        """Start Kafka nodes ``nodes`` (default: node 1) of a ``brokers``-node cluster, each formatted first
        if it is not already (``format_kafka``); their services, in the same order."""
        nodes = nodes or [1]
        keystore = ensure_certificates(self.tls_dir)
        files = {n: (self.dir / f"kafka-data{node_suffix(n)}", self.dir / f"server{node_suffix(n)}.properties")
                 for n in range(1, brokers + 1)}

        def write_props(node: int) -> None:
            data, props = files[node]
            password = self.sasl_credentials().get("password", "")
            write_private(props, kafka_properties(node, brokers, ports, data, keystore, password))
        base = kafka_command(java, self.marker, libs, self.dir)
        # PLAIN's password (in server.properties) is the SCRAM user's, which a first format makes: the
        # format reads the file (its log.dirs, its listeners) and the file is written again after it.
        # Every node of the cluster is formatted together (one cluster id), whichever are started.
        for n in files:
            write_props(n)
        format_kafka(base, files[1][1], files[1][0], folder=self.dir, record_file=self.format_file,
                     others=[files[n] for n in files if n != 1], brokers=brokers)
        started = []
        for node in nodes:
            write_props(node)
            pid = self._spawn(f"kafka{node_suffix(node)}", base + ["kafka.Kafka", str(files[node][1])])
            own = node_ports(ports, node)
            started.append({"pid": pid, "port": own["kafka"], "sasl_port": own["sasl"], "ssl_port": own["ssl"],
                            "sasl_ssl_port": own["sasl_ssl"]})
        return started

    def sasl_credentials(self) -> dict[str, str]:
        """The SCRAM user of the SASL listener: mechanism, username, password."""
        return dict(format_record(self.format_file).get("sasl") or {})

    def _start_s3proxy(self, java: str, libs: Path, ports: dict) -> dict:
        endpoint = f"http://127.0.0.1:{ports['s3']}"
        pid = self._spawn("s3proxy", s3proxy_argv(java, self.marker, libs, self.dir, endpoint))
        return {"pid": pid, "port": ports["s3"]}

    def _kafka_alive(self) -> None:
        self._check_alive("kafka")

    def _check_alive(self, name: str) -> None:
        services = self._load().get("services", {})
        for svc_name in (n for n in services if n == name or (name == "kafka" and is_kafka(n))):
            check_started(svc_name, services[svc_name], self.marker, self.dir / f"{svc_name}.log")


def stack_env(ports: dict, nodes: list[int], ca_file: Path, sasl: dict | None) -> dict[str, str]:
    """The settings that point every imagefork process at the stack (``stack.env``): S3Proxy's, and with
    ``sasl`` (the SCRAM user: Kafka runs) the bootstrap of each listener of the ``nodes``."""
    def bootstrap(port: str) -> str:
        return ",".join(f"127.0.0.1:{node_ports(ports, n)[port]}" for n in nodes)

    env = {"S3_ENDPOINT_URL": f"http://127.0.0.1:{ports['s3']}", "AWS_ACCESS_KEY_ID": ACCESS_KEY,
           "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": "us-east-1", "S3_BUCKET": BUCKET}
    if sasl is None:
        return env
    return {"KAFKA_BOOTSTRAP_SERVERS": bootstrap("kafka"), **env,
            "IMAGEFORK_STACK_SASL_BOOTSTRAP": bootstrap("sasl"),
            "IMAGEFORK_STACK_SSL_BOOTSTRAP": bootstrap("ssl"),
            "IMAGEFORK_STACK_SASL_SSL_BOOTSTRAP": bootstrap("sasl_ssl"),
            "IMAGEFORK_STACK_CA_FILE": str(ca_file),
            "IMAGEFORK_STACK_SASL_MECHANISM": sasl["mechanism"],
            "IMAGEFORK_STACK_SASL_MECHANISMS": ",".join(SASL_MECHANISMS),
            "IMAGEFORK_STACK_SASL_USERNAME": sasl["username"],
            "IMAGEFORK_STACK_SASL_PASSWORD": sasl["password"]}
