"""Errors of the pipeline, each with a stable code, a public message and whether a retry may help."""
from __future__ import annotations


class PipelineError(Exception):
    code = "INTERNAL"
    transient = False

    def __init__(self, message: str, *, code: str | None = None, transient: bool | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if transient is not None:
            self.transient = transient

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class Cancelled(PipelineError):
    """The task's run was cancelled: it stops at its next step."""
    code = "CANCELLED"


class RequestInvalid(PipelineError):
    """The request document breaks the contract; ``problems`` lists (field, why)."""

    code = "REQUEST_INVALID"

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("; ".join(f"{f}: {why}" for f, why in problems))


# --- source -----------------------------------------------------------------
class SourceNotFound(PipelineError):
    code = "SOURCE_NOT_FOUND"


class SourceForbidden(PipelineError):
    code = "SOURCE_FORBIDDEN"


class SourceTooLarge(PipelineError):
    code = "SOURCE_TOO_LARGE"


class SourceUnavailable(PipelineError):
    code = "SOURCE_UNAVAILABLE"
    transient = True


# --- image ------------------------------------------------------------------
class ImageUndecodable(PipelineError):
    code = "IMAGE_UNDECODABLE"


class ImageTooLarge(PipelineError):
    code = "IMAGE_TOO_LARGE"


class UnsupportedFormat(PipelineError):
    code = "UNSUPPORTED_FORMAT"


# --- storage ----------------------------------------------------------------
class StorageUnavailable(PipelineError):
    code = "STORAGE_UNAVAILABLE"
    transient = True


class StorageRejected(PipelineError):
    code = "STORAGE_REJECTED"


class DeadlineExceeded(PipelineError):
    code = "DEADLINE_EXCEEDED"
