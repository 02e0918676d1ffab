"""Throughput experiments: render one generated job over a grid of pool settings, as a table.

::

    sweep(batch_sizes=(1, 4), inference_actors=(1, 2), gpu_fractions=(0.0, 0.25), ...)
      ├─ build once: the generator (stand-in or a path), the audio encoder, a drawn avatar,
      │              synthetic speech
      ├─ start Ray once if it is not running (and stop it at the end only then)
      ├─ every grid point x repeat: fit the pool to the cluster, or mark the row "skipped";
      │      one Renderer, one render, the report's stage times and the process tree's peak PSS
      ├─ bare inference of the same model at the same threads and batch (once per pair)
      └─ pandas.DataFrame: one row per point and repeat, the columns of ``COLUMNS``

A point's FPS is frames / wall time of the whole render, actor start-up included (as in the
run report); ``ratio`` divides it by bare generator FPS measured on the driver, so it is
comparable only between rows that ran on the CPU provider (``bare_fps`` is NaN otherwise).
``notebooks/throughput.ipynb`` runs a sweep and plots it.
"""

from __future__ import annotations

import itertools
import logging
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from lipsync_ray.config import PoolConfig, RenderConfig
from lipsync_ray.errors import InputError, LipsyncError
from lipsync_ray.report import STAGES

if TYPE_CHECKING:
    import pandas

__all__ = ["COLUMNS", "GridPoint", "fit_pool", "grid_points", "sweep"]

log = logging.getLogger(__name__)

CPU_PROVIDER = "CPUExecutionProvider"
CPU_STEP = 0.05  # inference actors' CPUs are rounded down to this (Ray accepts 1e-4 steps)
STAND_INS = ("full", "small", "identity")

# One row per grid point and repeat, in this order. Stage columns: wall and CPU milliseconds
# per output frame (``RunReport.stages``), NaN where the stage did not run.
COLUMNS = (
    "point",  # index of the grid point
    "repeat",
    "batch_size",
    "inference_actors",
    "gpu_fraction",  # GPU per inference actor (0: CPU provider)
    "chunk_frames",
    "compositors",
    "status",  # "ok", "skipped" (does not fit the cluster) or "failed" (see "note")
    "note",
    "cpus_per_inference_actor",  # as fitted to the cluster
    "threads",  # intra-op threads of an inference actor
    "provider",  # the provider that ran the generator ("" when no render)
    "frames",
    "wall_s",
    "fps",  # frames / wall_s, actor start-up included
    "bare_fps",  # bare generator on the driver, same threads and batch (CPU rows only)
    "ratio",  # fps / bare_fps
    *(f"ms_{s}" for s in STAGES),
    *(f"cpu_ms_{s}" for s in STAGES),
    "tree_cpu_ms_per_frame",  # all processes: driver, raylet, GCS, workers
    "peak_pss_mb",  # of the whole process tree
    "retries",
)


@dataclass(frozen=True)
class GridPoint:
    """The pool settings of one experiment."""

    batch_size: int
    inference_actors: int
    gpu_fraction: float
    chunk_frames: int
    compositors: int

    def describe(self) -> str:
        return (
            f"batch {self.batch_size}, {self.inference_actors} inference actor(s) at "
            f"{self.gpu_fraction:g} GPU, chunks of {self.chunk_frames}, "
            f"{self.compositors} compositor(s)"
        )


def grid_points(
    batch_sizes: Sequence[int],
    inference_actors: Sequence[int],
    gpu_fractions: Sequence[float],
    chunk_frames: Sequence[int],
    compositors: Sequence[int],
) -> list[GridPoint]:
    """Every combination, batch size varying slowest.

    Raises:
        InputError: an axis is empty or not a sequence.
    """
    axes = {
        "batch_sizes": batch_sizes,
        "inference_actors": inference_actors,
        "gpu_fractions": gpu_fractions,
        "chunk_frames": chunk_frames,
        "compositors": compositors,
    }
    for name, values in axes.items():
        if isinstance(values, str) or not isinstance(values, Sequence) or not values:
            raise InputError(f"{name} must be a non-empty sequence, got {values!r}")
    return [
        GridPoint(int(b), int(a), float(g), int(c), int(k))
        for b, a, g, c, k in itertools.product(*axes.values())
    ]


