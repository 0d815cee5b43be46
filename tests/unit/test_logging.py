"""What a user reads: the workers' log lines (one format, text only, no alarms for a normal start) and the
first fetch of the local stack (what it fetches, then how long it took; mvn's errors when it fails)."""
import io
import logging
import os
import re
import stat
from collections import namedtuple

import pytest

from streams.adapters.kafka import describe_assignment
from streams.logs import TransientRetries, setup_logging

LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} planner\[\d+\] (DEBUG|INFO|WARNING|ERROR) ")
GETPID = ("GETPID", "rdkafka#producer-2", "[thrd:main]: Failed to acquire idempotence PID from broker "
          "127.0.0.1:9092/1: Broker: Coordinator load in progress: retrying")


@pytest.fixture
def output():
    """``setup_logging`` into a buffer; the root logger and the levels it touches are put back after."""
    root = logging.getLogger()
    touched = [logging.getLogger("imagefork")]
    saved = root.handlers[:], root.level, [logger.level for logger in touched]
    buffer = io.StringIO()  # not a TTY
    setup_logging("planner", "info", stream=buffer)
    yield buffer
    root.handlers[:], root.level = saved[0], saved[1]
    for logger, level in zip(touched, saved[2]):
        logger.setLevel(level)


def lines(buffer: io.StringIO) -> list[str]:
    return buffer.getvalue().splitlines()


def test_our_lines_and_the_libraries_lines_have_one_format(output):
    logging.getLogger("imagefork").info("imagefork ready: planner (1 partition assigned: t 1)")
    logging.getLogger("botocore.credentials").info("Found credentials in environment variables.")
    logging.getLogger("PIL.TiffImagePlugin").warning("Corrupt EXIF data.")
    logging.getLogger("imagefork.kafka").warning("%s [%s] %s", "FAIL", "rdkafka#consumer-1", "Connection refused")
    got = lines(output)
    assert len(got) == 4 and all(LINE.match(line) for line in got), got
    assert got[0].endswith(" INFO imagefork ready: planner (1 partition assigned: t 1)")
    assert got[1].endswith(" INFO botocore: Found credentials in environment variables.")
    assert got[2].endswith(" WARNING PIL: Corrupt EXIF data.")
    assert got[3].endswith(" WARNING librdkafka: FAIL [rdkafka#consumer-1] Connection refused")


def test_no_terminal_control_codes_reach_the_log(output):
    log = logging.getLogger("botocore")
    log.warning("\x1b[?25lspinning\b\b\x1b[?25h \x1b[31mred\x1b[0m\r")
    text = output.getvalue()
    assert "\x1b" not in text and "\b" not in text and "\r" not in text
    assert text.rstrip("\n").endswith("botocore: spinning red")


def test_a_coordinator_still_loading_is_not_an_error_at_start(output):
    logging.getLogger("imagefork.kafka").warning("%s [%s] %s", *GETPID)
    assert lines(output) == []
    # a broker that is away is still said at once
    logging.getLogger("imagefork.kafka").error("%s [%s] %s", "FAIL", "rdkafka#consumer-1",
                                               "127.0.0.1:9092/1: Connect to ipv4#127.0.0.1:9092 failed: "
                                               "Connection refused (after 0ms in state CONNECT)")
    assert len(lines(output)) == 1 and " ERROR librdkafka: FAIL [rdkafka#consumer-1] 127.0.0.1:9092/1: Connect" \
        in lines(output)[0]


def test_a_coordinator_retry_that_goes_on_shows_as_a_warning_never_an_error():
    now = [0.0]
    transient = TransientRetries(patience_s=30.0, clock=lambda: now[0])
    logger = logging.getLogger("imagefork.kafka")
    level = logger.level
    logger.setLevel(logging.INFO)

    def record():
        return logger.makeRecord(logger.name, logging.WARNING, __file__, 1, "%s [%s] %s", GETPID, None)

    try:
        seen = []
        for t in (0.0, 10.0, 29.0, 31.0, 60.0):  # still coming after 30 s
            now[0] = t
            rec = record()
            seen.append((transient.filter(rec), rec.levelname))
        assert seen == [(False, "DEBUG")] * 3 + [(True, "WARNING")] * 2
        now[0] = 200.0  # a new spell after a quiet while: hidden again
        rec = record()
        assert (transient.filter(rec), rec.levelname) == (False, "DEBUG")
    finally:
        logger.setLevel(level)


def test_librdkafka_retry_lines_show_at_debug(output):
    setup_logging("planner", "debug", stream=output)
    logging.getLogger("imagefork.kafka").warning("%s [%s] %s", *GETPID)
    got = lines(output)
    assert len(got) == 1 and " DEBUG librdkafka: GETPID [rdkafka#producer-2] " in got[0], got


TP = namedtuple("TP", "topic partition")


def test_the_ready_line_says_which_partitions_make_the_count():
    assigned = ({TP("imagefork.requests", p) for p in range(6)} | {TP("imagefork.requests.retry", p) for p in range(6)}
                | {TP("imagefork-planner-__assignor-__leader", 0)})
    assert describe_assignment(assigned) == ("13 partitions assigned: imagefork.requests 6 + imagefork.requests.retry 6"
                                             " + imagefork-planner-__assignor-__leader 1")
    assert describe_assignment(set()) == "0 partitions assigned"
    assert describe_assignment({TP("t", 0)}) == "1 partition assigned: t 1"


