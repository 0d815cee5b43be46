"""A resize worker's peak memory stays bounded with a 50-megapixel source (measured in a fresh process)."""
import json
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import io, json, resource
    from PIL import Image
    from streams.config import Encoding, Limits
    from streams.core.imaging import OutputSpec, prepare_source, resize_image

    def peak_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    w, h = 8192, 6144  # 50.3 megapixels
    g = Image.linear_gradient("L").resize((w, h))
    src = Image.merge("RGB", (g, g.transpose(Image.Transpose.ROTATE_180), g))
    buf = io.BytesIO(); src.save(buf, "JPEG", quality=80); data = buf.getvalue()
    del src, g
    before = peak_mb()
    peaks = []
    for _ in range(3):  # three requests' worth of outputs from the same source
        im = prepare_source(data, Limits())
        for fmt in ("png", "jpg", "webp"):
            for size in (300, 200, 1200):
                out = resize_image(im, OutputSpec(fmt, size, size, True), Limits(), Encoding())
                assert max(out.width, out.height) == size
        del im
        peaks.append(peak_mb())
    print(json.dumps({"before": before, "peaks": peaks, "source_mb": w * h * 3 / 2**20}))
""")


def test_fifty_megapixel_source_peak_memory_is_bounded():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    # one decoded RGB source is 144 MiB; a resize holds at most a couple of working copies
    assert r["peaks"][-1] < r["before"] + 3.5 * r["source_mb"], r
    # and it does not grow with more work
    assert r["peaks"][-1] - r["peaks"][0] < 0.25 * r["source_mb"], r
