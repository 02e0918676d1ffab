"""A client of the render service (``lipsync-ray serve``), for notebooks and ``lipsync-ray
submit``: the HTTP API v1 over the standard library alone (``urllib.request``, ``json``), so
that it starts fast and installs nowhere new.

::

    from lipsync_ray.client import ServiceClient

    client = ServiceClient("http://127.0.0.1:8000")  # token: LIPSYNC_RAY_TOKEN
    status = client.render("alice", "speech.wav", "out.mp4", crf=18)
    print(status.frames_total, status.fps)

Errors (``lipsync_ray.errors``): a 4xx answer raises ``RequestRejectedError`` (an InputError:
exit 2 in the CLI) with the status and the service's message; a failed job or a 5xx answer
raises ``RemoteRenderError``; a cancelled job ``Cancelled``; a service that cannot be reached,
or that answers something that is not the API, a ``RenderError`` naming the URL.
"""

from __future__ import annotations

import enum
import http.client
import ipaddress
import json
import logging
import os
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from lipsync_ray.errors import (
    Cancelled,
    InputError,
    RemoteRenderError,
    RenderError,
    RequestRejectedError,
)

__all__ = ["TOKEN_ENV", "JobOptions", "JobState", "JobStatus", "ServiceClient", "resolve_token"]

log = logging.getLogger(__name__)

TOKEN_ENV = "LIPSYNC_RAY_TOKEN"
_CHUNK_BYTES = 1 << 20  # download and upload in 1 MiB pieces


