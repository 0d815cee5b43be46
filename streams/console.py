"""What the CLI and the demo print: a progress bar, a final event as a table, output links and downloads."""
from __future__ import annotations

import sys
from pathlib import Path

from streams.config import Config
from streams.core.models import WorkflowCompleted


def progress_bar(stream=None):
    """A bar redrawn in place on a terminal; elsewhere (a log file, a pipe) a plain line when the plan is
    known and at each quarter of the tasks, with no carriage returns."""
    shown: dict[str, int] = {}  # per workflow: the last quarter written as a line

    def show(workflow_id: str, done: int, total: int | None) -> None:
        out = stream or sys.stderr  # the stream of the moment (a caller may have redirected it)
        isatty = getattr(out, "isatty", None)
        if not (isatty and isatty()):
            step = 4 * min(done, total) // total if total else -1
            if shown.get(workflow_id, -2) < step:
                shown[workflow_id] = step
                out.write(f"{workflow_id}: {done}/{total} tasks\n" if total else f"{workflow_id}: waiting for the plan\n")
                out.flush()
            return
        if total:
            width = 30
            filled = int(width * min(done, total) / total)
            out.write(f"\r{workflow_id[:36]} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} tasks")
        else:
            out.write(f"\r{workflow_id[:36]} waiting for the plan...")
        out.flush()
    return show


def duration(seconds: float) -> str:
    """3600 -> "1h", 5400 -> "1h30m", 90 -> "1m30s"."""
    seconds = int(seconds)
    parts = [(seconds // 86400, "d"), (seconds % 86400 // 3600, "h"), (seconds % 3600 // 60, "m"), (seconds % 60, "s")]
    return "".join(f"{n}{unit}" for n, unit in parts if n) or "0s"


def output_links(config: Config, final) -> list[str]:
    """A URL to open for each output of ``final``: with IMAGEFORK_PRESIGN_TTL_S > 0 a presigned GET URL,
    signed here for this process's S3 endpoint (the bucket stays private, the final event keeps its
    plain URLs); else the event's own URL (public only if the bucket or S3_PUBLIC_URL makes it so)."""
    if not config.presign_ttl_s:
        return [o.url for o in final.outputs]
    from streams.adapters.objectstore import ObjectStore  # start-up: boto3 only when a link is signed
    store = ObjectStore(config)
    return [store.presigned_url(o.s3Uri, config.presign_ttl_s) for o in final.outputs]


def print_final(final, out=None, links: list[str] | None = None, ttl_s: int = 0, urls: bool = True) -> None:
    """The final event as a table, then (with ``urls``) a URL per output: ``links`` (presigned for ``ttl_s``
    seconds) if given, else the event's ``fileLocations``. ``out``: stdout of the moment by default."""
    assert isinstance(final, WorkflowCompleted)
    out = out or sys.stdout
    seconds = (final.completedAt - final.submittedAt) / 1000
    print(f"\nworkflow {final.workflowId}: {final.status} "
          f"({len(final.outputs)} of {final.taskCount} outputs, {seconds:.2f}s)", file=out)
    if final.outputs:
        rows = [("format", "size", "bytes", "location")] + [
            (o.format, f"{o.width}x{o.height}", f"{o.bytes:,}", o.s3Uri) for o in final.outputs]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        for n, row in enumerate(rows):
            print("  ".join(c.rjust(w) if i == 2 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))),
                  file=out)
            if n == 0:
                print("  ".join("-" * w for w in widths), file=out)
    for err in final.errors:
        print(f"error {err.taskRef or '(request)'}: {err.code}: {err.message}", file=out)
    if not urls:
        return
    if links and ttl_s:
        print(f"\nfileLocations, presigned for {duration(ttl_s)} (IMAGEFORK_PRESIGN_TTL_S):", file=out)
        for url in links:
            print(url, file=out)
    elif final.fileLocations:
        print("\nfileLocations:", file=out)
        for url in final.fileLocations:
            print(url, file=out)
        # on the terminal, not in what a script reads: why a plain link may answer 403
        print(f"(the final event's own URLs open only where the bucket is public or S3_PUBLIC_URL serves it: "
              f"`imagefork get {final.workflowId}` downloads the outputs, and IMAGEFORK_PRESIGN_TTL_S=3600 "
              f"prints links that open for an hour)", file=sys.stderr)


def download_outputs(config: Config, final, folder: Path, show=None) -> list:
    """Every output of ``final`` written to ``folder`` (created), each under its S3 object's name; a line
    per file to ``show`` (path, format, size, bytes) if given. Returns (path, output) pairs in the
    event's order; raises PipelineError if an object cannot be read."""
    from streams.adapters.objectstore import ObjectStore, parse_s3_uri  # start-up: boto3 only here
    folder.mkdir(parents=True, exist_ok=True)
    store = ObjectStore(config)
    files = []
    for out in final.outputs:
        path = folder / Path(parse_s3_uri(out.s3Uri)[1]).name
        store.download(out.s3Uri, path)
        files.append((path, out))
        if show:
            show(f"{path}  {out.format} {out.width}x{out.height}  {out.bytes:,} bytes")
    return files
