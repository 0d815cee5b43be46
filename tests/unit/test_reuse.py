"""Content-addressed reuse (streams/core/reuse.py, streams/agents/resize_job.py) with an in-memory bucket:
the same source bytes and spec copy the output made before; another spec, other bytes, an old pointer or a
vanished object make it again. Through the real stack: tests/integration/test_pipeline.py."""
import hashlib
import json
from datetime import datetime, timezone

import pytest

from streams.adapters.objectstore import parse_s3_uri
from streams.agents import resize_job
from streams.config import Config, Encoding
from streams.core.errors import SourceNotFound
from streams.core.options import ImageOptions
from streams.core.planning import parse_request, plan_tasks
from streams.core.reuse import facts_cover, pointer_key, scope_prefix, spec_key, usable
from streams.demo import SAMPLE


class Bucket:
    """What the resize job asks of the object store, in a dict."""

    def __init__(self):
        self.objects: dict[str, tuple[bytes, str, dict]] = {}
        self.copies = 0

    def uri(self, key):
        return f"s3://b/{key}"

    def url(self, key):
        return f"http://s3/b/{key}"

    def put(self, key, data, content_type, metadata=None):
        self.objects[key] = (data, content_type, metadata or {})

    def get(self, uri, max_bytes):
        key = parse_s3_uri(uri)[1]
        if key not in self.objects:
            raise SourceNotFound(f"{uri}: not found")
        return self.objects[key][0]

    def head(self, key):
        if key not in self.objects:
            return None
        data, ctype, meta = self.objects[key]
        return {"ContentLength": len(data), "ContentType": ctype, "Metadata": meta,
                "LastModified": datetime.now(timezone.utc)}

    def copy(self, source_key, key, content_type, metadata):
        self.copies += 1
        self.objects[key] = (self.objects[source_key][0], content_type, metadata)


@pytest.fixture
def bucket():
    resize_job.init(Config(reuse="prefix", output_prefix="out/"))
    store = resize_job._store = Bucket()
    data = SAMPLE.read_bytes()
    store.put("staging/source", data, "image/png")
    yield store
    resize_job._config = resize_job._store = None


def tasks(wf, sizes, data=None, **doc):
    request = parse_request({"fileLocation": "http://x/y.png", "outputFormats": ["png", "jpg"],
                             "outputSizes": [{"width": s, "height": s} for s in sizes], **doc},
                            max_dimension=2000, max_tasks=20)
    sha = hashlib.sha256(data or SAMPLE.read_bytes()).hexdigest()
    return [{**t.to_dict(), "sourceUri": "s3://b/staging/source", "sourceSha256": sha}
            for t in plan_tasks(request, wf, source_uri="s3://b/staging/source", deadline=2**62, output_prefix="out/")]


def run_all(ts):
    return [resize_job.run(t) for t in ts]


def test_the_same_bytes_and_spec_are_copied_not_made_again(bucket):
    first = run_all(tasks("wf-1", (40, 20)))
    assert all(o["ok"] and not o["output"]["reused"] for o in first)
    again = run_all(tasks("wf-2", (40, 20, 30)))
    reused = [o["output"] for o in again if o["output"]["reused"]]
    assert len(reused) == 4 and bucket.copies == 4  # png and jpg at 40 and 20; 30 is new
    for out in reused:
        key = parse_s3_uri(out["s3Uri"])[1]
        source = parse_s3_uri(out["reusedFrom"])[1]
        assert key.startswith("out/wf-2/") and source.startswith("out/wf-1/")
        assert bucket.objects[key][0] == bucket.objects[source][0]
        assert bucket.objects[key][2]["imagefork-task"] == out["taskRef"]  # its own metadata, for repair
    made = [o["output"] for o in again if not o["output"]["reused"]]
    assert sorted(o["width"] for o in made) == [30, 30]


def test_another_spec_or_other_bytes_are_made(bucket):
    run_all(tasks("wf-1", (40,)))
    assert not any(o["output"]["reused"] for o in run_all(tasks("wf-2", (40,), quality=50)))
    other = tasks("wf-3", (40,), data=b"other bytes")
    assert not any(o["output"]["reused"] for o in run_all(other))


