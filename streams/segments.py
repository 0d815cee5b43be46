"""One nested record passed through as its bytes.

The join reads each task result and writes its output into the final event unchanged: decoding the output
record into objects and encoding it again was a third of the join's CPU. A record's Avro body is its
fields' bodies one after the other, so a record can be read and written in segments around one field,
which stays the bytes its writer wrote. Only a frame of the current schema is read so; any other is
decoded whole (``serde``).
"""
from __future__ import annotations

import io
from typing import Any

import fastavro
from fastavro.schema import parse_schema

from streams import serde
from streams.serde import NAMESPACE, AvroSchema, SerdeError, branch_tagger
from streams.skim import checker, read_long

READ_OPTIONS = {"return_record_name": True, "return_record_name_override": True}
PRIMITIVES = {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}


# The join reads each task result and writes its output into the final event unchanged: decoding the
# output record into objects and encoding it again was a third of the join's CPU. A record's Avro
# body is its fields' bodies one after the other, so the record can be read and written in segments
# around that field, which stays the bytes its writer wrote.


def _referenced(t: Any) -> Any:
    """A field type with every named type it defines inline replaced by its name."""
    if isinstance(t, list):
        return [_referenced(b) for b in t]
    if isinstance(t, dict):
        kind = t.get("type")
        if kind in ("record", "error", "enum", "fixed"):
            return t["name"]
        if kind == "array":
            return {**t, "items": _referenced(t["items"])}
        if kind == "map":
            return {**t, "values": _referenced(t["values"])}
    return t


def _segment(name: str, fields: list[dict], named: dict) -> dict:
    """``fields`` (of a parsed schema whose named types are ``named``) as a record schema of their own."""
    return parse_schema({"type": "record", "name": name,
                         "fields": [{"name": f["name"], "type": _referenced(f["type"])} for f in fields]},
                        named_schemas=dict(named))


def _long(n: int) -> bytes:
    """Avro's zig-zag varint of ``n`` (an array's block count, a union's branch)."""
    n = (n << 1) ^ (n >> 63)
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _options(segment: dict) -> dict:
    """fastavro's reading options for ``segment``: serde's names for a union of two or more named types."""
    def named_union(t: Any) -> bool:
        if isinstance(t, list):
            return sum(1 for b in t if isinstance(b, dict) or b not in PRIMITIVES) > 1 or any(map(named_union, t))
        if isinstance(t, dict):
            inner = [f["type"] for f in t.get("fields", ())] + [t[k] for k in ("items", "values") if k in t]
            return any(map(named_union, inner))
        return False
    return READ_OPTIONS if named_union(segment) else {}


class Splice:
    """Writes a record of ``schema`` whose array field ``field`` is given as its items' bodies, already
    encoded in the current schema of the items' record (``AvroSchema.encode_body``, or bodies a
    ``PassingReader`` kept): the same bytes as encoding the whole record."""

    def __init__(self, schema: AvroSchema, field: str):
        named: dict = {}
        full = parse_schema(schema.expanded, named_schemas=named)
        fields = full["fields"]
        i = [f["name"] for f in fields].index(field)
        self.name, self.header = schema.name, schema.header
        self.before = _segment(f"{schema.name}Before", fields[:i], named)
        self.after = _segment(f"{schema.name}After", fields[i + 1:], named)
        self.tag_before, self.tag_after = branch_tagger(self.before), branch_tagger(self.after)

    def encode(self, record: dict[str, Any], items: list[bytes]) -> bytes:
        out = io.BytesIO()
        out.write(self.header)
        try:
            fastavro.schemaless_writer(out, self.before, self.tag_before(record) if self.tag_before else record)
            if items:
                out.write(_long(len(items)))
                out.write(b"".join(items))
            out.write(b"\x00")
            fastavro.schemaless_writer(out, self.after, self.tag_after(record) if self.tag_after else record)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise SerdeError(f"{self.name}: record does not fit the schema: {exc}") from None
        return out.getvalue()


class PassingReader:
    """Reads a JoinEvent frame of the current version holding a TaskResult, with the result's output
    checked (every string in it is UTF-8, as a reader of the final event needs: ``skim.checker``) and kept
    as its body; of the output only the fields the join uses are read out. (A reader schema of those three
    fields would skip the rest without checking its strings: a final event no reader can decode could be
    written.)"""

    def __init__(self, event: AvroSchema):
        named: dict = {}
        full = parse_schema(event.expanded, named_schemas=named)
        self.header = event.header
        branches = [_referenced(b) for b in full["fields"][-1]["type"]]
        if [f["name"] for f in full["fields"]] != ["workflowId", "body"]:
            raise SerdeError("JoinEvent: not the layout PassingReader reads")
        self.branch = branches.index(f"{NAMESPACE}.TaskResult")
        result = named[f"{NAMESPACE}.TaskResult"]["fields"]
        i = [f["name"] for f in result].index("output")
        union = _referenced(result[i]["type"])
        self.null, self.present = union.index("null"), union.index(f"{NAMESPACE}.TaskOutput")
        self.head = _segment("ResultHead", [*result[:i], {"name": "_output", "type": "long"}], named)
        self.tail = _segment("ResultTail", result[i + 1:], named)
        self.output = checker(named[f"{NAMESPACE}.TaskOutput"], named, keep=("taskRef", "url", "s3Uri"))
        # record names matter only in a union of two or more named types (none in a result today)
        self.head_options, self.tail_options = _options(self.head), _options(self.tail)

    def read(self, data: bytes) -> tuple[dict[str, Any], bytes | None] | None:
        """(the TaskResult, its output's body or None); None: not a current result frame."""
        if data[:10] != self.header:
            return None
        size, pos = read_long(data, 10)  # the event's workflowId
        if size < 0:
            return None
        branch, pos = read_long(data, pos + size)
        if branch != self.branch:
            return None
        buf = io.BytesIO(data)
        buf.seek(pos)
        record = fastavro.schemaless_reader(buf, self.head, None, **self.head_options)
        present = record.pop("_output")
        body = None
        if present == self.present:
            start = buf.tell()
            end, record["output"] = self.output(data, start)
            body = data[start:end]
            buf.seek(end)
        elif present == self.null:
            record["output"] = None
        else:
            return None
        record.update(fastavro.schemaless_reader(buf, self.tail, None, **self.tail_options))
        return (record, body) if buf.tell() == len(data) else None


_splices: dict[tuple[AvroSchema, str], Splice] = {}
_readers: dict[AvroSchema, PassingReader] = {}


def _splice(schema: AvroSchema, field: str) -> Splice:
    found = _splices.get((schema, field))
    if found is None:
        found = _splices[(schema, field)] = Splice(schema, field)
    return found


def _passing(schema: AvroSchema) -> PassingReader:
    found = _readers.get(schema)
    if found is None:
        found = _readers[schema] = PassingReader(schema)
    return found


def decode_join_event_passing(data: bytes) -> tuple[str, dict[str, Any], bytes | None]:
    """``decode_join_event`` plus, for a task result of the current version, its output's body to pass on
    as it came (``PassingReader``; the output in the record is a plain dict, not made a TaskOutput)."""
    try:
        found = _passing(serde.schema("JoinEvent")).read(bytes(data))
    except Exception:  # fastavro raises many types on garbage: decoded whole below, which says why
        found = None
    if found is not None:
        return "TaskResult", *found
    return *serde.decode_join_event(data), None


def encode_spliced(name: str, record: dict[str, Any], field: str, items: list[bytes]) -> bytes:
    """``record`` with its array ``field`` written from its items' bodies (``Splice``)."""
    return _splice(serde.schema(name), field).encode(record, items)
