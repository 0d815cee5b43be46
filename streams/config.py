"""The only configuration: defaults -> environment -> validate(). Every process of the project (workers,
client, demo, tests) reads the same environment variables, so sourcing the file written by ``imagefork
stack up`` points any of them at a stack. Longer than 500 lines because every setting of every role is
here, once: its default, its variable and its check, a line each."""
from __future__ import annotations

import ipaddress
import os
import ssl
from dataclasses import dataclass, field, fields, replace
from typing import Mapping

from streams.cgroups import cpu_cores, memory_limit
from streams.errors import ImageforkError


class ConfigError(ImageforkError, ValueError):
    """A setting has a value we cannot use; the message names the variable."""

    exit_code = 2
    label = "configuration: "


SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
REUSE_SCOPES = ("off", "prefix", "global")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
MAX_PRESIGN_TTL_S = 7 * 24 * 3600  # the longest a SigV4 presigned URL may live


@dataclass(frozen=True)
class KafkaSecurity:
    """How every Kafka client of the project (confluent-kafka) connects."""
    protocol: str = "PLAINTEXT"
    sasl_mechanism: str = ""
    sasl_username: str = ""
    sasl_password: str = field(default="", repr=False)
    ssl_cafile: str = ""
    ssl_certfile: str = ""
    ssl_keyfile: str = ""

    @property
    def sasl(self) -> bool:
        return self.protocol.startswith("SASL_")

    @property
    def ssl(self) -> bool:
        return self.protocol in ("SSL", "SASL_SSL")


@dataclass(frozen=True)
class Limits:
    max_source_bytes: int = 50 * 1024 * 1024
    max_pixels: int = 60_000_000  # an animation counts every frame: frames x width x height
    max_frames: int = 500  # frames of an animation kept animated (more: IMAGE_TOO_LARGE)
    max_dimension: int = 10_000
    max_tasks: int = 1000
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 30.0
    max_redirects: int = 5
    # a PEM file of CA certificates trusted for https:// sources besides the system's (a private CA)
    source_ca_file: str = ""


@dataclass(frozen=True)
class Encoding:
    png_compress_level: int = 1
    jpeg_quality: int = 85
    webp_quality: int = 80
    webp_method: int = 2
    gif_colors: int = 256
    avif_quality: int = 60
    avif_speed: int = 9
    jpeg_progressive: bool = False


@dataclass(frozen=True)
class Retry:
    max_retries: int = 3
    policy: str = "exponential"  # or "fixed"
    delay_s: float = 2.0
    max_delay_s: float = 30.0


@dataclass(frozen=True)
class Topics:
    requests: str = "imagefork.requests"
    requests_batch: str = "imagefork.requests.batch"  # the batch lane's requests (priority "batch")
    request_retries: str = "imagefork.requests.retry"
    tasks: str = "imagefork.tasks"
    tasks_batch: str = "imagefork.tasks.batch"  # the batch lane's tasks: served with what interactive leaves
    retries: str = "imagefork.tasks.retry"
    events: str = "imagefork.events"
    completed: str = "imagefork.completed"
    dead_letter: str = "imagefork.requests.dlq"
    join_state: str = "imagefork.join.state"  # the join's changelog (compacted)
    task_attempts: str = "imagefork.tasks.attempts"  # resize's crash ledger (compacted)
    task_attempts_batch: str = "imagefork.tasks.batch.attempts"  # the batch lane's crash ledger (compacted)
    schemas: str = "imagefork.schemas"  # every schema version a writer used, by fingerprint (compacted)
    notices: str = "imagefork.notices"  # RunIgnored: a resubmitted workflow id, answered at once
    sources: str = "imagefork.sources"  # final events by source bytes: key {sha256}/{workflowId} (compacted)
    cancellations: str = "imagefork.cancellations"  # Cancellation by workflowId (compacted, a day)
    webhooks: str = "imagefork.webhooks"  # WebhookDelivery: each run's delivery state, by workflowId (compacted)
    webhook_redeliver: str = "imagefork.webhooks.redeliver"  # final events sent again (a dead letter replayed)
    presets: str = "imagefork.presets"  # Preset by name (compacted, kept for good; a tombstone deletes one)

    def all(self) -> list[str]:
        return [getattr(self, f.name) for f in fields(self)]


