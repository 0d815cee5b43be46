"""The error policy end to end, on real processes: nothing is dropped, a poison pill ends FAILED.

Each message ends processed, retried or dead-lettered (agents/policy.py); every test checks the
dead letters it expects and that every other request still got exactly one final event."""
import json
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from streams.adapters.kafka import read_to_end
from streams.config import Config
from streams.stack.local import free_port
from tests.integration.pipeline import Pipeline, wait_until

pytestmark = pytest.mark.integration

CRASH_PLUGIN = str(Path(__file__).resolve().parent / "crashplugin")
SMALL = [{"width": 120, "height": 120}, {"width": 64, "height": 48}]


def request(location: str, formats=("png", "jpg")) -> dict:
    return {"fileLocation": location, "outputFormats": list(formats), "outputSizes": SMALL,
            "maintainAspectRatio": True}


def dead_letters(config: Config, expected: int, timeout: float = 60.0) -> list:
    """Every dead letter of this test's namespace, once ``expected`` of them are there, each read to the end
    offsets (read_committed). Counting records, not offsets: the join's dead letters are written in its
    transactions, whose commit markers take offsets too."""
    found: list = []

    def enough() -> bool:
        found[:] = read_to_end(config, config.topics.dead_letter)
        return len(found) >= expected

    assert wait_until(enough, timeout, interval=0.5), f"{len(found)} dead letters, fewer than {expected}, within {timeout}s"
    return list(found)


def exactly_one_final_each(p: Pipeline, finals: dict) -> None:
    counts = Counter(f.workflowId for f in p.finals_for(list(finals), settle=5))
    assert counts == Counter({i: 1 for i in finals}), counts


def test_undecodable_messages_on_every_topic_are_dead_lettered_with_their_origin(make_pipeline, files):
    p = make_pipeline()
    ports = {role: free_port() for role in ("join", "resize", "planner")}
    p.start_together(*((role, {"IMAGEFORK_METRICS_LISTEN": f"127.0.0.1:{port}"}) for role, port in ports.items()))
    t = p.config.topics
    garbage = {t.requests: b"{not json", t.request_retries: b"\x00\x01nope", t.tasks: b"\xc3\x01" + b"\x07" * 20,
               t.retries: b"tasks? no", t.events: b"\xc3\x01\x00\x00\x00\x00\x00\x00\x00\x00zz"}
    for topic, value in garbage.items():
        p.client.producer.produce(topic, key=b"junk/1", value=value, headers={"origin-header": b"kept"})
    p.client.producer.flush(10)
    follower = p.follower()
    p.submit(request(files.url("sample.png")), "after-junk")
    finals = follower.wait(["after-junk"], 120)
    follower.close()
    assert finals["after-junk"].status == "COMPLETED"
    letters = dead_letters(p.config, len(garbage))
    assert len(letters) == len(garbage), [m.value() for m in letters]
    by_topic = {}
    for m in letters:
        h = dict(m.headers())
        by_topic[h["imagefork.source.topic"].decode()] = (m, h)
    assert set(by_topic) == set(garbage)
    expected_code = {t.requests: b"NOT_A_REQUEST", t.request_retries: b"NOT_A_REQUEST", t.tasks: b"NOT_A_TASK",
                     t.retries: b"NOT_A_TASK", t.events: b"NOT_A_JOIN_EVENT"}
    for topic, (m, h) in by_topic.items():
        assert m.value() == garbage[topic] and m.key() == b"junk/1"  # the original bytes and key
        assert h["imagefork.error.code"] == expected_code[topic], (topic, h)
        assert h["imagefork.error.reason"] and h["imagefork.source.offset"] and h["imagefork.source.partition"]
        assert h["origin-header"] == b"kept"  # and the original headers
    exactly_one_final_each(p, finals)
    # and every outcome is counted, per agent, on each worker's metrics endpoint
    expected = {"planner": {"planner": 1, "planner.retry": 1}, "resize": {"resize": 1, "resize.retry": 1},
                "join": {"join": 1}}
    for role, port in ports.items():
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        for agent, n in expected[role].items():
            line = f'imagefork_messages_total{{agent="{agent}",outcome="dead_lettered"}} {float(n)}'
            assert line in text, (role, line, [x for x in text.splitlines() if x.startswith("imagefork_")])
            # the dead letters by their code, as they were written
            code = expected_code[{"planner": t.requests, "planner.retry": t.request_retries, "resize": t.tasks,
                                  "resize.retry": t.retries, "join": t.events}[agent]].decode()
            line = f'imagefork_dead_letters_total{{agent="{agent}",code="{code}"}} {float(n)}'
            assert line in text, (role, line, [x for x in text.splitlines() if x.startswith("imagefork_dead")])
        # and what was processed: the one good request, its 4 tasks, its plan and 4 results
        processed = {"planner": ("planner", 1.0), "resize": ("resize", 4.0), "join": ("join", 5.0)}[role]
        line = f'imagefork_messages_total{{agent="{processed[0]}",outcome="processed"}} {processed[1]}'
        assert line in text, (role, line, [x for x in text.splitlines() if x.startswith("imagefork_messages")])


