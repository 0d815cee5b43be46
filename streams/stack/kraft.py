"""Kafka in KRaft mode for the local stack and the hosts harness: each node's server.properties, the JVM
command that runs a node, the storage format (one cluster id, the SCRAM user), and the waits for its
listeners to answer."""
from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from streams.stack.common import StackError

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


def kafka_command(java: str, marker: str, libs: Path, folder: Path) -> list[str]:
    """The JVM command that runs a Kafka node (its class and arguments follow), with a log4j2 configuration
    written in ``folder`` (warnings and errors, to stdout)."""
    log4j = folder / "log4j2.properties"
    log4j.write_text("rootLogger.level=WARN\nrootLogger.appenderRef.stdout.ref=STDOUT\n"
                     "appender.stdout.type=Console\nappender.stdout.name=STDOUT\n"
                     "appender.stdout.layout.type=PatternLayout\n"
                     "appender.stdout.layout.pattern=[%d] %p %m (%c)%n\n")
    return [java, marker, "-Xms256m", "-Xmx768m", "-XX:+UseG1GC", "-XX:TieredStopAtLevel=1",
            f"-Dlog4j2.configurationFile={log4j}", "-Djava.awt.headless=true", "-cp", f"{libs}/*"]


def format_record(path: Path) -> dict:
    """How the data folders were formatted (layout, cluster id, the SCRAM user and its password)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def format_kafka(base: list[str], props: Path, data: Path, *, folder: Path, record_file: Path,
                 others: list[tuple[Path, Path]] = (), brokers: int = 1) -> None:
    """Format ``data`` (node 1's, with its properties ``props``), and the other nodes' data folders
    (``others``: (data folder, its properties) of nodes 2...) with one cluster id and the SCRAM user,
    unless they are all formatted already with this layout and this number of brokers.

    A folder formatted by an older imagefork (no record, or an older layout) has no SCRAM user
    and cannot get one at format time; one formatted for another number of brokers has another
    quorum: they are formatted again (their topics are lost; it is a local test stack)."""
    record = format_record(record_file)
    files = [(data, props), *others]
    formatted = all((folder / "meta.properties").exists() for folder, _ in files)
    if formatted and record.get("layout") == KAFKA_LAYOUT and record.get("sasl", {}).get("password") \
            and int(record.get("brokers") or 1) == brokers:
        return
    record_file.unlink(missing_ok=True)
    # every node's folder, and those of nodes a larger cluster here had before
    stale = [folder for folder, _ in files] + [
        folder for folder in folder.glob("kafka-data-*")
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
    fd = os.open(record_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(record, f, indent=2)


def wait_kafka(bootstrap: str, timeout: float, check_alive: Callable[[], None], log: Path,
               brokers: int = 1) -> None:
    """Kafka answers, and the metadata names ``brokers`` brokers (every node registered)."""
    from confluent_kafka.admin import AdminClient  # start-up: `imagefork stack` commands stay light
    end = time.monotonic() + timeout
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
    while time.monotonic() < end:
        check_alive()
        try:
            meta = admin.list_topics(timeout=2)
            # the controller must also accept topic creation
            if len(meta.brokers) >= brokers:
                return
        except Exception:
            pass
        time.sleep(0.5)
    raise StackError(f"Kafka did not answer on {bootstrap} within {timeout:.0f}s; see {log}")


def wait_kafka_sasl(env: dict, timeout: float, check_alive: Callable[[], None], log: Path, *,
                    tls: bool = False) -> None:
    """The SASL listener accepts the SCRAM user (the PLAINTEXT one answers already); with ``tls``, the
    SASL_SSL listener does, over TLS checked against the stack's CA, with SCRAM-SHA-512."""
    from confluent_kafka.admin import AdminClient  # start-up: `imagefork stack` commands stay light
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
        check_alive()
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
                     f"see {log}")
