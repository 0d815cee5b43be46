"""Operations without a broker: dead letters read from records, their table, ids, where a replay goes and
what it carries; the demo's contact sheet; the command line's new words."""
from __future__ import annotations

import html.parser
from pathlib import Path

import pytest

from streams import cli
from streams.config import Config
from streams.core.models import TaskError, TaskOutput, WorkflowCompleted
from streams.demo import write_contact_sheet
from streams.ops import OpsError, dead_letter_of, dead_letter_table, find_dead_letters, is_request, replay_target

CONFIG = Config.from_env({"IMAGEFORK_NAMESPACE": "ns."})
T = CONFIG.topics
DLQ = T.dead_letter


class Record:
    """What confluent-kafka's Message offers to the code under test."""

    def __init__(self, partition, offset, key, value, headers, ts_ms=1_764_298_800_000, topic=DLQ):
        self._p, self._o, self._k, self._v, self._h, self._ts, self._t = (
            partition, offset, key, value, headers, ts_ms, topic)

    def topic(self): return self._t
    def partition(self): return self._p
    def offset(self): return self._o
    def key(self): return self._k
    def value(self): return self._v
    def headers(self): return self._h
    def timestamp(self): return (1, self._ts)


def letter_headers(agent, code, topic, partition=2, offset=41, attempts=b"1", extra=()):
    return [("origin-header", b"kept"), *extra, ("imagefork.error.code", code.encode()),
            ("imagefork.error.reason", b"value is not JSON:\n line 1"), ("imagefork.source.topic", topic.encode()),
            ("imagefork.source.partition", str(partition).encode()),
            ("imagefork.source.offset", str(offset).encode()), ("imagefork.attempts", attempts),
            ("imagefork.agent", agent.encode())]


REQUEST = dead_letter_of(Record(0, 7, b"wf-1", b'{"fileLocation": "x"}',
                                letter_headers("planner", "SEND_REJECTED", T.requests,
                                               extra=[("imagefork.run-id", b"abc")])))
RETRIED = dead_letter_of(Record(1, 3, b"wf-2", b"{}", letter_headers("planner.retry", "INTERNAL",
                                                                     T.request_retries, attempts=b"4")))
TASK = dead_letter_of(Record(1, 4, b"wf-3/ref", b"\xc3\x01", letter_headers("resize", "NOT_A_TASK", T.tasks)))


def test_a_dead_letter_is_read_from_its_headers():
    assert REQUEST.id == f"{DLQ}/0/7"
    assert (REQUEST.agent, REQUEST.code, REQUEST.origin) == ("planner", "SEND_REJECTED", f"{T.requests}/2/41")
    assert REQUEST.time == "2025-11-28 03:00:00"  # UTC
    assert RETRIED.attempts == 4 and REQUEST.attempts == 1
    assert REQUEST.key_text == "wf-1"
    doc = REQUEST.to_dict()
    assert doc["reason"] == "value is not JSON:\n line 1" and doc["headers"]["origin-header"] == "kept"


def test_a_record_without_the_headers_still_lists():
    bare = dead_letter_of(Record(3, 0, None, None, None))
    assert (bare.agent, bare.code, bare.origin, bare.key_text, bare.attempts) == ("", "", "", "", 1)
    assert len(dead_letter_table([bare])) == 3


def test_the_table_has_a_row_per_letter_with_the_reason_on_one_line():
    lines = dead_letter_table([REQUEST, TASK], reason_width=20)
    assert lines[0].split() == ["id", "time", "(UTC)", "agent", "code", "origin", "key", "attempts", "reason"]
    assert set(lines[1]) == {"-", " "}
    assert len(lines) == 4
    assert lines[2].startswith(f"{DLQ}/0/7  2025-11-28 03:00:00  planner")
    assert "value is not JSON: line 1"[:17] in lines[2] and lines[2].endswith("...")
    assert f"{T.tasks}/2/41" in lines[3] and "NOT_A_TASK" in lines[3]


def test_on_a_terminal_the_reason_takes_what_is_left_of_its_width():
    long = dead_letter_of(Record(0, 8, b"k", b"v", [("imagefork.error.reason", b"r" * 500)]))
    lines = dead_letter_table([REQUEST, long], line_width=200)
    assert max(map(len, lines)) == 200 and lines[3].endswith("r...")
    narrow = dead_letter_table([long], line_width=10)  # the reason keeps 20 characters at least
    assert narrow[2].endswith(" " + "r" * 17 + "...")


def test_ids_are_found_whole_or_by_partition_and_offset_and_an_unknown_one_is_an_error():
    letters = [REQUEST, RETRIED, TASK]
    assert find_dead_letters(letters, [f"{DLQ}/1/3", "0/7", "1/3"], DLQ) == [RETRIED, REQUEST]
    with pytest.raises(OpsError, match="no dead letter 9/9 on ns.imagefork.requests.dlq"):
        find_dead_letters(letters, ["0/7", "9/9"], DLQ)


