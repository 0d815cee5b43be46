"""The HTTP API (``imagefork api``) against the real broker, the real S3 server and real workers:

- POST a request: 202 and a Location; the same id again is answered with what exists, nothing is sent
  twice; a bad request is 400 with the planner's field-level problems; every error is JSON;
- GET a workflow while it runs (answered by the join process that owns its partition, also across a
  rebalance: a second join starting) and after it ends; the list; an output's bytes through the API;
- the server-sent events: progress as tasks finish (read while the workflow still runs), then the final document;
- Kafka away from an API (its bootstrap address drops every connection): POST is 503 KAFKA_UNAVAILABLE with
  Retry-After; the same POST sent to an API that reaches Kafka runs once, even when the first is delivered later;
- retry of a FAILED workflow (its source answered 503 until a flag file existed), and of a workflow with
  one failed task (its output key blocked on the S3 server): only that task runs again; a new run of the same
  workflow that completes with every output; a COMPLETED one cannot be retried (409);
- /healthz and /readyz of the API and of the join.
"""
from __future__ import annotations

import http.server
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from confluent_kafka.admin import AdminClient
from PIL import Image

from streams.adapters.kafka import client_config, read_to_end
from streams.adapters.objectstore import ObjectStore
from streams.client import Client
from streams.core.planning import output_key
from streams.stack.processes import FileServer
from tests.integration.faults import TcpProxy
from tests.integration.pipeline import Pipeline, wait_until

pytestmark = pytest.mark.integration

SAMPLE = Path(__file__).resolve().parents[2] / "streams" / "assets" / "sample.png"
SEED_SIZES = [{"width": 300, "height": 300}, {"width": 200, "height": 200}, {"width": 1200, "height": 1200}]


def free_ports_in_a_row(count: int) -> int:
    """A port p with p .. p+count-1 all free, below the ephemeral range: a port there is not taken at any
    moment by an outgoing connection (CI: `worker all`'s resize could not listen on the metrics port + 1,
    a Kafka client's ephemeral port)."""
    import random
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for base in random.sample(range(20000, max(20001, low - count)), 200):
        probes = []
        try:
            for port in range(base, base + count):
                probe = socket.socket()
                probes.append(probe)
                probe.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for probe in probes:
                probe.close()
    raise RuntimeError(f"no {count} free ports in a row below {low}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(base: str, method: str, path: str, body: dict | bytes | None = None,
         headers: dict | None = None) -> tuple[int, dict | bytes, dict]:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(base + path, data=data, method=method,
                                 headers={**({"Content-Type": "application/json"} if data is not None else {}),
                                          **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            status, raw, headers = resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        status, raw, headers = exc.code, exc.read(), dict(exc.headers)
    if headers.get("Content-Type", "").startswith("application/json"):
        return status, json.loads(raw), headers
    return status, raw, headers


def sse(base: str, path: str, timeout: float = 90.0, opened: threading.Event | None = None,
        arrivals: list[float] | None = None) -> list[tuple[str, dict]]:
    """Every event of a server-sent event stream, until the server ends it; ``opened`` is set once the
    server has answered with the stream's headers (its handler is following the workflow); ``arrivals``
    gets the time (epoch seconds) each event was read."""
    events, name = [], None
    with urllib.request.urlopen(base + path, timeout=timeout) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        if opened is not None:
            opened.set()
        for raw in resp:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[len("data: "):])))
                if arrivals is not None:
                    arrivals.append(time.time())
    return events


@pytest.fixture
def api_pipeline(make_pipeline):
    p = make_pipeline()
    port = free_port()
    p.start_together("join", "planner", ("api", {"IMAGEFORK_API_LISTEN": f"127.0.0.1:{port}"}))
    base = f"http://127.0.0.1:{port}"
    assert wait_until(lambda: answers(base, "/readyz") == 200, 60), call(base, "GET", "/readyz")
    return p, base


@pytest.fixture(scope="module")
def full(stack_env, tmp_path_factory):
    """Every role and the API, shared by the tests below that leave it as they found it (the last one
    stops its join): (pipeline, the API's URL, the join's endpoint URL). One retry per task and source."""
    p = Pipeline(stack_env, f"a{uuid.uuid4().hex[:8]}.", tmp_path_factory.mktemp("logs-api"),
                 IMAGEFORK_MAX_RETRIES="1")
    port, join_port = free_port(), free_port()
    try:
        p.start_together(("join", {"IMAGEFORK_METRICS_LISTEN": f"127.0.0.1:{join_port}"}), "planner", "resize",
                         ("api", {"IMAGEFORK_API_LISTEN": f"127.0.0.1:{port}", "IMAGEFORK_API_BODY_TIMEOUT_S": "3"}))
        base = f"http://127.0.0.1:{port}"
        assert wait_until(lambda: answers(base, "/readyz") == 200, 60), call(base, "GET", "/readyz")
        yield p, base, f"http://127.0.0.1:{join_port}"
    finally:
        p.stop()


