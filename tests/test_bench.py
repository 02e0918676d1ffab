"""The render benchmark program: one run measures bare inference, `lipsync-ray render` as a
process from start to exit, and (optionally) the single-process reference on the same footage."""

from __future__ import annotations

import itertools
import re

import pytest

from lipsync_ray.config import CPU_BATCH, RenderConfig
from lipsync_ray.dev.bench import bench_render
from lipsync_ray.dev.bench_print import print_render_bench
from lipsync_ray.dev.cpu_budget import PERIODS, chunks_window, cpu_table, split_periods
from lipsync_ray.errors import InputError
from lipsync_ray.precision import Precision

# The driver's critical path, in order, with "ray_init" overlapping "start".
SEQUENTIAL = ["before_render", "inputs", "start", "actors_ready", "chunks", "join", "shutdown"]


@pytest.mark.ray
def test_bench_render_measures_bare_and_the_whole_process_in_one_run(tmp_path, capsys):
    pytest.importorskip("skimage.data")
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
    # The table accounts for the same tree, by process and stage, start-up apart.
    table = r.cpu_table
    processes = [row for row in table["rows"] if not row["stage"]]
    assert sum(row["total_s"] for row in processes) == pytest.approx(table["tree"]["total_s"])
    sampled = sum(roles.values()) * r.frames / 1000
    assert table["tree"]["total_s"] == pytest.approx(sampled + table["sampling_shortfall_s"])
    compositor = [row for row in table["rows"] if row["process"] == "ray::CompositorActor"]
    assert {"shard_write", "encode", "other/transport"} <= {row["stage"] for row in compositor}
    assert compositor[0]["steady_s"] > 0 and table["tree"]["startup_s"] > 0
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
    # The printout says how busy the sessions were in the chunks phase: their turns' wall over
    # the phase, per actor.
    print_render_bench(r, r)
    busy = re.search(r"inference sessions busy (\d+) % of the chunks phase \(mean of (\d+) ",
                     capsys.readouterr().out)  # fmt: skip
    assert busy is not None
    actors = r.settings["pool_resolved"]["inference_actors"]
    assert int(busy.group(2)) == actors
    expected = r.stage_wall_ms_per_frame["inference"] * r.frames / 1000 / actors
    assert int(busy.group(1)) == round(100 * expected / r.phases_s["chunks"])
    assert 0 < int(busy.group(1)) <= 100


@pytest.mark.ray
def test_bench_render_prepares_and_measures_the_reduced_generator(tmp_path):
    """One INT8 benchmark run (the two questions need the same render): the reduced model is
    prepared before timing, and the bare measurement covers both generators."""
    pytest.importorskip("skimage.data")
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
    pytest.importorskip("skimage.data")
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


# --- where the tree's CPU goes (lipsync_ray.dev.cpu_budget): the arithmetic alone ---

# Cumulative CPU seconds per process at each sample (epoch seconds): the chunks phase runs
# from t=10 to t=20, each halfway between two samples.
HISTORY = [
    (9.0, {"driver": 1.0, "raylet": 0.5}),
    (11.0, {"driver": 3.0, "raylet": 0.7, "ray::CompositorActor": 0.8}),
    (15.0, {"driver": 3.5, "raylet": 0.8, "ray::CompositorActor": 3.0}),
    (19.0, {"driver": 3.8, "raylet": 0.9, "ray::CompositorActor": 6.0}),
    (21.0, {"driver": 4.0, "raylet": 1.1, "ray::CompositorActor": 6.4}),
]
TOTAL = {"driver": 4.0, "raylet": 1.1, "ray::CompositorActor": 6.5, "monitor": 0.0}


def test_periods_split_at_the_chunks_phase_between_samples():
    periods = split_periods(HISTORY, TOTAL, 10.0, 20.0)
    assert periods["driver"] == pytest.approx({"startup": 2.0, "steady": 1.9, "after": 0.1})
    assert periods["raylet"] == pytest.approx({"startup": 0.6, "steady": 0.4, "after": 0.1})
    assert periods["ray::CompositorActor"] == pytest.approx(
        {"startup": 0.4, "steady": 5.8, "after": 0.3}  # not seen at 9: 0 there
    )
    for process, whole in TOTAL.items():
        assert sum(periods[process].values()) == pytest.approx(whole)
    # a phase outside the samples takes the first or the last
    assert split_periods(HISTORY, TOTAL, 5.0, 30.0)["driver"] == pytest.approx(
        {"startup": 1.0, "steady": 3.0, "after": 0.0}
    )


