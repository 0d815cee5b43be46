"""Kafka client security against the real broker: the local stack's SASL_PLAINTEXT listener (SCRAM-SHA-256).

Every role (planner, resize, join) and the test client connect through the SASL listener only; a
worker with a wrong password stops at once with one line naming the refusal."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from streams.adapters.kafka import KafkaUnavailable, ensure_topics
from streams.config import Config
from streams.demo import seed_request

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def sasl(stack_env) -> dict[str, str]:
    """The SASL listener of the local stack (a broker from elsewhere has none we know of)."""
    if "IMAGEFORK_STACK_SASL_BOOTSTRAP" not in stack_env:
        pytest.skip("the broker is not the local stack: no SASL listener to test against")
    return stack_env


def sasl_env(stack_env: dict[str, str], password: str | None = None) -> dict[str, str]:
    return {
        "KAFKA_BOOTSTRAP_SERVERS": stack_env["IMAGEFORK_STACK_SASL_BOOTSTRAP"],
        "KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "KAFKA_SASL_MECHANISM": stack_env["IMAGEFORK_STACK_SASL_MECHANISM"],
        "KAFKA_SASL_USERNAME": stack_env["IMAGEFORK_STACK_SASL_USERNAME"],
        "KAFKA_SASL_PASSWORD": stack_env["IMAGEFORK_STACK_SASL_PASSWORD"] if password is None else password,
    }


def test_stack_offers_scram_beside_plaintext(sasl):
    assert sasl["IMAGEFORK_STACK_SASL_MECHANISM"] == "SCRAM-SHA-256"
    assert sasl["IMAGEFORK_STACK_SASL_USERNAME"] and sasl["IMAGEFORK_STACK_SASL_PASSWORD"]
    # PLAINTEXT stays the default every other process uses
    assert sasl["KAFKA_BOOTSTRAP_SERVERS"] != sasl["IMAGEFORK_STACK_SASL_BOOTSTRAP"]


def test_seed_request_end_to_end_over_sasl_scram(sasl, make_pipeline, files):
    env = sasl_env(sasl)
    p = make_pipeline(**env)  # its client, follower and topic creation use these settings too
    sec = p.config.kafka_security
    assert (p.config.bootstrap_servers, sec.protocol, sec.sasl_mechanism) == (
        sasl["IMAGEFORK_STACK_SASL_BOOTSTRAP"], "SASL_PLAINTEXT", "SCRAM-SHA-256")
    p.start_all()  # join (confluent-kafka), resize and planner (Faust/aiokafka), each "ready"
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
    stack._format_kafka(["java"], props, data)
    assert len(calls) == 1 and not (data / "old-topic-0").exists()
    scram = calls[0][calls[0].index("--add-scram") + 1]
    creds = stack.sasl_credentials()
    assert scram == f"SCRAM-SHA-256=[name={creds['username']},password={creds['password']}]"
    stack._format_kafka(["java"], props, data)  # same layout: kept, same password
    assert len(calls) == 1 and stack.sasl_credentials() == creds
