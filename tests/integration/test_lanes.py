"""Priority lanes on the real stack: a backlog of batch requests (``"priority": "batch"``: their requests and
tasks on the batch topics) does not hold up interactive requests sent behind it, and the batch lane keeps
moving while they run. One resize worker of two slots (batch keeps one while interactive work waits).
``bench/lanes.py`` measures the latencies; this test checks the order of things, not their speed:
- every interactive request ends while the backlog is still draining (fewer batch results than tasks);
- batch results keep arriving while the interactive requests run (not starved);
- the batch tasks went through ``imagefork.tasks.batch``, the interactive ones through ``imagefork.tasks``;
- ``imagefork status`` and the metrics show the lag of each lane;
- the backlog, cancelled, ends with one final event per request.
"""
from __future__ import annotations

import uuid

import pytest

from streams import serde
from streams.adapters.kafka import read_to_end
from streams.core.models import Cancellation, now_ms
from streams.demo import seed_request
from tests.integration.pipeline import Pipeline, run_cli, wait_until

pytestmark = pytest.mark.integration


def batch_results(p: Pipeline, ids: set[str]) -> int:
    count = 0
    for msg in read_to_end(p.config, p.config.topics.events):
        if (msg.key() or b"").decode() in ids:
            kind, _body = serde.decode_join_event(msg.value() or b"")
            count += kind == "TaskResult"
    return count


def test_interactive_requests_pass_a_batch_backlog_that_keeps_draining(stack_env, files, tmp_path):
    p = Pipeline(stack_env, f"l{uuid.uuid4().hex[:8]}.", tmp_path / "logs", IMAGEFORK_RESIZE_CONCURRENCY="2",
                 IMAGEFORK_BATCH_SHARE="0.5")
    try:
        p.start_together("join", "planner", "resize")
        source = files.url("sample.png")
        backlog = {"fileLocation": source, "outputFormats": ["jpg", "webp"], "priority": "batch",
                   "outputSizes": [{"width": 200 + i, "height": 200 + i} for i in range(150)]}
        batch = [p.submit(backlog) for _ in range(4)]  # 1,200 tasks
        total = 4 * 300
        assert wait_until(lambda: batch_results(p, set(batch)) >= 10, 120), p.logs()

        follower = p.follower()
        interactive = []
        for _ in range(4):
            wf = p.submit(seed_request(source))
            follower.wait([wf], 120)
            interactive.append(wf)
        during = batch_results(p, set(batch))
        assert all(follower.finals[wf].status == "COMPLETED" for wf in interactive)
        assert during < total, "the backlog drained before the interactive requests ended: make it longer"
        assert wait_until(lambda: batch_results(p, set(batch)) > during, 60)  # batch moves on

        lanes = {}
        for topic in (p.config.topics.tasks, p.config.topics.tasks_batch):
            keys = {(m.key() or b"").decode().split("/")[0] for m in read_to_end(p.config, topic)}
            lanes[topic] = keys
        assert set(batch) <= lanes[p.config.topics.tasks_batch] and not set(batch) & lanes[p.config.topics.tasks]
        assert set(interactive) <= lanes[p.config.topics.tasks] and not set(interactive) & lanes[
            p.config.topics.tasks_batch]

        code, out, _err = run_cli(p.env, "status")
        assert code == 0 and "lanes: interactive lag" in out and "batch lag" in out, out

        for wf in batch:
            p.client.cancel(Cancellation(wf, "", "test over", "test", now_ms()), 30)
        finals = p.finals_for(batch + interactive, timeout=180)
        assert sorted(f.workflowId for f in finals) == sorted(batch + interactive)  # one each
        assert all(f.status == "CANCELLED" for f in finals if f.workflowId in batch)
    finally:
        p.stop()
