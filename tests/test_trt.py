"""TensorRT configuration without a GPU: provider options, batch profiles, the engine
directory keyed by the model's hash, and the build lock N actors share."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import lipsync_ray.inference.providers as providers
import lipsync_ray.inference.session as session_mod
from lipsync_ray.dev.models import Arch, Size, build_model, save_model
from lipsync_ray.errors import ModelError
from lipsync_ray.inference import GeneratorSession, Provider, SessionOptions
from lipsync_ray.inference.trt import engine_build_lock, file_key, tensorrt_loads, tensorrt_options

TRT = Provider.TENSORRT.value
INPUTS = (("visual_u8", (320, 320, 6)), ("audio", (32, 16, 16)))


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (SessionOptions(), {"device_id": 0}),
        (SessionOptions(device_id=1, trt_fp16=True), {"device_id": 1, "trt_fp16_enable": True}),
        (
            SessionOptions(trt_cache_dir="/c/abc"),
            {
                "device_id": 0,
                "trt_engine_cache_enable": True,
                "trt_engine_cache_path": "/c/abc",
                "trt_timing_cache_enable": True,
                "trt_timing_cache_path": "/c/abc",
            },
        ),
        (
            SessionOptions(trt_inputs=INPUTS, trt_max_batch=8),
            {
                "device_id": 0,
                "trt_profile_min_shapes": "visual_u8:1x320x320x6,audio:1x32x16x16",
                "trt_profile_opt_shapes": "visual_u8:8x320x320x6,audio:8x32x16x16",
                "trt_profile_max_shapes": "visual_u8:8x320x320x6,audio:8x32x16x16",
            },
        ),
        (SessionOptions(trt_inputs=INPUTS, trt_max_batch=0), {"device_id": 0}),  # no profile
    ],
)
def test_tensorrt_provider_options(options, expected):
    assert tensorrt_options(options) == expected


@pytest.mark.parametrize("loads", [True, False])
def test_tensorrt_stays_in_the_order_only_when_its_libraries_load(monkeypatch, caplog, loads):
    monkeypatch.setattr(providers, "tensorrt_loads", lambda: loads)
    monkeypatch.setattr(providers, "_warned", set())  # an earlier test may have warned already
    available = [TRT, Provider.CUDA.value, Provider.CPU.value]
    with caplog.at_level(logging.WARNING):
        entries = providers.provider_entries(SessionOptions(trt_max_batch=4), available)
    names = [e if isinstance(e, str) else e[0] for e in entries]
    assert names == ([TRT] if loads else []) + [Provider.CUDA.value, Provider.CPU.value]
    assert ("libnvinfer.so.10" in caplog.text) is not loads


def test_tensorrt_loads_answers_without_raising():
    assert isinstance(tensorrt_loads(), bool)


@pytest.mark.parametrize("fixed_batch", [False, True])
def test_engine_directory_and_profile_of_a_generator(tmp_path, monkeypatch, fixed_batch):
    names = ("visual_input", "audio_input")
    model = build_model(Arch.UNET328, Size.SMALL, input_names=names, fixed_batch=fixed_batch)
    path = save_model(model, tmp_path / "unet.onnx")
    session = GeneratorSession(path, SessionOptions(providers=(Provider.CPU,)))
    monkeypatch.setattr(session_mod, "tensorrt_loads", lambda: True)
    monkeypatch.setattr(
        "onnxruntime.get_available_providers", lambda: [TRT, "CPUExecutionProvider"]
    )
    asked = SessionOptions(trt_max_batch=8)
    opened, engine_dir = session._tensorrt_options(asked, session._wrapped.path)
    assert engine_dir == tmp_path / ".cache" / "tensorrt" / file_key(session._wrapped.path)
    assert opened.trt_cache_dir == str(engine_dir)
    batch = 1 if fixed_batch else 8
    assert tensorrt_options(opened)["trt_profile_max_shapes"] == (
        f"visual_u8:{batch}x320x320x6,audio_input:{batch}x32x16x16"
    )
    # An explicit cache directory is keyed by the model too.
    mine = SessionOptions(trt_cache_dir=str(tmp_path / "trt"), trt_max_batch=4)
    assert session._tensorrt_options(mine, path)[1] == tmp_path / "trt" / file_key(path)
    # Not asked for: nothing changes.
    cuda_only = SessionOptions(providers=(Provider.CUDA, Provider.CPU))
    assert session._tensorrt_options(cuda_only, path) == (cuda_only, None)


def test_build_lock_times_out_with_a_model_error(tmp_path):
    with (
        engine_build_lock(tmp_path),
        pytest.raises(ModelError, match="building the TensorRT engine"),
        engine_build_lock(tmp_path, timeout_s=0.3),
    ):
        pass


_ACTOR = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from lipsync_ray.inference.trt import engine_build_lock

    engine_dir = Path(sys.argv[1])
    with engine_build_lock(engine_dir):
        engine = engine_dir / "engine.plan"
        if engine.exists():
            print("reused", flush=True)
        else:
            time.sleep(0.5)  # a build takes a while: the others must be waiting meanwhile
            engine.write_text("built")
            print("built", flush=True)
    """
)


def test_one_of_n_actors_builds_and_the_others_reuse(tmp_path):
    engine_dir = tmp_path / "trt" / "model-key"
    env_path = str(Path(__file__).resolve().parents[1])
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _ACTOR, str(engine_dir)],
            stdout=subprocess.PIPE,
            text=True,
            env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"},
        )
        for _ in range(4)
    ]
    outputs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert sorted(outputs) == ["built", "reused", "reused", "reused"]


def test_private_temp_dir_is_ours_or_refused(tmp_path, monkeypatch):
    import os
    import tempfile

    from lipsync_ray.inference.trt import default_trt_root, private_temp_dir
    from lipsync_ray.inference.wrapper import default_wrapper_dir

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    base = tmp_path / f"lipsync-ray-{os.getuid()}"
    assert private_temp_dir("x") == base / "x" and (base / "x").is_dir()
    assert base.stat().st_mode & 0o777 == 0o700
    # A model directory that cannot be written: the caches fall back to the private directory.
    monkeypatch.setattr(os, "access", lambda *a: False)
    assert default_wrapper_dir(tmp_path / "m.onnx") == base / "graph-io"
    assert default_trt_root(tmp_path / "m.onnx") == base / "tensorrt"
    base.chmod(0o777)  # others could plant files in it
    with pytest.raises(ModelError, match="private directory"):
        private_temp_dir("x")