def fit_pool(pool: PoolConfig, cluster_cpus: float, cluster_gpus: float) -> tuple[PoolConfig, str]:
    """Fill ``pool``'s automatic CPU share so the whole pool fits the cluster's totals.

    Unlike :meth:`PoolConfig.resolved` (at least 1 CPU per inference actor), the CPUs left
    after the compositors are split between the inference actors in steps of ``CPU_STEP``,
    fractions included, so every point of a grid can start on a small cluster. An explicit
    ``cpus_per_inference_actor`` is kept. Totals only: on a multi-node cluster a point that
    fits the sum may still not fit any node.

    Returns:
        ``(pool, "")`` with ``gpus_per_actor`` and ``cpus_per_inference_actor`` set, or
        ``(pool, reason)`` when the point cannot run on this cluster.
    """
    gpus = 0.0 if pool.gpus_per_actor is None else pool.gpus_per_actor
    # Pool sizes left automatic are the ones a render on this cluster would get.
    sizes = replace(pool, gpus_per_actor=gpus).resolved(cluster_cpus, cluster_gpus)
    pool = replace(
        pool,
        gpus_per_actor=gpus,
        inference_actors=sizes.inference_actors,
        compositors=sizes.compositors,
        cpus_per_compositor=sizes.cpus_per_compositor,
        batch_size=sizes.batch_size,
    )
    if gpus > 0 and cluster_gpus <= 0:
        return pool, "GPU fraction > 0 but the cluster has no GPU"
    if gpus * pool.inference_actors > cluster_gpus + 1e-9:
        return pool, (
            f"needs {gpus * pool.inference_actors:g} GPUs, the cluster has {cluster_gpus:g}"
        )
    compositor_cpus = pool.compositors * pool.cpus_per_compositor
    share = (cluster_cpus - compositor_cpus) / pool.inference_actors
    if pool.cpus_per_inference_actor is None and share < CPU_STEP - 1e-9:
        return pool, (
            f"compositors take {compositor_cpus:g} of {cluster_cpus:g} CPUs; none left for "
            f"{pool.inference_actors} inference actor(s)"
        )
    pool = pool.resolved(cluster_cpus, cluster_gpus, cpu_step=CPU_STEP)
    needed = pool.inference_actors * pool.cpus_per_inference_actor + compositor_cpus
    if needed > cluster_cpus + 1e-9:
        return pool, f"needs {needed:g} CPUs, the cluster has {cluster_cpus:g}"
    return pool, ""


@dataclass(frozen=True)
class _Inputs:
    model: Path
    audio_encoder: Path
    avatar: Path
    speech: Path


def _build_inputs(
    root: Path,
    model: str | Path,
    audio_encoder: str | None,
    seconds: float,
    avatar_seconds: float,
    size_wh: tuple[int, int],
) -> _Inputs:
    from lipsync_ray.dev.models import Arch, Size, build_model, save_model
    from lipsync_ray.dev.speech import synth_speech, write_audio
    from lipsync_ray.dev.synthetic import make_demo_avatar

    if str(model) in STAND_INS:
        arch = Arch.IDENTITY if model == "identity" else Arch.UNET328
        size = Size.FULL if model == "full" else Size.SMALL
        unet = save_model(build_model(arch, size, seed=0), root / f"unet-{model}.onnx")
    else:
        unet = Path(model)
    if audio_encoder is None:
        # The encoder runs on the driver once per render; match the generator's tier.
        size = Size.FULL if model not in ("small", "identity") else Size.SMALL
        encoder = save_model(build_model(Arch.AUDIO_ENCODER, size, seed=0), root / "enc.onnx")
    else:
        encoder = Path(audio_encoder)
    avatar = make_demo_avatar(root / "avatar", seconds=avatar_seconds, size_wh=size_wh)
    speech = write_audio(root / "speech.wav", synth_speech(seconds, seed=0))
    return _Inputs(unet, encoder, Path(avatar.path), speech)