def test_a_record_over_the_brokers_limit_is_dead_lettered_at_once(make_pipeline, files):
    """The events topic takes at most 4 KB here: a plan that big is refused by the broker for good.
    The request is dead-lettered (SEND_REJECTED) within seconds, not after 10 minutes, and the
    partition keeps flowing."""
    p = make_pipeline()
    # the namespace's topics exist already (Pipeline created them): shrink the events topic's limit
    p.set_topic_config(p.config.topics.events, "max.message.bytes", "4096")
    p.start_all()
    follower = p.follower()
    big = {**request(files.url("sample.png")), "correlationId": "c" * 6000}
    started = time.monotonic()
    p.client.submit(big, "too-big")
    p.submit(request(files.url("sample.png")), "fits")
    finals = follower.wait(["fits"], 120)
    follower.close()
    letters = dead_letters(p.config, 1, timeout=60)
    assert time.monotonic() - started < 60
    assert len(letters) == 1
    h = dict(letters[0].headers())
    assert h["imagefork.error.code"] == b"SEND_REJECTED" and b"MessageSizeTooLarge" in h["imagefork.error.reason"], h
    assert letters[0].key() == b"too-big" and json.loads(letters[0].value())["correlationId"] == "c" * 6000
    assert finals["fits"].status == "COMPLETED"
    exactly_one_final_each(p, finals)


def test_a_task_that_kills_its_worker_ends_worker_crashed_and_the_fleet_survives(make_pipeline, files, tmp_path):
    """A source whose decoder aborts the process (a test-only Pillow plugin). The first worker to decode
    it dies; the task's next owner finds it in the crash ledger and runs it, and every task of that
    source, in a sandbox: the sandbox dies, the task ends FAILED with WORKER_CRASHED, and the worker
    lives on. Dead resize workers are restarted here as a supervisor would. Other requests complete."""
    (Path(files.folder) / "poison.crashme").write_bytes(b"CRASHME\n" + b"\x00" * 64)
    p = make_pipeline(PYTHONPATH=CRASH_PLUGIN, IMAGEFORK_SESSION_TIMEOUT_S="6", IMAGEFORK_MAX_CRASHES="2")
    _join, _planner, *resize = p.start_together("join", "planner",
                                                *(("resize", {"name": f"resize-{i}"}) for i in range(2)))
    follower = p.follower()
    good = [f"good-{i}" for i in range(6)]
    for wf in good[:3]:
        p.submit(request(files.url("sample.png")), wf)
    p.submit(request(files.url("poison.crashme"), formats=("png",)), "poison")  # two tasks
    for wf in good[3:]:
        p.submit(request(files.url("sample.png")), wf)
    deaths, finals, end = 0, {}, time.monotonic() + 240
    wanted = set(good) | {"poison"}
    while not wanted <= set(follower.finals) and time.monotonic() < end:
        follower.pump(1.0, wanted)
        for i, w in enumerate(resize):
            if not w.alive():
                deaths += 1
                resize[i] = p.start("resize", name=f"resize-{i}-r{deaths}")
    finals = {i: follower.finals.get(i) for i in wanted}
    follower.close()
    assert all(finals.values()), (finals, p.logs())
    poison = finals["poison"]
    assert poison.status == "FAILED", poison
    assert {e.code for e in poison.errors} == {"WORKER_CRASHED"}, poison.errors
    assert len(poison.errors) == 2
    assert all(finals[i].status == "COMPLETED" for i in good), {i: finals[i].errors for i in good}
    # each poison message kills at most one worker process outside the sandbox (here: 2 tasks)
    assert 1 <= deaths <= 2, deaths
    exactly_one_final_each(p, finals)
    for i in good:
        p.check_outputs(finals[i])


