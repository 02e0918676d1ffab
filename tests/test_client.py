"""The service's client (``lipsync_ray.client``) and ``lipsync-ray submit``, against the fake
service of ``tests/fake_service.py`` over real HTTP on loopback (no Ray)."""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fake_service import BROKEN_ERROR, TOKEN, FakeService, write_wav
from helpers import cli_command

from lipsync_ray.client import JobOptions, JobState, JobStatus, ServiceClient, resolve_token
from lipsync_ray.errors import (
    Cancelled,
    InputError,
    RemoteRenderError,
    RenderError,
    RequestRejectedError,
)

HEAVY = ("ray", "cv2", "numpy", "onnxruntime", "av", "pyarrow")


def decoded_frames(path: Path) -> int:
    import av

    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


@pytest.fixture(scope="module")
def service():
    with FakeService() as fake:
        yield fake


@pytest.fixture(autouse=True)
def _fresh(service, monkeypatch):
    service.reset()
    monkeypatch.delenv("LIPSYNC_RAY_TOKEN", raising=False)


@pytest.fixture
def client(service) -> ServiceClient:
    return ServiceClient(service.url, token=TOKEN, timeout_s=10)


@pytest.fixture(scope="module")
def wav(tmp_path_factory) -> Path:
    return write_wav(tmp_path_factory.mktemp("audio") / "speech.wav", 1.0)


# ------------------------------------------------------------------------- every method


def test_health_needs_no_token(service):
    assert ServiceClient(service.url).health() == "ok"


def test_avatars(client):
    assert client.avatars() == ["alice", "broken", "slow"]


def test_submit_parses_the_status(client, wav):
    job = client.submit("alice", wav, start_frame=3, blend="paste", crf=18, preset="fast")
    assert isinstance(job, JobStatus) and job.state is JobState.QUEUED
    assert len(job.id) == 32 and job.avatar == "alice"
    assert (job.frames_done, job.frames_total, job.fps, job.error) == (0, 25, None, None)
    assert job.options == JobOptions(
        start_frame=3, blend="paste", silence_passthrough=False, crf=18, preset="fast"
    )
    assert job.started_at is None and job.created_at <= time.time()


def test_submit_bytes_like_a_file(client, service, wav):
    job = client.submit("alice", wav.read_bytes(), silence_passthrough=True)
    assert job.frames_total == 25 and job.options.silence_passthrough is True
    assert service.requests[-1][1].endswith("silence_passthrough=true")


def test_status_progresses_and_wait_returns_done(client, wav):
    job = client.submit("alice", wav)
    seen: list[JobStatus] = []
    done = client.wait(job.id, poll_s=0.01, on_status=seen.append)
    assert done.state is JobState.DONE and done.frames_done == done.frames_total == 25
    assert [s.state for s in seen][:2] == [JobState.RUNNING, JobState.RUNNING]
    frames = [s.frames_done for s in seen]
    assert frames == sorted(frames) and frames[-1] == 25 and len(seen) >= 4
    assert done.fps is not None and done.fps > 0 and done.finished_at >= done.started_at
    assert client.status(job.id).state is JobState.DONE


def test_jobs_newest_first_and_limited(client, wav):
    ids = [client.submit("alice", wav).id for _ in range(3)]
    assert [j.id for j in client.jobs(limit=2)] == ids[::-1][:2]
    assert {j.id for j in client.jobs()} >= set(ids)


def test_cancel_then_wait_raises_cancelled(client, wav):
    job = client.submit("slow", wav)
    client.status(job.id)  # running
    assert client.cancel(job.id).state is JobState.CANCELLED
    with pytest.raises(Cancelled) as info:
        client.wait(job.id, poll_s=0.01)
    assert info.value.exit_code == 130 and job.id in str(info.value)


def test_cancel_of_a_finished_job_leaves_it(client, wav):
    job = client.submit("alice", wav)
    client.wait(job.id, poll_s=0.01)
    assert client.cancel(job.id).state is JobState.DONE


def test_download_is_the_video(client, wav, tmp_path):
    job = client.submit("alice", write_wav(tmp_path / "two.wav", 2.0))
    client.wait(job.id, poll_s=0.01)
    out = client.download(job.id, tmp_path / "out.mp4")
    assert decoded_frames(out) == 50
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4", "two.wav"]