def test_an_old_pointer_or_a_vanished_object_is_made_again(bucket):
    import time
    run_all(tasks("wf-1", (40,)))
    for key in [k for k in bucket.objects if k.startswith("out/wf-1/")]:
        del bucket.objects[key]
    assert not any(o["output"]["reused"] for o in run_all(tasks("wf-2", (40,))))  # wf-2's are made, and kept
    resize_job._config = Config(reuse="prefix", output_prefix="out/", reuse_ttl_s=0.001)
    time.sleep(0.01)
    assert not any(o["output"]["reused"] for o in run_all(tasks("wf-3", (40,))))
    resize_job._config = Config(reuse="prefix", output_prefix="out/")
    assert all(o["output"]["reused"] for o in run_all(tasks("wf-4", (40,))))  # wf-3's, made a moment ago


def test_an_object_another_run_wrote_over_is_not_reused(bucket):
    """A resubmission of the same workflow id with other options writes the same key (its run is ignored by
    the join, its tasks under way still upload): the pointer's object is no longer the one it points to."""
    run_all(tasks("wf-1", (40,)))
    key = next(k for k in bucket.objects if k.startswith("out/wf-1/") and k.endswith(".png"))
    data, ctype, meta = bucket.objects[key]
    bucket.objects[key] = (data, ctype, {**meta, "imagefork-run": "another-run"})
    made = run_all(tasks("wf-2", (40,)))
    assert [o["output"]["reused"] for o in made] == [False, True]  # the png made again, the jpg reused


def test_reuse_off_looks_nothing_up(bucket):
    resize_job._config = Config(reuse="off", output_prefix="out/")
    run_all(tasks("wf-1", (40,)))
    assert not any(k.startswith("out/_reuse/") for k in bucket.objects)
    assert not any(o["output"]["reused"] for o in run_all(tasks("wf-2", (40,))))


def test_the_facts_task_reuses_only_with_the_facts_it_asks(bucket):
    first = tasks("wf-1", (40,))
    first[0]["facts"] = ["basic", "colors"]
    done = run_all(first)
    assert done[0]["facts"]["dominantColor"] and not done[0]["output"]["reused"]
    again = tasks("wf-2", (40,))
    again[0]["facts"] = ["basic", "colors"]
    out = run_all(again)[0]
    assert out["output"]["reused"] and out["facts"] == done[0]["facts"]
    wants_more = tasks("wf-3", (40,))
    wants_more[0]["facts"] = ["basic", "phash"]
    assert not run_all(wants_more)[0]["output"]["reused"]


def test_spec_keys_and_pointers():
    o = ImageOptions(resizeMode="fit").resolved()
    key = spec_key("png", 40, 40, o, Encoding())
    assert key == spec_key("PNG", 40, 40, o, Encoding())
    assert len({key, spec_key("png", 41, 40, o, Encoding()), spec_key("jpg", 40, 40, o, Encoding()),
                spec_key("png", 40, 40, ImageOptions(resizeMode="fill").resolved(), Encoding()),
                spec_key("png", 40, 40, o, Encoding(png_compress_level=9))}) == 5
    assert (scope_prefix("off", "out/"), scope_prefix("prefix", "out/"), scope_prefix("global", "out/")) == \
        (None, "out/_reuse/", "_reuse/")
    assert pointer_key("out/_reuse/", "ab", key) == f"out/_reuse/ab/{key}.json"
    doc = {"key": "out/wf/x.png", "at": 1000, "output": {}}
    assert usable(doc, 2000, 10) == doc and usable(doc, 20_000, 10) is None
    assert usable({"key": 1, "at": 1000, "output": {}}, 2000, 10) is None and usable("x", 2000, 10) is None
    assert usable(json.loads(json.dumps(doc)), 1000, 10) == doc
    assert facts_cover({"sha256": "a", "phash": "f"}, ("basic", "phash"))
    assert not facts_cover({"sha256": "a", "phash": None}, ("basic", "phash")) and not facts_cover(None, ())


def test_bytes_that_are_not_the_planners_file_no_pointer(bucket):
    """An s3:// source read where it is may have been written over after the planner hashed it: the output
    is made from what is there, and filed under no hash."""
    stale = tasks("wf-1", (40,), data=b"what the planner read")
    assert all(o["ok"] and not o["output"]["reused"] for o in run_all(stale))
    assert not any(k.startswith("out/_reuse/") for k in bucket.objects)
