"""Who is asking the API: bearer tokens from ``IMAGEFORK_API_TOKENS_FILE`` (``streams/core/access.py``),
checked per route's scope, a rate per token, and one audit line per write.

- A token comes in ``Authorization: Bearer TOKEN`` or, for the dashboard's own page (its ``<img>``,
  links and event stream cannot send a header), in the session cookie ``POST /v1/session`` sets
  (HttpOnly, SameSite=Strict, no expiry: gone with the browser's session).
- The file is looked at once a second at most, and read again when its bytes changed (a rotation needs no
  restart). A file that turns unreadable or invalid keeps the tokens it had (the log says why, and says it
  again each minute); a file that is removed lets nobody in.
- No file: no authentication (today's behaviour), and ``check_exposure`` refuses any listen address but
  loopback unless ``IMAGEFORK_API_ALLOW_ANONYMOUS`` says the network in front is private.
"""
from __future__ import annotations

import hashlib
import ipaddress
import logging
import math
import socket
import time
from pathlib import Path
from urllib.parse import quote

from aiohttp import web

from streams.adapters.http import json_body, json_error
from streams.config import Config
from streams.core.access import Limiter, Token, TokensInvalid, bearer, digest, parse_tokens
from streams.errors import StartError

log = logging.getLogger("imagefork")
audit_log = logging.getLogger("imagefork.audit")
COOKIE = "imagefork_token"
ANONYMOUS = Token("anonymous", frozenset({"read", "submit", "operate"}), "")
WRITES = {"POST", "PUT", "PATCH", "DELETE"}
TOKEN = web.RequestKey("token", Token)  # who asks, once the gate let the request in
WORKFLOW = web.RequestKey("workflowId", str)  # the workflow a write made (a submit's new id), for the audit


def is_loopback(host: str) -> bool:
    """Every address ``host`` names is a loopback one (127.0.0.0/8, ::1); "" and 0.0.0.0 are not."""
    if host in ("", "0.0.0.0", "::", "*"):
        return False
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


def check_exposure(config: Config, host: str) -> None:
    if config.api_tokens_file or config.api_allow_anonymous or is_loopback(host):
        return
    raise StartError(f"the API would listen on {config.api_listen} with no authentication: set "
                     f"IMAGEFORK_API_TOKENS_FILE (`imagefork token create` writes one), or listen on 127.0.0.1, or "
                     f"set IMAGEFORK_API_ALLOW_ANONYMOUS=1 if only a private network reaches that address")


class Gate:
    """The tokens in force (None: no authentication) and each one's request rate."""

    def __init__(self, config: Config, clock=time.monotonic):
        self.path = Path(config.api_tokens_file) if config.api_tokens_file else None
        self.limiter = Limiter(config.api_rate, config.api_burst)
        self.body_timeout_s = config.api_body_timeout_s
        self.clock = clock
        self.tokens: dict[str, Token] | None = None
        self.seen: str | None = None  # the SHA-256 of the bytes last looked at
        self.looked_at = self.complained_at = 0.0
        if self.path is not None:
            try:
                data = self.path.read_bytes()
                self.tokens, self.seen = parse_tokens(data.decode("utf-8")), hashlib.sha256(data).hexdigest()
            except (OSError, UnicodeDecodeError, TokensInvalid) as exc:
                raise StartError(f"IMAGEFORK_API_TOKENS_FILE {self.path}: {describe(exc)}") from None
            log.info("api: %d tokens from %s", len(self.tokens), self.path)

    def _fresh(self) -> dict[str, Token]:
        """The tokens, the file looked at again when a second has passed: its bytes, not its times (a rewrite
        within one tick of the file system's clock is seen too)."""
        now = self.clock()
        if now - self.looked_at < 1.0:
            return self.tokens
        self.looked_at = now
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            if self.tokens:
                log.error("api: %s is gone: no token is accepted until it is back", self.path)
            self.tokens, self.seen = {}, None
            return self.tokens
        except OSError as exc:
            self._complain(exc, now)
            return self.tokens
        seen = hashlib.sha256(data).hexdigest()
        if seen != self.seen:
            self.seen = seen  # a broken file is not parsed again until its bytes change
            try:
                self.tokens = parse_tokens(data.decode("utf-8"))
                log.warning("api: tokens read again from %s: %d tokens", self.path, len(self.tokens))
            except (UnicodeDecodeError, TokensInvalid) as exc:
                self.complained_at = 0.0
                self._complain(exc, now)
        return self.tokens

    def _complain(self, exc: Exception, now: float) -> None:
        if now - self.complained_at >= 60.0:
            self.complained_at = now
            log.error("api: %s cannot be used (%s): the tokens read before stay in force", self.path, describe(exc))

    def identify(self, request) -> Token | web.Response:
        """The token asking (ANONYMOUS with no authentication), or the 401 to answer."""
        if self.path is None:
            return ANONYMOUS
        presented = bearer(request.headers.get("Authorization"))
        if presented is None:
            presented = request.cookies.get(COOKIE)
        if not presented:
            return unauthorized("this API needs a token: send Authorization: Bearer TOKEN",
                                "" if presented is None else "invalid_request")
        token = self.lookup(presented)
        if token is None:
            return unauthorized("the token is not known here (revoked, rotated, or mistyped)", "invalid_token")
        return token

    def lookup(self, presented: str) -> Token | None:
        return self._fresh().get(digest(presented))

    def admit(self, token: Token) -> web.Response | None:
        """None, or the 429 of a token over its rate."""
        if token is ANONYMOUS:
            return None
        wait = self.limiter.take(token, self.clock())
        if not wait:
            return None
        resp = json_error(429, "TOO_MANY_REQUESTS", f"token {token.name!r} is over its rate "
                                                    f"({token.rate or self.limiter.rate:g} requests/s)")
        resp.headers["Retry-After"] = str(max(1, math.ceil(wait)))
        return resp


