"""The records that cross topics. Field names follow schemas/*.avsc exactly;
``to_dict``/``from_dict`` sit beside each record so the serde stays generic."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, is_dataclass
from typing import Any

from streams import segments, serde
from streams.core.options import ImageOptions, flat_fields, options_of


def now_ms() -> int:
    """The wall clock in milliseconds, as every timestamp of the contract."""
    return int(time.time() * 1000)


# workflow statuses
COMPLETED, FAILED, TIMED_OUT, REJECTED, CANCELLED = "COMPLETED", "FAILED", "TIMED_OUT", "REJECTED", "CANCELLED"
# task statuses
SUCCEEDED = "SUCCEEDED"


@dataclass(frozen=True)
class Size:
    width: int
    height: int
    options: ImageOptions = ImageOptions()  # this size's own, over the request's

    def to_dict(self) -> dict[str, Any]:
        """As a request document writes it: the box and its own options, flat."""
        return {"width": self.width, "height": self.height, **self.options.said()}


@dataclass(frozen=True)
class RetryOf:
    """A retry of a finished run: its tasks ``taskRefs`` (empty: all) run again, ``outputs`` are kept. With
    ``sourceSha256`` (a regeneration), the kept outputs were made from those bytes: a source whose bytes
    changed since is made into every output again."""
    runId: str
    taskRefs: tuple[str, ...] = ()
    outputs: tuple["TaskOutput", ...] = ()
    sourceSha256: str = ""


@dataclass(frozen=True)
class Preset:
    """A named set of outputs (formats x sizes, options), versioned (``schemas/io.imagefork.Preset.avsc``):
    a request names it instead of, or besides, its own sizes (``core/presets.py``)."""
    name: str
    version: int
    outputFormats: tuple[str, ...]
    outputSizes: tuple[Size, ...]
    maintainAspectRatio: bool = True
    options: ImageOptions = ImageOptions()  # as validated, with resizeMode always said
    description: str = ""
    updatedAt: int = 0

    def snapshot(self) -> dict[str, Any]:
        """What a request that used it carries (in its final event's ``request``): the preset as it was."""
        return {"name": self.name, "version": self.version, "outputFormats": list(self.outputFormats),
                "outputSizes": [s.to_dict() for s in self.outputSizes],
                "maintainAspectRatio": self.maintainAspectRatio, **self.options.said()}

    def document(self) -> dict[str, Any]:
        return {**self.snapshot(), "description": self.description, "updatedAt": self.updatedAt}

    @property
    def ref(self) -> "PresetRef":
        return PresetRef(self.name, self.version)


@dataclass(frozen=True)
class PresetRef:
    name: str
    version: int

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "PresetRef | None":
        return cls(d["name"], d["version"]) if d else None


@dataclass(frozen=True)
class ImageRequest:
    fileLocation: str
    outputFormats: tuple[str, ...]
    outputSizes: tuple[Size, ...]
    maintainAspectRatio: bool = True
    workflowId: str | None = None
    correlationId: str | None = None
    options: ImageOptions = ImageOptions()  # as validated, with resizeMode always said
    retry: RetryOf | None = None
    facts: tuple[str, ...] | None = None  # the costly source facts asked (None: all)
    callbackUrl: str | None = None  # where the final event is POSTed (core/webhooks.py)
    preset: Preset | None = None  # the preset it names, as it was when planned
    priority: str = "interactive"  # its lane: "interactive" or "batch" (core/lanes.py)

    @property
    def mode(self) -> str:
        return self.options.resizeMode or ("fit" if self.maintainAspectRatio else "force")

    def to_dict(self) -> dict[str, Any]:
        """The request as a JSON document (the seed's flat form), without its retry."""
        own = {"outputFormats": list(self.outputFormats), "outputSizes": [s.to_dict() for s in self.outputSizes]} \
            if self.outputSizes or self.preset is None else {}  # a preset's alone: nothing of its own
        return {
            "fileLocation": self.fileLocation,
            **own,
            "maintainAspectRatio": self.maintainAspectRatio,
            "workflowId": self.workflowId,
            "correlationId": self.correlationId,
            **self.options.said(),
            **({} if self.facts is None else {"facts": list(self.facts)}),
            **({} if self.callbackUrl is None else {"callbackUrl": self.callbackUrl}),
            **({} if self.preset is None else {"preset": self.preset.snapshot()}),
            **({} if self.priority == "interactive" else {"priority": self.priority}),
        }


@dataclass(frozen=True)
class TaskDescriptor:
    """One task of a plan: its reference and the output it asks for (the box, not the output's size)."""
    taskRef: str
    format: str
    width: int
    height: int

    def to_dict(self) -> dict[str, Any]:
        return {"taskRef": self.taskRef, "format": self.format, "width": self.width, "height": self.height}


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool, bytes)):
        return value
    if isinstance(value, (_Record, ImageOptions, PassedOutput)):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return asdict(value) if is_dataclass(value) and not isinstance(value, type) else value


