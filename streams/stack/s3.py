"""S3Proxy with its filesystem backend: the local stack's S3 server (one bucket, one key pair)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from streams.stack.common import StackError

ACCESS_KEY = "imagefork"
SECRET_KEY = "imagefork-local-secret"
BUCKET = "imagefork"


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


def wait_s3(env: dict, timeout: float, check_alive: Callable[[], None], log: Path) -> None:
    """S3Proxy answers, and the bucket is there (created if not)."""
    import boto3  # start-up: `imagefork stack` commands stay light
    from botocore.config import Config as BotoConfig
    end = time.monotonic() + timeout
    s3 = boto3.session.Session().client(
        "s3", endpoint_url=env["S3_ENDPOINT_URL"], aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY, region_name="us-east-1",
        config=BotoConfig(s3={"addressing_style": "path"}, retries={"max_attempts": 1}, connect_timeout=1))
    last = None
    while time.monotonic() < end:
        check_alive()
        try:
            existing = [b["Name"] for b in s3.list_buckets().get("Buckets", [])]
            if BUCKET not in existing:
                s3.create_bucket(Bucket=BUCKET)
            return
        except Exception as exc:
            last = exc
            time.sleep(0.5)
    raise StackError(f"S3Proxy did not answer on {env['S3_ENDPOINT_URL']} within {timeout:.0f}s ({last}); "
                     f"see {log}")
