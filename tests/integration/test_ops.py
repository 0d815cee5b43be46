"""Operations commands on the real broker, S3 server and workers (one pipeline for the module), through the
real CLI in this process:

- ``imagefork dlq list`` shows real dead letters (one undecodable message, one request whose plan the broker
  refused) with their id, agent, code, origin, key and attempts; ``--json`` and ``--limit`` too;
- ``imagefork dlq replay`` sends a dead-lettered request back once its cause is fixed, without the
  pipeline's headers, and it completes; an unknown id is one line and exit code 1; ``--all`` sends every
  request and skips (saying so) what is not one, which ``--to origin`` sends back where it came from;
  replaying twice sends twice, but a keyed request runs once and a keyless one gets a new id each time;
- ``imagefork status`` names each role's group, its member and the partitions it holds;
- a broker that does not answer is one line and exit code 1 (status, dlq list, dlq replay), within seconds;
- the demo's contact sheet: the seed request's nine outputs downloaded and shown by ``index.html``;
- ``imagefork demo --keep``'s API process: kept after its starter exits, the dashboard answering, and
  stopped by ``imagefork demo --stop``.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from html.parser import HTMLParser
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource
from PIL import Image

from streams.adapters.kafka import client_config, read_to_end
from streams.demo import SHEET, save_outputs, seed_request
from streams.stack.local import free_port
from streams.stack.processes import _start_ticks, process_group_members
from tests.integration.pipeline import wait_until
from tests.integration.test_outputs import run_cli  # the CLI in this process

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

SMALL = [{"width": 120, "height": 120}, {"width": 64, "height": 48}]


def set_topic_config(config, topic: str, name: str, value: str | None) -> None:
    """Set (or, with None, remove: back to the broker's default) one setting of ``topic``."""
    admin = AdminClient(client_config(config))
    op = AlterConfigOpType.SET if value is not None else AlterConfigOpType.DELETE
    res = ConfigResource("topic", topic, incremental_configs=[ConfigEntry(name, value or "", incremental_operation=op)])
    for future in admin.incremental_alter_configs([res]).values():
        future.result(30)


def listed(env) -> list[dict]:
    code, out, err = run_cli(env, "dlq", "list", "--json", "--limit", "0")
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines()]


def test_dead_letters_are_listed_and_a_fixed_request_replayed_runs(pipeline, files):
    p, env = pipeline, pipeline.env
    t = p.config.topics
    # a valid request whose plan (which carries the location and the correlation id) is some 1.6 KB
    request = {"fileLocation": files.url("sample.png") + "?pad=" + "p" * 900, "outputFormats": ["png", "jpg"],
               "outputSizes": SMALL, "maintainAspectRatio": True, "correlationId": "c" * 500}
    # a cause that can be fixed: the events topic takes at most 1 KB, so that plan is refused
    set_topic_config(p.config, t.events, "max.message.bytes", "1024")
    try:
        p.client.producer.produce(t.requests, key=b"junk/1", value=b"{not json", headers={"origin-header": b"kept"})
        p.client.producer.flush(10)
        p.client.submit(request, "too-big")
        assert wait_until(lambda: len(listed(env)) >= 2, 90, interval=1), listed(env)
    finally:
        set_topic_config(p.config, t.events, "max.message.bytes", None)
    letters = {d["key"]: d for d in listed(env)}
    assert set(letters) == {"junk/1", "too-big"}, letters
    junk, big = letters["junk/1"], letters["too-big"]
    assert (junk["agent"], junk["code"], junk["attempts"]) == ("planner", "NOT_A_REQUEST", 1)
    assert (big["agent"], big["code"]) == ("planner", "SEND_REJECTED") and "MessageSizeTooLarge" in big["reason"]
    for d in (junk, big):
        assert re.fullmatch(rf"{re.escape(t.dead_letter)}/\d+/\d+", d["id"]), d
        assert re.fullmatch(rf"{re.escape(t.requests)}/\d+/\d+", d["origin"]), d
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", d["time"]), d
    assert junk["headers"]["origin-header"] == "kept"

    # the table: a header, a rule, a row per dead letter, oldest first
    code, out, err = run_cli(env, "dlq", "list")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["id", "time", "(UTC)", "agent"] and set(lines[1]) == {"-", " "}
    rows = lines[2:]
    assert [r.split()[0] for r in rows] == [junk["id"], big["id"]], out
    assert "NOT_A_REQUEST" in rows[0] and junk["origin"] in rows[0] and "junk/1" in rows[0]
    assert "SEND_REJECTED" in rows[1] and "too-big" in rows[1]
    assert err.strip() == f"2 dead letters on {t.dead_letter}"
    code, out, err = run_cli(env, "dlq", "list", "--limit", "1")
    assert code == 0 and len(out.splitlines()) == 3 and out.splitlines()[2].startswith(big["id"])
    assert "the 1 most recent shown" in err

    # an unknown id: one line, exit code 1, nothing sent
    code, out, err = run_cli(env, "dlq", "replay", "--id", f"{t.dead_letter}/0/999999")
    assert (code, out) == (1, "") and err.count("\n") == 1 and "no dead letter" in err, err

    # the cause is fixed (the limit removed above): the request, replayed, completes
    follower = p.follower()
    code, out, err = run_cli(env, "dlq", "replay", "--id", big["id"])
    assert code == 0, err
    assert out.startswith(f"{big['id']} -> {t.requests}/") and "key too-big" in out, out
    final = follower.wait(["too-big"], 120)["too-big"]
    assert final.status == "COMPLETED", final.errors
    assert final.correlationId == "c" * 500 and len(final.outputs) == 4
    p.check_outputs(final)
    # what went back: the original key and bytes, its own header, none of the pipeline's
    sent = [m for m in read_to_end(p.config, t.requests) if m.key() == b"too-big"]
    assert len(sent) == 2
    assert sent[-1].value() == sent[0].value() and not any(k.startswith("imagefork.") for k, _v in
                                                           (sent[-1].headers() or []))
    # a replay does not take the dead letter off the topic
    assert {d["id"] for d in listed(env)} == {junk["id"], big["id"]}


