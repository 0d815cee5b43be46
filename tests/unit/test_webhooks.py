"""Webhooks without Kafka: the signature a receiver checks, what each answer means, the callbackUrl a
request may carry, the one call (SSRF guard, no redirect, timeouts) against local servers, and the
offsets the role may commit."""
import http.server
import ipaddress
import threading
import time

import pytest

from streams.adapters.webhook import Undelivered, post
from streams.agents.webhooks import Offsets, callback_of
from streams.core.errors import RequestInvalid
from streams.core.models import WorkflowCompleted
from streams.core.planning import parse_request
from streams.core.webhooks import DELIVERED, REFUSED, RETRY, backoff_s, callback_problem, outcome, sign, verify

SECRET = b"s3cret"
LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)


def test_a_signature_verifies_once_and_only_within_its_tolerance():
    body = b'{"workflowId":"w"}'
    header = sign(SECRET, body, 1_000_000)
    assert header.startswith("t=1000000,v1=") and len(header.split("v1=")[1]) == 64
    assert verify(SECRET, body, header, now=1_000_100)
    assert not verify(SECRET, body + b" ", header, now=1_000_100)  # another body
    assert not verify(b"other", body, header, now=1_000_100)  # another secret
    assert not verify(SECRET, body, header, now=1_000_000 + 301)  # too old: a replay
    assert not verify(SECRET, body, "v1=" + header.split("v1=")[1], now=1_000_000)  # no timestamp
    rotated = header + ",v1=" + "0" * 64  # two signatures while a secret is rotated: one must match
    assert verify(SECRET, body, rotated, now=1_000_000)


@pytest.mark.parametrize("status, expected", [
    (200, DELIVERED), (204, DELIVERED), (500, RETRY), (503, RETRY), (408, RETRY), (429, RETRY),
    (400, REFUSED), (401, REFUSED), (404, REFUSED), (410, REFUSED), (301, REFUSED), (302, REFUSED), (100, REFUSED),
])
def test_what_an_answer_means(status, expected):
    assert outcome(status) == expected


def test_the_pauses_double_up_to_the_cap():
    assert [backoff_s(a, 1.0, 10.0) for a in range(1, 7)] == [1, 2, 4, 8, 10, 10]


@pytest.mark.parametrize("url", [
    "ftp://x/y", "javascript:alert(1)", "https://", "https://user:pw@host/x", "https://h/x#frag", "https://h:99999/",
    "https://h/a b", "https://h/\n", "", 5, "https://h/" + "a" * 2100,
])
def test_a_callback_url_that_is_not_one_is_refused_with_the_request(url):
    assert callback_problem(url) is not None
    doc = {"fileLocation": "https://x/y.png", "outputFormats": ["png"], "outputSizes": [{"width": 1, "height": 1}],
           "callbackUrl": url}
    with pytest.raises(RequestInvalid) as caught:
        parse_request(doc, max_dimension=10000, max_tasks=1000)
    assert [f for f, _ in caught.value.problems] == ["callbackUrl"]


def test_a_callback_url_travels_with_the_request():
    doc = {"fileLocation": "https://x/y.png", "outputFormats": ["png"], "outputSizes": [{"width": 1, "height": 1}],
           "callbackUrl": "https://hooks.example.com/imagefork?team=a"}
    request = parse_request(doc, max_dimension=10000, max_tasks=1000)
    assert request.callbackUrl == doc["callbackUrl"] and request.to_dict()["callbackUrl"] == doc["callbackUrl"]
    final = WorkflowCompleted("w", None, "COMPLETED", "x", (), (), (), 0, 1, 2, request='{"callbackUrl": "https://h/"}')
    assert callback_of(final) == "https://h/"
    for text in ("", "not json", "[1]", '{"callbackUrl": 5}'):
        assert callback_of(WorkflowCompleted("w", None, "COMPLETED", "x", (), (), (), 0, 1, 2, request=text)) is None


class Receiver(http.server.BaseHTTPRequestHandler):
    answers: list = []
    seen: list = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).seen.append((dict(self.headers), body))
        answer = type(self).answers.pop(0) if type(self).answers else 200
        if answer == "hang":
            time.sleep(3)
            return
        self.send_response(answer)
        if answer in (301, 302):
            self.send_header("Location", "http://127.0.0.1:1/elsewhere")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


@pytest.fixture
def receiver():
    Receiver.answers, Receiver.seen = [], []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook?x=1", Receiver
    server.shutdown()


def test_one_call_posts_the_body_and_headers_and_returns_the_status(receiver):
    url, handler = receiver
    handler.answers = [503, 302, 200]
    headers = {"Content-Type": "application/json", "Imagefork-Signature": sign(SECRET, b"{}", 5)}
    assert post(url, b"{}", headers, LOOPBACK, 2.0) == 503
    assert post(url, b"{}", headers, LOOPBACK, 2.0) == 302  # not followed
    assert post(url, b"{}", headers, LOOPBACK, 2.0) == 200
    assert len(handler.seen) == 3 and handler.seen[0][1] == b"{}"
    assert handler.seen[0][0]["Imagefork-Signature"] == headers["Imagefork-Signature"]


