"""A GPU session that lands on the CPU is loud and early: ONNX Runtime's reason is recorded,
the render stops before any chunk unless --allow-cpu-fallback, and `--providers cuda` on a
machine that cannot load CUDA exits 2 before Ray starts.

The Ray tests use the fixture's *simulated* GPU: Ray places actors on it, and their CUDA
sessions fall back because no CUDA is behind it (on a GPU machine with CUDA they would not,
so those tests are skipped there)."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import pytest
from helpers import cli_command

from lipsync_ray.cli import main
from lipsync_ray.config import PoolConfig, RenderConfig
from lipsync_ray.dev.speech import synth_speech, write_audio
from lipsync_ray.dev.synthetic import make_demo_avatar
from lipsync_ray.errors import InputError
from lipsync_ray.inference import (
    Provider,
    SessionOptions,
    gpu_fallback_reason,
    provider_library_error,
    requires_gpu,
)
from lipsync_ray.pipeline import check_gpu_request, render

CUDA_LOADS = provider_library_error(Provider.CUDA) is None
no_cuda = pytest.mark.skipif(CUDA_LOADS, reason="this machine loads the CUDA provider")


@pytest.mark.parametrize(
    ("providers", "expected"),
    [
        ((Provider.CUDA,), True),
        ((Provider.TENSORRT, Provider.CUDA), True),
        ((Provider.CUDA, Provider.CPU), False),  # the CPU is listed: an accepted fallback
        ((Provider.TENSORRT, Provider.CUDA, Provider.CPU), False),  # the default
        ((Provider.CPU,), False),
    ],
)
def test_a_gpu_provider_alone_requires_a_gpu(providers, expected):
    assert requires_gpu(SessionOptions(providers=providers)) is expected


def _onnxruntime_words(reason: str) -> bool:
    """What ONNX Runtime says on a machine without a usable CUDA provider."""
    return (
        "cannot open shared object file" in reason  # onnxruntime-gpu without CUDA libraries
        or "has no CUDAExecutionProvider" in reason  # the CPU-only onnxruntime
        or "CUDA" in reason
    )


@no_cuda
def test_the_library_error_names_what_failed_to_load():
    reason = provider_library_error(Provider.CUDA)
    assert _onnxruntime_words(reason) and "\n" not in reason


@no_cuda
def test_the_probe_captures_onnxruntime_own_words(monkeypatch):
    """With the cheap library check out of the way, the probe session's stderr (ONNX
    Runtime's C++ logger) gives the reason."""
    import onnxruntime as ort

    if Provider.CUDA.value not in ort.get_available_providers():
        pytest.skip("the CPU-only onnxruntime has no CUDA provider to probe")
    import lipsync_ray.inference.providers as providers

    monkeypatch.setattr(providers, "provider_library_error", lambda provider: None)
    reason = gpu_fallback_reason(Provider.CUDA, SessionOptions())
    assert "libonnxruntime_providers_cuda.so" in reason and _onnxruntime_words(reason)
    assert "\n" not in reason and "\x1b" not in reason


@no_cuda
@pytest.mark.parametrize(
    ("options", "allow", "raises"),
    [
        (SessionOptions(providers=(Provider.CUDA,)), False, True),
        (SessionOptions(providers=(Provider.TENSORRT, Provider.CUDA)), False, True),
        (SessionOptions(providers=(Provider.CUDA,)), True, False),
        (SessionOptions(), False, False),  # default providers: the cluster decides
        (SessionOptions(providers=(Provider.CPU,)), False, False),
    ],
)
def test_the_driver_check_before_ray(options, allow, raises):
    config = RenderConfig(model="m.onnx", session=options, allow_cpu_fallback=allow)
    if not raises:
        check_gpu_request(config)
        return
    with pytest.raises(InputError) as caught:
        check_gpu_request(config)
    message = str(caught.value)
    assert "CUDAExecutionProvider" in message and "--allow-cpu-fallback" in message
    assert _onnxruntime_words(message) and "\n" not in message


@pytest.fixture(scope="module")
def job(tmp_path_factory, small_models) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fallback")
    avatar = make_demo_avatar(root / "avatar", seconds=0.4, size_wh=(192, 160), seed=2)
    return {
        "avatar": Path(avatar.path),
        "audio": write_audio(root / "a.wav", synth_speech(0.8, seed=4)),
        "model": small_models["identity"],
        "encoder": small_models["encoder"],
    }


