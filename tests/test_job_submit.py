"""`ray job submit` against a real head started with `ray start` (token authentication on).

The head runs on free local ports with RAY_AUTH_MODE=token; the jobs upload this repository as
their working directory (filtered by .gitignore and .rayignore), render with the small models,
and the test checks the MP4s. `ray stop` always runs afterwards. The module uses no other Ray
cluster (the shared fixture is module-scoped), so `ray stop` cannot hit one.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lipsync_ray.dev.speech import synth_speech, write_audio
from lipsync_ray.dev.synthetic import make_demo_avatar
from lipsync_ray.encode import probe

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.ray


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray(*args: str, env: dict, timeout: float = 300, check: bool = True):
    exe = shutil.which("ray", path=os.path.dirname(sys.executable)) or "ray"
    deadline = time.monotonic() + 180
    while True:
        result = subprocess.run(
            [exe, *args], env=env, capture_output=True, text=True, timeout=timeout
        )
        # The head's job agent can come up seconds after the dashboard answers `job list`.
        busy = "No available agent to submit job" in result.stdout + result.stderr
        if not busy or time.monotonic() > deadline:
            break
        time.sleep(3)
    if check and result.returncode != 0:
        raise AssertionError(
            f"ray {' '.join(args[:2])} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
            f"{result.stderr[-3000:]}"
        )
    return result


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A real `ray start --head` with token authentication; yields (dashboard URL, env)."""
    env = dict(os.environ)
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(24),
        PATH=f"{os.path.dirname(sys.executable)}{os.pathsep}{env.get('PATH', '')}",
    )
    env.pop("RAY_ADDRESS", None)
    try:
        # A port found free can be taken by another process before the head binds it (Ray's
        # own processes draw from the same range): try again with new ports.
        for attempt in range(3):
            port, dashboard = _free_port(), _free_port()
            started = _ray("start", "--head", f"--port={port}", "--dashboard-host=127.0.0.1",
                           f"--dashboard-port={dashboard}", "--include-dashboard=true",
                           "--num-cpus=2", "--disable-usage-stats", env=env,
                           check=attempt == 2)  # fmt: skip
            if started.returncode == 0:
                break
            _ray("stop", "--force", env=env, check=False, timeout=120)
        url = f"http://127.0.0.1:{dashboard}"
        deadline = time.monotonic() + 120
        while _ray("job", "list", "--address", url, env=env, check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise AssertionError("the job server did not come up within 120 s")
            time.sleep(2)
        yield url, env
    finally:
        _ray("stop", "--force", env=env, check=False, timeout=120)


@pytest.fixture(scope="module")
def job_inputs(tmp_path_factory, small_models) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("job")
    avatar = make_demo_avatar(root / "avatar", seconds=0.6, size_wh=(256, 192), seed=4)
    for i in range(2):
        write_audio(root / f"a{i}.wav", synth_speech(0.8 + 0.4 * i, seed=20 + i))
    return {"root": root, "avatar": Path(avatar.path), **small_models}


def test_token_is_required(head):
    url, env = head
    wrong = {**env, "RAY_AUTH_TOKEN": "not-the-token"}
    result = _ray("job", "list", "--address", url, env=wrong, check=False, timeout=120)
    assert result.returncode != 0


def test_submit_render_job(head, job_inputs):
    url, env = head
    root = job_inputs["root"]
    out = root / "job.mp4"
    result = _ray(
        "job", "submit", "--address", url, "--working-dir", str(ROOT), "--",
        "python", "jobs/render_job.py", str(job_inputs["avatar"]), str(root / "a0.wav"),
        "-o", str(out), "--model", str(job_inputs["unet"]),
        "--audio-encoder", str(job_inputs["encoder"]), "--chunk-frames", "10",
        env=env, timeout=600,
    )  # fmt: skip
    assert "succeeded" in result.stdout, result.stdout[-2000:]
    media = probe(out)
    assert media.video_frames > 0 and media.audio_duration_s
    report = json.loads((root / "job.mp4.work" / "report.json").read_text())
    assert report["frames"] == media.video_frames
    assert report["ray_address"]  # it joined the head, not an embedded cluster


def test_submit_batch_job(head, job_inputs):
    url, env = head
    root = job_inputs["root"]
    jobs = root / "jobs.jsonl"
    jobs.write_text(
        "\n".join(json.dumps({"audio": f"a{i}.wav", "output": f"b{i}.mp4"}) for i in range(2))
    )
    result = _ray(
        "job", "submit", "--address", url, "--working-dir", str(ROOT), "--",
        "python", "jobs/render_batch_job.py", str(job_inputs["avatar"]), str(jobs),
        "--model", str(job_inputs["unet"]), "--audio-encoder", str(job_inputs["encoder"]),
        env=env, timeout=600,
    )  # fmt: skip
    assert "succeeded" in result.stdout, result.stdout[-2000:]
    summary = json.loads((root / "jobs.summary.json").read_text())
    assert [j["ok"] for j in summary["jobs"]] == [True, True]
    for i in range(2):
        assert probe(root / f"b{i}.mp4").video_frames > 0


def test_rayignore_keeps_secrets_and_media_out_of_the_upload():
    """Ray's own matcher (the one `ray job submit` uses) applied to our .rayignore."""
    from ray._private.runtime_env.packaging import _get_ignore_file

    excluded = _get_ignore_file(ROOT, ".rayignore")
    for path in [
        ".env",
        "secrets/deploy.pem",
        ".ray/auth_token",
        "models/unet.onnx",
        "out.mp4",
        "out.mp4.work/shards/chunk-000000.parquet",
        ".venv/bin/python",
    ]:
        assert excluded(ROOT / path), path  # fmt: skip
    for path in ["lipsync_ray/pipeline.py", "jobs/render_job.py", "pyproject.toml"]:
        assert not excluded(ROOT / path), path