def _json_list(value: Any) -> list:
    """A list kept as JSON text in a record (or already a list)."""
    if not value:
        return []
    return json.loads(value) if isinstance(value, str) else list(value)


class _Record:
    def to_dict(self) -> dict[str, Any]:
        """As ``dataclasses.asdict``, without its deep copy of every value: a fifth of a resize worker's
        main-thread time went to asdict (bench/breakdown.py --profile)."""
        return {name: _plain(getattr(self, name)) for name in self.__dataclass_fields__}  # type: ignore[attr-defined]

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})  # type: ignore[attr-defined]


@dataclass(frozen=True)
class ResizeTask(_Record):
    workflowId: str
    taskRef: str
    index: int
    total: int
    sourceUri: str
    fileLocation: str
    format: str
    width: int
    height: int
    maintainAspectRatio: bool
    outputKey: str
    deadline: int
    attempt: int = 1
    notBefore: int = 0
    maxWidth: int = 0
    maxHeight: int = 0
    runId: str = ""
    options: ImageOptions = ImageOptions()
    facts: tuple[str, ...] = ()  # the source facts this task reports (empty: another task of the run does)
    sourceSha256: str = ""  # of the source's bytes, as the planner fetched them
    priority: str = ""  # its lane: "batch", or "" (interactive); a retried task goes back to its lane

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        return {**d, **flat_fields("ResizeTask", self.options), "facts": list(self.facts)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ResizeTask":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d and k not in ("options", "facts")},
                   options=options_of("ResizeTask", d), facts=tuple(d.get("facts") or ()))


@dataclass(frozen=True)
class TaskOutput(_Record):
    taskRef: str
    format: str
    width: int
    height: int
    bytes: int
    contentType: str
    s3Uri: str
    url: str
    frames: int = 1  # more than 1: an animation
    options: ImageOptions = ImageOptions()  # what was applied; None: not applied
    reused: bool = False  # copied from an output of the same source bytes and spec (reusedFrom)
    reusedFrom: str = ""

    def to_dict(self) -> dict[str, Any]:
        # written out: this runs for every output of every final event the join writes
        return {"taskRef": self.taskRef, "format": self.format, "width": self.width, "height": self.height,
                "bytes": self.bytes, "contentType": self.contentType, "s3Uri": self.s3Uri, "url": self.url,
                "frames": self.frames, "options": self.options.to_dict(), "reused": self.reused,
                "reusedFrom": self.reusedFrom, **flat_fields("TaskOutput", self.options)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TaskOutput":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d and k != "options"},
                   options=options_of("TaskOutput", d))


@dataclass(frozen=True)
class PassedOutput:
    """An output as its resize worker encoded it (``body``: the current TaskOutput's Avro body), with the
    fields the join reads: the join writes it into the final event as it came instead of building and
    encoding the record again (``serde.PassingReader``)."""
    taskRef: str
    url: str
    s3Uri: str
    body: bytes

    def full(self) -> TaskOutput:
        return TaskOutput.from_dict(serde.schema("TaskOutput").decode_body(self.body))

    def to_dict(self) -> dict[str, Any]:
        return self.full().to_dict()


def output_body(output: TaskOutput | PassedOutput) -> bytes:
    return output.body if isinstance(output, PassedOutput) else serde.schema("TaskOutput").encode_body(output.to_dict())


@dataclass(frozen=True)
class TaskError(_Record):
    taskRef: str
    code: str
    message: str
    attempts: int = 0


COSTLY_FACTS = ("colors", "placeholder", "phash")  # the source facts a request may leave out


@dataclass(frozen=True)
class SourceFacts(_Record):
    """What the source is (``streams/core/imaging/facts.py``)."""
    sha256: str
    width: int
    height: int
    format: str
    orientation: int
    alpha: bool
    frames: int
    colorSpace: str
    profile: str | None = None
    dominantColor: str | None = None
    palette: tuple[str, ...] = ()
    blurhash: str | None = None
    phash: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "palette": list(self.palette)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SourceFacts":
        given = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**{**given, "palette": tuple(d.get("palette") or ())})