def test_dlq_replay_all_to_origin_twice_and_keyless(pipeline, files):
    """What `dlq replay` promises (docs/operations.md): `--all` sends every dead-lettered request back to
    the request topic and skips, saying so, a dead letter that is not a request; that one goes back only
    with `--to origin`, to the topic it came from, with its key, bytes and own headers (unchanged, it meets
    the same fault and is dead-lettered again); replaying twice sends twice, yet a request keyed by a
    workflow id that already ran is not run again (the join's notice), while a keyless request gets a new
    workflow id each time; a replayed dead letter stays on the topic."""
    from streams import serde
    from streams.core.models import WorkflowCompleted
    from streams.ops import read_dead_letters
    p, env = pipeline, pipeline.env
    t = p.config.topics
    tag = uuid.uuid4().hex[:8]
    keyed = f"twice-{tag}"
    pad = files.url("sample.png") + "?pad=" + "p" * 900  # with the correlation id, a plan over the 1 KB below

    def request(correlation: str) -> dict:
        return {"fileLocation": pad, "outputFormats": ["png"], "outputSizes": [{"width": 16, "height": 16}],
                "correlationId": correlation + "c" * 300}
    set_topic_config(p.config, t.events, "max.message.bytes", "1024")
    try:
        p.client.producer.produce(t.requests, key=None, value=json.dumps(request(f"keyless-{tag}")).encode())
        p.client.producer.produce(t.requests, key=keyed.encode(), value=json.dumps(request(f"keyed-{tag}")).encode())
        p.client.producer.produce(t.tasks, key=f"task-{tag}".encode(), value=b"not a task",
                                  headers={"origin-header": b"kept"})
        p.client.producer.flush(10)

        def mine() -> dict[str, object]:
            found = {}
            for d in read_dead_letters(p.config):
                if d.key is None and f"keyless-{tag}".encode() in (d.value or b""):
                    found.setdefault("keyless", d)
                elif d.key_text in (keyed, f"task-{tag}"):
                    found.setdefault(d.key_text, d)
            return found
        assert wait_until(lambda: len(mine()) == 3, 90, interval=1), mine()
    finally:
        set_topic_config(p.config, t.events, "max.message.bytes", None)
    letters = mine()
    keyless, big, task = letters["keyless"], letters[keyed], letters[f"task-{tag}"]
    assert (keyless.agent, keyless.code, big.code) == ("planner", "SEND_REJECTED", "SEND_REJECTED")
    assert (task.agent, task.code, task.origin_topic) == ("resize", "NOT_A_TASK", t.tasks), task

    # not a request: without --to origin it is one line and exit code 1, and nothing is sent
    code, out, err = run_cli(env, "dlq", "replay", "--id", task.id)
    assert (code, out) == (1, "") and err.count("\n") == 1, err
    assert "it is not a request; replay it with --to origin" in err, err

    def finals_of(correlation: str) -> list[WorkflowCompleted]:
        return [f for f in (WorkflowCompleted.from_dict(serde.decode("WorkflowCompleted", m.value()))
                            for m in read_to_end(p.config, t.completed))
                if (f.correlationId or "").startswith(correlation)]

    # --all: every request on the dead-letter topic to the request topic; the task is skipped, and said so
    before = read_dead_letters(p.config)
    requests = [d for d in before if d.origin_topic in (t.requests, t.request_retries)]
    others = [d for d in before if d not in requests]
    assert task in others and keyless in requests and big in requests
    follower = p.follower()
    code, out, err = run_cli(env, "dlq", "replay", "--all")
    assert code == 0, err
    sent = {line.split()[0]: line for line in out.splitlines()}
    assert set(sent) == {d.id for d in requests}, out
    assert f" -> {t.requests}/" in sent[keyless.id] and "key (none)" in sent[keyless.id], out
    assert f"key {keyed} " in sent[big.id], out
    assert f"skipped {len(others)} dead letter" in err and "replay" in err and "with --to origin" in err, err
    assert f"replayed {len(requests)} dead letter" in err, err
    assert follower.wait([keyed], 120)[keyed].status == "COMPLETED"
    assert wait_until(lambda: len(finals_of(f"keyless-{tag}")) == 1, 120, interval=1)

    # again: sent twice; the keyed one is not run again (the join's notice), the keyless one runs as a new id
    follower = p.follower()
    code, out, err = run_cli(env, "dlq", "replay", "--id", big.id, "--id", keyless.id)
    assert code == 0 and len(out.splitlines()) == 2, (out, err)
    follower.wait([keyed], 120)
    assert follower.notices[keyed]["reason"] == "finished", follower.notices
    assert wait_until(lambda: len(finals_of(f"keyless-{tag}")) == 2, 120, interval=1)
    assert len([m for m in read_to_end(p.config, t.requests) if m.key() == keyed.encode()]) == 3  # sent, twice again
    assert [f.status for f in p.finals_for([keyed])] == ["COMPLETED"]
    twice = finals_of(f"keyless-{tag}")  # counted after the drain above
    assert [f.status for f in twice] == ["COMPLETED", "COMPLETED"] and twice[0].workflowId != twice[1].workflowId, twice

    # --to origin: back to the task topic with its key, bytes and own header, none of the pipeline's; the
    # same fault dead-letters it again, from there
    code, out, err = run_cli(env, "dlq", "replay", "--id", task.id, "--to", "origin")
    assert code == 0 and out.startswith(f"{task.id} -> {t.tasks}/") and f"key task-{tag} " in out, (out, err)
    partition, offset = map(int, out.split()[2].rsplit("/", 2)[1:])
    [back] = [m for m in read_to_end(p.config, t.tasks) if (m.partition(), m.offset()) == (partition, offset)]
    assert (back.key(), back.value()) == (task.key, task.value)
    assert [(k, v) for k, v in back.headers() or []] == [("origin-header", b"kept")]
    assert wait_until(lambda: any(d.origin == f"{t.tasks}/{partition}/{offset}" and d.code == "NOT_A_TASK"
                                  for d in read_dead_letters(p.config)), 60, interval=1)
    # a replayed dead letter stays on the topic
    assert {keyless.id, big.id, task.id} <= {d.id for d in read_dead_letters(p.config)}


