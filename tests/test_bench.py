"""The render benchmark program: one run measures bare inference and the whole render."""

from __future__ import annotations

import pytest

from lipsync_ray.bench import bench_render
from lipsync_ray.config import CPU_BATCH, PoolConfig, RenderConfig
from lipsync_ray.precision import Precision

# The fixture's cluster simulates a GPU with no CUDA behind it: these measure the CPU path.
CPU_POOL = PoolConfig(gpus_per_actor=0.0, compositors=1)
CPU_CONFIG = RenderConfig(model="-", pool=CPU_POOL)


@pytest.mark.ray
def test_bench_render_measures_bare_and_end_to_end_in_one_run(ray_cluster, tmp_path):
    r = bench_render(
        "identity", 1.5, config=CPU_CONFIG, size_wh=(320, 180), avatar_seconds=1.0,
        batches=(1, 2), work_root=tmp_path, bare_warmup_s=0.5,
    )  # fmt: skip
    assert abs(r.frames - 1.5 * 25) <= 2
    # the render's own batch is measured bare too, on the render's (CPU) provider
    assert [b.batch for b in r.bare] == [1, 2, CPU_BATCH]
    assert {b.provider for b in r.bare} == {"CPUExecutionProvider"}
    best = max(r.bare, key=lambda b: b.fps)
    assert r.bare_batch == best.batch == r.bare_after.batch
    assert r.render_batch == CPU_BATCH  # the pipeline's CPU default, as users run it
    assert "1 inference actor" in r.settings["pool_sizing"]  # sized from the cluster
    assert r.bare_reduced == ()  # FP32: nothing else to measure
    assert r.bare_fps == pytest.approx((best.fps + r.bare_after.fps) / 2) and r.bare_fps > 0
    assert r.e2e_fps == pytest.approx(r.frames / r.wall_s)
    assert r.ratio == pytest.approx(r.e2e_fps / r.bare_fps)
    # the cluster was already up (the fixture's): nothing to start, and it is left running
    assert r.cluster_start_s < 1.0 and ray_cluster.is_initialized()
    # CPU of every process in the tree, by kind; the actors did the rendering
    roles = r.process_cpu_ms_per_frame
    assert {"driver", "ray::InferenceActor", "ray::CompositorActor"} <= set(roles)
    assert sum(roles.values()) - roles["monitor"] == pytest.approx(r.tree_cpu_ms_per_frame)
    assert roles["ray::CompositorActor"] > 0 and roles["ray::InferenceActor"] > 0
    for stage in ("inference", "composite", "shard_write", "encode"):
        assert r.stage_cpu_ms_per_frame[stage] > 0
    assert r.peak_pss_mb > 0 and r.peak_rss_mb >= r.peak_pss_mb * 0.5
    assert list(tmp_path.iterdir()) == []  # the benchmark's files are removed


@pytest.mark.ray
def test_bench_render_prepares_reduced_precision_before_timing(ray_cluster, tmp_path):
    config = RenderConfig(
        model="unet.onnx", pool=CPU_POOL, precision=Precision.INT8, precision_threshold_db=20
    )
    r = bench_render(
        "small", 1.0, config=config, size_wh=(320, 180), avatar_seconds=1.0, work_root=tmp_path,
        bare=False,
    )  # fmt: skip
    assert r.precision_prepare_s > 0
    # the timed render found the gated INT8 model in the cache instead of quantising again
    assert r.precision["precision"] == "int8" and r.precision["cached"] is True
    assert r.precision["gate"]["passed"] and r.frames_generated == r.frames


@pytest.mark.ray
def test_bench_render_measures_the_reduced_generator_too(ray_cluster, tmp_path):
    config = RenderConfig(
        model="unet.onnx", pool=CPU_POOL, precision=Precision.INT8, precision_threshold_db=20
    )
    r = bench_render(
        "small", 1.0, config=config, size_wh=(320, 180), avatar_seconds=1.0, batches=(1, 2),
        work_root=tmp_path, bare_warmup_s=0.5,
    )  # fmt: skip
    assert [b.batch for b in r.bare] == [1, 2, CPU_BATCH] == [b.batch for b in r.bare_reduced]
    # the ratio's denominator stays FP32 at its own best batch, measured on both sides
    assert r.bare_batch == max(r.bare, key=lambda b: b.fps).batch == r.bare_after.batch
    assert r.render_batch == r.settings["pool_resolved"]["batch_size"] == CPU_BATCH
    assert r.ratio == pytest.approx(r.e2e_fps / r.bare_fps)
