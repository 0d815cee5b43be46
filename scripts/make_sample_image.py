"""Rebuild streams/assets/sample.png, the demo's source image.

The picture is the Hubble Deep Field (NASA/ESA, public domain) as shipped by
scikit-image in ``skimage/data/hubble_deep_field.jpg`` (1000x872 JPEG). We take
the centred 872x872 square and scale it to 900x900 with Lanczos, like the seed
article's 900x900 PNG. scikit-image is only needed to run this script, never
at run time: ``pip install scikit-image && python scripts/make_sample_image.py``.
"""
from pathlib import Path

from PIL import Image

import skimage

src = Path(skimage.__file__).parent / "data" / "hubble_deep_field.jpg"
out = Path(__file__).resolve().parent.parent / "streams" / "assets" / "sample.png"
with Image.open(src) as im:
    side = min(im.size)
    left = (im.width - side) // 2
    top = (im.height - side) // 2
    square = im.convert("RGB").crop((left, top, left + side, top + side))
    square.resize((900, 900), Image.Resampling.LANCZOS).save(out, optimize=True)
print(out)
