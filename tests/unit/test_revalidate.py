"""Revalidation (issue 25, item 2): with reuse on, the planner asks a URL it fetched before with its validators
(ETag, Last-Modified); a 304 stages the copy it kept of the bytes (a server-side copy), a 200 is fetched
and hashed as always. A local HTTP server that counts what it sends; the object store in a dict."""
import hashlib
import http.server
import threading

import pytest

from streams.adapters.source import fetch_http_validated
from streams.agents.planner import Planner
from streams.config import Config
from streams.metrics import SOURCES_REVALIDATED
from tests.unit.images import encode, photo
from tests.unit.test_reuse import Bucket

V1, V2 = encode(photo((60, 40)), "PNG"), encode(photo((40, 60)), "PNG")


class Origin:
    """Serves one image with an ETag (or only a Last-Modified); answers If-None-Match / If-Modified-Since."""

    def __init__(self, etag=True):
        self.body, self.version, self.etag = V1, "v1", etag
        self.sent, self.conditional = 0, []
        origin = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                origin.conditional.append(self.headers.get("If-None-Match") or self.headers.get("If-Modified-Since"))
                tag = f'"{origin.version}"'
                stamp = f"Sun, 06 Dec 2026 10:00:0{origin.version[-1]} GMT"
                same = (self.headers.get("If-None-Match") == tag) if origin.etag else \
                    self.headers.get("If-Modified-Since") == stamp
                self.send_response(304 if same else 200)
                self.send_header("ETag" if origin.etag else "Last-Modified", tag if origin.etag else stamp)
                if same:
                    self.end_headers()
                    return
                origin.sent += 1  # before the body: the client may look as soon as it has it
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(origin.body)))
                self.end_headers()
                self.wfile.write(origin.body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/photo.png"

    def change(self, body, version):
        self.body, self.version = body, version

    def close(self):
        self.server.shutdown()


@pytest.fixture(params=[True, False], ids=["etag", "last-modified"])
def origin(request):
    o = Origin(etag=request.param)
    yield o
    o.close()


def planner(reuse="prefix"):
    config = Config(reuse=reuse, output_prefix="out/", fetch_allow=("127.0.0.0/8",))
    return Planner(config, None, Bucket())


def test_a_source_not_modified_is_staged_from_its_kept_copy(origin):
    p = planner()
    before = SOURCES_REVALIDATED._value.get()
    first = p._stage(origin.url, "wf-1", "r1")
    second = p._stage(origin.url, "wf-2", "r2")
    assert origin.sent == 1 and origin.conditional[1] is not None  # asked again, answered 304, nothing sent
    assert SOURCES_REVALIDATED._value.get() == before + 1
    assert first[1:] == second[1:] == ((60, 40), hashlib.sha256(V1).hexdigest())
    assert p.store.objects[second[0].split("/", 3)[3]][0] == V1  # its own staged key, the same bytes
    origin.change(V2, "v2")
    third = p._stage(origin.url, "wf-3", "r3")
    assert origin.sent == 2 and third[1:] == ((40, 60), hashlib.sha256(V2).hexdigest())


def test_without_reuse_nothing_is_asked_conditionally(origin):
    p = planner(reuse="off")
    p._stage(origin.url, "wf-1", "r1")
    p._stage(origin.url, "wf-2", "r2")
    assert origin.sent == 2 and origin.conditional == [None, None]


def test_a_kept_copy_gone_fetches_the_source_whole(origin):
    p = planner()
    p._stage(origin.url, "wf-1", "r1")
    for key in [k for k in p.store.objects if "_kept/" in k]:
        del p.store.objects[key]
    staged = p._stage(origin.url, "wf-2", "r2")
    assert origin.sent == 2 and staged[2] == hashlib.sha256(V1).hexdigest()


def test_fetch_says_not_modified_only_when_asked(origin):
    allow = Config(fetch_allow=("127.0.0.0/8",)).fetch_allow_networks
    got = fetch_http_validated(origin.url, Config().limits, allow)
    assert got.data == V1 and (got.etag or got.last_modified)
    again = fetch_http_validated(origin.url, Config().limits, allow, etag=got.etag, last_modified=got.last_modified)
    assert again.data is None and (again.etag, again.last_modified) == (got.etag, got.last_modified)


def test_a_redirected_source_is_fetched_whole_and_its_validators_not_kept():
    """Validators are the first URL's: one that redirects is never asked conditionally (its target may
    change while the target's validators still match)."""
    class Redirect(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(302)
            self.send_header("Location", origin.url)
            self.end_headers()

        def log_message(self, *args):
            pass
    origin = Origin(etag=True)
    hop = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=hop.serve_forever, daemon=True).start()
    try:
        p = planner()
        url = f"http://127.0.0.1:{hop.server_address[1]}/avatar"
        p._stage(url, "wf-1", "r1")
        p._stage(url, "wf-2", "r2")
        assert origin.sent == 2 and origin.conditional == [None, None] and url not in p.sources.validators
    finally:
        hop.shutdown()
        origin.close()


def test_a_kept_copy_that_cannot_be_written_costs_only_the_revalidation(origin):
    p = planner()

    def refused(*args):
        raise RuntimeError("AccessDenied")
    p.store.copy = refused
    staged = p._stage(origin.url, "wf-1", "r1")
    assert staged[2] == hashlib.sha256(V1).hexdigest() and origin.url not in p.sources.validators