def test_render_submits_waits_and_downloads(client, wav, tmp_path):
    seen: list[JobState] = []
    done = client.render("alice", wav, tmp_path / "r.mp4", poll_s=0.01,
                         on_status=lambda s: seen.append(s.state), crf=30)  # fmt: skip
    assert done.state is JobState.DONE and done.options.crf == 30
    assert seen[0] is JobState.QUEUED and seen[-1] is JobState.DONE
    assert decoded_frames(tmp_path / "r.mp4") == done.frames_total == 25


def test_a_failed_job_raises_its_error(client, wav, tmp_path):
    with pytest.raises(RemoteRenderError, match="kept failing") as info:
        client.render("broken", wav, tmp_path / "b.mp4", poll_s=0.01)
    assert BROKEN_ERROR in str(info.value) and info.value.status is None
    assert info.value.exit_code == 1 and not (tmp_path / "b.mp4").exists()


def test_wait_times_out_and_render_cancels(client, service, wav, tmp_path):
    with pytest.raises(RenderError, match=r"still running after 0\.2 s"):
        client.render("slow", wav, tmp_path / "s.mp4", poll_s=0.05, timeout_s=0.2)
    job = max(service.jobs.values(), key=lambda j: j.created_at)
    assert job.avatar == "slow" and job.state == "cancelled"


def test_a_keyboard_interrupt_cancels_the_job(client, service, wav, tmp_path):
    def interrupt(status: JobStatus) -> None:
        if status.state is JobState.RUNNING:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        client.render("slow", wav, tmp_path / "k.mp4", poll_s=0.01, on_status=interrupt)
    job = max(service.jobs.values(), key=lambda j: j.created_at)
    assert job.state == "cancelled"
    assert service.requests[-1][:2] == ("POST", f"/v1/jobs/{job.id}/cancel")


# ------------------------------------------------------------------ downloads are atomic


def test_a_download_before_done_is_409_and_writes_nothing(client, wav, tmp_path):
    job = client.submit("slow", wav)
    with pytest.raises(RequestRejectedError) as info:
        client.download(job.id, tmp_path / "early.mp4")
    assert info.value.status == 409 and "not done" in info.value.message
    assert list(tmp_path.iterdir()) == []


def test_a_broken_off_download_leaves_no_partial_file(client, service, wav, tmp_path):
    job = client.submit("alice", wav)
    client.wait(job.id, poll_s=0.01)
    out = tmp_path / "out.mp4"
    out.write_bytes(b"the previous video")
    service.truncate_video = True
    with pytest.raises(RenderError, match=r"ended after \d+ of \d+ bytes") as info:
        client.download(job.id, out)
    assert out.read_bytes() == b"the previous video"  # untouched, no half-written file
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]  # no .part left behind
    assert info.value.exit_code == 1


def test_an_interrupted_download_leaves_no_partial_file(client, wav, tmp_path, monkeypatch):
    job = client.submit("alice", wav)
    client.wait(job.id, poll_s=0.01)
    real_replace = os.replace

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        client.download(job.id, tmp_path / "out.mp4")
    monkeypatch.setattr(os, "replace", real_replace)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------ error mapping

# (name, what provokes it, expected exception, status, CLI exit code)
ERRORS = [
    ("401 wrong token", dict(token="wrong"), RequestRejectedError, 401, 2),
    ("404 unknown avatar", dict(avatar="bob"), RequestRejectedError, 404, 2),
    ("409 video not done", dict(force=("video", 409, "job is running, not done")),
     RequestRejectedError, 409, 2),
    ("413 too large", dict(max_upload=1000), RequestRejectedError, 413, 2),
    ("400 bad audio", dict(audio=b"not a wav file"), RequestRejectedError, 400, 2),
    ("400 bad option", dict(options={"start_frame": 500}), RequestRejectedError, 400, 2),
    # The CLI's types never send a malformed query: there the fake is told to answer 422.
    ("422 malformed", dict(options={"start_frame": "x"},
                           cli=dict(force=("submit", 422, "start_frame must be an integer"))),
     RequestRejectedError, 422, 2),
    ("500 server", dict(force=("submit", 500, "internal error: boom")), RemoteRenderError, 500, 1),
]  # fmt: skip


