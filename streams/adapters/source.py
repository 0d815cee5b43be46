"""Fetch a request's source: http(s) with limits and an address guard, or s3://.

The guard resolves the host itself, refuses loopback, private, link-local,
multicast, reserved and metadata addresses (unless the allow-list names them),
also when an IPv6 form embeds or routes to one, then connects only to the very
addresses it checked, so a DNS answer cannot change between check and use.
Every redirect is checked the same way. The response headers must arrive
within one overall deadline, so a server cannot hold a worker by trickling them.
"""
from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Callable, Sequence
from urllib.parse import urljoin, urlsplit

from streams.config import Limits
from streams.core.errors import (
    PipelineError, SourceForbidden, SourceNotFound, SourceTooLarge, SourceUnavailable,
)
from streams.metrics import count_read

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], Sequence[str]]
USER_AGENT = "imagefork/0.1 (+https://github.com/imagefork)"
# A host's DNS answer is chosen by whoever submits its URL: without a cap, a long list of
# addresses that never answer would hold a worker for connect_timeout_s each.
MAX_CONNECT_ATTEMPTS = 4

# IPv6 ranges refused whatever they contain (an allow-list entry still overrides them).
_V6_REFUSED = tuple(ipaddress.IPv6Network(n) for n in (
    "::/96",           # unspecified, loopback and the deprecated IPv4-compatible ::a.b.c.d
    "64:ff9b:1::/48",  # local-use NAT64 (RFC 8215): translates into networks of the operator's choosing
    # Teredo: the path goes through a relay and the client's IPv4 is obfuscated, so the real
    # destination cannot be judged from the address; Teredo is obsolete for servers anyway.
    "2001::/32",
    "fec0::/10",       # site-local (deprecated, still routed inside some networks; the stdlib calls it global)
    "fc00::/7",        # unique-local
))
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052: the gateway connects to the IPv4 in the last 32 bits


def _resolve(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise SourceNotFound(f"host {host!r} does not resolve ({exc.strerror})") from None
    return list(dict.fromkeys(info[4][0] for info in infos))


def address_allowed(address: str, allow: Sequence[Network]) -> bool:
    """Whether a connection to ``address`` may be made: an allow-listed or a public destination.

    An IPv4-mapped address is the IPv4 address itself to the kernel, so it is judged (and
    allow-listed) as that. 6to4 and NAT64 addresses are judged by the IPv4 address their
    gateway forwards to, since that is where the request ends up.
    """
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if any(ip in net for net in allow):
        return True
    if isinstance(ip, ipaddress.IPv6Address):
        if any(ip in net for net in _V6_REFUSED):
            return False
        relayed = _relayed_ipv4(ip)
        if relayed is not None:
            return _public(relayed)
    return _public(ip)


def _relayed_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address a 6to4 relay or a NAT64 gateway delivers ``ip`` to, if it is such an address."""
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Globally reachable unicast; ``is_global`` alone lets multicast and reserved ranges through."""
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_unspecified
                                 or ip.is_loopback or ip.is_link_local or ip.is_private)


def pick_addresses(host: str, port: int, allow: Sequence[Network], resolver: Resolver = _resolve) -> list[str]:
    """The addresses of ``host`` to try, in the resolver's order.

    If any address is refused the whole host is: a DNS answer mixing public and private
    addresses is how a name is made to point inside, and trying only the good ones would
    let the attacker pick when the bad one is used.
    """
    addresses = list(resolver(host, port))
    if not addresses:
        raise SourceNotFound(f"host {host!r} has no address")
    refused = [a for a in addresses if not address_allowed(a, allow)]
    if refused:
        raise SourceForbidden(f"host {host!r} resolves to a non-public address ({refused[0]}); "
                              f"fetching it is refused (set IMAGEFORK_FETCH_ALLOW to permit)")
    return addresses


