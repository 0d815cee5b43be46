"""docker-compose.yml cannot run here (no Docker engine): check that it is wired to real entry points."""
from pathlib import Path


from streams.cli import main

ROOT = Path(__file__).resolve().parents[2]


def load_compose():
    import yaml
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_every_role_is_a_service_built_from_the_project():
    services = load_compose()["services"]
    assert {"kafka", "s3", "planner", "resize", "join"} <= set(services)
    for role in ("planner", "resize", "join"):
        svc = services[role]
        assert svc["build"] == "." and svc["command"] == ["worker", role]
        assert "container_name" not in svc and "ports" not in svc  # so --scale works
        env = svc["environment"]
        assert env["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092" and env["S3_ENDPOINT_URL"].startswith("http://s3:")


def test_every_command_parses_as_a_real_entry_point(monkeypatch):
    """Each service's command must be accepted by the imagefork CLI the image's ENTRYPOINT runs."""
    import streams.cli as cli
    called = []
    monkeypatch.setattr(cli, "_worker", lambda args: called.append(("worker", args.role)) or 0)
    monkeypatch.setattr(cli, "_topics", lambda args: called.append(("topics",)) or 0)
    services = load_compose()["services"]
    for name, svc in services.items():
        if "build" in svc:
            assert main(svc["command"]) == 0, name
    assert ("worker", "resize") in called and ("topics",) in called
    assert "ENTRYPOINT [\"imagefork\"]" in (ROOT / "Dockerfile").read_text()


def test_kafka_is_4x_kraft():
    kafka = load_compose()["services"]["kafka"]
    assert kafka["image"].split(":")[1].startswith("4.")
    assert "controller" in kafka["environment"]["KAFKA_PROCESS_ROLES"]
