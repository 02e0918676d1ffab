"""The render benchmark program: one run measures bare inference, `lipsync-ray render` as a
process from start to exit, and (optionally) the single-process reference on the same footage."""

from __future__ import annotations

import pytest

from lipsync_ray.config import CPU_BATCH, RenderConfig
from lipsync_ray.dev.bench import bench_render
from lipsync_ray.precision import Precision

pytest.importorskip("skimage.data")

# The driver's critical path, in order, with "ray_init" overlapping "start".
SEQUENTIAL = ["before_render", "inputs", "start", "actors_ready", "chunks", "join", "shutdown"]


@pytest.mark.ray
def test_bench_render_measures_bare_and_the_whole_process_in_one_run(tmp_path):
    r = bench_render(
        "identity", 1.5, size_wh=(320, 180), avatar_seconds=1.0, batches=(1, 2),
        work_root=tmp_path, bare_warmup_s=0.5, reference=True,
    )  # fmt: skip
    assert r.avatar == "photo"  # real-looking footage by default
    assert abs(r.frames - 1.5 * 25) <= 2
    # the render's own batch is measured bare too, on the render's (CPU) provider
    assert [b.batch for b in r.bare] == sorted({1, 2, CPU_BATCH})
    assert {b.provider for b in r.bare} == {"CPUExecutionProvider"}
    best = max(r.bare, key=lambda b: b.fps)
    assert r.bare_batch == best.batch == r.bare_after.batch
    assert r.render_batch == CPU_BATCH  # the pipeline's CPU default, as users run it
    assert "single-threaded session per CPU" in r.settings["pool_sizing"]  # from the cluster
    assert r.bare_reduced == ()  # FP32: nothing else to measure
    assert r.bare_fps == pytest.approx((best.fps + r.bare_after.fps) / 2) and r.bare_fps > 0
    assert r.e2e_fps == pytest.approx(r.frames / r.wall_s)
    assert r.ratio == pytest.approx(r.e2e_fps / r.bare_fps)
    # The wall time is split into phases that add up to it (the process started its own
    # embedded cluster: its start is inside "start").
    assert set(SEQUENTIAL) | {"ray_init"} == set(r.phases_s)
    assert all(v >= 0 for v in r.phases_s.values())
    assert sum(r.phases_s[k] for k in SEQUENTIAL) == pytest.approx(r.wall_s, abs=0.5)
    assert 0 < r.cluster_start_s == r.phases_s["ray_init"] <= r.phases_s["start"]
    # CPU of every process in the tree, by kind; the actors did the rendering
    roles = r.process_cpu_ms_per_frame
    assert {"driver", "ray::InferenceActor", "ray::CompositorActor"} <= set(roles)
    assert roles["monitor"] == 0  # the monitor runs in this process, outside the tree
    assert sum(roles.values()) == pytest.approx(r.tree_cpu_ms_per_frame)
    assert roles["ray::CompositorActor"] > 0 and roles["ray::InferenceActor"] > 0
    for stage in ("inference", "composite", "shard_write", "encode"):
        assert r.stage_cpu_ms_per_frame[stage] > 0
    assert r.peak_pss_mb > 0 and r.peak_rss_mb >= r.peak_pss_mb * 0.5
    # Both references ran on the same footage, frames and model, each as a whole process; the
    # speedup is against the faster.
    assert set(r.references) == {"jpeg", "threaded"}
    for style, ref in r.references.items():
        assert ref["style"] == style
        assert ref["frames"] == r.frames and ref["provider"] == "CPUExecutionProvider"
        assert ref["fps"] == pytest.approx(r.frames / ref["wall_s"])
        assert sum(ref["phases_s"].values()) == pytest.approx(ref["wall_s"], abs=0.05)
    assert r.reference == min(r.references.values(), key=lambda ref: ref["wall_s"])
    assert r.speedup == pytest.approx(r.reference["wall_s"] / r.wall_s)
    assert list(tmp_path.iterdir()) == []  # the benchmark's files are removed


@pytest.mark.ray
def test_bench_render_prepares_and_measures_the_reduced_generator(tmp_path):
    """One INT8 benchmark run (the two questions need the same render): the reduced model is
    prepared before timing, and the bare measurement covers both generators."""
    config = RenderConfig(model="unet.onnx", precision=Precision.INT8, precision_threshold_db=20)
    r = bench_render(
        "small", 1.0, config=config, size_wh=(320, 180), avatar_seconds=1.0, batches=(1, 2),
        work_root=tmp_path, bare_warmup_s=0.5, avatar="drawn",
    )  # fmt: skip
    assert r.avatar == "drawn"
    assert r.precision_prepare_s > 0
    # the timed render found the gated INT8 model in the cache instead of quantising again
    assert r.precision["precision"] == "int8" and r.precision["cached"] is True
    assert r.precision["gate"]["passed"] and r.frames_generated == r.frames
    assert r.reference == {} == r.references and r.speedup == 0.0
    assert [b.batch for b in r.bare] == sorted({1, 2, CPU_BATCH})
    assert [b.batch for b in r.bare] == [b.batch for b in r.bare_reduced]
    # the ratio's denominator stays FP32 at its own best batch, measured on both sides
    assert r.bare_batch == max(r.bare, key=lambda b: b.fps).batch == r.bare_after.batch
    assert r.render_batch == r.settings["pool_resolved"]["batch_size"] == CPU_BATCH
    assert r.ratio == pytest.approx(r.e2e_fps / r.bare_fps)


