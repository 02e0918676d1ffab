"""The render service end to end: ``lipsync-ray serve`` started as a subprocess on a free
loopback port (its own embedded Ray, not the tests' shared cluster), spoken to over real HTTP
with the standard library's http.client. Its MP4s are compared, decoded frame by frame, with
``lipsync-ray render``'s for the same inputs and options.

Only the processes these tests start are stopped: each service runs in its own session, and
its process group (with the Ray processes it started) is killed at the end.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
TOKEN = "test-token-" + "x" * 24
CHUNK_FRAMES = 10  # several chunks per clip: progress, cancel and resume have steps to show
LONG_S = 6.0  # the long clip: 150 frames, 15 chunks
# A request's options, and the same as `render` flags ("paste" is the renderer's "hard").
OPTIONS = {"start_frame": "3", "blend": "paste", "crf": "30", "preset": "ultrafast"}
OPTION_FLAGS = ["--start-frame", "3", "--blend", "hard", "--crf", "30", "--preset", "ultrafast"]
START_TIMEOUT_S = 180.0
JOB_TIMEOUT_S = 180.0


def _env(token: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "LIPSYNC_RAY_TOKEN")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if token is not None:
        env["LIPSYNC_RAY_TOKEN"] = token
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    """One ``lipsync-ray serve`` process (in its own session) and an HTTP client for it."""

    def __init__(self, avatars: Path, state_dir: Path, models: dict, *, token: str | None,
                 extra: tuple[str, ...] = ()) -> None:  # fmt: skip
        self.state_dir, self.port = state_dir, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [
            sys.executable, "-m", "lipsync_ray.cli", "serve", str(avatars),
            "--model", str(models["model"]), "--audio-encoder", str(models["encoder"]),
            "--chunk-frames", str(CHUNK_FRAMES), "--port", str(self.port),
            "--state-dir", str(state_dir), *extra,
        ]  # fmt: skip
        self.env_token = token
        self.proc: subprocess.Popen | None = None
        self.lines: list[str] = []

    @property
    def token(self) -> str:
        return self.env_token or (self.state_dir / "token").read_text().strip()

    def start(self) -> Service:
        self.lines = []
        self.proc = subprocess.Popen(
            self.cmd, cwd=REPO, env=_env(self.env_token), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )  # fmt: skip
        ready = threading.Event()

        def read(proc=self.proc):
            for line in proc.stdout:
                self.lines.append(line.rstrip())
                if line.startswith("serving on "):
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(START_TIMEOUT_S) or self.proc.poll() is not None:
            self.kill()
            pytest.fail("the service did not start:\n" + "\n".join(self.lines[-30:]))
        assert f"serving on {self.url}" in self.lines
        return self

    def stop(self, timeout_s: float = 90.0) -> int:
        """SIGTERM, as a supervisor sends it; the exit code."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        finally:
            self.kill()

    def kill(self) -> None:
        """SIGKILL this service's process group (its Ray processes are in it), if alive."""
        import psutil

        if self.proc is None:
            return
        try:  # its descendants, also any that left the group
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        self.proc.wait(30)

    def request(self, method: str, path: str, body=None, *, token: str | None = "default",
                headers: dict | None = None) -> tuple[int, dict, bytes]:  # fmt: skip
        headers = dict(headers or {})
        token = self.token if token == "default" else token
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        if body is not None and "Content-Type" not in headers:
            headers["Content-Type"] = "application/octet-stream"
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            chunked = headers.get("Transfer-Encoding") == "chunked"
            # answered before the whole body was sent: read that answer
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                conn.request(method, path, body=body, headers=headers, encode_chunked=chunked)
            answer = conn.getresponse()
            return answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read()
        finally:
            conn.close()

    def json(self, method: str, path: str, body=None, **kw) -> tuple[int, dict]:
        status, _, data = self.request(method, path, body, **kw)
        return status, json.loads(data)

    def submit(self, audio: Path, **options) -> dict:
        query = "&".join(f"{k}={v}" for k, v in {"avatar": "alice", **options}.items())
        status, job = self.json("POST", f"/v1/jobs?{query}", audio.read_bytes())
        assert status == 201, job
        return job

    def status(self, job_id: str) -> dict:
        status, job = self.json("GET", f"/v1/jobs/{job_id}")
        assert status == 200, job
        return job

    def wait(self, job_id: str, until=("done", "failed", "cancelled"), *, frames: int = 0) -> dict:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while time.monotonic() < deadline:
            job = self.status(job_id)
            if job["state"] in until and job["frames_done"] >= frames:
                return job
            if job["state"] in ("done", "failed", "cancelled"):
                pytest.fail(f"job {job_id} ended {job['state']} ({job['error']}), "
                            f"expected {until}")  # fmt: skip
            time.sleep(0.05)
        pytest.fail(f"job {job_id} not {until} after {JOB_TIMEOUT_S} s: {self.status(job_id)}")

    def video(self, job_id: str, out: Path) -> Path:
        status, headers, data = self.request("GET", f"/v1/jobs/{job_id}/video")
        assert status == 200 and headers["content-type"] == "video/mp4", (status, data[:200])
        out.write_bytes(data)
        return out


