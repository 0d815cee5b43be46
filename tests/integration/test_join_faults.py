"""The join's fault edges (issue 19), each on real processes against the real broker: a frozen join that
wakes after its partitions moved, results that come back after their workflow's marker has gone, a join
down across its workflows' deadlines, a final event the completed topic refuses for good, and a handover
whose previous owner's transaction marker is not visible yet. Each counts exactly one final event per
request, after the pipeline has drained, and checks it is the right one."""
import os
import signal
import threading
import time
import uuid
from collections import Counter

import pytest
from confluent_kafka import ConsumerGroupTopicPartitions, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from streams import serde
from streams.adapters.changelog import ChangelogReader
from streams.adapters.kafka import client_config, producer_config, read_to_end
from tests.integration.pipeline import wait_until
from tests.integration.test_errors import dead_letters

pytestmark = pytest.mark.integration

SMALL = [{"width": 48, "height": 48}, {"width": 24, "height": 16}]


def small_request(files, formats=("png", "jpg", "webp")):
    return {"fileLocation": files.url("sample.png"), "outputFormats": list(formats), "outputSizes": SMALL,
            "maintainAspectRatio": True}


def results_on_events(p) -> int:
    count = 0
    for msg in read_to_end(p.config, p.config.topics.events):
        try:
            kind, _ = serde.decode_join_event(msg.value() or b"")
        except serde.SerdeError:
            continue
        count += kind == "TaskResult"
    return count


def one_final_each(p, ids) -> dict:
    finals = p.finals_for(ids)
    counts = Counter(f.workflowId for f in finals)
    assert counts == Counter({i: 1 for i in ids}), {i: n for i, n in counts.items() if n != 1} or counts
    return {f.workflowId: f for f in finals}


def test_a_join_frozen_past_its_session_is_fenced_and_gives_no_second_final_event(make_pipeline, files):
    """Join A holds every open workflow and is frozen (SIGSTOP) past its session timeout; join B takes the
    partitions over and completes them all. A wakes after their deadlines: its clock would time them out,
    but its transaction carries its stale group generation, so the broker fences it and it aborts. Each
    workflow has one final event, COMPLETED."""
    p = make_pipeline(IMAGEFORK_SESSION_TIMEOUT_S="6", IMAGEFORK_TRANSACTION_TIMEOUT_S="5",
                      IMAGEFORK_WORKFLOW_TIMEOUT_S="30")
    first, _planner = p.start_together(("join", {"name": "join-a"}), "planner")
    ids = [f"frozen-{i}" for i in range(20)]
    submitted = time.monotonic()
    for wf in ids:
        p.submit(small_request(files, formats=("png",)), wf)
    p.wait_drained()  # A has committed every plan: 20 open workflows in its state
    os.killpg(first.pid, signal.SIGSTOP)
    try:
        follower = p.follower()
        p.start("join", name="join-b")  # ready once A's session has expired and its partitions are B's
        p.start("resize")
        finals = follower.wait(ids, 120)
        follower.close()
        assert all(f.status == "COMPLETED" for f in finals.values()), {i: f.status for i, f in finals.items()}
        time.sleep(max(0.0, submitted + 33 - time.monotonic()))  # every deadline has passed
    finally:
        os.killpg(first.pid, signal.SIGCONT)
    # A wakes: give its clock a pass, its commit and its rejoin
    assert wait_until(lambda: "join: transaction aborted" in first.log_path.read_text()
                      or "partitions lost" in first.log_path.read_text(), 60), first.log_tail(40)
    time.sleep(5)
    finals = one_final_each(p, ids)
    assert all(f.status == "COMPLETED" for f in finals.values()), {i: f.status for i, f in finals.items()}
    for f in finals.values():
        p.check_outputs(f)
    assert first.alive(), first.log_tail(40)


def test_results_back_after_the_marker_horizon_are_late_not_a_second_final_event(make_pipeline, files):
    """No resize worker until well after the workflows timed out and their markers expired (a horizon
    shortened to 5 s: timeout 4 s + grace 1 s). The results that then come are dead-lettered LATE_RESULT;
    no workflow opens again, none gets a second (empty) final event."""
    p = make_pipeline(IMAGEFORK_WORKFLOW_TIMEOUT_S="4", IMAGEFORK_FINISHED_RETENTION_S="1",
                      IMAGEFORK_LATE_RESULT_GRACE_S="1")
    p.start_together("join", "planner")
    ids = [f"horizon-{i}" for i in range(5)]
    follower = p.follower()
    for wf in ids:
        p.submit(small_request(files, formats=("png",)), wf)
    first = follower.wait(ids, 60)
    follower.close()
    assert all(f.status == "TIMED_OUT" for f in first.values())
    time.sleep(6)  # the markers (5 s) are gone
    p.start("resize")
    letters = dead_letters(p.config, 2 * len(ids), timeout=90)
    codes = Counter(dict(m.headers())["imagefork.error.code"] for m in letters)
    assert codes == Counter({b"LATE_RESULT": 2 * len(ids)}), codes
    time.sleep(5)  # a workflow opened by a late result would time out again by now
    finals = one_final_each(p, ids)
    assert all(f.status == "TIMED_OUT" and f.runId for f in finals.values())


