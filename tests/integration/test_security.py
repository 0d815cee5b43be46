"""Kafka client security against the real broker: the local stack's SASL_PLAINTEXT, SSL and SASL_SSL
listeners (SCRAM-SHA-256, SCRAM-SHA-512 and PLAIN; TLS checked against the stack's own CA).

Every role (planner, resize, join) and the test client connect through the SASL_PLAINTEXT listener
with SCRAM-SHA-256, then through the SASL_SSL one with SCRAM-SHA-512; the other combinations are
checked with the product's own admin, producer and reader. A worker with a wrong password, or without
the CA, stops at once with one line naming the refusal."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import pytest

from streams.adapters.kafka import KafkaUnavailable, ensure_topics, producer_config, read_to_end
from streams.config import Config
from streams.demo import seed_request

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def sasl(stack_env) -> dict[str, str]:
    """The SASL listener of the local stack (a broker from elsewhere has none we know of)."""
    if "IMAGEFORK_STACK_SASL_BOOTSTRAP" not in stack_env:
        pytest.skip("the broker is not the local stack: no SASL listener to test against")
    return stack_env


@pytest.fixture(scope="module")
def tls(sasl) -> dict[str, str]:
    """The TLS listeners (SSL, SASL_SSL) of the local stack and its CA."""
    if "IMAGEFORK_STACK_SASL_SSL_BOOTSTRAP" not in sasl:
        pytest.skip("the local stack has no TLS listeners")  # an older stack: `stack up` restarts it
    return sasl


# each listener of the local stack by its security protocol
BOOTSTRAP = {"SASL_PLAINTEXT": "IMAGEFORK_STACK_SASL_BOOTSTRAP", "SSL": "IMAGEFORK_STACK_SSL_BOOTSTRAP",
             "SASL_SSL": "IMAGEFORK_STACK_SASL_SSL_BOOTSTRAP"}


def sasl_env(stack_env: dict[str, str], password: str | None = None, protocol: str = "SASL_PLAINTEXT",
             mechanism: str | None = None) -> dict[str, str]:
    """The settings of a client of the stack's listener for ``protocol``: the stack's user (with
    ``mechanism``, by default the one the stack names) on a SASL one, its CA on a TLS one."""
    env = {"KAFKA_BOOTSTRAP_SERVERS": stack_env[BOOTSTRAP[protocol]], "KAFKA_SECURITY_PROTOCOL": protocol}
    if protocol.startswith("SASL_"):
        env.update({
            "KAFKA_SASL_MECHANISM": mechanism or stack_env["IMAGEFORK_STACK_SASL_MECHANISM"],
            "KAFKA_SASL_USERNAME": stack_env["IMAGEFORK_STACK_SASL_USERNAME"],
            "KAFKA_SASL_PASSWORD": stack_env["IMAGEFORK_STACK_SASL_PASSWORD"] if password is None else password,
        })
    if protocol.endswith("SSL"):
        env["KAFKA_SSL_CAFILE"] = stack_env["IMAGEFORK_STACK_CA_FILE"]
    return env


def test_stack_offers_scram_beside_plaintext(sasl):
    assert sasl["IMAGEFORK_STACK_SASL_MECHANISM"] == "SCRAM-SHA-256"
    assert sasl["IMAGEFORK_STACK_SASL_USERNAME"] and sasl["IMAGEFORK_STACK_SASL_PASSWORD"]
    # PLAINTEXT stays the default every other process uses
    assert sasl["KAFKA_BOOTSTRAP_SERVERS"] != sasl["IMAGEFORK_STACK_SASL_BOOTSTRAP"]


def test_stack_offers_tls_listeners_and_every_mechanism(tls):
    assert tls["IMAGEFORK_STACK_SASL_MECHANISMS"].split(",") == ["SCRAM-SHA-256", "SCRAM-SHA-512", "PLAIN"]
    ports = {tls[name] for name in ("KAFKA_BOOTSTRAP_SERVERS", *BOOTSTRAP.values())}
    assert len(ports) == 4, ports  # each listener on its own port
    assert os.path.isfile(tls["IMAGEFORK_STACK_CA_FILE"])


@pytest.mark.parametrize("protocol,mechanism", [("SASL_PLAINTEXT", "SCRAM-SHA-256"), ("SASL_SSL", "SCRAM-SHA-512")],
                         ids=["sasl_plaintext-scram256", "sasl_ssl-scram512"])
def test_seed_request_end_to_end_over_sasl_scram(sasl, make_pipeline, files, protocol, mechanism):
    if protocol == "SASL_SSL" and BOOTSTRAP[protocol] not in sasl:
        pytest.skip("the local stack has no TLS listeners")
    env = sasl_env(sasl, protocol=protocol, mechanism=mechanism)
    p = make_pipeline(**env)  # its client, follower and topic creation use these settings too
    sec = p.config.kafka_security
    assert (p.config.bootstrap_servers, sec.protocol, sec.sasl_mechanism) == (
        sasl[BOOTSTRAP[protocol]], protocol, mechanism)
    p.start_all()  # join, resize and planner, each "ready"
    follower = p.follower()
    try:
        p.submit(seed_request(files.url("sample.png")), "sasl-seed-1")
        final = follower.wait(["sasl-seed-1"], 180)["sasl-seed-1"]
    finally:
        follower.close()
    assert final.status == "COMPLETED", final.errors
    assert len(final.outputs) == 9 and len(final.fileLocations) == 9
    assert {(o.format, o.width, o.height) for o in final.outputs} == {
        (f, s, s) for f in ("png", "jpg", "webp") for s in (300, 200, 1200)}
    p.check_outputs(final)
    assert len(p.finals_for(["sasl-seed-1"], settle=5)) == 1
    assert all(w.alive() for w in p.workers), p.logs()


@pytest.fixture(scope="module")
def client_namespace() -> str:
    """One namespace for the client checks below: the first creates its topics, the others find them."""
    return f"t{uuid.uuid4().hex[:10]}."


@pytest.mark.parametrize("protocol,mechanism", [("SSL", None), ("SASL_PLAINTEXT", "PLAIN"),
                                                ("SASL_PLAINTEXT", "SCRAM-SHA-512"), ("SASL_SSL", "PLAIN")])
def test_client_connects_produces_and_reads(tls, client_namespace, protocol, mechanism):
    """The product's admin (topic creation), producer and reader over each listener and mechanism."""
    from confluent_kafka import Producer
    config = Config.from_env({**os.environ, **sasl_env(tls, protocol=protocol, mechanism=mechanism),
                              "IMAGEFORK_NAMESPACE": client_namespace})
    ensure_topics(config, timeout=20)
    topic, value = config.topics.notices, f"{protocol}/{mechanism}/{uuid.uuid4().hex}".encode()
    producer = Producer(producer_config(config))
    producer.produce(topic, value, key=b"k")
    assert producer.flush(20) == 0
    assert value in [m.value() for m in read_to_end(config, topic, timeout=20)]


