"""Content-addressed reuse (pure: no I/O): an output is named by its source's bytes (SHA-256) and its spec,
so a task whose pair matches an output already made, recently enough and still there, copies that output
instead of making it again. The index is a small JSON pointer object per pair beside the outputs:
``{prefix}_reuse/{sha256}/{spec}.json`` (``prefix``: the output prefix with scope ``prefix``, none with
``global``), and the source's facts at ``.../{sha256}/facts.json``. A workflow id cannot begin with ``_``,
so no workflow's folder is ever under ``_reuse/``."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict

import PIL

from streams.config import Encoding

FOLDER = "_reuse/"
# Raise it with a change of ours that changes an output's bytes for the same spec: outputs made before are
# then made again rather than reused (Pillow's own version is in the key already).
OUTPUT_REVISION = 1


def spec_key(fmt: str, width: int, height: int, options, encoding: Encoding) -> str:
    """What makes an output's bytes, as a hash: its format, box, resolved options, the encoder settings of the
    configuration and the software that encodes (another Pillow or imagefork may write other bytes)."""
    spec = {"format": fmt.lower(), "box": [width, height], "options": options.to_dict(),
            "encoding": asdict(encoding), "pillow": PIL.__version__, "revision": OUTPUT_REVISION}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:32]


def scope_prefix(scope: str, output_prefix: str) -> str | None:
    """Where a scope's pointers live; None: reuse is off."""
    if scope == "global":
        return FOLDER
    if scope == "prefix":
        return f"{output_prefix}{FOLDER}"
    return None


def pointer_key(prefix: str, sha256: str, spec: str) -> str:
    return f"{prefix}{sha256}/{spec}.json"


def source_key(staging_prefix: str, sha256: str) -> str:
    """Where a source's bytes are kept by their hash, so that a URL answered 304 is staged from them: with the
    staged sources (private), not beside the outputs. No workflow id begins with ``_``."""
    return f"{staging_prefix}_kept/{sha256}"


def facts_key(prefix: str, sha256: str) -> str:
    return f"{prefix}{sha256}/facts.json"


def pointer(key: str, output: dict, at_ms: int, run_id: str) -> bytes:
    """The pointer to an output just made (``output``: its TaskOutput record as a dict) by a task of run
    ``run_id`` (the object's ``imagefork-run``: another run that writes the same key later is not it)."""
    return json.dumps({"key": key, "at": at_ms, "run": run_id, "output": output}, separators=(",", ":")).encode()


def same_object(doc: dict, head: dict | None) -> bool:
    """Whether the object at the pointer's key is still the one it points to: there, of its size, and
    written by its run."""
    if head is None or head.get("ContentLength") != doc["output"].get("bytes"):
        return False
    return (head.get("Metadata") or {}).get("imagefork-run", "") == doc.get("run", "")


def usable(doc: object, now_ms: int, ttl_s: float) -> dict | None:
    """The pointer's output record if the pointer is one of ours and young enough; else None."""
    if not isinstance(doc, dict) or not isinstance(doc.get("output"), dict) or not isinstance(doc.get("key"), str):
        return None
    at = doc.get("at")
    if not isinstance(at, int) or now_ms - at > ttl_s * 1000 or at > now_ms + 60_000:
        return None
    return doc


def facts_cover(facts: object, wanted: tuple[str, ...]) -> bool:
    """Stored facts (a SourceFacts dict) that hold every fact ``wanted`` asks for."""
    if not isinstance(facts, dict) or not facts.get("sha256"):
        return False
    needs = {"colors": "dominantColor", "placeholder": "blurhash", "phash": "phash"}
    return all(facts.get(needs[w]) for w in wanted if w in needs)
