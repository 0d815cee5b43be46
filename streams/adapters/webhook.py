"""One webhook call: POST a body to a callbackUrl with the sources' SSRF guard (every address the host resolves
to must be public or in IMAGEFORK_FETCH_ALLOW, and the connection goes to an address checked, not to a new
lookup), plain http only to an allow-listed address, no redirect followed."""
from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
from typing import Sequence
from urllib.parse import urlsplit

from streams.adapters.source import (
    Network, Resolver, _PinnedHTTPConnection, _PinnedHTTPSConnection, _resolve, pick_addresses,
)
from streams.core.errors import PipelineError

MAX_ANSWER = 64 << 10  # read (and dropped) of an answer's body, at most


class Undelivered(Exception):
    """A call that got no HTTP answer: ``retry`` says whether another attempt may get one."""

    def __init__(self, message: str, retry: bool):
        super().__init__(message)
        self.retry = retry


def post(url: str, body: bytes, headers: dict[str, str], allow: Sequence[Network], timeout_s: float,
         cafile: str = "", resolver: Resolver = _resolve) -> int:
    """The HTTP status the receiver answered; Undelivered when it gave none. Connecting takes at most
    ``timeout_s`` per address tried (a few at most); once connected, sending and the whole answer (a
    receiver that trickles it a byte at a time too) take at most ``timeout_s`` together."""
    parts = urlsplit(url)
    host, scheme = parts.hostname or "", parts.scheme.lower()
    try:
        port = parts.port or (443 if scheme == "https" else 80)
        addresses = pick_addresses(host, port, allow, resolver)
    except ValueError:
        raise Undelivered(f"bad port in {url[:200]}", retry=False) from None
    except PipelineError as exc:  # the host does not resolve (it may, later), or to an address refused
        raise Undelivered(exc.message, retry=exc.code == "SOURCE_NOT_FOUND") from None
    if scheme == "http" and not all(_listed(a, allow) for a in addresses):
        raise Undelivered(f"plain http to {host} is refused: only https, or http to an address in "
                          f"IMAGEFORK_FETCH_ALLOW", retry=False)
    conn = (_PinnedHTTPSConnection(host, port, addresses, timeout_s, cafile) if scheme == "https"
            else _PinnedHTTPConnection(host, port, addresses, timeout_s))
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        conn.connect()
        conn.sock.settimeout(timeout_s)
        conn.sock.headers_due = time.monotonic() + timeout_s  # every read after this: within the time left
        conn.request("POST", path, body=body, headers=headers)
        resp = conn.getresponse()
        resp.read(MAX_ANSWER)
        return resp.status
    except PipelineError as exc:  # every address refused the connection
        raise Undelivered(exc.message, retry=True) from None
    except ssl.SSLCertVerificationError as exc:
        raise Undelivered(f"TLS certificate of {host} is not valid: {exc.verify_message}", retry=False) from None
    except (socket.timeout, TimeoutError):
        raise Undelivered(f"{host} did not answer within {timeout_s:.0f}s", retry=True) from None
    except (ConnectionError, OSError, http.client.HTTPException) as exc:
        raise Undelivered(f"{host}: {type(exc).__name__}: {str(exc)[:120]}", retry=True) from None
    except (ValueError, UnicodeError) as exc:  # what http.client refuses to send (a URL or header it cannot)
        raise Undelivered(f"cannot call {url[:200]}: {type(exc).__name__}: {str(exc)[:120]}", retry=False) from None
    finally:
        conn.close()


def _listed(address: str, allow: Sequence[Network]) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in allow)