def seed(files, workflow_id: str, location: str | None = None) -> dict:
    return {"fileLocation": location or files.url("sample.png"), "outputFormats": ["png", "jpg", "webp"],
            "outputSizes": SEED_SIZES, "maintainAspectRatio": True, "workflowId": workflow_id}


def test_submit_follow_and_read_a_workflow_through_the_api(api_pipeline, files):
    p, base = api_pipeline
    wf = f"api-{uuid.uuid4().hex[:8]}"
    status, body, headers = call(base, "POST", "/v1/workflows", seed(files, wf))
    assert status == 202 and body["workflowId"] == wf and headers["Location"] == f"/v1/workflows/{wf}", body

    # no resize worker yet: the join's state says RUNNING, 0 of 9, every task PENDING
    assert wait_until(lambda: call(base, "GET", f"/v1/workflows/{wf}")[1].get("status") == "RUNNING", 60)
    doc = call(base, "GET", f"/v1/workflows/{wf}")[1]
    assert doc["progress"] == {"done": 0, "total": 9, "failed": 0}, doc["progress"]
    assert [t["status"] for t in doc["tasks"]] == ["PENDING"] * 9
    assert {(t["format"], t["width"], t["height"]) for t in doc["tasks"]} == {
        (f, s["width"], s["height"]) for f in ("png", "jpg", "webp") for s in SEED_SIZES}

    # the same id again: answered with what exists, not sent again
    status, again, _ = call(base, "POST", "/v1/workflows", seed(files, wf))
    assert status == 200 and again["existing"] is True and again["status"] == "RUNNING", again

    # a second join takes some partitions (a rebalance): the answer stays exact
    p.start("join", name="join-b")
    for _ in range(10):
        status, doc, _ = call(base, "GET", f"/v1/workflows/{wf}")
        assert status == 200 and doc["status"] == "RUNNING" and doc["progress"]["total"] == 9, doc
        time.sleep(0.3)
    listed = call(base, "GET", "/v1/workflows?status=RUNNING")[1]["workflows"]
    assert [w["workflowId"] for w in listed] == [wf], listed

    # the events stream, then the resize worker: progress as tasks finish, then the final document
    got: list = []
    arrivals: list[float] = []
    opened = threading.Event()
    reader = threading.Thread(target=lambda: got.extend(sse(base, f"/v1/workflows/{wf}/events", opened=opened,
                                                            arrivals=arrivals)))
    reader.start()
    assert opened.wait(30), "the event stream did not open"
    p.start("resize", IMAGEFORK_RESIZE_CONCURRENCY="1")  # one task at a time: the run spans several looks
    reader.join(120)
    assert not reader.is_alive(), "the event stream did not end"
    names = [name for name, _ in got]
    assert names[-1] == "final" and names.count("final") == 1, names
    progress = [data for name, data in got if name == "progress" and data.get("task")]
    assert len({d["task"]["taskRef"] for d in progress}) == 9, progress
    assert [d["done"] for d in progress] == sorted(d["done"] for d in progress)
    final = got[-1][1]
    assert final["status"] == "COMPLETED" and len(final["outputs"]) == 9, final
    # progress is live, not the finished workflow's tasks replayed: some progress event was read before the
    # join completed the workflow (its completedAt), while the stream said RUNNING and fewer than 9 were done
    early = [(at, data) for at, (name, data) in zip(arrivals, got) if name == "progress" and data.get("task")
             and at * 1000 < final["completedAt"]]
    assert early and all(d["status"] == "RUNNING" and d["done"] < 9 for _at, d in early), (
        final["completedAt"], [(at, d["done"], d["status"]) for at, (n, d) in zip(arrivals, got) if n == "progress"])

    doc = call(base, "GET", f"/v1/workflows/{wf}")[1]
    assert doc["status"] == "COMPLETED" and doc["progress"] == {"done": 9, "total": 9, "failed": 0}
    assert [t["status"] for t in doc["tasks"]] == ["SUCCEEDED"] * 9
    for out in doc["outputs"]:  # each output through the API (the bucket is private)
        status, data, headers = call(base, "GET", out["href"])
        assert status == 200 and headers["Content-Type"] == out["contentType"] and len(data) == out["bytes"]
        with Image.open(io.BytesIO(data)) as im:
            assert im.size == (out["width"], out["height"])
    # the list is newest first: a second workflow, submitted after the first, comes before it
    wf2 = f"api2-{uuid.uuid4().hex[:8]}"
    status, body, _ = call(base, "POST", "/v1/workflows", {**seed(files, wf2), "outputFormats": ["png"],
                                                           "outputSizes": [{"width": 16, "height": 16}]})
    assert status == 202, body
    assert wait_until(lambda: call(base, "GET", f"/v1/workflows/{wf2}")[1].get("status") == "COMPLETED", 60)
    listed = call(base, "GET", "/v1/workflows?limit=10")[1]["workflows"]
    assert [(w["workflowId"], w["status"]) for w in listed] == [(wf2, "COMPLETED"), (wf, "COMPLETED")], listed
    assert call(base, "GET", "/v1/workflows?status=RUNNING")[1]["workflows"] == []

    # a COMPLETED workflow has nothing to retry
    status, body, _ = call(base, "POST", f"/v1/workflows/{wf}/retry")
    assert status == 409 and body["error"] == "NOT_RETRYABLE", body


