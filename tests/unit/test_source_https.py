"""https:// sources on the real network path (docs/security.md, "Fetching a source safely"): a local TLS server, a test
CA made here with the openssl CLI, and the planner's own fetch (``fetch_http``, the pinned connection, the
system's verification plus IMAGEFORK_SOURCE_CA_FILE).

The URL's host is ``localhost``: the connection goes to the checked address (127.0.0.1 or ::1, allowed by
IMAGEFORK_FETCH_ALLOW as the integration tests allow their file server), while SNI and the host-name check use
``localhost``; a certificate for ``other.example`` proves the host-name check, one from another CA the trust."""
import http.server
import shutil
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest

from streams.adapters.source import fetch_http
from streams.config import Config, ConfigError, Limits
from streams.core.errors import SourceForbidden, SourceUnavailable

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="the test CA is made with openssl")

ALLOW = ("127.0.0.0/8", "::1/128")  # localhost may resolve to either
LOOPBACK = Config(fetch_allow=ALLOW).fetch_allow_networks
BODY = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _ca(folder: Path, name: str) -> tuple[Path, Path]:
    key, cert = folder / f"{name}-key.pem", folder / f"{name}.pem"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(key),
             "-out", str(cert), "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return cert, key


def _leaf(folder: Path, name: str, host: str, ca: tuple[Path, Path]) -> Path:
    """A server certificate for ``host`` signed by ``ca``: one PEM file with its key, as load_cert_chain reads."""
    key, csr, cert, ext = (folder / f"{name}{s}" for s in ("-key.pem", ".csr", ".pem", ".ext"))
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(key),
             "-out", str(csr), "-subj", f"/CN={host}")
    ext.write_text(f"basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                   f"extendedKeyUsage=serverAuth\nsubjectAltName=DNS:{host}\n")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial",
             "-out", str(cert), "-days", "2", "-sha256", "-extfile", str(ext))
    chain = folder / f"{name}-chain.pem"
    chain.write_bytes(cert.read_bytes() + key.read_bytes())
    return chain


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    trusted, stranger = _ca(folder, "test-ca"), _ca(folder, "stranger-ca")
    return {
        "ca": str(trusted[0]),
        "localhost": _leaf(folder, "localhost", "localhost", trusted),
        "other": _leaf(folder, "other", "other.example", trusted),
        "stranger": _leaf(folder, "stranger", "localhost", stranger),
    }


def _server_context(chain: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(chain)
    return context


class _Image(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, *a):
        pass


@pytest.fixture(scope="module")
def https(pki):
    """name -> port of a TLS image server presenting that certificate (on 127.0.0.1)."""
    servers, ports = [], {}
    for name in ("localhost", "other", "stranger"):
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Image)
        httpd.socket = _server_context(pki[name]).wrap_socket(httpd.socket, server_side=True)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        servers.append(httpd)
        ports[name] = httpd.server_address[1]
    yield ports
    for httpd in servers:
        httpd.shutdown()
        httpd.server_close()


def _limits(pki, **kw) -> Limits:
    return Limits(**{"connect_timeout_s": 2, "read_timeout_s": 2, "source_ca_file": pki["ca"], **kw})


def test_a_valid_certificate_for_the_host_serves_the_bytes(pki, https):
    assert fetch_http(f"https://localhost:{https['localhost']}/a.png", _limits(pki), LOOPBACK) == BODY


def test_the_ca_file_setting_reaches_the_fetch_as_the_planner_makes_it(pki, https):
    """IMAGEFORK_SOURCE_CA_FILE read by Config.from_env, the fetch called with what the planner passes."""
    config = Config.from_env({"IMAGEFORK_SOURCE_CA_FILE": pki["ca"], "IMAGEFORK_FETCH_ALLOW": ",".join(ALLOW)})
    assert config.limits.source_ca_file == pki["ca"]
    assert fetch_http(f"https://localhost:{https['localhost']}/a.png", config.limits,
                      config.fetch_allow_networks) == BODY


def test_without_the_ca_file_a_private_ca_is_not_trusted(pki, https):
    with pytest.raises(SourceForbidden, match=r"TLS certificate of localhost is not valid: .*local issuer"):
        fetch_http(f"https://localhost:{https['localhost']}/a.png", _limits(pki, source_ca_file=""), LOOPBACK)


