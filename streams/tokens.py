"""``imagefork token``: the API's token file (IMAGEFORK_API_TOKENS_FILE), which holds each token's SHA-256,
never the token. ``create`` prints a new token once and adds its line; ``revoke`` removes a name's line;
``list`` shows names and scopes. The API reads the file again within a second of a change: a rotation is
``create`` of the new token, clients moved to it, then ``revoke`` of the old one, without a restart."""
from __future__ import annotations

import math
import os
import stat
import sys
import tempfile
from pathlib import Path

# streams.core.access (hashlib, secrets) loads when a token command runs: `imagefork --help` starts without it
from streams.config import ConfigError
from streams.locks import exclusive


def token_file(args) -> Path:
    path = args.file or os.environ.get("IMAGEFORK_API_TOKENS_FILE", "")
    if not path:
        raise ConfigError("name the token file: --file PATH, or IMAGEFORK_API_TOKENS_FILE")
    return Path(path)


def _read(path: Path) -> str:
    from streams.core.access import TokensInvalid, parse_tokens  # start-up: only token commands load it
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


def _locked(path: Path):
    """One change of the file at a time (two creates at once would each write the file without the other's
    line): an exclusive lock on a file beside it."""
    return exclusive(path.parent / f".{path.name}.lock")


def _write(path: Path, text: str) -> None:
    """The whole file at once (a reader sees the old file or the new one), checked first (a line the API
    would refuse is never written), with the old file's owner and mode (an API running as another user
    still reads it; a new file is owner-only, like a key), and on disk before the rename."""
    from streams.core.access import TokensInvalid, parse_tokens  # start-up: only token commands load it
    try:
        parse_tokens(text)
    except TokensInvalid as exc:
        raise ConfigError(f"{path} would not be a token file: {exc}") from None
    old = path.stat() if path.exists() else None
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            if old is not None:
                os.fchmod(out.fileno(), stat.S_IMODE(old.st_mode))
                try:
                    os.fchown(out.fileno(), old.st_uid, old.st_gid)
                except PermissionError:  # not root: the file becomes ours, with its mode
                    pass
            else:
                os.fchmod(out.fileno(), 0o600)
            os.fsync(out.fileno())
        os.replace(tmp, path)
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def create(args) -> int:
    path = token_file(args)
    with _locked(path):
        return _create(args, path)


def _create(args, path: Path) -> int:
    # start-up: only token commands load it
    from streams.core.access import SCOPES, new_token, parse_scopes, parse_tokens, token_line
    text = _read(path)
    try:
        scopes = parse_scopes(args.scopes)
        token = new_token()
        line = token_line(args.name, scopes, token, args.rate, args.burst)
        if args.rate is not None and not (math.isfinite(args.rate) and args.rate > 0) or \
                args.burst is not None and args.burst < 1:
            raise ValueError("--rate is a number > 0 (requests per second) and --burst >= 1")
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
    with _locked(path):
        return _revoke(args, path)


def _revoke(args, path: Path) -> int:
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
    from streams.core.access import parse_tokens  # start-up: only token commands load it
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
