"""What the pipeline has seen by source bytes (streams/core/sources.py) and the API's /v1/sources and
/v1/similar over it, with no Kafka: final events fed to the catalog as the sources topic would."""
import asyncio
import json

import pytest
from aiohttp.test_utils import TestClient, TestServer

from streams.api.routes import Api
from streams.config import Config
from streams.core.models import SourceFacts, TaskOutput, WorkflowCompleted
from streams.core.sources import SourceCatalog

A, B, C = "a" * 64, "b" * 64, "c" * 64


def final(wf, sha, phash, status="COMPLETED", at=5):
    facts = SourceFacts(sha, 900, 600, "jpeg", 1, False, 1, "RGB", phash=phash, blurhash="LEHV6nWB2yk8pyo0adR*.7kCMdnj")
    out = TaskOutput("image_convert_resize_png_10x10_0", "png", 10, 7, 99, "image/png", f"s3://b/{wf}/x.png",
                     f"http://s3/b/{wf}/x.png")
    return WorkflowCompleted(wf, None, status, "http://x/y.jpg", (out.url,), (out,), (), 1, 1, at, runId="r",
                             facts=facts)


def catalog(capacity=100):
    c = SourceCatalog(capacity)
    c.add(final("wf-1", A, "ffff000000000000"))
    c.add(final("wf-2", A, "ffff000000000000", at=9))
    c.add(final("wf-3", B, "ffff000000000003"))  # 2 bits from A's
    c.add(final("wf-4", C, "0000ffffffffffff"))  # far
    return c


def test_a_source_lists_the_workflows_made_from_its_bytes_latest_first():
    doc = catalog().source(A)
    assert [w["workflowId"] for w in doc["workflows"]] == ["wf-2", "wf-1"]
    assert doc["facts"]["sha256"] == A and doc["workflows"][0]["outputs"][0]["href"].startswith("/v1/workflows/wf-2/")
    assert catalog().source("d" * 64) is None


def test_a_workflow_run_again_is_listed_once_with_its_latest_final():
    c = catalog()
    c.add(final("wf-1", A, "ffff000000000000", status="FAILED", at=20))
    assert [(w["workflowId"], w["status"]) for w in c.source(A)["workflows"]] == [
        ("wf-1", "FAILED"), ("wf-2", "COMPLETED")]


def test_similar_sources_nearest_first_within_the_distance():
    found = catalog().similar(int("ffff000000000001", 16), 2, 10)
    assert [(f["sha256"], f["distance"], f["workflows"]) for f in found] == [(A, 1, 2), (B, 1, 1)]
    assert [f["sha256"] for f in catalog().similar(int("ffff000000000000", 16), 0, 10)] == [A]
    assert catalog().similar(int("ffff000000000000", 16), 64, 1)[0]["sha256"] == A


def test_the_oldest_sources_are_forgotten_past_the_capacity():
    c = catalog(capacity=3)
    assert c.source(A) is None and c.source(B) and c.source(C) and c.count == 2
    assert [f["sha256"] for f in c.similar(int("ffff000000000003", 16), 64, 10)] == [B, C]


class Offline(Api):
    """The API's handlers over a catalog: no Kafka."""

    def __init__(self, ready=True):
        super().__init__(Config())
        self.sources.catalog = catalog()
        if ready:
            self.sources.caught_up.set()

    async def _start(self, _app):
        pass

    async def _stop(self, _app):
        pass


def ask(path, ready=True):
    async def go():
        async with TestClient(TestServer(Offline(ready).app())) as client:
            resp = await client.get(path)
            return resp.status, dict(resp.headers), json.loads(await resp.read())
    return asyncio.run(go())


def test_the_http_answers():
    status, _, doc = ask(f"/v1/sources/{A.upper()}")
    assert status == 200 and len(doc["workflows"]) == 2
    assert ask(f"/v1/sources/{'d' * 64}")[0] == 404
    status, _, doc = ask("/v1/sources/nope")
    assert status == 400 and doc["problems"][0]["field"] == "sha256"
    status, _, doc = ask("/v1/similar?phash=FFFF000000000001&distance=1")
    assert status == 200 and [s["sha256"] for s in doc["sources"]] == [A, B]
    assert ask("/v1/similar?phash=ffff000000000001")[2]["distance"] == 8


@pytest.mark.parametrize("query, field", [("phash=xyz", "phash"), ("phash=ffff000000000001&distance=65", "distance"),
                                          ("phash=ffff000000000001&limit=0", "limit"), ("", "phash")])
def test_bad_questions_name_their_field(query, field):
    status, _, doc = ask(f"/v1/similar?{query}")
    assert status == 400 and field in [p["field"] for p in doc["problems"]]


def test_before_the_topic_was_read_the_answer_is_later():
    status, headers, doc = ask("/v1/similar?phash=ffff000000000001", ready=False)
    assert status == 503 and headers["Retry-After"] == "2"
    assert ask(f"/v1/sources/{A}", ready=False)[0] == 200  # known already: answered
    assert ask(f"/v1/sources/{'d' * 64}", ready=False)[0] == 503
