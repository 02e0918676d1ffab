"""The one exception tree of lipsync-ray.

::

    LipsyncError                 root: catch this to catch everything we raise
    ├── InputError               bad user input (files, shapes, options); CLI exit code 2
    │   ├── ModelError           an ONNX model that cannot be used as given
    │   └── RequestRejectedError the render service refused a request (a 4xx answer)
    ├── EncodeError              decoding or encoding media failed mid-way
    ├── ShardError               a shard or manifest is missing, corrupt or inconsistent
    ├── RenderError              a render failed (a chunk kept failing, a worker died, ...)
    │   └── RemoteRenderError    a job failed on the render service, or it answered 5xx
    ├── ServiceError             the render service cannot run as configured (state dir, port)
    └── Cancelled                the render was cancelled (its work directory stays resumable);
                                 CLI exit code 130

Every error carries the path (and, where it applies, the frame or chunk) it is
about, so that the CLI can print a single line that names the culprit.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "Cancelled",
    "EncodeError",
    "InputError",
    "LipsyncError",
    "ModelError",
    "RemoteRenderError",
    "RenderError",
    "RequestRejectedError",
    "ServiceError",
    "ShardError",
]


class LipsyncError(Exception):
    """Root of every error raised on purpose by lipsync-ray.

    Args:
        message: what went wrong, with "expected vs got" where it applies.
        path: the file or directory the error is about, if any.
    """

    exit_code = 1

    def __init__(self, message: str, *, path: str | Path | None = None) -> None:
        self.message = message
        self.path = None if path is None else str(path)
        super().__init__(self.__str__())

    def __str__(self) -> str:
        if self.path is None:
            return self.message
        return f"{self.message} ({self.path})"

    def __reduce__(self):  # keep the keyword argument when pickled across Ray workers
        return _rebuild, (type(self), self.message, self.path)


def _rebuild(cls: type[LipsyncError], message: str, path: str | None) -> LipsyncError:
    return cls(message, path=path)


class InputError(LipsyncError):
    """The user gave something we cannot use: a missing file, a bad shape, a bad option."""

    exit_code = 2


class ModelError(InputError):
    """An ONNX model that cannot be loaded or does not have the expected inputs and outputs."""


class EncodeError(LipsyncError):
    """Media decoding or encoding failed after the inputs had been validated."""


class ShardError(LipsyncError):
    """A shard or the manifest of a work directory is missing, corrupt or inconsistent."""


class RenderError(LipsyncError):
    """A render could not finish: a chunk kept failing, a worker died too often, ..."""


class ServiceError(LipsyncError):
    """The render service (``lipsync-ray serve``) cannot start or run as configured: its state
    directory, its database, its port, its token file."""


class Cancelled(LipsyncError):  # noqa: N818 - a request, not a fault: no Error suffix
    """The render was cancelled (``Renderer.render(cancel=...)``, or a job on the service): no
    more chunks were submitted; the finished ones stay recorded in the work directory, so a
    later render of the same inputs resumes from them."""

    exit_code = 130


class RequestRejectedError(InputError):
    """The render service refused a request: a 4xx answer (bad audio or option, unknown avatar
    or job, missing token, too large, a video asked for before it is done).

    Args:
        message: the service's own message (its JSON ``error.message``).
        status: the HTTP status (400-499).
        path: the URL of the request.
    """

    def __init__(self, message: str, *, status: int, path: str | Path | None = None) -> None:
        self.status = status
        super().__init__(message, path=path)

    def __str__(self) -> str:
        return f"the service refused the request ({self.status}): {super().__str__()}"

    def __reduce__(self):
        return _rebuild_with_status, (type(self), self.message, self.path, self.status)


class RemoteRenderError(RenderError):
    """A job failed on the render service (its ``error`` line), or the service answered 5xx.

    Args:
        message: the job's error or the service's message.
        status: the HTTP status of a 5xx answer; None for a job that failed.
        path: the URL of the request or job.
    """

    def __init__(
        self, message: str, *, status: int | None = None, path: str | Path | None = None
    ) -> None:
        self.status = status
        super().__init__(message, path=path)

    def __reduce__(self):
        return _rebuild_with_status, (type(self), self.message, self.path, self.status)


def _rebuild_with_status(cls, message: str, path: str | None, status: int | None):
    return cls(message, path=path, status=status)
