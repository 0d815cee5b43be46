"""imagefork: a Kafka-native image fan-out pipeline. One request in, every format x size out, one final event."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from streams.config import Config, ConfigError


def _stack(args) -> int:
    from streams.stack.local import LocalStack
    stack = LocalStack(args.dir)
    if args.action == "up":
        env = stack.up()
        for k, v in env.items():
            print(f"{k}={v}")
        print(f"# written to {stack.env_file} (source it: set -a; . {stack.env_file}; set +a)")
    elif args.action == "down":
        stopped = stack.down()
        print(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")
    else:
        if not stack.running():
            print(f"no stack running under {stack.dir}", file=sys.stderr)
            return 1
        for k, v in stack.env().items():
            print(f"{k}={v}")
    return 0


def _worker(args) -> int:
    from streams.adapters.kafka import KafkaUnavailable
    from streams.adapters.schemas import SchemaTopicError
    from streams.worker import StartError, run_all, run_role
    # what stops a worker at start (bad settings, a broker that refuses us or does not answer) is
    # one line on stderr and a non-zero exit, not a traceback
    try:
        config = Config.from_env()
        return run_all(config) if args.role == "all" else run_role(args.role, config)
    except ConfigError as exc:
        print(f"imagefork: configuration: {exc}", file=sys.stderr)
        return 2
    except (KafkaUnavailable, SchemaTopicError, StartError) as exc:
        print(f"imagefork: {exc}", file=sys.stderr)
        return 1


def _topics(args) -> int:
    from streams.adapters.kafka import ensure_topics
    config = Config.from_env()
    created = ensure_topics(config)
    print(f"created: {', '.join(created) if created else 'none (all exist)'}")
    return 0


def progress_bar(stream=sys.stderr):
    def show(workflow_id: str, done: int, total: int | None) -> None:
        if total:
            width = 30
            filled = int(width * min(done, total) / total)
            stream.write(f"\r{workflow_id[:36]} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} tasks")
        else:
            stream.write(f"\r{workflow_id[:36]} waiting for the plan...")
        stream.flush()
    return show


def print_final(final, out=sys.stdout) -> None:
    from streams.core.models import WorkflowCompleted
    assert isinstance(final, WorkflowCompleted)
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
    if final.fileLocations:
        print("\nfileLocations:", file=out)
        for url in final.fileLocations:
            print(url, file=out)


def _submit(args) -> int:
    from streams.client import Client, Follower
    config = Config.from_env()
    raw = Path(args.file).read_bytes() if args.file != "-" else sys.stdin.buffer.read()
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        print(f"imagefork: {args.file} is not JSON: {exc}", file=sys.stderr)
        return 2
    if not isinstance(doc, dict):
        print(f"imagefork: {args.file} holds a JSON {type(doc).__name__}, not a request object "
              f"(see the README's contract)", file=sys.stderr)
        return 2
    follower = Follower(config) if args.wait else None
    client = Client(config)
    workflow_id = client.submit(doc, args.workflow_id, avro=args.avro)
    print(f"submitted workflow {workflow_id} to {config.topics.requests}", file=sys.stderr)
    if not follower:
        print(workflow_id)
        return 0
    try:
        final = follower.wait([workflow_id], args.timeout, progress_bar())[workflow_id]
    finally:
        follower.close()
    if args.json:
        print(json.dumps(final.to_dict(), indent=2))
    else:
        print_final(final)
    return 0 if final.status == "COMPLETED" else 1


def _demo(args) -> int:
    from streams.demo import run_demo
    return run_demo(keep_stack=args.keep_stack)


def main(argv: list[str] | None = None) -> int:
    from streams import __version__
    parser = argparse.ArgumentParser(prog="imagefork", description=__doc__)
    parser.add_argument("--version", action="version", version=f"imagefork {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("stack", help="the local Kafka (KRaft) and S3Proxy")
    p.add_argument("action", choices=["up", "down", "env"])
    p.add_argument("--dir", help="state folder (default: $IMAGEFORK_STACK_DIR or ~/.cache/imagefork/stack)")
    p.set_defaults(func=_stack)

    p = sub.add_parser("worker", help="run a role: planner, resize, join, or all three")
    p.add_argument("role", choices=["planner", "resize", "join", "all"])
    p.set_defaults(func=_worker)

    p = sub.add_parser("topics", help="create the topics with the configured partitions and replication")
    p.set_defaults(func=_topics)

    p = sub.add_parser("submit", help="produce a request (the seed's JSON document)")
    p.add_argument("file", help="request JSON file, or - for stdin")
    p.add_argument("--wait", action="store_true", help="follow the workflow and print its final event")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds --wait waits for the final event (600)")
    p.add_argument("--workflow-id", help="the workflow id (the message key); default: the document's "
                                         "workflowId, else a new UUID")
    p.add_argument("--avro", action="store_true", help="send the request Avro-encoded instead of JSON")
    p.add_argument("--json", action="store_true", help="print the final event as JSON")
    p.set_defaults(func=_submit)

    p = sub.add_parser("demo", help="the seed request end to end on the local stack")
    p.add_argument("--keep-stack", action="store_true",
                   help="leave the demo's Kafka and S3 server running afterwards (prints how to stop them)")
    p.set_defaults(func=_demo)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"imagefork: configuration: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from streams.adapters.kafka import KafkaUnavailable
        from streams.adapters.schemas import SchemaTopicError
        from streams.client import SubmitError
        from streams.serde import SerdeError
        from streams.stack.local import StackError
        if isinstance(exc, (StackError, SubmitError, TimeoutError, SerdeError, KafkaUnavailable, SchemaTopicError)):
            print(f"imagefork: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    raise SystemExit(main())
