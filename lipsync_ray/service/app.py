"""The HTTP API v1 (FastAPI) and the Ray Serve deployment that serves it.

One replica (``RenderService``) holds the :class:`JobManager`: the job database, the queue and
the warm Renderers. It asks for no CPU (``num_cpus=0``): the render actors it starts keep the
cluster's CPUs. Serve's HTTP proxy receives the requests; every route but ``/healthz``,
``/docs`` and ``/openapi.json`` needs ``Authorization: Bearer <token>``. Every error is JSON:
``{"error": {"status": 404, "message": "unknown avatar 'bob'"}}``.
"""

# No `from __future__ import annotations`: Serve's class-based view hands FastAPI the routes'
# signatures, whose annotations must be real types (Request, Query), not strings.

import asyncio
import hmac
import logging
from typing import Annotated

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from ray import serve
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from lipsync_ray.errors import InputError
from lipsync_ray.service.avatars import UnknownAvatarError
from lipsync_ray.service.jobs import options_from_request
from lipsync_ray.service.manager import DrainingError, JobManager, UnknownJobError
from lipsync_ray.service.settings import ServiceSettings

__all__ = ["DEPLOYMENT_NAME", "RenderService", "app"]

log = logging.getLogger(__name__)

DEPLOYMENT_NAME = "lipsync-ray"
API_VERSION = "v1"
# Concurrent HTTP requests one replica takes (status polls of many clients, uploads); the
# renders themselves are bounded by --max-running, not by this.
MAX_ONGOING_REQUESTS = 256


