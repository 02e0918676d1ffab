"""A stand-in for ``lipsync-ray serve``: the HTTP API v1 with canned behaviour, on loopback, in
a thread of the test process (the standard library's ThreadingHTTPServer). For the client's
tests; it renders nothing.

Canned behaviour, by avatar name:

- ``alice``: queued at submit; each status poll moves it on (queued -> running -> +``step``
  frames per poll -> done). Its video is a real MP4 of ``frames_total`` frames (25 per second
  of the uploaded WAV).
- ``broken``: runs, then fails with ``BROKEN_ERROR``.
- ``slow``: runs and never finishes (for cancel and timeouts).

Errors as the contract's table says: 401 (wrong or missing token, ``WWW-Authenticate:
Bearer``), 404 (unknown avatar, job or route; a job id that is not 32 hex digits), 409 (video
before done), 413 (body over ``max_upload_bytes``), 400 (audio that is not a WAV, a bad option
value), 422 (no ``avatar``, a query value of the wrong type). ``force(route, status,
message)`` makes the next request to a route (``submit``, ``status``, ``video``, ``cancel``,
``list``, ``avatars``) answer that error once, for statuses the inputs cannot provoke (500).
"""

from __future__ import annotations

import hmac
import io
import json
import math
import re
import threading
import time
import uuid
import wave
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

TOKEN = "s3cret-token"
AVATARS = ("alice", "broken", "slow")
AVATAR_FRAMES = 100  # frames of every avatar: start_frame must be below
BROKEN_ERROR = "chunk 1 kept failing: InferenceActor died (3 retries)"
PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower")
_JOB_ID = re.compile(r"[0-9a-f]{32}")


@dataclass
class FakeJob:
    id: str
    avatar: str
    frames_total: int
    options: dict
    state: str = "queued"
    frames_done: int = 0
    error: str | None = None
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    polls: int = 0

    def to_json(self) -> dict:
        running = (self.finished_at or time.time()) - self.started_at if self.started_at else 0
        return {
            "id": self.id,
            "avatar": self.avatar,
            "state": self.state,
            "frames_done": self.frames_done,
            "frames_total": self.frames_total,
            "fps": self.frames_done / running if running > 0 else None,
            "error": self.error,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "options": self.options,
        }

    def advance(self, step: int) -> None:
        """One poll's worth of progress (the canned behaviour of its avatar)."""
        if self.state in ("done", "failed", "cancelled"):
            return
        self.polls += 1
        if self.state == "queued":
            self.state, self.started_at = "running", time.time()
            return
        if self.avatar == "broken" and self.frames_done >= step:
            self.state, self.error, self.finished_at = "failed", BROKEN_ERROR, time.time()
            return
        limit = self.frames_total - 1 if self.avatar == "slow" else self.frames_total
        self.frames_done = min(limit, self.frames_done + step)
        if self.frames_done == self.frames_total:
            self.state, self.finished_at = "done", time.time()


_VIDEOS: dict[int, bytes] = {}


