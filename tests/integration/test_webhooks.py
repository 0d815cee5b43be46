"""Webhooks on the real broker and S3 server: a request's callbackUrl gets its final event from the webhook
role, signed, at least once, with retries, and a dead letter when it cannot be delivered:

- a receiver that answers 500 twice, then does not answer in time, then 200, gets exactly one accepted
  delivery (four tries, one idempotency key, each signature valid), and the API says DELIVERED;
- one that never answers gets the tries allowed, then the final event is dead-lettered
  (WEBHOOK_UNDELIVERED); replayed (`imagefork dlq replay --to origin`) once the receiver answers, it is
  delivered, and the completed topic still has one final event;
- one that answers 404 is tried once and dead-lettered (WEBHOOK_REFUSED);
- a request without a callbackUrl is not called at all.
"""
from __future__ import annotations

import http.server
import json
import threading
import time
import uuid

import pytest

from streams import serde
from streams.adapters.kafka import read_to_end
from streams.core.webhooks import verify
from tests.integration.pipeline import run_cli, wait_until
from tests.integration.test_api import answers, call, free_port

pytestmark = pytest.mark.integration
SECRET = "a-test-secret"


class Receivers(http.server.BaseHTTPRequestHandler):
    """Each path answers from its script (then 200): a status, or "hang" (no answer for 2.5 s)."""
    scripts: dict[str, list] = {}
    seen: dict[str, list] = {}
    lock = threading.Lock()

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        path = self.path.split("?")[0]
        with self.lock:
            script = self.scripts.setdefault(path, [])
            answer = script.pop(0) if script and script[0] != "forever" else (script[0] if script else 200)
            self.seen.setdefault(path, []).append((dict(self.headers), body, answer, time.time()))
        if answer in ("hang", "forever"):
            time.sleep(2.5)
            return
        self.send_response(answer)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def receivers():
    Receivers.scripts, Receivers.seen = {}, {}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receivers)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", Receivers
    server.shutdown()


def small(files, wf: str, callback: str | None) -> dict:
    doc = {"workflowId": wf, "fileLocation": files.url("sample.png"), "outputFormats": ["png"],
           "outputSizes": [{"width": 64, "height": 64}]}
    return {**doc, "callbackUrl": callback} if callback else doc


def test_a_callback_url_gets_its_final_event_signed_with_retries_and_dead_letters(make_pipeline, files, receivers):
    base, r = receivers
    p = make_pipeline(IMAGEFORK_WEBHOOK_SECRET=SECRET, IMAGEFORK_WEBHOOK_TIMEOUT_S="1", IMAGEFORK_WEBHOOK_MAX_TRIES="4",
                      IMAGEFORK_WEBHOOK_DELAY_S="0.2")
    port = free_port()
    p.start_together("join", "planner", "resize", "webhook", ("api", {"IMAGEFORK_API_LISTEN": f"127.0.0.1:{port}"}))
    api = f"http://127.0.0.1:{port}"
    assert wait_until(lambda: answers(api, "/readyz") == 200, 60)
    r.scripts = {"/flaky": [500, 500, "hang", 200], "/silent": ["forever"], "/gone": [404]}
    ids = {name: f"hook-{name}-{uuid.uuid4().hex[:6]}" for name in ("flaky", "silent", "gone", "none")}
    for name, wf in ids.items():
        p.submit(small(files, wf, None if name == "none" else f"{base}/{name}?team=a"), wf)
    finals = {f.workflowId: f for f in p.finals_for(list(ids.values()))}
    assert {f.status for f in finals.values()} == {"COMPLETED"}

    def tries(path):
        with r.lock:
            return list(r.seen.get(path, []))
    assert wait_until(lambda: len(tries("/flaky")) == 4 and len(tries("/silent")) == 4 and tries("/gone"), 60), \
        {k: [a for *_x, a, _t in v] for k, v in r.seen.items()}
    time.sleep(1.0)  # nothing more comes
    flaky = tries("/flaky")
    assert [answer for _h, _b, answer, _t in flaky] == [500, 500, "hang", 200]
    final = finals[ids["flaky"]]
    keys = {h["Imagefork-Idempotency-Key"] for h, _b, _a, _t in flaky}
    assert keys == {f"{final.workflowId}:{final.runId}"}
    assert [h["Imagefork-Attempt"] for h, _b, _a, _t in flaky] == ["1", "2", "3", "4"]
    for headers, body, _answer, at in flaky:
        assert verify(SECRET.encode(), body, headers["Imagefork-Signature"], now=at)
        assert headers["Content-Type"] == "application/json"
    doc = json.loads(flaky[-1][1])
    assert doc["event"] == "workflow.completed" and doc["workflowId"] == final.workflowId
    assert doc["status"] == "COMPLETED" and doc["fileLocations"] == list(final.fileLocations)
    assert doc["request"]["callbackUrl"].endswith("/flaky?team=a")
    assert len(tries("/gone")) == 1 and "/none" not in r.seen

    # the delivery states, on the webhooks topic and in the API
    def states():
        out = {}
        for m in read_to_end(p.config, p.config.topics.webhooks):
            d = serde.decode("WebhookDelivery", m.value())
            out[d["workflowId"]] = d
        return out
    assert wait_until(lambda: {states().get(ids[n], {}).get("state") for n in ("flaky", "silent", "gone")}
                      == {"DELIVERED", "FAILED"}, 30), states()
    s = states()
    assert (s[ids["flaky"]]["state"], s[ids["flaky"]]["attempts"]) == ("DELIVERED", 4)
    assert (s[ids["silent"]]["state"], s[ids["silent"]]["attempts"]) == ("FAILED", 4)
    assert (s[ids["gone"]]["state"], s[ids["gone"]]["lastStatus"]) == ("FAILED", 404)
    assert ids["none"] not in s
    assert wait_until(lambda: call(api, "GET", f"/v1/workflows/{ids['flaky']}")[1].get("webhook", {})
                      .get("state") == "DELIVERED", 30)

    # the dead letters: the final events themselves, with the reason
    def letters():
        return {m.key().decode(): m for m in read_to_end(p.config, p.config.topics.dead_letter)
                if dict(m.headers() or []).get("imagefork.agent") == b"webhook"}
    dead = letters()
    assert set(dead) == {ids["silent"], ids["gone"]}
    codes = {wf: dict(m.headers())["imagefork.error.code"] for wf, m in dead.items()}
    assert codes == {ids["silent"]: b"WEBHOOK_UNDELIVERED", ids["gone"]: b"WEBHOOK_REFUSED"}
    assert serde.decode("WorkflowCompleted", dead[ids["silent"]].value())["workflowId"] == ids["silent"]

    # the receiver is back: the dead letter replayed goes to the webhook role again, not to the completed topic
    with r.lock:
        r.scripts["/silent"] = [200]
    m = dead[ids["silent"]]
    code, out, err = run_cli(p.env, "dlq", "replay", "--to", "origin", "--id",
                             f"{m.topic()}/{m.partition()}/{m.offset()}")
    assert code == 0, err
    assert wait_until(lambda: any(a == 200 for _h, _b, a, _t in tries("/silent")), 30), tries("/silent")
    assert wait_until(lambda: states()[ids["silent"]]["state"] == "DELIVERED", 30), states()[ids["silent"]]
    assert len(p.finals_for([ids["silent"]], drain=False)) == 1