def _connect_first(host: str, port: int, addresses: Sequence[str], timeout: float) -> socket.socket:
    """A TCP connection to the first of the checked ``addresses`` that accepts one.

    Only a failure to connect moves on to the next address; anything later (TLS, HTTP) is
    the host's answer and is not retried elsewhere.
    """
    tried = addresses[:MAX_CONNECT_ATTEMPTS]
    for address in tried:
        sock = _Socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect((address, port))
            return sock
        except OSError as exc:  # refused, timed out, unreachable
            sock.close()
            last = exc
    of = f" of {len(addresses)}" if len(addresses) > len(tried) else ""
    raise SourceUnavailable(f"cannot connect to {host}: tried {len(tried)}{of} address(es), "
                            f"last error {type(last).__name__}: {str(last)[:120]}")


class _HeaderDeadline:
    """Socket mixin: while ``headers_due`` is set, each read waits at most for the time left until then.

    A socket timeout bounds one read only, so a server trickling its status line and headers
    a byte at a time could hold a worker forever; cutting every read to the time left bounds
    them all together.
    """
    __slots__ = ()
    headers_due: float | None = None

    def recv_into(self, *args, **kwargs):
        if self.headers_due is not None:
            left = self.headers_due - time.monotonic()
            if left <= 0:
                raise TimeoutError("response headers are late")
            self.settimeout(left)
        return super().recv_into(*args, **kwargs)


class _Socket(_HeaderDeadline, socket.socket):
    pass


