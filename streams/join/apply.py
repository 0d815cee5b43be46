"""Apply: an event (a plan or a task result) -> the join core's outcome -> the records of the open
transaction: changelog rows, the final event (and its JSON mirror), a notice, a dead letter."""
from __future__ import annotations

import json
import logging
from dataclasses import replace

from confluent_kafka import KafkaError

from streams import segments, serde
from streams.adapters.changelog import row_key, row_value
from streams.adapters.kafka import dead_letter_headers
from streams.config import Config
from streams.core.join import MARKER, Ignored, JoinState, Outcome
from streams.core.models import (
    CANCELLED, FAILED, Cancellation, TaskError, TaskResult, WorkflowCompleted, WorkflowPlan, now_ms,
)
from streams.join.session import TOO_LARGE, Session
from streams.metrics import DEAD_LETTERS, MESSAGES
from streams.serde import SerdeError

log = logging.getLogger("imagefork")


class Applier:
    def __init__(self, config: Config, session: Session, stats: dict[str, int]):
        self.config, self.session, self.stats = config, session, stats
        self.topics = config.topics
        self.late_grace_ms = int(config.late_result_grace_s * 1000)
        # counted as read (an aborted transaction's events are read, and counted, again)
        self._processed = MESSAGES.labels("join", "processed")
        self._dead_lettered = MESSAGES.labels("join", "dead_lettered")

    def event(self, p: int, state: JoinState, msg, now: int) -> None:
        """One message of the events topic."""
        raw = msg.value() or b""
        try:
            kind, body, passed = segments.decode_join_event_passing(raw)
            if msg.key() != body["workflowId"].encode():
                raise SerdeError(f"the key {msg.key()!r} is not the workflow id {body['workflowId']!r} "
                                 "(the join's state is partitioned by workflow id)")
        except SerdeError as exc:
            return self.dead_letter(msg, "NOT_A_JOIN_EVENT", str(exc))
        self._processed.inc()
        if kind not in ("WorkflowPlan", "TaskResult", "Cancellation"):
            return  # DeadlineCheck, from older producers: the clock is internal, so their ticks change nothing
        try:
            if kind == "WorkflowPlan":
                record = WorkflowPlan.from_dict(body)
                outcome = state.record_plan(record, now)
            elif kind == "Cancellation":
                record = Cancellation.from_dict(body)
                outcome = state.record_cancel(record, now)
                log.info("workflow %s: cancel%s by %s: %s", record.workflowId, f" of run {record.runId}"
                         if record.runId else "", record.by or "someone", outcome.ignored or "taken")
            else:
                record = TaskResult.from_dict(body, passed)
                outcome = state.record_result(record, now)
        except Exception as exc:  # a bug must not stop the partition: park the event with the reason
            log.exception("join failed on %s", body.get("workflowId"))
            return self.dead_letter(msg, "INTERNAL", f"{type(exc).__name__}: {exc}")
        if outcome.late:
            return self.dead_letter(msg, "LATE_RESULT", (
                f"a result of task {record.taskRef} for workflow {record.workflowId}, which the join does not know: "
                f"its deadline passed {(now - record.deadline) / 1000:.0f}s ago, past the "
                f"{self.late_grace_ms / 1000:.0f}s grace (its workflow finished long ago, or was never planned)"))
        self.outcome(p, outcome, record, raw)

    def outcome(self, p: int, outcome: Outcome, record=None, raw: bytes | None = None) -> None:
        """The rows, final event and notice of an outcome (of an event, a repaired result or the clock)."""
        produce = self.session.produce
        after = self.session.txn.after
        topic = self.topics.join_state
        for row in outcome.rows:
            produce(topic, row_key(row), row_value(row, raw if row.value is record else None), p)
        final = outcome.final
        if final is not None:
            self.final(final)
            if final.taskCount and not final.fileLocation.startswith("s3://"):  # its source was staged
                run_id = next((r.value.runId for r in outcome.rows if r.kind == MARKER and r.value), "")
                after.append((final.workflowId, run_id))
        if outcome.discarded is not None:
            after.append(outcome.discarded)
        if outcome.orphan:
            self.session.txn.orphans.append(outcome.orphan)
        if outcome.notice is not None:
            self.notice(outcome.notice)

    def final(self, final: WorkflowCompleted) -> None:
        key = final.workflowId.encode()
        tries, err = self.session.refused(self.topics.completed, key)
        if tries >= 2 * self.config.join_max_aborts:
            # the degraded event was refused as often: the topic takes nothing from us (an ACL, a deleted
            # topic). The workflow ends here without its final event, said loudly, not in an endless loop.
            log.error("join: the final event of %s was refused %d times (%s); the workflow ends %s without it",
                      final.workflowId, tries, err, final.status)
            DEAD_LETTERS.labels("join", "FINAL_UNDELIVERABLE").inc()
            return
        if tries >= self.config.join_max_aborts:
            final = degraded(final, err)
            log.error("join: the final event of %s was refused %d times (%s); sending it %s %s without its "
                      "outputs", final.workflowId, tries, err, final.status, final.errors[0].code)
        mirror = self.config.completed_json_topic
        try:
            encoded = final.encode()
            doc = json.dumps(final.document(), separators=(",", ":")).encode() if mirror else b""
        except Exception as exc:  # a bug, or bytes no check caught: one final event all the same, said loudly
            log.exception("join: the final event of %s could not be written", final.workflowId)
            final = degraded(final, None, f"could not be written: {type(exc).__name__}: {exc}")
            encoded = final.encode()
            doc = json.dumps(final.document(), separators=(",", ":")).encode()
        self.session.produce(self.topics.completed, key, encoded)
        if final.facts is not None:  # indexed by its source's bytes (the API's /v1/sources, /v1/similar)
            by_source = f"{final.facts.sha256}/{final.workflowId}".encode()
            if not self.session.given_up(self.topics.sources, by_source, f"the source record of {final.workflowId}"):
                self.session.produce(self.topics.sources, by_source, encoded)
        if final.status == CANCELLED:  # what the run uploads that the event does not list goes, once committed
            self.session.txn.sweeps.append((final.workflowId, final.runId, frozenset(o.s3Uri for o in final.outputs)))
        if final.status == CANCELLED and final.runId:  # resize workers skip the run's tasks from here on
            cancel = serde.encode("Cancellation", {"workflowId": final.workflowId, "runId": final.runId,
                                                   "reason": "", "by": "join", "at": final.completedAt,
                                                   "applied": True})
            if not self.session.given_up(self.topics.cancellations, key, f"the cancel of {final.workflowId}"):
                self.session.produce(self.topics.cancellations, key, cancel)
        if mirror and not self.session.given_up(mirror, key, f"the JSON mirror of {final.workflowId}'s final event"):
            self.session.produce(mirror, key, doc)
        txn = self.session.txn
        self.stats["finals"] += 1
        txn.finals += 1
        txn.finished.append((final.status, max(0.0, (final.completedAt - final.submittedAt) / 1000)))
        log.info("workflow %s %s: %d of %d outputs", final.workflowId, final.status,
                 len(final.outputs), final.taskCount)

    def notice(self, ignored: Ignored) -> None:
        """Tell a resubmission's submitter at once that its run is not taken (clients read the notices
        topic beside the completed one): no second final event, no silent wait."""
        taken = ignored.taken
        key = ignored.workflowId.encode()
        if self.session.given_up(self.topics.notices, key, "notice"):
            return
        self.session.produce(self.topics.notices, key, serde.encode("RunIgnored", {
            "workflowId": ignored.workflowId, "runId": ignored.runId, "reason": ignored.reason,
            "takenRunId": taken.runId, "takenStatus": taken.status, "takenFinishedAt": taken.at,
            "at": now_ms()}))
        log.info("workflow %s: run %s not taken (the id's run %s is %s)", ignored.workflowId, ignored.runId,
                 taken.runId, taken.status if ignored.reason == "finished" else "still running")

    def dead_letter(self, msg, code: str, reason: str) -> None:
        where = {"topic": msg.topic(), "partition": str(msg.partition()), "offset": str(msg.offset())}
        if self.session.given_up(self.topics.dead_letter, msg.key(), f"dead letter ({code}: {reason}) of {where}"):
            return
        log.warning("join: dead-lettered %s: %s", where, reason)
        headers = [*(msg.headers() or []), *dead_letter_headers(code, reason, where).items(),
                   ("imagefork.attempts", b"1"), ("imagefork.agent", b"join")]
        self.session.produce(self.topics.dead_letter, msg.key(), msg.value(), None, headers)
        DEAD_LETTERS.labels("join", code).inc()
        self._dead_lettered.inc()


def degraded(final: WorkflowCompleted, err: KafkaError | None, unwritable: str = "") -> WorkflowCompleted:
    """The final event the completed topic refused (or that could not be written: ``unwritable`` says why),
    made as small as it can be: FAILED with one error saying why, without the per-output list, the request,
    the task list and the source's facts (the outputs stay in the bucket)."""
    too_large = err is not None and err.code() in TOO_LARGE
    code = "FINAL_UNWRITABLE" if unwritable else "FINAL_TOO_LARGE" if too_large else "FINAL_REFUSED"
    why = unwritable or (f"was refused by the completed topic: "
                         f"{err.str() if err is not None else 'unknown error'}")
    message = (f"the final event ({final.status}, {len(final.outputs)} of {final.taskCount} outputs) {why}; "
               f"sent without its outputs")
    return replace(final, status=FAILED, fileLocations=(), outputs=(), request="", tasks=(), facts=None,
                   errors=(TaskError(taskRef="", code=code, message=message[:1000]),))
