"""``imagefork presets`` (list, show, put, load, delete: the presets topic) and ``imagefork regenerate``
(the finished workflows that used a preset, run again for the outputs its current version changed)."""
from __future__ import annotations

import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from streams.config import Config, ConfigError

if TYPE_CHECKING:  # names for the annotations only
    from streams.core.models import WorkflowCompleted

# the Kafka client, Avro and the planning code load only when a presets command runs: `imagefork --help` and
# the light commands start without them (+46 ms measured when this module imported them at its top)


def _json_file(path: str) -> object:
    try:
        return json.loads(Path(path).read_text("utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ConfigError(f"{path} is not JSON: {exc}") from None


def _put(config: Config, name: str, doc: object) -> int:
    from streams.adapters.presets import put_preset  # start-up: only these commands load them
    from streams.core.errors import RequestInvalid
    try:
        preset, changed = put_preset(config, name, doc)
    except RequestInvalid as exc:
        print(f"imagefork: preset {name!r} is not valid: {exc.message}", file=sys.stderr)
        return 2
    state = ("new" if preset.version == 1 else "changed") if changed else "unchanged"
    print(f"{name}: version {preset.version} ({state})")
    return 0


def put(args) -> int:
    return _put(Config.from_env(), args.name, _json_file(args.file))


def load(args) -> int:
    """The seed file: ``{"name": {formats, sizes, options...}, ...}``; each preset whose outputs differ from
    the topic's becomes its next version there, the others stay as they are."""
    doc = _json_file(args.file)
    if not isinstance(doc, dict) or not all(isinstance(v, dict) for v in doc.values()):
        raise ConfigError(f'{args.file}: a presets file is one JSON object {{"name": {{"outputFormats": [...], '
                          f'"outputSizes": [...], ...}}, ...}}')
    config = Config.from_env()
    codes = [_put(config, name, value) for name, value in doc.items()]
    return max(codes, default=0)


def listing(args) -> int:
    from streams.adapters.presets import read_presets  # start-up: only this command loads it
    presets = sorted(read_presets(Config.from_env()).values(), key=lambda p: p.name)
    if args.json:
        print(json.dumps([p.document() for p in presets]))
        return 0
    for p in presets:
        sizes = " ".join(f"{s.width}x{s.height}" for s in p.outputSizes)
        print(f"{p.name}\tv{p.version}\t{','.join(p.outputFormats)}\t{sizes}\t{p.description}")
    if not presets:
        print("no presets (imagefork presets put NAME FILE)", file=sys.stderr)
    return 0


def show(args) -> int:
    from streams.adapters.presets import read_presets  # start-up: only this command loads it
    found = read_presets(Config.from_env()).get(args.name)
    if found is None:
        print(f"imagefork: no preset named {args.name!r}", file=sys.stderr)
        return 1
    print(json.dumps(found.document(), indent=2))
    return 0


def delete(args) -> int:
    from streams.adapters.presets import delete_preset  # start-up: only this command loads it
    gone = delete_preset(Config.from_env(), args.name)
    if gone is None:
        print(f"imagefork: no preset named {args.name!r}", file=sys.stderr)
        return 1
    print(f"deleted {args.name} (was version {gone.version}); workflows that used it keep their outputs")
    return 0


def parse_since(text: str | None) -> int:
    """``--since``: an ISO 8601 time (UTC unless it says), or epoch seconds; as epoch ms (0: none)."""
    if not text:
        return 0
    try:
        return int(float(text) * 1000)
    except OverflowError:
        raise ConfigError(f"--since {text!r} is not a time") from None
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"--since {text!r} is not an ISO 8601 time (2026-12-01T00:00) or epoch seconds") from None
    return int((when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp() * 1000)


def finals_using(config: Config, name: str, since_ms: int, timeout: float) -> list[WorkflowCompleted]:
    """The latest final event of each workflow whose run used preset ``name`` and ended at or after
    ``since_ms``: from the completed topic (a week) and the sources topic (kept for good)."""
    # start-up: only regenerate loads them
    from streams import serde
    from streams.adapters.kafka import read_to_end
    from streams.core.models import REJECTED, WorkflowCompleted
    latest: dict[str, WorkflowCompleted] = {}
    for topic in (config.topics.sources, config.topics.completed):
        for msg in read_to_end(config, topic, timeout):
            if msg.value() is None:
                continue
            try:
                final = WorkflowCompleted.from_dict(serde.decode("WorkflowCompleted", msg.value()))
            except Exception:  # not a final event of ours: not this command's to judge
                continue
            known = latest.get(final.workflowId)
            if known is None or final.completedAt >= known.completedAt:
                latest[final.workflowId] = final
    return [f for f in latest.values() if f.preset is not None and f.preset.name == name
            and f.status != REJECTED and f.completedAt >= since_ms]


def newer_plans(config: Config, finals: list[WorkflowCompleted], timeout: float) -> dict[str, str]:
    """The workflows with a plan on the events topic newer than their final event: a run that may still be
    open (a retry, a regeneration under way), by workflow id -> its run id."""
    # start-up: only regenerate loads them
    from streams import serde
    from streams.adapters.kafka import read_to_end
    by_id = {f.workflowId: f for f in finals}
    found: dict[str, str] = {}
    for msg in read_to_end(config, config.topics.events, timeout):
        final = by_id.get((msg.key() or b"").decode("utf-8", "replace"))
        if final is None or msg.value() is None:
            continue
        try:
            kind, body = serde.decode_join_event(msg.value())
        except Exception:
            continue
        newer = body.get("submittedAt", 0) > final.completedAt
        if kind == "WorkflowPlan" and body.get("runId") != final.runId and newer:
            found[final.workflowId] = body.get("runId") or "?"
    return found


def regenerate(args) -> int:
    # start-up: only this command loads them
    from streams.adapters.objectstore import ObjectStore
    from streams.adapters.presets import read_presets
    from streams.client import Client
    from streams.core.errors import RequestInvalid
    from streams.core.models import WorkflowCompleted, now_ms
    from streams.core.presets import regeneration
    config = Config.from_env()
    preset = read_presets(config).get(args.preset)
    if preset is None:
        print(f"imagefork: no preset named {args.preset!r}", file=sys.stderr)
        return 1
    lim = config.limits
    plans = []
    failed = 0
    finals = finals_using(config, preset.name, parse_since(args.since), args.timeout)
    stale = [f for f in finals if f.preset.version != preset.version]
    current = len(finals) - len(stale)
    busy = newer_plans(config, stale, args.timeout) if stale else {}
    for final in stale:
        if final.workflowId in busy:
            failed += 1
            print(f"{final.workflowId}: skipped: run {busy[final.workflowId]} is newer than its final event (it may "
                  f"still be running): regenerate again once it has ended", file=sys.stderr)
            continue
        try:
            plans.append(regeneration(final, preset, max_dimension=lim.max_dimension, max_tasks=lim.max_tasks,
                                      max_pixels=lim.max_pixels, priority=args.priority))
        except (RequestInvalid, ValueError) as exc:
            failed += 1
            print(f"{final.workflowId}: cannot be regenerated: {getattr(exc, 'message', exc)}", file=sys.stderr)
    work = [p for p in plans if p.request is not None]
    for p in plans:
        what = f"make {len(p.make)}, keep {len(p.kept)}" if p.request else "nothing to make"
        print(f"{p.workflowId}: v{p.fromVersion} -> v{preset.version}: {what}, dropped {len(p.dropped)}")
        for o in p.dropped:
            print(f"  dropped (listed, not deleted): {o.taskRef} {o.s3Uri}")
    made, kept, dropped = (sum(len(getattr(p, f)) for p in plans) for f in ("make", "kept", "dropped"))
    print(f"{preset.name} v{preset.version}: {len(work)} workflow(s) to regenerate, {made} output(s) to make, "
          f"{kept} kept, {dropped} dropped; {current} already at v{preset.version}"
          + (f"; {failed} cannot be" if failed else "") + (" (dry run: nothing sent)" if args.dry_run else ""))
    if args.dry_run or not work:
        return 1 if failed else 0
    client = Client(config)
    sent_at = now_ms()
    try:
        for p in work:
            client.submit(p.request, p.workflowId)
    finally:
        client.close()
    print(f"sent {len(work)} regeneration run(s)", file=sys.stderr)
    if not (args.wait or args.delete_dropped):
        return 1 if failed else 0
    ended = _wait(config, {p.workflowId: p.runId for p in work}, args.timeout, sent_at)
    store = ObjectStore(config) if args.delete_dropped else None
    code = 1 if failed else 0
    for p in work:
        final = ended.get(p.workflowId)
        if not isinstance(final, WorkflowCompleted) or final.status != "COMPLETED":
            code = 1
            why = final if isinstance(final, str) else final.status if final else "no final event yet"
            print(f"{p.workflowId}: {why}", file=sys.stderr)
            continue
        listed = {o.s3Uri for o in final.outputs}
        for o in p.dropped if store is not None else ():
            if o.s3Uri not in listed and o.s3Uri.startswith(f"s3://{config.bucket}/"):
                store.delete(o.s3Uri.removeprefix(f"s3://{config.bucket}/"))
                print(f"  deleted {o.s3Uri}")
    return code


def _wait(config: Config, runs: dict[str, str], timeout: float, sent_at: int) -> dict[str, WorkflowCompleted | str]:
    """The final event of each workflow's run after ``runs[id]`` (the regeneration), waited for; or why the
    join did not take it (its notice: the source could not be fetched, or another run was open)."""
    # start-up: only regenerate loads them
    from streams import serde
    from streams.adapters.kafka import read_to_end
    from streams.core.models import WorkflowCompleted
    give_up, ended = time.monotonic() + timeout, {}
    while True:
        for msg in read_to_end(config, config.topics.completed, timeout):
            wf = (msg.key() or b"").decode()
            if wf in runs and msg.value() is not None:
                final = WorkflowCompleted.from_dict(serde.decode("WorkflowCompleted", msg.value()))
                if final.retryOf == runs[wf]:
                    ended[wf] = final
        for msg in read_to_end(config, config.topics.notices, timeout):
            wf = (msg.key() or b"").decode()
            if wf in runs and wf not in ended and msg.value() is not None:
                notice = serde.decode("RunIgnored", msg.value())
                if notice.get("at", 0) >= sent_at and notice.get("takenRunId") in (runs[wf], ""):
                    ended[wf] = (f"not taken ({notice.get('reason')}: the join kept run {notice.get('takenRunId')}, "
                                 f"{notice.get('takenStatus')}); its source may have failed: see the planner's log")
        if len(ended) == len(runs) or time.monotonic() > give_up:
            return ended
        time.sleep(1)


def add_parsers(sub) -> None:
    p = sub.add_parser("presets", help="named presets (formats, sizes, options) on the presets topic")
    actions = p.add_subparsers(dest="action", required=True)
    q = actions.add_parser("list", help="every preset: name, version, formats, sizes")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=listing)
    q = actions.add_parser("show", help="one preset as JSON")
    q.add_argument("name")
    q.set_defaults(func=show)
    q = actions.add_parser("put", help="define or change a preset from a JSON file (its next version)")
    q.add_argument("name")
    q.add_argument("file", help='{"outputFormats": [...], "outputSizes": [{"width", "height"}, ...], options...}')
    q.set_defaults(func=put)
    q = actions.add_parser("load", help='seed the topic from a file {"name": {...}, ...}: each changed one is put')
    q.add_argument("file")
    q.set_defaults(func=load)
    q = actions.add_parser("delete", help="delete a preset (workflows that used it keep their outputs)")
    q.add_argument("name")
    q.set_defaults(func=delete)

    p = sub.add_parser("regenerate", help="run the finished workflows that used a preset again, for only the "
                                          "outputs its current version changed (as retries do)")
    p.add_argument("--preset", required=True)
    p.add_argument("--since", default=None, help="only workflows that ended at or after this time (ISO 8601, or "
                                                 "epoch seconds)")
    p.add_argument("--dry-run", action="store_true", help="count what would be made, kept and dropped; send nothing")
    p.add_argument("--wait", action="store_true", help="wait for each new run's final event")
    p.add_argument("--delete-dropped", action="store_true",
                   help="after each new run completed, delete the outputs the preset no longer asks for")
    p.add_argument("--priority", choices=["interactive", "batch"], default="batch",
                   help="the lane of the new runs (default batch: a regeneration is a backfill)")
    p.add_argument("--timeout", type=float, default=300.0)
    p.set_defaults(func=regenerate)