class _SSLSocket(_HeaderDeadline, ssl.SSLSocket):
    pass


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to the checked addresses, never to what a new lookup of the host name would give."""

    def __init__(self, host: str, port: int, addresses: Sequence[str], timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._addresses = addresses

    def connect(self):
        self.sock = _connect_first(self.host, self.port, self._addresses, self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """Connects to the checked addresses; the certificate is still verified against the host name, with the
    system's CAs and those of ``cafile`` (IMAGEFORK_SOURCE_CA_FILE)."""

    def __init__(self, host: str, port: int, addresses: Sequence[str], timeout: float, cafile: str = ""):
        context = ssl.create_default_context()
        if cafile:
            context.load_verify_locations(cafile=cafile)
        context.sslsocket_class = _SSLSocket
        super().__init__(host, port, timeout=timeout, context=context)
        self._addresses = addresses

    def connect(self):
        sock = _connect_first(self.host, self.port, self._addresses, self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


@dataclass(frozen=True)
class Fetched:
    """A source fetched, or (``data`` None) not modified since the validators given; and the validators the
    server gave for it (None: it gave none)."""
    data: bytes | None
    etag: str | None = None
    last_modified: str | None = None
    redirected: bool = False  # the bytes came from another URL: its validators are not this URL's


def fetch_http(url: str, limits: Limits, allow: Sequence[Network] = (), *,
               resolver: Resolver = _resolve) -> bytes:
    """GET ``url`` within the limits. Raises SourceNotFound/Forbidden/TooLarge (permanent) or SourceUnavailable."""
    return fetch_http_validated(url, limits, allow, resolver=resolver).data  # type: ignore[return-value]


def fetch_http_validated(url: str, limits: Limits, allow: Sequence[Network] = (), *, resolver: Resolver = _resolve,
                         etag: str | None = None, last_modified: str | None = None) -> Fetched:
    """``fetch_http``, conditional when validators are given (``If-None-Match``, ``If-Modified-Since``): a
    ``304 Not Modified`` is ``Fetched(None, etag, last_modified)``; a 200 carries the new validators."""
    started = time.monotonic()
    conditional = {}
    if etag:
        conditional["If-None-Match"] = etag
    if last_modified:
        conditional["If-Modified-Since"] = last_modified
    for hop in range(limits.max_redirects + 1):
        if hop:
            conditional = {}  # validators are the first URL's: a redirect is fetched whole
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise SourceForbidden(f"redirect to a {scheme or 'relative'}:// location is refused")
        host = parts.hostname
        if not host:
            raise SourceNotFound(f"no host in {url[:200]}")
        try:
            port = parts.port or (443 if scheme == "https" else 80)
        except ValueError:
            raise SourceNotFound(f"bad port in {url[:200]}") from None
        addresses = pick_addresses(host, port, allow, resolver)
        if scheme == "https":
            conn = _PinnedHTTPSConnection(host, port, addresses, limits.connect_timeout_s, limits.source_ca_file)
        else:
            conn = _PinnedHTTPConnection(host, port, addresses, limits.connect_timeout_s)
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        try:
            conn.connect()
            conn.sock.settimeout(limits.read_timeout_s)
            conn.request("GET", path, headers={"User-Agent": USER_AGENT, "Accept": "image/*,*/*;q=0.5",
                                               "Accept-Encoding": "identity", **conditional})
            resp = _await_headers(conn, host, limits)
            if resp.status == 304 and conditional:
                return Fetched(None, etag, last_modified)
            if resp.status in (301, 302, 303, 307, 308):
                location = resp.getheader("Location")
                if not location:
                    raise SourceNotFound(f"HTTP {resp.status} without a Location from {host}")
                url = urljoin(url, location)
                continue
            if resp.status == 404 or resp.status == 410:
                raise SourceNotFound(f"HTTP {resp.status} {resp.reason} for {_short(url)}")
            if resp.status == 429 or resp.status >= 500 or resp.status == 408:
                raise SourceUnavailable(f"HTTP {resp.status} {resp.reason} for {_short(url)}")
            if resp.status != 200:
                raise SourceNotFound(f"HTTP {resp.status} {resp.reason} for {_short(url)}")
            data = _read_capped(resp, limits, started)
            count_read("http", len(data))
            return Fetched(data, resp.getheader("ETag"), resp.getheader("Last-Modified"), redirected=hop > 0)
        except PipelineError:
            raise
        except ssl.SSLCertVerificationError as exc:
            raise SourceForbidden(f"TLS certificate of {host} is not valid: {exc.verify_message}") from None
        except (socket.timeout, TimeoutError):
            raise SourceUnavailable(f"timed out talking to {host}") from None
        except (ConnectionError, OSError, http.client.HTTPException) as exc:
            raise SourceUnavailable(f"cannot fetch from {host}: {type(exc).__name__}: {str(exc)[:120]}") from None
        finally:
            conn.close()
    raise SourceNotFound(f"more than {limits.max_redirects} redirects")


def _await_headers(conn: http.client.HTTPConnection, host: str,
                   limits: Limits) -> http.client.HTTPResponse:
    """The response, whose status line and headers must all arrive within ``read_timeout_s``."""
    sock = conn.sock  # getresponse drops conn.sock when the response will close the connection
    sock.headers_due = time.monotonic() + limits.read_timeout_s
    try:
        resp = conn.getresponse()
    except TimeoutError:
        raise SourceUnavailable(f"{host} did not send response headers "
                                f"within {limits.read_timeout_s:g} s") from None
    sock.headers_due = None
    sock.settimeout(limits.read_timeout_s)
    return resp


def _read_capped(resp: http.client.HTTPResponse, limits: Limits, started: float) -> bytes:
    cap = limits.max_source_bytes
    declared = resp.getheader("Content-Length")
    if declared and declared.isdigit() and int(declared) > cap:
        raise SourceTooLarge(f"source declares {declared} bytes, more than the limit of {cap}")
    chunks, total = [], 0
    budget = limits.connect_timeout_s + 4 * limits.read_timeout_s
    while True:
        chunk = resp.read(min(65536, cap + 1 - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
        if total > cap:
            raise SourceTooLarge(f"source is more than the limit of {cap} bytes")
        if time.monotonic() - started > budget:
            raise SourceUnavailable(f"download took more than {budget:.0f} s")
    if declared and declared.isdigit() and total < int(declared):
        raise SourceUnavailable(f"download ended after {total} of {declared} bytes")
    return b"".join(chunks)


def _short(url: str) -> str:
    return url if len(url) <= 200 else url[:197] + "..."
