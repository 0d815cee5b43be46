"""Who may do what, on the real stack: `imagefork api` with a token file, listening on every address,
beside a real join, planner and resize worker.

- no token is 401; a `read` token reads but cannot cancel (403, and the workflow runs on); a `submit` token
  submits but cannot read; an `operate` token cancels (the workflow ends CANCELLED);
- a token over its rate is 429 with Retry-After;
- a token added to the file works, and one removed is refused, within seconds and without a restart;
- each write is one audit line in the API's log (who, what, which workflow, the answer);
- without tokens, an API asked to listen on a foreign address refuses to start, in one line.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import pytest

from streams.core.access import new_token, token_line
from tests.integration.pipeline import Pipeline, wait_until
from tests.integration.test_api import call, free_port

pytestmark = pytest.mark.integration


def ask(base: str, method: str, path: str, token: str | None = None, body: dict | None = None):
    return call(base, method, path, body, headers={"Authorization": f"Bearer {token}"} if token else None)


def test_each_scope_is_allowed_and_refused_as_documented(stack_env, files, tmp_path):
    reader, submitter, operator, later = new_token(), new_token(), new_token(), new_token()
    tokens = tmp_path / "tokens"

    def write(*lines):
        tokens.write_text("\n".join(lines) + "\n")

    write(token_line("reader", frozenset({"read"}), reader),
          token_line("ci", frozenset({"submit"}), submitter, rate=2, burst=3),
          token_line("ops", frozenset({"read", "operate"}), operator))
    p = Pipeline(stack_env, f"t{uuid.uuid4().hex[:8]}.", tmp_path / "logs")
    port = free_port()
    try:
        (_join, _planner, _resize, api) = p.start_together(
            "join", "planner", "resize",
            ("api", {"IMAGEFORK_API_LISTEN": f"0.0.0.0:{port}", "IMAGEFORK_API_TOKENS_FILE": str(tokens)}))
        base = f"http://127.0.0.1:{port}"
        assert wait_until(lambda: call(base, "GET", "/readyz")[0] == 200, 60), api.log_tail(30)

        status, body, headers = ask(base, "GET", "/v1/workflows")
        assert status == 401 and body["error"] == "UNAUTHORIZED" and headers["WWW-Authenticate"].startswith("Bearer")

        wide = {"fileLocation": files.url("sample.png"), "outputFormats": ["jpg"], "maintainAspectRatio": True,
                "outputSizes": [{"width": 16 + i, "height": 16 + i} for i in range(300)]}
        status, body, _ = ask(base, "POST", "/v1/workflows", submitter, wide)
        assert status == 202, body
        workflow_id = body["workflowId"]
        assert ask(base, "GET", f"/v1/workflows/{workflow_id}", submitter)[0] == 403  # submit only
        assert ask(base, "POST", "/v1/workflows", reader, wide)[0] == 403
        assert wait_until(lambda: ask(base, "GET", f"/v1/workflows/{workflow_id}", reader)[1].get("status")
                          == "RUNNING", 30)
        status, body, headers = ask(base, "POST", f"/v1/workflows/{workflow_id}/cancel", reader, {})
        assert status == 403 and body["scope"] == "operate" and "insufficient_scope" in headers["WWW-Authenticate"]
        assert ask(base, "GET", f"/v1/workflows/{workflow_id}", reader)[1]["status"] == "RUNNING"
        status, body, _ = ask(base, "POST", f"/v1/workflows/{workflow_id}/cancel", operator, {"reason": "test"})
        assert status == 202, body
        assert wait_until(lambda: ask(base, "GET", f"/v1/workflows/{workflow_id}", reader)[1].get("status")
                          == "CANCELLED", 60)

        # ci's rate: 2/s, 3 at once (a request that breaks the contract is still a request)
        answers = [ask(base, "POST", "/v1/workflows", submitter, {"fileLocation": ""}) for _ in range(5)]
        limited = [a for a in answers if a[0] == 429]
        assert limited and all(a[0] == 400 for a in answers[:3]), [a[0] for a in answers]
        assert int(limited[0][2]["Retry-After"]) >= 1 and limited[0][1]["error"] == "TOO_MANY_REQUESTS"

        # a rotation: `later` replaces `reader`, without a restart
        write(token_line("reader-2", frozenset({"read"}), later),
              token_line("ops", frozenset({"read", "operate"}), operator))
        assert wait_until(lambda: ask(base, "GET", "/v1/workflows", later)[0] == 200, 10)
        assert ask(base, "GET", "/v1/workflows", reader)[0] == 401
        assert api.alive

        log = api.log_tail(500)
        for line in (f"audit: who=ci action=POST /v1/workflows workflow={workflow_id} status=202",
                     f"audit: who=reader action=POST /v1/workflows/{workflow_id}/cancel workflow={workflow_id} "
                     f"status=403",
                     f"audit: who=ops action=POST /v1/workflows/{workflow_id}/cancel workflow={workflow_id} "
                     f"status=202",
                     "audit: who=ci action=POST /v1/workflows workflow=- status=429"):
            assert line in log, (line, log)
    finally:
        p.stop()


def test_a_foreign_address_without_tokens_refuses_to_start_in_one_line(stack_env, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEFORK_API_")}
    env.update(stack_env, IMAGEFORK_API_LISTEN=f"0.0.0.0:{free_port()}",
               IMAGEFORK_NAMESPACE=f"x{uuid.uuid4().hex[:8]}.")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "streams", "api"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1 and time.monotonic() - started < 30, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("imagefork: the API would listen on 0.0.0.0:")
    assert "IMAGEFORK_API_TOKENS_FILE" in lines[0]
    assert not done.stdout

    # a token file it cannot use: one line too, naming the file and the line
    bad = tmp_path / "tokens"
    bad.write_text(f"ci read {new_token()}\n")
    done = subprocess.run([sys.executable, "-m", "streams", "api"], env={**env, "IMAGEFORK_API_TOKENS_FILE": str(bad)},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stderr.strip() == (
        f"imagefork: IMAGEFORK_API_TOKENS_FILE {bad}: line 1: the digest is sha256: and 64 lower-case hex digits "
        f"(the file never holds a token itself: `imagefork token create` writes the line)"), done.stderr
