"""Who may do what on the API, without a broker: the token file (hashed, every problem named), the scopes
of each route (401 without a token, 403 without the scope, the handler's own answer with it), the rate
per token (429 with Retry-After), a rotation without a restart, the dashboard's session cookie, the audit
line per write, a foreign listen address without tokens refused, and `imagefork token`."""
import asyncio
import json
import logging
import os
import stat

import pytest
from aiohttp.test_utils import TestClient, TestServer

from streams.api.auth import Gate, check_exposure, is_loopback
from streams.cli import main
from streams.config import Config
from streams.core.access import (Bucket, Limiter, Token, TokensInvalid, bearer, digest, new_token, parse_tokens,
                                 token_line)
from streams.errors import StartError
from tests.unit.test_api_errors import Offline

READ, SUBMIT, OPERATE = new_token(), new_token(), new_token()
PUBLIC = {("GET", "/"), ("GET", "/v1/session"), ("POST", "/v1/session"), ("DELETE", "/v1/session"),
          ("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics")}


def tokens_file(tmp_path, *lines: str):
    path = tmp_path / "tokens"
    path.write_text("# the API's tokens\n" + "\n".join(lines) + "\n")
    return path


@pytest.fixture
def config(tmp_path):
    path = tokens_file(tmp_path, token_line("reader", frozenset({"read"}), READ),
                       token_line("ci", frozenset({"submit"}), SUBMIT),
                       token_line("ops", frozenset({"operate", "read"}), OPERATE, rate=1, burst=2))
    return Config.from_env({"IMAGEFORK_API_TOKENS_FILE": str(path)})


def calls(config: Config, *requests, api=None):
    """(status, headers, JSON body) of each request, in order, against one API."""
    api = api or Offline(config)

    async def go():
        answers = []
        async with TestClient(TestServer(api.app())) as client:
            for method, path, token, kw in requests:
                headers = {**kw.pop("headers", {}), **({"Authorization": f"Bearer {token}"} if token else {})}
                resp = await client.request(method, path, headers=headers, **kw)
                body = await resp.read()
                answers.append((resp.status, resp.headers, json.loads(body) if body[:1] == b"{" else body))
        return answers
    return asyncio.run(go())


def one(config, method, path, token=None, **kw):
    return calls(config, (method, path, token, kw))[0]


# --- the file ------------------------------------------------------------------------------------
def test_a_token_file_holds_digests_and_every_problem_is_named():
    line = token_line("ci-bot", frozenset({"read", "submit"}), READ, rate=5, burst=9)
    assert READ not in line and digest(READ) in line
    (token,) = parse_tokens(f"{line}  # a comment\n\n# another\n").values()
    assert token == Token("ci-bot", frozenset({"read", "submit"}), digest(READ), 5.0, 9)
    assert READ.startswith("ifk_") and len(READ) == 47 and READ != new_token()

    with pytest.raises(TokensInvalid) as caught:
        parse_tokens("\n".join([
            "ci read",                                            # 1: too few words
            f"bad/name read sha256:{'a' * 64}",                   # 2
            f"ci admin sha256:{'b' * 64}",                        # 3: unknown scope
            f"ops read {READ}",                                   # 4: a raw token, not a digest
            f"ci read sha256:{'c' * 64}",                         # 5: ci twice
            f"dup read sha256:{'c' * 64}",                        # 6: the same digest
            f"lim read sha256:{'d' * 64} rate=0 burst=1.5 x=1",   # 7
        ]))
    text = "; ".join(caught.value.problems)
    for expected in ("line 1: a token is NAME SCOPES", "line 2: the name 'bad/name'", "line 3: scopes are",
                     "line 4: the digest is sha256:", "line 5: the name 'ci' is given twice",
                     "line 6: the same token as 'ci'", "line 7: 'rate=0'", "line 7: 'burst=1.5'", "line 7: 'x=1'"):
        assert expected in text, (expected, text)


def test_bearer_headers():
    assert bearer(None) is None
    assert bearer(f"Bearer {READ}") == READ == bearer(f"bearer   {READ} ")
    for bad in ("Basic abc", "Bearer", "Bearer ", "Bearer a b", "Bearer " + "x" * 300, "Bearer caf\u00e9"):
        assert bearer(bad) == "", bad


