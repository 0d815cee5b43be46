"""Corrupted files through the decoder path: every outcome is an image or a PipelineError."""
import random

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from streams.config import Encoding, Limits
from streams.core.errors import PipelineError
from streams.core.imaging import OutputSpec, resize_image
from tests.unit.images import encode, photo

LIM = Limits(max_pixels=4_000_000)
SOURCES = {fmt: encode(photo((120, 90)), fmt) for fmt in ("PNG", "JPEG", "WEBP", "GIF", "TIFF", "BMP")}


def corrupt(data: bytes, rng: random.Random) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randint(1, 12)):
        op = rng.random()
        pos = rng.randrange(len(data))
        if op < 0.5:
            data[pos] = rng.randrange(256)
        elif op < 0.7:
            del data[pos:pos + rng.randint(1, 64)]
        elif op < 0.9:
            data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        else:
            data = data[:pos]
        if not data:
            break
    return bytes(data)


@pytest.mark.parametrize("fmt", sorted(SOURCES))
def test_corrupted_files_never_crash(fmt):
    rng = random.Random(f"fuzz-{fmt}")
    outcomes = {"ok": 0, "error": 0}
    for _ in range(150):
        data = corrupt(SOURCES[fmt], rng)
        try:
            out = resize_image(data, OutputSpec(rng.choice(["png", "jpg", "webp"]), 32, 32), LIM, Encoding())
            assert out.width <= 32 and out.height <= 32
            outcomes["ok"] += 1
        except PipelineError:
            outcomes["error"] += 1
    assert outcomes["ok"] + outcomes["error"] == 150


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_random_bytes_never_crash(data):
    try:
        resize_image(data, OutputSpec("png", 16, 16), LIM, Encoding())
    except PipelineError:
        pass