def _row(point_index: int, repeat: int, point: GridPoint) -> dict:
    row = dict.fromkeys(COLUMNS, math.nan)
    row.update(point=point_index, repeat=repeat, **asdict(point), note="", provider="")
    return row


def _render_point(config: RenderConfig, inputs: _Inputs, output: Path, row: dict) -> None:
    """Render once with a fresh Renderer; fill ``row`` from the report and the monitor."""
    from lipsync_ray.dev.bench import ProcessTreeMonitor
    from lipsync_ray.pipeline import Renderer

    t0 = time.perf_counter()
    with Renderer(inputs.avatar, config) as renderer:
        # Inside the renderer: the last samples still see the actors' CPU time.
        with ProcessTreeMonitor(interval_s=0.5) as monitor:
            report = renderer.render(inputs.speech, output)
        wall = time.perf_counter() - t0
    output.unlink(missing_ok=True)
    threads = [a.threads for a in report.actors if a.role == "inference"]
    row.update(
        status="ok",
        threads=threads[0] if threads else math.nan,
        provider=",".join(report.providers),
        frames=report.frames,
        wall_s=wall,
        fps=report.frames / wall,
        tree_cpu_ms_per_frame=1000.0 * monitor.cpu_s / report.frames,
        peak_pss_mb=monitor.peak_pss_bytes / 2**20,
        retries=report.retries,
    )
    for stage, ms in report.stages.ms_per_frame.items():
        row[f"ms_{stage}"] = ms
    for stage, ms in report.stages.cpu_ms_per_frame.items():
        row[f"cpu_ms_{stage}"] = ms