def test_bad_input_gets_json_errors(full):
    _p, base, _join = full
    status, body, _ = call(base, "POST", "/v1/workflows", {"fileLocation": "ftp://x/y", "outputFormats": ["bmp"],
                                                             "outputSizes": [{"width": 0, "height": 10}]})
    assert status == 400 and body["error"] == "INVALID_REQUEST"
    fields = {p["field"] for p in body["problems"]}
    assert {"fileLocation", "outputFormats[0]", "outputSizes[0].width"} <= fields, body
    status, body, _ = call(base, "POST", "/v1/workflows", b"{not json")
    assert status == 400 and body["error"] == "INVALID_JSON"
    status, body, _ = call(base, "POST", "/v1/workflows", {"fileLocation": "http://x/a.png", "outputFormats": ["png"],
                                                             "outputSizes": [{"width": 1, "height": 1}],
                                                             "retry": {"runId": "x"}})
    assert status == 400 and body["problems"][0]["field"] == "retry"
    # an output certain to be over IMAGEFORK_MAX_PIXELS whatever the source: refused before it is sent
    status, body, _ = call(base, "POST", "/v1/workflows", {"fileLocation": "http://x/a.png", "outputFormats": ["png"],
                                                             "outputSizes": [{"width": 9000, "height": 9000}],
                                                             "maintainAspectRatio": False})
    assert status == 400 and body["problems"][0]["field"] == "outputSizes[0]" and "7745x7745" in body["message"], body
    assert call(base, "GET", "/v1/workflows/never-seen")[:2] == (
        404, {"error": "NOT_FOUND", "message": "no workflow 'never-seen' is known here"})
    assert call(base, "GET", "/v1/workflows/bad%20id")[1]["error"] == "INVALID_ID"
    assert call(base, "GET", "/v1/workflows?limit=0")[0] == 400
    assert call(base, "GET", "/v1/workflows?status=DONE")[0] == 400
    assert call(base, "POST", "/v1/workflows/never-seen/retry")[0] == 404
    status, body, _ = call(base, "GET", "/nowhere")
    assert status == 404 and body["error"] == "NOT_FOUND", body
    status, body, _ = call(base, "GET", "/healthz")
    assert status == 200 and body["status"] == "alive"


def answers(base: str, path: str) -> int | None:
    try:
        return call(base, "GET", path)[0]
    except OSError:  # not listening (yet)
        return None


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


def raw(base: str, method: str, path: str, data: bytes | None, headers: dict) -> tuple[int, dict, dict]:
    req = urllib.request.Request(base + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read()), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), dict(exc.headers)


# `imagefork api` without the start-up checks of `imagefork worker api` (they wait for the broker): an API
# process whose Kafka does not answer from the start
AWAY_API = """
import sys
from streams import api
from streams.config import Config
from streams.logs import setup_logging
config = Config.from_env()
setup_logging("api", config.log_level, fmt=config.log_format, bootstrap=config.bootstrap_servers)
sys.exit(api.run(config))
"""


class AwayApi:
    """An API process whose bootstrap address is a loopback forwarder that drops every connection (Kafka
    away), and one POST sent to it as soon as it answers, in a thread: (status, body, headers, seconds)."""

    def __init__(self, pipeline: Pipeline, body: dict, log_dir: Path):
        self.proxy = TcpProxy(int(pipeline.config.bootstrap_servers.split(",")[0].rsplit(":", 1)[1]))
        self.proxy.cut()
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        self.log_path = log_dir / "away-api.log"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", AWAY_API], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, **pipeline.env, "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{self.proxy.port}",
                     "IMAGEFORK_API_LISTEN": f"127.0.0.1:{port}"}, start_new_session=True)
        self.answer: tuple | None = None
        self.thread = threading.Thread(target=self._post, args=(body,), daemon=True)
        self.thread.start()

    def _post(self, body: dict) -> None:
        if not wait_until(lambda: answers(self.base, "/healthz") == 200, 60):
            return
        started = time.monotonic()
        status, answer, headers = call(self.base, "POST", "/v1/workflows", body)
        self.answer = status, answer, headers, time.monotonic() - started

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.proxy.close()