def _provoke(service, tmp_path, wav, case: dict) -> dict:
    """Set the fake up for ``case``; the render's arguments."""
    if "force" in case:
        service.force(*case["force"])
    if "max_upload" in case:
        service.max_upload_bytes = case["max_upload"]
    audio = wav
    if "audio" in case:
        audio = tmp_path / "bad.wav"
        audio.write_bytes(case["audio"])
    return {"token": case.get("token", TOKEN), "avatar": case.get("avatar", "alice"),
            "audio": audio, "options": case.get("options", {})}  # fmt: skip


@pytest.mark.parametrize(("name", "case", "error", "status", "exit_code"), ERRORS,
                         ids=[e[0] for e in ERRORS])  # fmt: skip
def test_error_mapping_of_the_client(service, wav, tmp_path, name, case, error, status, exit_code):
    args = _provoke(service, tmp_path, wav, case)
    client = ServiceClient(service.url, token=args["token"])
    with pytest.raises(error) as info:
        client.render(args["avatar"], args["audio"], tmp_path / "o.mp4", poll_s=0.01,
                      **args["options"])  # fmt: skip
    assert type(info.value) is error and info.value.status == status
    assert info.value.exit_code == exit_code
    assert service.url in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "o.mp4").exists()


def _submit(url: str, avatar: str, audio: Path, out: Path, *extra: str, env=None, timeout=60):
    env = {**os.environ, **(env or {})}
    return subprocess.run(
        [*cli_command(), "-q", "submit", url, avatar, str(audio), "-o", str(out), "--poll",
         "0.02", *extra],
        capture_output=True, text=True, env=env, timeout=timeout,
    )  # fmt: skip


@pytest.mark.parametrize(("name", "case", "error", "status", "exit_code"), ERRORS,
                         ids=[e[0] for e in ERRORS])  # fmt: skip
def test_error_mapping_of_the_cli(service, wav, tmp_path, name, case, error, status, exit_code):
    args = _provoke(service, tmp_path, wav, case.get("cli", case))
    extra = [f for k, v in args["options"].items() for f in (f"--{k.replace('_', '-')}", str(v))]
    result = _submit(service.url, args["avatar"], args["audio"], tmp_path / "o.mp4", *extra,
                     env={"LIPSYNC_RAY_TOKEN": args["token"]})  # fmt: skip
    assert result.returncode == exit_code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lipsync-ray: error: "), result.stderr
    assert f"({status})" in lines[0] and service.url in lines[0]
    assert not (tmp_path / "o.mp4").exists()


def test_the_cli_renders_and_logs_progress_off_a_terminal(service, wav, tmp_path):
    out = tmp_path / "out.mp4"
    result = subprocess.run(
        [*cli_command(), "submit", service.url, "alice", str(wav), "-o", str(out), "--poll",
         "0.02", "--crf", "25", "--blend", "paste"],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "LIPSYNC_RAY_TOKEN": TOKEN},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert decoded_frames(out) == 25
    assert result.stdout.startswith(f"{out}: 25 frames (job ")
    assert "running" in result.stderr and "25/25 frames" in result.stderr  # log lines, no bar
    job = max(service.jobs.values(), key=lambda j: j.created_at)
    assert job.options["crf"] == 25 and job.options["blend"] == "paste"