class JobState(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        """No further change: done, failed or cancelled."""
        return self in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


@dataclass(frozen=True)
class JobOptions:
    """A job's per-request options as the service resolved them (None: not reported)."""

    start_frame: int | None = None
    blend: str | None = None  # "feather" or "paste"
    silence_passthrough: bool | None = None
    crf: int | None = None
    preset: str | None = None  # an x264 preset name


@dataclass(frozen=True)
class JobStatus:
    """One job as the service reports it (``GET /v1/jobs/{id}``)."""

    id: str  # 32 hex digits
    avatar: str
    state: JobState
    frames_done: int
    frames_total: int | None  # None until the service knows it
    fps: float | None  # frames_done / seconds running; None before running
    error: str | None  # one line, for a failed job
    created_at: float | None  # UNIX seconds
    started_at: float | None
    finished_at: float | None
    options: JobOptions

    @classmethod
    def from_json(cls, data: Any, *, source: str = "") -> JobStatus:
        """Parse a JobStatus object; RenderError (naming ``source``) for anything else."""
        try:
            if not isinstance(data, dict):
                raise TypeError(f"expected a JSON object, got {type(data).__name__}")
            options = data.get("options") or {}
            if not isinstance(options, dict):
                raise TypeError(f"options: expected an object, got {type(options).__name__}")
            known = JobOptions.__dataclass_fields__
            return cls(
                id=_typed(data["id"], str, "id"),
                avatar=_typed(data["avatar"], str, "avatar"),
                state=JobState(data["state"]),
                frames_done=_typed(data.get("frames_done", 0), int, "frames_done"),
                frames_total=_optional(data.get("frames_total"), int, "frames_total"),
                fps=_optional(data.get("fps"), float, "fps"),
                error=_optional(data.get("error"), str, "error"),
                created_at=_optional(data.get("created_at"), float, "created_at"),
                started_at=_optional(data.get("started_at"), float, "started_at"),
                finished_at=_optional(data.get("finished_at"), float, "finished_at"),
                options=JobOptions(**{k: v for k, v in options.items() if k in known}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RenderError(
                f"the service answered a malformed job status: {exc}", path=source or None
            ) from None

    @property
    def finished(self) -> bool:
        return self.state.finished


def _typed(value: Any, kind: type, name: str):
    # JSON numbers: an int is a fine float; a bool is no number.
    ok = isinstance(value, kind) and not isinstance(value, bool)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not ok:
        raise TypeError(f"{name}: expected {kind.__name__}, got {value!r}")
    return value


def _optional(value: Any, kind: type, name: str):
    return None if value is None else _typed(value, kind, name)


def resolve_token(token: str | None = None, token_file: str | Path | None = None) -> str | None:
    """The bearer token: ``token`` if given, else the environment's ``LIPSYNC_RAY_TOKEN``
    (the one place it is read), else the first line of ``token_file``; None without any."""
    if token:
        return token
    env = os.environ.get(TOKEN_ENV, "").strip()
    if env:
        if token_file is not None:
            log.warning("%s is set: the token file %s is not read", TOKEN_ENV, token_file)
        return env
    if token_file is None:
        return None
    path = Path(token_file)
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        raise InputError("token file not found", path=path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read the token file: {exc}", path=path) from None
    if not text:
        raise InputError("the token file is empty", path=path)
    return text.splitlines()[0].strip()


_BOOL_TEXT = {True: "true", False: "false"}


class ServiceClient:
    """The render service's HTTP API v1.

    Args:
        url: the service's base URL (``http://127.0.0.1:8000``).
        token: the bearer token; None: ``LIPSYNC_RAY_TOKEN``, else ``token_file``.
        token_file: a file holding the token (read when neither of the above is set).
        timeout_s: the socket timeout of each request (connect, and each read).
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        token_file: str | Path | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise InputError(f"service URL must be http://HOST[:PORT], got {url!r}")
        if not timeout_s > 0:
            raise InputError(f"timeout_s must be > 0, got {timeout_s!r}")
        self.url = url.rstrip("/")
        self.timeout_s = float(timeout_s)
        self._token = resolve_token(token, token_file)
        # A service on this machine is asked directly: an HTTP_PROXY of the environment (which
        # urllib applies to 127.0.0.1 too unless NO_PROXY names it) would get the token.
        direct = _is_loopback(parsed.hostname or "")
        self._opener = urllib.request.build_opener(
            *([urllib.request.ProxyHandler({})] if direct else [])
        )

    def __repr__(self) -> str:
        return f"ServiceClient({self.url!r})"

    # ---------------------------------------------------------------------------- the routes

    def health(self) -> str:
        """``GET /healthz``: the service's status word ("ok"); needs no token."""
        answer = self._json("GET", "/healthz")
        return str(answer.get("status", "")) if isinstance(answer, dict) else ""

    def avatars(self) -> list[str]:
        """The avatar names the service can render."""
        answer = self._json("GET", "/v1/avatars")
        names = answer.get("avatars") if isinstance(answer, dict) else None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise RenderError(
                f"the service answered a malformed avatar list: {answer!r}"[:300],
                path=self._url("/v1/avatars"),
            )
        return names

    def submit(
        self,
        avatar: str,
        audio: str | Path | bytes,
        *,
        start_frame: int | None = None,
        blend: str | None = None,
        silence_passthrough: bool | None = None,
        crf: int | None = None,
        preset: str | None = None,
    ) -> JobStatus:
        """Upload ``audio`` (a file, or its bytes) and queue a render on ``avatar``. Options
        left None are the service's defaults; the service validates them (400)."""
        query: dict[str, str] = {"avatar": avatar}
        for name, value in (
            ("start_frame", start_frame), ("blend", blend), ("crf", crf), ("preset", preset),
            ("silence_passthrough", silence_passthrough),
        ):  # fmt: skip
            if isinstance(value, enum.Enum):  # Blend.HARD: "hard"
                value = value.value
            if value is not None:
                query[name] = _BOOL_TEXT[value] if isinstance(value, bool) else str(value)
        path = "/v1/jobs?" + urllib.parse.urlencode(query)
        if isinstance(audio, bytes | bytearray):
            return self._status("POST", path, body=bytes(audio))
        audio_path = Path(audio)
        if not audio_path.is_file():
            raise InputError("audio file not found", path=audio_path)
        with open(audio_path, "rb") as body:
            return self._status("POST", path, body=body, length=audio_path.stat().st_size)

    def status(self, job_id: str) -> JobStatus:
        return self._status("GET", f"/v1/jobs/{_quote(job_id)}")

    def jobs(self, limit: int = 100) -> list[JobStatus]:
        """The newest ``limit`` jobs, newest first."""
        path = f"/v1/jobs?limit={int(limit)}"
        answer = self._json("GET", path)
        jobs = answer.get("jobs") if isinstance(answer, dict) else None
        if not isinstance(jobs, list):
            raise RenderError(
                f"the service answered a malformed job list: {answer!r}"[:300], path=self._url(path)
            )
        return [JobStatus.from_json(j, source=self._url(path)) for j in jobs]

    def cancel(self, job_id: str) -> JobStatus:
        """Cancel a job (a finished one is left as it is); its status after."""
        return self._status("POST", f"/v1/jobs/{_quote(job_id)}/cancel")

    def download(self, job_id: str, path: str | Path) -> Path:
        """Write a done job's MP4 to ``path``: streamed to a temporary file beside it, renamed
        over ``path`` once complete, so ``path`` is never a half-written file (and a file that
        was there stays until the new one is whole)."""
        out = Path(path)
        if not out.parent.is_dir():
            raise InputError("the output's directory does not exist", path=out.parent)
        route = f"/v1/jobs/{_quote(job_id)}/video"
        part = out.with_name(f".{out.name}.{uuid.uuid4().hex[:12]}.part")  # this download's
        try:
            with self._open("GET", route) as answer, open(part, "xb") as f:
                expected = answer.headers.get("Content-Length")
                written = 0
                while chunk := answer.read(_CHUNK_BYTES):
                    f.write(chunk)
                    written += len(chunk)
                if expected is not None and written != int(expected):
                    raise RemoteRenderError(
                        f"the video of job {job_id} ended after {written} of {expected} bytes",
                        path=self._url(route),
                    )
                f.flush()
                os.fsync(f.fileno())
            os.replace(part, out)
        except (OSError, http.client.HTTPException) as exc:  # the connection dropped mid-body
            raise RenderError(
                f"downloading the video of job {job_id} failed: {exc}", path=self._url(route)
            ) from exc
        finally:
            part.unlink(missing_ok=True)
        return out

    def wait(
        self,
        job_id: str,
        poll_s: float = 0.5,
        on_status: Callable[[JobStatus], None] | None = None,
        timeout_s: float | None = None,
    ) -> JobStatus:
        """Poll until the job is done and return its status; ``on_status`` sees every status
        polled. A failed job raises RemoteRenderError (its error line), a cancelled one
        Cancelled; after ``timeout_s`` a RenderError (the job goes on: cancel it if it should
        not)."""
        if not poll_s > 0:
            raise InputError(f"poll_s must be > 0, got {poll_s!r}")
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            status = self.status(job_id)
            if on_status is not None:
                on_status(status)
            if status.state is JobState.DONE:
                return status
            if status.state is JobState.FAILED:
                raise RemoteRenderError(
                    f"job {job_id} failed: {status.error or 'no reason given'}",
                    path=self._url(f"/v1/jobs/{job_id}"),
                )
            if status.state is JobState.CANCELLED:
                raise Cancelled(f"job {job_id} was cancelled", path=self._url(f"/v1/jobs/{job_id}"))
            if deadline is not None and time.monotonic() + poll_s > deadline:
                raise RenderError(
                    f"job {job_id} is still {status.state.value} after {timeout_s:g} s "
                    f"({status.frames_done}/{status.frames_total} frames)",
                    path=self._url(f"/v1/jobs/{job_id}"),
                )
            time.sleep(poll_s)

    def render(
        self,
        avatar: str,
        audio: str | Path | bytes,
        output: str | Path,
        *,
        on_status: Callable[[JobStatus], None] | None = None,
        poll_s: float = 0.5,
        timeout_s: float | None = None,
        **options: Any,
    ) -> JobStatus:
        """Submit, wait and download: the service's ``lipsync-ray render``. ``options`` are
        :meth:`submit`'s; ``on_status`` sees the submitted status and every one polled.

        A KeyboardInterrupt while the job runs, or ``timeout_s`` passing, cancels the job on
        the service before it propagates (nothing would download it)."""
        out = Path(output)
        if not out.parent.is_dir():  # before the upload, not after the render
            raise InputError("the output's directory does not exist", path=out.parent)
        job = self.submit(avatar, audio, **options)
        seen = [job]

        def note(status: JobStatus) -> None:
            seen.append(status)
            if on_status is not None:
                on_status(status)

        try:
            note(job)
            done = self.wait(job.id, poll_s=poll_s, on_status=note, timeout_s=timeout_s)
        except BaseException:
            if not seen[-1].finished:  # failed or cancelled on the service: nothing to cancel
                self._cancel_quietly(job.id)
            raise
        self.download(job.id, out)
        return done

    # ------------------------------------------------------------------------- the plumbing

    def _cancel_quietly(self, job_id: str) -> None:
        try:
            self.cancel(job_id)
            log.info("job %s cancelled on %s", job_id, self.url)
        except Exception as exc:  # the service may be what failed
            log.warning("could not cancel job %s on %s: %s", job_id, self.url, exc)

    def _url(self, path: str) -> str:
        return self.url + path

    def _status(self, method: str, path: str, **body) -> JobStatus:
        return JobStatus.from_json(self._json(method, path, **body), source=self._url(path))

    def _json(self, method: str, path: str, **body) -> Any:
        with self._open(method, path, **body) as answer:
            try:
                raw = answer.read()
            except (OSError, http.client.HTTPException) as exc:
                raise RenderError(
                    f"the render service's answer broke off: {exc!r}", path=self._url(path)
                ) from None
        try:
            return json.loads(raw)
        except ValueError:
            raise RenderError(
                f"the service answered {method} with something that is not JSON: {raw[:80]!r}",
                path=self._url(path),
            ) from None

    def _open(
        self,
        method: str,
        path: str,
        *,
        body: bytes | BinaryIO | None = None,
        length: int | None = None,
    ):
        """The answer of one request (a context manager); errors mapped to the tree."""
        url = self._url(path)
        headers = {"Accept": "application/json"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        if body is not None:
            headers["Content-Type"] = "application/octet-stream"
            headers["Content-Length"] = str(len(body) if isinstance(body, bytes) else length)
        elif method == "POST":
            headers["Content-Length"] = "0"
        request = urllib.request.Request(url, data=body, headers=headers, method=method)
        try:
            return self._opener.open(request, timeout=self.timeout_s)
        except urllib.error.HTTPError as exc:
            raise self._rejected(exc, url) from None
        except urllib.error.URLError as exc:  # the request could not be sent
            reason = exc.reason
            if body is not None and isinstance(reason, BrokenPipeError | ConnectionResetError):
                raise RenderError(
                    f"the render service closed the connection during the upload of "
                    f"{headers['Content-Length']} bytes (over its --max-upload-mb?)",
                    path=url,
                ) from None
            text = getattr(reason, "strerror", None) or str(reason)
            raise RenderError(f"cannot reach the render service: {text}", path=url) from None
        except (OSError, http.client.HTTPException) as exc:  # no (HTTP) answer came back
            what = "no answer in time" if isinstance(exc, TimeoutError) else repr(exc)
            raise RenderError(f"the render service failed to answer: {what}", path=url) from None

    def _rejected(self, exc: urllib.error.HTTPError, url: str) -> Exception:
        """The error of an HTTP error answer: the service's JSON message, by status."""
        try:
            raw = exc.read()
        except OSError:
            raw = b""
        finally:
            exc.close()
        message = _error_message(raw) or exc.reason or f"HTTP {exc.code}"
        if exc.code == 401 and not self._token:
            message += f" (no token given: set {TOKEN_ENV} or use --token-file)"
        if 400 <= exc.code < 500:
            return RequestRejectedError(str(message), status=exc.code, path=url)
        return RemoteRenderError(
            f"the service failed ({exc.code}): {message}", status=exc.code, path=url
        )


def _error_message(raw: bytes) -> str:
    """``error.message`` of the contract's error body; else the body's first line."""
    try:
        data = json.loads(raw)
        message = data["error"]["message"]
        if isinstance(message, str) and message.strip():
            return " ".join(message.split())
    except (ValueError, KeyError, TypeError):
        pass
    text = raw.decode(errors="replace").strip()
    return text.splitlines()[0][:200] if text else ""


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _quote(job_id: str) -> str:
    """A job id as one path segment: nothing in it can reach another route."""
    return urllib.parse.quote(str(job_id), safe="")