def test_hostile_http_gets_clear_answers_and_nothing_runs_twice(full, files, tmp_path, request):
    """What a probe of the API found: each is a JSON 4xx now (a 500, an empty reply or a workflow stuck
    PENDING before), and one id POSTed 30 times at once runs once. Kafka away from an API: its POST is
    503 KAFKA_UNAVAILABLE with Retry-After; the same POST sent again to an API that reaches Kafka runs, and
    the first one, delivered once its Kafka answers, does not run it a second time."""
    p, base, _join = full
    good = {"fileLocation": files.url("sample.png"), "outputFormats": ["png"], "outputSizes": [{"width": 16, "height": 16}]}
    as_json = {"Content-Type": "application/json"}
    # Kafka away: the POST to an API whose broker does not answer runs beside the checks below
    wf_away = f"away-{uuid.uuid4().hex[:8]}"
    away = AwayApi(p, {**good, "workflowId": wf_away}, tmp_path)
    request.addfinalizer(away.close)
    # a trailing newline in the id (a regex's `$` let it through; aiohttp then failed on the Location header)
    status, body, _ = call(base, "POST", "/v1/workflows", {**good, "workflowId": "nl-1\n"})
    assert status == 400 and body["problems"][0]["field"] == "workflowId", body
    # a lone surrogate: valid JSON, unencodable text (the planner could not write its plan: stuck PENDING)
    status, body, _ = raw(base, "POST", "/v1/workflows", b'{"correlationId": "\\ud800", "fileLocation": "http://x.example/a.png",'
                          b' "outputFormats": ["png"], "outputSizes": [{"width": 16, "height": 16}]}', as_json)
    assert status == 400 and body["problems"][0]["field"] == "correlationId", body
    # "²" is a digit to str.isdigit() and not to int(); 5000 digits are over int()'s limit
    for width in ("²", "9" * 5000):
        status, body, _ = call(base, "POST", "/v1/workflows", {**good, "outputSizes": [{"width": width, "height": 16}]})
        assert status == 400 and body["problems"][0]["field"] == "outputSizes[0].width", body
    status, body, _ = raw(base, "POST", "/v1/workflows", b"[" * 100_000 + b"]" * 100_000, as_json)
    assert status == 400 and body["error"] == "INVALID_JSON", body
    status, body, _ = raw(base, "POST", "/v1/workflows", json.dumps(good).encode(),
                          {"Content-Type": "application/json; charset=bogus"})
    assert status == 400 and body["error"] == "INVALID_JSON", body
    status, body, _ = raw(base, "POST", "/v1/workflows", b"\x1f\x8b not gzip", {**as_json, "Content-Encoding": "gzip"})
    assert status == 400 and body["error"] == "INVALID_BODY", body
    # a browser's form or no-preflight fetch from another site (text/plain: no CORS preflight) is refused
    # by its Origin; a client that is not a browser (curl -d, say) sends none and may use any type
    for kind in ("text/plain", "application/json"):
        status, body, _ = raw(base, "POST", "/v1/workflows", json.dumps(good).encode(),
                              {"Content-Type": kind, "Origin": "http://evil.example"})
        assert status == 403 and body["error"] == "FOREIGN_ORIGIN", body
    status, body, _ = raw(base, "POST", "/v1/workflows", json.dumps(good).encode(),
                          {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 202, body
    status, body, _ = raw(base, "POST", "/v1/workflows/never-seen/retry", None, {"Origin": "http://evil.example"})
    assert status == 403, body
    # a body that never arrives in full (Content-Length 100, 5 bytes sent) is a 408, not a connection held
    with socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1])), timeout=30) as sock:  # 3 s here
        sock.sendall(b"POST /v1/workflows HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"a\":")
        assert sock.recv(4096).split(b"\r\n", 1)[0] == b"HTTP/1.1 408 Request Timeout"
    status, body, headers = raw(base, "PUT", "/v1/workflows", b"{}", as_json)
    assert status == 405 and "POST" in headers.get("Allow", ""), (body, headers)
    # the same new id 30 times at once: one 202, 29 "existing", one run, one final event
    wf = f"dup-{uuid.uuid4().hex[:8]}"
    origin = {**as_json, "Origin": base}  # the dashboard's own page may POST
    with ThreadPoolExecutor(30) as pool:
        answers = list(pool.map(lambda _: raw(base, "POST", "/v1/workflows", json.dumps({**good, "workflowId": wf}).encode(),
                                              origin), range(30)))
    assert sorted(a[0] for a in answers) == [200] * 29 + [202], [a[:2] for a in answers]
    assert all(a[1]["existing"] for a in answers if a[0] == 200)
    assert wait_until(lambda: call(base, "GET", f"/v1/workflows/{wf}")[1].get("status") == "COMPLETED", 90)
    sent = [m for m in read_to_end(p.config, p.config.topics.requests) if m.key() == wf.encode()]
    assert len(sent) == 1, f"{len(sent)} request messages for {wf}"

    # Kafka away: 503 KAFKA_UNAVAILABLE with Retry-After and the workflow id, within the lookup's 3 s and
    # the produce's 10 s; nothing reached the request topic, nobody knows the workflow
    away.thread.join(60)
    assert away.answer is not None, away.log_path.read_text()[-3000:]
    status, body, headers, seconds = away.answer
    assert status == 503 and body["error"] == "KAFKA_UNAVAILABLE" and headers.get("Retry-After") == "5", (body, headers)
    assert wf_away in body["message"] and "send it again with the same workflowId" in body["message"], body
    assert seconds < 18, f"the 503 took {seconds:.1f}s"
    assert not [m for m in read_to_end(p.config, p.config.topics.requests) if m.key() == wf_away.encode()]
    assert call(base, "GET", f"/v1/workflows/{wf_away}")[0] == 404
    # sent again, with the same workflowId, to an API that reaches Kafka: accepted and run
    status, body, _ = call(base, "POST", "/v1/workflows", {**good, "workflowId": wf_away})
    assert status == 202 and body["existing"] is False, body
    # then the first API's Kafka answers: its request, still queued, is delivered after all (a second
    # request message for the id), and does not run the workflow a second time
    away.proxy.restore()
    assert wait_until(lambda: len([m for m in read_to_end(p.config, p.config.topics.requests)
                                   if m.key() == wf_away.encode()]) == 2, 60, interval=1), \
        away.log_path.read_text()[-3000:]
    assert wait_until(lambda: call(base, "GET", f"/v1/workflows/{wf_away}")[1].get("status") == "COMPLETED", 90)
    finals = p.finals_for([wf, wf_away])
    assert sorted(f.workflowId for f in finals) == sorted([wf, wf_away]), finals
    # an output deleted from the bucket (a lifecycle rule) is gone: 410, not a 502 about a source
    out = call(base, "GET", f"/v1/workflows/{wf}")[1]["outputs"][0]
    assert call(base, "GET", out["href"])[0] == 200
    ObjectStore(p.config).delete(out["s3Uri"].split("/", 3)[3])
    status, body, _ = call(base, "GET", out["href"])
    assert status == 410 and body["error"] == "OUTPUT_GONE", body