@dataclass(frozen=True)
class TaskResult:
    workflowId: str
    taskRef: str
    status: str  # SUCCEEDED | FAILED
    attempts: int
    finishedAt: int
    output: TaskOutput | PassedOutput | None = None  # PassedOutput: in the join
    error: TaskError | None = None
    runId: str = ""
    deadline: int = 0  # the workflow's deadline as the task carried it (0: unknown)
    facts: SourceFacts | None = None  # from the one task of the run that was asked for them

    def to_dict(self) -> dict[str, Any]:
        return {
            "workflowId": self.workflowId,
            "taskRef": self.taskRef,
            "status": self.status,
            "attempts": self.attempts,
            "finishedAt": self.finishedAt,
            "output": self.output.to_dict() if self.output else None,
            "error": self.error.to_dict() if self.error else None,
            "runId": self.runId,
            "deadline": self.deadline,
            "facts": self.facts.to_dict() if self.facts else None,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], output_body: bytes | None = None) -> "TaskResult":
        """``output_body``: the output's Avro body, kept to be written into the final event as it came (``segments``)."""
        out = d.get("output")
        return cls(
            workflowId=d["workflowId"],
            taskRef=d["taskRef"],
            status=d["status"],
            attempts=d["attempts"],
            finishedAt=d["finishedAt"],
            output=(None if not out else PassedOutput(out["taskRef"], out["url"], out["s3Uri"], output_body)
                    if output_body is not None else TaskOutput.from_dict(out)),
            error=TaskError.from_dict(d["error"]) if d.get("error") else None,
            runId=d.get("runId") or "",
            deadline=d.get("deadline") or 0,
            facts=SourceFacts.from_dict(d["facts"]) if d.get("facts") else None,
        )


@dataclass(frozen=True)
class PlanFailure(_Record):
    status: str  # REJECTED | FAILED
    code: str
    message: str
    attempts: int = 0  # source fetch attempts made


