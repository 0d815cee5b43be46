"""The one base of every error that reaches a person (a command's stderr, a worker that cannot start):
its message is one line that names the cause and where; the CLI prints ``imagefork: <message>`` and exits
with ``exit_code``, never a traceback. Errors about a message or an image are ``core.errors.PipelineError``
(a code in a dead letter or a final event), not these."""
from __future__ import annotations


class ImageforkError(Exception):
    exit_code = 1
    label = ""  # printed before the message: "configuration: "


class StartError(ImageforkError, RuntimeError):
    """A worker cannot start; the message says which dependency and where, in one line."""
