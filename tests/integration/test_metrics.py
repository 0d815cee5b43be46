"""The metrics count what happened, on real processes: a few requests (two that complete, one whose tasks
fail in resize, one refused by the planner), each worker's /metrics scraped during and after the run, and
the counts checked against the final events; the consumer lag of every role's group is there per partition
and comes down to 0; ``status_report`` describes the live groups."""
from __future__ import annotations

import re
import urllib.request
from collections import defaultdict

import pytest

from streams.adapters.lag import status_report
from streams.stack.local import free_port
from tests.integration.pipeline import wait_until

pytestmark = pytest.mark.integration

SIZES = [{"width": 120, "height": 120}, {"width": 64, "height": 48}]
SAMPLE = re.compile(r'^(imagefork_[a-z_]+)(?:\{(.*)\})? (\S+)$')


def scrape(port: int, p=None) -> dict[tuple[str, frozenset], float]:
    """One worker's samples: (name, labels) -> value; a worker that does not answer fails the test with
    the pipeline's logs (``p``)."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    except OSError as exc:
        raise AssertionError(f"/metrics on port {port}: {exc!r}\n{p.logs() if p else ''}") from None
    samples = {}
    for line in text.splitlines():
        m = SAMPLE.match(line)
        if m:
            labels = frozenset(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
            samples[(m.group(1), labels)] = float(m.group(3))
    return samples


def total(samples: list[dict], name: str, **labels: str) -> float:
    """The sum of ``name`` over every worker's samples whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for s in samples for (n, ls), v in s.items() if n == name and want <= ls)


def lag_by_partition(samples: dict) -> dict[tuple[str, str, str], float]:
    return {(dict(ls)["group"], dict(ls)["topic"], dict(ls)["partition"]): v
            for (n, ls), v in samples.items() if n == "imagefork_consumer_lag"}


