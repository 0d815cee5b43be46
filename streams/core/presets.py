"""Named presets: a set of outputs (formats x sizes, options) a request asks for by name, versioned on a
compacted topic, and the regeneration of the workflows that used one when it changes (no I/O here).

- A request's ``"preset": "product-gallery"`` is resolved by the planner (and checked by the API and
  ``submit``) against the presets topic: the run makes the preset's outputs and the request's own, if it has
  any; the request's validated form (``ImageRequest.to_dict``, carried to the final event) holds the preset
  as it was, and the final event its name and version (``preset``).
- ``regeneration`` compares a finished run's outputs with what the preset's current version asks for: an
  output of the same format, box and options is kept (renamed to the new plan's reference), one the
  preset now asks for and the run did not make is made, one it no longer asks for is listed as dropped.
  The new run goes out as a retry does: the same workflow id, the kept outputs carried.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

from streams.core.errors import RequestInvalid
from streams.core.models import Preset, TaskOutput, WorkflowCompleted
from streams.core.options import flat_fields
from streams.core.planning import outputs_of, parse_preset, parse_request, task_ref

# a preset read back from its topic was checked when it was written: read it whatever the limits are today
_ANY = {"max_dimension": 1 << 30, "max_tasks": 1 << 30, "max_pixels": 0}


def preset_record(preset: Preset, deleted: bool = False) -> dict[str, Any]:
    """The Avro ``Preset`` record (its options also flat in each size, for readers of ``Size`` v1); a deleted
    one keeps its last version."""
    return {
        "deleted": deleted, "name": preset.name, "version": preset.version, "outputFormats": list(preset.outputFormats),
        "outputSizes": [{"width": s.width, "height": s.height, **flat_fields("Size", s.options),
                         "options": s.options.to_dict() if s.options.said() else None} for s in preset.outputSizes],
        "maintainAspectRatio": preset.maintainAspectRatio, "options": preset.options.to_dict(),
        "description": preset.description, "updatedAt": preset.updatedAt,
    }


def preset_from_record(record: dict[str, Any]) -> Preset:
    return parse_preset(record, record.get("name"), record.get("version"), description=record.get("description") or "",
                        updated_at=record.get("updatedAt") or 0, **_ANY)


def same_outputs(a: Preset, b: Preset) -> bool:
    """Whether two presets ask for the same outputs (a new version of one that does not is no change)."""
    return ({**a.snapshot(), "version": 0} == {**b.snapshot(), "version": 0}
            and a.description == b.description)


@dataclass(frozen=True)
class Regeneration:
    """What regenerating one finished workflow with a preset's current version does."""
    workflowId: str
    runId: str  # the finished run it starts from
    fromVersion: int
    request: dict | None  # the request to send (a retry of that run); None: nothing to make
    make: tuple[str, ...]  # the new plan's references to make
    kept: tuple[TaskOutput, ...]  # outputs carried, under the new plan's references
    dropped: tuple[TaskOutput, ...]  # outputs the preset no longer asks for (listed, not deleted)


def _spec(fmt: str, size, options) -> tuple:
    return fmt, size.width, size.height, options


def regeneration(final: WorkflowCompleted, preset: Preset, *, max_dimension: int, max_tasks: int,
                 max_pixels: int = 0, priority: str | None = None) -> Regeneration:
    """``final``'s run again with ``preset`` as it is now; raises RequestInvalid when its request cannot be
    read or no longer passes (a preset grown past the task limit)."""
    if not final.request:
        raise RequestInvalid([("request", "the final event does not carry its request (a REJECTED run, or one "
                                          "written before requests were kept)")])
    doc = json.loads(final.request)
    limits = {"max_dimension": max_dimension, "max_tasks": max_tasks, "max_pixels": max_pixels}
    retry = {"runId": final.runId}
    old = parse_request({**doc, "retry": retry}, **_ANY)
    if old.preset is None or old.preset.name != preset.name:
        raise RequestInvalid([("preset", f"the run did not use preset {preset.name!r}")])
    again = {**doc, "preset": preset.snapshot(), "workflowId": final.workflowId,
             **({"priority": priority} if priority else {})}
    new = parse_request({**again, "retry": retry}, **limits)
    made = {o.taskRef: o for o in final.outputs}
    by_spec = {}
    for i, (fmt, size, options) in enumerate(outputs_of(old)):
        output = made.get(task_ref(fmt, size, i))
        if output is not None:
            by_spec[_spec(fmt, size, options)] = output
    planned = [(task_ref(fmt, size, i), _spec(fmt, size, options))
               for i, (fmt, size, options) in enumerate(outputs_of(new))]
    wanted = {spec for _ref, spec in planned}
    keep = {spec for _ref, spec in planned if spec in by_spec}
    while True:  # an output made under a reference whose object a kept output still is: that one is made too
        made_refs = {ref for ref, spec in planned if spec not in keep}
        clash = {spec for spec in keep if by_spec[spec].taskRef in made_refs}
        if not clash:
            break
        keep -= clash
    make = tuple(ref for ref, spec in planned if spec not in keep)
    kept = tuple(replace(by_spec[spec], taskRef=ref) for ref, spec in planned if spec in keep)
    dropped = tuple(o for spec, o in by_spec.items() if spec not in wanted)
    request = None
    if make:
        request = {**again, "retry": {"runId": final.runId, "taskRefs": list(make),
                                      "outputs": [o.to_dict() for o in kept],
                                      "sourceSha256": final.facts.sha256 if final.facts else ""}}
    return Regeneration(final.workflowId, final.runId, old.preset.version, request, make, kept, dropped)
