"""User-facing errors: one exception type with a kind and the request field it concerns.

Every problem a user can cause (a wrong file, a missing component, a bad size, a full queue) is raised as
an :class:`SD35Error` whose message names the problem and the fix. ``param`` names the request field at
fault (``"width"``, ``"edit.mask"``, ``"loras"``), so each front end can point at it in its own words: the
CLI prints its flag, an HTTP route puts it into OpenAI's ``error.param`` or A1111's ``detail``. The
subclass says what kind of problem it is, which is all a front end needs to pick an exit code or an HTTP
status: one table at each edge, never a match on message text.

Library code never names a CLI flag in a message: the same message reaches HTTP clients.
"""

from __future__ import annotations


class SD35Error(Exception):
    """A problem with the user's input, explained in one message that says how to fix it."""

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param

    def __reduce__(self):  # keep ``param`` when pickled (worker processes, Ray)
        return _rebuild, (type(self), self.message, self.param)


def _rebuild(cls: type[SD35Error], message: str, param: str | None) -> SD35Error:
    return cls(message, param=param)


class InvalidRequest(SD35Error):
    """A generation request that cannot be run as given (a size, a count, a name, a combination)."""


class NotFound(SD35Error):
    """Something a request names by name (a LoRA, a model, a job) that does not exist."""


class Unsupported(SD35Error):
    """A valid wish this machine or model cannot serve (a GPU-only fast path on a CPU, say)."""


class Busy(SD35Error):
    """The work queue is full; the same request may succeed later."""


class Conflict(SD35Error):
    """A request that contradicts the state it acts on (a finished job cancelled, an idempotency key reused
    for another request)."""


class Cancelled(SD35Error):
    """The run was cancelled by its caller before it finished."""


class CheckpointError(SD35Error):
    """A weight file that cannot be read, is not SD3-family, or does not fit the model."""


class MissingComponentError(SD35Error):
    """A pipeline part (MMDiT, VAE, a text encoder, tokenizer files) that none of the given files provides."""


class SD35Warning(UserWarning):
    """Something the user should know (a truncated prompt, a missing optional part); the run goes on."""


class WorkflowError(InvalidRequest):
    """A ComfyUI workflow that cannot run as given, with ComfyUI's ``node_errors``: node id ->
    ``{"errors": [{"type", "message", "details", "extra_info": {"input_name"}}], "dependent_outputs",
    "class_type"}``, the shape ComfyUI's ``POST /prompt`` answers, so an HTTP route can return it as is."""

    def __init__(self, message: str, *, param: str | None = None, node_errors: dict | None = None):
        super().__init__(message, param=param)
        self.node_errors = node_errors or {}

    def __reduce__(self):
        return _rebuild_workflow_error, (self.message, self.param, self.node_errors)


def _rebuild_workflow_error(message: str, param: str | None, node_errors: dict) -> WorkflowError:
    return WorkflowError(message, param=param, node_errors=node_errors)