def test_a_bucket_lets_a_burst_through_then_the_rate():
    bucket = Bucket(rate=2.0, burst=3, now=100.0)
    assert [bucket.take(100.0) for _ in range(3)] == [0, 0, 0]
    assert bucket.take(100.0) == pytest.approx(0.5)
    assert bucket.take(100.5) == 0 and bucket.take(100.5) > 0
    assert [bucket.take(200.0) for _ in range(4)][:3] == [0, 0, 0]  # refilled to the burst, not beyond

    limiter = Limiter(rate=1.0, burst=1)
    slow, own = Token("a", frozenset({"read"}), "1"), Token("b", frozenset({"read"}), "2", rate=10, burst=5)
    assert limiter.take(slow, 0.0) == 0 and limiter.take(slow, 0.0) == pytest.approx(1.0)
    assert [limiter.take(own, 0.0) for _ in range(5)] == [0] * 5  # each token its own bucket and limits


# --- the routes ----------------------------------------------------------------------------------
def test_every_route_has_a_scope_or_is_one_of_the_public_few(config):
    api = Offline(config)
    app = api.app()
    for route in app.router.routes():
        key = ("GET" if route.method == "HEAD" else route.method, route.resource.canonical)
        assert key in api.scopes or key in PUBLIC, f"{key} has no scope: add it to Api.app's table"
    assert set(api.scopes.values()) == {"read", "submit", "operate"}


def test_no_token_is_401_an_unknown_one_too_each_scope_opens_its_routes(config):
    # a handler's own 400 (a bad sha, an empty request, a bad id) shows the request got past the gate
    answers = calls(config,
                    ("GET", "/v1/workflows/abc", None, {}),
                    ("GET", "/v1/workflows/abc", "ifk_unknown", {}),
                    ("GET", "/v1/sources/xyz", READ, {}),
                    ("HEAD", "/v1/sources/xyz", READ, {}),
                    ("POST", "/v1/workflows/abc/cancel", READ, {}),
                    ("POST", "/v1/workflows", READ, {"json": {}}),
                    ("POST", "/v1/workflows", SUBMIT, {"json": {}}),
                    ("GET", "/v1/similar", SUBMIT, {}),
                    ("POST", "/v1/workflows/%E2%98%83/cancel", OPERATE, {}),
                    ("POST", "/v1/workflows/%E2%98%83/retry", OPERATE, {}),
                    ("GET", "/", None, {}), ("GET", "/healthz", None, {}),
                    ("GET", "/v1/workflows", "", {"headers": {"Authorization": "Basic dXNlcjpwYXNz"}}))
    status = [a[0] for a in answers]
    assert status == [401, 401, 400, 400, 403, 403, 400, 403, 400, 400, 200, 200, 401], status
    none, unknown = answers[0], answers[1]
    assert none[2]["error"] == "UNAUTHORIZED" and none[1]["WWW-Authenticate"] == 'Bearer realm="imagefork"'
    assert unknown[1]["WWW-Authenticate"].endswith('error="invalid_token"')
    assert answers[12][1]["WWW-Authenticate"].endswith('error="invalid_request"')
    cancel = answers[4]
    assert cancel[2]["error"] == "FORBIDDEN" and cancel[2]["scope"] == "operate"
    assert ("token 'reader' (scopes read) may not POST /v1/workflows/{id}/cancel: it needs operate"
            in cancel[2]["message"])
    assert 'error="insufficient_scope", scope="operate"' in cancel[1]["WWW-Authenticate"]
    assert answers[6][2]["error"] == "INVALID_REQUEST" and answers[8][2]["error"] == "INVALID_ID"


def test_a_token_over_its_rate_is_429_with_retry_after(config):
    answers = calls(config, *[("GET", "/v1/sources/xyz", OPERATE, {})] * 3, ("GET", "/v1/sources/xyz", READ, {}))
    assert [a[0] for a in answers] == [400, 400, 429, 400]  # ops: burst 2; reader has its own bucket
    assert answers[2][2]["error"] == "TOO_MANY_REQUESTS" and answers[2][1]["Retry-After"] == "1"


