"""Corrupted files through the decoder path: every outcome is a real image of the requested format, or a
permanent decoder error (IMAGE_UNDECODABLE, IMAGE_TOO_LARGE); nothing else escapes."""
import io
import random
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

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


# what a damaged file may end in: never retried (it stays damaged), never INTERNAL (a bug)
DAMAGED = {"IMAGE_UNDECODABLE", "IMAGE_TOO_LARGE"}
PIL_FORMAT = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}


def check_output(out, fmt: str) -> None:
    """An output made from a damaged file is still a real image of the requested format, in the box."""
    assert out.width <= 32 and out.height <= 32
    im = Image.open(io.BytesIO(out.data))
    im.load()
    assert (im.format, im.size) == (PIL_FORMAT[fmt], (out.width, out.height))


def check_error(exc: PipelineError) -> None:
    assert exc.code in DAMAGED and not exc.transient, exc


@pytest.mark.parametrize("fmt", sorted(SOURCES))
def test_corrupted_files_never_crash(fmt):
    rng = random.Random(f"fuzz-{fmt}")
    outcomes = Counter()
    for _ in range(150):
        data = corrupt(SOURCES[fmt], rng)
        target = rng.choice(["png", "jpg", "webp"])
        try:
            out = resize_image(data, OutputSpec(target, 32, 32), LIM, Encoding())
        except PipelineError as exc:
            check_error(exc)
            outcomes[exc.code] += 1
        else:
            check_output(out, target)
            outcomes["ok"] += 1
    # the damage reaches the decoder (for every format, most files end IMAGE_UNDECODABLE)
    assert outcomes["IMAGE_UNDECODABLE"] > 0, outcomes


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_random_bytes_never_crash(data):
    try:
        out = resize_image(data, OutputSpec("png", 16, 16), LIM, Encoding())
    except PipelineError as exc:
        check_error(exc)
    else:
        assert out.width <= 16 and out.height <= 16