def _frames(path: Path) -> np.ndarray:
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def _same_frames(got: Path, want: Path) -> None:
    a, b = _frames(got), _frames(want)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert np.array_equal(a, b), f"frames differ: max |diff| {np.abs(a.astype(int) - b).max()}"


def _cli_render(inputs: dict, audio: Path, out: Path, flags: list[str]) -> Path:
    cmd = [
        sys.executable, "-m", "lipsync_ray.cli", "-q", "render", str(inputs["avatar"]),
        str(audio), "-o", str(out), "--model", str(inputs["model"]),
        "--audio-encoder", str(inputs["encoder"]), "--chunk-frames", str(CHUNK_FRAMES), *flags,
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, env=_env(None), capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return out


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def inputs(good, tmp_path_factory) -> dict:
    """AVATARS_DIR with the `good` avatar as "alice", the 1-s clip and a long clip."""
    import shutil

    from lipsync_ray.dev.speech import synth_speech, write_audio

    root = tmp_path_factory.mktemp("service")
    avatars = root / "avatars"
    avatars.mkdir()
    shutil.copytree(good["avatar"], avatars / "alice")
    long = write_audio(root / "long.wav", synth_speech(LONG_S, seed=7))
    return {**good, "avatars": avatars, "avatar": avatars / "alice", "long": long, "root": root}


@pytest.fixture(scope="module")
def references(inputs):
    """``lipsync-ray render``'s MP4s, made in the background while the service starts
    (futures): the 1-s clip ("short"), the same with OPTION_FLAGS ("options", made once one of
    the others is done) and the long clip ("long")."""
    root = inputs["root"] / "cli"
    root.mkdir()
    pool = ThreadPoolExecutor(2)
    futures = {
        "short": pool.submit(_cli_render, inputs, inputs["audio"], root / "short.mp4", []),
        "long": pool.submit(_cli_render, inputs, inputs["long"], root / "long.mp4", []),
        "options": pool.submit(
            _cli_render, inputs, inputs["audio"], root / "options.mp4", OPTION_FLAGS
        ),
    }
    pool.shutdown(wait=False)
    return futures


@pytest.fixture(scope="module")
def service(inputs, references):
    """The service every test of this module talks to (the token: the file it creates in its
    state directory; a 1 MB body limit; no time for running jobs when it drains).
    test_killed_mid_job_then_restarted_resumes kills and restarts it;
    test_sigterm_drains_and_exits_0 stops it."""
    svc = Service(
        inputs["avatars"], inputs["root"] / "state", inputs, token=None,
        extra=("--max-upload-mb", "1", "--drain-timeout", "0"),
    ).start()  # fmt: skip
    yield svc
    svc.kill()


@pytest.fixture(scope="module")
def warm(service, inputs) -> dict:
    """One job done: the actors are up."""
    job = service.submit(inputs["audio"])
    return service.wait(job["id"])


# ------------------------------------------------------------------------------- tests


def test_a_job_gives_the_cli_frames(service, warm, inputs, references, tmp_path):
    assert warm["state"] == "done" and warm["frames_done"] == warm["frames_total"] == 24
    assert warm["options"] == {
        "start_frame": 0,
        "blend": "feather",
        "silence_passthrough": False,
        "crf": 20,
        "preset": "veryfast",
    }
    assert warm["fps"] > 0 and warm["finished_at"] >= warm["started_at"] >= warm["created_at"]
    got = service.video(warm["id"], tmp_path / "job.mp4")
    _same_frames(got, references["short"].result())


def test_three_concurrent_jobs_give_the_cli_frames(service, warm, inputs, references, tmp_path):
    jobs = [service.submit(inputs["audio"]) for _ in range(3)]
    for job in jobs:
        done = service.wait(job["id"])
        assert done["state"] == "done", done
        _same_frames(service.video(job["id"], tmp_path / f"{job['id']}.mp4"),
                     references["short"].result())  # fmt: skip


def test_options_give_the_cli_frames_on_a_renderer_of_their_own(
    service, warm, inputs, references, tmp_path
):
    """Other crf and preset: another warm renderer (with --max-warm 1 the idle default one is
    evicted, its actors stopped; the next tests' default jobs evict this one in turn)."""
    job = service.submit(inputs["audio"], **OPTIONS)
    assert job["options"] == {"start_frame": 3, "blend": "paste", "silence_passthrough": False,
                              "crf": 30, "preset": "ultrafast"}  # fmt: skip
    assert service.wait(job["id"])["state"] == "done"
    _same_frames(service.video(job["id"], tmp_path / "options.mp4"),
                 references["options"].result())  # fmt: skip


def test_a_short_job_during_a_long_one_finishes_first(service, warm, inputs):
    long = service.submit(inputs["long"])
    service.wait(long["id"], ("running",), frames=CHUNK_FRAMES)
    short = service.submit(inputs["audio"])
    short = service.wait(short["id"])
    long_now = service.status(long["id"])
    assert short["state"] == "done"
    assert long_now["state"] == "running", long_now  # the short one did not wait for it
    long = service.wait(long["id"])
    assert long["finished_at"] > short["finished_at"]
    print(f"\nshort job during a long one: {short['finished_at'] - short['created_at']:.2f} s "
          f"(long one {long['frames_total']} frames)")  # fmt: skip


def test_cancel(service, warm, inputs):
    job = service.submit(inputs["long"])
    service.wait(job["id"], ("running",), frames=CHUNK_FRAMES)
    status, cancelled = service.json("POST", f"/v1/jobs/{job['id']}/cancel")
    assert status == 200 and cancelled["state"] == "cancelled"
    time.sleep(1.0)
    after = service.status(job["id"])
    assert after["state"] == "cancelled" and after["frames_done"] < after["frames_total"]
    status, again = service.json("POST", f"/v1/jobs/{job['id']}/cancel")
    assert status == 200 and again["state"] == "cancelled"
    status, body = service.json("GET", f"/v1/jobs/{job['id']}/video")
    assert status == 409 and "cancelled" in body["error"]["message"]
    # the next job starts at once: the cancelled one left no chunk in flight for long
    service.wait(service.submit(inputs["audio"])["id"])


def test_listing_and_avatars(service, warm):
    status, body = service.json("GET", "/v1/avatars")
    assert (status, body) == (200, {"avatars": ["alice"]})
    status, body = service.json("GET", "/v1/jobs?limit=2")
    assert status == 200 and len(body["jobs"]) == 2
    created = [j["created_at"] for j in body["jobs"]]
    assert created == sorted(created, reverse=True)
    status, body = service.json("GET", "/v1/jobs")
    assert warm["id"] in [j["id"] for j in body["jobs"]]
    status, body = service.json("GET", "/healthz", token=None)
    assert (status, body) == (200, {"status": "ok"})
    status, _, page = service.request("GET", "/docs", token=None)
    assert status == 200 and b"swagger" in page.lower()
    status, spec = service.json("GET", "/openapi.json", token=None)
    assert status == 200 and "/v1/jobs" in spec["paths"]
    assert "HTTPBearer" in spec["components"]["securitySchemes"]
    body = spec["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]
    assert body["application/octet-stream"]["schema"]["format"] == "binary"


def _chunked(data: bytes, size: int = 65536):
    for i in range(0, len(data), size):
        yield data[i : i + size]


@pytest.fixture(scope="module")
def queued_job(service, inputs) -> str:
    """A job that is not done (cancelled while queued or running)."""
    job = service.submit(inputs["long"])
    service.json("POST", f"/v1/jobs/{job['id']}/cancel")
    return job["id"]


REFUSALS = [
    # (name, method, path, body, token, headers, status, message fragment)
    ("no token", "GET", "/v1/avatars", None, None, {}, 401, "missing bearer token"),
    ("wrong token", "GET", "/v1/avatars", None, "wrong-" + "y" * 30, {}, 401, "wrong token"),
    ("basic auth", "GET", "/v1/jobs", None, None, {"Authorization": "Basic eDp5"}, 401,
     "missing bearer token"),
    ("no token on a submit", "POST", "/v1/jobs?avatar=alice", b"x", None, {}, 401,
     "missing bearer token"),
    ("no token, malformed query", "POST", "/v1/jobs?crf=abc", b"x", None, {}, 401,
     "missing bearer token"),
    ("wrong token, video", "GET", "/v1/jobs/" + "0" * 32 + "/video", None, "wrong-" + "y" * 30,
     {}, 401, "wrong token"),
    ("unknown avatar", "POST", "/v1/jobs?avatar=bob", "AUDIO", "default", {}, 404,
     "unknown avatar 'bob'"),
    ("avatar path", "POST", "/v1/jobs?avatar=../alice", "AUDIO", "default", {}, 404,
     "unknown avatar '../alice'"),
    ("unknown job", "GET", "/v1/jobs/" + "0" * 32, None, "default", {}, 404, "unknown job"),
    ("bad job id", "GET", "/v1/jobs/not-an-id", None, "default", {}, 404, "unknown job"),
    ("bad job id, video", "GET", "/v1/jobs/..%2F..%2Fetc/video", None, "default", {}, 404, ""),
    ("cancel unknown job", "POST", "/v1/jobs/" + "f" * 32 + "/cancel", None, "default", {},
     404, "unknown job"),
    ("video before done", "GET", "/v1/jobs/QUEUED/video", None, "default", {}, 409,
     "not done"),
    ("too large", "POST", "/v1/jobs?avatar=alice", b"\0" * (1536 * 1024), "default", {}, 413,
     "body larger than"),
    ("too large, chunked", "POST", "/v1/jobs?avatar=alice", "CHUNKED", "default",
     {"Transfer-Encoding": "chunked"}, 413, "body larger than"),
    ("garbage audio", "POST", "/v1/jobs?avatar=alice", b"not audio at all" * 100, "default",
     {}, 400, "bad audio"),
    ("empty body", "POST", "/v1/jobs?avatar=alice", b"", "default", {}, 400, "bad audio"),
    ("a form, not the file", "POST", "/v1/jobs?avatar=alice", "AUDIO", "default",
     {"Content-Type": "multipart/form-data; boundary=x"}, 400, "not -F"),
    ("crf out of range", "POST", "/v1/jobs?avatar=alice&crf=99", "AUDIO", "default", {}, 400,
     "crf must be in 0..51, got 99"),
    ("crf not a number", "POST", "/v1/jobs?avatar=alice&crf=abc", "AUDIO", "default", {}, 422,
     "crf"),
    ("blend unknown", "POST", "/v1/jobs?avatar=alice&blend=soft", "AUDIO", "default", {}, 400,
     "blend must be feather or paste, got 'soft'"),
    ("start frame negative", "POST", "/v1/jobs?avatar=alice&start_frame=-1", "AUDIO",
     "default", {}, 400, "start_frame must be >= 0, got -1"),
    ("start frame past the avatar", "POST", "/v1/jobs?avatar=alice&start_frame=8", "AUDIO",
     "default", {}, 400, "start_frame must be < 8"),
    ("preset unknown", "POST", "/v1/jobs?avatar=alice&preset=warp", "AUDIO", "default", {},
     400, "preset must be one of"),
    ("silence passthrough not a bool", "POST",
     "/v1/jobs?avatar=alice&silence_passthrough=maybe", "AUDIO", "default", {}, 422,
     "silence_passthrough"),
    ("missing avatar", "POST", "/v1/jobs", "AUDIO", "default", {}, 422,
     "avatar: field required"),
    ("limit not a number", "GET", "/v1/jobs?limit=many", None, "default", {}, 422, "limit"),
    ("unknown route", "GET", "/v2/jobs", None, "default", {}, 404, "not found"),
]  # fmt: skip


@pytest.mark.parametrize(
    "method, path, body, token, headers, status, message",
    [r[1:] for r in REFUSALS],
    ids=[r[0] for r in REFUSALS],
)
def test_refusals(service, inputs, queued_job, method, path, body, token, headers, status,
                  message):  # fmt: skip
    path = path.replace("QUEUED", queued_job)
    if body == "AUDIO":
        body = inputs["audio"].read_bytes()
    elif body == "CHUNKED":
        body = _chunked(b"\0" * (1536 * 1024))
    before = len(service.json("GET", "/v1/jobs?limit=1000")[1]["jobs"])
    got, answer_headers, data = service.request(method, path, body, token=token,
                                                headers=headers)  # fmt: skip
    assert got == status, data
    error = json.loads(data)["error"]
    assert error["status"] == status and message in error["message"], error
    if status == 401:
        assert answer_headers.get("www-authenticate") == "Bearer"
    assert len(service.json("GET", "/v1/jobs?limit=1000")[1]["jobs"]) == before  # no new job


def test_warm_latency_of_a_one_second_clip(service, warm, inputs, tmp_path):
    """Submit, poll, download: printed, not asserted on time."""
    latencies = []
    for i in range(3):
        t0 = time.perf_counter()
        job = service.submit(inputs["audio"])
        service.wait(job["id"])
        service.video(job["id"], tmp_path / f"{i}.mp4")
        latencies.append(time.perf_counter() - t0)
    print(f"\nwarm latency of a 1-s clip (submit -> done -> MP4), after one warm-up: "
          f"{', '.join(f'{s:.2f}' for s in latencies)} s")  # fmt: skip
    assert len(latencies) == 3


def test_one_service_per_state_dir(service, inputs):
    """A second service on the same state directory stops at once, with one line."""
    cmd = [*service.cmd[: service.cmd.index("--port")], "--port", str(_free_port()),
           "--state-dir", str(service.state_dir)]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, env=_env(None), capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "another service uses this state directory" in done.stderr.splitlines()[-1]


def test_killed_mid_job_then_restarted_resumes(service, warm, inputs, references, tmp_path):
    """SIGKILL the whole service (and its Ray) mid-job; a restart with the same state dir
    lists the job, resumes it from its work directory and gives the CLI's frames."""
    token_file = service.state_dir / "token"
    assert (token_file.stat().st_mode & 0o777) == 0o600
    assert any(str(token_file) in line for line in service.lines)  # says where the token is
    job = service.submit(inputs["long"])
    service.wait(job["id"], ("running",), frames=3 * CHUNK_FRAMES)
    service.kill()
    service.start()
    _, listed = service.json("GET", "/v1/jobs")
    assert job["id"] in [j["id"] for j in listed["jobs"]]
    done = service.wait(job["id"])
    assert done["state"] == "done", done
    work = service.state_dir / "jobs" / job["id"] / "work"
    report = json.loads((work / "report.json").read_text())
    assert report["chunks_reused"] >= 3, report["chunks_reused"]
    _same_frames(service.video(job["id"], tmp_path / "resumed.mp4"), references["long"].result())


def test_sigterm_drains_and_exits_0(service, inputs):
    """Last: stops the module's service. A job still running after --drain-timeout is left
    queued, with its chunks, for the next start to resume."""
    import sqlite3

    job = service.submit(inputs["long"])
    service.wait(job["id"], ("running",), frames=CHUNK_FRAMES)
    assert service.stop() == 0, "\n".join(service.lines[-20:])
    assert any("drained" in line for line in service.lines), service.lines[-10:]
    with sqlite3.connect(service.state_dir / "jobs.sqlite3") as db:
        state, done, total = db.execute(
            "SELECT state, frames_done, frames_total FROM jobs WHERE id = ?", (job["id"],)
        ).fetchone()
    assert state == "queued" and CHUNK_FRAMES <= done < total, (state, done, total)
