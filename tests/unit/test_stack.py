"""``imagefork stack down`` stops exactly the processes ``stack up`` started (docs/operations.md, "The local stack").

One real stack (Kafka + S3Proxy, about a minute) in a temporary state folder, started and stopped with
the CLI, with look-alike processes around it that ``down`` must leave alone."""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from streams.stack.local import LocalStack
from streams.stack.tls import ensure_certificates

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(shutil.which("java") is None, reason="the local stack needs Java 17+"),
              pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streams", "stack", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _look_alike(marker: str, name: str, folder: Path) -> subprocess.Popen:
    """A process whose command line looks like the stack's Kafka (java-style flags, main class, config)
    but carries ``marker`` instead of the stack's own; it sleeps until it is killed."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)", marker, "-Xmx768m",
                             "-XX:+UseG1GC", "-cp", f"{folder}/libs/*", "kafka.Kafka", f"{folder}/server.properties",
                             name], start_new_session=True, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _attached_consumer(bootstrap: str):
    """A member of the group ``imagefork-resize`` (as a resize worker is), assigned its partition."""
    from confluent_kafka import Consumer
    from confluent_kafka.admin import AdminClient, NewTopic
    admin = AdminClient({"bootstrap.servers": bootstrap})  # kept until its answer is in
    admin.create_topics([NewTopic("attached", 1, 1)])["attached"].result(30)
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "imagefork-resize", "session.timeout.ms": 6000})
    consumer.subscribe(["attached"])
    end = time.monotonic() + 60
    while not consumer.assignment() and time.monotonic() < end:
        consumer.poll(0.5)
    assert consumer.assignment(), "the stand-in worker never joined its group"
    return consumer


@pytest.fixture(scope="module")
def stopped_stack(tmp_path_factory):
    """Up (CLI), look-alikes beside it, down (CLI): what was alive before and after."""
    folder = tmp_path_factory.mktemp("own-stack") / "stack"
    up = _cli("up", "--dir", str(folder), timeout=400)
    stack = LocalStack(folder)
    strangers: dict[str, subprocess.Popen] = {}
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert f"KAFKA_BOOTSTRAP_SERVERS={stack.env()['KAFKA_BOOTSTRAP_SERVERS']}" in up.stdout
        # `stack env` prints what a shell sources, and stack.env (it holds the SCRAM password) is the owner's
        printed = _cli("env", "--dir", str(folder), timeout=60)
        env_lines = dict(line.split("=", 1) for line in printed.stdout.splitlines() if "=" in line)
        assert printed.returncode == 0 and env_lines["KAFKA_BOOTSTRAP_SERVERS"] == \
            stack.env()["KAFKA_BOOTSTRAP_SERVERS"], printed.stdout + printed.stderr
        assert env_lines.get("S3_ENDPOINT_URL", "").startswith("http://127.0.0.1:"), printed.stdout
        assert "IMAGEFORK_STACK_SASL_BOOTSTRAP" in env_lines, printed.stdout  # the SASL listener is published
        assert stack.env_file.stat().st_mode & 0o777 == 0o600 and stack.state_file.stat().st_mode & 0o777 == 0o600
        state = json.loads(stack.state_file.read_text())
        own = {name: svc["pid"] for name, svc in state["services"].items()}
        assert set(own) == {"kafka", "s3proxy"} and all(_alive(p) for p in own.values()), own
        marker = stack.marker
        strangers = {
            # another stack's Kafka (another folder), never recorded by this stack
            "other-stack": _look_alike(f"-Dimagefork.stack={folder.parent / 'elsewhere'}", "other", folder),
            # no marker at all
            "no-marker": _look_alike("-Dimagefork.other=1", "plain", folder),
            # a process that took over a pid this stack recorded (pid reuse): recorded, but not ours
            "reused-pid": _look_alike("-Dimagefork.stack.previous=1", "reused", folder),
            # pid reuse by a process of a stack whose folder name extends this one's (stack -> stack2)
            "reused-pid-longer-folder": _look_alike(f"{marker}2", "stack2", folder),
        }
        for name in ("reused-pid", "reused-pid-longer-folder"):
            state["services"][name] = {"pid": strangers[name].pid, "port": 0}
        stack.state_file.write_text(json.dumps(state))
        time.sleep(0.5)  # let the look-alikes exec (their command lines are in place)
        assert all(p.poll() is None for p in strangers.values())
        worker = _attached_consumer(stack.env()["KAFKA_BOOTSTRAP_SERVERS"])  # a worker still attached
        down = _cli("down", "--dir", str(folder), timeout=120)
        threading.Thread(target=worker.close, daemon=True).start()  # its broker is gone: do not wait for it
        yield {"down": down, "env_after": _cli("env", "--dir", str(folder), timeout=60), "own": own, "strangers": strangers,
               "printed": env_lines, "stack": stack,
               "alive": {name: _alive(p.pid) for name, p in strangers.items()},
               "own_alive": {name: _alive(pid) for name, pid in own.items()}}
    finally:
        for p in strangers.values():
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
            p.wait(10)
        stack.down(quiet=True)


def test_down_stops_the_stacks_own_processes(stopped_stack):
    down = stopped_stack["down"]
    assert down.returncode == 0, down.stdout + down.stderr
    assert down.stdout.startswith("stopped: ") and "kafka" in down.stdout and "s3proxy" in down.stdout, down.stdout
    assert stopped_stack["own_alive"] == {"kafka": False, "s3proxy": False}
    after = stopped_stack["env_after"]  # nothing to source any more: said, exit code 1
    assert after.returncode == 1 and after.stderr.startswith("no stack running under "), after.stderr


def test_down_says_which_workers_are_still_attached(stopped_stack):
    """issue 26 item 6: a worker left running loses its broker; `stack down` says which, before it stops."""
    down = stopped_stack["down"]
    assert "still attached to this stack's Kafka" in down.stderr and "imagefork-resize: 1 (127.0.0.1)" in down.stderr, \
        down.stderr


def test_down_leaves_look_alikes_and_reused_pids_alone(stopped_stack):
    alive = stopped_stack["alive"]
    assert alive["other-stack"] and alive["no-marker"] and alive["reused-pid"], alive


def test_down_leaves_a_process_of_a_stack_whose_folder_name_extends_this_one(stopped_stack):
    """The marker must match as a whole argument: ``-Dimagefork.stack=/x/stack2`` is not the stack in /x/stack."""
    assert stopped_stack["alive"]["reused-pid-longer-folder"], stopped_stack["down"].stdout


def test_env_names_the_tls_listeners_and_the_stacks_ca(stopped_stack):
    """`stack env` (and stack.env) give the SSL and SASL_SSL listeners, each on its own port, the CA that
    signed their certificate and the mechanisms of the SASL listeners."""
    printed, stack = stopped_stack["printed"], stopped_stack["stack"]
    ports = [printed[name].rsplit(":", 1)[1] for name in (
        "KAFKA_BOOTSTRAP_SERVERS", "IMAGEFORK_STACK_SASL_BOOTSTRAP", "IMAGEFORK_STACK_SSL_BOOTSTRAP",
        "IMAGEFORK_STACK_SASL_SSL_BOOTSTRAP")]
    assert len(set(ports)) == 4, printed
    assert printed["IMAGEFORK_STACK_CA_FILE"] == str(stack.ca_file) and stack.ca_file.is_file(), printed
    assert printed["IMAGEFORK_STACK_SASL_MECHANISMS"] == "SCRAM-SHA-256,SCRAM-SHA-512,PLAIN", printed
    in_file = dict(line.split("=", 1) for line in stack.env_file.read_text().splitlines() if "=" in line)
    assert in_file == printed


def test_private_keys_and_passwords_are_the_owners_only(stopped_stack):
    """The CA's key, the broker's keystore (its key), server.properties (PLAIN's password) and the format
    record (the SCRAM password) are mode 0600; the CA certificate is for anyone to read."""
    stack = stopped_stack["stack"]
    private = [stack.tls_dir / "ca-key.pem", stack.tls_dir / "broker-keystore.pem", stack.dir / "server.properties",
               stack.format_file]
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in private} == {p.name: "0o600" for p in private}
    assert "PRIVATE KEY" not in stack.ca_file.read_text()


def test_the_stack_makes_its_certificates_once(tmp_path):
    """The CA and the broker's certificate (for 127.0.0.1 and localhost, signed by the CA), made with openssl
    at the first start; kept after; made again when one is missing. No Kafka here."""
    stack = LocalStack(tmp_path / "stack")
    keystore = ensure_certificates(stack.tls_dir)
    text = keystore.read_text()
    assert text.startswith("-----BEGIN PRIVATE KEY-----") and text.count("BEGIN CERTIFICATE") == 2  # its own, the CA's
    for key in (keystore, stack.tls_dir / "ca-key.pem"):
        assert key.stat().st_mode & 0o777 == 0o600, key
    assert {p.name for p in stack.tls_dir.iterdir()} == {"ca.pem", "ca-key.pem", "broker-keystore.pem"}
    shown = subprocess.run(["openssl", "x509", "-in", str(keystore), "-noout", "-ext", "subjectAltName"],
                           capture_output=True, text=True, check=True).stdout
    assert "IP Address:127.0.0.1" in shown and "DNS:localhost" in shown, shown
    verified = subprocess.run(["openssl", "verify", "-CAfile", str(stack.ca_file), str(keystore)],
                              capture_output=True, text=True)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    ca = stack.ca_file.read_bytes()
    assert ensure_certificates(stack.tls_dir) == keystore
    assert keystore.read_text() == text and stack.ca_file.read_bytes() == ca
    (stack.tls_dir / "ca-key.pem").unlink()
    ensure_certificates(stack.tls_dir)
    assert stack.ca_file.read_bytes() != ca and (stack.tls_dir / "ca-key.pem").stat().st_mode & 0o777 == 0o600


def test_the_stacks_ports_are_all_different():
    """Six listeners picked one after the other could get a port twice (seen: SASL_PLAINTEXT and SASL_SSL on
    one port, and Kafka's format refused the listeners); each socket is held until all are picked."""
    from streams.stack.local import PORTS, free_ports
    for _ in range(50):
        ports = free_ports(PORTS)
        assert sorted(ports) == sorted(PORTS) and len(set(ports.values())) == len(PORTS), ports