def test_a_sample_past_the_final_figure_leaves_no_period_negative():
    """A process sampled above its final CPU (never so, but a role that lost a process) and a
    process first seen inside the chunks phase: each period within [0, total]."""
    history = [(10.0, {"a": 3.0}), (20.0, {"a": 5.0, "b": 1.0})]
    periods = split_periods(history, {"a": 4.0, "b": 1.5}, 10.0, 20.0)
    assert periods["a"] == pytest.approx({"startup": 3.0, "steady": 1.0, "after": 0.0})
    assert periods["b"] == pytest.approx({"startup": 0.0, "steady": 1.0, "after": 0.5})


def test_phases_give_the_chunks_window():
    phases = {"inputs": 0.5, "ray_init": 3.0, "start": 4.0, "actors_ready": 1.5, "chunks": 20.0,
              "join": 1.0, "started_at": 1000.0, "finished_at": 1027.0}  # fmt: skip
    # ray_init runs inside start: not added
    assert chunks_window(phases) == pytest.approx((1006.0, 1026.0))


def test_table_parts_sum_to_each_process_and_the_tree():
    frames = 500
    periods = split_periods(HISTORY, TOTAL, 10.0, 20.0)
    stages = {"features": 2.0, "encode_join": 0.1, "decode": 1.0, "shard_write": 2.0,
              "encode": 8.0}  # ms per frame  # fmt: skip
    table = cpu_table(periods, stages, frames)
    assert [r.process for r in table.processes()] == ["ray::CompositorActor", "driver", "raylet"]
    assert table.sampling_shortfall_s == 0
    for row in table.processes():
        for p in PERIODS:
            assert getattr(row, f"{p}_s") == pytest.approx(periods[row.process][p])
    for process in ("ray::CompositorActor", "driver"):  # stages + other = the process
        row = next(r for r in table.processes() if r.process == process)
        for p in PERIODS:
            parts = sum(getattr(r, f"{p}_s") for r in table.parts(process))
            assert parts == pytest.approx(getattr(row, f"{p}_s"))
    for p in PERIODS:
        assert getattr(table.tree, f"{p}_s") == pytest.approx(
            sum(getattr(r, f"{p}_s") for r in table.processes())
        )
    compositor = {r.stage: r for r in table.parts("ray::CompositorActor")}
    # 11 ms/frame of stages in the steady state over 500 frames: 5.5 s of the 5.8 s
    assert compositor["encode"].steady_ms_per_frame == pytest.approx(8.0)
    assert compositor["other/transport"].steady_s == pytest.approx(5.8 - 5.5)
    assert compositor["other/transport"].startup_s == pytest.approx(0.4)  # before any chunk
    assert table.processes()[0].steady_ms_per_frame == pytest.approx(11.6)
    driver = {r.stage: r for r in table.parts("driver")}
    assert driver["features"].startup_s == pytest.approx(1.0)  # 2 ms x 500 frames
    assert driver["encode_join"].after_s == pytest.approx(0.05)
    assert driver["other/transport"].startup_s == pytest.approx(2.0 - 1.0)
    assert driver["other/transport"].after_s == pytest.approx(0.1 - 0.05)
    assert table.parts("raylet") == ()  # no stages: no split
    assert "monitor" not in {r.process for r in table.rows}  # 0 CPU, no stages
    assert table.tree.total_s == pytest.approx(sum(TOTAL.values()))
    assert table.tree.total_ms_per_frame == pytest.approx(1000 * sum(TOTAL.values()) / frames)
    assert table.to_dict()["tree"]["total_s"] == pytest.approx(table.tree.total_s)


def test_stages_above_the_sampled_process_raise_it_never_a_negative_other():
    """A compositor sampled at 2.0 s in the steady state whose stages measured 2.5 s inside
    it (an exiting process loses its last half-second): raised to 2.5, other 0."""
    periods = {"ray::CompositorActor": {"startup": 0.3, "steady": 2.0, "after": 0.0}}
    table = cpu_table(periods, {"encode": 5.0}, 500)  # 2.5 s
    row, encode, other = table.rows
    assert (row.steady_s, encode.steady_s, other.steady_s) == pytest.approx((2.5, 2.5, 0.0))
    assert other.startup_s == pytest.approx(0.3)
    assert table.sampling_shortfall_s == pytest.approx(0.5)
    assert table.tree.total_s == pytest.approx(2.8)
    assert all(getattr(r, f"{p}_s") >= 0 for r in table.rows for p in PERIODS)


