"""The presets over HTTP: ``GET /v1/presets`` (every preset, as the presets topic has it), ``GET``, ``PUT`` and
``DELETE /v1/presets/{name}`` (a change is the preset's next version on the topic; every planner and API
reads it from there)."""
from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from streams.adapters.http import json_body, json_error, path_part
from streams.adapters.presets import PresetsUnavailable, delete_preset, put_preset
from streams.api.auth import WORKFLOW, foreign
from streams.core.errors import RequestInvalid
from streams.core.planning import valid_preset_name

log = logging.getLogger("imagefork")


def unavailable(exc: Exception) -> web.Response:
    resp = json_error(503, "PRESETS_UNAVAILABLE", f"the presets cannot be read or written now: {exc}")
    resp.headers["Retry-After"] = "5"
    return resp


def name_of(request) -> str:
    return path_part(request, "name", valid_preset_name, "INVALID_NAME",
                     "a preset's name is 1-64 characters of a-z 0-9 . _ -")


def routes(api) -> list[tuple]:
    """(method, path, handler, scope) rows for the API's table."""

    async def listing(_request):
        if not api.presets.caught_up.is_set():
            return json_error(503, "UNAVAILABLE", f"the API is still reading {api.config.topics.presets}; ask again")
        presets = sorted(api.presets.all().values(), key=lambda p: p.name)
        return web.json_response({"presets": [p.document() for p in presets]})

    async def one(request):
        name = name_of(request)
        found = (await asyncio.to_thread(api.presets.for_name, name, 10.0) or {}).get(name)
        if found is None:
            return json_error(404, "NOT_FOUND", f"no preset named {name!r}")
        return web.json_response(found.document())

    async def put(request):
        refused = foreign(request)
        if refused is not None:
            return refused
        name = name_of(request)
        request[WORKFLOW] = f"preset:{name}"  # the audit line's subject
        doc, refused = await json_body(request, api.config.api_body_timeout_s)
        if refused is not None:
            return refused
        try:
            preset, changed = await asyncio.to_thread(put_preset, api.config, name, doc)
        except RequestInvalid as exc:
            return json_error(400, "INVALID_PRESET", exc.message,
                              problems=[{"field": f, "message": m} for f, m in exc.problems])
        except PresetsUnavailable as exc:
            return unavailable(exc)
        log.info("api: preset %s %s", name, f"is now version {preset.version}" if changed else "unchanged")
        return web.json_response({**preset.document(), "changed": changed},
                                 status=201 if changed and preset.version == 1 else 200)

    async def delete(request):
        refused = foreign(request)
        if refused is not None:
            return refused
        name = name_of(request)
        request[WORKFLOW] = f"preset:{name}"
        try:
            gone = await asyncio.to_thread(delete_preset, api.config, name)
        except PresetsUnavailable as exc:
            return unavailable(exc)
        if gone is None:
            return json_error(404, "NOT_FOUND", f"no preset named {name!r}")
        return web.json_response({"deleted": name, "version": gone.version})

    return [("GET", "/v1/presets", listing, "read"), ("GET", "/v1/presets/{name}", one, "read"),
            ("PUT", "/v1/presets/{name}", put, "operate"), ("DELETE", "/v1/presets/{name}", delete, "operate")]
