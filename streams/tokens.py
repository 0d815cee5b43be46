"""``imagefork token``: the API's token file (IMAGEFORK_API_TOKENS_FILE), which holds each token's SHA-256,
never the token. ``create`` prints a new token once and adds its line; ``revoke`` removes a name's line;
``list`` shows names and scopes. The API reads the file again within a second of a change: a rotation is
``create`` of the new token, clients moved to it, then ``revoke`` of the old one, without a restart."""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from streams.core.access import SCOPES, TokensInvalid, new_token, parse_scopes, parse_tokens, token_line
from streams.config import ConfigError


def token_file(args) -> Path:
    path = args.file or os.environ.get("IMAGEFORK_API_TOKENS_FILE", "")
    if not path:
        raise ConfigError("name the token file: --file PATH, or IMAGEFORK_API_TOKENS_FILE")
    return Path(path)


def _read(path: Path) -> str:
    try:
        text = path.read_text("utf-8")
    except FileNotFoundError:
        return ""
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        parse_tokens(text)
    except TokensInvalid as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return text


def _write(path: Path, text: str) -> None:
    """The whole file at once (a reader sees the old file or the new one), owner-only like a key."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def create(args) -> int:
    path = token_file(args)
    text = _read(path)
    try:
        scopes = parse_scopes(args.scopes)
        token = new_token()
        line = token_line(args.name, scopes, token, args.rate, args.burst)
        if args.rate is not None and not args.rate > 0 or args.burst is not None and args.burst < 1:
            raise ValueError("--rate is > 0 requests per second and --burst >= 1")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if any(t.name == args.name for t in parse_tokens(text).values()):
        raise ConfigError(f"{path} already has a token named {args.name!r}: revoke it first, or pick another name")
    if text and not text.endswith("\n"):
        text += "\n"
    _write(path, text + line + "\n")
    print(token)
    named = ",".join(s for s in SCOPES if s in scopes)
    print(f"# {args.name} ({named}) added to {path}; the token above is shown only now", file=sys.stderr)
    return 0


def revoke(args) -> int:
    path = token_file(args)
    text = _read(path)
    kept, gone = [], 0
    for raw in text.splitlines(keepends=True):
        words = raw.split("#", 1)[0].split()
        if words and words[0] == args.name:
            gone += 1
        else:
            kept.append(raw)
    if not gone:
        print(f"{path} has no token named {args.name!r}", file=sys.stderr)
        return 1
    _write(path, "".join(kept))
    print(f"revoked {args.name} (the API refuses it within a second)")
    return 0


def listing(args) -> int:
    path = token_file(args)
    tokens = sorted(parse_tokens(_read(path)).values(), key=lambda t: t.name)
    for t in tokens:
        limits = (f" rate={t.rate:g}" if t.rate else "") + (f" burst={t.burst}" if t.burst else "")
        print(f"{t.name}\t{','.join(t.describe()['scopes'])}{limits}")
    if not tokens:
        print(f"no tokens in {path}", file=sys.stderr)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("token", help="the API's tokens (IMAGEFORK_API_TOKENS_FILE): create, revoke, list")
    actions = p.add_subparsers(dest="action", required=True)
    q = actions.add_parser("create", help="a new token with scopes; printed once, its SHA-256 added to the file")
    q.add_argument("name", help="who holds it (1-64 of A-Z a-z 0-9 . _ @ -); written in each audit line")
    q.add_argument("--scopes", required=True, help="comma-separated: read, submit, operate")
    q.add_argument("--rate", type=float, default=None, help="requests per second (default IMAGEFORK_API_RATE)")
    q.add_argument("--burst", type=int, default=None, help="requests at once (default IMAGEFORK_API_BURST)")
    q.set_defaults(func=create)
    q = actions.add_parser("revoke", help="remove a token by name (the API refuses it within a second)")
    q.add_argument("name")
    q.set_defaults(func=revoke)
    q = actions.add_parser("list", help="names, scopes and limits (never a token)")
    q.set_defaults(func=listing)
    for q in actions.choices.values():
        q.add_argument("--file", default=None, help="the token file (default IMAGEFORK_API_TOKENS_FILE)")
