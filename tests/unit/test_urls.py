"""URLs in and out: the output URL forms of the final event (``Config.object_url``, ``ObjectStore.url``),
and the source fetcher's DNS pinning (the connection goes to the address that was checked)."""
import http.server
import ipaddress
import socket
import threading

import pytest

from streams.adapters.objectstore import ObjectStore
from streams.adapters.source import fetch_http
from streams.config import Config, Limits
from streams.core.planning import output_key

KEY = output_key("out/", "wf-1", "image_convert_resize_png_300x300_0", "png")  # out/wf-1/....png


@pytest.mark.parametrize("env,url", [
    # S3_PUBLIC_URL wins over the endpoint; path style; a trailing slash is not doubled
    ({"S3_ENDPOINT_URL": "http://127.0.0.1:9000", "S3_PUBLIC_URL": "https://cdn.example.com/media/"},
     f"https://cdn.example.com/media/imagefork/{KEY}"),
    ({"S3_PUBLIC_URL": "https://cdn.example.com"}, f"https://cdn.example.com/imagefork/{KEY}"),
    # the endpoint alone: path style on the endpoint
    ({"S3_ENDPOINT_URL": "http://127.0.0.1:9000/", "S3_BUCKET": "pics"}, f"http://127.0.0.1:9000/pics/{KEY}"),
    # neither: AWS's virtual-host URL in the configured region
    ({}, f"https://imagefork.s3.us-east-1.amazonaws.com/{KEY}"),
    ({"AWS_REGION": "eu-west-3", "S3_BUCKET": "pics"}, f"https://pics.s3.eu-west-3.amazonaws.com/{KEY}"),
    ({"AWS_DEFAULT_REGION": "ap-south-1"}, f"https://imagefork.s3.ap-south-1.amazonaws.com/{KEY}"),
], ids=["public-over-endpoint", "public", "endpoint", "aws", "aws-region", "aws-default-region"])
def test_object_url_forms(env, url):
    config = Config.from_env(env)
    assert config.object_url(KEY) == url
    # the final event's URLs come from the object store, which must agree (no network is used here)
    store = ObjectStore(config.with_(aws_access_key_id="x", aws_secret_access_key="y"))
    assert store.url(KEY) == url
    assert store.uri(KEY) == f"s3://{config.bucket}/{KEY}"


class _Recorder(http.server.BaseHTTPRequestHandler):
    body = b""
    seen: list

    def do_GET(self):
        self.seen.append((self.connection.getsockname()[0], self.headers.get("Host"), self.path))  # where it arrived
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


def _serve(address: str, port: int, body: bytes):
    seen: list = []
    handler = type("Handler", (_Recorder,), {"body": body, "seen": seen})
    server = http.server.ThreadingHTTPServer((address, port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, seen


@pytest.fixture
def two_servers():
    """The same port on two loopback addresses: 127.0.0.1 (the checked one) and 127.0.0.2 (the other answer)."""
    checked, checked_seen = _serve("127.0.0.1", 0, b"from the checked address")
    port = checked.server_address[1]
    try:
        other, other_seen = _serve("127.0.0.2", port, b"from the other address")
    except OSError:
        checked.shutdown()
        checked.server_close()
        pytest.skip("127.0.0.2 cannot be bound here")
    yield port, checked_seen, other_seen
    for server in (checked, other):
        server.shutdown()
        server.server_close()


def test_the_fetch_connects_to_the_checked_address_whatever_dns_answers_later(two_servers, monkeypatch):
    """The host is resolved once and the connection goes to that checked address: a resolver (or the
    system's DNS) that answers differently afterwards (DNS rebinding) is never asked again."""
    port, checked_seen, other_seen = two_servers
    host = "images.pinning.test"
    answers: list[str] = []

    def resolver(name: str, p: int):
        answers.append(name)
        return ["127.0.0.1"] if len(answers) == 1 else ["127.0.0.2"]

    real_getaddrinfo = socket.getaddrinfo

    def rebinding_getaddrinfo(name, *args, **kwargs):  # the system's DNS, if anyone asked it, says 127.0.0.2
        if name == host:
            return real_getaddrinfo("127.0.0.2", *args, **kwargs)
        return real_getaddrinfo(name, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding_getaddrinfo)
    allow = (ipaddress.ip_network("127.0.0.0/8"),)
    data = fetch_http(f"http://{host}:{port}/a.png", Limits(), allow, resolver=resolver)
    assert data == b"from the checked address"
    assert answers == [host]  # resolved once
    assert other_seen == []
    assert checked_seen == [("127.0.0.1", f"{host}:{port}", "/a.png")]  # the host name still goes in Host


def test_the_checked_address_is_the_one_used_even_when_the_first_answer_is_refused_later(two_servers):
    """The answer that is checked decides: with only 127.0.0.2 allowed, a resolver whose first answer
    is 127.0.0.2 is fetched from there, never from the 127.0.0.1 it would name on a second lookup."""
    port, checked_seen, other_seen = two_servers
    calls: list[str] = []

    def resolver(name: str, p: int):
        calls.append(name)
        return ["127.0.0.2"] if len(calls) == 1 else ["127.0.0.1"]

    data = fetch_http(f"http://pinned.test:{port}/x", Limits(), (ipaddress.ip_network("127.0.0.2/32"),),
                      resolver=resolver)
    assert data == b"from the other address" and len(calls) == 1
    assert checked_seen == [] and [s[0] for s in other_seen] == ["127.0.0.2"]