@dataclass(frozen=True)
class Config:
    bootstrap_servers: str = "127.0.0.1:9092"
    kafka_security: KafkaSecurity = field(default_factory=KafkaSecurity)
    s3_endpoint_url: str | None = None
    s3_public_url: str | None = None
    presign_ttl_s: int = 0  # readers print presigned GET URLs valid this long; 0: the plain URLs
    s3_region: str = "us-east-1"
    aws_access_key_id: str | None = field(default=None, repr=False)
    aws_secret_access_key: str | None = field(default=None, repr=False)
    bucket: str = "imagefork"
    output_prefix: str = ""
    staging_prefix: str = "_staging/"
    topics: Topics = field(default_factory=Topics)
    # worker all's API: each role's own /metrics, merged into its own ("role=url,..." in IMAGEFORK_METRICS_PEERS)
    metrics_peers: tuple[tuple[str, str], ...] = ()
    completed_json_topic: str = ""  # a JSON mirror of the completed topic, in the join's transactions; "": none
    partitions: int = 6
    replication_factor: int = 1
    workflow_timeout_s: float = 300.0
    session_timeout_s: float = 15.0
    repair_after_s: float = 15.0
    reuse: str = "off"  # off | prefix | global: where an output of the same source bytes and spec is reused
    reuse_ttl_s: float = 7 * 24 * 3600.0  # an output older than this is made again rather than reused
    finished_retention_s: float = 24 * 3600.0
    join_batch: int = 500  # events per join transaction, at most
    join_commit_interval_ms: int = 1000  # a transaction without a final event commits after this
    join_instance: str = ""  # the join's transactional.id suffix; default: host name + a free slot
    transaction_timeout_s: float = 10.0  # a dead join's open transaction is aborted after this
    shutdown_grace_s: float = 25.0  # a stopped planner or resize worker finishes its work in flight this long
    late_result_grace_s: float = 60.0  # a result for no known workflow this long past its deadline is refused
    join_max_aborts: int = 3  # a record whose every send aborts the join's transaction this often is degraded
    resize_concurrency: int = 0  # 0: three per core (a task waits on S3 and Kafka most of its time)
    resize_pool: str = "thread"  # or "process" (measured: threads are faster, see docs/bench.md)
    planner_concurrency: int = 4
    batch_share: float = 0.2  # of a worker's slots, what the batch lane keeps while interactive work waits
    fetch_allow: tuple[str, ...] = ()
    source_s3_allow: tuple[str, ...] = ()  # "bucket" or "bucket/prefix"; the staging prefix is always allowed
    max_crashes: int = 2  # a task whose processing killed this many workers ends FAILED (WORKER_CRASHED)
    memory_budget_mb: int = 0  # decoded pixels held per resize process (cache + decodes in flight); 0: auto
    source_idle_s: float = 10.0  # a decoded source no task used for this long leaves the cache
    limits: Limits = field(default_factory=Limits)
    encoding: Encoding = field(default_factory=Encoding)
    retry: Retry = field(default_factory=Retry)
    log_level: str = "warning"
    log_format: str = "text"  # or "json": one JSON object per line
    namespace: str = ""
    metrics_listen: str = ""  # host:port of this process's /metrics, /healthz, /readyz; empty: none (a join: 127.0.0.1:0)
    advertised_url: str = ""  # how the API reaches this process's endpoints; empty: from the listen address
    api_listen: str = "127.0.0.1:8088"  # the API role's host:port
    api_body_timeout_s: float = 30.0  # the API waits this long for a whole request body (then 408)
    api_tokens_file: str = ""  # hashed tokens with scopes (streams/core/access.py); none: loopback, no auth
    api_rate: float = 50.0  # requests/s per token (then 429) ...
    api_burst: int = 500  # ... and at once (a page of 500 thumbnails)
    api_allow_anonymous: bool = False  # no tokens on a non-loopback address (a port published on loopback)
    api_restart_after_s: float = 30.0  # `worker all` restarts an API that ran this long (sooner: it cannot start)
    # the webhook role (streams/agents/webhooks.py): HMAC-SHA256 key of the signature; the role needs one
    webhook_secret: str = field(default="", repr=False)
    webhook_timeout_s: float = 10.0  # one call: connect and answer
    webhook_max_tries: int = 8  # then the final event is dead-lettered (WEBHOOK_UNDELIVERED)
    webhook_delay_s: float = 1.0  # the pause after the first failed try, doubling ...
    webhook_max_delay_s: float = 300.0  # ... up to this
    webhook_concurrency: int = 32  # calls under way at once (each waits out its own retries)

    def group_id(self, role: str) -> str:
        """The consumer group of a role; the namespace keeps test runs apart."""
        return f"{self.namespace}imagefork-{role}"

    @property
    def resize_slots(self) -> int:
        """Tasks computing at once per resize process (a thread pool uploads outside them). Three per core by
        default: a task still waits in its slot (the hand-off to a pool thread, a source's first decode, the
        crash-ledger row's ack); docs/operations.md has the sweep."""
        return self.resize_concurrency or 3 * cpu_cores()

    @property
    def memory_budget(self) -> int:
        """Bytes of decoded pixels a resize process may hold: IMAGEFORK_MEMORY_BUDGET_MB, else sized from
        the container's memory limit (cgroup), else 1 GiB."""
        if self.memory_budget_mb:
            return self.memory_budget_mb << 20
        return budget_for_limit(memory_limit())

    @property
    def resize_processes(self) -> int:
        """Processes of a process pool (and sandboxes at once): one per core at most."""
        return max(1, min(self.resize_slots, cpu_cores()))

    @property
    def fetch_allow_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(ipaddress.ip_network(n, strict=False) for n in self.fetch_allow)

    def object_url(self, key: str) -> str:
        base = self.s3_public_url or self.s3_endpoint_url
        if base:
            return f"{base.rstrip('/')}/{self.bucket}/{key}"
        return f"https://{self.bucket}.s3.{self.s3_region}.amazonaws.com/{key}"

    def s3_source_allowed(self, bucket: str, key: str) -> bool:
        """Whether an ``s3://bucket/key`` source may be read: the staging prefix of our own bucket, or
        a bucket (or bucket/prefix) listed in IMAGEFORK_SOURCE_S3_ALLOW."""
        if bucket == self.bucket and key.startswith(self.staging_prefix):
            return True
        for entry in self.source_s3_allow:
            b, _, prefix = entry.partition("/")
            if b == bucket and key.startswith(prefix):
                return True
        return False

    def validate(self) -> "Config":
        """Every bound and combination checked; raises ConfigError naming the variables (``check``)."""
        return check(self)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Config":
        """defaults -> environment -> validate() (``read_env``)."""
        return read_env(env)

    def with_(self, **changes) -> "Config":
        return replace(self, **changes).validate()