def mp4_of(frames: int) -> bytes:
    """A small H.264 MP4 of ``frames`` grey frames (64x64, 25 fps), made once per count."""
    if frames not in _VIDEOS:
        import av
        import numpy as np

        buffer = io.BytesIO()
        with av.open(buffer, "w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=25)
            stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
            for i in range(frames):
                image = np.full((64, 64, 3), (i * 9) % 256, np.uint8)
                container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
            container.mux(stream.encode())
        _VIDEOS[frames] = buffer.getvalue()
    return _VIDEOS[frames]


@dataclass(frozen=True)
class _Refusal:
    """A query or body value the service refuses (returned, not raised)."""

    status: int
    message: str


class FakeService:
    """The fake service; ``with FakeService() as service: service.url``.

    Attributes a test may read or set: ``jobs`` (by id), ``requests`` (method, path and
    Authorization header of each), ``max_upload_bytes``, ``step`` (frames per poll),
    ``truncate_video`` (send half of the MP4 and hang up), ``early_reject`` (answer 413 to a
    body over the limit without reading it, and hang up).
    """

    def __init__(
        self, *, token: str = TOKEN, max_upload_bytes: int = 64 * 1024, avatars=AVATARS
    ) -> None:
        self.token = token
        self.avatars = tuple(avatars)  # any name but broken and slow renders like alice
        self.max_upload_bytes = self._max_upload_bytes = max_upload_bytes
        self.step = 10
        self.truncate_video = False
        self.early_reject = False  # 413 before reading the body, then hang up (as uvicorn may)
        self.jobs: dict[str, FakeJob] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        self._forced: dict[str, tuple[int, str]] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def force(self, route: str, status: int, message: str) -> None:
        """The next request to ``route`` answers ``status`` with ``message``."""
        with self._lock:
            self._forced[route] = (status, message)

    def reset(self) -> None:
        with self._lock:
            self._forced.clear()
            self.truncate_video = False
            self.early_reject = False
            self.max_upload_bytes = self._max_upload_bytes

    def __enter__(self) -> FakeService:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    # ----------------------------------------------------------------------------- routes

    def handle(self, method: str, target: str, headers, body_reader) -> tuple[int, dict, bytes]:
        """(status, headers, body) of one request."""
        path, query = urlsplit(target).path, parse_qs(urlsplit(target).query)
        auth = headers.get("Authorization")
        with self._lock:
            self.requests.append((method, target, auth))
        if method == "GET" and path == "/healthz":
            return _json(200, {"status": "ok"})
        if not hmac.compare_digest(auth or "", f"Bearer {self.token}"):
            body_reader()
            status, hdrs, body = _error(401, "missing or wrong token")
            return status, {**hdrs, "WWW-Authenticate": "Bearer"}, body
        route, job_id = _route(method, path)
        with self._lock:
            forced = self._forced.pop(route, None) if route else None
        if forced:
            body_reader()
            return _error(*forced)
        if route is None:
            return _error(404, f"no route {method} {path}")
        if route == "avatars":
            return _json(200, {"avatars": list(self.avatars)})
        if route == "submit":
            return self._submit(query, headers, body_reader)
        if route == "list":
            limit = _int(query, "limit", 100)
            if isinstance(limit, _Refusal):
                return _error(422, "limit must be an integer")
            with self._lock:
                jobs = sorted(self.jobs.values(), key=lambda j: j.created_at, reverse=True)
                return _json(200, {"jobs": [j.to_json() for j in jobs[:limit]]})
        with self._lock:
            job = self.jobs.get(job_id) if _JOB_ID.fullmatch(job_id) else None
            if job is None:
                return _error(404, f"unknown job {job_id!r}")
            if route == "status":
                job.advance(self.step)
                return _json(200, job.to_json())
            if route == "cancel":
                if job.state in ("queued", "running"):
                    job.state, job.finished_at = "cancelled", time.time()
                return _json(200, job.to_json())
            if job.state != "done":  # video
                return _error(409, f"job {job_id} is {job.state}, not done")
            frames = job.frames_total
        video = mp4_of(frames)
        return 200, {"Content-Type": "video/mp4"}, video

    def _submit(self, query, headers, body_reader) -> tuple[int, dict, bytes]:
        length = int(headers.get("Content-Length") or 0)
        body = body_reader()
        if length > self.max_upload_bytes:
            return _error(413, f"body of {length} bytes is over the limit")
        avatar = query.get("avatar", [""])[0]
        if not avatar:
            return _error(422, "query parameter 'avatar' is required")
        options = {
            "start_frame": _int(query, "start_frame", 0),
            "blend": query.get("blend", ["feather"])[0],
            "silence_passthrough": _bool(query, "silence_passthrough"),
            "crf": _int(query, "crf", 20),
            "preset": query.get("preset", ["veryfast"])[0],
        }
        if isinstance(options["start_frame"], _Refusal):
            return _error(422, "start_frame must be an integer")
        if isinstance(options["crf"], _Refusal):
            return _error(422, "crf must be an integer")
        if isinstance(options["silence_passthrough"], _Refusal):
            return _error(422, "silence_passthrough must be a boolean")
        if options["blend"] not in ("feather", "paste", "hard"):
            return _error(400, f"blend must be feather or paste, got {options['blend']!r}")
        if not 0 <= options["crf"] <= 51:
            return _error(400, f"crf must be 0-51, got {options['crf']}")
        if not 0 <= options["start_frame"] < AVATAR_FRAMES:
            return _error(
                400, f"start_frame must be 0-{AVATAR_FRAMES - 1}, got {options['start_frame']}"
            )
        if options["preset"] not in PRESETS:
            return _error(400, f"unknown preset {options['preset']!r}")
        if avatar not in self.avatars:
            return _error(404, f"unknown avatar {avatar!r}")
        seconds = _wav_seconds(body)
        if isinstance(seconds, _Refusal):
            return _error(seconds.status, seconds.message)
        job = FakeJob(uuid.uuid4().hex, avatar, max(1, math.ceil(seconds * 25)), options)
        with self._lock:
            self.jobs[job.id] = job
        return _json(201, job.to_json())


def _route(method: str, path: str) -> tuple[str | None, str]:
    if path == "/v1/avatars" and method == "GET":
        return "avatars", ""
    if path == "/v1/jobs":
        return {"POST": "submit", "GET": "list"}.get(method), ""
    parts = path.split("/")  # "", "v1", "jobs", id[, "video" | "cancel"]
    if len(parts) in (4, 5) and parts[1:3] == ["v1", "jobs"]:
        tail = parts[4] if len(parts) == 5 else ""
        route = {("GET", ""): "status", ("GET", "video"): "video", ("POST", "cancel"): "cancel"}
        return route.get((method, tail)), parts[3]
    return None, ""


def _int(query, name: str, default: int):
    if name not in query:
        return default
    try:
        return int(query[name][0])
    except ValueError:
        return _Refusal(422, name)


def _bool(query, name: str):
    text = query.get(name, ["false"])[0].lower()
    if text not in ("true", "false", "1", "0"):
        return _Refusal(422, name)
    return text in ("true", "1")


def _wav_seconds(body: bytes):
    if not body:
        return _Refusal(400, "the audio is empty")
    try:
        with wave.open(io.BytesIO(body)) as w:
            return w.getnframes() / w.getframerate()
    except (wave.Error, EOFError) as exc:
        return _Refusal(400, f"the audio is not decodable: {exc}")


def write_wav(path: Path, seconds: float, rate: int = 16_000) -> Path:
    """A 220 Hz tone as 16-bit mono WAV (the standard library's ``wave``)."""
    n = round(seconds * rate)
    samples = (round(8000 * math.sin(2 * math.pi * 220 * i / rate)) for i in range(n))
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"".join(s.to_bytes(2, "little", signed=True) for s in samples))
    return path


