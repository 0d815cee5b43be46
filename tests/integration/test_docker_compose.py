"""docker-compose for real (issue 12): docker-compose.yml with the local images (docker-compose.local.yml),
two resize workers, the seed request submitted from the host through the host listener (localhost:29092),
its 9 outputs read back through the published S3 port (localhost:9000), its final event, the API's word on
it (http://127.0.0.1:8088), then ``down -v``: nothing is left behind, also when the test fails.

Skips, saying why, where Docker cannot run (fails instead with IMAGEFORK_REQUIRE_DOCKER=1, as in CI)."""
import atexit
import io
import json
import os
import shutil
import socket
import subprocess
import urllib.request
import uuid
from pathlib import Path

import pytest
from PIL import Image

from streams.adapters.objectstore import ObjectStore
from streams.client import Client, Follower, consume_completed
from streams.config import Config
from streams.demo import seed_request
from streams.stack import images
from tests.conftest import docker_required, drop_schema_resolver, skip_without_docker
from tests.integration.pipeline import wait_until

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
FILES = ["-f", str(ROOT / "docker-compose.yml"), "-f", str(ROOT / "docker-compose.local.yml")]
# what the host sees: the ports docker-compose.yml publishes on 127.0.0.1
HOST_ENV = {"KAFKA_BOOTSTRAP_SERVERS": "localhost:29092", "S3_ENDPOINT_URL": "http://localhost:9000",
            "AWS_ACCESS_KEY_ID": "imagefork", "AWS_SECRET_ACCESS_KEY": "imagefork-secret",
            "AWS_REGION": "us-east-1", "S3_BUCKET": "imagefork"}
PORTS = (29092, 9000, 8088)
SAMPLE = ROOT / "streams" / "assets" / "sample.png"


def _port_taken(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


class Compose:
    def __init__(self, project: str):
        self.project = project
        self.up_ = False

    def run(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(["docker-compose", "-p", self.project, *FILES, *args], cwd=ROOT, text=True,
                              capture_output=True, timeout=timeout, env=images.docker_env())
        if check and proc.returncode != 0:
            raise AssertionError(f"docker-compose {' '.join(args)} failed ({proc.returncode}):\n"
                                 f"{(proc.stdout + proc.stderr)[-3000:]}")
        return proc

    def up(self) -> None:
        self.up_ = True
        self.run("up", "-d", "--scale", "resize=2")

    def logs(self) -> str:
        return self.run("logs", "--no-color", "--tail=30", check=False, timeout=60).stdout[-6000:]

    def down(self) -> None:
        if self.up_:
            self.up_ = False
            self.run("down", "-v", "--remove-orphans", "--timeout", "10", check=False, timeout=180)


@pytest.fixture
def compose():
    skip_without_docker("docker-compose")
    # each image built from the sources as they are now (its label imagefork.source is their hash), not an
    # old build of them: the app image of an older commit would test old code
    not_current = [why for why in map(images.not_current, (images.KAFKA_IMAGE, images.S3PROXY_IMAGE,
                                                           images.APP_IMAGE)) if why]
    why = (None if shutil.which("docker-compose") else "docker-compose is not installed") \
        or ("; ".join(not_current) or None) \
        or next((f"127.0.0.1:{p} is in use (docker-compose.yml publishes it)" for p in PORTS if _port_taken(p)), None)
    if why:
        (pytest.fail if docker_required() else pytest.skip)(f"docker-compose: {why}")
    c = Compose(f"imagefork-test-{uuid.uuid4().hex[:8]}")
    atexit.register(c.down)  # should a SIGTERM or Ctrl-C cut the teardown short
    try:
        yield c
    finally:
        c.down()
    left = subprocess.run(["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={c.project}"],
                          capture_output=True, text=True).stdout.split()
    assert not left, f"containers left behind by {c.project}: {left}"


def test_compose_seed_request_from_the_host(compose, tmp_path):
    compose.up()
    config = Config.from_env({**os.environ, **HOST_ENV})
    store = ObjectStore(config)
    try:
        # the host listener answers, and the topics service has made the topics
        assert wait_until(lambda: _port_taken(29092) and _port_taken(9000), 120), compose.logs()
        source_key = f"{config.staging_prefix}compose-test/sample.png"
        assert wait_until(lambda: _try(store.ensure_bucket), 60), compose.logs()
        store.put(source_key, SAMPLE.read_bytes(), "image/png")
        workflow = f"compose-seed-{uuid.uuid4().hex[:8]}"
        followers: list = []  # just made, the topics' partitions may have no leader yet: try again
        assert wait_until(lambda: _try(lambda: followers.append(Follower(config))), 60, interval=1), compose.logs()
        follower = followers[0]
        client = Client(config)
        try:
            client.submit(seed_request(f"s3://{config.bucket}/{source_key}"), workflow)
            finals = follower.wait([workflow], 240)
        finally:
            follower.close()
            client.close()
        final = finals[workflow]
        assert final.status == "COMPLETED", (final.errors, compose.logs())
        assert len(final.outputs) == 9 and len(final.fileLocations) == 9
        sizes = {(o.format, o.width, o.height) for o in final.outputs}
        assert sizes == {(f, s, s) for f in ("png", "jpg", "webp") for s in (300, 200, 1200)}
        # the final event names the address inside compose; the host reads them through localhost:9000
        assert all(url.startswith("http://s3:9000/imagefork/") for url in final.fileLocations)
        for out in final.outputs:
            data = store.get(out.s3Uri, 50 << 20)
            assert len(data) == out.bytes
            im = Image.open(io.BytesIO(data))
            assert im.size == (out.width, out.height)
            assert im.format == {"jpg": "JPEG"}.get(out.format, out.format.upper())
        assert len(consume_completed(config, [workflow], timeout=60)) == 1
        # both resize replicas are up, and the API (its own service) says COMPLETED
        assert len(compose.run("ps", "-q", "resize").stdout.split()) == 2
        assert wait_until(lambda: _api_status(workflow) == "COMPLETED", 60), (_api_status(workflow), compose.logs())
    except BaseException:
        print(compose.logs())
        raise
    finally:
        drop_schema_resolver()  # the compose broker goes with `down`


def _try(fn) -> bool:
    try:
        fn()
        return True
    except Exception:
        return False


def _api_status(workflow: str) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:8088/v1/workflows/{workflow}", timeout=5) as resp:
            return json.loads(resp.read()).get("status")
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