def test_s3_sources_outside_the_allow_list_are_refused(make_pipeline, files):
    p = make_pipeline()
    p.start_all()
    sample = (Path(files.folder) / "sample.png").read_bytes()
    p.store.put("private/secret.png", sample, "image/png")
    p.store.put(f"{p.config.staging_prefix}shared/ok.png", sample, "image/png")
    follower = p.follower()
    p.submit(request(f"s3://{p.config.bucket}/private/secret.png"), "s3-private")
    p.submit(request(f"s3://{p.config.bucket}/{p.config.staging_prefix}shared/ok.png"), "s3-staging")
    finals = follower.wait(["s3-private", "s3-staging"], 120)
    follower.close()
    assert finals["s3-private"].status == "FAILED"
    assert [e.code for e in finals["s3-private"].errors] == ["SOURCE_FORBIDDEN"], finals["s3-private"].errors
    assert finals["s3-staging"].status == "COMPLETED"
    exactly_one_final_each(p, finals)


def test_an_output_over_the_pixel_limit_over_this_source_fails_at_planning_and_the_rest_run(make_pipeline, files):
    """issue 26 item 4: what the source's header makes certain is refused before any task runs. Under a
    1 MP limit, a 1600x1600 box over a 2:1 source (1600x800 = 1.28 MP) fails IMAGE_TOO_LARGE at planning,
    with the limit in the message; a 1200x1200 box over it (1200x600 = 0.72 MP, though its square would be
    over) and a small one run and complete."""
    from PIL import Image
    Image.new("RGB", (200, 100), (200, 40, 40)).save(Path(files.folder) / "wide.png")
    p = make_pipeline(IMAGEFORK_MAX_PIXELS="1000000")
    _join, resize, planner = p.start_together("join", "resize", "planner")
    follower = p.follower()
    wf = p.submit({"fileLocation": files.url("wide.png"), "outputFormats": ["png"], "maintainAspectRatio": True,
                   "outputSizes": [{"width": 1600, "height": 1600}, {"width": 1200, "height": 1200},
                                   {"width": 50, "height": 50}]}, "over-the-limit")
    final = follower.wait([wf], 120)[wf]
    follower.close()
    assert final.status == "FAILED", final
    assert [(e.code, e.taskRef) for e in final.errors] == [("IMAGE_TOO_LARGE", "image_convert_resize_png_1600x1600_0")]
    assert "would be 1600x800 = 1280000 pixels, more than the limit of 1000000 (IMAGEFORK_MAX_PIXELS)" in \
        final.errors[0].message, final.errors[0].message
    assert sorted((o.width, o.height) for o in final.outputs) == [(50, 25), (1200, 600)]
    assert "1 output(s) over the pixel limit failed at planning" in planner.log_path.read_text()
    assert "1600x1600" not in resize.log_path.read_text()  # never run
    exactly_one_final_each(p, {wf: final})
