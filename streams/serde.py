"""Avro over schemas/*.avsc, framed with the Avro single-object encoding.

Frame: ``C3 01`` + the 8-byte little-endian CRC-64-AVRO (Rabin) fingerprint of
the schema's parsing canonical form + the Avro binary body. Any consumer that
holds the .avsc files can decode it without a registry.

A record is written with its current schema and read into its current schema whatever version
wrote it: the fingerprint picks the writer's schema among every version this process knows (the
current files, ``schemas/history/``, and schemas a resolver found at run time, e.g. on the Kafka
schemas topic), and Avro schema resolution fills the defaults of fields the writer did not have
and skips those the reader does not have. So an optional field can be added in a rolling deploy:
old records reach new readers, and new records reach old readers that can find the new schema.
"""
from __future__ import annotations

import io
import json
import os
import threading
from pathlib import Path
from typing import Any, Callable

import fastavro
from fastavro.read import SchemaResolutionError
from fastavro.schema import fingerprint, load_schema, parse_schema, to_parsing_canonical_form
from streams.errors import ImageforkError

MAGIC = b"\xc3\x01"
NAMESPACE = "io.imagefork"

# Given a fingerprint no known schema has: the writer schema's JSON text, or None.
Resolver = Callable[[bytes], str | None]


class SerdeError(ImageforkError, ValueError):
    """Bytes that are not what the schema says; the message says why."""


def schemas_dir() -> Path:
    """IMAGEFORK_SCHEMAS_DIR, else the copy a wheel installs as ``streams/schemas``, else the
    repository's top-level ``schemas/`` (the source of truth, which the wheel's copy is made from)."""
    env = os.environ.get("IMAGEFORK_SCHEMAS_DIR")
    if env:
        return Path(env)
    package = Path(__file__).resolve().parent
    installed = package / "schemas"
    return installed if installed.is_dir() else package.parent / "schemas"


def expanded(path: Path) -> dict:
    """The schema in ``path`` with every named type it references (files beside it) defined inline:
    self-contained, so it can be kept in history/ or sent to a process that lacks the files."""
    try:
        return load_schema(str(path), _write_hint=False)
    except Exception as exc:  # fastavro raises several types for a missing or broken file
        raise SerdeError(f"schema {path} does not load: {type(exc).__name__}: {exc}") from None


def fingerprint_of(schema: dict) -> bytes:
    """The 8 bytes a frame carries for ``schema``."""
    # fastavro spells the Rabin fingerprint as the hex of its little-endian bytes already
    return bytes.fromhex(fingerprint(to_parsing_canonical_form(schema), "CRC-64-AVRO"))


class AvroSchema:
    """One record's current schema: every record is written with it, and read into it from any
    version of the record that ``versions`` knows."""

    def __init__(self, path: Path, versions: Schemas):
        self.name = path.name[: -len(".avsc")]
        self.versions = versions
        self.expanded = expanded(path)
        # parsed once with fastavro's hints, so reads and writes do not parse the schema again
        self.parsed = parse_schema(self.expanded)
        self.fingerprint = fingerprint_of(self.expanded)
        self.header = MAGIC + self.fingerprint
        self.tag = branch_tagger(self.parsed)

    def encode(self, record: dict[str, Any]) -> bytes:
        out = io.BytesIO()
        out.write(self.header)
        self._write(out, record)
        return out.getvalue()

    def decode(self, data: bytes) -> dict[str, Any]:
        if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) < 10:
            raise SerdeError(f"{self.name}: too short for an Avro single-object frame")
        data = bytes(data)
        if data[:2] != MAGIC:
            raise SerdeError(f"{self.name}: missing the Avro single-object marker C3 01")
        buf = io.BytesIO(data[10:])
        if data[2:10] == self.fingerprint:  # the hot path: no resolution
            record = self._read(buf, self.parsed, None)
        else:
            record = self._read(buf, self._writer(data[2:10]), self.parsed)
        if buf.tell() != len(data) - 10:
            raise SerdeError(f"{self.name}: {len(data) - 10 - buf.tell()} trailing bytes after the record")
        return record

    def encode_body(self, record: dict[str, Any]) -> bytes:
        """The Avro body alone (no frame): a record to be written inside another (``Splice``)."""
        out = io.BytesIO()
        self._write(out, record)
        return out.getvalue()

    def _write(self, out: io.BytesIO, record: dict[str, Any]) -> None:
        try:
            fastavro.schemaless_writer(out, self.parsed, self.tag(record) if self.tag else record)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise SerdeError(f"{self.name}: record does not fit the schema: {exc}") from None

    def decode_body(self, body: bytes) -> dict[str, Any]:
        """A body of this schema's current version (``encode_body``, or one ``PassingReader`` kept)."""
        buf = io.BytesIO(body)
        record = self._read(buf, self.parsed, None)
        if buf.tell() != len(body):
            raise SerdeError(f"{self.name}: {len(body) - buf.tell()} trailing bytes after the record")
        return record

    def _writer(self, fp: bytes) -> dict:
        try:
            writer = self.versions.writer(fp)
        except SerdeError as exc:
            raise SerdeError(f"{self.name}: {exc}") from None
        if writer["name"] != self.name:
            raise SerdeError(f"{self.name}: written as {writer['name']} (fingerprint {fp.hex()})")
        return writer

    def _read(self, buf: io.BytesIO, writer: dict, reader: dict | None) -> dict[str, Any]:
        try:
            return fastavro.schemaless_reader(buf, writer, reader, return_record_name=True,
                                              return_record_name_override=True)
        except SchemaResolutionError as exc:
            raise SerdeError(f"{self.name}: this version cannot read the writer's: {exc}") from None
        except Exception as exc:  # fastavro raises many types on garbage
            raise SerdeError(f"{self.name}: body does not decode: {type(exc).__name__}") from None