def wrong_ca(tmp_path) -> str:
    """The CA of another stack (made as the stack makes its own): valid, but not the one that signed."""
    from streams.stack.local import LocalStack
    from streams.stack.tls import ensure_certificates
    other = LocalStack(tmp_path / "other-stack")
    ensure_certificates(other.tls_dir)
    return str(other.ca_file)


@pytest.mark.parametrize("ca", ["wrong", "missing-file"])
def test_tls_client_without_the_stacks_ca_is_refused(tls, namespace, tmp_path, ca):
    env = {**sasl_env(tls, protocol="SSL"),
           "KAFKA_SSL_CAFILE": wrong_ca(tmp_path) if ca == "wrong" else str(tmp_path / "no-such-ca.pem")}
    config = Config.from_env({**os.environ, **env, "IMAGEFORK_NAMESPACE": namespace})
    start = time.monotonic()
    with pytest.raises(KafkaUnavailable) as refused:
        ensure_topics(config, timeout=20)
    assert time.monotonic() - start < 10
    message = str(refused.value)
    assert message.startswith(f"Kafka at {tls['IMAGEFORK_STACK_SSL_BOOTSTRAP']}: "), message
    if ca == "wrong":
        assert f"the TLS handshake failed (SSL): the broker's certificate is not signed by a CA in " \
               f"KAFKA_SSL_CAFILE={env['KAFKA_SSL_CAFILE']}" in message and "certificate verify failed" in message
        assert "ssl.ca.location" not in message  # librdkafka's name for it, not ours
    else:
        assert f"KAFKA_SSL_CAFILE={env['KAFKA_SSL_CAFILE']} is not a file this process can read" in message


