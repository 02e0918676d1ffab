"""Shared fixtures: one small local Ray cluster for the integration tier, small models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray with 2 CPUs and one *simulated* GPU (no CUDA needed: Ray only counts it).

    Module-scoped: modules that start their own clusters (multi-node, `ray start` for job
    submission, which ends with `ray stop`) run with no other cluster alive.

    Actors asking for 0.25 GPU are placed on it, get CUDA_VISIBLE_DEVICES set, try CUDA, and
    fall back to the CPU provider, which is exactly the path a CPU-only machine must survive.
    """
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if ray.is_initialized():
        ray.shutdown()
    ray.init(
        address="local",  # never join a `ray start` cluster running on this machine
        num_cpus=2,
        num_gpus=1,
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=300 * 1024 * 1024,
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def small_models(tmp_path_factory) -> dict[str, Path]:
    """The small stand-in generator, audio encoder and identity model, built once."""
    from lipsync_ray.dev.models import Arch, Size, build_model, save_model

    root = tmp_path_factory.mktemp("models")
    return {
        # RANDOM weights: an output visibly unlike the input, which the seam and fault tests
        # need; the default FACE weights (lipsync_ray.dev.models) reproduce the face instead.
        "unet": save_model(
            build_model(Arch.UNET328, Size.SMALL, seed=0, weights="random"),
            root / "unet-small.onnx",
        ),
        "encoder": save_model(
            build_model(Arch.AUDIO_ENCODER, Size.SMALL, seed=0), root / "encoder-small.onnx"
        ),
        "identity": save_model(build_model(Arch.IDENTITY, seed=0), root / "identity.onnx"),
    }
