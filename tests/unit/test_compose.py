"""Static checks of docker-compose.yml, docker-compose.local.yml and the Dockerfile: what can be known without
a Docker engine (tests/integration/test_docker_compose.py runs the compose file for real where one answers).
Nothing is mocked: the commands go through the installed ``imagefork`` entry point, which parses them and
stops at ``--help``."""
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ROLES = ("planner", "resize", "join")


def load_compose() -> dict:
    import yaml
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def built_services() -> dict:
    return {name: svc for name, svc in load_compose()["services"].items() if "build" in svc}


def test_the_compose_file_parses_and_its_references_resolve():
    compose = load_compose()
    services = compose["services"]
    assert {"kafka", "s3", "topics", *ROLES} <= set(services)
    for name, svc in services.items():
        assert ("image" in svc) != ("build" in svc), name  # each is either pulled or built, not both
        assert set(svc.get("depends_on", {})) <= set(services), name
        for volume in svc.get("volumes", []):
            assert volume.split(":")[0] in compose.get("volumes", {}), (name, volume)


def test_each_role_is_a_scalable_service_of_the_project_image():
    services = built_services()
    for role in ROLES:
        svc = services[role]
        assert svc["build"] == "." and svc["command"] == ["worker", role]
        assert "container_name" not in svc and "ports" not in svc  # so --scale works
        env = svc["environment"]
        assert env["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092" and env["S3_ENDPOINT_URL"].startswith("http://s3:")
    assert services["topics"]["command"] == ["topics"]


def test_the_image_runs_the_projects_entry_point():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["imagefork"]' in dockerfile
    # a wheel install (what test_wheel.py proves works), not an editable one that hides a broken wheel
    # every dependency at its pinned version (constraints.txt, checked by the next test)
    assert "pip install --no-cache-dir -c constraints.txt . " in dockerfile and "install -e" not in dockerfile
    assert "COPY pyproject.toml README.md constraints.txt ./" in dockerfile
    # the base is pinned to a Python minor and a Debian release, and can be swapped by a build argument
    assert "ARG PYTHON_IMAGE=python:3.11-slim-bookworm\nFROM ${PYTHON_IMAGE}" in dockerfile
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["imagefork"] == "streams.cli:main"


def test_constraints_pin_every_dependency_within_pyprojects_ranges():
    """constraints.txt (what make install and the app image install) names every dependency of the package
    and of its extras with ==, at a version its range in pyproject.toml accepts; nothing is named twice."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    pins: dict[str, str] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", line
        name = canonicalize_name(req.name)
        assert name not in pins, f"{name} twice"
        pins[name] = specs[0].version
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *(d for extra in project["optional-dependencies"].values() for d in extra)]
    for dep in wanted:
        req = Requirement(dep)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not pinned in constraints.txt (make lock)"
        assert req.specifier.contains(pins[name], prereleases=True), (dep, pins[name])


@pytest.mark.parametrize("name", sorted(built_services()))
def test_every_built_service_command_is_accepted_by_the_entry_point(name):
    """The installed ``imagefork`` script parses the service's command (an unknown subcommand or role
    exits 2); ``--help`` after it stops before anything runs."""
    script = Path(sys.executable).parent / "imagefork"  # the console script pyproject.toml declares
    entry = [str(script)] if script.exists() else [sys.executable, "-m", "streams"]  # not installed as one
    command = built_services()[name]["command"]
    out = subprocess.run([*entry, *command, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, (command, out.stderr)
    assert out.stdout.startswith(f"usage: imagefork {command[0]}"), out.stdout


def test_every_pulled_image_is_pinned():
    for name, svc in load_compose()["services"].items():
        if "image" in svc:
            _repo, _, tag = svc["image"].rpartition(":")
            assert _repo and tag and tag != "latest", (name, svc["image"])


def test_kafka_is_4x_kraft():
    kafka = load_compose()["services"]["kafka"]
    assert kafka["image"].split(":")[1].startswith("4.")
    assert "controller" in kafka["environment"]["KAFKA_PROCESS_ROLES"]


def _listeners(value: str) -> dict[str, str]:
    """``NAME://host:port,...`` -> {NAME: "host:port"}."""
    return dict(item.split("://", 1) for item in value.split(","))