def test_only_requests_go_to_the_request_topic_and_origin_is_where_each_came_from():
    assert is_request(REQUEST, CONFIG) and is_request(RETRIED, CONFIG) and not is_request(TASK, CONFIG)
    assert replay_target(REQUEST, None, CONFIG) == T.requests
    assert replay_target(RETRIED, None, CONFIG) == T.requests
    with pytest.raises(OpsError, match="not a request; replay it with --to origin"):
        replay_target(TASK, None, CONFIG)
    with pytest.raises(OpsError, match="not a request"):
        replay_target(TASK, T.requests, CONFIG)
    assert replay_target(TASK, "origin", CONFIG) == T.tasks
    assert replay_target(RETRIED, "origin", CONFIG) == T.request_retries
    assert replay_target(TASK, "elsewhere", CONFIG) == "elsewhere"
    bare = dead_letter_of(Record(3, 0, None, b"x", []))
    with pytest.raises(OpsError, match="does not say where it came from"):
        replay_target(bare, "origin", CONFIG)


def test_a_replay_carries_the_original_headers_but_not_the_pipelines_own():
    assert REQUEST.replay_headers() == [("origin-header", b"kept")]


# --- the demo's contact sheet ---------------------------------------------------------------------
def output(fmt: str, w: int, h: int, n: int) -> TaskOutput:
    ref = f"image_convert_resize_{fmt}_{w}x{h}_{n}"
    return TaskOutput(taskRef=ref, format=fmt, width=w, height=h, bytes=1000 + n, contentType=f"image/{fmt}",
                      s3Uri=f"s3://b/wf/{ref}.{fmt}", url=f"http://s3/b/wf/{ref}.{fmt}")


class Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.src, self.href, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.src.append(attrs["src"])
        if tag == "a":
            self.href.append(attrs["href"])

    def handle_data(self, data):
        self.text.append(data)


def test_the_contact_sheet_shows_each_output_with_relative_links(tmp_path: Path):
    outs = [output(f, w, h, i) for i, (f, (w, h)) in enumerate(
        (f, s) for s in ((300, 300), (200, 200)) for f in ("png", "jpg"))]
    files = [(tmp_path / Path(o.s3Uri).name, o) for o in outs]
    for path, _o in files:
        path.write_bytes(b"x")
    final = WorkflowCompleted(workflowId="wf<1>", correlationId=None, status="PARTIAL", fileLocation="http://h/a.png",
                              fileLocations=tuple(o.url for o in outs), outputs=tuple(outs),
                              errors=(TaskError("image_convert_resize_webp_1x1_9", "ENCODE_FAILED", "no <b>"),),
                              taskCount=5, submittedAt=1000, completedAt=3500)
    sheet = write_contact_sheet(tmp_path, final, files)
    assert sheet == tmp_path / "index.html"
    page = sheet.read_text()
    parser = Links()
    parser.feed(page)
    names = [p.name for p, _o in files]
    assert sorted(parser.src) == sorted(names)  # one image per output, by its file name: relative
    assert set(parser.href) == set(names)
    assert all((tmp_path / src).exists() for src in parser.src)
    text = " ".join(parser.text)
    assert "wf<1>" in text and "PARTIAL" in text and "4 of\n5 outputs" in text and "2.50s" in text
    assert "jpg 300x300 · 1,001 bytes" in " ".join(text.split())
    assert "ENCODE_FAILED: no <b>" in text  # escaped in the page, whole in its text
    assert "<b>" not in page.split("ENCODE_FAILED")[1][:20]
    # smaller sizes first, formats in the event's order
    assert page.index("200x200</th>") < page.index("300x300</th>")
    assert page.index("<th>png</th>") < page.index("<th>jpg</th>")


# --- the command line -------------------------------------------------------------------------------
def test_api_is_a_worker_role_and_a_command(monkeypatch):
    calls = []
    import streams.worker
    monkeypatch.setattr(streams.worker, "run_role", lambda role, config: calls.append(role) or 0)
    assert cli.main(["api"]) == 0
    assert cli.main(["worker", "api"]) == 0
    assert calls == ["api", "api"]


def test_demo_keep_stack_is_keep(monkeypatch):
    seen = []
    import streams.demo
    monkeypatch.setattr(streams.demo, "run_demo", lambda keep=False: seen.append(keep) or 0)
    assert cli.main(["demo", "--keep-stack"]) == 0
    assert cli.main(["demo", "--keep"]) == 0
    assert cli.main(["demo"]) == 0
    assert seen == [True, True, False]


def test_dlq_replay_needs_ids_or_all(capsys):
    assert cli.main(["dlq", "replay"]) == 2
    assert cli.main(["dlq", "replay", "--all", "--id", "0/1"]) == 2
    assert capsys.readouterr().err.count("give --id ID (one or more) or --all") == 2
