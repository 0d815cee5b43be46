"""Cancels: what a cancel message may say, and the index resize workers keep of the runs cancelled.

A cancel names a workflow id and, optionally, its run; a client writes it on the cancellations topic
(Avro ``Cancellation`` or the same fields as JSON), the join ends the run CANCELLED and writes the cancel
back with ``applied`` and the run id, and resize workers skip that run's tasks."""
from __future__ import annotations

import json
from typing import Any

from streams import serde

from streams.core.errors import RequestInvalid
from streams.core.models import Cancellation, now_ms
from streams.core.planning import valid_workflow_id

MAX_TEXT = 500  # reason and by: a few words each
MAX_RUN_ID = 200
MAX_AT = 2 ** 63 - 1  # an Avro long


def parse_cancellation(doc: Any, now: int) -> Cancellation:
    """A cancel document (JSON or decoded Avro) -> Cancellation; RequestInvalid says what is wrong."""
    if not isinstance(doc, dict):
        raise RequestInvalid([("", "a cancel is a JSON object: {\"workflowId\": ..., \"reason\": ...}")])
    problems = []
    wf = doc.get("workflowId")
    if not isinstance(wf, str) or not valid_workflow_id(wf):
        problems.append(("workflowId", "must be 1-128 characters of A-Z a-z 0-9 . _ : - (a letter or digit first)"))
    for name, most in (("runId", MAX_RUN_ID), ("reason", MAX_TEXT), ("by", MAX_TEXT)):
        value = doc.get(name, "")
        if value is not None and not isinstance(value, str):
            problems.append((name, "must be a string"))
        elif value and len(value) > most:
            problems.append((name, f"must be at most {most} characters"))
        elif value and not _utf8(value):
            problems.append((name, "must be text UTF-8 can encode (no lone surrogates)"))
    at = doc.get("at", 0)
    if at is not None and (not isinstance(at, int) or isinstance(at, bool) or not 0 <= at <= MAX_AT):
        problems.append(("at", "must be epoch milliseconds"))
    applied = doc.get("applied", False)
    if not isinstance(applied, bool):
        problems.append(("applied", "must be true or false"))
    unknown = sorted(set(doc) - {"workflowId", "runId", "reason", "by", "at", "applied"})
    if unknown:
        problems += [(name, "is not a field of a cancel") for name in unknown]
    if problems:
        raise RequestInvalid(problems)
    return Cancellation(wf, doc.get("runId") or "", doc.get("reason") or "", doc.get("by") or "",
                        doc.get("at") or now, applied)


def decode_cancellation(key: bytes | None, value: bytes | None) -> Cancellation:
    """A record of the cancellations topic (Avro or JSON); RequestInvalid or SerdeError say why not."""
    data = value or b""
    doc = serde.decode("Cancellation", data) if serde.is_single_object(data) else None
    if doc is None:
        try:
            doc = json.loads(data.decode("utf-8-sig"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise RequestInvalid([("", f"neither JSON nor an Avro Cancellation: {exc}")]) from None
    cancel = parse_cancellation(doc, now_ms())
    if key is not None and key != cancel.workflowId.encode():
        raise RequestInvalid([("key", f"the record's key {key[:200]!r} is not its workflowId "
                                      f"{cancel.workflowId!r} (the topic is compacted by workflow id)")])
    return cancel


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class CancelIndex:
    """The runs cancelled, by workflow id, as a resize worker learns them from the cancellations topic."""

    def __init__(self):
        self._runs: dict[str, dict[str, int]] = {}  # workflow id -> run id -> when it was cancelled

    def add(self, cancel: Cancellation) -> bool:
        """Keep a cancel that names its run (a client's cancel without one is for the join to resolve);
        True if it is new."""
        if not cancel.runId:
            return False
        runs = self._runs.setdefault(cancel.workflowId, {})
        new = cancel.runId not in runs
        runs[cancel.runId] = cancel.at
        return new

    def cancelled(self, workflow_id: str, run_id: str) -> bool:
        runs = self._runs.get(workflow_id)
        return runs is not None and run_id in runs

    def prune(self, older_than: int) -> list[tuple[str, str]]:
        """Forget cancels from before ``older_than`` (epoch ms); return the (workflow, run) forgotten."""
        gone = []
        for wf, runs in list(self._runs.items()):
            for run, at in list(runs.items()):
                if at < older_than:
                    del runs[run]
                    gone.append((wf, run))
            if not runs:
                del self._runs[wf]
        return gone

    def __len__(self) -> int:
        return sum(len(r) for r in self._runs.values())
