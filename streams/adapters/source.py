"""Fetch a request's source: http(s) with limits and an address guard, or s3://.

The guard resolves the host itself, refuses loopback, private, link-local,
multicast, reserved and metadata addresses (unless the allow-list names them),
then connects to the very address it checked, so a DNS answer cannot change
between check and use. Every redirect is checked the same way.
"""
from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
from typing import Callable, Sequence
from urllib.parse import urljoin, urlsplit

from streams.config import Limits
from streams.core.errors import (
    PipelineError, SourceForbidden, SourceNotFound, SourceTooLarge, SourceUnavailable,
)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], Sequence[str]]
USER_AGENT = "imagefork/0.1 (+https://github.com/imagefork)"


def _resolve(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise SourceNotFound(f"host {host!r} does not resolve ({exc.strerror})") from None
    return list(dict.fromkeys(info[4][0] for info in infos))


def address_allowed(address: str, allow: Sequence[Network]) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if any(ip in net for net in allow):
        return True
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_unspecified
                                 or ip.is_loopback or ip.is_link_local or ip.is_private)


def pick_address(host: str, port: int, allow: Sequence[Network], resolver: Resolver = _resolve) -> str:
    addresses = resolver(host, port)
    if not addresses:
        raise SourceNotFound(f"host {host!r} has no address")
    refused = [a for a in addresses if not address_allowed(a, allow)]
    if refused:
        raise SourceForbidden(f"host {host!r} resolves to a non-public address ({refused[0]}); "
                              f"fetching it is refused (set IMAGEFORK_FETCH_ALLOW to permit)")
    return addresses[0]


class _PinnedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self):
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self):
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def fetch_http(url: str, limits: Limits, allow: Sequence[Network] = (), *,
               resolver: Resolver = _resolve) -> bytes:
    """GET ``url`` within the limits. Raises SourceNotFound/Forbidden/TooLarge (permanent) or SourceUnavailable."""
    started = time.monotonic()
    for _hop in range(limits.max_redirects + 1):
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
        address = pick_address(host, port, allow, resolver)
        cls = _PinnedHTTPSConnection if scheme == "https" else _PinnedHTTPConnection
        conn = cls(host, port, address, limits.connect_timeout_s)
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        try:
            conn.connect()
            conn.sock.settimeout(limits.read_timeout_s)
            conn.request("GET", path, headers={"User-Agent": USER_AGENT, "Accept": "image/*,*/*;q=0.5",
                                               "Accept-Encoding": "identity"})
            resp = conn.getresponse()
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
            return _read_capped(resp, limits, started)
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