def test_kafka_has_a_listener_for_the_host_published_on_loopback():
    """Services reach the broker as kafka:9092; a client on the host (``imagefork submit``) needs a listener
    that advertises an address the host can reach, and that port published."""
    kafka = load_compose()["services"]["kafka"]
    env = kafka["environment"]
    listeners, advertised = _listeners(env["KAFKA_LISTENERS"]), _listeners(env["KAFKA_ADVERTISED_LISTENERS"])
    protocols = dict(item.split(":") for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    assert set(listeners) <= set(protocols) and set(advertised) <= set(listeners)
    assert advertised["PLAINTEXT"] == "kafka:9092"  # what every service's KAFKA_BOOTSTRAP_SERVERS says
    assert env["KAFKA_INTER_BROKER_LISTENER_NAME"] == "PLAINTEXT"
    assert "CONTROLLER" not in advertised
    host = [name for name, address in advertised.items() if address.startswith("localhost:")]
    assert len(host) == 1, advertised
    port = advertised[host[0]].rsplit(":", 1)[1]
    assert listeners[host[0]].rsplit(":", 1)[1] == port
    assert f"127.0.0.1:{port}:{port}" in kafka["ports"]  # the same port on the host, loopback only


def test_s3_is_published_on_loopback_and_no_public_url_is_claimed_for_a_private_bucket():
    services = load_compose()["services"]
    assert "127.0.0.1:9000:9000" in services["s3"]["ports"]
    for name, svc in built_services().items():
        assert "S3_PUBLIC_URL" not in svc["environment"], name  # the bucket is private (docs/docker.md)


def test_the_pulled_images_are_the_local_stacks_versions():
    from streams.stack import local
    if os.environ.get("IMAGEFORK_KAFKA_VERSION") or os.environ.get("IMAGEFORK_S3PROXY_VERSION"):
        pytest.skip("the local stack's versions are overridden in the environment")
    services = load_compose()["services"]
    assert services["kafka"]["image"] == f"apache/kafka:{local.KAFKA_VERSION}"
    assert services["s3"]["image"] == f"andrewgaul/s3proxy:s3proxy-{local.S3PROXY_VERSION}"


def test_the_api_service_reaches_the_joins_through_the_compose_network():
    services = built_services()
    api, join = services["api"], services["join"]
    assert api["command"] == ["api"] and api["environment"]["IMAGEFORK_API_LISTEN"] == "0.0.0.0:8088"
    assert api["ports"] == ["127.0.0.1:8088:8088"]
    # the join listens on every address of its container, so it advertises the container's host name
    assert join["environment"]["IMAGEFORK_METRICS_LISTEN"].startswith("0.0.0.0:")
    assert join["environment"]["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"  # the shared settings merged in


def test_the_local_override_swaps_only_the_images_for_the_locally_built_ones():
    """docker-compose.local.yml (hosts that pull nothing) differs from docker-compose.yml only in where the
    images come from: the tags `make images` builds (streams/stack/images.py), the app's base a build argument."""
    import yaml
    from streams.stack import images
    if os.environ.get("IMAGEFORK_KAFKA_VERSION") or os.environ.get("IMAGEFORK_S3PROXY_VERSION"):
        pytest.skip("the local stack's versions are overridden in the environment")
    override = yaml.safe_load((ROOT / "docker-compose.local.yml").read_text())["services"]
    services = load_compose()["services"]
    assert set(override) == set(services)
    assert override["kafka"] == {"image": images.KAFKA_IMAGE}
    assert override["s3"] == {"image": images.S3PROXY_IMAGE}
    for name in built_services():
        assert override[name]["image"] == images.APP_IMAGE, name
        build = override[name]["build"]
        assert build["context"] == "." and build["args"] == {"PYTHON_IMAGE": images.PYTHON_IMAGE}, name
        assert set(override[name]) == {"image", "build"}, name
