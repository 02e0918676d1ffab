"""`ray job submit` against real heads started with the README's `ray start` commands (token
authentication on), side by side as on a machine where a Ray cluster already runs.

The README's plain head takes Ray's default ports (6379, 8265, 52365, 10001) when they are free
here; its second head ("another Ray cluster on the machine") sets its own with the README's
port flags, free ports here. The jobs go to the second head, so a port its command left at a
default would show ("No available agent to submit job"). The jobs upload this repository as
their working directory (filtered by .gitignore and .rayignore), render with the small models,
and the test checks the MP4s.

Each head runs as `ray start --head --block`, and the module stops it by signalling that
process, which stops the processes of that cluster only. Never `ray stop`: it stops every Ray
cluster on the machine, other people's included.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from lipsync_ray.dev.speech import synth_speech, write_audio
from lipsync_ray.dev.synthetic import make_demo_avatar
from lipsync_ray.encode import probe

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.ray

# The ports a `ray start --head` takes unless told: GCS, dashboard, dashboard agent, Ray Client.
DEFAULT_PORTS = (6379, 8265, 52365, 10001)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def readme_heads() -> tuple[list[str], list[str]]:
    """The README's `ray start --head` commands, their arguments after ``start``: (the plain head,
    the second head beside another cluster, the one with --dashboard-agent-listen-port)."""
    text = (ROOT / "README.md").read_text()
    found = re.findall(r"^ray start --head(?:.*\\\n)*.*", text, flags=re.MULTILINE)
    commands = [shlex.split(c.replace("\\\n", " "), comments=True)[2:] for c in found]
    plain = [c for c in commands if "--port" not in c]
    second = [c for c in commands if "--dashboard-agent-listen-port" in c]
    assert len(plain) == 1 and len(second) == 1, found
    return plain[0], second[0]


def _with_ports(args: list[str]) -> tuple[list[str], dict[str, int]]:
    """``args`` with every ``--...-port N`` (and ``--port N``) given a free port instead."""
    out, ports = list(args), {}
    for i, arg in enumerate(args[:-1]):
        if arg.endswith("port") and args[i + 1].isdigit():
            ports[arg] = _free_port()
            out[i + 1] = str(ports[arg])
    return out, ports


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


@dataclass(frozen=True)
class Head:
    url: str  # the dashboard, for `ray job`
    gcs: str  # host:port, for `ray status`
    cpus: int


def _start_head(
    args: list[str], cpus: int, env: dict, log: Path, stack: ExitStack
) -> subprocess.Popen:
    """`ray start --head --block ARGS`, stopped when ``stack`` closes: SIGTERM to that process
    stops the processes it started; whatever outlives it is killed by PID."""
    exe = shutil.which("ray", path=os.path.dirname(sys.executable)) or "ray"
    args = [a for i, a in enumerate(args) if a != "--num-gpus" and args[i - 1] != "--num-gpus"]
    argv = [exe, "start", *args, f"--num-cpus={cpus}", "--num-gpus=0", "--block",
            "--disable-usage-stats"]  # fmt: skip
    with open(log, "w") as out:
        head = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)

    def stop() -> None:
        tree = []
        with suppress(psutil.Error):
            tree = psutil.Process(head.pid).children(recursive=True)
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait(timeout=30)
        for process in tree:
            with suppress(psutil.Error):
                process.kill()

    stack.callback(stop)
    return head


def _wait_for_jobs(head: subprocess.Popen, url: str, env: dict, log: Path) -> None:
    deadline = time.monotonic() + 120
    while _ray("job", "list", "--address", url, env=env, check=False).returncode != 0:
        if head.poll() is not None:
            raise AssertionError(f"ray start exited ({head.returncode}):\n{log.read_text()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"the job server did not come up within 120 s:\n{log.read_text()}")
        time.sleep(2)


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    """(the README's plain head, or None where something holds its default ports already;
    the README's second head), both with token authentication; yields (heads, env)."""
    env = dict(os.environ)
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(24),
        PATH=f"{os.path.dirname(sys.executable)}{os.pathsep}{env.get('PATH', '')}",
    )
    env.pop("RAY_ADDRESS", None)
    logs = tmp_path_factory.mktemp("heads")
    plain_args, second_args = readme_heads()
    with ExitStack() as stack:
        plain = None
        if all(_is_free(port) for port in DEFAULT_PORTS):
            process = _start_head(plain_args, 1, env, logs / "plain.txt", stack)
            plain = Head(url="http://127.0.0.1:8265", gcs="127.0.0.1:6379", cpus=1)
            _wait_for_jobs(process, plain.url, env, logs / "plain.txt")
        # A port found free can be taken by another process before the head binds it (Ray's
        # own processes draw from the same range): try again with new ports.
        for attempt in range(3):
            args, ports = _with_ports(second_args)
            assert set(ports) >= {"--port", "--dashboard-port", "--dashboard-agent-listen-port"}
            log = logs / f"second-{attempt}.txt"
            with ExitStack() as attempt_stack:
                process = _start_head(args, 2, env, log, attempt_stack)
                second = Head(
                    url=f"http://127.0.0.1:{ports['--dashboard-port']}",
                    gcs=f"127.0.0.1:{ports['--port']}",
                    cpus=2,
                )
                try:
                    _wait_for_jobs(process, second.url, env, log)
                except AssertionError:
                    if attempt == 2:
                        raise
                    continue
                stack.push(attempt_stack.pop_all())
                break
        yield (plain, second), env