def test_a_certificate_for_another_host_name_is_refused(pki, https):
    with pytest.raises(SourceForbidden, match=r"TLS certificate of localhost is not valid: Hostname mismatch") as info:
        fetch_http(f"https://localhost:{https['other']}/a.png", _limits(pki), LOOPBACK)
    assert not info.value.transient


def test_a_certificate_from_an_untrusted_ca_is_refused(pki, https):
    with pytest.raises(SourceForbidden, match=r"TLS certificate of localhost is not valid: .*local issuer") as info:
        fetch_http(f"https://localhost:{https['stranger']}/a.png", _limits(pki), LOOPBACK)
    assert not info.value.transient


def test_loopback_https_is_still_refused_without_the_allow_list(pki, https):
    with pytest.raises(SourceForbidden, match="non-public address"):
        fetch_http(f"https://localhost:{https['localhost']}/a.png", _limits(pki), ())


class _SilentTLS:
    """A TLS server that completes the handshake, reads the request, then sends ``reply`` one byte every
    ``pause_s`` (nothing at all when empty) and holds the connection until the test ends."""

    def __init__(self, chain: Path, reply: bytes = b"", pause_s: float = 0.1):
        self.context = _server_context(chain)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.reply, self.pause_s = reply, pause_s
        self.stop = threading.Event()
        self.handshaken = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        try:
            raw, _ = self.listener.accept()
        except OSError:
            return
        try:
            with self.context.wrap_socket(raw, server_side=True) as conn:
                self.handshaken.set()
                conn.recv(65536)
                for byte in self.reply:
                    if self.stop.wait(self.pause_s):
                        return
                    conn.sendall(bytes([byte]))
                self.stop.wait(30)
        except OSError:
            return

    def close(self):
        self.stop.set()
        self.listener.close()
        self.thread.join(5)


def test_a_tls_server_that_never_sends_headers_hits_the_header_deadline(pki):
    server = _SilentTLS(pki["localhost"])
    started = time.monotonic()
    try:
        with pytest.raises(SourceUnavailable, match="localhost did not send response headers within 0.5 s") as info:
            fetch_http(f"https://localhost:{server.port}/a.png", _limits(pki, read_timeout_s=0.5), LOOPBACK)
        assert server.handshaken.is_set()  # TLS was done: this is the header wait, not the handshake
        assert time.monotonic() - started < 1.5
        assert info.value.transient
    finally:
        server.close()


def test_headers_trickled_over_tls_hit_the_overall_deadline(pki):
    """One byte (one TLS record) every 0.1 s never trips the 0.5 s timeout of a single read; the deadline over
    all of the status line and headers must (the TLS socket carries it too)."""
    server = _SilentTLS(pki["localhost"], reply=b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 40)
    started = time.monotonic()
    try:
        with pytest.raises(SourceUnavailable, match="localhost did not send response headers within 0.5 s"):
            fetch_http(f"https://localhost:{server.port}/a.png", _limits(pki, read_timeout_s=0.5), LOOPBACK)
        assert time.monotonic() - started < 1.5
    finally:
        server.close()


def test_a_server_that_never_answers_the_tls_handshake_times_out(pki):
    """TCP is accepted (by the kernel's backlog) but no TLS byte ever comes: bounded by the connect timeout."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        started = time.monotonic()
        with pytest.raises(SourceUnavailable, match="timed out talking to localhost"):
            fetch_http(f"https://localhost:{listener.getsockname()[1]}/a.png",
                       _limits(pki, connect_timeout_s=0.5, read_timeout_s=5), LOOPBACK)
        assert time.monotonic() - started < 2.5  # a fallback to the other address of localhost may add one more


@pytest.mark.parametrize("content", [None, b"not a certificate\n"])
def test_a_ca_file_that_cannot_be_read_is_a_start_error(tmp_path, content):
    path = tmp_path / "ca.pem"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match="IMAGEFORK_SOURCE_CA_FILE"):
        Config.from_env({"IMAGEFORK_SOURCE_CA_FILE": str(path)})
