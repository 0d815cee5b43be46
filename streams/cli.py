"""imagefork: a Kafka-native image fan-out pipeline. One request in, every format x size out, one final event."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from streams import __version__
from streams.config import Config
from streams.commands import NO_BROKER_HINT, _cancel, _get, _retry, _submit, kafka_failure
from streams.errors import ImageforkError
from streams.preset_commands import add_parsers as add_preset_parsers
from streams.tokens import add_parser as add_token_parser


def _stack(args) -> int:
    from streams.stack.local import LocalStack  # start-up: only this command loads it
    stack = LocalStack(args.dir)
    if args.action == "up":
        env = stack.up(brokers=args.brokers)
        for k, v in env.items():
            print(f"{k}={v}")
        print(f"# written to {stack.env_file} (source it: set -a; . {stack.env_file}; set +a)")
    elif args.action == "down":
        from streams.stack.processes import stop_kept_workers  # start-up: only this command loads it
        # workers left running with this stack (``imagefork demo --keep-stack``) go first, while the
        # broker is there for them to leave their groups
        kept = [f"worker {name}" for name in stop_kept_workers(stack.dir)]
        if stack.kafka_running():
            from streams.ops import attached_workers  # start-up: only this command loads it
            attached = attached_workers(Config.from_env({**os.environ, **stack.env()}))
            if attached:
                print(f"still attached to this stack's Kafka (they lose it now, and retry until a broker is back "
                      f"there; stop them first for a clean stop): {'; '.join(attached)}", file=sys.stderr)
        stopped = kept + stack.down()
        print(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")
    else:
        if not stack.running():
            print(f"no stack running under {stack.dir}", file=sys.stderr)
            return 1
        for k, v in stack.env().items():
            print(f"{k}={v}")
    return 0


def _worker(args) -> int:
    from streams.worker import run_all, run_role  # start-up: only this command loads it
    config = Config.from_env()
    return run_all(config) if args.role == "all" else run_role(args.role, config)


def _topics(args) -> int:
    from streams.adapters.kafka import ensure_topics  # start-up: only this command loads it
    config = Config.from_env()
    created = ensure_topics(config)
    print(f"created: {', '.join(created) if created else 'none (all exist)'}")
    return 0


def _events(args) -> int:
    """The final events on the completed topic, oldest first, one line each: a summary, or (``--json``) the
    event as a JSON object (``WorkflowCompleted.document``: the request an object, not JSON text).
    ``--follow`` then prints each new one as it is committed, until interrupted."""

    from confluent_kafka import KafkaException

    from streams import serde  # start-up: only this command loads it
    from streams.adapters.kafka import KafkaUnavailable, committed_records
    from streams.adapters.schemas import install_resolver
    from streams.core.models import WorkflowCompleted
    config = Config.from_env()
    install_resolver(config)  # final events written by newer workers decode too
    topic = config.topics.completed
    records = committed_records(config, topic, follow=args.follow, timeout=args.timeout)
    try:
        for msg in records:
            try:
                final = WorkflowCompleted.from_dict(serde.decode("WorkflowCompleted", msg.value()))
            except serde.SerdeError as exc:
                print(f"imagefork: {topic}[{msg.partition()}:{msg.offset()}] is not a final event: {exc}",
                      file=sys.stderr)
                continue
            if args.json:
                print(json.dumps(final.document(), separators=(",", ":")), flush=True)
            else:
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(final.completedAt / 1000))
                took = max(0.0, (final.completedAt - final.submittedAt) / 1000)
                why = f" {final.errors[0].code}" if final.errors else ""
                print(f"{when}  {final.workflowId}  {final.status}  {len(final.outputs)}/{final.taskCount} outputs  "
                      f"{took:.2f}s{why}", flush=True)
    except KeyboardInterrupt:
        return 0
    except (KafkaException, KafkaUnavailable, TimeoutError) as exc:
        reason = exc.args[0].str() if isinstance(exc, KafkaException) and exc.args else str(exc)
        print(f"imagefork: Kafka at {config.bootstrap_servers}: {reason}; {NO_BROKER_HINT}", file=sys.stderr)
        return 1
    finally:
        records.close()
    return 0


def _demo(args) -> int:
    from streams.demo import run_demo, stop_demo  # start-up: only this command loads it
    if args.stop:
        return stop_demo()
    return run_demo(keep=args.keep)


def _status(args) -> int:
    from confluent_kafka import KafkaException

    from streams.adapters.lag import status_report  # start-up: only this command loads it
    config = Config.from_env()
    try:
        report = status_report(config)
    except KafkaException as exc:
        print(f"imagefork: {kafka_failure(config, exc)}; {NO_BROKER_HINT}", file=sys.stderr)
        return 1
    print(report.rstrip("\n") if isinstance(report, str) else report)
    return 0


def _dlq_list(args) -> int:
    from confluent_kafka import KafkaException

    from streams.ops import dead_letter_table, read_dead_letters  # start-up: only this command loads it
    config = Config.from_env()
    try:
        letters = read_dead_letters(config, args.timeout)
    except KafkaException as exc:
        print(f"imagefork: {kafka_failure(config, exc)}; {NO_BROKER_HINT}", file=sys.stderr)
        return 1
    shown = letters[-args.limit:] if args.limit > 0 else letters
    if args.json:
        for letter in shown:
            print(json.dumps(letter.to_dict()))
    elif shown:
        import shutil
        # on a terminal the reason takes what is left of its width; in a pipe or a file, 60 characters
        width = shutil.get_terminal_size().columns if sys.stdout.isatty() else 0
        for line in dead_letter_table(shown, line_width=width):
            print(line)
    topic = config.topics.dead_letter
    more = f" (the {len(shown)} most recent shown: --limit)" if len(shown) < len(letters) else ""
    print(f"{len(letters)} dead letter{'s' if len(letters) != 1 else ''} on {topic}{more}", file=sys.stderr)
    return 0


def _dlq_replay(args) -> int:
    from confluent_kafka import KafkaException

    # start-up: only this command loads it
    from streams.ops import OpsError, find_dead_letters, is_request, read_dead_letters, replay, replay_target
    config = Config.from_env()
    if bool(args.ids) == args.all:
        print("imagefork: dlq replay: give --id ID (one or more) or --all", file=sys.stderr)
        return 2
    try:
        letters = read_dead_letters(config, args.timeout)
        skipped = []
        if args.all:
            chosen = letters
            if args.to is None or args.to == config.topics.requests:  # only requests go to the request topic
                skipped = [d for d in chosen if not is_request(d, config)]
                chosen = [d for d in chosen if is_request(d, config)]
        else:
            chosen = find_dead_letters(letters, args.ids, config.topics.dead_letter)
        plan = [(d, replay_target(d, args.to, config)) for d in chosen]  # every target checked before a send
        sent = replay(config, plan) if plan else []
    except OpsError as exc:
        print(f"imagefork: {exc}", file=sys.stderr)
        return 1
    except KafkaException as exc:
        print(f"imagefork: {kafka_failure(config, exc)}; {NO_BROKER_HINT}", file=sys.stderr)
        return 1
    for s in sent:
        d = s.letter
        print(f"{d.id} -> {s.topic}/{s.partition}/{s.offset}  key {d.key_text or '(none)'}  "
              f"{len(d.value or b''):,} bytes  (was {d.code or '?'} from {d.origin or '?'})")
    if skipped:
        agents = ", ".join(sorted({d.agent or "unknown" for d in skipped}))
        what = "dead letters that are not requests" if len(skipped) != 1 else "dead letter that is not a request"
        print(f"skipped {len(skipped)} {what} (agent {agents}): replay {'them' if len(skipped) != 1 else 'it'} "
              f"with --to origin", file=sys.stderr)
    print(f"replayed {len(sent)} dead letter{'s' if len(sent) != 1 else ''}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command line: every subcommand and its options (tests/unit/test_docs.py checks the docs against it)."""
    parser = argparse.ArgumentParser(prog="imagefork", description=__doc__)
    parser.add_argument("--version", action="version", version=f"imagefork {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("stack", help="the local Kafka (KRaft) and S3Proxy")
    p.add_argument("action", choices=["up", "down", "env"])
    p.add_argument("--dir", help="state folder (default: $IMAGEFORK_STACK_DIR or ~/.cache/imagefork/stack)")
    p.add_argument("--brokers", type=int, default=1, metavar="N",
                   help="up: a KRaft cluster of N Kafka nodes, each broker and controller (default 1; a stack "
                        "running with another count is restarted)")
    p.set_defaults(func=_stack)

    p = sub.add_parser("worker", help="run a role: planner, resize, join, webhook (a request's "
                                      "callbackUrl gets its final event), api, or all")
    p.add_argument("role", choices=["planner", "resize", "join", "webhook", "api", "all"])
    p.set_defaults(func=_worker)

    p = sub.add_parser("api", help="the HTTP API and dashboard on IMAGEFORK_API_LISTEN (default "
                                   "127.0.0.1:8088); the same as `imagefork worker api`")
    p.set_defaults(func=_worker, role="api")

    p = sub.add_parser("status", help="the pipeline at a glance: each role's group, members, partitions "
                                      "and lag, from the broker")
    p.set_defaults(func=_status)

    p = sub.add_parser("dlq", help="the dead-letter topic: list the dead letters, send them back",
                       description="The dead-letter topic (IMAGEFORK_NAMESPACE + imagefork.requests.dlq): "
                                   "messages the pipeline could never process, kept with why and where "
                                   "they came from.")
    dlq = p.add_subparsers(dest="dlq_command", required=True)
    q = dlq.add_parser(
        "list", help="the dead letters as a table, oldest first (read to the end, then exit)",
        description="The dead letters committed on the topic, read to its end, oldest first: id (the dead "
                    "letter's own topic/partition/offset, what `dlq replay --id` takes), time (UTC), agent, "
                    "code, origin (the topic/partition/offset it was read from), key, attempts and reason "
                    "(clipped; --json has it whole). The count goes to stderr.")
    q.add_argument("--limit", type=int, default=50, metavar="N",
                   help="show the N most recent (50; 0: all of them)")
    q.add_argument("--json", action="store_true",
                   help="one JSON object per line, the whole reason and every header")
    q.add_argument("--timeout", type=float, default=60.0, help="seconds to read the topic to its end (60)")
    q.set_defaults(func=_dlq_list)
    q = dlq.add_parser(
        "replay", help="send dead letters back (their original key and bytes) so they run again",
        description="Send the chosen dead letters' original key and value, with their headers but the "
                    "pipeline's own (imagefork.*: the error, the attempts, the run id), to the request topic "
                    "or (--to origin) the topic each came from. Prints one line per message sent.",
        epilog="A replay is not idempotent by itself: each replay is a new message, and replaying the same "
               "dead letter twice sends it twice (allowed; each line printed says what was sent). The "
               "pipeline's own rules then apply: a request keyed by a workflow id that already ran, or is "
               "running, is not run again (the join answers with a RunIgnored notice; `imagefork submit "
               "--wait` shows it), while a request without a key gets a new workflow id per replay. Fix the "
               "cause first (`imagefork dlq list` shows the code and reason): a message replayed unchanged "
               "into the same fault is dead-lettered again.")
    q.add_argument("--id", action="append", default=[], metavar="ID", dest="ids",
                   help="a dead letter's id as `dlq list` prints it (topic/partition/offset, or "
                        "partition/offset); repeat for several")
    q.add_argument("--all", action="store_true",
                   help="every dead letter on the topic (with the default target: every request among them)")
    q.add_argument("--to", metavar="TOPIC",
                   help="where to send them: `origin` (the topic each came from) or a topic name "
                        "(default: the request topic; only dead-lettered requests go there)")
    q.add_argument("--timeout", type=float, default=60.0, help="seconds to read the topic to its end (60)")
    q.set_defaults(func=_dlq_replay)

    add_token_parser(sub)
    add_preset_parsers(sub)

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
    p.add_argument("--priority", choices=["interactive", "batch"], default=None,
                   help="its lane (default: the document's priority, else interactive); batch work gets what "
                        "interactive work leaves")
    p.set_defaults(func=_submit)

    p = sub.add_parser("retry", help="run a finished workflow's failed and timed-out tasks again, keeping its "
                                     "outputs (one more run of the same id)")
    p.add_argument("workflow_id", help="the workflow id")
    p.add_argument("--wait", action="store_true", help="follow the new run and print its final event")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds --wait waits for the final event (600)")
    p.add_argument("--json", action="store_true", help="print the final event as JSON")
    p.set_defaults(func=_retry)

    p = sub.add_parser("cancel", help="cancel a running workflow: it ends CANCELLED with the outputs made so far "
                                      "(exit code 3, as get's for a cancelled workflow)")
    p.add_argument("workflow_id", help="the workflow id")
    p.add_argument("--reason", default="", help="why, in a few words (in the final event's error)")
    p.add_argument("--run", help="cancel this run of the id only (default: the run that is open)")
    p.add_argument("--no-wait", action="store_true", help="send the cancel and exit, without its final event")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the final event (60)")
    p.add_argument("--json", action="store_true", help="print the final event as JSON")
    p.set_defaults(func=_cancel)

    p = sub.add_parser("get", help="download a finished workflow's outputs (or print their URLs); exit code 0 "
                                   "when it completed, 3 when it was cancelled (its outputs made before the "
                                   "cancel), 1 otherwise")
    p.add_argument("workflow_id", help="the workflow id (the key of its final event)")
    p.add_argument("--dir", help="folder to write the outputs to (default: ./WORKFLOW_ID/)")
    p.add_argument("--urls", action="store_true",
                   help="print one URL per output instead of downloading: presigned when "
                        "IMAGEFORK_PRESIGN_TTL_S > 0, else the final event's own")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds to read the completed topic to its end (60)")
    p.set_defaults(func=_get)

    p = sub.add_parser("events", help="the final events on the completed topic, one line each (--json: as "
                                      "JSON objects), oldest first; --follow: then each new one")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing final events as they are committed")
    p.add_argument("--json", action="store_true", help="one JSON object per line (the request as an object)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to read the topic to its end (60)")
    p.set_defaults(func=_events)

    p = sub.add_parser("demo", help="the seed request end to end on the local stack; its outputs and a "
                                    "contact sheet (index.html) written to a folder it prints")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--keep", "--keep-stack", dest="keep", action="store_true",
                      help="leave the demo's Kafka, S3 server, workers and an API/dashboard process running "
                           "afterwards (prints the dashboard URL, how to use them and how to stop them)")
    mode.add_argument("--stop", action="store_true",
                      help="stop what a --keep demo left running (its workers, its API and its stack)")
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ImageforkError as exc:  # bad settings, a broker that refuses us, a worker that cannot start
        print(f"imagefork: {exc.label}{exc}", file=sys.stderr)
        return exc.exit_code
    except TimeoutError as exc:
        print(f"imagefork: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (`imagefork dlq list --json | head -1`): not an error to show
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
        return 141


if __name__ == "__main__":
    raise SystemExit(main())