def test_tokens_rotate_without_a_restart_and_a_broken_file_keeps_the_last_good_one(config, tmp_path, caplog):
    api = Offline(config)
    path = tmp_path / "tokens"
    fresh = new_token()

    def status(token):
        api.gate.looked_at = float("-inf")  # as if a second had passed since the last look at the file
        return calls(config, ("GET", "/v1/sources/xyz", token, {}), api=api)[0][0]

    assert status(READ) == 400 and status(fresh) == 401
    path.write_text(token_line("reader-2", frozenset({"read"}), fresh) + "\n")  # READ rotated out
    assert status(fresh) == 400 and status(READ) == 401
    path.write_text("reader-3 read not-a-digest\n")
    assert status(fresh) == 400  # the last good tokens stay
    assert "cannot be used (line 1: the digest is sha256:" in caplog.text
    path.unlink()
    assert status(fresh) == 401  # no file: nobody
    assert "is gone: no token is accepted" in caplog.text


def test_the_dashboard_signs_in_with_a_session_cookie(config):
    answers = calls(config,
                    ("GET", "/v1/session", None, {}),
                    ("POST", "/v1/session", None, {"json": {"token": "ifk_nope"}}),
                    ("POST", "/v1/session", None, {"json": {"token": READ},
                                                   "headers": {"Origin": "https://evil.example"}}),
                    ("POST", "/v1/session", None, {"json": {"token": READ}}),
                    ("GET", "/v1/session", None, {}),
                    ("GET", "/v1/sources/xyz", None, {}),
                    ("POST", "/v1/workflows/abc/cancel", None, {}),
                    ("DELETE", "/v1/session", None, {}),
                    ("GET", "/v1/sources/xyz", None, {}))
    assert [a[0] for a in answers] == [401, 401, 403, 200, 200, 400, 403, 200, 401]
    cookie = answers[3][1]["Set-Cookie"]
    assert cookie.startswith(f"imagefork_token={READ};") and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert "expires" not in cookie.lower() and "max-age" not in cookie.lower()  # gone with the session
    assert answers[4][2] == {"name": "reader", "scopes": ["read"], "authentication": "token"}

    anonymous = one(Config(), "GET", "/v1/session")
    assert anonymous[0] == 200 and anonymous[2]["authentication"] == "none"


def test_each_write_leaves_an_audit_line(config, caplog):
    caplog.set_level(logging.INFO, logger="imagefork.audit")
    calls(config, ("POST", "/v1/workflows/wf-1/cancel", READ, {}),
          ("POST", "/v1/workflows/wf-2/retry", None, {}),
          ("POST", "/v1/workflows", SUBMIT, {"json": {"workflowId": "wf-3"}}),
          ("GET", "/v1/workflows/wf-4", READ, {}))
    lines = [r.getMessage() for r in caplog.records if r.name == "imagefork.audit"]
    assert len(lines) == 3, lines  # a read is not audited
    assert lines[0].startswith("audit: who=reader action=POST /v1/workflows/wf-1/cancel workflow=wf-1 status=403")
    assert lines[1].startswith("audit: who=- action=POST /v1/workflows/wf-2/retry workflow=wf-2 status=401")
    assert lines[2].startswith("audit: who=ci action=POST /v1/workflows workflow=- status=400")


# --- start-up ------------------------------------------------------------------------------------
def test_a_foreign_address_without_tokens_does_not_start(tmp_path):
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("127.3.4.5")
    assert not any(is_loopback(h) for h in ("0.0.0.0", "", "::", "198.18.0.1", "example.invalid"))
    with pytest.raises(StartError) as caught:
        check_exposure(Config.from_env({"IMAGEFORK_API_LISTEN": "0.0.0.0:8088"}), "0.0.0.0")
    assert "\n" not in str(caught.value) and "IMAGEFORK_API_TOKENS_FILE" in str(caught.value)
    check_exposure(Config.from_env({"IMAGEFORK_API_LISTEN": "127.0.0.1:8088"}), "127.0.0.1")
    check_exposure(Config.from_env({"IMAGEFORK_API_LISTEN": "0.0.0.0:8088", "IMAGEFORK_API_ALLOW_ANONYMOUS": "1"}),
                   "0.0.0.0")
    path = tokens_file(tmp_path, f"ci read sha256:{'a' * 64}")
    check_exposure(Config.from_env({"IMAGEFORK_API_LISTEN": "0.0.0.0:8088", "IMAGEFORK_API_TOKENS_FILE": str(path)}),
                   "0.0.0.0")