def test_the_metrics_count_tasks_bytes_workflows_and_lag(make_pipeline, files):
    p = make_pipeline()
    ports = {"join": free_port(), "planner": free_port(), "resize-threads": free_port(),
             "resize-processes": free_port()}
    p.start_together(
        ("join", {"IMAGEFORK_METRICS_LISTEN": f"127.0.0.1:{ports['join']}"}),
        ("planner", {"IMAGEFORK_METRICS_LISTEN": f"127.0.0.1:{ports['planner']}"}),
        # both pools: a process pool's byte counts come back to its worker with each task's outcome
        ("resize", {"name": "resize-threads", "IMAGEFORK_METRICS_LISTEN": f"127.0.0.1:{ports['resize-threads']}"}),
        ("resize", {"name": "resize-processes", "IMAGEFORK_RESIZE_POOL": "process",
                    "IMAGEFORK_METRICS_LISTEN": f"127.0.0.1:{ports['resize-processes']}"}))
    resizers = [ports["resize-threads"], ports["resize-processes"]]
    requests = {
        "ok-1": {"fileLocation": files.url("sample.png"), "outputFormats": ["png", "jpg"], "outputSizes": SIZES},
        "ok-2": {"fileLocation": files.url("alpha.png"), "outputFormats": ["webp"], "outputSizes": SIZES},
        # the header probes fine (the planner stages it); decoding fails in resize: 2 FAILED tasks
        "bad-tasks": {"fileLocation": files.url("truncated.png"), "outputFormats": ["png"], "outputSizes": SIZES},
        # refused by the planner's probe: no tasks, nothing staged
        "bad-source": {"fileLocation": files.url("not-an-image.png"), "outputFormats": ["png"], "outputSizes": SIZES},
    }
    follower = p.follower()
    for wf, req in requests.items():
        p.submit({**req, "maintainAspectRatio": True}, wf)

    during = {role: scrape(port, p) for role, port in ports.items()}  # the endpoints answer mid-run
    assert all(any(n.startswith("imagefork_") for n, _ in s) for s in during.values()), during

    finals = follower.wait(list(requests), 180)
    follower.close()
    assert {wf: f.status for wf, f in finals.items()} == {
        "ok-1": "COMPLETED", "ok-2": "COMPLETED", "bad-tasks": "FAILED", "bad-source": "FAILED"}, finals
    assert {e.code for e in finals["bad-tasks"].errors} == {"IMAGE_UNDECODABLE"}
    outputs = [o for f in finals.values() for o in f.outputs]
    assert len(outputs) == 6

    # tasks, by status and code: each counted once, by whichever resize worker ran it
    resized = [scrape(port, p) for port in resizers]
    assert total(resized, "imagefork_tasks_total", status="SUCCEEDED", code="") == 6
    assert total(resized, "imagefork_tasks_total", status="FAILED", code="IMAGE_UNDECODABLE") == 2
    assert total(resized, "imagefork_tasks_total") == 8
    assert total(resized, "imagefork_retries_total") == 0
    # the resize + upload time of each succeeded task, by format
    assert total(resized, "imagefork_task_duration_seconds_count") == 6
    by_format = defaultdict(int)
    for o in outputs:
        by_format[o.format] += 1
    for fmt, n in by_format.items():
        assert total(resized, "imagefork_task_duration_seconds_count", format=fmt) == n, (fmt, resized)
    # bytes: resize uploaded exactly the outputs the final events list, and read the staged sources
    assert total(resized, "imagefork_bytes_written_total", kind="output") == sum(o.bytes for o in outputs)
    assert total(resized, "imagefork_bytes_read_total", source="s3") > 0
    # the planner fetched every source and staged those that probed as images
    folder = files.folder
    planned = scrape(ports["planner"], p)
    size = {name: (folder / name).stat().st_size
            for name in ("sample.png", "alpha.png", "truncated.png", "not-an-image.png")}
    assert total([planned], "imagefork_bytes_read_total", source="http") == sum(size.values())
    assert total([planned], "imagefork_bytes_written_total", kind="staging") == \
        size["sample.png"] + size["alpha.png"] + size["truncated.png"]
    assert total([planned], "imagefork_bytes_written_total", kind="output") == 0

    # the workflows, by final status, once the join counts them
    # (counted right after the commit that the final events came in: a moment after they were read)
    assert wait_until(lambda: total([scrape(ports["join"], p)], "imagefork_workflows_total") == 4, 15), \
        scrape(ports["join"], p)
    joined = scrape(ports["join"], p)
    assert total([joined], "imagefork_workflows_total", status="COMPLETED") == 2, joined
    assert total([joined], "imagefork_workflows_total", status="FAILED") == 2, joined
    assert total([joined], "imagefork_workflow_duration_seconds_count") == 4, joined
    assert total([joined], "imagefork_open_workflows") == 0, joined

    # consumer lag: every partition of each role's input topics, 0 once the groups committed
    t = p.config.topics
    expected = {"join": {(p.config.group_id("join"), t.events)},
                "planner": {(p.config.group_id("planner"), t.requests),
                            (p.config.group_id("planner"), t.request_retries)},
                "resize-threads": {(p.config.group_id("resize"), t.tasks), (p.config.group_id("resize"), t.retries)}}
    expected["resize-processes"] = expected["resize-threads"]
    seen: dict[str, dict] = {}

    def caught_up() -> bool:
        for role, port in ports.items():
            seen[role] = lag_by_partition(scrape(port, p))
        return all(seen[role] and set(seen[role].values()) == {0.0} for role in ports)

    assert wait_until(caught_up, 60, interval=1.0), seen
    for role, lags in seen.items():
        assert {(g, topic) for g, topic, _p in lags} >= expected[role], (role, lags)
        for group, topic in expected[role]:
            assert {part for g, tp, part in lags if (g, tp) == (group, topic)} == \
                {str(i) for i in range(p.config.partitions)}, (role, topic, lags)
    for role in ("join", "planner"):
        committed = total([scrape(ports[role], p)], "imagefork_consumer_committed_offset")
        assert committed > 0, role  # the requests and events were read and committed

    # and the status report describes the live groups
    report = status_report(p.config)
    print(report)  # shown when the test fails (or with -s)
    for role in ("planner", "resize", "join"):
        assert f"{role}  group {p.config.group_id(role)}  Stable" in report, report
    assert report.count("  member ") == 4 and "__assignor" not in report, report
    assert report.splitlines()[-1] == "all roles: lag 0", report
