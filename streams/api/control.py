"""The API's verbs on a workflow that runs or has run: retry (a new run of its failed tasks) and cancel."""
from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from streams.adapters.http import json_body, json_error
from streams.client import SubmitError
from streams.core.cancels import parse_cancellation
from streams.core.errors import RequestInvalid
from streams.core.models import Cancellation, now_ms
from streams.core.status import TERMINAL, retry_request, retryable

log = logging.getLogger("imagefork")


def not_found(workflow_id: str) -> web.Response:
    return json_error(404, "NOT_FOUND", f"no workflow {workflow_id!r} is known here")


def links(workflow_id: str) -> dict:
    base = f"/v1/workflows/{workflow_id}"
    return {"self": base, "events": f"{base}/events", "retry": f"{base}/retry", "cancel": f"{base}/cancel"}


async def retry_workflow(api, workflow_id: str):
    doc = await api.directory.known(workflow_id)
    if doc is None:
        return not_found(workflow_id)
    if doc["status"] not in TERMINAL:
        return json_error(409, "NOT_FINISHED", f"workflow {workflow_id} is {doc['status']}: retry it once it has ended")
    final = api.index.get(workflow_id)
    if final is None:
        return json_error(409, "NO_FINAL_EVENT", f"the final event of {workflow_id} is no longer on "
                                                 f"{api.config.topics.completed}: submit it again")
    ok, why = retryable(final)
    if not ok:
        return json_error(409, "NOT_RETRYABLE", f"workflow {workflow_id} cannot be retried: {why}")
    body, refs = retry_request(final)
    failed = await api._send(body, workflow_id)
    if failed is not None:
        return failed
    api.directory.retry_sent(workflow_id, final.runId)
    log.info("api: workflow %s: retry of run %s sent (%s)", workflow_id, final.runId,
             f"{len(refs)} tasks" if refs else "every task")
    return web.json_response({"workflowId": workflow_id, "retryOf": final.runId, "tasks": refs or "all",
                              "links": links(workflow_id)}, status=202,
                             headers={"Location": f"/v1/workflows/{workflow_id}"})


async def cancel_workflow(api, request, workflow_id: str):
    """End a workflow CANCELLED with the outputs made so far: 202 once the cancel is on Kafka (the final
    event follows), 404 for an unknown id, 409 for a workflow that has ended."""
    reason = ""
    if request.can_read_body:
        body, refused = await json_body(request, api.config.api_body_timeout_s)
        if refused is not None:
            return refused
        if not isinstance(body, dict):
            return json_error(400, "INVALID_REQUEST", 'the body, if any, is a JSON object: {"reason": "..."}')
        reason = body.get("reason") or ""
    try:  # the same checks as a cancel from Kafka: a string of at most 500 characters UTF-8 can encode
        parse_cancellation({"workflowId": workflow_id, "reason": reason}, 0)
    except RequestInvalid as exc:
        return json_error(400, "INVALID_REQUEST", exc.message,
                          problems=[{"field": f, "message": why} for f, why in exc.problems])
    doc = await api.directory.known(workflow_id)
    if doc is None:
        return not_found(workflow_id)
    if doc["status"] in TERMINAL:
        return json_error(409, "FINISHED", f"workflow {workflow_id} has ended ({doc['status']}): there is "
                                           f"nothing to cancel", workflowStatus=doc["status"])
    run_id = doc.get("runId") or ""
    cancel = Cancellation(workflow_id, run_id, reason, "api", now_ms())
    try:
        await asyncio.to_thread(api.client.cancel, cancel, 10.0)
    except SubmitError as exc:
        resp = json_error(503, "KAFKA_UNAVAILABLE", f"{exc}; send the cancel again")
        resp.headers["Retry-After"] = "5"
        return resp
    log.info("api: workflow %s: cancel of run %s sent", workflow_id, run_id or "(not planned yet)")
    return web.json_response({"workflowId": workflow_id, "runId": run_id, "status": "CANCELLING",
                              "links": links(workflow_id)}, status=202,
                             headers={"Location": f"/v1/workflows/{workflow_id}"})