def test_status_shows_each_roles_group_member_and_partitions(pipeline):
    p = pipeline
    t = p.config.topics
    code, out, err = run_cli(p.env, "status")
    assert code == 0, err
    for role in ("planner", "resize", "join"):
        assert re.search(rf"^{role}  group {re.escape(p.config.group_id(role))}  \w+, 1 member, lag \d+$",
                         out, re.M), out
    for topic in (t.requests, t.tasks, t.events):  # every partition of each role's input is shown
        held = re.findall(rf"^    {re.escape(topic)}\s+(\d+)\s+committed", out, re.M)
        assert sorted(map(int, held)) == list(range(p.config.partitions)), (topic, out)
    assert re.search(r"^all roles: lag \d+", out, re.M), out


def test_a_kafka_that_does_not_answer_is_one_line(pipeline):
    """`status`, `dlq list` and `dlq replay --all` against a Kafka nobody answers at: each one line and exit
    code 1 within its 10 s (the three side by side: each waits out its own timeout)."""
    env = {**pipeline.env, "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}"}
    commands = [["status"], ["dlq", "list"], ["dlq", "replay", "--all"]]

    def timed(argv):  # a process each: run_cli redirects this process's stdout, one command at a time
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "streams", *argv], env={**os.environ, **env},
                              capture_output=True, text=True, timeout=60)
        return argv, (done.returncode, done.stdout, done.stderr), time.monotonic() - started
    with ThreadPoolExecutor(len(commands)) as pool:
        answers = list(pool.map(timed, commands))
    for argv, (code, out, err), took in answers:
        assert took < 20, (argv, took)  # not the reader's 30 s metadata wait
        assert (code, out) == (1, ""), (argv, out)
        assert err.count("\n") == 1 and err.startswith("imagefork: ") and "Kafka" in err, (argv, err)


class Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.src: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.src.append(dict(attrs)["src"])


