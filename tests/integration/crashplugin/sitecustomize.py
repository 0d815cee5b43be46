"""Test-only: a Pillow plugin whose decoder aborts the process, as a crashing codec would.

A worker started with this folder on PYTHONPATH reads files that begin with ``CRASHME`` as 64x64 RGB
images (so the planner's header probe accepts them) and dies with SIGABRT when it decodes the pixels.
"""
import os

from PIL import Image, ImageFile

MAGIC = b"CRASHME\n"


class CrashImageFile(ImageFile.ImageFile):
    format = "CRASHME"
    format_description = "test-only image that aborts the process when decoded"

    def _open(self):
        if self.fp.read(len(MAGIC)) != MAGIC:
            raise SyntaxError("not a CRASHME file")
        self._mode = "RGB"
        self._size = (64, 64)
        self.tile = []

    def load(self):
        os.abort()


Image.register_open(CrashImageFile.format, CrashImageFile, lambda prefix: prefix[:len(MAGIC)] == MAGIC)
Image.register_extension(CrashImageFile.format, ".crashme")

# imagefork opens only the formats it reads (streams.core.imaging.INPUT_FORMATS): this one too, here
from streams.core import imaging  # noqa: E402

imaging.INPUT_FORMATS = (*imaging.INPUT_FORMATS, CrashImageFile.format)