def check(config: Config) -> Config:
    """Every bound and combination of ``config``; raises ConfigError naming the variables."""
    sec = config.kafka_security
    checks = [
        (sec.protocol in SECURITY_PROTOCOLS, f"KAFKA_SECURITY_PROTOCOL must be one of {', '.join(SECURITY_PROTOCOLS)}"),
        (not sec.sasl or sec.sasl_mechanism in SASL_MECHANISMS,
         f"KAFKA_SASL_MECHANISM must be one of {', '.join(SASL_MECHANISMS)} with {sec.protocol}"),
        (not sec.sasl or (sec.sasl_username and sec.sasl_password),
         f"KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD are needed with {sec.protocol}"),
        (bool(sec.ssl_certfile) == bool(sec.ssl_keyfile), "KAFKA_SSL_CERTFILE and KAFKA_SSL_KEYFILE go together"),
        (config.max_crashes >= 1, "IMAGEFORK_MAX_CRASHES must be >= 1"),
        (config.memory_budget_mb == 0 or config.memory_budget_mb >= 64,
         "IMAGEFORK_MEMORY_BUDGET_MB must be 0 (sized from the memory limit) or >= 64"),
        (config.source_idle_s > 0, "IMAGEFORK_SOURCE_IDLE_S must be > 0"),
        (not config.metrics_listen or parse_host_port(config.metrics_listen) is not None,
         "IMAGEFORK_METRICS_LISTEN must be host:port (port 0-65535; 0: any free one)"),
        (parse_host_port(config.api_listen) is not None, "IMAGEFORK_API_LISTEN must be host:port"),
        (config.api_body_timeout_s > 0, "IMAGEFORK_API_BODY_TIMEOUT_S must be > 0"),
        (config.api_rate > 0 and config.api_burst >= 1, "IMAGEFORK_API_RATE must be > 0, IMAGEFORK_API_BURST >= 1"),
        (config.api_restart_after_s >= 0, "IMAGEFORK_API_RESTART_AFTER_S must be >= 0"),
        (not config.advertised_url or config.advertised_url.startswith(("http://", "https://")),
         "IMAGEFORK_ADVERTISED_URL must be an http:// or https:// URL"),
        (all(e and not e.startswith("s3://") for e in config.source_s3_allow),
         "IMAGEFORK_SOURCE_S3_ALLOW lists bucket or bucket/prefix entries, without s3://"),
        (config.partitions >= 1, "IMAGEFORK_PARTITIONS must be >= 1"),
        (config.replication_factor >= 1, "IMAGEFORK_REPLICATION_FACTOR must be >= 1"),
        (config.workflow_timeout_s > 0, "IMAGEFORK_WORKFLOW_TIMEOUT_S must be > 0"),
        (config.resize_pool in ("process", "thread"), "IMAGEFORK_RESIZE_POOL must be process or thread"),
        (config.resize_concurrency >= 0, "IMAGEFORK_RESIZE_CONCURRENCY must be >= 0"),
        (config.planner_concurrency >= 1, "IMAGEFORK_PLANNER_CONCURRENCY must be >= 1"),
        (0 < config.batch_share <= 1, "IMAGEFORK_BATCH_SHARE must be > 0 and <= 1 (a share of the slots)"),
        (1 <= config.join_batch <= 100_000, "IMAGEFORK_JOIN_BATCH must be 1..100000"),
        (0 <= config.join_commit_interval_ms <= 60_000, "IMAGEFORK_JOIN_COMMIT_INTERVAL_MS must be 0..60000"),
        (1 <= config.transaction_timeout_s <= 900, "IMAGEFORK_TRANSACTION_TIMEOUT_S must be 1..900"),
        (config.finished_retention_s > 0, "IMAGEFORK_FINISHED_RETENTION_S must be > 0"),
        (config.late_result_grace_s >= 0, "IMAGEFORK_LATE_RESULT_GRACE_S must be >= 0"),
        (0 <= config.shutdown_grace_s <= 3600, "IMAGEFORK_SHUTDOWN_GRACE_S must be 0..3600"),
        (1 <= config.join_max_aborts <= 100, "IMAGEFORK_JOIN_MAX_ABORTS must be 1..100"),
        (config.retry.policy in ("fixed", "exponential"), "IMAGEFORK_RETRY_POLICY must be fixed or exponential"),
        (config.retry.max_retries >= 0, "IMAGEFORK_MAX_RETRIES must be >= 0"),
        (0 <= config.encoding.png_compress_level <= 9, "IMAGEFORK_PNG_COMPRESS_LEVEL must be 0..9"),
        (1 <= config.encoding.jpeg_quality <= 100, "IMAGEFORK_JPEG_QUALITY must be 1..100"),
        (0 <= config.encoding.webp_method <= 6, "IMAGEFORK_WEBP_METHOD must be 0..6"),
        (1 <= config.encoding.webp_quality <= 100, "IMAGEFORK_WEBP_QUALITY must be 1..100"),
        (1 <= config.encoding.avif_quality <= 100, "IMAGEFORK_AVIF_QUALITY must be 1..100"),
        (0 <= config.encoding.avif_speed <= 10, "IMAGEFORK_AVIF_SPEED must be 0..10"),
        (config.limits.max_frames > 0, "IMAGEFORK_MAX_FRAMES must be > 0"),
        (config.limits.max_pixels > 0, "IMAGEFORK_MAX_PIXELS must be > 0"),
        (config.limits.max_source_bytes > 0, "IMAGEFORK_MAX_SOURCE_BYTES must be > 0"),
        (config.limits.max_dimension > 0, "IMAGEFORK_MAX_DIMENSION must be > 0"),
        (config.limits.max_tasks > 0, "IMAGEFORK_MAX_TASKS must be > 0"),
        (config.limits.connect_timeout_s > 0, "IMAGEFORK_CONNECT_TIMEOUT_S must be > 0"),
        (config.limits.read_timeout_s > 0, "IMAGEFORK_READ_TIMEOUT_S must be > 0"),
        (config.limits.max_redirects >= 0, "IMAGEFORK_MAX_REDIRECTS must be >= 0"),
        (config.retry.delay_s >= 0 and config.retry.max_delay_s >= config.retry.delay_s,
         "IMAGEFORK_RETRY_DELAY_S must be >= 0 and IMAGEFORK_RETRY_MAX_DELAY_S >= it"),
        (config.session_timeout_s > 0, "IMAGEFORK_SESSION_TIMEOUT_S must be > 0"),
        (config.log_level in LOG_LEVELS, f"IMAGEFORK_LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}"),
        (config.log_format in ("text", "json"), "IMAGEFORK_LOG_FORMAT must be text or json"),
        (config.repair_after_s > 0, "IMAGEFORK_REPAIR_AFTER_S must be > 0"),
        (config.reuse in REUSE_SCOPES, f"IMAGEFORK_REUSE must be one of {', '.join(REUSE_SCOPES)}"),
        (config.reuse_ttl_s > 0, "IMAGEFORK_REUSE_TTL_S must be > 0"),
        (config.bucket != "", "S3_BUCKET must not be empty"),
        (config.webhook_timeout_s > 0, "IMAGEFORK_WEBHOOK_TIMEOUT_S must be > 0"),
        (config.webhook_max_tries >= 1, "IMAGEFORK_WEBHOOK_MAX_TRIES must be >= 1"),
        (0 <= config.webhook_delay_s <= config.webhook_max_delay_s,
         "IMAGEFORK_WEBHOOK_DELAY_S must be >= 0 and IMAGEFORK_WEBHOOK_MAX_DELAY_S >= it"),
        (config.webhook_concurrency >= 1, "IMAGEFORK_WEBHOOK_CONCURRENCY must be >= 1"),
        (0 <= config.presign_ttl_s <= MAX_PRESIGN_TTL_S,
         f"IMAGEFORK_PRESIGN_TTL_S must be 0..{MAX_PRESIGN_TTL_S} (0: off; a SigV4 presigned URL lives 7 days at most)"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    try:
        config.fetch_allow_networks
    except ValueError as exc:
        raise ConfigError(f"IMAGEFORK_FETCH_ALLOW: {exc}") from None
    if config.limits.source_ca_file:
        try:  # read now, so a wrong path is a start error, not every https source failing later
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=config.limits.source_ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"IMAGEFORK_SOURCE_CA_FILE must be a readable PEM file of CA certificates: "
                              f"{config.limits.source_ca_file}: {exc}") from None
    return config


def read_env(env: Mapping[str, str] | None = None) -> Config:
    """defaults -> ``env`` (the process's environment by default) -> check."""
    env = os.environ if env is None else env
    reader = _EnvReader(env)
    d_lim, d_enc, d_ret, d_top = Limits(), Encoding(), Retry(), Topics()
    namespace = reader.str("IMAGEFORK_NAMESPACE", "")
    topics = Topics(**{
        f.name: reader.str(f"IMAGEFORK_TOPIC_{f.name.upper()}", namespace + getattr(d_top, f.name))
        for f in fields(Topics)
    })
    limits = Limits(
        max_source_bytes=reader.int("IMAGEFORK_MAX_SOURCE_BYTES", d_lim.max_source_bytes),
        max_pixels=reader.int("IMAGEFORK_MAX_PIXELS", d_lim.max_pixels),
        max_frames=reader.int("IMAGEFORK_MAX_FRAMES", d_lim.max_frames),
        max_dimension=reader.int("IMAGEFORK_MAX_DIMENSION", d_lim.max_dimension),
        max_tasks=reader.int("IMAGEFORK_MAX_TASKS", d_lim.max_tasks),
        connect_timeout_s=reader.float("IMAGEFORK_CONNECT_TIMEOUT_S", d_lim.connect_timeout_s),
        read_timeout_s=reader.float("IMAGEFORK_READ_TIMEOUT_S", d_lim.read_timeout_s),
        max_redirects=reader.int("IMAGEFORK_MAX_REDIRECTS", d_lim.max_redirects),
        source_ca_file=reader.str("IMAGEFORK_SOURCE_CA_FILE", d_lim.source_ca_file),
    )
    encoding = Encoding(
        png_compress_level=reader.int("IMAGEFORK_PNG_COMPRESS_LEVEL", d_enc.png_compress_level),
        jpeg_quality=reader.int("IMAGEFORK_JPEG_QUALITY", d_enc.jpeg_quality),
        webp_quality=reader.int("IMAGEFORK_WEBP_QUALITY", d_enc.webp_quality),
        webp_method=reader.int("IMAGEFORK_WEBP_METHOD", d_enc.webp_method),
        avif_quality=reader.int("IMAGEFORK_AVIF_QUALITY", d_enc.avif_quality),
        avif_speed=reader.int("IMAGEFORK_AVIF_SPEED", d_enc.avif_speed),
        jpeg_progressive=reader.bool("IMAGEFORK_JPEG_PROGRESSIVE", d_enc.jpeg_progressive),
    )
    retry = Retry(
        max_retries=reader.int("IMAGEFORK_MAX_RETRIES", d_ret.max_retries),
        policy=reader.str("IMAGEFORK_RETRY_POLICY", d_ret.policy).lower(),
        delay_s=reader.float("IMAGEFORK_RETRY_DELAY_S", d_ret.delay_s),
        max_delay_s=reader.float("IMAGEFORK_RETRY_MAX_DELAY_S", d_ret.max_delay_s),
    )
    d = Config()
    allow = reader.str("IMAGEFORK_FETCH_ALLOW", "")
    s3_allow = reader.str("IMAGEFORK_SOURCE_S3_ALLOW", "")
    security = KafkaSecurity(
        protocol=reader.str("KAFKA_SECURITY_PROTOCOL", "PLAINTEXT").upper(),
        sasl_mechanism=reader.str("KAFKA_SASL_MECHANISM", "").upper(),
        sasl_username=reader.str("KAFKA_SASL_USERNAME", ""),
        sasl_password=reader.str("KAFKA_SASL_PASSWORD", ""),
        ssl_cafile=reader.str("KAFKA_SSL_CAFILE", ""),
        ssl_certfile=reader.str("KAFKA_SSL_CERTFILE", ""),
        ssl_keyfile=reader.str("KAFKA_SSL_KEYFILE", ""),
    )
    return Config(
        bootstrap_servers=reader.str("KAFKA_BOOTSTRAP_SERVERS", d.bootstrap_servers),
        kafka_security=security,
        s3_endpoint_url=reader.str("S3_ENDPOINT_URL", "") or None,
        s3_public_url=reader.str("S3_PUBLIC_URL", "") or None,
        presign_ttl_s=reader.int("IMAGEFORK_PRESIGN_TTL_S", d.presign_ttl_s),
        s3_region=reader.str("AWS_REGION", reader.str("AWS_DEFAULT_REGION", d.s3_region)),
        aws_access_key_id=reader.str("AWS_ACCESS_KEY_ID", "") or None,
        aws_secret_access_key=reader.str("AWS_SECRET_ACCESS_KEY", "") or None,
        bucket=reader.str("S3_BUCKET", d.bucket),
        output_prefix=reader.str("IMAGEFORK_OUTPUT_PREFIX", d.output_prefix),
        staging_prefix=reader.str("IMAGEFORK_STAGING_PREFIX", d.staging_prefix),
        topics=topics,
        completed_json_topic=reader.str("IMAGEFORK_COMPLETED_JSON_TOPIC", ""),
        metrics_peers=tuple(tuple(part.split("=", 1)) for part in  # type: ignore[misc]
                            reader.str("IMAGEFORK_METRICS_PEERS", "").split(",") if "=" in part),
        partitions=reader.int("IMAGEFORK_PARTITIONS", d.partitions),
        replication_factor=reader.int("IMAGEFORK_REPLICATION_FACTOR", d.replication_factor),
        workflow_timeout_s=reader.float("IMAGEFORK_WORKFLOW_TIMEOUT_S", d.workflow_timeout_s),
        session_timeout_s=reader.float("IMAGEFORK_SESSION_TIMEOUT_S", d.session_timeout_s),
        repair_after_s=reader.float("IMAGEFORK_REPAIR_AFTER_S", d.repair_after_s),
        reuse=reader.str("IMAGEFORK_REUSE", d.reuse).strip().lower(),
        reuse_ttl_s=reader.float("IMAGEFORK_REUSE_TTL_S", d.reuse_ttl_s),
        finished_retention_s=reader.float("IMAGEFORK_FINISHED_RETENTION_S", d.finished_retention_s),
        join_batch=reader.int("IMAGEFORK_JOIN_BATCH", d.join_batch),
        join_commit_interval_ms=reader.int("IMAGEFORK_JOIN_COMMIT_INTERVAL_MS", d.join_commit_interval_ms),
        join_instance=reader.str("IMAGEFORK_JOIN_INSTANCE", d.join_instance),
        transaction_timeout_s=reader.float("IMAGEFORK_TRANSACTION_TIMEOUT_S", d.transaction_timeout_s),
        late_result_grace_s=reader.float("IMAGEFORK_LATE_RESULT_GRACE_S", d.late_result_grace_s),
        shutdown_grace_s=reader.float("IMAGEFORK_SHUTDOWN_GRACE_S", d.shutdown_grace_s),
        join_max_aborts=reader.int("IMAGEFORK_JOIN_MAX_ABORTS", d.join_max_aborts),
        resize_concurrency=reader.int("IMAGEFORK_RESIZE_CONCURRENCY", d.resize_concurrency),
        resize_pool=reader.str("IMAGEFORK_RESIZE_POOL", d.resize_pool).lower(),
        planner_concurrency=reader.int("IMAGEFORK_PLANNER_CONCURRENCY", d.planner_concurrency),
        batch_share=reader.float("IMAGEFORK_BATCH_SHARE", d.batch_share),
        fetch_allow=tuple(p.strip() for p in allow.split(",") if p.strip()),
        source_s3_allow=tuple(p.strip() for p in s3_allow.split(",") if p.strip()),
        max_crashes=reader.int("IMAGEFORK_MAX_CRASHES", d.max_crashes),
        memory_budget_mb=reader.int("IMAGEFORK_MEMORY_BUDGET_MB", d.memory_budget_mb),
        source_idle_s=reader.float("IMAGEFORK_SOURCE_IDLE_S", d.source_idle_s),
        limits=limits,
        encoding=encoding,
        retry=retry,
        log_level=reader.str("IMAGEFORK_LOG_LEVEL", d.log_level).lower(),
        log_format=reader.str("IMAGEFORK_LOG_FORMAT", d.log_format).lower(),
        namespace=namespace,
        metrics_listen=reader.str("IMAGEFORK_METRICS_LISTEN", ""),
        advertised_url=reader.str("IMAGEFORK_ADVERTISED_URL", ""),
        api_listen=reader.str("IMAGEFORK_API_LISTEN", "127.0.0.1:8088"),
        api_body_timeout_s=reader.float("IMAGEFORK_API_BODY_TIMEOUT_S", d.api_body_timeout_s),
        api_tokens_file=reader.str("IMAGEFORK_API_TOKENS_FILE", ""),
        api_rate=reader.float("IMAGEFORK_API_RATE", d.api_rate),
        api_burst=reader.int("IMAGEFORK_API_BURST", d.api_burst),
        api_allow_anonymous=reader.bool("IMAGEFORK_API_ALLOW_ANONYMOUS", d.api_allow_anonymous),
        api_restart_after_s=reader.float("IMAGEFORK_API_RESTART_AFTER_S", d.api_restart_after_s),
        webhook_secret=reader.str("IMAGEFORK_WEBHOOK_SECRET", ""),
        webhook_timeout_s=reader.float("IMAGEFORK_WEBHOOK_TIMEOUT_S", d.webhook_timeout_s),
        webhook_max_tries=reader.int("IMAGEFORK_WEBHOOK_MAX_TRIES", d.webhook_max_tries),
        webhook_delay_s=reader.float("IMAGEFORK_WEBHOOK_DELAY_S", d.webhook_delay_s),
        webhook_max_delay_s=reader.float("IMAGEFORK_WEBHOOK_MAX_DELAY_S", d.webhook_max_delay_s),
        webhook_concurrency=reader.int("IMAGEFORK_WEBHOOK_CONCURRENCY", d.webhook_concurrency),
    ).validate()


def parse_host_port(text: str) -> tuple[str, int] | None:
    """``host:port`` (port 0: any free one), ``[v6]:port``; None when it is not one."""
    host, _, port = text.rpartition(":")
    if not port.isdigit() or not 0 <= int(port) < 65536:
        return None
    return host.strip("[]") or "0.0.0.0", int(port)


MEMORY_BUDGET_DEFAULT = 1 << 30
INTERPRETER_HEADROOM = 200 << 20  # a resize process's RSS without any source (measured ~110 MB) and margin


def budget_for_limit(limit: int | None) -> int:
    """The decode budget under a memory limit of ``limit`` bytes (None: no limit): what is left after the
    interpreter, its libraries and the encoders' buffers, at most 1 GiB, at least 64 MiB. A 512 MB
    container gets 312 MiB; with the budget full, its RSS stays within it only with glibc's adaptive mmap threshold
    off (456 MB, else 599 MB; docs/soak.md), which resize_job.init does."""
    if not limit:
        return MEMORY_BUDGET_DEFAULT
    return max(64 << 20, min(MEMORY_BUDGET_DEFAULT, limit - INTERPRETER_HEADROOM))


def metrics_address(config: "Config") -> tuple[str, int] | None:
    return parse_host_port(config.metrics_listen) if config.metrics_listen else None


class _EnvReader:
    def __init__(self, env: Mapping[str, str]):
        self.env = env

    def str(self, name: str, default: str) -> str:
        value = self.env.get(name)
        return default if value is None or value == "" else value

    def int(self, name: str, default: int) -> int:
        raw = self.env.get(name)
        if raw in (None, ""):
            return default
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"{name} must be an integer, got {raw!r}") from None

    def bool(self, name: str, default: bool) -> bool:
        raw = (self.env.get(name) or "").strip().lower()
        if raw == "":
            return default
        if raw in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return raw in ("true", "1", "yes", "on")
        raise ConfigError(f"{name} must be true or false, got {self.env.get(name)!r}")

    def float(self, name: str, default: float) -> float:
        raw = self.env.get(name)
        if raw in (None, ""):
            return default
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {raw!r}") from None