Tagger = Callable[[Any], Any]


def branch_tagger(parsed: dict) -> Tagger | None:
    """A function that names the branch of every union holding a record in a datum of ``parsed`` (fastavro's
    tuple notation, ``(name, value)``), or None when the schema has no such union. Without a name fastavro
    validates the whole value against each record branch before it writes it, and the records nest: that
    validation was two thirds of a final event's encoding."""
    named = parsed.get("__named_schemas", {})
    records: dict[str, Tagger | None] = {}

    def record(name: str) -> Tagger | None:
        if name not in records:
            records[name] = None  # a record that holds itself: its inner unions are left to fastavro
            found = [(f["name"], of(f["type"])) for f in named[name]["fields"]]
            fields = [(n, t) for n, t in found if t is not None]
            records[name] = _fields_tagger(fields) if fields else None
        return records[name]

    def of(schema) -> Tagger | None:
        if isinstance(schema, str):
            return record(schema) if schema in named and named[schema]["type"] == "record" else None
        if isinstance(schema, list):
            names = [b if isinstance(b, str) else b.get("name") for b in schema]
            branches = {n: record(n) for n in names if n in named and named[n]["type"] == "record"}
            if not branches:
                return None
            only = next(iter(branches)) if len(branches) == 1 else None
            return _union_tagger(branches, only)
        if schema.get("type") == "record":
            return record(schema["name"])
        if schema.get("type") == "array":
            item = of(schema["items"])
            return (lambda values: [item(v) for v in values]) if item else None
        return None

    return record(parsed["name"]) if parsed.get("type") == "record" else of(parsed)


def _fields_tagger(fields: list[tuple[str, Tagger]]) -> Tagger:
    def tag(datum):
        if not isinstance(datum, dict):
            return datum
        out = dict(datum)
        for name, t in fields:
            value = out.get(name)
            if value is not None:
                out[name] = t(value)
        return out
    return tag


def _union_tagger(branches: dict[str, Tagger | None], only: str | None) -> Tagger:
    def tag(value):
        if isinstance(value, tuple) and len(value) == 2 and value[0] in branches:
            inner = branches[value[0]]
            return (value[0], inner(value[1]) if inner else value[1])
        if isinstance(value, dict) and only is not None:
            inner = branches[only]
            return (only, inner(value) if inner else value)
        return value  # another branch (null, a string, ...), or several records: fastavro picks
    return tag


