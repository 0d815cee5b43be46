"""Test-only: a Pillow plugin whose decoder misbehaves as a hostile codec would, chosen by the file's content.

A worker started with this folder on PYTHONPATH reads files that begin with ``CRASHME`` as 64x64 RGB
images (so the planner's header probe accepts them) and, when it decodes the pixels:

- ``CRASHME\\n`` then anything else: dies with SIGABRT (a crashing codec);
- ``CRASHME\\nHANG\\n``: never returns (a codec stuck in a loop);
- ``CRASHME\\nALLOC <MiB>\\n``: asks for that many MiB at once (a codec believing a hostile header), then, if it
  got them, gives a plain grey image. The memory is calloc'd and never touched: a process without an
  address-space limit gets it without using it, one under a smaller limit gets MemoryError.
"""
import os
import time

from PIL import Image, ImageFile

MAGIC = b"CRASHME\n"


class CrashImageFile(ImageFile.ImageFile):
    format = "CRASHME"
    format_description = "test-only image that aborts, hangs or over-allocates when decoded"

    def _open(self):
        if self.fp.read(len(MAGIC)) != MAGIC:
            raise SyntaxError("not a CRASHME file")
        self._mode = "RGB"
        self._size = (64, 64)
        self.tile = []
        self._action = self.fp.read(32).split(b"\n", 1)[0].split()

    def load(self):
        if self._action[:1] == [b"HANG"]:
            while True:
                time.sleep(60)
        if self._action[:1] == [b"ALLOC"]:
            claimed = bytes(int(self._action[1]) << 20)  # MemoryError under a smaller RLIMIT_AS
            del claimed
            self.im = Image.core.fill(self.mode, self.size, (128, 128, 128))
            return Image.Image.load(self)
        os.abort()


Image.register_open(CrashImageFile.format, CrashImageFile, lambda prefix: prefix[:len(MAGIC)] == MAGIC)
Image.register_extension(CrashImageFile.format, ".crashme")

# imagefork opens only the formats it reads (streams.core.formats.INPUT_FORMATS): this one too, here
from streams.core import formats  # noqa: E402

formats.INPUT_FORMATS = (*formats.INPUT_FORMATS, CrashImageFile.format)