def test_a_token_file_that_cannot_be_read_stops_the_start(tmp_path):
    for text, why in ((f"ci read {READ}\n", "line 1: the digest is sha256:"), (None, "No such file")):
        path = tmp_path / "t"
        path.unlink(missing_ok=True)
        if text is not None:
            path.write_text(text)
        with pytest.raises(StartError, match=why):
            Gate(Config.from_env({"IMAGEFORK_API_TOKENS_FILE": str(path)}))


def test_imagefork_token_creates_lists_and_revokes(tmp_path, capsys):
    path = tmp_path / "conf" / "tokens"
    assert main(["token", "create", "ci", "--scopes", "submit,read", "--file", str(path)]) == 0
    token = capsys.readouterr().out.strip()
    assert token.startswith("ifk_") and token not in path.read_text()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert main(["token", "create", "ops", "--scopes", "operate", "--rate", "3", "--file", str(path)]) == 0
    assert main(["token", "create", "ci", "--scopes", "read", "--file", str(path)]) == 2
    assert "already has a token named 'ci'" in capsys.readouterr().err
    assert main(["token", "list", "--file", str(path)]) == 0
    assert capsys.readouterr().out == "ci\tread,submit\nops\toperate rate=3\n"
    assert main(["token", "revoke", "ci", "--file", str(path)]) == 0
    assert main(["token", "revoke", "ci", "--file", str(path)]) == 1
    tokens = parse_tokens(path.read_text())
    assert [t.name for t in tokens.values()] == ["ops"] and digest(token) not in tokens
    assert main(["token", "create", "x", "--scopes", "admin", "--file", str(path)]) == 2


def test_an_audit_line_is_one_line_whatever_the_path(config, caplog):
    caplog.set_level(logging.INFO, logger="imagefork.audit")
    calls(config, ("POST", "/nothing%0Afake%20who=admin", None, {}),
          ("POST", "/v1/workflows/a%0Ab/cancel", OPERATE, {}))
    lines = [r.getMessage() for r in caplog.records if r.name == "imagefork.audit"]
    assert len(lines) == 2 and all("\n" not in line and line.count("who=") == 1 for line in lines), lines
    assert "/nothing%0Afake%20who%3Dadmin" in lines[0]


def test_a_rewrite_of_the_same_size_and_time_is_seen(config, tmp_path):
    api = Offline(config)
    path = tmp_path / "tokens"
    before = os.stat(path)
    text = path.read_text()
    swapped = text.replace(digest(READ), "0" * 64)  # reader's token replaced: the file's size stays
    assert len(swapped) == len(text)
    path.write_text(swapped)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # the same size and mtime
    api.gate.looked_at = float("-inf")
    assert calls(config, ("GET", "/v1/sources/xyz", READ, {}), api=api)[0][0] == 401


def test_sign_in_refuses_a_hostile_body_with_json_errors(config):
    deep = b"[" * 100_000
    status = [a[0] for a in calls(config, ("POST", "/v1/session", None, {"data": deep}),
                                  ("POST", "/v1/session", None, {"data": b"\xff\xfe"}),
                                  ("POST", "/v1/session", None, {"json": ["x"]}))]
    assert status == [400, 400, 400]


def test_token_changes_at_once_keep_every_line_and_a_bad_one_is_never_written(tmp_path, capsys):
    from concurrent.futures import ThreadPoolExecutor
    path = tmp_path / "tokens"
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda i: main(["token", "create", f"c{i}", "--scopes", "read", "--file", str(path)]),
                              range(8)))
    assert codes == [0] * 8 and sorted(t.name for t in parse_tokens(path.read_text()).values()) == \
        [f"c{i}" for i in range(8)]
    os.chmod(path, 0o640)
    assert main(["token", "create", "z", "--scopes", "read", "--rate", "inf", "--file", str(path)]) == 2
    assert main(["token", "revoke", "c0", "--file", str(path)]) == 0
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640  # the file keeps its mode
    assert len(parse_tokens(path.read_text())) == 7
