"""``make demo``: the seed request end to end on the local stack; its outputs and a contact sheet
(``index.html``) written to a local folder; then everything stopped (or, with ``--keep``, the stack, the
workers and an API/dashboard process left running until ``imagefork demo --stop``)."""
from __future__ import annotations

import html
import os
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from streams.adapters.kafka import ensure_topics
from streams.client import Client, Follower
from streams.config import Config
from streams.console import download_outputs, output_links, print_final, progress_bar
from streams.core.errors import PipelineError
from streams.stack.local import LocalStack, default_state_dir, free_port
from streams.stack.processes import FileServer, WorkerProcess, keep_workers, stop_kept_workers, wait_for_log

SAMPLE = Path(__file__).parent / "assets" / "sample.png"
SEED_SIZES = [{"width": 300, "height": 300}, {"width": 200, "height": 200}, {"width": 1200, "height": 1200}]
# the demo's printed links are presigned for this long unless IMAGEFORK_PRESIGN_TTL_S says otherwise
DEMO_PRESIGN_TTL_S = "3600"
STOP_COMMAND = "imagefork demo --stop"


def seed_request(location: str) -> dict:
    return {"fileLocation": location, "outputFormats": ["png", "jpg", "webp"],
            "outputSizes": SEED_SIZES, "maintainAspectRatio": True}


def say(msg: str) -> None:
    print(f"==> {msg}", file=sys.stderr, flush=True)


def demo_stack_dir() -> Path:
    """The demo's own stack folder, beside the default one (``imagefork stack up`` never touches it)."""
    return default_state_dir().parent / "demo-stack"


def demo_outputs_dir() -> Path:
    """Where the demo writes its outputs and contact sheet: a folder per workflow in here, beside the
    demo's stack; each demo replaces the previous one's."""
    return default_state_dir().parent / "demo-outputs"


SHEET = "index.html"


def write_contact_sheet(folder: Path, final, files: list) -> Path:
    """``folder/index.html``: each downloaded output (``files``: (path, output) pairs, the files in
    ``folder``) as an image with its format, size and bytes, one row per size, one column per format.
    Links are relative, so the page works offline from file:// and wherever the folder is moved."""
    formats = list(dict.fromkeys(out.format for _path, out in files))
    sizes = sorted({(out.width, out.height) for _path, out in files}, key=lambda wh: wh[0] * wh[1])
    cell = {(out.width, out.height, out.format): (path, out) for path, out in files}
    esc = html.escape
    seconds = (final.completedAt - final.submittedAt) / 1000
    rows = []
    for width, height in sizes:
        cells = []
        for fmt in formats:
            found = cell.get((width, height, fmt))
            if found is None:
                cells.append('<td class="none">-</td>')
                continue
            path, out = found
            href = esc(urllib.parse.quote(path.name))
            cells.append(
                f'<td><a href="{href}"><img src="{href}" width="{out.width}" height="{out.height}" '
                f'alt="{esc(out.format)} {out.width}x{out.height}" loading="lazy"></a>'
                f'<div class="caption"><b>{esc(out.format)}</b> {out.width}x{out.height} '
                f'&middot; {out.bytes:,} bytes<br><a href="{href}">{esc(path.name)}</a></div></td>')
        rows.append(f"<tr><th>{width}x{height}</th>{''.join(cells)}</tr>")
    errors = "".join(f"<li>{esc(e.taskRef or '(request)')}: {esc(e.code)}: {esc(e.message)}</li>"
                     for e in final.errors)
    head = "".join(f"<th>{esc(fmt)}</th>" for fmt in formats)
    total = sum(out.bytes for _path, out in files)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>imagefork demo: {esc(final.workflowId)}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; }}
