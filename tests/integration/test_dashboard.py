"""The dashboard (streams/assets/dashboard.html, served by `imagefork api` at /) in a real browser.

Headless Chromium, driven by Playwright: Debian's `chromium` package (`make browser` installs it as root;
.ci/run does), never a browser downloaded by `playwright install`. Without a chromium binary the tests
skip and say so, unless IMAGEFORK_REQUIRE_BROWSER=1 (set by .ci/run), where they fail instead.

The API runs as a worker role beside join, resize and planner (`python -m streams worker api`), on the
test's own namespace. IMAGEFORK_SCREENSHOT=docs/dashboard.png saves a screenshot of the page with the seed
request's nine outputs.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import urllib.request
import uuid
from pathlib import Path

import pytest

from streams.demo import seed_request
from tests.integration.pipeline import Pipeline, wait_until

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TERMINAL_S = 60_000  # ms: a workflow's whole run, with the page following it


def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser"):
        if path := shutil.which(name):
            return path
    return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def browser():
    binary = chromium_binary()
    if binary is None:
        why = "no chromium binary (Debian: `apt-get install chromium`, or `make browser` as root)"
        if os.environ.get("IMAGEFORK_REQUIRE_BROWSER", "").strip().lower() not in ("", "0", "false", "no"):
            pytest.fail(why + ", and IMAGEFORK_REQUIRE_BROWSER is set")
        pytest.skip(why)
    from playwright.sync_api import sync_playwright
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=binary)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def pipeline(browser, request, tmp_path_factory):
    """The whole pipeline plus the API role, started side by side: (pipeline, the API's base URL).
    (IMAGEFORK_API_URL points the tests at an API already running instead, and no pipeline; its planner
    must reach the test's file server.)"""
    if given := os.environ.get("IMAGEFORK_API_URL"):
        yield None, given.rstrip("/")
        return
    stack_env = request.getfixturevalue("stack_env")  # after `browser`: no stack is started for a skip
    listen = f"127.0.0.1:{free_port()}"
    p = Pipeline(stack_env, f"d{uuid.uuid4().hex[:8]}.", tmp_path_factory.mktemp("logs"))
    try:
        p.start_together("join", "resize", "planner", ("api", {"IMAGEFORK_API_LISTEN": listen}))
        url = f"http://{listen}"
        assert wait_until(lambda: answers(url + "/v1/workflows?limit=1"), 30), f"the API does not answer:\n{p.logs()}"
        yield p, url
    finally:
        p.stop()


@pytest.fixture(scope="module")
def api_url(pipeline):
    return pipeline[1]


@pytest.fixture
def page(browser, api_url):
    context = browser.new_context(base_url=api_url, viewport={"width": 1280, "height": 900})
    # count the server-sent events the page receives, to tell a live update from a reload
    context.add_init_script("""(() => {
        const Original = window.EventSource;
        window.__events = [];
        window.EventSource = class extends Original {
            constructor(...args) {
                super(...args);
                for (const kind of ["progress", "final"]) this.addEventListener(kind, () => window.__events.push(kind));
            }
        };
    })();""")
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    # a 4xx the test asks for is logged as "Failed to load resource": the page shows it, it is no fault
    page.on("console", lambda msg: problems.append(f"console {msg.type}: {msg.text}")
            if msg.type == "error" and not msg.text.startswith("Failed to load resource") else None)
    page.goto("/")
    yield page
    context.close()
    assert not problems, problems


def submit(page, request: dict) -> str:
    """Submit ``request`` with the page's form; the page selects the new workflow: its id."""
    from playwright.sync_api import expect
    page.get_by_test_id("submit-json").fill(json.dumps(request, indent=2))
    page.get_by_test_id("submit-button").click()
    expect(page.get_by_test_id("submit-result-text")).to_contain_text("Accepted as ", timeout=10_000)
    workflow_id = page.get_by_test_id("submit-result-text").inner_text().removeprefix("Accepted as ").rstrip(".")
    expect(page.get_by_test_id("detail-id")).to_have_text(workflow_id)
    return workflow_id


def document(page, workflow_id: str) -> dict:
    resp = page.request.get(f"/v1/workflows/{workflow_id}")
    assert resp.ok, resp.text()
    return resp.json()


def test_a_source_that_is_not_there_shows_its_error(page, files):
    from playwright.sync_api import expect
    # markup in the location comes back in the error message: it must show as text, not as elements
    request = {**seed_request(files.url("not-here.png") + "?<b>bold</b>")}
    workflow_id = submit(page, request)

    expect(page.get_by_test_id("detail-status")).to_have_text("FAILED", timeout=TERMINAL_S)
    doc = document(page, workflow_id)
    assert doc["status"] == "FAILED" and doc["errors"], doc
    error = doc["errors"][0]
    assert error["code"] == "SOURCE_NOT_FOUND", error

    item = page.get_by_test_id("error-item").first
    expect(item.get_by_test_id("error-code")).to_have_text("SOURCE_NOT_FOUND")
    expect(item.get_by_test_id("error-message")).to_have_text(error["message"])
    assert "404" in error["message"]
    assert page.get_by_test_id("error-list").locator("b, img, script").count() == 0
    expect(page.get_by_test_id("retry-button")).to_be_visible()
    expect(page.get_by_test_id("output-img")).to_have_count(0)
    row = page.locator(f'[data-testid="workflow-row"][data-workflow-id="{workflow_id}"]')
    expect(row.get_by_test_id("workflow-status")).to_have_text("FAILED", timeout=5_000)

    # Retry: a new run of the same workflow, which fails the same way; the page follows it to its end
    page.get_by_test_id("retry-button").click()
    expect(page.get_by_test_id("detail-notice-text")).to_contain_text("Retrying")
    expect(page.get_by_test_id("fact-retry-of-run")).to_have_text(doc["runId"], timeout=TERMINAL_S)
    expect(page.get_by_test_id("detail-status")).to_have_text("FAILED", timeout=TERMINAL_S)
    expect(page.get_by_test_id("retry-button")).to_be_visible()


def test_a_running_workflow_is_cancelled_with_its_button(page, files):
    from playwright.sync_api import expect
    request = {"fileLocation": files.url("sample.png"), "outputFormats": ["jpg"], "maintainAspectRatio": True,
               "outputSizes": [{"width": 16 + i, "height": 16 + i} for i in range(300)]}
    workflow_id = submit(page, request)
    expect(page.get_by_test_id("cancel-button")).to_be_visible(timeout=10_000)
    asked = []
    page.once("dialog", lambda dialog: (asked.append(dialog.message), dialog.accept()))
    page.get_by_test_id("cancel-button").click()
    expect(page.get_by_test_id("detail-notice-text")).to_contain_text("Cancelling")
    expect(page.get_by_test_id("detail-status")).to_have_text("CANCELLED", timeout=TERMINAL_S)
    assert asked and workflow_id in asked[0]
    expect(page.get_by_test_id("cancel-button")).to_be_hidden()
    expect(page.get_by_test_id("retry-button")).to_be_visible()  # a cancelled run is resumed by a retry
    doc = document(page, workflow_id)
    assert doc["status"] == "CANCELLED" and len(doc["outputs"]) < 300
    expect(page.get_by_test_id("output-img")).to_have_count(len(doc["outputs"]))


def test_a_request_that_breaks_the_contract_shows_its_problems(page):
    from playwright.sync_api import expect
    page.get_by_test_id("submit-json").fill(json.dumps({"fileLocation": "", "outputFormats": ["png"]}))
    page.get_by_test_id("submit-button").click()
    result = page.get_by_test_id("submit-result-text")
    expect(result).to_contain_text("fileLocation", timeout=10_000)
    expect(result.get_by_test_id("problem").first).to_be_visible()


def test_the_seed_request_shows_nine_thumbnails_and_completes(page, files):
    from playwright.sync_api import expect
    workflow_id = submit(page, seed_request(files.url("sample.png")))

    # followed live (events stream, list polling): no reload between the submit and COMPLETED
    expect(page.get_by_test_id("detail-status")).to_have_text("COMPLETED", timeout=TERMINAL_S)
    expect(page.get_by_test_id("output-img")).to_have_count(9)
    page.wait_for_function(
        """() => { const imgs = [...document.querySelectorAll('[data-testid="output-img"]')];
                   return imgs.length === 9 && imgs.every((i) => i.complete && i.naturalWidth > 0); }""",
        timeout=20_000)
    expect(page.get_by_test_id("retry-button")).to_be_hidden()
    expect(page.get_by_test_id("cancel-button")).to_be_hidden()
    expect(page.get_by_test_id("detail-progress-count")).to_have_text("9/9")
    # the source's placeholder was painted under each thumbnail, and is gone once its image loaded
    expect(page.get_by_test_id("placeholder")).to_have_count(9)
    page.wait_for_function(
        """() => [...document.querySelectorAll('[data-testid="placeholder"]')].every((f) => !f.style.background)""",
        timeout=20_000)
    events = page.evaluate("window.__events")
    assert events.count("final") == 1 and events[-1] == "final", events  # the stream brought COMPLETED

    # each card shows its output's own format, size and bytes, and its image is that output
    doc = document(page, workflow_id)
    outputs = {o["taskRef"]: o for o in doc["outputs"]}
    assert len(outputs) == 9, doc
    shown = page.get_by_test_id("output-card").evaluate_all(
        """cards => cards.map((c) => ({ ref: c.dataset.taskRef,
                format: c.querySelector('[data-testid="output-format"]').textContent,
                size: c.querySelector('[data-testid="output-size"]').textContent,
                natural: [c.querySelector('img').naturalWidth, c.querySelector('img').naturalHeight],
                href: c.querySelector('[data-testid="output-link"]').getAttribute('href') }))""")
    assert sorted(s["ref"] for s in shown) == sorted(outputs)
    for s in shown:
        out = outputs[s["ref"]]
        assert s["format"] == out["format"]
        assert s["size"] == f"{out['width']}×{out['height']}"
        assert s["natural"] == [out["width"], out["height"]], s
        assert s["href"] == out["href"]
    assert sorted(s["format"] for s in shown) == ["jpg"] * 3 + ["png"] * 3 + ["webp"] * 3

    row = page.locator(f'[data-testid="workflow-row"][data-workflow-id="{workflow_id}"]')
    expect(row.get_by_test_id("workflow-status")).to_have_text("COMPLETED", timeout=5_000)
    expect(row.get_by_test_id("workflow-progress-count")).to_have_text("9/9")

    if target := os.environ.get("IMAGEFORK_SCREENSHOT"):
        path = Path(target) if Path(target).is_absolute() else ROOT / target
        page.screenshot(path=str(path), full_page=True)


def test_with_tokens_the_page_signs_in_and_each_scope_shows(browser, pipeline, files, tmp_path):
    """An API with a token file: the page asks for a token, keeps it for the session (a cookie), shows who
    is signed in, refuses what the token's scopes do not cover, loads thumbnails with it, and asks again
    once the token is revoked (no restart)."""
    from playwright.sync_api import expect
    from streams.core.access import new_token, token_line
    p, _url = pipeline
    if p is None:
        pytest.fail("this test starts its own API with tokens: unset IMAGEFORK_API_URL")
    viewer, admin = new_token(), new_token()
    tokens = tmp_path / "tokens"
    tokens.write_text(token_line("viewer", frozenset({"read"}), viewer) + "\n"
                      + token_line("admin", frozenset({"read", "submit", "operate"}), admin) + "\n")
    listen = f"127.0.0.1:{free_port()}"
    api = p.start("api", name="api-tokens", IMAGEFORK_API_LISTEN=listen, IMAGEFORK_API_TOKENS_FILE=str(tokens))
    context = browser.new_context(base_url=f"http://{listen}", viewport={"width": 1280, "height": 900})
    try:
        page = context.new_page()
        page.goto("/")
        expect(page.get_by_test_id("signin")).to_be_visible()
        expect(page.get_by_test_id("connection")).to_have_text("signed out")
        assert page.request.get("/v1/workflows").status == 401

        page.get_by_test_id("token-input").fill("ifk_not-a-token")
        page.get_by_test_id("signin-button").click()
        expect(page.get_by_test_id("signin-result-text")).to_contain_text("UNAUTHORIZED")

        page.get_by_test_id("token-input").fill(viewer)
        page.get_by_test_id("signin-button").click()
        expect(page.get_by_test_id("who")).to_have_text("viewer (read)")
        expect(page.get_by_test_id("signin")).to_be_hidden()
        expect(page.get_by_test_id("connection")).to_contain_text("updated", timeout=10_000)
        page.reload()  # kept for the session
        expect(page.get_by_test_id("who")).to_have_text("viewer (read)")
        page.get_by_test_id("submit-json").fill(json.dumps(seed_request(files.url("sample.png"))))
        page.get_by_test_id("submit-button").click()
        expect(page.get_by_test_id("submit-result-text")).to_contain_text("FORBIDDEN", timeout=10_000)
        expect(page.get_by_test_id("submit-result-text")).to_contain_text("it needs submit")

        page.get_by_test_id("signout-button").click()
        expect(page.get_by_test_id("signin")).to_be_visible()
        assert page.request.get("/v1/workflows").status == 401  # the cookie is gone
        page.get_by_test_id("token-input").fill(admin)
        page.get_by_test_id("signin-button").click()
        expect(page.get_by_test_id("who")).to_have_text("admin (read, submit, operate)")
        request = {"fileLocation": files.url("sample.png"), "outputFormats": ["png", "webp"],
                   "outputSizes": [{"width": 64, "height": 64}], "maintainAspectRatio": True}
        workflow_id = submit(page, request)
        expect(page.get_by_test_id("detail-status")).to_have_text("COMPLETED", timeout=TERMINAL_S)
        page.wait_for_function(  # each thumbnail came through the API with the session's token
            """() => { const imgs = [...document.querySelectorAll('[data-testid="output-img"]')];
                       return imgs.length === 2 && imgs.every((i) => i.complete && i.naturalWidth > 0); }""",
            timeout=20_000)

        tokens.write_text(token_line("viewer", frozenset({"read"}), viewer) + "\n")  # admin revoked
        expect(page.get_by_test_id("signin")).to_be_visible(timeout=10_000)
        expect(page.get_by_test_id("signin-result-text")).to_contain_text("not known here")
        log = api.log_tail(400)
        assert f"audit: who=admin action=POST /v1/workflows workflow={workflow_id} status=202" in log, log
        assert "audit: who=viewer action=POST /v1/workflows workflow=" in log and "status=403" in log, log
    finally:
        context.close()
        api.stop()
