"""Content-addressed reuse through the real stack (issue 25, item 2): the same source under two workflow ids,
the second with one size more: only the new outputs are made, the others copied from the first's; both
final events complete and correct; the second fetch of the source is a conditional GET answered 304. A
changed source behind the same URL is fetched again and not reused."""
import hashlib
import os
import shutil
import time

from PIL import Image

from streams.demo import SAMPLE
from streams.stack.local import free_port
from streams.stack.processes import FileServer
from tests.integration.test_faults import finish, metric


def test_the_same_source_twice_reuses_what_was_made(make_pipeline, tmp_path):
    folder = tmp_path / "files"
    folder.mkdir()
    shutil.copy(SAMPLE, folder / "photo.png")
    server = FileServer(folder)
    port, planner_port = free_port(), free_port()
    p = make_pipeline(IMAGEFORK_REUSE="prefix")
    p.start_together("join", ("planner", {"IMAGEFORK_METRICS_LISTEN": f"127.0.0.1:{planner_port}"}),
                     ("resize", {"IMAGEFORK_METRICS_LISTEN": f"127.0.0.1:{port}"}))
    request = {"fileLocation": server.url("photo.png"), "outputFormats": ["png", "jpg"],
               "outputSizes": [{"width": 120, "height": 120}, {"width": 60, "height": 60}]}
    try:
        follower = p.follower()
        p.submit(request, "reuse-a")
        first = finish(p, follower, ["reuse-a"], 120)["reuse-a"]
        assert not any(o.reused for o in first.outputs)
        assert metric(port, "imagefork_outputs_reused_total") == 0.0

        follower = p.follower()
        more = {**request, "outputSizes": [*request["outputSizes"], {"width": 30, "height": 30}]}
        p.submit(more, "reuse-b")
        second = finish(p, follower, ["reuse-b"], 120)["reuse-b"]
        p.check_outputs(second)
        reused = {o.taskRef: o for o in second.outputs if o.reused}
        made = [o for o in second.outputs if not o.reused]
        assert sorted((o.format, o.width) for o in made) == [("jpg", 30), ("png", 30)]
        assert len(reused) == 4 and metric(port, "imagefork_outputs_reused_total") == 4.0
        before = {(o.format, o.width): o for o in first.outputs}
        for out in reused.values():
            original = before[(out.format, out.width)]
            assert out.reusedFrom == original.s3Uri and out.bytes == original.bytes
            assert p.object(out.s3Uri.split("/", 3)[3]) == p.object(original.s3Uri.split("/", 3)[3])
        assert second.facts is not None and second.facts.sha256 == first.facts.sha256 == \
            hashlib.sha256(SAMPLE.read_bytes()).hexdigest()
        # the planner asked for the source with its Last-Modified: 304, staged from the copy it kept
        assert metric(planner_port, "imagefork_sources_revalidated_total") == 1.0

        # another image behind the same URL: other bytes, nothing reused
        Image.open(SAMPLE).convert("L").save(folder / "photo.png")
        later = time.time() + 5  # a Last-Modified of its own (whole seconds), whatever the clock did
        os.utime(folder / "photo.png", (later, later))
        follower = p.follower()
        p.submit(request, "reuse-c")
        third = finish(p, follower, ["reuse-c"], 120)["reuse-c"]
        assert not any(o.reused for o in third.outputs)
        assert third.facts.sha256 == hashlib.sha256((folder / "photo.png").read_bytes()).hexdigest()
        assert third.facts.sha256 != first.facts.sha256
        assert metric(port, "imagefork_outputs_reused_total") == 4.0
        assert metric(planner_port, "imagefork_sources_revalidated_total") == 1.0  # modified: fetched whole
    finally:
        server.close()