def test_worker_without_a_ca_on_the_ssl_listener_stops_with_one_line(tls, namespace):
    env = {**os.environ, **tls, **sasl_env(tls, protocol="SASL_SSL", mechanism="SCRAM-SHA-512"),
           "IMAGEFORK_NAMESPACE": namespace}
    del env["KAFKA_SSL_CAFILE"]  # the system's CAs, which do not hold the stack's
    proc = subprocess.run([sys.executable, "-m", "streams", "worker", "planner"], env=env, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=90)
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"imagefork: Kafka at {tls['IMAGEFORK_STACK_SASL_SSL_BOOTSTRAP']}: the TLS handshake "
                               "failed (SASL_SSL): the broker's certificate is not signed by a CA in the system's CA "
                               "certificates (KAFKA_SSL_CAFILE is not set)"), lines[0]


@pytest.mark.parametrize("protocol,mechanism", [("SASL_PLAINTEXT", "PLAIN"), ("SASL_SSL", "SCRAM-SHA-512")])
def test_client_with_a_wrong_password_is_refused(tls, namespace, protocol, mechanism):
    config = Config.from_env({**os.environ, **sasl_env(tls, "not-the-password", protocol, mechanism),
                              "IMAGEFORK_NAMESPACE": namespace})
    start = time.monotonic()
    with pytest.raises(KafkaUnavailable) as refused:
        ensure_topics(config, timeout=20)
    assert time.monotonic() - start < 10
    assert str(refused.value).startswith(
        f"Kafka at {tls[BOOTSTRAP[protocol]]} refused the credentials of {tls['IMAGEFORK_STACK_SASL_USERNAME']} "
        f"({mechanism}): "), refused.value
    assert "authentication" in str(refused.value).lower()


@pytest.mark.parametrize("role", ["planner", "resize", "join"])
def test_worker_with_a_wrong_password_stops_with_one_line(sasl, namespace, role):
    env = {**os.environ, **sasl, **sasl_env(sasl, password="not-the-password"), "IMAGEFORK_NAMESPACE": namespace}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "streams", "worker", role], env=env, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=90)
    elapsed = time.monotonic() - start
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert elapsed < 30, f"took {elapsed:.1f}s: {proc.stderr}"
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    servers = sasl["IMAGEFORK_STACK_SASL_BOOTSTRAP"]
    assert lines[0].startswith(f"imagefork: Kafka at {servers} refused the credentials of "
                               f"{sasl['IMAGEFORK_STACK_SASL_USERNAME']} (SCRAM-SHA-256): "), lines[0]
    assert "authentication" in lines[0].lower(), lines[0]


def test_plaintext_client_on_the_sasl_listener_is_not_let_in(sasl, namespace):
    config = Config.from_env({**os.environ, "KAFKA_BOOTSTRAP_SERVERS": sasl["IMAGEFORK_STACK_SASL_BOOTSTRAP"],
                              "KAFKA_SECURITY_PROTOCOL": "PLAINTEXT", "IMAGEFORK_NAMESPACE": namespace})
    with pytest.raises(KafkaUnavailable, match="is not reachable .*PLAINTEXT"):
        ensure_topics(config, timeout=4)