def test_a_stage_of_a_process_never_sampled_still_counts():
    table = cpu_table({}, {"inference": 4.0}, 250)  # a one-second actor between listings
    assert [(r.process, r.stage) for r in table.rows] == [
        ("ray::InferenceActor", ""), ("ray::InferenceActor", "inference"),
        ("ray::InferenceActor", "other/transport"),
    ]  # fmt: skip
    assert table.tree.steady_s == pytest.approx(1.0) == table.sampling_shortfall_s


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: cpu_table({}, {}, 0), "expected a positive frame count, got 0"),
        (lambda: split_periods(HISTORY, TOTAL, 20.0, 10.0), "ends at 10.0 before it starts"),
        (lambda: chunks_window({"inputs": 1.0, "started_at": 5.0}), "expected the chunks"),
    ],
    ids=["no-frames", "chunks-backwards", "no-chunks-phase"],
)
def test_cpu_budget_refuses_bad_inputs(call, message):
    with pytest.raises(InputError, match=message):
        call()


class _Proc:
    def __init__(self, pid: int, cmdline: list[str]) -> None:
        self.pid, self._cmdline = pid, cmdline

    def cmdline(self) -> list[str]:
        return self._cmdline


SITE = "/venv/lib/python3.11/site-packages/ray"


@pytest.mark.parametrize(
    ("cmdline", "role"),
    [
        (["ray::CompositorActor.composite", ""], "ray::CompositorActor"),
        (["ray::InferenceActor", ""], "ray::InferenceActor"),
        (["ray::DashboardAgent", ""], "ray::DashboardAgent"),
        (["ray::RuntimeEnvAgent", ""], "ray::RuntimeEnvAgent"),
        (["ray::IDLE", ""], "ray::IDLE"),
        ([f"{SITE}/core/src/ray/raylet/raylet", "--raylet_socket_name=x"], "raylet"),
        ([f"{SITE}/core/src/ray/gcs/gcs_server", "--log_dir=x"], "gcs_server"),
        (["python", "-u", f"{SITE}/_private/log_monitor.py", "--session-dir=x"], "ray log monitor"),
        (["python", "-u", f"{SITE}/autoscaler/_private/monitor.py"], "ray autoscaler monitor"),
        (["python", f"{SITE}/dashboard/dashboard.py", "--host=x"], "ray dashboard"),
        (["python", f"{SITE}/_private/workers/default_worker.py", "--x"], "ray::IDLE"),
        (["python", "something_else.py"], "ray (other)"),
        ([], "ray (other)"),
    ],
)
def test_the_monitor_names_each_kind_of_ray_process(cmdline, role):
    from lipsync_ray.dev.bench import ProcessTreeMonitor

    monitor = ProcessTreeMonitor()
    assert monitor._role_of(_Proc(monitor.root.pid + 1, cmdline)) == role
    assert monitor._role_of(_Proc(monitor.root.pid, cmdline)) == "driver"


def test_the_monitor_keeps_the_cpu_by_role_at_each_sample():
    import time

    from lipsync_ray.dev.bench import ProcessTreeMonitor

    with ProcessTreeMonitor(interval_s=0.02) as monitor:
        end = time.process_time() + 0.3
        while time.process_time() < end:  # CPU for the samples to see
            pass
        time.sleep(0.05)
    history = monitor.cpu_by_role_history()
    assert len(history) >= 3
    times = [at for at, _ in history]
    assert times == sorted(times)
    drivers = [roles["driver"] for _, roles in history]
    # cumulative, less the sampling thread's own CPU (counted to the clock's resolution)
    assert all(b >= a - 0.01 for a, b in itertools.pairwise(drivers)) and drivers[-1] > 0.2
    # the last sample is the final figure but for that sample's own cost, which is up to
    # ~15 ms where it reads every process's memory map (PSS): 0.011 s seen once
    assert history[-1][1]["driver"] == pytest.approx(monitor.cpu_by_role()["driver"], abs=0.04)


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