@pytest.fixture(scope="module")
def job_inputs(tmp_path_factory, small_models) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("job")
    avatar = make_demo_avatar(root / "avatar", seconds=0.6, size_wh=(256, 192), seed=4)
    for i in range(2):
        write_audio(root / f"a{i}.wav", synth_speech(0.8 + 0.4 * i, seed=20 + i))
    return {"root": root, "avatar": Path(avatar.path), **small_models}


def test_the_readme_sets_every_default_port_of_a_second_head():
    _, second = readme_heads()
    given = {int(second[i + 1]) for i, a in enumerate(second[:-1]) if a.endswith("port")}
    flags = {a for a in second if a.endswith("port")}
    assert flags == {"--port", "--dashboard-port", "--dashboard-agent-listen-port",
                     "--ray-client-server-port"}  # fmt: skip
    assert not given & set(DEFAULT_PORTS)


def test_token_is_required(heads):
    (plain, second), env = heads
    wrong = {**env, "RAY_AUTH_TOKEN": "not-the-token"}
    for head in (plain, second):
        if head is not None:
            result = _ray("job", "list", "--address", head.url, env=wrong, check=False)
            assert result.returncode != 0, head


def test_ray_status_with_address_reports_that_head(heads):
    """Two clusters on the machine: `ray status --address` reports the one it names."""
    (plain, second), env = heads
    for head in (plain, second):
        if head is None:
            continue
        deadline = time.monotonic() + 60
        while True:  # "No cluster status" until the head's autoscaler monitor has reported
            result = _ray("status", "--address", head.gcs, env=env, timeout=120)
            if "No cluster status" not in result.stdout or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert re.search(rf"/{head.cpus}\.0 CPU\b", result.stdout), result.stdout


def test_submit_render_job(heads, job_inputs):
    (_, second), env = heads
    root = job_inputs["root"]
    out = root / "job.mp4"
    result = _ray(
        "job", "submit", "--address", second.url, "--working-dir", str(ROOT), "--",
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


def test_submit_batch_job(heads, job_inputs):
    (_, second), env = heads
    root = job_inputs["root"]
    jobs = root / "jobs.jsonl"
    jobs.write_text(
        "\n".join(json.dumps({"audio": f"a{i}.wav", "output": f"b{i}.mp4"}) for i in range(2))
    )
    result = _ray(
        "job", "submit", "--address", second.url, "--working-dir", str(ROOT), "--",
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
