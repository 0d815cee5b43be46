"""The CPU side of a resize task, run in a pool (one per core): read the staged
source (decoded once per process, small LRU), resize and encode (core), upload.

Returns a plain dict so it crosses a process boundary cheaply:
``{"ok": True, "output": {...}}`` or ``{"ok": False, "code", "message", "transient"}``.
"""
from __future__ import annotations

import gc
import threading
from collections import OrderedDict
from typing import Any

from PIL import Image

from streams.adapters.objectstore import ObjectStore
from streams.config import Config
from streams.core.errors import ImageTooLarge, PipelineError
from streams.core.imaging import OutputSpec, prepare_source, resize_image

_config: Config | None = None
_store: ObjectStore | None = None
_lock = threading.Lock()


class SourceCache:
    """Decoded sources keyed by their staged URI, bounded by total pixels."""

    def __init__(self, max_pixels: int):
        self.max_pixels = max_pixels
        self._items: OrderedDict[str, Image.Image] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> Image.Image | None:
        with self._lock:
            im = self._items.get(key)
            if im is not None:
                self._items.move_to_end(key)
            return im

    def put(self, key: str, im: Image.Image) -> None:
        with self._lock:
            self._items[key] = im
            self._items.move_to_end(key)
            while len(self._items) > 1 and sum(i.width * i.height for i in self._items.values()) > self.max_pixels:
                self._items.popitem(last=False)


_cache: SourceCache | None = None


def init(config: Config) -> None:
    global _config, _store, _cache
    _config = config
    _store = ObjectStore(config)
    _cache = SourceCache(max(config.limits.max_pixels, 1))


_loading: dict[str, threading.Lock] = {}


def _source(uri: str, max_box: tuple[int, int]) -> Image.Image:
    """The decoded source, fetched and decoded once per process even when threads ask at once."""
    key = f"{uri}#{max_box[0]}x{max_box[1]}"
    im = _cache.get(key)
    if im is not None:
        return im
    with _lock:
        loading = _loading.setdefault(key, threading.Lock())
    with loading:
        im = _cache.get(key)
        if im is None:
            data = _store.get(uri, _config.limits.max_source_bytes)
            im = prepare_source(data, _config.limits, max_box=max_box)
            del data
            _cache.put(key, im)
    with _lock:
        _loading.pop(key, None)
    return im


def run(task: dict[str, Any]) -> dict[str, Any]:
    if _config is None:
        raise RuntimeError("resize_job.init() was not called in this process")
    try:
        im = _source(task["sourceUri"], (task.get("maxWidth", 0), task.get("maxHeight", 0)))
        spec = OutputSpec(task["format"], task["width"], task["height"], task["maintainAspectRatio"])
        out = resize_image(im, spec, _config.limits, _config.encoding)
        # the object describes itself, so the join can recover a result it lost (see agents/join.py) and names its run
        _store.put(task["outputKey"], out.data, out.content_type, metadata={
            "imagefork-task": task["taskRef"], "imagefork-format": out.format,
            "imagefork-width": str(out.width), "imagefork-height": str(out.height),
            "imagefork-run": task.get("runId", "")})
        return {"ok": True, "output": {
            "taskRef": task["taskRef"], "format": out.format, "width": out.width, "height": out.height,
            "bytes": len(out.data), "contentType": out.content_type,
            "s3Uri": _store.uri(task["outputKey"]), "url": _store.url(task["outputKey"]),
        }}
    except PipelineError as exc:
        return {"ok": False, "code": exc.code, "message": exc.message, "transient": exc.transient}
    except MemoryError:
        gc.collect()
        err = ImageTooLarge("the image does not fit in this worker's memory")
        return {"ok": False, "code": err.code, "message": err.message, "transient": False}
    except Exception as exc:  # hostile input can raise anything from a decoder
        return {"ok": False, "code": "INTERNAL", "message": f"{type(exc).__name__}: {str(exc)[:200]}",
                "transient": False}
