"""Avro over schemas/*.avsc, framed with the Avro single-object encoding.

Frame: ``C3 01`` + the 8-byte little-endian CRC-64-AVRO (Rabin) fingerprint of
the schema's parsing canonical form + the Avro binary body. Any consumer that
holds the .avsc files can decode it without a registry.
"""
from __future__ import annotations

import io
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import fastavro
from fastavro.schema import fingerprint, load_schema, to_parsing_canonical_form

MAGIC = b"\xc3\x01"
NAMESPACE = "io.imagefork"


class SerdeError(ValueError):
    """Bytes that are not what the schema says; the message says why."""


def schemas_dir() -> Path:
    env = os.environ.get("IMAGEFORK_SCHEMAS_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "schemas"


class AvroSchema:
    def __init__(self, name: str):
        self.name = name if "." in name else f"{NAMESPACE}.{name}"
        path = schemas_dir() / f"{self.name}.avsc"
        if not path.exists():
            raise SerdeError(f"no schema file {path}")
        self.parsed = load_schema(str(path), _write_hint=False)
        self.canonical = to_parsing_canonical_form(self.parsed)
        # fastavro spells the Rabin fingerprint as the hex of its little-endian bytes already
        self.fingerprint = bytes.fromhex(fingerprint(self.canonical, "CRC-64-AVRO"))
        self.header = MAGIC + self.fingerprint

    def encode(self, record: dict[str, Any]) -> bytes:
        out = io.BytesIO()
        out.write(self.header)
        try:
            fastavro.schemaless_writer(out, self.parsed, record)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise SerdeError(f"{self.name}: record does not fit the schema: {exc}") from None
        return out.getvalue()

    def decode(self, data: bytes) -> dict[str, Any]:
        if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) < 10:
            raise SerdeError(f"{self.name}: too short for an Avro single-object frame")
        data = bytes(data)
        if data[:2] != MAGIC:
            raise SerdeError(f"{self.name}: missing the Avro single-object marker C3 01")
        if data[2:10] != self.fingerprint:
            raise SerdeError(f"{self.name}: written with another schema (fingerprint {data[2:10].hex()})")
        buf = io.BytesIO(data[10:])
        try:
            record = fastavro.schemaless_reader(buf, self.parsed, return_record_name=True,
                                                return_record_name_override=True)
        except Exception as exc:  # fastavro raises many types on garbage
            raise SerdeError(f"{self.name}: body does not decode: {type(exc).__name__}") from None
        if buf.tell() != len(data) - 10:
            raise SerdeError(f"{self.name}: {len(data) - 10 - buf.tell()} trailing bytes after the record")
        return record


@lru_cache(maxsize=None)
def schema(name: str) -> AvroSchema:
    return AvroSchema(name)


def is_single_object(data: bytes) -> bool:
    return len(data) >= 10 and data[:2] == MAGIC


def encode(name: str, record: dict[str, Any]) -> bytes:
    return schema(name).encode(record)


def decode(name: str, data: bytes) -> dict[str, Any]:
    return schema(name).decode(data)


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