def test_bench_encode_measures_each_preset_on_the_footage(tmp_path):
    from lipsync_ray.dev.bench_encode import EncodeSetting, bench_encode

    results = bench_encode(
        ("ultrafast", EncodeSetting("veryfast", "me=dia")), crf=20, frames=12, repeats=2,
        size_wh=(320, 180), work_root=tmp_path,
    )  # fmt: skip
    assert [r.label for r in results] == ["ultrafast", "veryfast me=dia"]
    for r in results:
        assert r.frames == 12 and r.repeats == 2 and len(r.cpu_ms_runs) == 2
        assert r.cpu_ms_per_frame == pytest.approx(sum(r.cpu_ms_runs) / 2)  # the median of 2
        assert r.mbit_per_s > 0
        assert 30 < r.worst_psnr_db <= r.psnr_db < 60
        assert 0.8 < r.worst_ssim <= r.ssim <= 1.0
    assert list(tmp_path.iterdir()) == []


def test_the_tables_settings_are_valid_and_distinct():
    """Every candidate opens (the allow-list takes its options) and none is measured twice."""
    from lipsync_ray.dev.bench_encode import BASELINE, TABLE
    from lipsync_ray.encode import EncodeOptions

    for s in TABLE:
        EncodeOptions(preset=s.preset, x264_params=s.x264_params)
    assert len(set(TABLE)) == len(TABLE) and BASELINE in TABLE


def _distorted(kind: str):
    import numpy as np
    from skimage import data

    a = data.camera()[::2, ::2]  # uint8 (256, 256)
    rng = np.random.default_rng(1)
    if kind == "same":
        return a, a.copy()
    if kind == "noise":
        return a, np.clip(a + rng.normal(0, 8, a.shape), 0, 255).astype(np.uint8)
    if kind == "shift":
        return a, np.roll(a, 1, axis=1)
    if kind == "flat":
        return np.full((64, 48), 90, np.uint8), np.full((64, 48), 100, np.uint8)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["same", "noise", "shift", "flat"])
def test_ssim_luma_is_scikit_images_gaussian_ssim(kind):
    from skimage.metrics import structural_similarity

    from lipsync_ray.dev.bench_encode import ssim_luma

    a, b = _distorted(kind)
    want = structural_similarity(
        a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255
    )
    assert ssim_luma(a, b) == pytest.approx(want, abs=1e-4)  # float32 sums


def _result(label: str, cpu: float, rate: float, psnr: float, ssim: float):
    from lipsync_ray.dev.bench_encode import EncodeBench

    preset, _, params = label.partition(" ")
    return EncodeBench(
        preset=preset, x264_params=params, crf=20, frames=10, repeats=1, cpu_ms_per_frame=cpu,
        cpu_ms_runs=(cpu,), mbit_per_s=rate, psnr_db=psnr, worst_psnr_db=psnr, ssim=ssim,
        worst_ssim=ssim,
    )  # fmt: skip


BASE = ("veryfast", 15.0, 1.00, 41.00, 0.9500)


@pytest.mark.parametrize(
    ("others", "chosen"),
    [
        ([], "veryfast"),
        ([("veryfast me=dia", 12.0, 1.04, 40.95, 0.9495)], "veryfast me=dia"),
        ([("veryfast me=dia", 12.0, 0.96, 41.20, 0.9600)], "veryfast me=dia"),  # better is fine
        ([("veryfast me=dia", 12.0, 1.06, 41.00, 0.9500)], "veryfast"),  # 6 % more bits
        ([("veryfast me=dia", 12.0, 0.94, 41.00, 0.9500)], "veryfast"),  # 6 % fewer: not like it
        ([("veryfast me=dia", 12.0, 1.00, 40.89, 0.9500)], "veryfast"),  # 0.11 dB lower
        ([("veryfast me=dia", 12.0, 1.00, 41.00, 0.9489)], "veryfast"),  # SSIM 0.0011 lower
        ([("veryfast me=dia", 16.0, 1.00, 41.00, 0.9500)], "veryfast"),  # dearer
        (
            [("veryfast me=dia", 12.0, 1.00, 41.0, 0.95), ("ultrafast", 5.0, 9.0, 43.0, 0.97),
             ("veryfast subme=1", 11.0, 1.01, 40.95, 0.9499)],
            "veryfast subme=1",
        ),
        # within 3 % of the baseline's 15 ms (0.45 ms) of the cheapest: fewer options win
        (
            [("veryfast me=dia", 12.0, 1.0, 41.0, 0.95),
             ("veryfast me=dia:weightp=0", 11.6, 1.0, 41.0, 0.95)],
            "veryfast me=dia",
        ),
        (
            [("veryfast me=dia", 12.0, 1.0, 41.0, 0.95),
             ("veryfast me=dia:weightp=0", 11.5, 1.0, 41.0, 0.95)],
            "veryfast me=dia:weightp=0",
        ),
        ([("veryfast me=dia", 14.6, 1.0, 41.0, 0.95)], "veryfast"),  # the preset alone wins ties
    ],
)  # fmt: skip
def test_cheapest_equivalent(others, chosen):
    from lipsync_ray.dev.bench_encode import cheapest_equivalent

    results = [_result(*BASE), *(_result(*o) for o in others)]
    assert cheapest_equivalent(results).label == chosen
    with pytest.raises(ValueError, match="expected the baseline 'veryfast' among the results"):
        cheapest_equivalent(results[1:] or [_result("faster", 1, 1, 1, 1)])