def test_the_cli_exits_1_on_a_failed_job(service, wav, tmp_path):
    result = _submit(service.url, "broken", wav, tmp_path / "o.mp4",
                     env={"LIPSYNC_RAY_TOKEN": TOKEN})  # fmt: skip
    job = max(service.jobs.values(), key=lambda j: j.created_at)
    assert result.returncode == 1 and job.avatar == "broken"
    assert result.stderr.strip().splitlines() == [
        f"lipsync-ray: error: job {job.id} failed: {BROKEN_ERROR} ({service.url}/v1/jobs/{job.id})"
    ]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_service_is_exit_1_naming_the_url(wav, tmp_path):
    url = f"http://127.0.0.1:{_closed_port()}"
    result = _submit(url, "alice", wav, tmp_path / "o.mp4", env={"LIPSYNC_RAY_TOKEN": TOKEN})
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach the render service" in lines[0] and url in lines[0]
    with pytest.raises(RenderError, match="cannot reach"):
        ServiceClient(url, token=TOKEN).avatars()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--crf", "99"], "expected an integer 0-51"),
        (["--start-frame", "-1"], "expected an integer >= 0"),
        (["--blend", "hard"], "invalid choice"),
        (["--timeout", "0"], "expected seconds > 0"),
        (["--audio", "missing.wav"], "audio file not found"),
        (["--existing"], "the output exists: use --overwrite"),
        (["--url", "ftp://x"], "service URL must be http"),
    ],
)
def test_submit_refuses_before_uploading(service, wav, tmp_path, args, message):
    audio, out, url = wav, tmp_path / "o.mp4", service.url
    if args[0] == "--audio":
        audio, args = tmp_path / args[1], []
    elif args[0] == "--existing":
        out.write_bytes(b"mine")
        args = []
    elif args[0] == "--url":
        url, args = args[1], []
    before = len(service.requests)
    result = _submit(url, "alice", audio, out, *args, env={"LIPSYNC_RAY_TOKEN": TOKEN})
    assert result.returncode == 2 and message in result.stderr
    assert len(service.requests) == before  # nothing sent
    assert not out.exists() or out.read_bytes() == b"mine"


def test_a_body_refused_before_it_is_read(client, service):
    """A service may answer 413 as soon as it sees Content-Length and hang up mid-upload: the
    client reports the 413 if it got to read it, else the upload that was cut off."""
    service.early_reject = True
    with pytest.raises(RenderError) as info:
        client.submit("alice", b"RIFF" + bytes(16 << 20))
    message = str(info.value)
    assert "\n" not in message and service.url in message
    if isinstance(info.value, RequestRejectedError):
        assert info.value.status == 413
    else:
        assert "closed the connection during the upload of 16777220 bytes" in message


@pytest.mark.parametrize(("answer", "message"), [(b"", "RemoteDisconnected"),
                                                 (b"HELLO\r\n\r\n", "BadStatusLine")])  # fmt: skip
def test_a_peer_that_is_no_http_service(answer, message):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()

        def serve() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(answer)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        with pytest.raises(RenderError, match="failed to answer") as info:
            ServiceClient(url, token=TOKEN).avatars()
        thread.join(timeout=10)
    assert message in str(info.value) and type(info.value) is RenderError


