"""Automatic pool sizes from the cluster's CPUs and GPUs (no Ray), the benchmarks' GPU flags,
and the GPU benchmark script's syntax."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from lipsync_ray.cli import build_parser, pool_from_args, session_from_args
from lipsync_ray.config import PoolConfig
from lipsync_ray.inference import Provider

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_bench.sh"

# (pool, cluster CPUs, cluster GPUs) ->
#   (inference actors, GPUs each, batch, compositors, CPUs per compositor, CPUs per actor)
SIZES = [
    # no GPUs: one single-threaded session per CPU at batch 1 (the CPUs the compositors leave
    # split between them), max(2, CPUs // 4) compositors, at most one per CPU
    (PoolConfig(), 2, 0, (2, 0.0, 1, 2, 0.5, 0.5)),
    (PoolConfig(), 8, 0, (8, 0.0, 1, 2, 0.5, 0.75)),
    (PoolConfig(), 16, 0, (16, 0.0, 1, 4, 0.5, 0.75)),
    (PoolConfig(), 1, 0, (1, 0.0, 1, 1, 0.5, 0.5)),
    # CPUs per actor given: as many actors as fit beside the compositors
    (PoolConfig(cpus_per_inference_actor=1.0), 8, 0, (7, 0.0, 1, 2, 0.5, 1.0)),
    (
        PoolConfig(cpus_per_inference_actor=1.0, compositors=3, cpus_per_compositor=0.25),
        2,
        0,
        (1, 0.0, 1, 3, 0.25, 1.0),
    ),
    # one GPU on 16 cores: 4 x 0.25 at batch 16; 16 - 1 (driver) - 4 x 0.75 = 12 compositors
    (PoolConfig(), 16, 1, (4, 0.25, 16, 12, 0.5, 2.5)),
    (PoolConfig(), 64, 4, (16, 0.25, 16, 51, 0.5, 2.25)),
    # a small machine with a GPU still gets one compositor and fits
    (PoolConfig(), 2, 1, (4, 0.25, 16, 1, 0.5, 0.25)),
    # whole GPUs per actor: one actor per GPU
    (PoolConfig(gpus_per_actor=1.0), 32, 2, (2, 1.0, 16, 29, 0.5, 8.75)),
    # GPUs in the cluster but the pool asks for none: the CPU defaults
    (PoolConfig(gpus_per_actor=0.0), 2, 1, (2, 0.0, 1, 2, 0.5, 0.5)),
    # explicit values win; the rest is still sized
    (PoolConfig(inference_actors=2, batch_size=8), 16, 1, (2, 0.25, 8, 13, 0.5, 4.75)),
    (
        PoolConfig(inference_actors=1, compositors=1, batch_size=4),
        16,
        1,
        (1, 0.25, 4, 1, 0.5, 15.5),
    ),
    (PoolConfig(compositors=3, cpus_per_compositor=1.0), 2, 0, (2, 0.0, 1, 3, 1.0, 0.25)),
]


@pytest.mark.parametrize(("pool", "cpus", "gpus", "expected"), SIZES)
def test_automatic_pool_sizes(pool, cpus, gpus, expected):
    r = pool.resolved(cpus, gpus)
    got = (
        r.inference_actors,
        r.gpus_per_actor,
        r.batch_size,
        r.compositors,
        r.cpus_per_compositor,
        r.cpus_per_inference_actor,
    )
    assert got == expected
    if pool.compositors is None:  # sized here: the whole pool fits the cluster
        booked = r.inference_actors * r.cpus_per_inference_actor
        assert booked + r.compositors * r.cpus_per_compositor <= cpus
        assert r.inference_actors * r.gpus_per_actor <= gpus


@pytest.mark.parametrize(
    ("pool", "cpus", "gpus", "words"),
    [
        (PoolConfig(), 16, 1, ["16 CPUs, 1 GPUs", "4 inference actors", "batch 16", "12 compos"]),
        (PoolConfig(), 8, 0, ["8 CPUs, 0 GPUs", "8 inference actors", "batch 1", "2 compositors"]),
        (PoolConfig(inference_actors=1, compositors=1, batch_size=4), 2, 0, ["all values given"]),
    ],
)
def test_the_sizing_reason_names_every_automatic_value(pool, cpus, gpus, words):
    reason = pool.explain(cpus, gpus)
    assert all(w in reason for w in words), reason
    assert "\n" not in reason


# (pool, cluster CPUs, GPUs, chunks of the render) -> (inference actors, compositors, CPUs/actor)
CAPPED = [
    # a 1-second clip is one chunk: one actor gets every CPU the compositor leaves
    (PoolConfig(), 2, 0, 1, (1, 1, 1.5)),
    (PoolConfig(), 16, 0, 3, (3, 3, 4.75)),
    (PoolConfig(), 2, 0, 2, (2, 2, 0.5)),  # as many chunks as actors: no cap
    (PoolConfig(), 2, 0, None, (2, 2, 0.5)),  # a pool for many renders: no cap
    (PoolConfig(), 16, 1, 1, (1, 1, 15.5)),  # on GPUs too
    (PoolConfig(inference_actors=2, compositors=2), 2, 0, 1, (2, 2, 0.5)),  # flags win
]


@pytest.mark.parametrize(("pool", "cpus", "gpus", "chunks", "expected"), CAPPED)
def test_automatic_sizes_are_capped_at_the_chunks_of_the_render(pool, cpus, gpus, chunks, expected):
    r = pool.resolved(cpus, gpus, chunks=chunks)
    assert (r.inference_actors, r.compositors, r.cpus_per_inference_actor) == expected
    capped = chunks is not None and pool.inference_actors is None and expected[0] == chunks
    assert ("capped at the render's" in pool.explain(cpus, gpus, chunks=chunks)) is (
        capped and chunks < pool.resolved(cpus, gpus).inference_actors
    )


def _parse(*argv: str):
    return build_parser().parse_args(list(argv))


GPU_FLAGS = [
    "--providers", "cuda", "--fp16", "--trt-cache", "/tmp/trt", "--precision", "fp16",
    "--allow-cpu-fallback",
]  # fmt: skip
POOL_FLAGS = [
    "--gpus-per-actor", "0.5", "--inference-actors", "2", "--compositors", "6",
    "--batch-size", "16",
]  # fmt: skip


def test_bench_render_takes_the_render_session_pool_and_codec_flags():
    args = _parse("bench", "render", *GPU_FLAGS, *POOL_FLAGS, "--video-codec", "libx264")
    session, pool = session_from_args(args), pool_from_args(args)
    assert session.providers == (Provider.CUDA,)
    assert session.trt_fp16 and session.trt_cache_dir == "/tmp/trt"
    assert (pool.gpus_per_actor, pool.inference_actors, pool.compositors, pool.batch_size) == (
        0.5,
        2,
        6,
        16,
    )
    assert args.precision == "fp16" and args.allow_cpu_fallback
    assert args.video_codec == "libx264"


def test_bench_inference_takes_the_render_session_flags():
    args = _parse("bench", "inference", "--model", "m.onnx", "--batch", "1,16,32", *GPU_FLAGS)
    session = session_from_args(args)
    assert session.providers == (Provider.CUDA,) and session.trt_fp16
    assert args.batch == [1, 16, 32] and args.precision == "fp16"


def test_render_defaults_are_automatic_and_fallback_is_off():
    args = _parse("render", "avatar", "a.wav", "-o", "o.mp4", "--model", "m", "--features", "f")
    pool = pool_from_args(args)
    assert (pool.inference_actors, pool.compositors, pool.batch_size) == (None, None, None)
    assert not args.allow_cpu_fallback


@pytest.mark.parametrize(
    ("providers", "message"),
    [("cuda,gpu", "unknown provider 'gpu'"), (",", "expected providers such as cuda,cpu")],
)
def test_bad_providers_are_input_errors(providers, message):
    from lipsync_ray.errors import InputError

    args = _parse("bench", "inference", "--model", "m.onnx", "--providers", providers)
    with pytest.raises(InputError, match=message):
        session_from_args(args)


def test_gpu_bench_script_parses():
    bash = shutil.which("bash")
    assert bash is not None
    result = subprocess.run([bash, "-n", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_gpu_bench_dry_run_writes_the_plan_and_the_providers(tmp_path):
    """The dry run checks the install (providers, probes) and plans every step; on a machine
    without CUDA it still lists the GPU steps it would run."""
    import json
    import os
    import sys

    path = [str(SCRIPT.parents[1]), os.environ.get("PYTHONPATH", "")]
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "PYTHONPATH": os.pathsep.join(filter(None, path)),
    }
    result = subprocess.run(
        ["bash", str(SCRIPT), str(tmp_path / "out"), "--dry-run"],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / "gpu_bench.json").read_text())
    assert report["dry_run"] is True
    steps = [line.split(":", 1)[0] for line in report["plan"]]
    assert steps == ["bare-cuda-fp32", "bare-cuda-fp16", "bare-tensorrt-fp16", "render"]
    assert "--batch 1,4,8,16,32" in report["plan"][0] and "--precision fp16" in report["plan"][1]
    cuda = report["providers"]["CUDAExecutionProvider"]
    assert cuda["loads"] is (cuda["reason"] is None)
