"""``imagefork stack up`` says in one line what is missing or what failed (docs/operations.md, "The local stack"):
``mvn is not on PATH: ...``, ``Java 17+ is needed ...``, ``kafka exited at start (port in use?): ...``, and
exits 1. The real CLI in a subprocess, with a PATH of the test's own: empty, or a stand-in ``java`` (a
script) that prints an old version, or, for the port, one that binds the listeners of the
``server.properties`` it is given as Kafka does and, when a port is taken, writes what Kafka 4.1.1 writes
to its log then (the end of it, copied from a real run) and exits. No real Kafka or JVM runs here."""
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from streams.stack import local

ROOT = Path(__file__).resolve().parents[2]

# what a real Kafka 4.1.1 ends its log with when a listener's port is taken (stack frames trimmed a little;
# the log's last lines are frames, the bind error is well above them)
KAFKA_BIND_FAILURE = """\
[2026-01-01 00:00:00,000] ERROR Unable to start acceptor for PLAINTEXT (kafka.network.DataPlaneAcceptor)
org.apache.kafka.common.KafkaException: Socket server failed to bind to {address}: Address already in use.
\tat org.apache.kafka.server.ServerSocketFactory$KafkaServerSocketFactory.openServerSocket(ServerSocketFactory.java:56) ~[kafka-server-4.1.1.jar:?]
\tat kafka.network.Acceptor.openServerSocket(SocketServer.scala:634) ~[kafka_2.13-4.1.1.jar:?]
Caused by: java.net.BindException: Address already in use
\tat java.base/sun.nio.ch.Net.bind0(Native Method) ~[?:?]
\t... 16 more
[2026-01-01 00:00:00,100] ERROR Exiting Kafka due to fatal exception during startup. (kafka.Kafka$)
java.lang.RuntimeException: Received a fatal error while waiting for all of the SocketServer Acceptors to be started
\tat org.apache.kafka.server.util.FutureUtils.waitWithLogging(FutureUtils.java:72) ~[kafka-server-common-4.1.1.jar:?]
\tat kafka.server.BrokerServer.startup(BrokerServer.scala:597) ~[kafka_2.13-4.1.1.jar:?]
\tat kafka.Kafka.main(Kafka.scala) [kafka_2.13-4.1.1.jar:?]
Caused by: java.lang.RuntimeException: Unable to start acceptor for PLAINTEXT
\tat kafka.network.Acceptor.liftedTree1$1(SocketServer.scala:550) ~[kafka_2.13-4.1.1.jar:?]
\t... 6 more
Caused by: org.apache.kafka.common.KafkaException: Socket server failed to bind to {address}: Address already in use.
\tat org.apache.kafka.server.ServerSocketFactory$KafkaServerSocketFactory.openServerSocket(ServerSocketFactory.java:56) ~[kafka-server-4.1.1.jar:?]
\tat kafka.network.Acceptor.openServerSocket(SocketServer.scala:634) ~[kafka_2.13-4.1.1.jar:?]
\t... 6 more
Caused by: java.net.BindException: Address already in use
\tat java.base/sun.nio.ch.Net.bind0(Native Method) ~[?:?]
\tat java.base/sun.nio.ch.Net.bind(Net.java:555) ~[?:?]
\tat java.base/sun.nio.ch.ServerSocketChannelImpl.netBind(ServerSocketChannelImpl.java:337) ~[?:?]
\tat kafka.network.SocketServer.enableRequestProcessing(SocketServer.scala:201) ~[kafka_2.13-4.1.1.jar:?]
\tat kafka.server.BrokerServer.startup(BrokerServer.scala:587) ~[kafka_2.13-4.1.1.jar:?]
\t... 6 more
"""