class FlakySource(http.server.BaseHTTPRequestHandler):
    """503 until the flag file exists, then the sample."""
    flag: Path

    def do_GET(self):  # noqa: N802 (http.server's name)
        if not self.flag.exists():
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = SAMPLE.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_retry_runs_a_failed_workflow_again_as_a_new_run(full, tmp_path):
    p, base, _join = full
    flag = tmp_path / "source-is-back"
    handler = type("Flaky", (FlakySource,), {"flag": flag})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        wf = f"retry-{uuid.uuid4().hex[:8]}"
        request = {"fileLocation": f"http://127.0.0.1:{server.server_address[1]}/photo.png",
                   "outputFormats": ["png", "webp"], "outputSizes": [{"width": 120, "height": 90}], "workflowId": wf}
        assert call(base, "POST", "/v1/workflows", request)[0] == 202
        assert wait_until(lambda: call(base, "GET", f"/v1/workflows/{wf}")[1].get("status") == "FAILED", 90)
        failed = call(base, "GET", f"/v1/workflows/{wf}")[1]
        assert failed["errors"][0]["code"] == "SOURCE_UNAVAILABLE" and failed["retryable"] is True, failed

        flag.write_text("up")
        # five retries at once: one is sent, the others find it running (409), not five runs
        with ThreadPoolExecutor(5) as pool:
            answers = list(pool.map(lambda _: call(base, "POST", f"/v1/workflows/{wf}/retry"), range(5)))
        assert sorted(a[0] for a in answers) == [202, 409, 409, 409, 409], [a[:2] for a in answers]
        status, body, _ = next(a for a in answers if a[0] == 202)
        assert body["retryOf"] == failed["runId"] and body["tasks"] == "all", body
        assert call(base, "GET", f"/v1/workflows/{wf}")[1]["status"] in ("PENDING", "RUNNING", "COMPLETED")
        events = sse(base, f"/v1/workflows/{wf}/events")
        final = events[-1][1]
        assert events[-1][0] == "final" and final["status"] == "COMPLETED", events[-1]
        assert final["retryOf"] == failed["runId"] and final["runId"] != failed["runId"]
        assert sorted(o["format"] for o in final["outputs"]) == ["png", "webp"]
        for out in final["outputs"]:
            assert call(base, "GET", out["href"])[0] == 200
        # on the completed topic: the failed run's final event, then the retry's
        finals = p.finals_for([wf])
        assert [f.status for f in finals] == ["FAILED", "COMPLETED"], finals
        assert finals[1].retryOf == finals[0].runId and len(finals[1].fileLocations) == 2
        assert call(base, "POST", f"/v1/workflows/{wf}/retry")[0] == 409

    finally:
        server.shutdown()


