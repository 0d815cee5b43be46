import http.server
import ipaddress
import socket
import threading
import time

import pytest

from streams.adapters.source import address_allowed, fetch_http, pick_addresses
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


# IPv6 forms that embed or route to an IPv4 address, or are otherwise not public.
@pytest.mark.parametrize("address", [
    "::", "::ffff:0.0.0.0", "::127.0.0.1", "::10.0.0.1", "::8.8.8.8",  # IPv4-compatible: deprecated, always
    "::ffff:10.0.0.1", "::ffff:0:a00:1",  # mapped, and the SIIT-translated form
    "2002:c0a8:0101::1", "2002:7f00:0001::1", "2002:a9fe:a9fe::1", "2002::1",  # 6to4 of private/loopback/...
    "64:ff9b::10.0.0.1", "64:ff9b::127.0.0.1", "64:ff9b::169.254.169.254", "64:ff9b::100.64.0.1",  # NAT64
    "64:ff9b:1::8.8.8.8", "64:ff9b:1::10.0.0.1",  # local-use NAT64: always
    "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo with a documentation client
    "2001:0:0808:0808::f7f7:f7f7",  # Teredo with public server and client: refused all the same
    "2001:0:0a00:0001::f5ff:fffe",  # Teredo with private server and client
    "fec0::1", "fd00::1", "fc00::1", "fe80::1%eth0", "ff02::1",
])
def test_non_public_ipv6_forms_are_refused(address):
    assert not address_allowed(address, ())


@pytest.mark.parametrize("address", ["2002:0808:0808::1", "2002:5db8:d822::1", "64:ff9b::8.8.8.8",
                                     "64:ff9b::5db8:d822", "::ffff:8.8.8.8"])
def test_ipv6_forms_of_public_ipv4_pass(address):
    assert address_allowed(address, ())


def _nets(*cidrs):
    return tuple(ipaddress.ip_network(c) for c in cidrs)


@pytest.mark.parametrize("address,allow", [
    ("fd00::1", "fd00::/8"), ("fec0::1", "fec0::/10"), ("2002:c0a8:0101::1", "2002:c0a8::/32"),
    ("64:ff9b::10.0.0.1", "64:ff9b::/96"), ("64:ff9b:1::10.0.0.1", "64:ff9b:1::/48"),
    ("2001:0:0a00:0001::f5ff:fffe", "2001::/32"), ("::127.0.0.1", "::/96"), ("::ffff:127.0.0.1", "127.0.0.0/8"),
])
def test_allow_list_overrides_ipv6_refusals(address, allow):
    assert address_allowed(address, _nets(allow))


def test_allow_list_matches_the_address_not_what_a_gateway_forwards_to():
    assert not address_allowed("64:ff9b::127.0.0.1", LOOPBACK)
    assert not address_allowed("2002:7f00:0001::1", LOOPBACK)
    assert not address_allowed("::127.0.0.1", LOOPBACK)


def test_allow_list_permits_loopback_only():
    assert address_allowed("127.0.0.1", LOOPBACK)
    assert not address_allowed("169.254.169.254", LOOPBACK)


def test_any_bad_answer_of_dns_refuses_the_host():
    with pytest.raises(SourceForbidden):
        pick_addresses("evil.example", 80, (), resolver=lambda h, p: ["93.184.216.34", "10.0.0.1"])
    with pytest.raises(SourceForbidden):
        pick_addresses("evil.example", 80, (), resolver=lambda h, p: ["93.184.216.34", "2002:c0a8:0101::1"])
    assert pick_addresses("ok.example", 80, (), resolver=lambda h, p: ["8.8.8.8", "2002:0808:0808::1"]) \
        == ["8.8.8.8", "2002:0808:0808::1"]


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
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(SourceUnavailable):
        fetch_http(f"http://127.0.0.1:{port}/x", Limits(connect_timeout_s=1), LOOPBACK)


def test_read_timeout():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    try:
        with pytest.raises(SourceUnavailable, match="did not send response headers within 0.5 s"):
            fetch_http(f"http://127.0.0.1:{listener.getsockname()[1]}/slow",
                       Limits(connect_timeout_s=1, read_timeout_s=0.5), LOOPBACK)
    finally:
        listener.close()


def _resolves_to(*addresses):
    return lambda host, port: list(addresses)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_falls_back_to_the_next_address_when_one_refuses(server):
    port = server.rsplit(":", 1)[1]  # the server listens on 127.0.0.1 only: 127.0.0.2 refuses
    data = fetch_http(f"http://img.test:{port}/ok", Limits(connect_timeout_s=1), LOOPBACK,
                      resolver=_resolves_to("127.0.0.2", "127.0.0.1"))
    assert data == b"x" * 1000


def test_no_fallback_once_an_address_has_answered(server):
    port = int(server.rsplit(":", 1)[1])
    with socket.socket() as second:
        second.bind(("127.0.0.2", port))
        second.listen(1)
        with pytest.raises(SourceUnavailable, match="503"):
            fetch_http(f"http://img.test:{port}/flaky", Limits(connect_timeout_s=1), LOOPBACK,
                       resolver=_resolves_to("127.0.0.1", "127.0.0.2"))
        second.setblocking(False)
        with pytest.raises(BlockingIOError):  # nobody connected to the second address
            second.accept()


def test_every_address_refusing_names_the_host_and_the_count():
    url = f"http://img.test:{_free_port()}/x"
    with pytest.raises(SourceUnavailable, match=r"img\.test: tried 2 address") as info:
        fetch_http(url, Limits(connect_timeout_s=1), LOOPBACK, resolver=_resolves_to("127.0.0.2", "127.0.0.3"))
    assert info.value.transient
    many = [f"127.0.0.{i}" for i in range(2, 8)]
    with pytest.raises(SourceUnavailable, match=r"tried 4 of 6 address"):
        fetch_http(url, Limits(connect_timeout_s=1), LOOPBACK, resolver=_resolves_to(*many))


def test_trickled_headers_hit_the_overall_deadline():
    """One byte every 0.1 s never trips a 0.5 s per-read timeout; the header deadline must."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    stop = threading.Event()

    def trickle():
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 1000:
                if stop.wait(0.1):
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    return

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    started = time.monotonic()
    try:
        with pytest.raises(SourceUnavailable, match="did not send response headers within 0.5 s"):
            fetch_http(f"http://127.0.0.1:{listener.getsockname()[1]}/slow",
                       Limits(connect_timeout_s=1, read_timeout_s=0.5), LOOPBACK)
        assert time.monotonic() - started < 1.5
    finally:
        stop.set()
        thread.join(2)
        listener.close()