# --- the first fetch -------------------------------------------------------------------------------
def fake_mvn(folder, script: str) -> None:
    """An ``mvn`` on PATH that records its arguments and runs ``script``."""
    path = folder / "mvn"
    path.write_text(f"#!/bin/sh\necho \"$@\" > {folder}/mvn.args\n{script}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def fetch_env(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("IMAGEFORK_CACHE", str(tmp_path / "cache"))
    return bin_dir


def test_the_first_fetch_says_what_it_fetches_and_how_long_it_took(fetch_env, capsys):
    from streams.stack.local import fetch
    fake_mvn(fetch_env, 'for a in "$@"; do case $a in -DoutputDirectory=*) d=${a#*=};; esac; done\n'
                        'mkdir -p "$d" && touch "$d/kafka.jar"\necho "[INFO] Downloading 1/300"')
    libs = fetch("kafka")
    assert (libs / "kafka.jar").exists()
    args = (fetch_env / "mvn.args").read_text().split()
    assert {"-q", "-B", "--no-transfer-progress"} <= set(args)
    out, err = capsys.readouterr()
    assert out == ""  # stdout of `stack up` is its KEY=VALUE lines
    said = err.splitlines()
    assert len(said) == 2, said
    assert re.fullmatch(r"imagefork: fetching Kafka \S+ from Maven Central with mvn, once: about \d+ MB .*"
                        + re.escape(str(libs.parent)) + ".*", said[0]), said[0]
    assert re.fullmatch(r"imagefork: fetched Kafka \S+ in \d+s", said[1]), said[1]
    assert "Downloading" not in err
    fetch("kafka")  # fetched: nothing more is said
    assert capsys.readouterr() == ("", "")


def test_a_failed_fetch_shows_mvns_errors(fetch_env, capsys):
    from streams.stack.local import StackError, fetch
    fake_mvn(fetch_env, 'echo "[ERROR] Failed to execute goal on project s3proxy: Could not resolve dependencies"\n'
                        'echo "[ERROR] -> [Help 1]"\nexit 1')
    with pytest.raises(StackError) as failure:
        fetch("s3proxy")
    err = capsys.readouterr().err
    assert "  [ERROR] Failed to execute goal on project s3proxy: Could not resolve dependencies" in err
    assert "fetched" not in err
    message = str(failure.value)
    assert "\n" not in message and "mvn could not fetch s3proxy" in message and "exit code 1" in message
    log = message.rsplit(" ", 1)[-1]
    assert "[ERROR] -> [Help 1]" in open(log).read()


def test_a_library_line_repeated_during_an_outage_is_written_every_10s_with_a_count():
    from streams.logs import RepeatedLines
    now = [0.0]
    limiter = RepeatedLines(every_s=10, clock=lambda: now[0])

    def line(name, text, *args):
        record = logging.LogRecord(name, logging.ERROR, __file__, 1, text, args, None)
        return record.getMessage() if limiter.filter(record) else None

    refused = "%s [%s] %s"
    args = ("FAIL", "rdkafka#consumer-1", "127.0.0.1:9092/bootstrap: Connect failed (after 0ms in state CONNECT)")
    assert line("imagefork.kafka", refused, *args) is not None
    for step in range(1, 50):  # every 0.2 s: held back, digits aside the same line
        now[0] = step * 0.2
        assert line("imagefork.kafka", refused, *args[:2], args[2].replace("0ms", f"{step}ms")) is None
    now[0] = 10.5
    assert line("imagefork.kafka", refused, *args).endswith("(49 more like it held back)")
    assert line("imagefork.kafka", refused, "ERROR", "rdkafka#consumer-1", "1/1 brokers are down") is not None  # another line
    # imagefork's own lines are never held back
    assert all(line("imagefork", "workflow %s COMPLETED", "w") for _ in range(5))


def test_json_lines_carry_the_workflow_and_the_task():
    root = logging.getLogger()
    touched = [logging.getLogger("imagefork")]
    saved = root.handlers[:], root.level, [logger.level for logger in touched]
    buffer = io.StringIO()
    try:
        setup_logging("resize", "info", stream=buffer, fmt="json")
        log = logging.getLogger("imagefork")
        log.info("task %s/%s SUCCEEDED (attempt %d)", "wf-1", "image_convert_resize_png_300x300_0", 1)
        log.info("workflow %s planned: %d tasks", "wf.2", 9)
        logging.getLogger("imagefork.kafka").warning("%s [%s] %s", "FAIL", "rdkafka", "down \x1b[31mred\x1b[0m")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("join failed on %s", "x")
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
        for logger, level in zip(touched, saved[2]):
            logger.setLevel(level)
    import json
    rows = [json.loads(line) for line in buffer.getvalue().splitlines()]
    assert len(rows) == 4
    assert rows[0]["workflowId"] == "wf-1" and rows[0]["taskRef"] == "image_convert_resize_png_300x300_0"
    assert rows[0]["role"] == "resize" and rows[0]["level"] == "INFO" and rows[0]["time"].endswith("Z")
    assert rows[1]["workflowId"] == "wf.2" and "taskRef" not in rows[1]
    assert rows[2]["logger"] == "librdkafka" and rows[2]["message"] == "FAIL [rdkafka] down red"
    assert "ValueError: boom" in rows[3]["exception"]