def test_a_call_that_cannot_be_made_says_whether_to_try_again(receiver):
    url, handler = receiver
    handler.answers = ["hang"]
    with pytest.raises(Undelivered) as caught:
        post(url, b"{}", {}, LOOPBACK, 0.5)
    assert caught.value.retry and "did not answer" in str(caught.value)
    with pytest.raises(Undelivered) as caught:  # loopback without the allow-list: refused for good
        post(url, b"{}", {}, (), 0.5)
    assert not caught.value.retry and "non-public" in str(caught.value)
    with pytest.raises(Undelivered) as caught:  # plain http to a public address: refused for good
        post("http://example.com/hook", b"{}", {}, (), 0.5, resolver=lambda h, p: ["93.184.216.34"])
    assert not caught.value.retry and "plain http" in str(caught.value)
    closed = url.replace(url.split(":")[2].split("/")[0], "1")  # nothing listens on port 1
    with pytest.raises(Undelivered) as caught:
        post(closed, b"{}", {}, LOOPBACK, 0.5)
    assert caught.value.retry


def test_offsets_commit_only_a_done_prefix_per_partition():
    o = Offsets()
    for off in (5, 7, 9):  # 6 and 8: a transaction's markers, never given to the consumer
        o.take("c", 0, off)
    o.take("c", 1, 3, done=True)
    o.done("c", 0, 7)
    assert [(tp.partition, tp.offset) for tp in o.committable()] == [(1, 4)]  # 5 is still under way
    o.done("c", 0, 5)
    assert [(tp.partition, tp.offset) for tp in o.committable()] == [(0, 8)]
    assert o.under_way() == 1
    o.drop({("c", 0)})
    o.done("c", 0, 9)  # finished after its partition went: nothing to commit here
    assert o.committable() == [] and o.under_way() == 0


@pytest.mark.parametrize("header", ["t=\u00b2,v1=ab", "t=1,v1=\u00e9\u00e9", "t=" + "9" * 5000 + ",v1=ab", "", "t=,v1=",
                                    "v1=ab,v1=cd", "t=1,t=2,v1=ab", "garbage" * 1000])
def test_a_hostile_signature_header_is_refused_not_an_error(header):
    assert verify(SECRET, b"{}", header, now=1) is False


def test_a_url_that_is_not_ascii_is_refused_with_the_request():
    assert "ASCII" in callback_problem("https://h/caf\u00e9")
    assert callback_problem("https://h/caf%C3%A9") is None


class Trickler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.wfile.write(b"HTTP/1.1 200 OK\r\n")
        for _ in range(40):  # a header byte every 0.1 s: each read is quick, the answer never ends in time
            self.wfile.write(b"X")
            self.wfile.flush()
            time.sleep(0.1)

    def log_message(self, *args):
        pass


def test_a_receiver_that_trickles_its_answer_is_cut_at_the_timeout():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Trickler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        started = time.monotonic()
        with pytest.raises(Undelivered) as caught:
            post(f"http://127.0.0.1:{server.server_address[1]}/", b"{}", {}, LOOPBACK, 1.0)
        assert caught.value.retry and time.monotonic() - started < 2.5
    finally:
        server.shutdown()


class FakeProducer:
    def __init__(self, fail: bool = False):
        self.sent, self.fail = [], fail

    def produce(self, topic, key=None, value=None, headers=None, on_delivery=None):
        self.sent.append((topic, key, value, dict(headers or [])))
        if on_delivery is not None:
            on_delivery("refused" if self.fail else None, None)

    def poll(self, timeout=0):
        return 0


def sender(producer):
    from streams.agents.webhooks import WebhookSender
    from streams.config import Config
    s = WebhookSender.__new__(WebhookSender)
    s.config, s.topics, s.secret, s.allow = Config(webhook_max_tries=1), Config().topics, SECRET, LOOPBACK
    s.producer, s.offsets, s.stopping = producer, Offsets(), threading.Event()
    return s


def test_what_the_role_cannot_read_or_call_is_dead_lettered_never_skipped():
    from streams import serde
    final = WorkflowCompleted("w", None, "COMPLETED", "x", (), (), (), 0, 1, 2,
                              request='{"callbackUrl": "http://127.0.0.1:1/x"}', runId="r1")
    for raw, code in [(b"garbage", b"WEBHOOK_UNREADABLE"), (serde.encode("WorkflowCompleted", final.to_dict()),
                                                            b"WEBHOOK_UNDELIVERED")]:
        s = sender(FakeProducer())
        s.offsets.take("c", 0, 7)
        s._handle(b"w", raw, ("c", 0, 7))
        dead = [m for m in s.producer.sent if m[0] == s.topics.dead_letter]
        assert [m[3]["imagefork.error.code"] for m in dead] == [code] and dead[0][2] == raw
        assert dead[0][3]["imagefork.source.topic"] == s.topics.webhook_redeliver.encode()
        assert [(tp.partition, tp.offset) for tp in s.offsets.committable()] == [(0, 8)]  # done once it is acked
    # a dead letter the broker refuses: the event is not done, so it comes again
    s = sender(FakeProducer(fail=True))
    s.offsets.take("c", 0, 7)
    s._handle(b"w", b"garbage", ("c", 0, 7))
    assert s.offsets.committable() == [] and s.offsets.under_way() == 1
    # a final event without a callbackUrl: done at once, nothing sent
    s = sender(FakeProducer())
    s.offsets.take("c", 0, 9)
    s._handle(b"w", serde.encode("WorkflowCompleted", WorkflowCompleted(
        "w", None, "COMPLETED", "x", (), (), (), 0, 1, 2).to_dict()), ("c", 0, 9))
    assert s.producer.sent == [] and [(tp.offset) for tp in s.offsets.committable()] == [10]
