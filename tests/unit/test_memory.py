"""Peak memory of the resize path (``prepare_source`` once per request, then ``resize_image`` per output, as
``streams/agents/resize_job.py`` runs them) on a 50-megapixel JPEG, 3 requests x 9 outputs, measured in a
fresh process against its own baseline, taken before it reads the source (another process builds it, so
building it is not in the peak). docs/performance.md's table states both cases:

- a full decode (any non-JPEG source, or a JPEG without a box): Pillow holds RGB at 4 bytes a pixel
  (a 192 MiB frame) and EXIF orientation returns a copy, so two frames at the peak;
- the JPEG decoded at the scale the largest box (1200x1200) needs, as the resize worker does.

Each case also stays flat across requests. The decode cache and the memory budget are measured in
tests/unit/test_memory_budget.py."""
import json
import subprocess
import sys
import textwrap

import pytest

W, H = 8192, 6144  # 50.3 megapixels
FRAME_MIB = W * H * 4 / 2**20  # one decoded RGB frame as Pillow holds it (RGBX)

MAKE_SOURCE = textwrap.dedent(f"""
    import sys
    from PIL import Image
    g = Image.linear_gradient("L").resize(({W}, {H}))
    Image.merge("RGB", (g, g.transpose(Image.Transpose.ROTATE_180), g)).save(sys.argv[1], "JPEG", quality=80)
""")

MEASURE = textwrap.dedent("""
    import json, resource, sys
    from streams.config import Encoding, Limits
    from streams.core.imaging import OutputSpec, prepare_source, resize_image

    def peak_mib():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    before = peak_mib()  # the interpreter and the libraries; nothing of the source yet
    data = open(sys.argv[1], "rb").read()
    box = int(sys.argv[2])
    peaks = []
    for _ in range(3):  # three requests' worth of outputs from the same source
        im = prepare_source(data, Limits(), max_box=(box, box))
        for fmt in ("png", "jpg", "webp"):
            for size in (300, 200, 1200):
                out = resize_image(im, OutputSpec(fmt, size, size, True), Limits(), Encoding())
                assert max(out.width, out.height) == size
        del im
        peaks.append(peak_mib())
    print(json.dumps({"before": before, "peaks": peaks}))
""")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = tmp_path_factory.mktemp("memory") / "50mp.jpg"
    subprocess.run([sys.executable, "-c", MAKE_SOURCE, str(path)], check=True, timeout=300)
    return path


def measure(source, box: int) -> dict:
    out = subprocess.run([sys.executable, "-c", MEASURE, str(source), str(box)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["growth"] = r["peaks"][-1] - r["before"]
    return r


def test_a_full_decode_peaks_at_two_frames_over_the_process(source):
    r = measure(source, 0)
    # docs/performance.md: +390 MiB (two 192 MiB frames); a third copy anywhere on the path would add 192 MiB more
    assert r["growth"] < 2 * FRAME_MIB + 32, r
    assert r["peaks"][-1] - r["peaks"][0] < 16, r  # and it does not grow with more requests


def test_a_jpeg_decoded_at_the_box_scale_peaks_far_lower(source):
    r = measure(source, 1200)
    # docs/performance.md: +31 MiB (a 2048x1536 decode); a full decode would be some 390
    assert r["growth"] < 64, r
    assert r["peaks"][-1] - r["peaks"][0] < 16, r