class ApiError(Exception):
    """An answer other than 2xx, with its status and one-line message."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": {"status": status, "message": message}}, status_code=status, headers=headers
    )


app = FastAPI(
    title="lipsync-ray render service",
    version=API_VERSION,
    description="Submit an audio file for an avatar, follow the job, download the MP4. "
    "Every /v1 route needs `Authorization: Bearer <token>`.",
)


@app.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    await _discard_body(request)
    return _error(exc.status, exc.message, exc.headers)


# An error answered before the body was read: the rest of the body, up to this many bytes, is
# read and dropped first. A connection closed with unread data is reset (TCP RST), and the
# client, still sending, would see "connection reset" instead of the answer. Past this, the
# connection is closed all the same.
DISCARD_MAX_BYTES = 256 * 2**20


async def _discard_body(request: Request) -> None:
    if request.method not in ("POST", "PUT", "PATCH") or getattr(request.state, "body_read", 0):
        return
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > DISCARD_MAX_BYTES:
        return
    seen = 0
    while seen <= DISCARD_MAX_BYTES:
        message = await request.receive()
        if message["type"] != "http.request":
            return
        seen += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    await _discard_body(request)
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("query", "path", "body"))
        got = f", got {err['input']!r}" if err.get("input") is not None else ""
        parts.append(f"{where}: {err.get('msg', 'invalid').lower()}{got}")
    return _error(422, "; ".join(parts) or "malformed request")


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    await _discard_body(request)
    message = exc.detail if isinstance(exc.detail, str) else "error"
    return _error(exc.status_code, message.lower(), getattr(exc, "headers", None))


@app.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return _error(500, f"internal error: {type(exc).__name__}")


_bearer = HTTPBearer(auto_error=False, description="the service's token (see `serve --help`)")


def _require_token(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """The /v1 routes' dependency: ``Authorization: Bearer <token>``, checked before the
    query is validated or the body read."""
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None or not credentials.credentials.strip():
        raise ApiError(401, "missing bearer token (Authorization: Bearer <token>)", challenge)
    expected = getattr(request.app.state, "token", None)
    given = credentials.credentials.strip().encode()
    if expected is None or not hmac.compare_digest(given, expected):
        raise ApiError(401, "wrong token", challenge)


# Every /v1 route carries it.
AUTH = [Depends(_require_token)]

# The submit's body as /docs shows it: the audio file's bytes (read from the stream, not
# parsed by FastAPI).
_AUDIO_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            kind: {"schema": {"type": "string", "format": "binary"}}
            for kind in ("application/octet-stream", "audio/*")
        },
    }
}


def _translate(exc: Exception) -> ApiError:
    """The API error of a library error."""
    if isinstance(exc, UnknownJobError | UnknownAvatarError):
        return ApiError(404, exc.message)
    if isinstance(exc, DrainingError):
        return ApiError(503, exc.message)
    if isinstance(exc, InputError):
        return ApiError(400, exc.message)
    raise exc


@serve.deployment(
    name=DEPLOYMENT_NAME,
    ray_actor_options={"num_cpus": 0},
    max_ongoing_requests=MAX_ONGOING_REQUESTS,
)
@serve.ingress(app)
class RenderService:
    """The one replica: HTTP routes over a :class:`JobManager`."""

    def __init__(self, settings: ServiceSettings) -> None:
        logging.getLogger("lipsync_ray").setLevel(logging.INFO)
        self.settings = settings
        # The token the /v1 routes' dependency checks (this replica's app object, its own).
        app.state.token = settings.token.encode()
        self.manager = JobManager(settings)
        self.manager.resume()

    async def drain(self, timeout_s: float) -> None:
        """Stop taking jobs; running ones get ``timeout_s`` seconds, then stay resumable."""
        await asyncio.to_thread(self.manager.drain, timeout_s)

    # --------------------------------------------------------------------------- routes

    @app.get("/healthz")
    def healthz(self) -> dict:
        return {"status": "ok"}

    @app.get("/v1/avatars", dependencies=AUTH)
    def avatars(self) -> dict:
        return {"avatars": self.manager.catalog.names()}

    @app.post("/v1/jobs", status_code=201, dependencies=AUTH, openapi_extra=_AUDIO_BODY)
    async def submit(
        self,
        request: Request,
        avatar: Annotated[str, Query(description="an avatar name from /v1/avatars")],
        start_frame: Annotated[int | None, Query(description="first avatar frame, >= 0")] = None,
        blend: Annotated[str | None, Query(description="feather or paste")] = None,
        silence_passthrough: Annotated[bool | None, Query()] = None,
        crf: Annotated[int | None, Query(description="x264 CRF, 0-51")] = None,
        preset: Annotated[str | None, Query(description="x264 preset name")] = None,
    ) -> JSONResponse:
        """Upload the audio (the body: the file's raw bytes) and queue a render."""
        manager = self.manager
        try:
            frames = await run_in_threadpool(manager.catalog.frame_count, avatar)
            options = options_from_request(
                manager.defaults, start_frame=start_frame, blend=blend,
                silence_passthrough=silence_passthrough, crf=crf, preset=preset,
                avatar_frames=frames,
            )  # fmt: skip
        except InputError as exc:
            raise _translate(exc) from None
        if manager.draining:
            raise ApiError(503, "the service is shutting down: no new jobs")
        upload = await self._receive(request)
        try:
            await run_in_threadpool(manager.check_audio, upload)
            record = await run_in_threadpool(manager.submit, avatar, options, upload)
        except (InputError, DrainingError) as exc:
            raise _translate(exc) from None
        finally:
            upload.unlink(missing_ok=True)  # moved into the job's directory when it was made
        return JSONResponse(record.status(), status_code=201)

    async def _receive(self, request: Request):
        """The body, written to a fresh upload file; 413 past the limit (the declared length
        is checked first, then the bytes as they arrive), 400 when empty."""
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind.startswith("multipart/"):
            raise ApiError(
                400,
                f"bad audio: expected the file's raw bytes as the body (Content-Type "
                f"application/octet-stream or audio/*), got {kind} (curl: --data-binary @FILE, "
                "not -F)",
            )
        limit = self.settings.max_upload_bytes
        too_large = ApiError(413, f"body larger than {limit} bytes ({limit / 2**20:g} MB)")
        declared = request.headers.get("content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > limit:
            raise too_large
        upload = await run_in_threadpool(self.manager.new_upload)
        size = 0
        try:
            with open(upload, "wb") as f:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise too_large
                    f.write(chunk)
            request.state.body_read = True
        except BaseException:
            upload.unlink(missing_ok=True)
            raise
        if size == 0:
            upload.unlink(missing_ok=True)
            raise ApiError(400, "bad audio: the body is empty (send the audio file's bytes)")
        return upload

    @app.get("/v1/jobs", dependencies=AUTH)
    def jobs(self, limit: Annotated[int, Query(ge=1, le=10_000)] = 100) -> dict:
        return {"jobs": [r.status() for r in self.manager.list(limit)]}

    @app.get("/v1/jobs/{job_id}", dependencies=AUTH)
    def job(self, job_id: str) -> dict:
        try:
            return self.manager.get(job_id).status()
        except UnknownJobError as exc:
            raise _translate(exc) from None

    @app.get("/v1/jobs/{job_id}/video", response_class=FileResponse, dependencies=AUTH)
    def video(self, job_id: str) -> FileResponse:
        try:
            record = self.manager.get(job_id)
            path = self.manager.video(job_id)
        except UnknownJobError as exc:
            raise _translate(exc) from None
        if path is None:
            raise ApiError(409, f"job {job_id} is {record.state.value}, not done: no video yet")
        return FileResponse(path, media_type="video/mp4", filename=f"{job_id}.mp4")

    @app.post("/v1/jobs/{job_id}/cancel", dependencies=AUTH)
    def cancel(self, job_id: str) -> dict:
        try:
            return self.manager.cancel(job_id).status()
        except UnknownJobError as exc:
            raise _translate(exc) from None