def test_each_process_answers_health_and_readiness(full):
    p, api, base = full
    assert call(api, "GET", "/healthz")[1]["role"] == "api" and call(api, "GET", "/readyz")[0] == 200
    # the API reports every group's lag, per partition (a sample, not just the metric's HELP line)
    lag = f'imagefork_consumer_lag{{group="{p.config.group_id("join")}"'.encode()
    assert wait_until(lambda: any(line.startswith(lag) for line in call(api, "GET", "/metrics")[1].splitlines()), 30)
    join = next(w for w in p.workers if w.role == "join")
    assert call(base, "GET", "/healthz")[1]["role"] == "join"
    assert wait_until(lambda: answers(base, "/readyz") == 200, 30), call(base, "GET", "/readyz")
    ready = call(base, "GET", "/readyz")[1]
    assert ready["checks"]["broker"]["ok"] and ready["checks"]["s3"]["ok"] and ready["checks"]["role"]["ok"]
    # the join's gauge counts what it holds open (as its own listing does), after its last commit
    def gauge_matches() -> bool:
        lines = [line for line in call(base, "GET", "/metrics")[1].splitlines()
                 if line.startswith(b"imagefork_open_workflows ")]
        listed = call(base, "GET", "/internal/open?limit=1000")[1]["workflows"]
        return len(lines) == 1 and float(lines[0].split()[-1]) == len(listed)
    assert wait_until(gauge_matches, 30)
    assert join.alive()


def test_retry_redoes_only_the_failed_task_and_the_final_event_lists_every_output(full):
    """One output's key is blocked on the real S3 server (an object under ``<key>/``: S3Proxy's file
    system cannot write a file where a folder is), so that task fails and the others succeed; once the
    blocker is gone, a retry runs that one task only."""
    p, base, _join = full
    wf = f"part-{uuid.uuid4().hex[:8]}"
    blocked = "image_convert_resize_png_64x48_0"
    blocker = output_key(p.config.output_prefix, wf, blocked, "png") + "/blocker"
    p.store.client.put_object(Bucket=p.store.bucket, Key=blocker, Body=b"x")
    server = FileServer(SAMPLE.parent)
    request = {"fileLocation": server.url(SAMPLE.name), "outputFormats": ["png", "jpg", "webp"],
               "outputSizes": [{"width": 64, "height": 48}], "workflowId": wf}
    try:
        assert call(base, "POST", "/v1/workflows", request)[0] == 202
        final = sse(base, f"/v1/workflows/{wf}/events")[-1][1]
        assert final["status"] == "FAILED", final
        assert [e["taskRef"] for e in final["errors"]] == [blocked]
        assert sorted(o["format"] for o in final["outputs"]) == ["jpg", "webp"]
        kept = {o["taskRef"]: o for o in final["outputs"]}

        p.store.client.delete_object(Bucket=p.store.bucket, Key=blocker)
        status, body, _ = call(base, "POST", f"/v1/workflows/{wf}/retry")
        assert status == 202 and body["tasks"] == [blocked], body
        events = sse(base, f"/v1/workflows/{wf}/events")
        again = events[-1][1]
        assert again["status"] == "COMPLETED" and again["retryOf"] == final["runId"], again
        assert [t["status"] for t in again["tasks"]] == ["SUCCEEDED"] * 3
        for out in again["outputs"]:
            if out["taskRef"] in kept:  # kept as they were, not made again
                assert {k: v for k, v in out.items() if k != "href"} == {k: v for k, v in kept[out["taskRef"]].items()
                                                                         if k != "href"}
            assert call(base, "GET", out["href"])[0] == 200
        # the resize worker did the blocked task once more, and nothing else
        logs = "".join(w.log_path.read_text() for w in p.workers if w.role == "resize")
        done = [line for line in logs.splitlines() if f"task {wf}/" in line and "SUCCEEDED" in line]
        assert sorted(line.split(f"task {wf}/")[1].split()[0] for line in done) == sorted(
            ["image_convert_resize_jpg_64x48_1", "image_convert_resize_webp_64x48_2", blocked]), done
    finally:
        server.close()


