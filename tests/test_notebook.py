"""The throughput experiments: grid and pool fitting (pure), a tiny sweep on the local Ray
cluster, and ``notebooks/throughput.ipynb`` executed end to end on a tiny grid."""

from __future__ import annotations

from pathlib import Path

import pytest

from lipsync_ray.config import PoolConfig
from lipsync_ray.dev.experiments import COLUMNS, GridPoint, fit_pool, grid_points, sweep
from lipsync_ray.errors import InputError
from lipsync_ray.report import STAGES

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "throughput.ipynb"
SECONDS = 1.5  # about 38 output frames


def test_grid_points_are_the_product_in_order():
    points = grid_points((1, 4), (1, 2), (0.0,), (16,), (1,))
    assert points == [
        GridPoint(1, 1, 0.0, 16, 1),
        GridPoint(1, 2, 0.0, 16, 1),
        GridPoint(4, 1, 0.0, 16, 1),
        GridPoint(4, 2, 0.0, 16, 1),
    ]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_sizes": ()}, "batch_sizes must be a non-empty sequence"),
        ({"compositors": 2}, "compositors must be a non-empty sequence"),
        ({"gpu_fractions": "0.5"}, "gpu_fractions must be a non-empty sequence"),
        ({"batch_sizes": (0,)}, "batch size must be in [1, 256], got 0"),
        ({"chunk_frames": (16, 5000)}, "chunk frames must be in [1, 4096], got 5000"),
        ({"gpu_fractions": (1.5,)}, "GPUs per actor must be a fraction in [0, 1]"),
        ({"inference_actors": (0,)}, "inference actors must be >= 1, got 0"),
        ({"repeats": 0}, "repeats must be >= 1, got 0"),
        ({"seconds": 0.0}, "expected seconds > 0"),
    ],
)
def test_sweep_rejects_bad_grids_before_starting(kwargs, message, tmp_path):
    with pytest.raises(InputError) as info:
        sweep(work_root=tmp_path, **kwargs)
    assert message in str(info.value)
    assert list(tmp_path.iterdir()) == []  # nothing was built


# (pool, cluster CPUs, cluster GPUs) -> (CPUs per inference actor, reason substring or "")
FITS = [
    (PoolConfig(inference_actors=1, compositors=1), 2, 0, 1.5, ""),
    (PoolConfig(inference_actors=2, compositors=1), 2, 0, 0.75, ""),
    (PoolConfig(inference_actors=3, compositors=2), 4, 0, 1.0, ""),
    (PoolConfig(inference_actors=3, compositors=1), 1, 0, 0.15, ""),
    (PoolConfig(inference_actors=2, cpus_per_inference_actor=1.0), 3, 0, 1.0, ""),
    (PoolConfig(inference_actors=2, cpus_per_inference_actor=1.0), 2, 0, 1.0, "needs 3 CPUs"),
    (PoolConfig(compositors=4), 2, 0, None, "none left for 2 inference actor"),
    (PoolConfig(gpus_per_actor=0.25), 2, 0, None, "the cluster has no GPU"),
    (PoolConfig(inference_actors=3, gpus_per_actor=0.5), 2, 1, None, "needs 1.5 GPUs"),
    (PoolConfig(inference_actors=4, gpus_per_actor=0.25), 2, 1, 0.35, ""),
]


@pytest.mark.parametrize(("pool", "cpus", "gpus", "expected", "reason"), FITS)
def test_fit_pool(pool, cpus, gpus, expected, reason):
    fitted, why = fit_pool(pool, cpus, gpus)
    if reason:
        assert reason in why
        return
    assert why == ""
    assert fitted.cpus_per_inference_actor == pytest.approx(expected)
    total = fitted.inference_actors * expected + fitted.compositors * fitted.cpus_per_compositor
    assert total <= cpus + 1e-9
    assert fitted.gpus_per_actor == (pool.gpus_per_actor or 0.0)


@pytest.mark.ray
def test_sweep_measures_every_point(ray_cluster, tmp_path):
    df = sweep(
        seconds=SECONDS,
        batch_sizes=(1, 4),
        gpu_fractions=(0.0, 2.0),  # 2 GPUs per actor: the simulated cluster has one
        chunk_frames=(16,),
        size_wh=(320, 240),
        avatar_seconds=1.0,
        bare_seconds=0.1,
        work_root=tmp_path,
    )
    assert tuple(df.columns) == COLUMNS
    assert list(df.batch_size) == [1, 1, 4, 4]
    assert list(df.gpu_fraction) == [0.0, 2.0, 0.0, 2.0]
    assert list(df.status) == ["ok", "skipped", "ok", "skipped"]
    skipped = df[df.status == "skipped"]
    assert skipped.note.str.contains("needs 2 GPUs, the cluster has 1").all()
    assert skipped.frames.isna().all() and skipped.fps.isna().all()

    ok = df[df.status == "ok"]
    assert (ok.frames - SECONDS * 25).abs().max() <= 3
    assert (ok.fps > 0).all()
    assert ok.fps.to_numpy() == pytest.approx((ok.frames / ok.wall_s).to_numpy())
    assert (ok.cpus_per_inference_actor == 1.5).all()  # 2 CPUs less one compositor's 0.5
    assert (ok.provider == "CPUExecutionProvider").all()
    assert (ok.bare_fps > 0).all()
    assert ok.ratio.to_numpy() == pytest.approx((ok.fps / ok.bare_fps).to_numpy())
    for stage in ("features", "inference", "composite", "encode_join"):
        assert (ok[f"ms_{stage}"] > 0).all() and (ok[f"cpu_ms_{stage}"] > 0).all()
    assert set(STAGES) == {c.removeprefix("cpu_ms_") for c in COLUMNS if c.startswith("cpu_ms_")}
    assert (ok.peak_pss_mb > 0).all() and (ok.tree_cpu_ms_per_frame > 0).all()
    assert (ok.retries == 0).all()
    assert ray_cluster.is_initialized()  # not the sweep's cluster: left running
    assert list(tmp_path.iterdir()) == []  # inputs and outputs removed


TINY_GRID = """\
MODEL = "small"
SECONDS = 1.5
BATCH_SIZES = [1, 4]
INFERENCE_ACTORS = [1]
GPU_FRACTIONS = [0.0]
CHUNK_FRAMES = [16]
COMPOSITORS = [1]
SIZE_WH = (320, 240)
AVATAR_SECONDS = 1.0
REPEATS = 1
BARE_SECONDS = 0.1
RAY_ADDRESS = "local"
RAY_CPUS = 2
RAY_GPUS = 1
FIGURE = "throughput.png"
"""

CHECKS = """\
assert list(df.status) == ["ok", "ok"], df[["status", "note"]]
assert (df.fps > 0).all() and (df.bare_fps > 0).all()
assert not ray.is_initialized()
"""


@pytest.mark.ray
def test_notebook_runs_a_tiny_sweep_and_plots(own_ray_cluster, tmp_path, monkeypatch):
    """The kernel starts its own cluster; on 2 cores only one runs at a time (no shared one)."""
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend makes PNGs

    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and params[0].cell_type == "code"
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")  # committed clean
    params[0].source = TINY_GRID
    nb.cells.append(nbformat.v4.new_code_cell(CHECKS))

    client = NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, with the cell's traceback, on any error

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert any("image/png" in o.get("data", {}) for o in outputs)
    assert any("text/html" in o.get("data", {}) for o in outputs)  # the DataFrame
    figure = tmp_path / "throughput.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert figure.stat().st_size > 10_000
