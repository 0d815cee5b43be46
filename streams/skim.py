"""A record's Avro body checked and measured without building it: where it ends, and a few of its strings.

The join passes each task output into the final event as the bytes its resize worker wrote
(``segments``). It must still know where the output ends and that every string in it is UTF-8 (a final
event holding a bad one could be read by no one), but it uses only three of the output's fields:
fastavro's reader builds the whole record (some 30 values and a nested record) to throw most of it away,
15-20 µs a result. ``checker`` turns a parsed schema into straight-line Python that reads the same bytes in
about 7 µs (``tests/unit/test_skim.py`` holds it to fastavro's reading of the same bytes).
"""
from __future__ import annotations

from typing import Any, Callable

from streams.serde import SerdeError

Checker = Callable[[bytes, int], tuple[int, dict[str, str]]]
INT_MIN, INT_MAX = -(1 << 31), (1 << 31) - 1
PRIMITIVES = ("null", "boolean", "int", "long", "float", "double", "bytes", "string")


def read_long(data: bytes, pos: int) -> tuple[int, int]:
    """Avro's zig-zag varint at ``pos``: (its value, the position after it)."""
    n = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise SerdeError("truncated varint")
        b = data[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return (n >> 1) ^ -(n & 1), pos


class _Writer:
    """The checker's source, a line at a time; each loop gets variables of its own."""

    def __init__(self, named: dict[str, Any], keep: tuple[str, ...]):
        self.named, self.keep = named, keep
        self.lines = ["def check(data, pos):", "    size = len(data)", "    kept = {}", "    try:"]
        self.loops = 0

    def line(self, depth: int, text: str) -> None:
        self.lines.append("    " * depth + text)

    def varint(self, depth: int, kind: str) -> None:
        self.line(depth, "b = data[pos]")
        self.line(depth, "if b < 0x80: n = (b >> 1) ^ -(b & 1); pos += 1")
        self.line(depth, "else:")
        self.line(depth + 1, "n, pos = read_long(data, pos)")
        if kind == "int":
            self.line(depth + 1, "if not INT_MIN <= n <= INT_MAX: raise SerdeError('an int out of range')")

    def sized(self, depth: int, kind: str, keep_as: str | None = None) -> None:
        self.varint(depth, "long")
        self.line(depth, "end = pos + n")
        self.line(depth, f"if n < 0 or end > size: raise SerdeError('a {kind} runs past the record')")
        if kind == "string":  # decoding is the check; the value itself only where it is kept
            self.line(depth, f"kept[{keep_as!r}] = data[pos:end].decode()" if keep_as else "data[pos:end].decode()")
        self.line(depth, "pos = end")

    def type(self, t: Any, depth: int, keep_as: str | None = None) -> None:
        if isinstance(t, str) and t in self.named:
            t = self.named[t]
        if isinstance(t, dict) and t.get("type") in PRIMITIVES:  # a primitive written long hand, or logical
            t = t["type"]
        if isinstance(t, list):
            return self.union(t, depth)
        kind = t if isinstance(t, str) else t.get("type")
        if kind == "null":
            return
        if kind in ("int", "long"):
            return self.varint(depth, kind)
        if kind in ("string", "bytes"):
            return self.sized(depth, kind, keep_as)
        if kind == "boolean":
            self.line(depth, "if data[pos] > 1: raise SerdeError('not a boolean')")
            return self.line(depth, "pos += 1")
        if kind in ("float", "double", "fixed"):
            width = {"float": 4, "double": 8}.get(kind) or t["size"]
            self.line(depth, f"pos += {width}")
            return self.line(depth, "if pos > size: raise SerdeError('a value runs past the record')")
        if kind == "enum":
            self.varint(depth, "int")
            return self.line(depth, f"if not 0 <= n < {len(t['symbols'])}: raise SerdeError('no such symbol')")
        if kind in ("record", "error"):
            for field in t["fields"]:
                self.type(field["type"], depth, field["name"] if depth == 2 and field["name"] in self.keep else None)
            return
        if kind in ("array", "map"):
            return self.blocks(t, depth)
        raise SerdeError(f"no checker for the Avro type {t!r}")

    def union(self, branches: list, depth: int) -> None:
        self.varint(depth, "int")
        for i, branch in enumerate(branches):
            self.line(depth, f"{'if' if i == 0 else 'elif'} n == {i}:")
            before = len(self.lines)
            self.type(branch, depth + 1)
            if len(self.lines) == before:
                self.line(depth + 1, "pass")
        self.line(depth, "else: raise SerdeError('no such union branch')")

    def blocks(self, t: dict, depth: int) -> None:
        """An array's or a map's blocks: a count (negative: a byte size follows), its items, until a count of 0."""
        self.loops += 1
        count = f"count{self.loops}"
        self.line(depth, "while True:")
        self.varint(depth + 1, "long")
        self.line(depth + 1, "if n == 0: break")
        self.line(depth + 1, "if n < 0:")
        self.line(depth + 2, "n = -n")
        self.varint(depth + 2, "long")
        self.line(depth + 1, f"{count} = n")
        self.line(depth + 1, f"for _ in range({count}):")
        if t["type"] == "map":
            self.sized(depth + 2, "string")
        before = len(self.lines)
        self.type(t["items"] if t["type"] == "array" else t["values"], depth + 2)
        if len(self.lines) == before:
            self.line(depth + 2, "pass")


def checker(schema: dict[str, Any], named: dict[str, Any], keep: tuple[str, ...] = ()) -> Checker:
    """``check(data, pos) -> (end, kept)`` for a record of ``schema`` (parsed, its named types in ``named``)
    whose body starts at ``pos``: every string decoded as UTF-8, every union branch, enum symbol, boolean
    and int checked, nothing built but ``kept``, the record's own string fields named in ``keep``. A body
    that does not fit raises ``SerdeError``."""
    writer = _Writer(named, keep)
    writer.type(schema, 2)
    writer.line(2, "return pos, kept")
    writer.line(1, "except IndexError: raise SerdeError('the record is cut short') from None")
    writer.line(1, "except UnicodeDecodeError as exc: raise SerdeError(f'a string that is not UTF-8: {exc}') from None")
    space = {"read_long": read_long, "SerdeError": SerdeError, "INT_MIN": INT_MIN, "INT_MAX": INT_MAX}
    exec(compile("\n".join(writer.lines), f"<checker of {schema.get('name', 'a record')}>", "exec"), space)
    return space["check"]