def _json(status: int, data: dict) -> tuple[int, dict, bytes]:
    return status, {"Content-Type": "application/json"}, json.dumps(data).encode()


def _error(status: int, message: str) -> tuple[int, dict, bytes]:
    return _json(status, {"error": {"status": status, "message": message}})


def _handler(service: FakeService) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if service.early_reject and length > service.max_upload_bytes:
                status, headers, body = _error(413, f"body of {length} bytes is over the limit")
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                self.close_connection = True
                return

            def body_reader() -> bytes:  # read once, also when refused (no broken pipe)
                if not hasattr(self, "_body"):
                    self._body = self.rfile.read(length) if length else b""
                return self._body

            status, headers, body = service.handle(
                self.command, self.path, self.headers, body_reader
            )
            body_reader()
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if service.truncate_video and headers.get("Content-Type") == "video/mp4":
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)

        def do_GET(self) -> None:
            self._serve()

        def do_POST(self) -> None:
            self._serve()

        def log_message(self, format, *args) -> None:  # quiet
            pass

    return Handler


if __name__ == "__main__":
    # As a service process: `python fake_service.py [AVATAR ...]` prints `serving on URL` and
    # stops on SIGINT/SIGTERM; the token is LIPSYNC_RAY_TOKEN's, else TOKEN.
    import os
    import signal
    import sys

    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    token = os.environ.get("LIPSYNC_RAY_TOKEN") or TOKEN
    names = (*AVATARS, *sys.argv[1:])
    with FakeService(token=token, max_upload_bytes=50 << 20, avatars=names) as fake:
        print(f"serving on {fake.url}", flush=True)
        stop.wait()
