"""`make images` rebuilds an image whose sources changed and reuses a current one (streams/stack/images.py:
build_all compares each image's label ``imagefork.source`` with the hash of what it is built from).

A throwaway tag, its builder a ``docker import`` of an empty tar (no network, a second or so), registered
through the same (tag, builder, hash) steps build_all takes. It is first made with a stale hash in its label;
build_all rebuilds it (a new image id, the label now the current hash, the stale image removed); run again, it
reuses it (the same id, the builder not called). The image is removed at the end.

Each test runs twice: on the real docker CLI and engine (``real``: it skips, saying why, without a Docker
engine; with IMAGEFORK_REQUIRE_DOCKER=1, as in CI, it fails instead), and on a stand-in ``docker`` command of a
few lines first on PATH (``stand-in``: an image table in a JSON file; import, image inspect, rmi), so that
build_all's choices are checked on every machine, Docker or not."""
from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest

from streams.stack import images
from tests.conftest import docker_required

SOURCE = "imagefork.source"

STAND_IN = r'''
import json, re, sys, uuid
from pathlib import Path
STATE = Path(__file__).with_name("images.json")
table = json.loads(STATE.read_text()) if STATE.exists() else {}  # tag, or id of an untagged image -> image
args = sys.argv[1:]


def find(ref):
    return table.get(ref) or next((i for i in table.values() if i["Id"] == ref), None)


if args[0] == "info":
    print("stand-in")
elif args[:2] == ["image", "inspect"]:
    fmt, ref = (args[3], args[4]) if args[2] == "--format" else ("", args[2])
    image = find(ref)
    if image is None:
        sys.exit(f"Error: No such image: {ref}")
    label = re.fullmatch(r'\{\{index \.Config\.Labels "(.+)"\}\}', fmt)
    print(image["Id"] if fmt == "{{.Id}}" else image["Labels"].get(label[1], "<no value>") if label else image)
elif args[0] == "import":
    rest, labels = args[1:], {}
    while rest[0] == "--change":
        key, value = rest[1].removeprefix("LABEL ").split("=", 1)
        labels[key], rest = value, rest[2:]
    sys.stdin.buffer.read()
    if rest[1] in table:  # the tag moves to the new image; the old one stays, untagged
        table[table[rest[1]]["Id"]] = table[rest[1]]
    table[rest[1]] = {"Id": "sha256:" + uuid.uuid4().hex, "Labels": labels}
else:
    if args[0] != "rmi":
        sys.exit(f"stand-in docker: {args} is not supported")
    image = find(args[-1])
    if image is None:
        sys.exit(f"Error: No such image: {args[-1]}")
    table = {k: v for k, v in table.items() if v["Id"] != image["Id"]}
STATE.write_text(json.dumps(table))
'''


@pytest.fixture(params=["stand-in", "real"])
def docker_cli(request, tmp_path, monkeypatch):
    if request.param == "stand-in":
        cli = tmp_path / "docker"
        cli.write_text(f"#!{sys.executable}\n{STAND_IN}")
        cli.chmod(0o755)
        monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
        monkeypatch.setenv("IMAGEFORK_CACHE", str(tmp_path / "cache"))
    else:
        why = images.docker_answers()
        if why:
            if docker_required():
                pytest.fail(f"images: IMAGEFORK_REQUIRE_DOCKER is set but {why}", pytrace=False)
            pytest.skip(f"images: {why}")
    return request.param


def make_image(tag: str, source: str) -> None:
    """A tiny image (an empty root filesystem) under ``tag`` whose label imagefork.source is ``source``."""
    empty_tar = subprocess.run(["tar", "-c", "-f", "-", "-T", "/dev/null"], capture_output=True, check=True).stdout
    proc = subprocess.run(["docker", "import", "--change", f"LABEL {SOURCE}={source}", "-", tag],
                          input=empty_tar, capture_output=True, env=images.docker_env(), timeout=60)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")


def test_build_all_rebuilds_a_stale_image_and_reuses_a_current_one(docker_cli):
    tag = f"imagefork/test-throwaway:{uuid.uuid4().hex[:10]}"
    current = uuid.uuid4().hex[:16]  # the hash of the throwaway's sources as they are now
    built: list[str] = []

    def builder() -> None:  # as the project's builders do: the image carries the hash it is built from
        built.append(tag)
        make_image(tag, current)

    steps = [(tag, builder, lambda: current)]
    ids: list[str] = []
    try:
        make_image(tag, "0123456789abcdef")  # an older build: its sources have changed since
        ids.append(images._id(tag))
        assert ids[0] and images.image_label(tag, SOURCE) == "0123456789abcdef"

        took = images.build_all(steps)
        assert built == [tag] and list(took) == [tag], (built, took)
        ids.append(images._id(tag))
        assert ids[1] and ids[1] != ids[0], "the stale image was not rebuilt"
        assert images.image_label(tag, SOURCE) == current
        assert images.docker("image", "inspect", ids[0], check=False).returncode != 0, "the stale image is left"

        assert images.build_all(steps) == {} and built == [tag], "a current image was built again"
        assert images._id(tag) == ids[1]
    finally:
        for ref in (tag, *filter(None, ids)):
            images.docker("rmi", "-f", ref, check=False)
    assert images._id(tag) == ""


def test_not_current_says_missing_or_stale(docker_cli, monkeypatch):
    """What the compose test and tests/conftest.py's docker_unavailable say of an image: None when its label
    is the current hash, else one line saying it is missing or stale, and to run make images."""
    tag = f"imagefork/test-throwaway:{uuid.uuid4().hex[:10]}"
    monkeypatch.setitem(images.SOURCE_HASH, tag, lambda: "cafe0000cafe0000")
    ids: list[str] = []
    try:
        assert images.not_current(tag) == f"{tag} is not built: run make images"
        make_image(tag, "0123456789abcdef")
        ids.append(images._id(tag))
        assert images.not_current(tag) == f"{tag} is stale: its sources changed, run make images"
        make_image(tag, "cafe0000cafe0000")
        ids.append(images._id(tag))
        assert images.not_current(tag) is None
    finally:
        for ref in (tag, *filter(None, ids)):
            images.docker("rmi", "-f", ref, check=False)
