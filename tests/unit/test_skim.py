"""streams/skim.py: a checker reads a record's body as fastavro does (where it ends, which strings it holds)
without building it, and refuses every body fastavro would refuse; the join passes outputs on its word."""
import io
import random

import fastavro
import pytest
from fastavro.schema import parse_schema
from hypothesis import given, settings, strategies as st

from streams import serde
from streams.serde import SerdeError
from streams.skim import checker
from tests.unit.test_segments import SHARP
from tests.unit.test_serde import OUT

EVERY = {"type": "record", "name": "t.Every", "fields": [
    {"name": "s", "type": "string"},
    {"name": "b", "type": "bytes"},
    {"name": "i", "type": "int"},
    {"name": "l", "type": "long"},
    {"name": "f", "type": "float"},
    {"name": "d", "type": "double"},
    {"name": "flag", "type": "boolean"},
    {"name": "e", "type": {"type": "enum", "name": "t.Kind", "symbols": ["A", "B", "C"]}},
    {"name": "x", "type": {"type": "fixed", "name": "t.Six", "size": 6}},
    {"name": "when", "type": {"type": "long", "logicalType": "timestamp-millis"}},
    {"name": "u", "type": ["null", "string", "int", {"type": "record", "name": "t.Inner", "fields": [
        {"name": "tags", "type": {"type": "array", "items": "string"}},
        {"name": "m", "type": {"type": "map", "values": ["null", "t.Kind"]}}]}]},
    {"name": "nested", "type": {"type": "array", "items": {"type": "array", "items": "t.Inner"}}},
    {"name": "again", "type": ["null", "t.Inner"]},
    {"name": "last", "type": "string"},
]}
TEXT = st.text(max_size=12)
INNER = st.fixed_dictionaries({"tags": st.lists(TEXT, max_size=3),
                               "m": st.dictionaries(TEXT, st.sampled_from([None, "A", "C"]), max_size=3)})
RECORD = st.fixed_dictionaries({
    "s": TEXT, "b": st.binary(max_size=10), "i": st.integers(-2 ** 31, 2 ** 31 - 1),
    "l": st.integers(-2 ** 63, 2 ** 63 - 1), "f": st.floats(width=32, allow_nan=False), "d": st.floats(allow_nan=False),
    "flag": st.booleans(), "e": st.sampled_from(["A", "B", "C"]), "x": st.binary(min_size=6, max_size=6),
    "when": st.integers(0, 2 ** 40), "u": st.one_of(st.none(), TEXT, st.integers(-2 ** 31, 2 ** 31 - 1), INNER),
    "nested": st.lists(st.lists(INNER, max_size=2), max_size=2), "again": st.one_of(st.none(), INNER), "last": TEXT})


def parsed(schema: dict) -> tuple[dict, dict]:
    named: dict = {}
    return parse_schema(schema, named_schemas=named), named


def body_of(schema: dict, record: dict) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, parse_schema(schema), record)
    return buf.getvalue()


def fastavro_end(schema: dict, data: bytes, at: int) -> int:
    buf = io.BytesIO(data)
    buf.seek(at)
    fastavro.schemaless_reader(buf, parse_schema(schema), None)
    return buf.tell()


@settings(max_examples=300, deadline=None)
@given(RECORD, st.binary(max_size=4))
def test_every_type_is_read_to_its_end_as_fastavro_reads_it(record, before):
    full, named = parsed(EVERY)
    check = checker(full, named, keep=("s", "last"))
    data = before + body_of(EVERY, record) + b"tail"
    end, kept = check(data, len(before))
    assert end == fastavro_end(EVERY, data, len(before)) == len(data) - 4
    assert kept == {"s": record["s"], "last": record["last"]}


@pytest.mark.parametrize("output", [OUT, SHARP], ids=["options", "sharpen"])
def test_a_task_output_is_read_to_its_end_with_the_fields_the_join_keeps(output):
    full, named = parsed(serde.schema("TaskOutput").expanded)
    body = serde.schema("TaskOutput").encode_body(output.to_dict())
    assert checker(full, named, ("taskRef", "url", "s3Uri"))(body, 0) == (
        len(body), {"taskRef": output.taskRef, "url": output.url, "s3Uri": output.s3Uri})


@pytest.mark.parametrize("seed", range(3))
def test_what_the_checker_takes_fastavro_reads_to_the_same_end(seed):
    # bytes flipped at random in a real output: the checker may refuse more than fastavro (a boolean byte of
    # 2, an int past 32 bits) but never takes a body that fastavro cannot read, or reads to another end
    full, named = parsed(serde.schema("TaskOutput").expanded)
    check = checker(full, named)
    schema = serde.schema("TaskOutput").expanded
    body = serde.schema("TaskOutput").encode_body(SHARP.to_dict())
    rng, taken = random.Random(seed), 0
    for _ in range(2000):
        data = bytearray(body)
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        data = bytes(data)
        try:
            end, _ = check(data, 0)
        except SerdeError:
            continue
        taken += 1
        assert fastavro_end(schema, data, 0) == end
    assert taken > 100  # most flips land in a string's bytes or a number, which still read


@pytest.mark.parametrize("broken", ["utf8", "branch", "int", "boolean", "enum", "cut", "length"])
def test_a_body_that_does_not_fit_is_refused(broken):
    full, named = parsed(EVERY)
    record = {"s": "ok", "b": b"", "i": 1, "l": 2, "f": 0.5, "d": 0.25, "flag": True, "e": "B", "x": b"abcdef",
              "when": 5, "u": "héllo", "nested": [], "again": None, "last": "z"}
    data = bytearray(body_of(EVERY, record))
    at_u = data.index("héllo".encode()) - 2  # the union's branch, then the string's length
    if broken == "utf8":
        data[at_u + 3] = 0xFF
    elif broken == "branch":
        data[at_u] = 2 * 4  # branch 4 of a 4-branch union
    elif broken == "int":
        at = 4  # "ok" is 3 bytes, b"" 1: the int's varint, made 2 ** 40
        data[at:at + 1] = bytes([0x80, 0x80, 0x80, 0x80, 0x80, 0x20])
    elif broken == "boolean":
        data[data.index(bytes([1]) + b"\x02" + b"abcdef") - 0] = 2
    elif broken == "enum":
        data[data.index(b"abcdef") - 1] = 2 * 3
    elif broken == "cut":
        data = data[:-1]
    else:
        data[0] = 0x7F  # the first string's length, past the end
    with pytest.raises(SerdeError):
        checker(full, named)(bytes(data), 0)
