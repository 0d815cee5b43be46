"""Who may do what on the HTTP API: bearer tokens with scopes, kept hashed, and a request rate per token.

A token file holds one token per line, its SHA-256 and never the token itself::

    # name      scopes          digest                     [rate=R] [burst=B]
    ci-bot      read,submit     sha256:9f86d081884c7d65...
    ops-alice   read,operate    sha256:60303ae22b998861...  rate=5 burst=20

Scopes: ``read`` (status, list, outputs, events, sources, presets), ``submit`` (new requests), ``operate``
(cancel, retry, presets). A scope does not imply another: a client that submits and then follows its workflow
needs ``read,submit``. A token is ``ifk_`` and 43 URL-safe characters (256 random bits), so one SHA-256
is enough at rest (a digest cannot be walked back to a token of that much chance). No I/O here: the API
reads the file (``streams/api/auth.py``)."""
from __future__ import annotations

import hashlib
import math
import re
import secrets
from dataclasses import dataclass

SCOPES = ("read", "submit", "operate")
PREFIX = "ifk_"
MAX_TOKEN = 256  # characters of a presented token; more is not one
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")


@dataclass(frozen=True)
class Token:
    name: str
    scopes: frozenset[str]
    digest: str  # hex SHA-256 of the token
    rate: float | None = None  # requests per second; None: the API's default
    burst: int | None = None

    def describe(self) -> dict:
        return {"name": self.name, "scopes": [s for s in SCOPES if s in self.scopes]}


class TokensInvalid(ValueError):
    """A token file that cannot be used; ``problems`` are ``line N: why``."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


def new_token() -> str:
    return PREFIX + secrets.token_urlsafe(32)


def digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def parse_scopes(text: str) -> frozenset[str]:
    scopes = frozenset(s.strip() for s in text.split(",") if s.strip())
    unknown = sorted(scopes - set(SCOPES))
    if unknown or not scopes:
        raise ValueError(f"scopes are a comma-separated list of {', '.join(SCOPES)} (got {text!r})")
    return scopes


def token_line(name: str, scopes: frozenset[str], token: str, rate: float | None = None,
               burst: int | None = None) -> str:
    """The file's line for ``token`` (which it does not contain)."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"a token's name is 1-64 characters of A-Z a-z 0-9 . _ @ - (got {name!r})")
    extra = (f" rate={rate:g}" if rate is not None else "") + (f" burst={burst}" if burst is not None else "")
    return f"{name}\t{','.join(s for s in SCOPES if s in scopes)}\tsha256:{digest(token)}{extra}"


def _option(word: str, problems: list[str], where: str) -> tuple[str, float] | None:
    key, _, value = word.partition("=")
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if key == "rate" and number > 0 and math.isfinite(number):
        return key, number
    if key == "burst" and math.isfinite(number) and number >= 1 and number == int(number):
        return key, int(number)
    problems.append(f"{where}: {word!r} is not rate=R (R > 0 per second) or burst=B (B >= 1)")
    return None


def parse_tokens(text: str) -> dict[str, Token]:
    """The file's tokens by digest; every problem at once (TokensInvalid). Blank lines and ``#`` comments
    are skipped."""
    tokens: dict[str, Token] = {}
    names: set[str] = set()
    problems: list[str] = []
    for number, raw in enumerate(text.splitlines(), 1):
        words = raw.split("#", 1)[0].split()
        if not words:
            continue
        where = f"line {number}"
        if len(words) < 3:
            problems.append(f"{where}: a token is NAME SCOPES sha256:DIGEST [rate=R] [burst=B]")
            continue
        name, scope_text, digest_text, *rest = words
        if not _NAME.fullmatch(name):
            problems.append(f"{where}: the name {name!r} is not 1-64 characters of A-Z a-z 0-9 . _ @ -")
        elif name in names:
            problems.append(f"{where}: the name {name!r} is given twice")
        names.add(name)
        try:
            scopes = parse_scopes(scope_text)
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
            scopes = frozenset()
        found = _DIGEST.fullmatch(digest_text)
        if found is None:
            problems.append(f"{where}: the digest is sha256: and 64 lower-case hex digits (the file never holds "
                            f"a token itself: `imagefork token create` writes the line)")
        elif found.group(1) in tokens:
            problems.append(f"{where}: the same token as {tokens[found.group(1)].name!r}")
        options = dict(o for o in (_option(w, problems, where) for w in rest) if o is not None)
        if found is not None:
            tokens[found.group(1)] = Token(name, scopes, found.group(1), options.get("rate"), options.get("burst"))
    if problems:
        raise TokensInvalid(problems)
    return tokens


def bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer TOKEN`` header; "" for a header that is not one."""
    if header is None:
        return None
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    if scheme.lower() != "bearer" or not value or len(value) > MAX_TOKEN or not value.isascii() or " " in value:
        return ""
    return value


class Bucket:
    """A token bucket: ``rate`` requests a second, up to ``burst`` at once."""

    def __init__(self, rate: float, burst: int, now: float):
        self.rate, self.burst = rate, burst
        self.level, self.at = float(burst), now

    def take(self, now: float) -> float:
        """0 when a request may go now (and it is counted), else the seconds until one may."""
        self.level = min(float(self.burst), self.level + (now - self.at) * self.rate)
        self.at = now
        if self.level >= 1.0:
            self.level -= 1.0
            return 0.0
        return (1.0 - self.level) / self.rate


class Limiter:
    """One bucket per token name; a token's own rate and burst, else the defaults."""

    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = rate, burst
        self.buckets: dict[str, Bucket] = {}

    def take(self, token: Token, now: float) -> float:
        rate, burst = token.rate or self.rate, token.burst or self.burst
        bucket = self.buckets.get(token.name)
        if bucket is None or (bucket.rate, bucket.burst) != (rate, burst):  # new, or its limits changed
            bucket = self.buckets[token.name] = Bucket(rate, burst, now)
        return bucket.take(now)
