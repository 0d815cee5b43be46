import http.server
import threading

import pytest

from streams.adapters.source import address_allowed, fetch_http, pick_address
from streams.config import Config, Limits
from streams.core.errors import SourceForbidden, SourceNotFound, SourceTooLarge, SourceUnavailable

LOOPBACK = Config(fetch_allow=("127.0.0.0/8",)).fetch_allow_networks


@pytest.mark.parametrize("address", ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254",
                                     "0.0.0.0", "::1", "fe80::1", "fd00::1", "::ffff:127.0.0.1", "224.0.0.1",
                                     "100.64.0.1", "::ffff:169.254.169.254"])
def test_non_public_addresses_are_refused(address):
    assert not address_allowed(address, ())


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700::1111"])
def test_public_addresses_pass(address):
    assert address_allowed(address, ())


def test_allow_list_permits_loopback_only():
    assert address_allowed("127.0.0.1", LOOPBACK)
    assert not address_allowed("169.254.169.254", LOOPBACK)


def test_any_bad_answer_of_dns_refuses_the_host():
    with pytest.raises(SourceForbidden):
        pick_address("evil.example", 80, (), resolver=lambda h, p: ["93.184.216.34", "10.0.0.1"])


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: dict = {}

    def do_GET(self):
        status, headers, body = self.routes.get(self.path, (404, {}, b"nope"))
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        if "Content-Length" not in headers and "X-No-Length" not in headers:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    _Handler.routes = {
        "/ok": (200, {}, b"x" * 1000),
        "/big": (200, {}, b"x" * 5000),
        "/unsized": (200, {"X-No-Length": "1", "Connection": "close"}, b"x" * 5000),
        "/gone": (404, {}, b""),
        "/flaky": (503, {}, b""),
        "/to-meta": (302, {"Location": "http://169.254.169.254/latest/meta-data/"}, b""),
        "/to-ok": (302, {"Location": "/ok"}, b""),
        "/loop": (302, {"Location": "/loop"}, b""),
        "/to-file": (302, {"Location": "file:///etc/passwd"}, b""),
    }
    yield base
    httpd.shutdown()


def test_loopback_refused_without_allow_list(server):
    with pytest.raises(SourceForbidden):
        fetch_http(f"{server}/ok", Limits())


def test_fetch_with_allow_list(server):
    assert fetch_http(f"{server}/ok", Limits(), LOOPBACK) == b"x" * 1000


def test_redirects_are_checked_every_hop(server):
    assert fetch_http(f"{server}/to-ok", Limits(), LOOPBACK) == b"x" * 1000
    with pytest.raises(SourceForbidden):
        fetch_http(f"{server}/to-meta", Limits(), LOOPBACK)
    with pytest.raises(SourceForbidden):
        fetch_http(f"{server}/to-file", Limits(), LOOPBACK)
    with pytest.raises(SourceNotFound, match="redirects"):
        fetch_http(f"{server}/loop", Limits(), LOOPBACK)


def test_size_limit_declared_and_streamed(server):
    with pytest.raises(SourceTooLarge):
        fetch_http(f"{server}/big", Limits(max_source_bytes=4000), LOOPBACK)
    with pytest.raises(SourceTooLarge):  # no Content-Length: the reader stops past the limit
        fetch_http(f"{server}/unsized", Limits(max_source_bytes=100), LOOPBACK)


def test_status_classification(server):
    with pytest.raises(SourceNotFound):
        fetch_http(f"{server}/gone", Limits(), LOOPBACK)
    with pytest.raises(SourceUnavailable) as info:
        fetch_http(f"{server}/flaky", Limits(), LOOPBACK)
    assert info.value.transient


def test_connection_refused_is_transient():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(SourceUnavailable):
        fetch_http(f"http://127.0.0.1:{port}/x", Limits(connect_timeout_s=1), LOOPBACK)


def test_read_timeout():
    import socket
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    try:
        with pytest.raises(SourceUnavailable, match="timed out"):
            fetch_http(f"http://127.0.0.1:{listener.getsockname()[1]}/slow",
                       Limits(connect_timeout_s=1, read_timeout_s=0.5), LOOPBACK)
    finally:
        listener.close()