FAKE_JAVA = '''#!{python} -S
"""A stand-in for java: -version prints VERSION; Kafka binds its listeners; anything else stays a while."""
import socket, sys, time
VERSION = {version!r}
FAILURE = {failure!r}
args = sys.argv[1:]
if args == ["-version"]:
    sys.stderr.write(VERSION)
    sys.exit(0)
if "kafka.tools.StorageTool" in args:
    sys.exit(0)
if "kafka.Kafka" in args:
    props = dict(line.split("=", 1) for line in open(args[-1]).read().splitlines() if "=" in line)
    held = []
    for listener in props["listeners"].split(","):
        host, port = listener.split("://", 1)[1].rsplit(":", 1)
        s = socket.socket()
        try:
            s.bind((host, int(port)))
        except OSError:
            sys.stdout.write(FAILURE.format(address=host + ":" + port))
            sys.exit(1)
        held.append(s)
time.sleep(30)
sys.exit(1)
'''

JAVA_17 = 'openjdk version "17.0.15" 2025-04-15\nOpenJDK Runtime Environment (build 17.0.15+6)\n'


def _bin(tmp_path: Path, java_version: str | None = None, *tools: str) -> Path:
    """A PATH folder: a stand-in java printing ``java_version`` (none without it), and links to ``tools``."""
    folder = tmp_path / "bin"
    folder.mkdir()
    if java_version is not None:
        java = folder / "java"
        java.write_text(FAKE_JAVA.format(python=sys.executable, version=java_version, failure=KAFKA_BIND_FAILURE))
        java.chmod(0o755)
    for tool in tools:
        (folder / tool).symlink_to(shutil.which(tool))
    return folder


def _stack_up(tmp_path: Path, path: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {"PATH": str(path), "HOME": str(tmp_path / "home"), "IMAGEFORK_CACHE": str(tmp_path / "cache")}
    return subprocess.run([sys.executable, "-m", "streams", "stack", "up", "--dir", str(tmp_path / "stack")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _one_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr  # one line, no traceback
    assert proc.stdout == ""  # no KEY=VALUE lines for a stack that did not start
    return lines[0]


def test_no_java_on_path(tmp_path):
    line = _one_line(_stack_up(tmp_path, _bin(tmp_path)))
    assert line == "imagefork: java is not on PATH: Java 17+ is needed to run Kafka and S3Proxy"


@pytest.mark.parametrize("version", ['openjdk version "11.0.22" 2024-01-16\nOpenJDK Runtime Environment\n',
                                     'java version "1.8.0_392"\nJava(TM) SE Runtime Environment\n'])
def test_java_older_than_17(tmp_path, version):
    line = _one_line(_stack_up(tmp_path, _bin(tmp_path, version)))
    assert line == f"imagefork: Java 17+ is needed to run Kafka 4, found {version.splitlines()[0]}"


def test_no_mvn_on_path_for_the_first_fetch(tmp_path):
    line = _one_line(_stack_up(tmp_path, _bin(tmp_path, JAVA_17)))
    assert line == "imagefork: mvn is not on PATH: Maven is needed to fetch Kafka and S3Proxy from Maven Central"
    assert not list((tmp_path / "cache").glob("*/*/.complete"))  # nothing taken for fetched


def _fetched(cache: Path) -> None:
    """The jars' folders as a finished fetch leaves them (the stand-in java needs no jar)."""
    for component, deps in local.COMPONENTS.items():
        libs = cache / component / "-".join(v for _, _, v in deps) / "libs"
        libs.mkdir(parents=True)
        (libs.parent / ".complete").write_text("test")


@pytest.mark.timeout(90)
def test_a_port_kafka_wants_is_in_use(tmp_path):
    """The stack keeps the ports of its last start while none answers: one of them bound (not listening) by
    another process is the port a restart wants and cannot have."""
    _fetched(tmp_path / "cache")
    ports = {name: local.free_port() for name in local.PORTS}
    (tmp_path / "stack").mkdir()
    (tmp_path / "stack" / "state.json").write_text(json.dumps({"ports": ports, "services": {}, "env": {}}))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", ports["kafka"]))
        proc = _stack_up(tmp_path, _bin(tmp_path, JAVA_17, "openssl"))
    line = _one_line(proc)
    assert line.startswith("imagefork: kafka exited at start (port in use?): "), line
    assert f"127.0.0.1:{ports['kafka']}" in line, line  # which port, not the last frames of a stack trace
    state = json.loads((tmp_path / "stack" / "state.json").read_text())
    assert state["services"] == {}  # what it started (the stand-in S3Proxy) was stopped again