def test_a_join_down_across_deadlines_judges_them_after_reading_its_backlog(make_pipeline, files):
    """Every result is produced before its workflow's deadline while the join is down; the join comes back
    after the deadlines, reading its backlog 3 events a batch. Its clock waits until it has read the
    backlog it was assigned with: every workflow COMPLETED, none TIMED_OUT with outputs missing."""
    p = make_pipeline(IMAGEFORK_WORKFLOW_TIMEOUT_S="40", IMAGEFORK_JOIN_BATCH="3", IMAGEFORK_SESSION_TIMEOUT_S="6")
    join, _planner = p.start_together("join", "planner")
    ids = [f"backlog-{i}" for i in range(10)]
    submitted = time.monotonic()
    for wf in ids:
        p.submit(small_request(files), wf)
    p.wait_drained()  # the plans are in the join's state
    join.kill()
    p.start("resize")
    assert wait_until(lambda: results_on_events(p) >= 6 * len(ids), 120), p.logs()
    assert time.monotonic() < submitted + 40, "the results were not all produced before the deadline"
    time.sleep(max(0.0, submitted + 42 - time.monotonic()))
    follower = p.follower()
    p.start("join", name="join-back")
    finals = follower.wait(ids, 120)
    follower.close()
    assert all(f.status == "COMPLETED" for f in finals.values()), \
        {i: (f.status, len(f.outputs)) for i, f in finals.items() if f.status != "COMPLETED"}
    one_final_each(p, ids)


def test_a_final_event_the_topic_always_refuses_ends_failed_final_too_large(make_pipeline, files):
    """The completed topic takes at most 1 KB: every 48-output final event is refused, which aborts the
    join's transaction. After IMAGEFORK_JOIN_MAX_ABORTS (3) the join sends it FAILED FINAL_TOO_LARGE,
    without its outputs (they are in the bucket), instead of aborting for ever; the partition goes on."""
    p = make_pipeline()
    p.set_topic_config(p.config.topics.completed, "max.message.bytes", "1024")
    p.start_all()
    follower = p.follower()
    wide = {**small_request(files), "outputSizes": [{"width": 16 + i, "height": 12 + i} for i in range(16)]}
    ids = ["refused-1", "refused-2"]
    for wf in ids:
        p.submit(wide, wf)
    finals = follower.wait(ids, 180)
    follower.close()
    for wf, f in finals.items():
        assert f.status == "FAILED" and f.outputs == () and f.taskCount == 48, (f.status, f.errors)
        assert [e.code for e in f.errors] == ["FINAL_TOO_LARGE"], f.errors
        assert len(p.output_keys(wf)) == 48  # the work itself was done
    one_final_each(p, ids)
    join = next(w for w in p.workers if w.role == "join")
    assert join.alive() and "without its outputs" in join.log_path.read_text()


def test_a_restore_waits_for_the_previous_owners_transaction_marker(make_pipeline):
    """A changelog partition whose last transaction is still open (its marker not written yet) when the
    join restores it: the reader waits for it to end (bounded by the transaction timeout) and returns its
    rows, instead of restoring a state without them."""
    p = make_pipeline()
    topic = p.config.topics.join_state
    producer = Producer(producer_config(p.config, **{"transactional.id": f"prev-owner-{uuid.uuid4().hex}"}))
    producer.init_transactions(30)
    producer.begin_transaction()
    for i in range(3):
        producer.produce(topic, key=f"Fwf-{i}".encode(), value=serde.encode(
            "JoinMarker", {"status": "COMPLETED", "at": 1, "runId": f"r{i}"}), partition=0)
    producer.flush(30)  # written, not committed: the partition's last stable offset is before them
    committer = threading.Timer(2.0, lambda: producer.commit_transaction(30))
    committer.start()
    reader = ChangelogReader(client_config(p.config), topic, settle_s=15)
    try:
        rows = reader.read([0], timeout_s=60)
    finally:
        committer.join()
        reader.close()
    assert sorted(rows[0]) == [b"Fwf-0", b"Fwf-1", b"Fwf-2"]


def test_a_replayed_request_of_a_finished_run_leaves_no_staged_source(make_pipeline, files):
    """The planner's offsets go back to the start of the request topic (a reset, a restore from backup): it
    plans the finished request again under the same run id and stages its source again. The join finds the
    run finished (one final event still) and deletes that second staged copy."""
    p = make_pipeline()
    planner = p.start_together("join", "resize", "planner")[2]
    follower = p.follower()
    p.submit(small_request(files, formats=("png",)), "replayed-1")
    assert follower.wait(["replayed-1"], 90)["replayed-1"].status == "COMPLETED"
    follower.close()
    assert wait_until(lambda: p.staged_keys("replayed-1") == [], 30)
    planner.terminate()
    planner.stop(timeout=30)
    admin = AdminClient(client_config(p.config))
    topic = p.config.topics.requests
    parts = admin.list_topics(topic, timeout=30).topics[topic].partitions
    group = p.config.group_id("planner")
    request = ConsumerGroupTopicPartitions(group, [TopicPartition(topic, n, 0) for n in parts])
    admin.alter_consumer_group_offsets([request])[group].result(30)
    replanner = p.start("planner", name="planner-replay")
    assert wait_until(lambda: "replayed-1 planned" in replanner.log_path.read_text(), 60), replanner.log_tail(30)
    p.wait_drained()
    assert wait_until(lambda: p.staged_keys("replayed-1") == [], 30), p.staged_keys("replayed-1")
    finals = one_final_each(p, ["replayed-1"])
    assert finals["replayed-1"].status == "COMPLETED"
