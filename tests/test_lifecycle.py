"""The Renderer's life cycle, without Ray: what it resolves once (the pools, the actors'
descriptions) is made once and frozen; what belongs to one render lives in that render's own
value; the renderer keeps nothing else."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import pytest

from lipsync_ray import pipeline
from lipsync_ray.concurrency import WorkDirsInUse
from lipsync_ray.config import PoolConfig, RenderConfig
from lipsync_ray.errors import InputError
from lipsync_ray.pipeline import Renderer, RenderJob
from lipsync_ray.pools import Pools
from lipsync_ray.precision import Precision, PreparedModel
from lipsync_ray.report import ActorInfo, Timeline

# Everything a Renderer holds, from construction to close: no attribute is added by a render.
RENDERER_STATE = {
    "config", "filesystem", "avatar", "_avatar_location", "_avatar_sha", "_once", "_ray",
    "_owns_ray", "_pools", "_actors", "_encoder", "_shares", "_served", "_working",
}  # fmt: skip


@pytest.fixture(scope="module")
def avatar(tmp_path_factory) -> Path:
    from lipsync_ray.dev.synthetic import make_demo_avatar

    root = tmp_path_factory.mktemp("lifecycle")
    return Path(make_demo_avatar(root / "avatar", seconds=0.2, size_wh=(128, 96), seed=1).path)


@pytest.fixture
def started(monkeypatch) -> list[dict]:
    """``start_pools`` replaced by a recorder (slow enough for concurrent callers to overlap),
    and Ray taken as already connected (the renderer neither starts nor owns it)."""
    import ray

    calls: list[dict] = []

    def fake_start(ray_module, config, avatar, location, *, chunks, calibration):
        calls.append({"chunks": chunks, "calibration": calibration})
        time.sleep(0.05)
        model = PreparedModel(Path(config.model), Precision.FP32, Precision.FP32, None, False)
        return Pools(config.pool, "sized by the test", model, "sha", (), (), ())

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(pipeline, "start_pools", fake_start)
    return calls


def _renderer(small_models, avatar, *, once: bool, **config) -> Renderer:
    return Renderer(
        avatar,
        RenderConfig(
            model=str(small_models["identity"]),
            audio_encoder=str(small_models["encoder"]),
            pool=PoolConfig(chunk_frames=8),
            **config,
        ),
        once=once,
    )


@pytest.mark.parametrize(("once", "cap"), [(True, 5), (False, None)])
def test_pools_are_made_once_and_capped_by_the_first_render_only_when_once(
    small_models, avatar, started, once, cap
):
    renderer = _renderer(small_models, avatar, once=once)
    assert renderer.pools is None and renderer.actor_infos == ()
    made = []
    threads = [
        threading.Thread(
            target=lambda n=n: made.append(renderer._warm(Timeline(), chunks=n, calibration=None))
        )
        for n in (5, 5, 5)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    later = renderer._warm(Timeline(), chunks=50, calibration=None)  # a longer second render
    assert started == [{"chunks": cap, "calibration": None}]  # once, for the first caller
    assert all(p is later for p in made) and renderer.pools is later
    assert set(vars(renderer)) == RENDERER_STATE
    renderer.close()  # Ray was not started here: nothing to shut down
    assert renderer.pools is None and set(vars(renderer)) == RENDERER_STATE


def test_actors_are_described_once_and_every_render_checks_the_cpu_fallback(
    small_models, avatar, started, monkeypatch
):
    info = ActorInfo("inference", "InferenceActor", 1, "node", ("CPUExecutionProvider",),
                     cpu_fallback="libcudnn not found")  # fmt: skip
    waits = []
    monkeypatch.setattr(pipeline, "describe_actors", lambda ray, pools: waits.append(1) or (info,))
    strict = _renderer(small_models, avatar, once=False)
    pools = strict._warm(Timeline(), chunks=1, calibration=None)
    for _ in range(2):  # the second render is refused too, not waved through
        with pytest.raises(InputError, match="CUDA could not be used by InferenceActor"):
            strict._ready(pools)
    assert waits == [1] and strict.actor_infos == (info,)

    lenient = _renderer(small_models, avatar, once=False, allow_cpu_fallback=True)
    pools = lenient._warm(Timeline(), chunks=1, calibration=None)
    assert lenient._ready(pools) == lenient._ready(pools) == (info,)
    assert waits == [1, 1]


@pytest.mark.parametrize("value", [Pools, RenderJob, pipeline._Inputs])
def test_what_renders_share_or_carry_is_frozen(value):
    assert dataclasses.is_dataclass(value) and value.__dataclass_params__.frozen


def test_a_work_directory_is_held_by_one_render_at_a_time(tmp_path):
    in_use = WorkDirsInUse()
    work = tmp_path / "job.work"
    with in_use.hold(work), in_use.hold(tmp_path / "other.work"):
        with pytest.raises(InputError, match="another render") as refused, in_use.hold(work):
            pass
        assert refused.value.path == str(work)
    with in_use.hold(work):  # free again once the render ended
        pass
    with pytest.raises(RuntimeError, match="boom"), in_use.hold(work):
        raise RuntimeError("boom")
    with in_use.hold(work):  # and after a render that failed
        pass
