"""Shared fixtures: one small local Ray cluster for the integration tier, small models, and a
tripwire that keeps the unit tier off Ray."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


class RayInUnitTestError(RuntimeError):
    """A test not marked ``ray`` started (or joined) a Ray cluster."""


@pytest.fixture(autouse=True)
def _no_ray_in_the_unit_tier(request, monkeypatch):
    """Tests not marked ``ray`` (the unit tier, ``-m "not ray"``) must not start Ray: here
    ``ray.init`` raises for them, and asking for ``ray_cluster`` fails. Only this process is
    covered: a subprocess that starts Ray is not seen."""
    if request.node.get_closest_marker("ray") is not None:
        return
    if "ray_cluster" in request.fixturenames:
        pytest.fail(f"{request.node.nodeid} uses ray_cluster: mark it @pytest.mark.ray")
    import ray

    def tripwire(*args, **kwargs):
        raise RayInUnitTestError(
            f"ray.init called by {request.node.nodeid}, which is not marked `ray`: the unit "
            "tier never starts Ray; mark the test @pytest.mark.ray (integration tier)"
        )

    monkeypatch.setattr(ray, "init", tripwire)


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