def test_the_demo_writes_its_outputs_and_a_contact_sheet(pipeline, files, tmp_path):
    """What ``imagefork demo`` does once its workflow is done: the seed request's nine outputs downloaded
    (``imagefork get``'s code) beside an index.html that shows each, by relative links only."""
    p = pipeline
    earlier = tmp_path / "an-earlier-demo"
    earlier.mkdir()
    (earlier / "index.html").write_text("old")
    stranger = tmp_path / "not-a-demo"
    stranger.mkdir()
    follower = p.follower()
    workflow_id = p.submit(seed_request(files.url("sample.png")))
    final = follower.wait([workflow_id], 180)[workflow_id]
    assert final.status == "COMPLETED", final.errors
    sheet = save_outputs(p.config, final, tmp_path)
    assert sheet == tmp_path / workflow_id / "index.html"
    assert not earlier.exists() and stranger.exists()  # the previous demo's folder is replaced, nothing else
    parser = Images()
    parser.feed(sheet.read_text())
    assert len(parser.src) == 9
    by_name = {Path(o.s3Uri).name: o for o in final.outputs}
    assert sorted(parser.src) == sorted(by_name)  # relative: file names in the sheet's own folder
    page = sheet.read_text()
    for name, out in by_name.items():
        path = sheet.parent / name
        assert path.stat().st_size == out.bytes
        with Image.open(path) as im:
            assert im.size == (out.width, out.height)
        assert f"{out.width}x{out.height} &middot; {out.bytes:,} bytes" in page
    assert "://" not in "".join(parser.src)
    assert sorted(x.name for x in sheet.parent.iterdir()) == sorted([*by_name, "index.html"])


# --- demo --keep: the API/dashboard kept with the workers -----------------------------------------------
KEEP_API = """
import sys
from pathlib import Path
from streams.demo import start_api, wait_for_http
from streams.stack.processes import keep_workers
folder = Path(sys.argv[1])
api, url = start_api({}, folder / "workers")
if not wait_for_http(api, url, 120):
    sys.exit("the api did not answer: " + api.log_tail())
keep_workers(folder, [api])
print(api.pid, url)
"""


def http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return answer.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def test_a_kept_api_serves_the_dashboard_and_demo_stop_stops_it(pipeline, tmp_path):
    """What ``imagefork demo --keep`` does with its API process: started on a free loopback port, kept
    when its starter exits, the dashboard answering at the printed URL; ``imagefork demo --stop`` stops it."""
    stack_dir, demo_dir = tmp_path / "stack", tmp_path / "demo-stack"  # the demo's folder is the sibling
    env = {**os.environ, **pipeline.env, "IMAGEFORK_NAMESPACE": pipeline.config.namespace + "kept."}
    starter = subprocess.run([sys.executable, "-c", KEEP_API, str(demo_dir)], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=180)
    assert starter.returncode == 0, starter.stderr
    pid, url = starter.stdout.split()[-2:]
    pid = int(pid)
    try:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/", url)
        assert http_status(url) == 200, "the kept dashboard does not answer"
        with urllib.request.urlopen(url, timeout=5) as answer:
            assert b"<html" in answer.read(2000).lower()
        code, out, err = run_cli({"IMAGEFORK_STACK_DIR": str(stack_dir)}, "demo", "--stop")
        assert code == 0, err
        assert out.startswith("stopped: worker api") and str(demo_dir) in out, out
        assert wait_until(lambda: _start_ticks(pid) is None, 10), "the kept api is still running"
        assert process_group_members(pid) == []
        assert http_status(url) is None
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


def test_make_demo_runs_the_seed_request_end_to_end_and_stops_everything(tmp_path):
    """`make demo`'s entry point as a user runs it (`python -m streams demo`, a stack folder of its own): it
    starts the local Kafka and S3 server, submits the seed request, prints its nine outputs, writes them and a
    contact sheet, says its links are copies, stops cleanly (exit 0) and leaves no process of its stack."""
    env = {**os.environ, "IMAGEFORK_STACK_DIR": str(tmp_path / "stack")}
    for name in ("KAFKA_BOOTSTRAP_SERVERS", "S3_ENDPOINT_URL", "IMAGEFORK_NAMESPACE"):
        env.pop(name, None)
    proc = subprocess.run([sys.executable, "-m", "streams", "demo"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    assert ": COMPLETED (9 of 9 outputs" in proc.stdout, proc.stdout
    assert "the 9 outputs and a contact sheet are in " in proc.stderr and "(copies: the stack stops now" in proc.stderr
    sheet = next((tmp_path / "demo-outputs").glob(f"*/{SHEET}"))
    assert len([p for p in sheet.parent.iterdir() if p.name != SHEET]) == 9
    state = tmp_path / "demo-stack" / "state.json"
    pids = [svc["pid"] for svc in json.loads(state.read_text()).get("services", {}).values()] if state.exists() else []
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()], "the demo's stack is still running"