def sweep(
    *,
    model: str | Path = "small",
    seconds: float = 4.0,
    batch_sizes: Sequence[int] = (1, 4),
    inference_actors: Sequence[int] = (1,),
    gpu_fractions: Sequence[float] = (0.0,),
    chunk_frames: Sequence[int] = (32,),
    compositors: Sequence[int] = (1,),
    size_wh: tuple[int, int] = (640, 360),
    avatar_seconds: float = 2.0,
    repeats: int = 1,
    bare: bool = True,
    bare_seconds: float = 1.0,
    base_config: RenderConfig | None = None,
    work_root: str | Path | None = None,
) -> pandas.DataFrame:
    """Render ``seconds`` of synthetic speech onto a drawn avatar at every grid point.

    Args:
        model: "small", "full", "identity" (stand-ins built here, seed 0) or an ONNX path.
        seconds: audio length (25 output frames per second).
        batch_sizes, inference_actors, gpu_fractions, chunk_frames, compositors: the grid
            axes (``PoolConfig`` fields; a GPU fraction of 0 means the CPU provider).
        size_wh: the avatar's frame size; ``avatar_seconds``: its length.
        repeats: renders per point, each with fresh actors.
        bare: also time the bare generator on the driver at each (batch, threads) of the CPU
            rows, for ``bare_seconds`` (at least 3 calls).
        base_config: every other setting (encoding, blend, retries, CPUs per compositor, Ray
            address); its model, audio features and work directory are replaced, its audio
            encoder kept when set. An explicit ``pool.cpus_per_inference_actor`` is kept.
        work_root: where the temporary inputs and outputs go (deleted at the end).

    Returns:
        A DataFrame with the columns of ``COLUMNS``: one row per point and repeat, points in
        ``grid_points`` order. Points the cluster cannot hold are ``"skipped"`` and renders that
        fail ``"failed"``, with the reason in ``note`` (both logged as warnings).

    Raises:
        InputError: a bad grid value or setting, before anything is built or started.
    """
    import pandas as pd
    import ray

    from lipsync_ray.dev.bench import bench_inference
    from lipsync_ray.embedded import init_ray

    if not (seconds > 0 and avatar_seconds > 0 and bare_seconds >= 0):
        raise InputError(
            f"expected seconds > 0, avatar seconds > 0 and bare seconds >= 0, got {seconds}, "
            f"{avatar_seconds}, {bare_seconds}"
        )
    if repeats < 1:
        raise InputError(f"repeats must be >= 1, got {repeats}")
    base = base_config or RenderConfig(model=str(model))
    points = grid_points(batch_sizes, inference_actors, gpu_fractions, chunk_frames, compositors)
    pools = [
        replace(
            base.pool,
            batch_size=p.batch_size,
            inference_actors=p.inference_actors,
            gpus_per_actor=p.gpu_fraction,
            chunk_frames=p.chunk_frames,
            compositors=p.compositors,
        )
        for p in points
    ]
    for pool in pools:
        replace(base, pool=pool)  # RenderConfig validates every point before anything starts

    owns_ray = not ray.is_initialized()
    tmp = tempfile.TemporaryDirectory(prefix="lipsync-sweep-", dir=work_root)
    root = Path(tmp.name)
    try:
        inputs = _build_inputs(
            root, model, base.audio_encoder, seconds, avatar_seconds, tuple(size_wh)
        )
        if owns_ray:
            init_ray(ray, base.address)
        resources = ray.cluster_resources()
        cluster_cpus, cluster_gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
        log.info(
            "sweep: %d points x %d repeats on %g CPUs, %g GPUs; %s, %.1f s of speech",
            len(points), repeats, cluster_cpus, cluster_gpus, model, seconds,
        )  # fmt: skip
        rows: list[dict] = []
        total = len(points) * repeats
        for index, (point, pool) in enumerate(zip(points, pools, strict=True)):
            fitted, reason = fit_pool(pool, cluster_cpus, cluster_gpus)
            for repeat in range(repeats):
                row = _row(index, repeat, point)
                row["cpus_per_inference_actor"] = fitted.cpus_per_inference_actor
                rows.append(row)
                step = f"[{len(rows)}/{total}] {point.describe()}"
                if reason:
                    row.update(status="skipped", note=reason)
                    log.warning("%s: skipped: %s", step, reason)
                    continue
                config = replace(
                    base,
                    model=str(inputs.model),
                    audio_encoder=str(inputs.audio_encoder),
                    features=None,
                    pool=fitted,
                    work_dir=None,
                    overwrite=True,
                )
                log.info("%s ...", step)
                try:
                    _render_point(config, inputs, root / f"point-{index}-{repeat}.mp4", row)
                except LipsyncError as exc:
                    row.update(status="failed", note=str(exc))
                    log.warning("%s: failed: %s", step, exc)
                    continue
                log.info("%s: %.1f FPS (%d frames in %.1f s)", step, row["fps"],
                         row["frames"], row["wall_s"])  # fmt: skip
        if bare:
            _add_bare(rows, inputs.model, bare_seconds, bench_inference)
        return pd.DataFrame(rows, columns=list(COLUMNS))
    finally:
        if owns_ray and ray.is_initialized():
            ray.shutdown()
        tmp.cleanup()


def _add_bare(rows: list[dict], model: Path, seconds: float, bench_inference) -> None:
    """Bare generator FPS for every CPU row, measured once per (batch, threads)."""
    measured: dict[tuple[int, int], float] = {}
    for row in rows:
        if row["status"] != "ok" or row["provider"] != CPU_PROVIDER:
            continue
        key = (int(row["batch_size"]), int(row["threads"]))
        if key not in measured:
            result = bench_inference(model, [key[0]], threads=key[1], min_seconds=seconds)[0]
            measured[key] = result.fps
            log.info("bare inference, batch %d, %d thread(s): %.1f FPS", *key, result.fps)
        row["bare_fps"] = measured[key]
        row["ratio"] = row["fps"] / measured[key]