def test_sources_and_similar_images_are_found_by_their_bytes(full, files):
    """Two workflows of one source: /v1/sources/{sha256} lists both with their outputs, /v1/similar finds the
    source by its pHash (issue 25, item 3), from the sources topic the join writes with each final event."""
    p, base, _join = full
    ids = [f"same-{uuid.uuid4().hex[:8]}" for _ in range(2)]
    for wf in ids:
        request = {**seed(files, wf), "outputFormats": ["png"], "outputSizes": [{"width": 24, "height": 24}]}
        assert call(base, "POST", "/v1/workflows", request)[0] == 202
    finals = [sse(base, f"/v1/workflows/{wf}/events")[-1][1] for wf in ids]
    assert [f["status"] for f in finals] == ["COMPLETED"] * 2, finals
    facts = finals[0]["facts"]
    assert facts["sha256"] == finals[1]["facts"]["sha256"] and facts["placeholder"].startswith("data:image/png")

    def listed():
        return {w["workflowId"] for w in call(base, "GET", f"/v1/sources/{facts['sha256']}")[1].get("workflows", [])}
    assert wait_until(lambda: set(ids) <= listed(), 30), listed()
    status, doc, _ = call(base, "GET", f"/v1/sources/{facts['sha256']}")
    mine = [w for w in doc["workflows"] if w["workflowId"] in ids]
    assert status == 200 and all(len(w["outputs"]) == 1 and w["status"] == "COMPLETED" for w in mine), doc
    assert call(base, "GET", mine[0]["outputs"][0]["href"])[0] == 200
    status, doc, _ = call(base, "GET", f"/v1/similar?phash={facts['phash']}&distance=0")
    assert status == 200 and facts["sha256"] in [s["sha256"] for s in doc["sources"]], doc
    assert call(base, "GET", "/v1/sources/" + "0" * 64)[0] == 404
    assert call(base, "GET", "/v1/similar?phash=zz")[0] == 400


def test_with_no_join_the_api_still_answers_what_it_can(full, files):
    """Last user of ``full``: it stops the join. A finished workflow is answered from its final event, a
    new request is accepted (it waits in Kafka) and PENDING, an unknown one is 503 with Retry-After."""
    p, base, _join = full
    wf = f"before-{uuid.uuid4().hex[:8]}"
    request = {**seed(files, wf), "outputFormats": ["png"], "outputSizes": [{"width": 16, "height": 16}]}
    assert call(base, "POST", "/v1/workflows", request)[0] == 202
    assert sse(base, f"/v1/workflows/{wf}/events")[-1][1]["status"] == "COMPLETED"
    # a workflow left open (no resize worker), sent by another client, followed by a stream: when its join
    # goes away the stream ends with an error event (it carried a raw 503 mid-stream before)
    for w in p.workers:
        if w.role == "resize":
            w.stop()
    still_open = f"open-{uuid.uuid4().hex[:8]}"
    client = Client(p.config)
    try:
        client.submit({**request, "workflowId": still_open}, still_open)
    finally:
        client.close()
    assert wait_until(lambda: call(base, "GET", f"/v1/workflows/{still_open}")[1].get("status") == "RUNNING", 60)
    with ThreadPoolExecutor(1) as pool:
        opened = threading.Event()
        stream = pool.submit(sse, base, f"/v1/workflows/{still_open}/events", opened=opened)
        assert opened.wait(30), "the event stream did not open"
        for w in p.workers:
            if w.role == "join":
                w.stop()
        events = stream.result(timeout=120)
    assert events[-1][0] == "error" and events[-1][1]["error"] == "JOIN_UNAVAILABLE", events[-3:]
    status, doc, _ = call(base, "GET", f"/v1/workflows/{wf}")
    assert status == 200 and doc["status"] == "COMPLETED", doc
    later = f"later-{uuid.uuid4().hex[:8]}"
    assert call(base, "POST", "/v1/workflows", {**request, "workflowId": later})[0] == 202
    assert call(base, "GET", f"/v1/workflows/{later}")[1]["status"] == "PENDING"
    status, body, headers = call(base, "GET", "/v1/workflows/nobody-knows")
    assert status == 503 and body["error"] == "JOIN_UNAVAILABLE" and headers["Retry-After"] == "5", body


