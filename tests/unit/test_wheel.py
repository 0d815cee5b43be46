"""The built wheel carries the schemas: installed alone (with fastavro) in a fresh venv, it encodes
and decodes from a folder outside the repository, old versions included. (About 30 s: it builds
the wheel from a copy of the sources and makes a venv.)"""
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OFFLINE = re.compile(r"No matching distribution|Could not find a version|NewConnectionError|"
                     r"Temporary failure in name resolution|Network is unreachable")

ROUND_TRIP = """
import io, json, sys
import fastavro
from streams import serde
here = serde.schemas_dir()
record = {"workflowId": "w", "taskRef": "r0", "status": "SUCCEEDED", "attempts": 1, "finishedAt": 7,
          "output": None, "error": None, "runId": "r", "deadline": 9, "facts": None}
assert serde.decode_join_event(serde.encode_join_event("TaskResult", record)) == ("TaskResult", record)
old = fastavro.parse_schema(json.loads((here / "history" / "io.imagefork.TaskResult.v1.avsc").read_text()))
out = io.BytesIO()
out.write(b"\\xc3\\x01" + serde.fingerprint_of(old))
fastavro.schemaless_writer(out, old, {k: v for k, v in record.items() if k not in ("runId", "deadline", "facts")})
json.dump({"dir": str(here), "old": serde.decode("TaskResult", out.getvalue())}, sys.stdout)
"""


def run(*cmd, **kw) -> str:
    """Run ``cmd``; skip the test when it failed only for want of the package index."""
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)
    if done.returncode != 0:
        output = done.stdout + done.stderr
        if OFFLINE.search(output):
            pytest.skip(f"no package index to build or install from: {OFFLINE.search(output).group(0)}")
        raise AssertionError(f"{' '.join(map(str, cmd))} failed:\n{output[-3000:]}")
    return done.stdout


def sources(into: Path) -> Path:
    """What the build reads, copied: no stale build/ or egg-info of the working tree gets in."""
    into.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, into / name)
    junk = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("streams", "schemas"):
        shutil.copytree(ROOT / name, into / name, ignore=junk)
    return into


def test_wheel_ships_the_schemas_and_every_module(tmp_path):
    src = sources(tmp_path / "src")
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "whl"), str(src))
    wheel = next((tmp_path / "whl").glob("imagefork-*.whl"))
    shipped = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(src).as_posix() for p in (src / "streams").rglob("*.py")}
    assert modules <= shipped, f"packages missing from pyproject.toml: {sorted(modules - shipped)}"
    schemas = {f"streams/{p.relative_to(src).as_posix()}" for p in (src / "schemas").rglob("*.avsc")}
    assert schemas and schemas <= shipped
    assets = {p.relative_to(src).as_posix() for p in (src / "streams" / "assets").iterdir() if p.suffix != ".py"}
    assert "streams/assets/dashboard.html" in assets and assets <= shipped, sorted(assets - shipped)

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", str(venv))
    python = venv / "bin" / "python"
    run(str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel), "fastavro")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}  # no IMAGEFORK_SCHEMAS_DIR, no PYTHONPATH
    result = json.loads(run(str(python), "-c", ROUND_TRIP, cwd=outside, env=env))
    assert result["dir"].startswith(str(venv)) and result["dir"].endswith("streams/schemas")
    assert result["old"]["runId"] == ""
