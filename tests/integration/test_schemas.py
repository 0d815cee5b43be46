"""The schemas topic on the real broker: a reader decodes the records of a newer writer whose
schema it has no file for, as in a rolling deploy."""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from streams import serde
from streams.adapters.kafka import ensure_topics
from streams.adapters.schemas import install_resolver, publish_schemas
from tests.conftest import config_for

pytestmark = pytest.mark.integration

# a newer writer, in its own process: its schema folder has DeadlineCheck with more fields (a key
# the writer's schema lacks is not written)
WRITER = """
import sys
from streams import serde
from streams.adapters.schemas import publish_schemas
from streams.config import Config
publish_schemas(Config.from_env())
sys.stdout.write(serde.encode("DeadlineCheck", {"workflowId": "w", "at": 7, "foo": "new", "bar": 1}).hex())
"""


def newer_writer(env: dict, folder, *fields: dict) -> bytes:
    """Run a writer whose DeadlineCheck has ``fields`` more; the record it wrote."""
    shutil.copytree(serde.schemas_dir(), folder, ignore=shutil.ignore_patterns("history"))
    path = folder / "io.imagefork.DeadlineCheck.avsc"
    schema = json.loads(path.read_text())
    schema["fields"] += fields
    path.write_text(json.dumps(schema))
    written = subprocess.run([sys.executable, "-c", WRITER], check=True, capture_output=True, text=True,
                             timeout=120, env={**os.environ, **env, "IMAGEFORK_SCHEMAS_DIR": str(folder)})
    return bytes.fromhex(written.stdout)


def test_a_newer_writers_schema_is_found_on_the_topic(stack_env, namespace, tmp_path):
    env = {**stack_env, "IMAGEFORK_NAMESPACE": namespace}
    config = config_for(env)
    ensure_topics(config)
    assert publish_schemas(config) == len(serde.current_schemas())  # this process writes too
    foo = {"name": "foo", "type": "string", "default": ""}
    data = newer_writer(env, tmp_path / "v3", foo)
    assert data[2:10] != serde.schema("DeadlineCheck").fingerprint
    serde.set_resolver(None)  # the process-wide resolver another test's client may have installed
    with pytest.raises(serde.SerdeError, match="no schema resolver"):
        serde.decode("DeadlineCheck", data)

    resolver = install_resolver(config, min_interval_s=2.0)
    try:
        assert serde.decode("DeadlineCheck", data) == {"workflowId": "w", "at": 7}
        # it read everything the topic holds: both processes' schemas
        assert data[2:10] in resolver.schemas and set(serde.current_schemas()) <= set(resolver.schemas)
        # a made-up fingerprint: unknown, and within the interval looked up in what was fetched only
        read_at = resolver.read_at
        garbage = b"\xc3\x01" + bytes(8) + data[10:]
        for _ in range(100):
            with pytest.raises(serde.SerdeError, match="does not know"):
                serde.decode("DeadlineCheck", garbage)
        assert resolver.read_at == read_at
        # a writer that starts later is found too
        data = newer_writer(env, tmp_path / "v4", foo, {"name": "bar", "type": "int", "default": 0})
        time.sleep(2.0)
        assert serde.decode("DeadlineCheck", data) == {"workflowId": "w", "at": 7}
    finally:
        serde.set_resolver(None)
        resolver.close()


def newer_schemas(folder, added: dict[str, dict]):
    """A copy of the schema folder where each named record has one optional field more."""
    shutil.copytree(serde.schemas_dir(), folder, ignore=shutil.ignore_patterns("history", "archive", "*.md"))
    for name, field in added.items():
        path = folder / f"io.imagefork.{name}.avsc"
        schema = json.loads(path.read_text())
        schema["fields"].append(field)
        path.write_text(json.dumps(schema))
    return folder


def test_a_rolling_deploy_with_new_and_old_workers_side_by_side(make_pipeline, files, tmp_path):
    """Real processes of two versions at once: a *new* planner and join (their ResizeTask and TaskResult
    have an optional field more) and an *old* resize worker. The old worker reads the new planner's
    tasks through the schemas topic; the new join reads the old worker's results by Avro resolution.
    Every request completes, exactly once."""
    new = newer_schemas(tmp_path / "v-next", {
        "ResizeTask": {"name": "urgency", "type": "int", "default": 0},
        "TaskResult": {"name": "note", "type": ["null", "string"], "default": None}})
    p = make_pipeline()
    p.start_together(("join", {"IMAGEFORK_SCHEMAS_DIR": str(new)}),
                     "resize",  # the old one: the repository's schemas
                     ("planner", {"IMAGEFORK_SCHEMAS_DIR": str(new)}))
    follower = p.follower()
    ids = [f"deploy-{i}" for i in range(3)]
    for wf in ids:
        p.submit({"fileLocation": files.url("sample.png"), "outputFormats": ["png", "jpg"],
                  "outputSizes": [{"width": 100, "height": 80}], "maintainAspectRatio": True}, wf)
    finals = follower.wait(ids, 180)
    follower.close()
    assert all(f.status == "COMPLETED" and len(f.outputs) == 2 for f in finals.values()), \
        ({i: f.errors for i, f in finals.items()}, p.logs())
    from collections import Counter
    assert Counter(f.workflowId for f in p.finals_for(ids, settle=5)) == Counter({i: 1 for i in ids})
    for f in finals.values():
        p.check_outputs(f)
    assert "dead-lettered" not in p.logs()
