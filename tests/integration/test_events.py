"""Reading the final events from outside (docs/contract.md "Reading the final events", issue 26 item 7), against the
real broker: the README's decode snippet run as written (its topic and patience aside), ``imagefork events``
(summary lines and ``--json``), and the JSON mirror (IMAGEFORK_COMPLETED_JSON_TOPIC) written in the join's
transactions: one record per workflow, the same document as the Avro final event's."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.pipeline import run_cli
from streams.adapters.kafka import read_to_end

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def readme_snippet() -> str:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- decode-snippet[^>]*-->\n```python\n(.*?)```", text, re.S)
    assert block, "the README's decode snippet (after its <!-- decode-snippet --> marker) is gone"
    return block.group(1)


def test_final_events_read_from_outside_the_snippet_the_events_command_and_the_json_mirror(make_pipeline, files):
    mirror = f"{os.urandom(4).hex()}.completed.json"
    p = make_pipeline(IMAGEFORK_COMPLETED_JSON_TOPIC=mirror).start_all()
    follower = p.follower()
    request = {"fileLocation": files.url("sample.png"), "outputFormats": ["png", "webp"],
               "outputSizes": [{"width": 40, "height": 30}], "maintainAspectRatio": True}
    ok = p.submit(request, "events-ok")
    rejected = p.submit({**request, "outputFormats": ["pngg"]}, "events-rejected")  # a typo: REJECTED
    follower.wait([ok, rejected], 120)
    follower.close()
    finals = {f.workflowId: f for f in p.finals_for([ok, rejected])}
    assert finals[ok].status == "COMPLETED" and finals[rejected].status == "REJECTED", finals
    documents = {wf: final.document() for wf, final in finals.items()}
    assert documents[ok]["request"]["outputFormats"] == ["png", "webp"] and documents[rejected]["request"] is None

    # the JSON mirror: exactly one committed record per workflow, the same document, plain UTF-8 JSON
    records = [m for m in read_to_end(p.config, mirror) if m.key().decode() in finals]
    assert sorted(m.key().decode() for m in records) == sorted(finals), records
    for m in records:
        assert json.loads(m.value().decode("utf-8")) == documents[m.key().decode()]

    # imagefork events: a line per final event; --json: the same documents
    code, out, err = run_cli(p.env, "events", "--json")
    assert code == 0, err
    printed = {d["workflowId"]: d for d in map(json.loads, out.splitlines()) if d["workflowId"] in finals}
    assert printed == documents
    code, out, err = run_cli(p.env, "events")
    assert code == 0, err
    assert re.search(rf"  {ok}  COMPLETED  2/2 outputs  \d+\.\d\ds$", out, re.M), out
    code_word = finals[rejected].errors[0].code
    assert re.search(rf"  {rejected}  REJECTED  0/0 outputs  \d+\.\d\ds {code_word}$", out, re.M), out

    # the README's snippet, as a newcomer runs it (from the repository, schemas/ beside it)
    code = readme_snippet().replace('"imagefork.completed"', json.dumps(p.config.topics.completed))
    code = code.replace("consumer.poll(10)", "consumer.poll(5)")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "KAFKA_BOOTSTRAP_SERVERS": p.config.bootstrap_servers})
    assert run.returncode == 0, run.stderr
    lines = {line.split(" ", 1)[0]: line for line in run.stdout.splitlines()}
    assert lines[ok].startswith(f"{ok} COMPLETED [") and "'outputFormats': ['png', 'webp']" in lines[ok], lines
    assert lines[rejected].startswith(f"{rejected} REJECTED [] None"), lines