@pytest.mark.parametrize(
    "error",
    [
        RequestRejectedError("unknown avatar 'bob'", status=404, path="http://x/v1/jobs"),
        RemoteRenderError("internal error", status=500, path="http://x/v1/jobs"),
        RemoteRenderError("job 1 failed: boom"),
        Cancelled("job 1 was cancelled", path="http://x"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_the_errors_pickle_with_their_status(error):
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error) and str(copy) == str(error)
    assert getattr(copy, "status", None) == getattr(error, "status", None)
    assert (
        copy.exit_code
        == {RequestRejectedError: 2, RemoteRenderError: 1, Cancelled: 130}[type(error)]
    )


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_a_loopback_service_is_asked_directly_not_through_a_proxy(service, monkeypatch, host):
    """urllib sends even 127.0.0.1 to the environment's HTTP_PROXY (unless NO_PROXY names it):
    a proxy would get the token; here it is a port where nothing listens."""
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{_closed_port()}")
    url = service.url.replace("127.0.0.1", host)
    assert ServiceClient(url, token=TOKEN).avatars() == ["alice", "broken", "slow"]


def test_overwrite_replaces_the_output(service, wav, tmp_path):
    out = tmp_path / "o.mp4"
    out.write_bytes(b"mine")
    result = _submit(service.url, "alice", wav, out, "--overwrite",
                     env={"LIPSYNC_RAY_TOKEN": TOKEN})  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert decoded_frames(out) == 25


# ---------------------------------------------------------------------------- the token

# (argument, environment, token file) -> the Authorization header the service sees
TOKENS = [
    ("arg", "env", "file", "Bearer arg"),
    (None, "env", "file", "Bearer env"),
    (None, None, "file", "Bearer file"),
    ("arg", None, None, "Bearer arg"),
    (None, "env", None, "Bearer env"),
    (None, None, None, None),
]


@pytest.mark.parametrize(("arg", "env", "file", "header"), TOKENS)
def test_token_precedence(service, tmp_path, monkeypatch, arg, env, file, header):
    if env:
        monkeypatch.setenv("LIPSYNC_RAY_TOKEN", env)
    token_file = None
    if file:
        token_file = tmp_path / "token"
        token_file.write_text(f"{file}\n")
    client = ServiceClient(service.url, token=arg, token_file=token_file)
    with pytest.raises(RequestRejectedError) as info:  # none is the fake's token
        client.avatars()
    assert info.value.status == 401
    assert service.requests[-1][2] == header
    if header is None:
        assert "no token given: set LIPSYNC_RAY_TOKEN or use --token-file" in str(info.value)


def test_the_cli_reads_the_token_file(service, wav, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    env = {k: v for k, v in os.environ.items() if k != "LIPSYNC_RAY_TOKEN"}
    result = subprocess.run(
        [*cli_command(), "-q", "submit", service.url, "alice", str(wav), "-o",
         str(tmp_path / "o.mp4"), "--poll", "0.02", "--token-file", str(token_file)],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert service.requests[-1][2] == f"Bearer {TOKEN}"


@pytest.mark.parametrize(("content", "message"), [(None, "not found"), ("  \n", "is empty")])
def test_a_bad_token_file_is_input_error(tmp_path, content, message):
    path = tmp_path / "token"
    if content is not None:
        path.write_text(content)
    with pytest.raises(InputError, match=message):
        resolve_token(None, path)


@pytest.mark.parametrize(
    "data",
    [
        [],
        {"id": "x"},
        {"id": "a" * 32, "avatar": "a", "state": "exploded", "created_at": 0.0},
        {"id": "a" * 32, "avatar": "a", "state": "done", "created_at": 0.0, "frames_done": "1"},
    ],
)
def test_a_malformed_status_is_render_error(data):
    with pytest.raises(RenderError, match="malformed job status"):
        JobStatus.from_json(data, source="http://x/v1/jobs")


# -------------------------------------------------------------------------------- Ctrl-C


def test_ctrl_c_cancels_the_job_on_the_service(service, wav, tmp_path):
    out = tmp_path / "o.mp4"
    proc = subprocess.Popen(
        [*cli_command(), "submit", service.url, "slow", str(wav), "-o", str(out),
         "--poll", "0.05"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "LIPSYNC_RAY_TOKEN": TOKEN},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        job = None
        while time.monotonic() < deadline:
            jobs = [j for j in list(service.jobs.values()) if j.avatar == "slow" and j.polls >= 3]
            job = next((j for j in jobs if j.state == "running"), None)
            if job is not None:
                break
            time.sleep(0.05)
        assert job is not None, "the CLI never polled a running job"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert job.state == "cancelled"
    assert f"interrupted: asked the service to cancel job {job.id}" in err
    assert not out.exists()


# ----------------------------------------------------------------------- it starts fast


def test_submit_imports_no_heavy_library(service, wav, tmp_path):
    """`submit --help`, and a whole submit, load none of Ray, OpenCV, numpy, ONNX Runtime,
    PyAV or pyarrow."""
    out = tmp_path / "o.mp4"
    probe = (
        "import json, sys\n"
        "import lipsync_ray.cli as c\n"
        "try:\n"
        "    c.main(['submit', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        f"after_help = [m for m in {HEAVY!r} if m in sys.modules]\n"
        f"rc = c.main(['-q', 'submit', {service.url!r}, 'alice', {str(wav)!r}, '-o', "
        f"{str(out)!r}, '--poll', '0.02'])\n"
        f"print(json.dumps([after_help, rc, [m for m in {HEAVY!r} if m in sys.modules]]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
        env={**os.environ, "LIPSYNC_RAY_TOKEN": TOKEN},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    after_help, rc, after_submit = json.loads(result.stdout.strip().splitlines()[-1])
    assert (after_help, rc, after_submit) == ([], 0, [])
    assert out.is_file()


def test_the_probe_sees_a_heavy_import():
    """The same probe on the render's parser: it loads PyAV, OpenCV and numpy."""
    probe = (
        "import json, sys\nimport lipsync_ray.cli as c\nc.build_parser()\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            timeout=60, check=True)  # fmt: skip
    assert "numpy" in json.loads(result.stdout.strip().splitlines()[-1])