@dataclass(frozen=True)
class WorkflowPlan:
    workflowId: str
    fileLocation: str
    tasks: tuple[TaskDescriptor, ...]  # in plan order
    submittedAt: int
    deadline: int
    correlationId: str | None = None
    failure: PlanFailure | None = None
    runId: str = ""
    retryOf: str = ""  # a retry: the finished run it retries
    carried: tuple[TaskOutput, ...] = ()  # a retry: the outputs kept from that run
    request: str = ""  # the validated request (JSON), carried to the final event
    preset: PresetRef | None = None  # the preset the request named, and its version

    @property
    def taskRefs(self) -> tuple[str, ...]:
        return tuple(t.taskRef for t in self.tasks)

    def to_dict(self) -> dict[str, Any]:
        return {
            "workflowId": self.workflowId,
            "correlationId": self.correlationId,
            "fileLocation": self.fileLocation,
            "taskRefs": list(self.taskRefs),  # for readers older than ``tasks``
            "tasks": [t.to_dict() for t in self.tasks],
            "submittedAt": self.submittedAt,
            "deadline": self.deadline,
            "failure": self.failure.to_dict() if self.failure else None,
            "runId": self.runId,
            "retryOf": self.retryOf,
            "carried": json.dumps([o.to_dict() for o in self.carried], separators=(",", ":")) if self.carried else "",
            "request": self.request,
            "preset": self.preset.to_dict() if self.preset else None,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "WorkflowPlan":
        return cls(
            workflowId=d["workflowId"],
            correlationId=d.get("correlationId"),
            fileLocation=d["fileLocation"],
            tasks=descriptors_of(d),
            submittedAt=d["submittedAt"],
            deadline=d["deadline"],
            failure=PlanFailure.from_dict(d["failure"]) if d.get("failure") else None,
            runId=d.get("runId") or "",
            retryOf=d.get("retryOf") or "",
            carried=tuple(TaskOutput.from_dict(o) for o in _json_list(d.get("carried"))),
            request=d.get("request") or "",
            preset=PresetRef.from_dict(d.get("preset")),
        )


@dataclass(frozen=True)
class DeadlineCheck(_Record):
    workflowId: str
    at: int


@dataclass(frozen=True)
class Cancellation(_Record):
    """A cancel of a workflow (``schemas/io.imagefork.Cancellation.avsc``)."""
    workflowId: str
    runId: str = ""  # empty: the id's open run, or the next one planned
    reason: str = ""
    by: str = ""
    at: int = 0
    applied: bool = False  # written back by the join as it ended run ``runId`` CANCELLED


@dataclass(frozen=True)
class WorkflowCompleted:
    workflowId: str
    correlationId: str | None
    status: str
    fileLocation: str
    fileLocations: tuple[str, ...]
    outputs: tuple[TaskOutput | PassedOutput, ...]  # PassedOutput: built by the join
    errors: tuple[TaskError, ...]
    taskCount: int
    submittedAt: int
    completedAt: int
    runId: str = ""
    retryOf: str = ""
    request: str = ""  # the validated request (JSON); "" for a REJECTED one
    tasks: tuple[TaskDescriptor, ...] = ()  # the plan's (empty: no plan, or written before the field)
    facts: SourceFacts | None = None  # what the source is (None: not known)
    preset: PresetRef | None = None  # the preset the request named, and its version

    def document(self) -> dict[str, Any]:
        """The final event as plain JSON for readers that do not speak Avro (``imagefork events --json``,
        the IMAGEFORK_COMPLETED_JSON_TOPIC mirror): the Avro record's fields, the request as an object
        (null for a REJECTED one) rather than JSON text."""
        doc = self.to_dict()
        try:
            doc["request"] = json.loads(self.request) if self.request else None
        except ValueError:
            pass  # kept as the text it was
        return doc

    def encode(self) -> bytes:
        """The Avro frame, each output's record written from its body (the bytes a resize worker wrote)."""
        return segments.encode_spliced("WorkflowCompleted", self.to_dict(outputs=False), "outputs",
                                    [output_body(o) for o in self.outputs])

    def to_dict(self, outputs: bool = True) -> dict[str, Any]:
        return {
            "workflowId": self.workflowId,
            "correlationId": self.correlationId,
            "status": self.status,
            "fileLocation": self.fileLocation,
            "fileLocations": list(self.fileLocations),
            "outputs": [o.to_dict() for o in self.outputs] if outputs else [],
            "errors": [e.to_dict() for e in self.errors],
            "taskCount": self.taskCount,
            "submittedAt": self.submittedAt,
            "completedAt": self.completedAt,
            "runId": self.runId,
            "retryOf": self.retryOf,
            "request": self.request,
            "tasks": [t.to_dict() for t in self.tasks],
            "facts": self.facts.to_dict() if self.facts else None,
            "preset": self.preset.to_dict() if self.preset else None,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "WorkflowCompleted":
        return cls(
            workflowId=d["workflowId"],
            correlationId=d.get("correlationId"),
            status=d["status"],
            fileLocation=d["fileLocation"],
            fileLocations=tuple(d["fileLocations"]),
            outputs=tuple(TaskOutput.from_dict(o) for o in d["outputs"]),
            errors=tuple(TaskError.from_dict(e) for e in d["errors"]),
            taskCount=d["taskCount"],
            submittedAt=d["submittedAt"],
            completedAt=d["completedAt"],
            runId=d.get("runId") or "",
            retryOf=d.get("retryOf") or "",
            request=d.get("request") or "",
            tasks=descriptors_of(d),
            facts=SourceFacts.from_dict(d["facts"]) if d.get("facts") else None,
            preset=PresetRef.from_dict(d.get("preset")),
        )


def descriptors_of(d: dict[str, Any]) -> tuple[TaskDescriptor, ...]:
    """A plan's (or a final event's) tasks; a plan written before ``tasks`` has only its references, named
    ``image_convert_resize_{format}_{w}x{h}_{i}``: read back from them (the one place that parses one)."""
    if d.get("tasks"):
        return tuple(TaskDescriptor(t["taskRef"], t["format"], t["width"], t["height"]) for t in d["tasks"])
    out = []
    for ref in d.get("taskRefs") or ():
        parts = ref.removeprefix("image_convert_resize_").rsplit("_", 2)
        box = parts[1].split("x") if len(parts) == 3 else ()
        ok = ref.startswith("image_convert_resize_") and len(box) == 2 and all(b.isdigit() for b in box)
        out.append(TaskDescriptor(ref, parts[0], int(box[0]), int(box[1])) if ok else TaskDescriptor(ref, "", 0, 0))
    return tuple(out)