class Schemas:
    """Every schema version one process can read, by fingerprint, and one reader per record.

    The current files are read on first use of each record; history/ and the other current files
    only when a frame carries a fingerprint that is not its record's current one, so a process that
    only meets current records never pays for them. ``resolver`` is asked last, for fingerprints
    that none of those has (a newer writer's schema); what it returns is kept for good.
    """

    def __init__(self, directory: Path, resolver: Resolver | None = None):
        self.directory = directory
        self.resolver = resolver
        self._readers: dict[str, AvroSchema] = {}
        self._writers: dict[bytes, dict] = {}  # fingerprint -> parsed schema, any version
        self._scanned = False

    def reader(self, name: str) -> AvroSchema:
        found = self._readers.get(name)
        if found is None:
            full = name if "." in name else f"{NAMESPACE}.{name}"
            found = self._readers[name] = self._readers.get(full) or self._load(full)
        return found

    def _load(self, full_name: str) -> AvroSchema:
        path = self.directory / f"{full_name}.avsc"
        if not path.exists():
            raise SerdeError(f"no schema file {path}")
        loaded = self._readers[full_name] = AvroSchema(path, self)
        self._writers[loaded.fingerprint] = loaded.parsed
        return loaded

    def encode(self, name: str, record: dict[str, Any]) -> bytes:
        return self.reader(name).encode(record)

    def decode(self, name: str, data: bytes) -> dict[str, Any]:
        return self.reader(name).decode(data)

    def names(self) -> list[str]:
        return sorted(p.name[: -len(".avsc")] for p in self.directory.glob(f"{NAMESPACE}.*.avsc"))

    def current(self) -> dict[bytes, str]:
        """Every current schema, fingerprint -> self-contained JSON: what a writer publishes so
        that readers without this version can find it."""
        return {r.fingerprint: json.dumps(r.expanded) for r in map(self.reader, self.names())}

    def writer(self, fp: bytes) -> dict:
        """The parsed schema whose fingerprint is ``fp``: a known version, else the resolver's."""
        found = self._writers.get(fp)
        if found is None and not self._scanned:
            self._scan()
            found = self._writers.get(fp)
        if found is None and self.resolver is not None:
            text = self.resolver(fp)
            if text is not None:
                found = self.learn(text, fp)
        if found is None:
            raise SerdeError(f"written with a schema this process does not know (fingerprint {fp.hex()}"
                             f"{'' if self.resolver else '; no schema resolver installed'})")
        return found

    def learn(self, text: str, fp: bytes) -> dict:
        """Keep the schema ``text`` (JSON), which must be the one with fingerprint ``fp``."""
        try:
            parsed = parse_schema(json.loads(text))
        except Exception as exc:  # a broken entry must not pass for the schema that was asked
            raise SerdeError(f"the schema given for fingerprint {fp.hex()} does not parse: {exc}") from None
        got = fingerprint_of(parsed)
        if got != fp:
            raise SerdeError(f"the schema given for fingerprint {fp.hex()} has fingerprint {got.hex()}")
        self._writers[fp] = parsed
        return parsed

    def _scan(self) -> None:
        for name in self.names():
            self.reader(name)
        for path in sorted((self.directory / "history").glob("*.avsc")):
            parsed = parse_schema(json.loads(path.read_text()))
            self._writers[fingerprint_of(parsed)] = parsed
        self._scanned = True


_default: Schemas | None = None
_default_lock = threading.Lock()


def registry() -> Schemas:
    """The process's schemas, from ``schemas_dir()`` (looked up on first use)."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = Schemas(schemas_dir())
    return _default


def schema(name: str) -> AvroSchema:
    return registry().reader(name)


def set_resolver(resolver: Resolver | None) -> None:
    """Where ``decode`` looks for a writer schema no file here has (None: nowhere)."""
    registry().resolver = resolver


def current_schemas() -> dict[bytes, str]:
    return registry().current()


def is_single_object(data: bytes) -> bool:
    return len(data) >= 10 and data[:2] == MAGIC


def encode(name: str, record: dict[str, Any]) -> bytes:
    return registry().reader(name).encode(record)


def decode(name: str, data: bytes) -> dict[str, Any]:
    return registry().reader(name).decode(data)


# --- the join's input: a union of plan, result and deadline check -----------
def encode_join_event(kind: str, record: dict[str, Any]) -> bytes:
    return encode("JoinEvent", {"workflowId": record["workflowId"], "body": (f"{NAMESPACE}.{kind}", record)})


def decode_join_event(data: bytes) -> tuple[str, dict[str, Any]]:
    event = decode("JoinEvent", data)
    name, body = event["body"]
    return name.rsplit(".", 1)[-1], body


def decode_request_bytes(data: bytes) -> Any:
    """A request value: Avro single-object (ImageRequest) or the seed's JSON document (UTF-8)."""
    if is_single_object(data):
        return decode("ImageRequest", data)
    try:
        text = data.decode("utf-8-sig")  # a leading BOM, as some editors write, is not an error
    except UnicodeDecodeError:
        raise SerdeError("value is neither UTF-8 JSON nor an Avro single-object ImageRequest") from None
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise SerdeError(f"value is not valid JSON: {exc}") from None