th, td {{ padding: .6em; vertical-align: top; text-align: left; border-bottom: 1px solid #ddd; }}
tbody th {{ white-space: nowrap; }}
img {{ display: block; max-width: 360px; height: auto;
  background: repeating-conic-gradient(#ccc 0% 25%, #fff 0% 50%) 50% / 16px 16px; }}
.caption {{ margin-top: .3em; color: #555; }}
.none {{ color: #999; }}
code {{ font-size: 13px; }}
</style></head><body>
<h1>imagefork demo</h1>
<p>Workflow <code>{esc(final.workflowId)}</code>: <b>{esc(final.status)}</b>, {len(final.outputs)} of
{final.taskCount} outputs, {total:,} bytes, {seconds:.2f}s from submission to the final event.<br>
Source: <code>{esc(final.fileLocation)}</code>. Images wider than 360 pixels are shown scaled down; each
links to the file itself.</p>
{f"<ul>{errors}</ul>" if errors else ""}
<table><thead><tr><th></th>{head}</tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody></table>
</body></html>
"""
    sheet = folder / SHEET
    sheet.write_text(page, encoding="utf-8")
    return sheet


def save_outputs(config: Config, final, parent: Path | None = None) -> Path:
    """Download ``final``'s outputs (as ``imagefork get`` does) to ``parent/<workflowId>/`` (default:
    ``demo_outputs_dir()``, earlier demos' folders there removed) and write the contact sheet; return
    its path."""
    parent = parent or demo_outputs_dir()
    if parent.is_dir():
        for old in parent.iterdir():
            if old.is_dir() and (old / SHEET).exists() and old.name != final.workflowId:
                shutil.rmtree(old, ignore_errors=True)
    folder = parent / final.workflowId
    files = download_outputs(config, final, folder)
    return write_contact_sheet(folder, final, files)


def start_api(env: dict[str, str], logs: Path):
    """The API and dashboard (``imagefork worker api``) as a worker process on a free loopback port;
    returns it and the dashboard's URL (``wait_for_http`` tells when it answers)."""
    listen = f"127.0.0.1:{free_port()}"
    return WorkerProcess("api", {**env, "IMAGEFORK_API_LISTEN": listen}, logs), f"http://{listen}/"


def wait_for_http(worker, url: str, timeout: float = 60.0) -> bool:
    """Until ``url`` answers (any HTTP status) while ``worker`` runs."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and worker.alive():
        try:
            with urllib.request.urlopen(url, timeout=2):
                return True
        except urllib.error.HTTPError:
            return True  # it answered
        except OSError:
            time.sleep(0.3)
    return False


def stop_demo() -> int:
    """``imagefork demo --stop``: the workers, the API and the stack a ``--keep`` demo left running."""
    stack = LocalStack(demo_stack_dir())
    stopped = [f"worker {name}" for name in stop_kept_workers(stack.dir)] + stack.down()
    print(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'} ({stack.dir})")
    return 0


def run_demo(keep: bool = False) -> int:

    stack = LocalStack(demo_stack_dir())
    # workers a previous --keep demo left: this run starts its own
    stop_kept_workers(stack.dir)
    if not stack.running():
        shutil.rmtree(stack.dir, ignore_errors=True)  # every demo starts from empty topics and bucket
    say("starting the local stack (Apache Kafka in KRaft mode + S3Proxy; fetched with mvn on first use)")
    env = stack.up()
    for k, v in env.items():
        say(f"  {k}={v}")
    logs = stack.dir / "workers"
    server = FileServer(SAMPLE.parent)
    env = {**env, "IMAGEFORK_FETCH_ALLOW": "127.0.0.0/8", "IMAGEFORK_PARTITIONS": "6",
           "IMAGEFORK_PRESIGN_TTL_S": os.environ.get("IMAGEFORK_PRESIGN_TTL_S") or DEMO_PRESIGN_TTL_S}
    workers: list[WorkerProcess] = []
    api: WorkerProcess | None = None
    api_url = ""
    finished = False
    code = 1
    try:
        os.environ.update(env)
        config = Config.from_env()
        ensure_topics(config)
        say(f"starting the workers (planner, resize, join); logs in {logs}")
        workers = [WorkerProcess(role, env, logs) for role in ("join", "resize", "planner")]
        if keep:  # the dashboard starts beside them; it is waited for once the demo's request is done
            api, api_url = start_api(env, logs)
        for w in workers:
            if not wait_for_log(w, "imagefork ready", 120):
                say(f"worker {w.role} did not come up:\n{w.log_tail()}")
                return 1
        request = seed_request(server.url(SAMPLE.name))
        say(f"serving the sample image (Hubble Deep Field, 900x900 PNG) at {request['fileLocation']}")
        follower = Follower(config)
        client = Client(config)
        workflow_id = client.submit(request)
        say(f"submitted workflow {workflow_id}: png, jpg, webp x 300x300, 200x200, 1200x1200")
        final = follower.wait([workflow_id], 300, progress_bar())[workflow_id]
        follower.close()
        client.close()
        del client, follower  # librdkafka handles go before the broker does
        # live links only when the stack stays up (--keep); else the copies below are what opens afterwards
        print_final(final, links=output_links(config, final) if keep else None, ttl_s=config.presign_ttl_s,
                    urls=keep)
        # one duration, the final event's line above (submission to final event), not a second of the client's
        finished = True
        code = 0 if final.status == "COMPLETED" else 1
        if final.outputs:
            try:
                sheet = save_outputs(config, final)
            except (PipelineError, OSError) as exc:
                say(f"the outputs could not be saved: {exc}")
                code = 1
            else:
                say(f"the {len(final.outputs)} outputs and a contact sheet are in {sheet.parent}/")
                say(f"  open {sheet.resolve().as_uri()}")
                if not keep:
                    say("  (copies: the stack stops now, so no link into it would open; `imagefork demo --keep` "
                        "keeps it running and prints live links)")
        if api is not None:
            if not wait_for_http(api, api_url, 60):
                say(f"the API/dashboard did not come up (logs in {api.log_path}):\n{api.log_tail()}")
                api.stop()
                api = None
                code = 1
        return code
    finally:
        server.close()
        started_here = workers + ([api] if api is not None else [])
        if keep and finished:
            keep_workers(stack.dir, started_here)
            say(f"kept running: Kafka, S3Proxy and the workers ({', '.join(w.role for w in started_here)}; "
                f"logs in {logs})")
            if api is not None:
                say(f"  dashboard: {api_url}")
            say(f"  more requests: set -a; . {stack.env_file}; set +a; "
                f"IMAGEFORK_PRESIGN_TTL_S={env['IMAGEFORK_PRESIGN_TTL_S']} imagefork submit examples/request.json --wait")
            say(f"  stop them all: {STOP_COMMAND}   (the same: imagefork stack down --dir {stack.dir})")
        else:
            say("stopping the workers" + (" (the stack is kept; stop it with: "
                                          f"{STOP_COMMAND})" if keep else " and the stack"))
            for w in started_here:
                w.terminate()  # all at once, then each waited for
            for w in started_here:
                w.stop()
            if not keep:
                stack.down()
