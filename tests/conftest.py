"""Shared fixtures: one small local Ray cluster for the integration tier, small models, and a
tripwire that keeps the unit tier off Ray.

The order of a run: the unit tier first, then the Ray tier's modules on one cluster that they
share (started once, by the first that asks), then the modules that start clusters of their
own in this process (``own_ray_cluster``), which stop the shared one first: a process is
connected to one cluster at a time."""

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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Unit tests, then Ray tests, then the Ray tests of modules where some test has its own
    cluster; each group in the order collected. A module with unit and Ray tests runs in two
    parts (its module fixtures are set up for each)."""
    own = {item.module for item in items if "own_ray_cluster" in item.fixturenames}

    def group(item: pytest.Item) -> int:
        if item.get_closest_marker("ray") is None:
            return 0
        return 2 if item.module in own else 1

    items.sort(key=group)


# The shared cluster's GCS address while it runs in this process.
_shared: dict[str, str] = {}


@pytest.fixture(scope="session")
def _shared_ray_cluster():
    yield
    import ray

    if _shared and ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_cluster(_shared_ray_cluster):
    """A local Ray with 2 CPUs and one *simulated* GPU (no CUDA needed: Ray only counts it),
    shared by every module that asks for it: started by the first, stopped at the end of the
    session (or by ``own_ray_cluster``). It is started as a render's embedded cluster is
    (token authentication on, the dashboard agent on a free port, so a `ray start` head can run
    beside it, no monitor), but on the machine's address: CLI subprocesses join it by address,
    which Ray cannot do to a loopback-only cluster.

    Actors asking for 0.25 GPU are placed on it, get CUDA_VISIBLE_DEVICES set, try CUDA, and
    fall back to the CPU provider, which is exactly the path a CPU-only machine must survive.
    """
    import ray

    from lipsync_ray.embedded import _embedded_node, _token_authentication_on

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if ray.is_initialized() and _shared.get("gcs") != _gcs_address(ray):
        ray.shutdown()  # a cluster a test left behind: not the shared one
    if not ray.is_initialized():
        _token_authentication_on()
        with _embedded_node(loopback=False):
            ray.init(
                address="local",  # never join a `ray start` cluster running on this machine
                num_cpus=2,
                num_gpus=1,
                include_dashboard=False,
                log_to_driver=False,
                object_store_memory=300 * 1024 * 1024,
            )
        _shared["gcs"] = _gcs_address(ray)
    yield ray


def _gcs_address(ray) -> str:
    return ray.get_runtime_context().gcs_address


@pytest.fixture(scope="module")
def own_ray_cluster():
    """For a module that starts its own cluster(s) in this process: the shared cluster is
    stopped first (the next module asking for ``ray_cluster`` starts it again; the collection
    order runs these modules last, so none does). A module fixture that shuts Ray down itself
    (tests/test_s3.py) works too, at the cost of one more start of the shared cluster."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    _shared.clear()
    yield


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


@pytest.fixture(scope="module")
def good(tmp_path_factory, small_models) -> dict[str, Path]:
    """A valid avatar (5 frames, 320x240), 1 s of speech and the small models: the inputs
    the refusal tables start from (test_bad_inputs, test_refusals, test_nothing_lost,
    test_security). Module-scoped: a module may alter them for its cases."""
    from helpers import GOOD_AVATAR_FRAMES, GOOD_SIZE_WH, demo_inputs

    root = tmp_path_factory.mktemp("good-inputs")
    inputs = demo_inputs(
        root, avatar_seconds=GOOD_AVATAR_FRAMES / 25, size_wh=GOOD_SIZE_WH, avatar_seed=2,
        audio_seconds=1.0, audio_seed=4,
    )  # fmt: skip
    return {**inputs, "model": small_models["unet"], "encoder": small_models["encoder"]}