def test_worker_all_runs_the_pipeline_and_the_api_and_a_taken_api_port_costs_only_the_api(make_pipeline, files):
    p = make_pipeline()
    port, metrics = free_port(), free_ports_in_a_row(3)  # `worker all` serves its roles on metrics .. metrics+2
    base = f"http://127.0.0.1:{port}"
    first = p.start("all", name="all-1", IMAGEFORK_API_LISTEN=f"127.0.0.1:{port}",
                    IMAGEFORK_METRICS_LISTEN=f"127.0.0.1:{metrics}", IMAGEFORK_API_RESTART_AFTER_S="5")
    assert wait_until(lambda: answers(base, "/readyz") == 200, 90), first.log_tail(40)
    # a second `worker all` on this host: its API finds the port taken and says so in one line; its
    # pipeline roles run (they join the groups) and it stays up
    second = p.start("all", name="all-2", wait=False, IMAGEFORK_API_LISTEN=f"127.0.0.1:{port}")
    assert wait_until(lambda: "the pipeline goes on without it" in second.log_path.read_text(), 90), second.log_tail(40)
    log = second.log_path.read_text()
    assert f"imagefork: the API cannot listen on 127.0.0.1:{port} (IMAGEFORK_API_LISTEN)" in log
    assert "Traceback" not in log
    wf = f"all-{uuid.uuid4().hex[:8]}"
    request = {**seed(files, wf), "outputFormats": ["png"], "outputSizes": [{"width": 32, "height": 32}]}
    assert call(base, "POST", "/v1/workflows", request)[0] == 202
    final = sse(base, f"/v1/workflows/{wf}/events")[-1][1]
    assert final["status"] == "COMPLETED" and len(final["outputs"]) == 1, final
    assert second.alive() and first.alive()
    # one address has every role's metrics (issue 26 item 5): the API's /metrics, each sample with its role.
    # Both `worker all`s share the groups, so the work may have gone to the second's roles: they serve their
    # own metrics on the ports it printed (no IMAGEFORK_METRICS_LISTEN given), and the counts add up.
    assert f"every role's metrics at http://127.0.0.1:{port}/metrics" in first.log_path.read_text()
    own = re.search(r"each role's own: join (\S+), resize (\S+), planner (\S+)", second.log_path.read_text())
    assert own, second.log_tail(20)

    def scraped(url: str) -> dict:
        try:
            text = urllib.request.urlopen(url, timeout=10).read().decode()
        except OSError:  # the second's roles may still be starting: nothing counted there yet
            return {}
        return {(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "role"))): s.value
                for f in text_string_to_metric_families(text) for s in f.samples
                if s.labels.get("role", "") in ("", "join", "resize", "planner")}

    def total(name: str, labels: tuple) -> float:
        everywhere = [scraped(f"{base}/metrics"), *(scraped(f"http://{addr}/metrics") for addr in own.groups())]
        return sum(got.get((name, labels), 0) for got in everywhere)

    assert wait_until(lambda: total("imagefork_workflows_total", (("status", "COMPLETED"),)) >= 1 and
                      total("imagefork_tasks_total", (("code", ""), ("status", "SUCCEEDED"))) >= 1, 30)
    text = urllib.request.urlopen(f"{base}/metrics", timeout=10).read().decode()
    up = {s.labels["role"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
          if s.name == "imagefork_metrics_peer_up"}
    assert up == {"join": 1, "resize": 1, "planner": 1}, up
    assert all(f'imagefork_stage_seconds_count{{role="{r}"' in text or f'role="{r}"' in text
               for r in ("join", "resize", "planner")), text[:2000]
    # the first's API dies (librdkafka has aborted a process after a broker restart): it is started again
    api = next(pid for pid in children(first.proc.pid) if b"worker\0api" in Path(f"/proc/{pid}/cmdline").read_bytes())
    time.sleep(max(0.0, 6 - (time.time() - os.stat(f"/proc/{api}").st_ctime)))  # past its 5 s: a good run
    os.kill(api, signal.SIGKILL)
    assert wait_until(lambda: "starting it again" in first.log_path.read_text(), 30), first.log_tail(40)
    assert wait_until(lambda: answers(base, "/readyz") == 200, 90), first.log_tail(40)
    assert call(base, "GET", f"/v1/workflows/{wf}")[1]["status"] == "COMPLETED"
    # the second's roles are up (each says it is ready), then both stop cleanly
    assert wait_until(lambda: second.log_path.read_text().count("imagefork ready: ") >= 3, 90), second.log_tail(40)
    for w in (second, first):
        w.stop()
        assert w.proc.returncode == 0, w.log_tail(40)


def test_the_api_reaches_a_join_at_its_advertised_url(make_pipeline, files):
    """A join listening on all addresses advertises IMAGEFORK_ADVERTISED_URL (not its listen address) in its
    group membership, and the API asks it there: a workflow's state comes back through that URL."""
    p = make_pipeline()
    join_port, api_port = free_port(), free_port()
    advertised = f"http://localhost:{join_port}"
    p.start_together(("join", {"IMAGEFORK_METRICS_LISTEN": f"0.0.0.0:{join_port}", "IMAGEFORK_ADVERTISED_URL": advertised}),
                     ("api", {"IMAGEFORK_API_LISTEN": f"127.0.0.1:{api_port}"}))
    admin = AdminClient(client_config(p.config))
    group = p.config.group_id("join")
    members = admin.describe_consumer_groups([group])[group].result(30).members
    assert [m.client_id for m in members] == [f"imagefork-join {advertised}"], members
    base = f"http://127.0.0.1:{api_port}"
    assert wait_until(lambda: answers(base, "/readyz") == 200, 60)
    wf = f"adv-{uuid.uuid4().hex[:8]}"
    assert call(base, "POST", "/v1/workflows", seed(files, wf))[0] == 202
    # no planner runs: the plan never comes, and the join's answer (unknown) is what the API reports
    status, doc, _ = call(base, "GET", f"/v1/workflows/{wf}")
    assert status == 200 and doc["status"] == "PENDING", doc
    assert call(base, "GET", "/v1/workflows/nobody-knows")[0] == 404
