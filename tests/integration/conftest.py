import shutil
import uuid
from pathlib import Path

import pytest
from PIL import Image

from streams.stack.processes import FileServer
from tests.integration.pipeline import Pipeline

SAMPLE = Path(__file__).resolve().parents[2] / "streams" / "assets" / "sample.png"


@pytest.fixture(scope="session")
def files(tmp_path_factory):
    """A loopback HTTP server with the sample photo and a few hostile files."""
    folder = tmp_path_factory.mktemp("files")
    shutil.copy(SAMPLE, folder / "sample.png")
    (folder / "not-an-image.png").write_bytes(b"<html>hello</html>")
    data = SAMPLE.read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 3])
    from tests.unit.images import png_declaring
    (folder / "bomb.png").write_bytes(png_declaring(30000, 30000))
    Image.new("RGBA", (640, 480), (10, 200, 30, 120)).save(folder / "alpha.png")
    server = FileServer(folder)
    yield server
    server.close()


@pytest.fixture(scope="module")
def pipeline(stack_env, tmp_path_factory):
    """One running pipeline (join, resize, planner) shared by a module's tests."""
    p = Pipeline(stack_env, f"m{uuid.uuid4().hex[:8]}.", tmp_path_factory.mktemp("logs"))
    try:
        p.start_all()  # stops what it started if a role does not come up
        yield p
    finally:
        p.stop()


@pytest.fixture
def make_pipeline(stack_env, namespace, tmp_path):
    """A fresh pipeline per test, for tests that kill or restart things."""
    made = []

    def make(**overrides) -> Pipeline:
        p = Pipeline(stack_env, namespace + str(len(made)), tmp_path / f"logs{len(made)}", **overrides)
        made.append(p)
        return p

    yield make
    failures = []
    for p in made:
        try:
            p.stop()
        except Exception as exc:  # stop the others all the same
            failures.append(exc)
    assert not failures, failures


@pytest.fixture
def own_stack(local_stack):
    """A Kafka (and S3Proxy) of the test's own, for a test that stops the broker so that no other test
    sees it go away; stopped when the test ends, not with the session."""
    stack = local_stack(kafka=True)
    yield stack
    stack.down()
