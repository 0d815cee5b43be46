"""The API's answers that need no broker: every error is JSON with a code and a message (a body too
large, a method not allowed, a path nobody serves, bad JSON, a bad workflow id), and the dashboard page."""
import asyncio
import json

import pytest
from aiohttp.test_utils import TestClient, TestServer

from streams.api.routes import MAX_BODY, Api
from streams.config import Config, ConfigError


class Offline(Api):
    async def _start(self, _app):  # no Kafka, no S3: only what answers before them
        pass

    async def _stop(self, _app):
        pass


def ask(method: str, path: str, config: Config | None = None, **kw):
    async def go():
        async with TestClient(TestServer(Offline(config or Config()).app())) as client:
            resp = await client.request(method, path, **kw)
            return resp.status, resp.headers.get("Content-Type", ""), await resp.read()
    return asyncio.run(go())


def test_a_body_over_the_limit_is_413_in_json():
    status, ctype, body = ask("POST", "/v1/workflows", data=b"{" + b" " * (MAX_BODY + 10) + b"}",
                              headers={"Content-Type": "application/json"})
    assert status == 413 and ctype.startswith("application/json")
    assert json.loads(body)["error"] == "REQUEST_ENTITY_TOO_LARGE"


def test_unknown_paths_methods_and_bad_input_are_json():
    for method, path, kw, want, code in [
        ("GET", "/nowhere", {}, 404, "NOT_FOUND"),
        ("DELETE", "/v1/workflows", {}, 405, "METHOD_NOT_ALLOWED"),
        ("POST", "/v1/workflows", {"data": b"\xff\xfe"}, 400, "INVALID_JSON"),
        ("POST", "/v1/workflows", {"data": b"[1, 2]"}, 400, "INVALID_REQUEST"),
        ("GET", "/v1/workflows/%E2%98%83", {}, 400, "INVALID_ID"),
        ("GET", "/v1/workflows?limit=abc", {}, 400, "INVALID_REQUEST"),
    ]:
        status, ctype, body = ask(method, path, **kw)
        assert (status, ctype.split(";")[0]) == (want, "application/json"), (method, path, status, body)
        doc = json.loads(body)
        assert doc["error"] == code and doc["message"], (path, doc)


def test_the_dashboard_is_served_at_the_root():
    status, ctype, body = ask("GET", "/")
    assert status == 200 and ctype.startswith("text/html") and b"<html" in body.lower()


def test_a_body_that_trickles_is_408_after_the_configured_time():
    assert Config.from_env({}).api_body_timeout_s == 30
    assert Config.from_env({"IMAGEFORK_API_BODY_TIMEOUT_S": "2.5"}).api_body_timeout_s == 2.5
    with pytest.raises(ConfigError, match="IMAGEFORK_API_BODY_TIMEOUT_S"):
        Config.from_env({"IMAGEFORK_API_BODY_TIMEOUT_S": "0"})

    async def trickle():
        yield b'{"fileLocation": '
        await asyncio.sleep(5)
        yield b'"http://img.test/a.png"}'

    status, ctype, body = ask("POST", "/v1/workflows", Config(api_body_timeout_s=0.3), data=trickle(),
                              headers={"Content-Type": "application/json"})
    assert (status, json.loads(body)["error"]) == (408, "REQUEST_TIMEOUT") and ctype.startswith("application/json")
