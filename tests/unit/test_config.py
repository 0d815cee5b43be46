"""Configuration is validated at start (streams/config.py): every setting docs/configuration.md's table
lists has its default, every bound and combination is checked, and a value we cannot use is a
``ConfigError`` naming its variable; ``imagefork worker ROLE`` with one prints one line and exits non-zero."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from streams.config import Config, ConfigError

ROOT = Path(__file__).resolve().parents[2]

INT_VARS = [
    "IMAGEFORK_PARTITIONS", "IMAGEFORK_REPLICATION_FACTOR", "IMAGEFORK_MAX_RETRIES", "IMAGEFORK_MAX_SOURCE_BYTES",
    "IMAGEFORK_MAX_PIXELS", "IMAGEFORK_MAX_DIMENSION", "IMAGEFORK_MAX_TASKS", "IMAGEFORK_MAX_REDIRECTS",
    "IMAGEFORK_MAX_CRASHES", "IMAGEFORK_MEMORY_BUDGET_MB", "IMAGEFORK_RESIZE_CONCURRENCY",
    "IMAGEFORK_PLANNER_CONCURRENCY", "IMAGEFORK_PNG_COMPRESS_LEVEL", "IMAGEFORK_JPEG_QUALITY",
    "IMAGEFORK_WEBP_QUALITY", "IMAGEFORK_WEBP_METHOD", "IMAGEFORK_JOIN_BATCH", "IMAGEFORK_JOIN_COMMIT_INTERVAL_MS",
    "IMAGEFORK_PRESIGN_TTL_S", "IMAGEFORK_JOIN_MAX_ABORTS",
]
FLOAT_VARS = [
    "IMAGEFORK_WORKFLOW_TIMEOUT_S", "IMAGEFORK_RETRY_DELAY_S", "IMAGEFORK_RETRY_MAX_DELAY_S",
    "IMAGEFORK_CONNECT_TIMEOUT_S", "IMAGEFORK_READ_TIMEOUT_S", "IMAGEFORK_SESSION_TIMEOUT_S",
    "IMAGEFORK_REPAIR_AFTER_S", "IMAGEFORK_FINISHED_RETENTION_S", "IMAGEFORK_TRANSACTION_TIMEOUT_S",
    "IMAGEFORK_LATE_RESULT_GRACE_S", "IMAGEFORK_SOURCE_IDLE_S", "IMAGEFORK_API_BODY_TIMEOUT_S",
    "IMAGEFORK_API_RESTART_AFTER_S",
]

SASL = {"KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "KAFKA_SASL_MECHANISM": "SCRAM-SHA-256",
        "KAFKA_SASL_USERNAME": "u", "KAFKA_SASL_PASSWORD": "p"}


def refused(env: dict, variable: str) -> str:
    with pytest.raises(ConfigError) as info:
        Config.from_env(env)
    message = str(info.value)
    assert variable in message, f"{env} was refused, but the message does not name {variable}: {message!r}"
    return message


def test_defaults_are_the_readme_table():
    c = Config.from_env({})
    assert c.bootstrap_servers == "127.0.0.1:9092"
    assert (c.s3_endpoint_url, c.s3_public_url, c.s3_region) == (None, None, "us-east-1")
    assert c.presign_ttl_s == 0  # off: readers print the final event's own URLs
    assert (c.bucket, c.output_prefix, c.staging_prefix) == ("imagefork", "", "_staging/")
    assert c.topics.requests == "imagefork.requests" and c.topics.dead_letter == "imagefork.requests.dlq"
    assert c.namespace == "" and c.group_id("join") == "imagefork-join"
    assert (c.partitions, c.replication_factor) == (6, 1)
    assert c.workflow_timeout_s == 300
    assert (c.retry.max_retries, c.retry.policy, c.retry.delay_s, c.retry.max_delay_s) == (3, "exponential", 2, 30)
    lim = c.limits
    assert (lim.max_source_bytes, lim.max_pixels, lim.max_dimension, lim.max_tasks) == (50 << 20, 60_000_000,
                                                                                       10_000, 1000)
    assert (lim.connect_timeout_s, lim.read_timeout_s, lim.max_redirects) == (5, 30, 5)
    assert c.fetch_allow == () and c.source_s3_allow == ()
    assert (c.max_crashes, c.memory_budget_mb) == (2, 0)
    assert (c.api_body_timeout_s, c.api_restart_after_s) == (30, 30)
    assert c.kafka_security.protocol == "PLAINTEXT" and not c.kafka_security.sasl and not c.kafka_security.ssl
    assert (c.resize_concurrency, c.resize_pool) == (0, "thread") and c.resize_slots == 3 * (os.cpu_count() or 1)
    enc = c.encoding
    assert (enc.png_compress_level, enc.jpeg_quality, enc.webp_quality, enc.webp_method) == (1, 85, 80, 2)
    assert (c.session_timeout_s, c.repair_after_s, c.finished_retention_s) == (15, 15, 86400)
    assert (c.join_batch, c.join_commit_interval_ms, c.join_instance, c.transaction_timeout_s) == (500, 1000, "", 10)
    assert c.log_level == "warning"


def test_every_variable_is_read():
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": "k:1", "S3_ENDPOINT_URL": "http://s3:1", "S3_PUBLIC_URL": "https://cdn",
        "AWS_REGION": "eu-west-3", "S3_BUCKET": "b", "IMAGEFORK_OUTPUT_PREFIX": "out/",
        "IMAGEFORK_STAGING_PREFIX": "stage/", "IMAGEFORK_TOPIC_REQUESTS": "my.requests", "IMAGEFORK_NAMESPACE": "ns.",
        "IMAGEFORK_PARTITIONS": "12", "IMAGEFORK_REPLICATION_FACTOR": "3", "IMAGEFORK_WORKFLOW_TIMEOUT_S": "7.5",
        "IMAGEFORK_MAX_RETRIES": "0", "IMAGEFORK_RETRY_POLICY": "FIXED", "IMAGEFORK_RETRY_DELAY_S": "15",
        "IMAGEFORK_RETRY_MAX_DELAY_S": "60", "IMAGEFORK_MAX_SOURCE_BYTES": "1000", "IMAGEFORK_MAX_PIXELS": "2000",
        "IMAGEFORK_MAX_DIMENSION": "300", "IMAGEFORK_MAX_TASKS": "9", "IMAGEFORK_CONNECT_TIMEOUT_S": "1",
        "IMAGEFORK_READ_TIMEOUT_S": "2", "IMAGEFORK_FETCH_ALLOW": "127.0.0.0/8, 10.0.0.0/8",
        "IMAGEFORK_SOURCE_S3_ALLOW": "pics,other/in/", "IMAGEFORK_MAX_CRASHES": "1", "IMAGEFORK_MEMORY_BUDGET_MB": "64",
        "KAFKA_SECURITY_PROTOCOL": "sasl_ssl", "KAFKA_SASL_MECHANISM": "scram-sha-512", "KAFKA_SASL_USERNAME": "u",
        "KAFKA_SASL_PASSWORD": "p", "KAFKA_SSL_CAFILE": "/ca.pem", "KAFKA_SSL_CERTFILE": "/c.pem",
        "KAFKA_SSL_KEYFILE": "/k.pem", "IMAGEFORK_RESIZE_CONCURRENCY": "3", "IMAGEFORK_RESIZE_POOL": "Process",
        "IMAGEFORK_PNG_COMPRESS_LEVEL": "9", "IMAGEFORK_JPEG_QUALITY": "100", "IMAGEFORK_WEBP_QUALITY": "1",
        "IMAGEFORK_WEBP_METHOD": "6", "IMAGEFORK_SESSION_TIMEOUT_S": "6", "IMAGEFORK_REPAIR_AFTER_S": "5",
        "IMAGEFORK_FINISHED_RETENTION_S": "60", "IMAGEFORK_JOIN_BATCH": "100000",
        "IMAGEFORK_JOIN_COMMIT_INTERVAL_MS": "0", "IMAGEFORK_JOIN_INSTANCE": "j1",
        "IMAGEFORK_TRANSACTION_TIMEOUT_S": "900", "IMAGEFORK_PRESIGN_TTL_S": "3600",
        "IMAGEFORK_LOG_LEVEL": "INFO",
    }
    c = Config.from_env(env)
    assert c.bootstrap_servers == "k:1" and c.s3_endpoint_url == "http://s3:1" and c.s3_public_url == "https://cdn"
    assert c.presign_ttl_s == 3600
    assert (c.s3_region, c.bucket, c.output_prefix, c.staging_prefix) == ("eu-west-3", "b", "out/", "stage/")
    assert c.topics.requests == "my.requests" and c.topics.tasks == "ns.imagefork.tasks"
    assert c.group_id("planner") == "ns.imagefork-planner"
    assert (c.partitions, c.replication_factor, c.workflow_timeout_s) == (12, 3, 7.5)
    assert (c.retry.max_retries, c.retry.policy, c.retry.delay_s, c.retry.max_delay_s) == (0, "fixed", 15, 60)
    assert (c.limits.max_source_bytes, c.limits.max_pixels, c.limits.max_dimension, c.limits.max_tasks) == \
        (1000, 2000, 300, 9)
    assert (c.limits.connect_timeout_s, c.limits.read_timeout_s) == (1, 2)
    assert c.fetch_allow == ("127.0.0.0/8", "10.0.0.0/8") and c.source_s3_allow == ("pics", "other/in/")
    assert (c.max_crashes, c.memory_budget_mb) == (1, 64)
    sec = c.kafka_security
    assert (sec.protocol, sec.sasl_mechanism, sec.sasl_username, sec.sasl_password) == \
        ("SASL_SSL", "SCRAM-SHA-512", "u", "p")
    assert (sec.ssl_cafile, sec.ssl_certfile, sec.ssl_keyfile) == ("/ca.pem", "/c.pem", "/k.pem")
    assert sec.sasl and sec.ssl
    assert (c.resize_concurrency, c.resize_pool, c.resize_slots) == (3, "process", 3)
    assert (c.encoding.png_compress_level, c.encoding.jpeg_quality, c.encoding.webp_quality,
            c.encoding.webp_method) == (9, 100, 1, 6)
    assert (c.session_timeout_s, c.repair_after_s, c.finished_retention_s) == (6, 5, 60)
    assert (c.join_batch, c.join_commit_interval_ms, c.join_instance, c.transaction_timeout_s) == (100000, 0, "j1", 900)
    assert c.log_level == "info"


@pytest.mark.parametrize("variable", INT_VARS)
@pytest.mark.parametrize("raw", ["many", "1.5", "0x10"])
def test_a_bad_integer_names_its_variable(variable, raw):
    assert "integer" in refused({variable: raw}, variable)


@pytest.mark.parametrize("variable", FLOAT_VARS)
def test_a_bad_number_names_its_variable(variable):
    assert "number" in refused({variable: "soon"}, variable)


# (variable, value that must be refused, a value at the edge that must be accepted)
BOUNDS = [
    ("IMAGEFORK_PARTITIONS", "0", "1"),
    ("IMAGEFORK_REPLICATION_FACTOR", "0", "1"),
    ("IMAGEFORK_WORKFLOW_TIMEOUT_S", "0", "0.5"),
    ("IMAGEFORK_WORKFLOW_TIMEOUT_S", "-5", "0.5"),
    ("IMAGEFORK_WORKFLOW_TIMEOUT_S", "nan", "0.5"),
    ("IMAGEFORK_MAX_RETRIES", "-1", "0"),
    ("IMAGEFORK_RETRY_POLICY", "linear", "fixed"),
    ("IMAGEFORK_MAX_CRASHES", "0", "1"),
    ("IMAGEFORK_MEMORY_BUDGET_MB", "63", "64"),
    ("IMAGEFORK_RESIZE_POOL", "fork", "process"),
    ("IMAGEFORK_RESIZE_CONCURRENCY", "-1", "0"),
    ("IMAGEFORK_PLANNER_CONCURRENCY", "0", "1"),
    ("IMAGEFORK_JOIN_BATCH", "0", "1"),
    ("IMAGEFORK_JOIN_BATCH", "100001", "100000"),
    ("IMAGEFORK_JOIN_COMMIT_INTERVAL_MS", "-1", "0"),
    ("IMAGEFORK_JOIN_COMMIT_INTERVAL_MS", "60001", "60000"),
    ("IMAGEFORK_TRANSACTION_TIMEOUT_S", "0.5", "1"),
    ("IMAGEFORK_TRANSACTION_TIMEOUT_S", "901", "900"),
    ("IMAGEFORK_PRESIGN_TTL_S", "-1", "0"),
    ("IMAGEFORK_PRESIGN_TTL_S", "604801", "604800"),  # SigV4: 7 days at most
    ("IMAGEFORK_FINISHED_RETENTION_S", "0", "1"),
    ("IMAGEFORK_LATE_RESULT_GRACE_S", "-1", "0"),
    ("IMAGEFORK_SOURCE_IDLE_S", "0", "0.1"),
    ("IMAGEFORK_API_BODY_TIMEOUT_S", "0", "0.1"),
    ("IMAGEFORK_API_RESTART_AFTER_S", "-1", "0"),
    ("IMAGEFORK_JOIN_MAX_ABORTS", "0", "1"),
    ("IMAGEFORK_JOIN_MAX_ABORTS", "101", "100"),
    ("IMAGEFORK_PNG_COMPRESS_LEVEL", "-1", "0"),
    ("IMAGEFORK_PNG_COMPRESS_LEVEL", "10", "9"),
    ("IMAGEFORK_JPEG_QUALITY", "0", "1"),
    ("IMAGEFORK_JPEG_QUALITY", "101", "100"),
    ("IMAGEFORK_WEBP_QUALITY", "0", "1"),
    ("IMAGEFORK_WEBP_QUALITY", "101", "100"),
    ("IMAGEFORK_WEBP_METHOD", "-1", "0"),
    ("IMAGEFORK_WEBP_METHOD", "7", "6"),
    ("IMAGEFORK_MAX_PIXELS", "0", "1"),
    ("IMAGEFORK_MAX_SOURCE_BYTES", "0", "1"),
    ("IMAGEFORK_FETCH_ALLOW", "10.0.0.0/33", "10.0.0.0/32"),
    ("IMAGEFORK_FETCH_ALLOW", "intranet", "::1/128"),
    ("IMAGEFORK_FETCH_ALLOW", "127.0.0.0/8,999.1.1.1", "127.0.0.0/8,10.1.1.1"),
    ("IMAGEFORK_SOURCE_S3_ALLOW", "s3://pics", "pics"),
    ("IMAGEFORK_SOURCE_S3_ALLOW", "pics,s3://other/in/", "pics,other/in/"),
    ("KAFKA_SECURITY_PROTOCOL", "SASL_SCRAM", "SSL"),
    ("KAFKA_SECURITY_PROTOCOL", "TLS", "plaintext"),
]


@pytest.mark.parametrize("variable,bad,edge", BOUNDS, ids=[f"{v}={b}" for v, b, _ in BOUNDS])
def test_a_value_out_of_range_names_its_variable_and_the_edge_passes(variable, bad, edge):
    refused({variable: bad}, variable)
    Config.from_env({variable: edge})


# the settings the code then uses in a way that cannot work (a worker that starts and then fails, or
# fails every request): refused at start like the others
UNUSABLE = [
    ("IMAGEFORK_LOG_LEVEL", "loud"),  # run_role: min(INFO, "Level LOUD") raises TypeError (a traceback)
    ("IMAGEFORK_MAX_DIMENSION", "0"),  # every request REJECTED: "must be between 1 and 0"
    ("IMAGEFORK_MAX_TASKS", "0"),  # every request REJECTED
    ("IMAGEFORK_MAX_REDIRECTS", "-1"),  # fetch_http never tries: every http source fails
    ("IMAGEFORK_CONNECT_TIMEOUT_S", "0"),  # a non-blocking connect: every fetch fails
    ("IMAGEFORK_READ_TIMEOUT_S", "-1"),  # socket.settimeout(-1) raises ValueError inside the fetch
    ("IMAGEFORK_RETRY_DELAY_S", "-1"),  # not-before times in the past: retries without any pause
    ("IMAGEFORK_SESSION_TIMEOUT_S", "0"),  # no consumer group takes a session timeout of 0
]


@pytest.mark.parametrize("variable,bad", UNUSABLE, ids=[f"{v}={b}" for v, b in UNUSABLE])
def test_a_value_the_workers_cannot_use_is_refused_at_start(variable, bad):
    refused({variable: bad}, variable)


COMBINATIONS = [
    ({"KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT"}, "KAFKA_SASL_MECHANISM"),
    ({**SASL, "KAFKA_SASL_MECHANISM": "GSSAPI"}, "KAFKA_SASL_MECHANISM"),
    ({**SASL, "KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_MECHANISM": "OAUTHBEARER"}, "KAFKA_SASL_MECHANISM"),
    ({**SASL, "KAFKA_SASL_USERNAME": ""}, "KAFKA_SASL_USERNAME"),
    ({**SASL, "KAFKA_SASL_PASSWORD": ""}, "KAFKA_SASL_PASSWORD"),
    ({**SASL, "KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_USERNAME": "", "KAFKA_SASL_PASSWORD": ""},
     "KAFKA_SASL_USERNAME"),
    ({"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CERTFILE": "/c.pem"}, "KAFKA_SSL_KEYFILE"),
    ({"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_KEYFILE": "/k.pem"}, "KAFKA_SSL_CERTFILE"),
]


@pytest.mark.parametrize("env,variable", COMBINATIONS, ids=[str(i) for i in range(len(COMBINATIONS))])
def test_security_settings_that_do_not_go_together_are_refused(env, variable):
    refused(env, variable)


@pytest.mark.parametrize("env", [
    SASL,
    {**SASL, "KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_MECHANISM": "PLAIN", "KAFKA_SSL_CAFILE": "/ca.pem"},
    {**SASL, "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512"},
    {"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CAFILE": "/ca.pem"},
    {"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CERTFILE": "/c.pem", "KAFKA_SSL_KEYFILE": "/k.pem"},
    {"KAFKA_SECURITY_PROTOCOL": "PLAINTEXT"},
], ids=["sasl-plaintext", "sasl-ssl-plain", "scram-512", "ssl-ca", "ssl-client-cert", "plaintext"])
def test_the_documented_security_combinations_pass(env):
    sec = Config.from_env(env).kafka_security
    assert sec.protocol == env["KAFKA_SECURITY_PROTOCOL"]


def test_the_s3_allow_list_takes_buckets_and_prefixes():
    c = Config.from_env({"IMAGEFORK_SOURCE_S3_ALLOW": "pics, other/in/"})
    assert c.s3_source_allowed("pics", "any/key.png")
    assert c.s3_source_allowed("other", "in/a.png") and not c.s3_source_allowed("other", "private/a.png")
    assert c.s3_source_allowed("imagefork", "_staging/wf/run/source")  # the staging prefix always
    assert not c.s3_source_allowed("imagefork", "private/a.png") and not c.s3_source_allowed("picsx", "a.png")


def test_with_validates_too():
    with pytest.raises(ConfigError, match="IMAGEFORK_PARTITIONS"):
        Config().with_(partitions=0)


def _worker_env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("IMAGEFORK_", "KAFKA_", "S3_", "AWS_"))}
    # if a bad setting were taken, the worker would then wait for this broker, which is not there
    env["KAFKA_BOOTSTRAP_SERVERS"] = "127.0.0.1:9"
    return {**env, **settings}


@pytest.mark.parametrize("variable,value", [
    ("IMAGEFORK_PARTITIONS", "six"),
    ("IMAGEFORK_JOIN_BATCH", "0"),
    ("IMAGEFORK_SOURCE_S3_ALLOW", "s3://pics"),
    ("KAFKA_SECURITY_PROTOCOL", "SASL_SCRAM"),
    ("IMAGEFORK_MAX_PIXELS", "0"),
    ("IMAGEFORK_LOG_LEVEL", "loud"),
])
def test_a_worker_with_a_bad_setting_prints_one_line_and_exits_non_zero(variable, value):
    proc = subprocess.run([sys.executable, "-m", "streams", "worker", "planner"], cwd=ROOT,
                          env=_worker_env(**{variable: value}), capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("imagefork: configuration: ") and variable in lines[0], lines[0]
    assert proc.stdout == ""


def test_the_memory_budget_is_sized_from_the_containers_limit(tmp_path):
    """IMAGEFORK_MEMORY_BUDGET_MB=0 (the default): a 512 MB container gets 312 MiB, none 1 GiB (issue 20)."""
    from streams.cgroups import memory_limit
    from streams.config import budget_for_limit
    assert budget_for_limit(None) == 1 << 30
    assert budget_for_limit(512 << 20) == 312 << 20
    assert budget_for_limit(128 << 20) == 64 << 20 and budget_for_limit(64 << 30) == 1 << 30
    (tmp_path / "memory.max").write_text("536870912\n")
    assert memory_limit(str(tmp_path)) == 512 << 20
    (tmp_path / "memory.max").write_text("max\n")
    assert memory_limit(str(tmp_path)) is None
    (tmp_path / "memory.max").unlink()
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert memory_limit(str(tmp_path)) is None
    assert Config(memory_budget_mb=100).memory_budget == 100 << 20
