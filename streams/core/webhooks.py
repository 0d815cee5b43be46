"""Webhooks: a request's ``callbackUrl`` receives its final event as JSON, signed, at least once.

The signature is Stripe's and GitHub's scheme: ``Imagefork-Signature: t=<unix seconds>,v1=<hex>``, where
``hex`` is HMAC-SHA256 with the shared secret (IMAGEFORK_WEBHOOK_SECRET) over ``"<t>." + body``. A receiver
recomputes it over the raw body, compares in constant time, and refuses a ``t`` older than its tolerance
(``verify``: 300 s by default) so a captured delivery cannot be replayed later. Every delivery of one run
carries the same ``Imagefork-Idempotency-Key`` (``workflowId:runId``): a receiver that has seen it answers
2xx and does nothing."""
from __future__ import annotations

import hashlib
import hmac
import re
from urllib.parse import urlsplit

SIGNATURE_HEADER = "Imagefork-Signature"
IDEMPOTENCY_HEADER = "Imagefork-Idempotency-Key"
TOLERANCE_S = 300
MAX_URL = 2048

DELIVERED, RETRY, REFUSED = "DELIVERED", "RETRY", "REFUSED"


def sign(secret: bytes, body: bytes, t: int) -> str:
    mac = hmac.new(secret, f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def verify(secret: bytes, body: bytes, header: str, now: float, tolerance_s: int = TOLERANCE_S) -> bool:
    """What a receiver does with ``Imagefork-Signature`` (any ``v1`` of the header may match: a secret being
    rotated is signed with both)."""
    if not isinstance(header, str) or len(header) > 4096:
        return False
    parts = [p.split("=", 1) for p in header.split(",") if "=" in p]
    stamps = [v.strip() for k, v in parts if k.strip() == "t"]
    if len(stamps) != 1 or not re.fullmatch(r"[0-9]{1,12}", stamps[0], re.ASCII):
        return False
    t = int(stamps[0])
    if abs(now - t) > tolerance_s:
        return False
    expected = sign(secret, body, t).split("v1=", 1)[1].encode()
    return any(hmac.compare_digest(expected, v.strip().encode("utf-8", "replace"))
               for k, v in parts if k.strip() == "v1")


def outcome(status: int) -> str:
    """What an HTTP answer means for a delivery: 2xx delivered; 408, 429 and 5xx tried again; the rest
    (other 4xx, and 3xx: redirects are not followed) refused for good."""
    if 200 <= status < 300:
        return DELIVERED
    if status in (408, 429) or status >= 500:
        return RETRY
    return REFUSED


def backoff_s(attempt: int, base_s: float, cap_s: float) -> float:
    """The pause after failed attempt ``attempt`` (1, 2, ...): doubling from ``base_s``, at most ``cap_s``."""
    return min(cap_s, base_s * 2 ** max(0, attempt - 1))


def callback_problem(url) -> str | None:
    """Why ``url`` cannot be a callbackUrl (None: it can). Where it may point (https to a public address,
    http only to IMAGEFORK_FETCH_ALLOW) is checked when it is called, against the addresses it resolves to."""
    if not isinstance(url, str) or not url:
        return "must be an https:// URL (or http:// to an allow-listed network)"
    if len(url) > MAX_URL:
        return f"must be at most {MAX_URL} characters"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        return "is not a URL"
    if parts.scheme not in ("https", "http"):
        return "must be an https:// URL (or http:// to an allow-listed network)"
    if not parts.hostname:
        return "has no host"
    if parts.username or parts.password:
        return "must not carry credentials (the signature says who sends it)"
    if parts.fragment:
        return "must not have a #fragment"
    if any(c.isspace() or ord(c) < 32 for c in url):
        return "must not contain spaces or control characters"
    if not url.isascii():
        return "must be ASCII (percent-encode the rest, as an HTTP request line must)"
    return None
