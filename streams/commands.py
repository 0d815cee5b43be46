"""The commands that send a workflow and follow it to its final event: submit, retry, cancel, get. Their
exit codes: 0 when the workflow COMPLETED, 3 when it was CANCELLED, 1 otherwise (2: a request or an argument
that is not valid)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from streams.config import Config
from streams.console import download_outputs, output_links, print_final, progress_bar


NO_BROKER_HINT = ("is the local stack up (`imagefork stack up`) and its settings loaded "
                  "(`set -a; . ~/.cache/imagefork/stack/stack.env; set +a`)?")


def kafka_failure(config: Config, exc: Exception) -> str:
    """One line for a Kafka call that failed (``KafkaException``: its error's text, not a repr)."""
    err = exc.args[0] if exc.args else None
    return f"Kafka at {config.bootstrap_servers}: {err.str() if hasattr(err, 'str') else exc}"


def _submit(args) -> int:
    # imported here, as elsewhere in this file: `imagefork --help` and the light commands start fast
    from streams.core.errors import RequestInvalid
    from streams.core.planning import parse_request
    config = Config.from_env()
    try:
        raw = Path(args.file).read_bytes() if args.file != "-" else sys.stdin.buffer.read()
    except OSError as exc:
        print(f"imagefork: cannot read the request {args.file}: {exc.strerror or exc} (examples/request.json "
              f"is the seed's request, to copy)", file=sys.stderr)
        return 2
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        print(f"imagefork: {args.file} is not JSON: {exc}", file=sys.stderr)
        return 2
    if not isinstance(doc, dict):
        print(f"imagefork: {args.file} holds a JSON {type(doc).__name__}, not a request object "
              f"(see docs/contract.md)", file=sys.stderr)
        return 2
    if args.priority:
        doc["priority"] = args.priority
    lim = config.limits
    presets = None
    if isinstance(doc.get("preset"), str):
        from streams.adapters.presets import read_presets  # start-up: only a request with a preset reads them
        presets = read_presets(config)
    try:  # what the planner would refuse is refused before anything is sent (it checks again: other clients)
        parse_request(doc, max_dimension=lim.max_dimension, max_tasks=lim.max_tasks, max_pixels=lim.max_pixels,
                      presets=presets)
    except RequestInvalid as exc:
        print(f"imagefork: {args.file} is not a valid request: {exc.message}", file=sys.stderr)
        return 2
    return _send(config, doc, args.workflow_id, args)


def _send(config: Config, doc: dict, workflow_id: str | None, args) -> int:
    """Produce ``doc`` (a request, or a retry's) and, with ``--wait``, follow it to its final event."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    from streams.adapters.kafka import client_config  # start-up: only this command loads it
    from streams.client import Client, Follower, SubmitError
    try:
        # a broker that does not answer is told in seconds, not after the producer's own time-out
        AdminClient(client_config(config)).list_topics(timeout=10)
        follower = Follower(config) if args.wait else None
        client = Client(config)
        workflow_id = client.submit(doc, workflow_id, avro=getattr(args, "avro", False))
    except KafkaException as exc:
        print(f"imagefork: {kafka_failure(config, exc)}; {NO_BROKER_HINT}", file=sys.stderr)
        return 1
    except SubmitError as exc:
        print(f"imagefork: {exc}; {NO_BROKER_HINT}", file=sys.stderr)
        return 1
    lane = config.topics.requests_batch if str(doc.get("priority") or "").lower() == "batch" else config.topics.requests
    print(f"submitted workflow {workflow_id} to {lane}", file=sys.stderr)
    if not follower:
        print(workflow_id)
        return 0
    try:
        final = follower.wait([workflow_id], args.timeout, progress_bar())[workflow_id]
    finally:
        follower.close()
    notice = follower.notices.get(workflow_id)
    if notice is not None:  # a resubmission: the answer is the run that has the id
        was = "had already finished" if notice["reason"] == "finished" else "was already running"
        print(f"\nworkflow {workflow_id} {was} (run {notice['takenRunId']}): this request was not run "
              f"again; the final event below is that run's"
              + (f" (`imagefork retry {workflow_id}` runs its failed tasks again)"
                 if notice["reason"] == "finished" and notice.get("takenStatus") != "COMPLETED" else ""),
              file=sys.stderr)
    if args.json:
        print(json.dumps(final.to_dict(), indent=2))
    else:
        print_final(final, links=output_links(config, final), ttl_s=config.presign_ttl_s)
    return exit_code(final.status)


# what a command that ends with a final event exits with: 0 COMPLETED, 3 CANCELLED, 1 for the rest
EXIT_CODES = {"COMPLETED": 0, "CANCELLED": 3}


def exit_code(status: str) -> int:
    return EXIT_CODES.get(status, 1)


def _cancel(args) -> int:
    """Cancel a running workflow: its final event comes CANCELLED with the outputs made so far (as the API's
    ``POST /v1/workflows/{id}/cancel``). One that has ended is one line and exit code 1."""
    from confluent_kafka import KafkaException

    from streams.adapters.kafka import KafkaUnavailable  # start-up: only this command loads it
    from streams.adapters.schemas import install_resolver
    from streams.client import Client, Follower, SubmitError, consume_completed
    from streams.core.cancels import parse_cancellation
    from streams.core.errors import RequestInvalid
    from streams.core.models import now_ms
    config = Config.from_env()
    workflow_id = args.workflow_id
    try:
        cancel = parse_cancellation({"workflowId": workflow_id, "runId": args.run or "", "reason": args.reason,
                                     "by": "cli"}, now_ms())
    except RequestInvalid as exc:
        print(f"imagefork: {exc.message}", file=sys.stderr)
        return 2
    install_resolver(config)
    try:
        finals = consume_completed(config, [workflow_id], args.timeout)
        ended = [f for f in finals if f.runId == args.run] if args.run else finals[-1:]
        if ended and (args.run or ended[-1].status == "COMPLETED"):
            final = ended[-1]
            print(f"imagefork: workflow {workflow_id} has ended ({final.status}, run {final.runId}): there is "
                  f"nothing to cancel", file=sys.stderr)
            return 1
        follower = Follower(config)  # from now on: the final event the cancel brings cannot slip by
        Client(config).cancel(cancel)
    except (KafkaException, KafkaUnavailable, TimeoutError) as exc:
        print(f"imagefork: {kafka_failure(config, exc)}; {NO_BROKER_HINT}", file=sys.stderr)
        return 1
    except SubmitError as exc:
        print(f"imagefork: {exc}; {NO_BROKER_HINT}", file=sys.stderr)
        return 1
    print(f"cancel of workflow {workflow_id} sent to {config.topics.cancellations}", file=sys.stderr)
    if args.no_wait:
        follower.close()
        return 0
    # its last run ended without completing: a retry of it may be running (the join decides), or not
    wait = min(args.timeout, 10.0) if ended else args.timeout
    try:
        final = follower.wait([workflow_id], wait)[workflow_id]
    except TimeoutError:
        if ended:
            print(f"imagefork: workflow {workflow_id} has ended ({ended[-1].status}, run {ended[-1].runId}) and no "
                  f"retry of it ran: there was nothing to cancel", file=sys.stderr)
        else:
            print(f"imagefork: no final event for workflow {workflow_id} within {wait:.0f}s: the cancel waits in "
                  f"the join until the workflow's plan comes (an id not submitted yet, or unknown: it is dropped "
                  f"after the workflow timeout)", file=sys.stderr)
        return 1
    finally:
        follower.close()
    if args.json:
        print(json.dumps(final.document(), indent=2))
    else:
        print_final(final, links=output_links(config, final), ttl_s=config.presign_ttl_s)
    if final.status != "CANCELLED":
        print(f"imagefork: workflow {workflow_id} ended {final.status} before the cancel took effect",
              file=sys.stderr)
    return exit_code(final.status)


def _last_final(config: Config, workflow_id: str, timeout: float, after: str = ""):
    """The workflow's last final event on the completed topic, or the exit code (1) once the reason it is
    not there is printed."""
    from confluent_kafka import KafkaException

    from streams.adapters.kafka import KafkaUnavailable  # start-up: only the commands that read finals load it
    from streams.adapters.schemas import install_resolver
    from streams.client import consume_completed
    install_resolver(config)  # final events written by newer workers decode too
    try:
        finals = consume_completed(config, [workflow_id], timeout)
    except (KafkaException, KafkaUnavailable, TimeoutError) as exc:
        print(f"imagefork: {kafka_failure(config, exc)}; {NO_BROKER_HINT}", file=sys.stderr)
        return 1
    if not finals:
        print(f"imagefork: no final event for workflow {workflow_id} on {config.topics.completed} (an unknown id, "
              f"a workflow still running, or one past the topic's retention){after}", file=sys.stderr)
        return 1
    return finals[-1]


def _retry(args) -> int:
    """Run a finished workflow's failed and timed-out tasks again, keeping its outputs (as the API's
    ``POST /v1/workflows/{id}/retry``): one more run of the same id, with one more final event."""
    from streams.core.status import retry_request, retryable  # start-up: only this command loads it
    config = Config.from_env()
    workflow_id = args.workflow_id
    final = _last_final(config, workflow_id, args.timeout, ": nothing to retry")
    if isinstance(final, int):
        return final
    ok, why = retryable(final)
    if not ok:
        print(f"imagefork: workflow {workflow_id} cannot be retried: {why}", file=sys.stderr)
        return 1
    doc, refs = retry_request(final)
    print(f"retrying run {final.runId} of workflow {workflow_id} ({final.status}): "
          f"{f'{len(refs)} task(s)' if refs else 'every task'} again, {len(final.outputs)} output(s) kept",
          file=sys.stderr)
    return _send(config, doc, workflow_id, args)


def _get(args) -> int:
    """The outputs of a finished workflow, found by its final event on the completed topic: downloaded,
    or (``--urls``) one URL per line. An unknown id, or a workflow that did not complete, is one line
    and exit code 1."""
    from streams.core.errors import PipelineError  # start-up: only this command loads it
    config = Config.from_env()
    workflow_id = args.workflow_id
    if args.dir is None and workflow_id in (".", ".."):
        print(f"imagefork: workflow id {workflow_id!r} names no folder of its own: give --dir", file=sys.stderr)
        return 2
    final = _last_final(config, workflow_id, args.timeout)
    if isinstance(final, int):
        return final
    if final.status == "CANCELLED":
        print(f"imagefork: workflow {workflow_id} was cancelled: {len(final.outputs)} of {final.taskCount} "
              f"outputs were made", file=sys.stderr)
    elif final.status != "COMPLETED":
        why = f": {final.errors[0].code}: {final.errors[0].message}" if final.errors else ""
        print(f"imagefork: workflow {workflow_id} did not complete: {final.status} "
              f"({len(final.outputs)} of {final.taskCount} outputs){why}", file=sys.stderr)
        return 1
    if args.urls:
        for url in output_links(config, final):
            print(url)
        return exit_code(final.status)
    folder = Path(args.dir) if args.dir is not None else Path(workflow_id)
    try:
        files = download_outputs(config, final, folder, show=print)
    except PipelineError as exc:
        print(f"imagefork: {exc}", file=sys.stderr)
        return 1
    total = sum(path.stat().st_size for path, _out in files)
    print(f"{len(final.outputs)} outputs of workflow {workflow_id}, {total:,} bytes, in {folder}/", file=sys.stderr)
    return exit_code(final.status)