def _argv(job, out: Path, *extra: str) -> list[str]:
    return [
        "render", str(job["avatar"]), str(job["audio"]), "-o", str(out),
        "--model", str(job["model"]), "--audio-encoder", str(job["encoder"]),
        "--inference-actors", "1", "--compositors", "1", "--chunk-frames", "8", *extra,
    ]  # fmt: skip


@no_cuda
@pytest.mark.slow
def test_cli_providers_cuda_exits_2_before_ray_and_writes_nothing(job, tmp_path):
    """A fresh process (no Ray running): the driver's own check, before any cluster."""
    out = tmp_path / "out.mp4"
    cmd = cli_command()
    result = subprocess.run(
        [*cmd, *_argv(job, out, "--providers", "cuda")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lipsync-ray: error: CUDA"), result.stderr
    assert _onnxruntime_words(lines[0])
    assert not out.exists() and not Path(f"{out}.work").exists()


@pytest.mark.ray
@no_cuda
def test_an_actor_on_a_gpu_that_falls_back_stops_the_render(ray_cluster, job, tmp_path, caplog):
    out = tmp_path / "out.mp4"
    pool = PoolConfig(inference_actors=1, compositors=1, chunk_frames=8, gpus_per_actor=0.25)
    config = RenderConfig(model=str(job["model"]), audio_encoder=str(job["encoder"]), pool=pool)
    with (
        caplog.at_level(logging.WARNING, logger="lipsync_ray.pipeline"),
        pytest.raises(InputError) as caught,
    ):
        render(job["avatar"], job["audio"], out, config)
    message = str(caught.value)
    assert message.startswith("CUDA could not be used by inference-")
    assert _onnxruntime_words(message) and "--allow-cpu-fallback" in message
    assert "\n" not in message
    # the driver said so when the actor started, naming the actor
    warned = [r.getMessage() for r in caplog.records if "instead of a GPU" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("inference-")
    # no chunk ran: no output, no shard
    assert not out.exists()
    assert not list(Path(f"{out}.work").glob("shards/*.parquet"))


@pytest.mark.ray
@no_cuda
def test_allow_cpu_fallback_renders_and_records_the_reason(ray_cluster, job, tmp_path):
    out = tmp_path / "out.mp4"
    rc = main(_argv(job, out, "--providers", "cuda", "--gpus-per-actor", "0.25",
                    "--allow-cpu-fallback"))  # fmt: skip
    assert rc == 0 and out.exists()
    import json

    report = json.loads(Path(f"{out}.work/report.json").read_text())
    inference = [a for a in report["actors"] if a["role"] == "inference"]
    assert inference and all(a["gpu_ids"] for a in inference)  # placed on the simulated GPU
    assert all(_onnxruntime_words(a["cpu_fallback"]) for a in inference)
    assert report["providers"] == ["CPUExecutionProvider"]
    assert all(a["cpu_fallback"] is None for a in report["actors"] if a["role"] == "compositor")
    assert report["settings"]["allow_cpu_fallback"] is True
    assert report["settings"]["pool_sizing"].startswith("cluster 2 CPUs, 1 GPUs")


@pytest.mark.ray
@no_cuda
def test_cli_providers_cuda_on_a_simulated_gpu_exits_2(ray_cluster, job, tmp_path, capsys):
    """Ray already runs (a notebook, a joined cluster): the actors' report stops it."""
    out = tmp_path / "out.mp4"
    rc = main(_argv(job, out, "--providers", "cuda", "--gpus-per-actor", "0.25"))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "CUDA could not be used" in err[0]
    assert not out.exists()


@pytest.mark.ray
def test_cpu_actors_with_default_providers_record_no_fallback(ray_cluster, job, tmp_path):
    """No GPU for the actors and the CPU among the providers: the CPU is what was asked."""
    out = tmp_path / "out.mp4"
    pool = PoolConfig(inference_actors=1, compositors=1, chunk_frames=8, gpus_per_actor=0.0)
    config = RenderConfig(model=str(job["model"]), audio_encoder=str(job["encoder"]), pool=pool)
    report = render(job["avatar"], job["audio"], out, config)
    assert out.exists() and all(a.cpu_fallback is None for a in report.actors)