def foreign(request) -> web.Response | None:
    """A browser's POST from another site (a form or fetch aimed at this API on localhost): refused. Any
    client may POST; a browser says where the page that sends it came from."""
    origin = request.headers.get("Origin")
    if not origin or origin.split("://", 1)[-1] == request.host:  # not a browser, or our own page
        return None
    return json_error(403, "FOREIGN_ORIGIN", f"a page from {origin} may not POST here")  # "null" too


def describe(exc: Exception) -> str:
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc)


def unauthorized(message: str, error: str = "") -> web.Response:
    resp = json_error(401, "UNAUTHORIZED", message)
    resp.headers["WWW-Authenticate"] = 'Bearer realm="imagefork"' + (f', error="{error}"' if error else "")
    return resp


def forbidden(token: Token, scope: str, what: str) -> web.Response:
    have = ",".join(token.describe()["scopes"])
    resp = json_error(403, "FORBIDDEN", f"token {token.name!r} (scopes {have}) may not {what}: it needs {scope}",
                      scope=scope)
    resp.headers["WWW-Authenticate"] = f'Bearer realm="imagefork", error="insufficient_scope", scope="{scope}"'
    return resp


def middleware(gate: Gate, scopes: dict[tuple[str, str], str]):
    """Each route's scope (``scopes``: (method, path) -> scope; a route not there is anyone's: the
    dashboard's page, health, metrics, the session), the rate, and an audit line per write."""

    @web.middleware
    async def access(request, handler):
        route = request.match_info.route
        method = "GET" if request.method == "HEAD" else request.method
        scope = scopes.get((method, route.resource.canonical)) if route.resource is not None else None
        resp = None
        try:
            if scope is None:
                resp = await handler(request)
                return resp
            token = gate.identify(request)
            if isinstance(token, web.Response):
                resp = token
            else:
                request[TOKEN] = token
                resp = (forbidden(token, scope, f"{request.method} {route.resource.canonical}")
                        if scope not in token.scopes else gate.admit(token) or await handler(request))
            return resp
        except web.HTTPException as exc:  # an answer raised (a bad id: 400)
            resp = exc
            raise
        finally:  # resp None: a bug (the error middleware makes it a 500) or the client gone
            if request.method in WRITES:
                audit(request, resp)

    return access


def plain(text: str, limit: int = 300) -> str:
    """A field of an audit line as the client cannot shape it: percent-encoded past a few safe characters
    (no newline, no space, no ``=``: one line, one field)."""
    return quote(text[:limit], safe="/{}:@._-")


def audit(request, resp) -> None:
    """One line per write: who, what, which workflow, and the answer."""
    token = request.get(TOKEN)
    who = token.name if token is not None else "-"
    workflow = request.match_info.get("id") or request.get(WORKFLOW) or "-"
    status = getattr(resp, "status", 500) if resp is not None else 500
    audit_log.info("audit: who=%s action=%s %s workflow=%s status=%d from=%s", who, plain(request.method, 16),
                   plain(request.path), plain(workflow), status, plain(request.remote or "-", 64))


def session_routes(gate: Gate) -> list[web.RouteDef]:
    """The dashboard's sign-in: ``POST /v1/session`` with ``{"token": ...}`` checks the token and keeps it
    in a session cookie; ``GET`` says who is signed in (``authentication``: "token" or "none");
    ``DELETE`` signs out."""

    async def who(request):
        token = gate.identify(request)
        if isinstance(token, web.Response):
            return token
        return web.json_response({**token.describe(), "authentication": "none" if token is ANONYMOUS else "token"})

    async def sign_in(request):
        refused = foreign(request)
        if refused is not None:
            return refused
        if gate.path is None:
            return web.json_response({**ANONYMOUS.describe(), "authentication": "none"})
        body, refused = await json_body(request, gate.body_timeout_s)  # as any other request's is
        if refused is not None:
            return refused
        presented = body.get("token") if isinstance(body, dict) else None
        if not isinstance(presented, str) or not bearer("Bearer " + presented):
            return json_error(400, "INVALID_REQUEST", 'the body is {"token": "ifk_..."}')
        token = gate.lookup(presented)
        if token is None:
            return unauthorized("the token is not known here (revoked, rotated, or mistyped)", "invalid_token")
        request[TOKEN] = token
        resp = web.json_response({**token.describe(), "authentication": "token"})
        resp.set_cookie(COOKIE, presented, httponly=True, samesite="Strict", path="/",
                        secure=request.secure)
        return resp

    async def sign_out(_request):
        resp = web.json_response({"signedOut": True})
        resp.del_cookie(COOKIE, path="/")
        return resp

    return [web.get("/v1/session", who), web.post("/v1/session", sign_in), web.delete("/v1/session", sign_out)]
