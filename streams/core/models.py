"""The records that cross topics. Field names follow schemas/*.avsc exactly;
``to_dict``/``from_dict`` sit beside each record so the serde stays generic."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, is_dataclass
from typing import Any


def now_ms() -> int:
    """The wall clock in milliseconds, as every timestamp of the contract."""
    return int(time.time() * 1000)


# workflow statuses
COMPLETED, FAILED, TIMED_OUT, REJECTED = "COMPLETED", "FAILED", "TIMED_OUT", "REJECTED"
# task statuses
SUCCEEDED = "SUCCEEDED"


@dataclass(frozen=True)
class Size:
    width: int
    height: int
    resizeMode: str | None = None  # None: the request's
    gravity: str | None = None  # None: the request's
    quality: int | None = None  # None: the request's (a thumbnail may want more than a large image)


@dataclass(frozen=True)
class RetryOf:
    """A retry of a finished run: its tasks ``taskRefs`` (empty: all) run again, ``outputs`` are kept."""
    runId: str
    taskRefs: tuple[str, ...] = ()
    outputs: tuple["TaskOutput", ...] = ()


@dataclass(frozen=True)
class ImageRequest:
    fileLocation: str
    outputFormats: tuple[str, ...]
    outputSizes: tuple[Size, ...]
    maintainAspectRatio: bool = True
    workflowId: str | None = None
    correlationId: str | None = None
    resizeMode: str | None = None  # fit | fill | force | pad; None: fit if maintainAspectRatio, else force
    gravity: str = "center"
    enlarge: bool = True
    background: str | None = None  # #rrggbb or #rrggbbaa (pad); None: transparent, white for JPEG
    quality: int | None = None  # 1-100 (jpg, webp, avif); None: the configured encoding's
    retry: RetryOf | None = None
    effort: int | None = None  # 0 (fastest) - 9 (smallest): png, jpg, webp, avif; None: the configured ones
    progressive: bool | None = None  # jpg; None: the configured one (IMAGEFORK_JPEG_PROGRESSIVE)
    lossless: bool = False  # webp
    animated: bool = False  # gif, webp, avif outputs of an animated source stay animated
    keepMetadata: str = "none"  # none | copyright | all
    keepProfile: bool = False  # keep an RGB source's ICC profile instead of converting to sRGB

    @property
    def mode(self) -> str:
        return self.resizeMode or ("fit" if self.maintainAspectRatio else "force")

    def to_dict(self) -> dict[str, Any]:
        return {
            "fileLocation": self.fileLocation,
            "outputFormats": list(self.outputFormats),
            "outputSizes": [asdict(s) for s in self.outputSizes],
            "maintainAspectRatio": self.maintainAspectRatio,
            "workflowId": self.workflowId,
            "correlationId": self.correlationId,
            "resizeMode": self.resizeMode,
            "gravity": self.gravity,
            "enlarge": self.enlarge,
            "background": self.background,
            "quality": self.quality,
            "effort": self.effort,
            "progressive": self.progressive,
            "lossless": self.lossless,
            "animated": self.animated,
            "keepMetadata": self.keepMetadata,
            "keepProfile": self.keepProfile,
        }


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool, bytes)):
        return value
    if isinstance(value, _Record):
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
    resizeMode: str = ""  # "": from maintainAspectRatio (a task written before modes)
    gravity: str = "center"
    enlarge: bool = True
    background: str = ""  # "": pad's default (transparent, white for JPEG)
    quality: int = 0  # 0: the configured encoding's
    effort: int = -1  # 0-9; -1: the configured encoding's
    progressive: bool | None = None  # jpg; None: the configured one
    lossless: bool = False
    animated: bool = False
    keepMetadata: str = "none"
    keepProfile: bool = False


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
    mode: str = ""  # the resize mode applied ("": written before modes, or recovered by repair)
    gravity: str = ""  # fill and pad only
    enlarge: bool = True
    background: str = ""  # pad only: #rrggbbaa
    quality: int = 0  # jpg, lossy webp and avif only
    effort: int = -1  # the request's 0-9 effort (png, jpg, webp, avif); -1: the configured one, or no such knob
    progressive: bool = False  # jpg only
    lossless: bool = False  # webp only
    frames: int = 1  # more than 1: an animation
    keepMetadata: str = ""  # none | copyright | all, what was written ("": written before the option)
    keepProfile: bool = False  # the source's own ICC profile was embedded (not sRGB)


@dataclass(frozen=True)
class TaskError(_Record):
    taskRef: str
    code: str
    message: str
    attempts: int = 0


@dataclass(frozen=True)
class TaskResult:
    workflowId: str
    taskRef: str
    status: str  # SUCCEEDED | FAILED
    attempts: int
    finishedAt: int
    output: TaskOutput | None = None
    error: TaskError | None = None
    runId: str = ""
    deadline: int = 0  # the workflow's deadline as the task carried it (0: unknown)

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
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TaskResult":
        return cls(
            workflowId=d["workflowId"],
            taskRef=d["taskRef"],
            status=d["status"],
            attempts=d["attempts"],
            finishedAt=d["finishedAt"],
            output=TaskOutput.from_dict(d["output"]) if d.get("output") else None,
            error=TaskError.from_dict(d["error"]) if d.get("error") else None,
            runId=d.get("runId") or "",
            deadline=d.get("deadline") or 0,
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
    taskRefs: tuple[str, ...]
    submittedAt: int
    deadline: int
    correlationId: str | None = None
    failure: PlanFailure | None = None
    runId: str = ""
    retryOf: str = ""  # a retry: the finished run it retries
    carried: tuple[TaskOutput, ...] = ()  # a retry: the outputs kept from that run
    request: str = ""  # the validated request (JSON), carried to the final event

    def to_dict(self) -> dict[str, Any]:
        return {
            "workflowId": self.workflowId,
            "correlationId": self.correlationId,
            "fileLocation": self.fileLocation,
            "taskRefs": list(self.taskRefs),
            "submittedAt": self.submittedAt,
            "deadline": self.deadline,
            "failure": self.failure.to_dict() if self.failure else None,
            "runId": self.runId,
            "retryOf": self.retryOf,
            "carried": json.dumps([o.to_dict() for o in self.carried], separators=(",", ":")) if self.carried else "",
            "request": self.request,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "WorkflowPlan":
        return cls(
            workflowId=d["workflowId"],
            correlationId=d.get("correlationId"),
            fileLocation=d["fileLocation"],
            taskRefs=tuple(d["taskRefs"]),
            submittedAt=d["submittedAt"],
            deadline=d["deadline"],
            failure=PlanFailure.from_dict(d["failure"]) if d.get("failure") else None,
            runId=d.get("runId") or "",
            retryOf=d.get("retryOf") or "",
            carried=tuple(TaskOutput.from_dict(o) for o in _json_list(d.get("carried"))),
            request=d.get("request") or "",
        )


@dataclass(frozen=True)
class DeadlineCheck(_Record):
    workflowId: str
    at: int


@dataclass(frozen=True)
class WorkflowCompleted:
    workflowId: str
    correlationId: str | None
    status: str
    fileLocation: str
    fileLocations: tuple[str, ...]
    outputs: tuple[TaskOutput, ...]
    errors: tuple[TaskError, ...]
    taskCount: int
    submittedAt: int
    completedAt: int
    runId: str = ""
    retryOf: str = ""
    request: str = ""  # the validated request (JSON); "" for a REJECTED one

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

    def to_dict(self) -> dict[str, Any]:
        return {
            "workflowId": self.workflowId,
            "correlationId": self.correlationId,
            "status": self.status,
            "fileLocation": self.fileLocation,
            "fileLocations": list(self.fileLocations),
            "outputs": [o.to_dict() for o in self.outputs],
            "errors": [e.to_dict() for e in self.errors],
            "taskCount": self.taskCount,
            "submittedAt": self.submittedAt,
            "completedAt": self.completedAt,
            "runId": self.runId,
            "retryOf": self.retryOf,
            "request": self.request,
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
        )
