"""The agents never commit past a message still in flight (adapters/agent_loop.Offsets, issue 20): a slow
message at the head of a partition with faster ones behind it, and the worker killed (SIGKILL) or stopped
(SIGTERM, a deploy) while the slow one is still being worked on. A stop drains first: the work in flight
finishes within IMAGEFORK_SHUTDOWN_GRACE_S; what the grace or a kill cut short, the next owner reads
again. Every request ends with exactly one final event, COMPLETED."""
import http.server
import threading
import time

import pytest

from streams.demo import SAMPLE
from tests.integration.pipeline import wait_until

pytestmark = pytest.mark.integration

SMALL = [{"width": 32, "height": 32}]


class SlowSource:
    """A loopback HTTP server whose every answer takes ``delay_s``."""

    def __init__(self, delay_s: float):
        body = SAMPLE.read_bytes()
        self.calls = 0
        source = self

        class Slow(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                source.calls += 1
                time.sleep(delay_s)
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/slow.png"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM past the grace", "SIGTERM within the grace"])
def test_a_planner_stopped_with_a_slow_request_at_the_head_loses_nothing(make_pipeline, files, how):
    """One request partition: a request whose source takes 10 s, then ten quick ones, which the planner's
    other slots plan meanwhile. The planner is stopped while the slow fetch runs. Killed, or stopped with a
    1 s grace, its successor plans the slow request again (faust-streaming 0.15, the planner's loop before, had
    committed past it: no plan, no final event ever); stopped with the default grace (25 s), it finishes the
    slow request, then exits."""
    slow = SlowSource(10)
    grace = "1" if how == "SIGTERM past the grace" else "25"
    try:
        p = make_pipeline(IMAGEFORK_PARTITIONS="1", IMAGEFORK_READ_TIMEOUT_S="60", IMAGEFORK_PLANNER_CONCURRENCY="4",
                          IMAGEFORK_SESSION_TIMEOUT_S="6", IMAGEFORK_SHUTDOWN_GRACE_S=grace)
        planner = p.start_together("join", "resize", "planner")[2]
        follower = p.follower()
        request = {"outputFormats": ["png"], "outputSizes": SMALL, "maintainAspectRatio": True}
        p.submit({**request, "fileLocation": slow.url}, "slow-head")
        quick = [f"quick-{i}" for i in range(10)]
        for wf in quick:
            p.submit({**request, "fileLocation": files.url("sample.png")}, wf)
        assert wait_until(lambda: all(f"{wf} planned" in planner.log_path.read_text() for wf in quick), 60), \
            planner.log_tail(30)
        time.sleep(2)  # a few commit intervals (0.5 s) with the slow request still being fetched
        assert slow.calls == 1 and "slow-head planned" not in planner.log_path.read_text()
        if how == "SIGKILL":
            planner.kill()
        else:
            stopped = time.monotonic()
            planner.terminate()
            planner.stop(timeout=40)
            took = time.monotonic() - stopped
        p.start("planner", name="planner-next")
        finals = follower.wait(["slow-head", *quick], 120)
        follower.close()
        assert all(f.status == "COMPLETED" for f in finals.values()), {i: f.status for i, f in finals.items()}
        log = planner.log_path.read_text()
        if how == "SIGTERM within the grace":
            assert "slow-head planned" in log and slow.calls == 1, log[-3000:]  # finished, not handed back
            assert "the work in flight finished" in log and took < 25, (took, log[-3000:])
        else:
            assert slow.calls >= 2  # read again by the next planner
            assert "slow-head planned" not in log
            if how == "SIGTERM past the grace":
                assert "message(s) still in flight; they go back" in log and took < 15, (took, log[-3000:])
        counts = {f.workflowId: 0 for f in finals.values()}
        for f in p.finals_for(list(finals)):
            counts[f.workflowId] += 1
        assert set(counts.values()) == {1}, counts
    finally:
        slow.close()


# a stop past its grace hands back as a kill does: the planner's test shows it (one loop: adapters/agent_loop.py)
@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM within the grace"])
def test_a_resize_worker_stopped_with_a_big_task_at_the_head_loses_nothing(make_pipeline, files, how):
    """One task partition: a big output first (several seconds to encode), then quick tasks behind it that
    the worker's other slot finishes meanwhile. Killed while the big one runs:
    the next worker runs it again (Faust alone had committed past it: its workflow ended TIMED_OUT without
    it). Stopped with the default grace: it finishes the big task, then exits."""
    p = make_pipeline(IMAGEFORK_PARTITIONS="1", IMAGEFORK_RESIZE_CONCURRENCY="2", IMAGEFORK_SESSION_TIMEOUT_S="6",
                      IMAGEFORK_WORKFLOW_TIMEOUT_S="150", IMAGEFORK_PNG_COMPRESS_LEVEL="9",
                      IMAGEFORK_SHUTDOWN_GRACE_S="25")
    resize = p.start_together("join", "resize", "planner")[1]
    follower = p.follower()
    big = {"fileLocation": files.url("sample.png"), "outputFormats": ["png"],
           "outputSizes": [{"width": 3000, "height": 3000}], "maintainAspectRatio": False}
    p.submit(big, "big-head")
    assert wait_until(lambda: bool(p.open_ledger_rows()), 60), resize.log_tail(30)  # the big task started
    quick = [f"small-{i}" for i in range(3)]
    for wf in quick:
        p.submit({**big, "outputSizes": SMALL}, wf)
    done = follower.wait(quick, 60)
    assert all(f.status == "COMPLETED" for f in done.values())
    time.sleep(1.0)  # a couple of commit intervals, the big task still running
    assert p.open_ledger_rows(), "the big task ended before the kill: make it bigger"
    assert "task big-head/" not in resize.log_path.read_text(), "the big task ended before the stop: make it bigger"
    if how == "SIGKILL":
        resize.kill()
    else:
        resize.terminate()
        resize.stop(timeout=40)
    following = p.start("resize", name="resize-next")
    final = follower.wait(["big-head"], 200)["big-head"]
    follower.close()
    assert final.status == "COMPLETED", final.errors
    p.check_outputs(final)
    assert len(p.finals_for(["big-head", *quick])) == 1 + len(quick)
    done_by = resize if how == "SIGTERM within the grace" else following
    assert "task big-head/" in done_by.log_path.read_text(), (resize.log_tail(20), following.log_tail(20))