def test_sasl_client_on_the_plaintext_listener_fails_fast(sasl, namespace):
    env = sasl_env(sasl)
    env["KAFKA_BOOTSTRAP_SERVERS"] = sasl["KAFKA_BOOTSTRAP_SERVERS"]
    config = Config.from_env({**os.environ, **env, "IMAGEFORK_NAMESPACE": namespace})
    start = time.monotonic()
    with pytest.raises(KafkaUnavailable, match="offers no SASL mechanism"):
        ensure_topics(config, timeout=30)
    assert time.monotonic() - start < 15


def test_unreachable_broker_says_where(namespace):
    from streams.stack.local import free_port
    port = free_port()  # nothing listens there
    config = Config.from_env({**os.environ, "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{port}",
                              "KAFKA_SECURITY_PROTOCOL": "PLAINTEXT", "IMAGEFORK_NAMESPACE": namespace})
    with pytest.raises(KafkaUnavailable, match=rf"Kafka at 127\.0\.0\.1:{port} is not reachable .*refused"):
        ensure_topics(config, timeout=3)


def test_a_data_folder_formatted_without_scram_is_formatted_again(tmp_path, monkeypatch):
    """``stack up`` on a folder an older imagefork formatted (no SCRAM user): formatted again, with the
    user; a folder formatted with it is kept (no Kafka started here: the format command is recorded)."""
    from streams.stack import local
    from streams.stack.kraft import format_kafka
    stack = local.LocalStack(tmp_path)
    data, props = tmp_path / "kafka-data", tmp_path / "server.properties"
    data.mkdir()
    (data / "meta.properties").write_text("cluster.id=old\n")  # formatted by an older layout
    (data / "old-topic-0").mkdir()
    calls = []

    def fake_run(argv, **kw):
        calls.append(argv)
        data.mkdir(exist_ok=True)
        (data / "meta.properties").write_text("cluster.id=new\n")
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(local.subprocess, "run", fake_run)
    format_kafka(["java"], props, data, folder=stack.dir, record_file=stack.format_file)
    assert len(calls) == 1 and not (data / "old-topic-0").exists()
    scram = [calls[0][i + 1] for i, arg in enumerate(calls[0]) if arg == "--add-scram"]
    creds = stack.sasl_credentials()
    assert scram == [f"{m}=[name={creds['username']},password={creds['password']}]"
                     for m in ("SCRAM-SHA-256", "SCRAM-SHA-512")]
    format_kafka(["java"], props, data, folder=stack.dir, record_file=stack.format_file)  # same layout: kept
    assert len(calls) == 1 and stack.sasl_credentials() == creds
    # a folder of the layout before SCRAM-SHA-512 and the TLS listeners (2) is formatted again
    record = json.loads(stack.format_file.read_text())
    stack.format_file.write_text(json.dumps({**record, "layout": 2}))
    format_kafka(["java"], props, data, folder=stack.dir, record_file=stack.format_file)
    assert len(calls) == 2 and stack.sasl_credentials()["password"] != creds["password"]


def test_a_running_kafka_of_an_older_layout_is_restarted_by_up(tmp_path):
    """A Kafka started by an older imagefork (without the TLS listeners, or without SASL) is outdated:
    ``up`` stops and starts it again; one of this layout, or S3Proxy alone, is not."""
    from streams.stack import local
    stack = local.LocalStack(tmp_path)
    older = {"services": {"kafka": {"pid": 1, "port": 1}},
             "env": {"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1", "IMAGEFORK_STACK_SASL_BOOTSTRAP": "127.0.0.1:2"}}
    s3_only = {"services": {"s3proxy": {"pid": 1, "port": 1}}, "env": {}}
    for state, outdated in [(older, True), ({**older, "layout": 2}, True),
                            ({**older, "layout": local.KAFKA_LAYOUT}, False), (s3_only, False)]:
        stack.state_file.write_text(json.dumps(state))
        assert stack._outdated() is outdated, state
