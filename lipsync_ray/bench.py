"""Benchmarks as programs: every speed claim is a ratio measured in one run on one machine.

- :func:`bench_inference`: bare ONNX Runtime generator FPS per batch size (the denominator).
- :func:`bench_render`: a whole render of a generated avatar with S seconds of speech, next to
  the bare FPS of the same model (same threads, best batch) measured in the same run, with
  per-stage CPU and the peak memory of the whole process tree (driver, raylet, workers).
- :func:`reference_pipeline`: the single-process pipeline users run today (every frame
  preloaded in RAM, compositing in a thread pool, JPEG files, then one encode), measured on the
  same avatar for the non-inference comparison.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from lipsync_ray.errors import InputError
from lipsync_ray.inference import (
    GeneratorSession,
    Provider,
    SessionOptions,
    gpu_fallback_reason,
    requires_gpu,
)

__all__ = [
    "InferenceBench",
    "RenderBench",
    "bench_inference",
    "bench_render",
    "reference_pipeline",
]


@dataclass(frozen=True)
class InferenceBench:
    """Bare generator throughput at one batch size."""

    batch: int
    iterations: int
    ms_per_frame: float
    fps: float
    threads: int
    provider: str


def _inputs(batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    visual = rng.integers(0, 256, size=(batch, 320, 320, 6), dtype=np.uint8)
    audio = rng.standard_normal((batch, 32, 16, 16)).astype(np.float32)
    return visual, audio


def bench_inference(
    model: str | Path,
    batches: Sequence[int] = (1, 4, 8),
    *,
    threads: int = 0,
    min_seconds: float = 3.0,
    min_iterations: int = 3,
    options: SessionOptions | None = None,
    warmup_s: float = 0.0,
    fp16: bool = False,
    allow_cpu_fallback: bool = False,
) -> list[InferenceBench]:
    """Time ``GeneratorSession.run`` (uint8 → float conversion included) per batch size.

    Each batch size gets one warm-up call, then runs until both ``min_seconds`` and
    ``min_iterations`` are reached. ``threads`` 0 means one per CPU of this machine.
    ``warmup_s`` first runs the first batch size untimed for that long: on virtual machines
    a fresh process's first tens of seconds of inference run measurably slower.
    ``options`` default to the CPU provider; ``fp16`` measures the model converted to FP16
    (not gated: a speed figure). With a GPU provider alone (``providers=(CUDA,)``) a session
    that lands on the CPU raises InputError with ONNX Runtime's reason, unless
    ``allow_cpu_fallback``.
    """
    cpus = threads or os.cpu_count() or 1
    options = options or SessionOptions(providers=(Provider.CPU,))
    with tempfile.TemporaryDirectory(prefix="lipsync-bench-fp16-") as tmp:
        if fp16:
            from lipsync_ray.precision import convert_fp16

            model = convert_fp16(model, Path(tmp) / "fp16.onnx")
        session = GeneratorSession(model, options, cpus=cpus)
    if (
        requires_gpu(options)
        and session.providers[0] == Provider.CPU.value
        and not allow_cpu_fallback
    ):
        provider = Provider.CUDA if Provider.CUDA in options.providers else options.providers[0]
        raise InputError(
            f"{provider.value} was requested but the benchmark's session runs on the CPU: "
            f"{gpu_fallback_reason(provider, options)}"
        )
    if warmup_s > 0 and batches:
        visual, audio = _inputs(batches[0])
        deadline = time.perf_counter() + warmup_s
        while time.perf_counter() < deadline:
            session.run(visual, audio)
    results = []
    for batch in batches:
        visual, audio = _inputs(batch)
        session.run(visual, audio)  # warm-up: allocations, kernel selection
        iterations, elapsed = 0, 0.0
        while elapsed < min_seconds or iterations < min_iterations:
            t0 = time.perf_counter()
            session.run(visual, audio)
            elapsed += time.perf_counter() - t0
            iterations += 1
        frames = iterations * batch
        results.append(
            InferenceBench(
                batch=batch,
                iterations=iterations,
                ms_per_frame=1000.0 * elapsed / frames,
                fps=frames / elapsed,
                threads=session.threads,
                provider=session.providers[0],
            )
        )
    return results


class ProcessTreeMonitor:
    """Samples the memory and CPU time of a process and all its descendants.

    Memory is PSS (proportional set size: shared pages such as Ray's object store are split
    between the processes mapping them, so the sum is not inflated) with RSS as a fallback;
    CPU is the last seen user+system time of every process, so processes that exit (Ray
    workers) still count up to their last sample.

    The monitor is an instrument, not part of what it measures: reading PSS walks every page
    table of every process (several ms for a worker that maps a 1 GB avatar and the object
    store), so PSS is read every ``pss_every``-th sample only (every 4 s by default: every 2 s
    the monitor took ~0.65 CPU ms per frame of a 33 FPS render, 1 % of a 2-CPU machine), and
    the sampling thread's own CPU time is reported as "monitor" and left out of :attr:`cpu_s`.
    The process tree is listed again on those samples only (a worker that starts between them
    is first seen there).
    """

    def __init__(self, pid: int | None = None, interval_s: float = 0.5, pss_every: int = 8) -> None:
        import psutil

        self._psutil = psutil
        self.root = psutil.Process(pid or os.getpid())
        self.interval_s = interval_s
        self.peak_pss_bytes = 0
        self.peak_rss_bytes = 0
        self._cpu: dict[int, float] = {}
        self._base: dict[int, float] = {}
        self._role: dict[int, str] = {}
        self.pss_every = pss_every
        self._samples = 0
        self._procs: list = []
        self.monitor_cpu_s = 0.0  # the sampling thread's own CPU time
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _tree(self):
        try:
            return [self.root, *self.root.children(recursive=True)]
        except self._psutil.Error:
            return [self.root]

    def _sample(self) -> None:
        t0 = time.thread_time()
        pss = rss = 0
        full = self._samples % self.pss_every == 0
        self._samples += 1
        if full or not self._procs:  # listing the tree scans every process on the machine
            self._procs = self._tree()
        for proc in self._procs:
            try:
                with proc.oneshot():
                    times = proc.cpu_times()
                    mem = proc.memory_full_info() if full else proc.memory_info()
            except self._psutil.Error:
                continue
            rss += mem.rss
            pss += getattr(mem, "pss", 0)
            self._cpu[proc.pid] = times.user + times.system
            if proc.pid not in self._role or self._role[proc.pid] == "ray::IDLE":
                self._role[proc.pid] = self._role_of(proc)
        if full:
            self.peak_pss_bytes = max(self.peak_pss_bytes, pss or rss)
        self.peak_rss_bytes = max(self.peak_rss_bytes, rss)
        if threading.current_thread() is self._thread:
            self.monitor_cpu_s += time.thread_time() - t0

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> ProcessTreeMonitor:
        self._sample()
        self._base = dict(self._cpu)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def cpu_s(self) -> float:
        """CPU seconds of the tree since the monitor started, the monitor's own left out."""
        total = sum(v - self._base.get(pid, 0.0) for pid, v in self._cpu.items())
        return total - self.monitor_cpu_s

    def cpu_by_role(self) -> dict[str, float]:
        """CPU seconds since the monitor started per kind of process: "driver", an actor
        class ("ray::InferenceActor"), "raylet", "gcs_server", or "ray (other)" (agents,
        log monitor)."""
        out: dict[str, float] = {"monitor": self.monitor_cpu_s}
        for pid, v in self._cpu.items():
            role = self._role.get(pid, "ray (other)")
            out[role] = out.get(role, 0.0) + v - self._base.get(pid, 0.0)
        out["driver"] = out.get("driver", 0.0) - self.monitor_cpu_s
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def _role_of(self, proc) -> str:
        if proc.pid == self.root.pid:
            return "driver"
        try:
            args = proc.cmdline()
        except self._psutil.Error:
            return "ray (other)"
        first = args[0] if args else ""
        if first.startswith("ray::"):
            return first.split(".")[0].split()[0]  # "ray::InferenceActor.infer" -> class
        name = Path(first).name
        return name if name in ("raylet", "gcs_server") else "ray (other)"


@dataclass(frozen=True)
class RenderBench:
    """One benchmark run: the render, and the bare inference of the same model beside it."""

    model: str
    frames: int
    seconds: float
    size_wh: tuple[int, int]
    # Bare inference, same threads as the inference actor, at the best batch: the mean of a
    # measurement before the render (every batch in ``bare``) and one after it at that batch
    # (``bare_after``). Shared cloud CPUs drift (the same bare benchmark measured 6 to 12.6
    # FPS within minutes on the 2-core CI machine), so one measurement on one side of a
    # 3-minute render would tilt the ratio either way.
    bare_fps: float
    bare_batch: int
    bare: tuple[InferenceBench, ...]
    bare_after: InferenceBench | None
    # frames / wall time of the whole render: actors and sessions starting, audio features,
    # every chunk, the final join. Starting the Ray cluster itself is not part of it (a
    # `ray start` or job cluster is already up); it is cluster_start_s.
    e2e_fps: float
    ratio: float  # e2e_fps / bare_fps
    wall_s: float
    stage_cpu_ms_per_frame: dict[str, float]
    stage_wall_ms_per_frame: dict[str, float]
    tree_cpu_ms_per_frame: float  # all processes: driver, raylet, GCS, workers
    process_cpu_ms_per_frame: dict[str, float]  # the same, per kind of process
    cluster_start_s: float  # starting the embedded Ray cluster (before the timed render)
    peak_pss_mb: float
    peak_rss_mb: float
    # Quantising/converting and gating a reduced-precision generator: done once per model,
    # avatar and settings and cached, never per render, so it is made before the timed render
    # (which then loads it from the cache) and reported here. 0 for FP32.
    precision_prepare_s: float = 0.0
    # Bare inference of the reduced-precision generator the render loads (same threads and
    # batches, measured once it is prepared). Empty for FP32 or without ``bare``.
    bare_reduced: tuple[InferenceBench, ...] = ()
    render_batch: int = 0  # frames per generator call in the render
    frames_generated: int = 0  # frames that went through the generator (silence skips some)
    precision: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _local_gpus() -> int:
    """GPUs of this machine as an embedded Ray cluster would count them (nvidia-smi)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return 0
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def _resolve_model(model: str, root: Path) -> Path:
    from lipsync_ray.models import Arch, Size, build_model, save_model

    if model in ("full", "small", "identity"):
        arch = Arch.IDENTITY if model == "identity" else Arch.UNET328
        size = Size.SMALL if model == "small" else Size.FULL
        return save_model(build_model(arch, size, seed=0), root / f"unet-{model}.onnx")
    return Path(model)


def bench_render(
    model: str = "full",
    seconds: float = 60.0,
    *,
    config=None,
    avatar_seconds: float = 4.0,
    size_wh: tuple[int, int] = (1280, 720),
    batches: Sequence[int] = (1, 4, 8),
    work_root: str | Path | None = None,
    bare: bool = True,
    batch_size: int | None = None,
    pause_every_s: float | None = None,
    bare_warmup_s: float = 10.0,
) -> RenderBench:
    """Render a generated avatar with ``seconds`` of speech; measure it against bare inference.

    Args:
        model: "full", "small", "identity" (stand-ins built here) or an ONNX path.
        seconds: audio length.
        config: a :class:`~lipsync_ray.config.RenderConfig` to start from (model paths are
            replaced); None: the defaults.
        bare: measure bare inference first (same threads, batches ``batches``, after
            ``bare_warmup_s`` of untimed inference); measure the fastest batch again after the
            render; the bare FPS is the mean of the two. With a reduced precision, its
            generator is measured too once prepared (reported, not used in the ratio).
        batch_size: frames per generator call in the render; None: the config's (the
            pipeline's default, 4). Not the fastest bare batch: on 2 CPUs an INT8 render at
            batch 8 ran 1.43-1.48x bare FP32 against 1.51-1.58x at batch 4, although bare INT8
            measured up to 3 % faster at batch 8 (the larger batch's activations compete with
            the compositor for caches and memory).
        pause_every_s: insert one second of silence every this many seconds of speech (to
            measure silence passthrough); None: continuous speech.
    """
    from lipsync_ray.audio import synth_speech, write_audio
    from lipsync_ray.config import RenderConfig
    from lipsync_ray.models import Arch, Size, build_model, save_model
    from lipsync_ray.pipeline import Renderer, cluster_pool, prepare_generator
    from lipsync_ray.precision import Precision
    from lipsync_ray.synthetic import make_demo_avatar

    tmp = tempfile.TemporaryDirectory(prefix="lipsync-bench-", dir=work_root)
    root = Path(tmp.name)
    try:
        unet = _resolve_model(model, root)
        encoder = save_model(build_model(Arch.AUDIO_ENCODER, Size.FULL, seed=0), root / "enc.onnx")
        avatar = make_demo_avatar(root / "avatar", seconds=avatar_seconds, size_wh=size_wh)
        samples = synth_speech(seconds, seed=0)
        if pause_every_s:
            step = int(pause_every_s * 16_000)
            for start in range(step, len(samples), step + 16_000):
                samples[start : start + 16_000] = 0.0
        speech = write_audio(root / "speech.wav", samples)
        config = config or RenderConfig(model=str(unet), audio_encoder=str(encoder))
        config = replace(config, model=str(unet), audio_encoder=str(encoder), features=None)
        cpus = os.cpu_count() or 1
        # Sized as the render's pool will be (an embedded cluster is this machine), and bare
        # inference on the render's provider and batch, so the ratio means the same on a GPU.
        pool = config.pool.resolved(float(cpus), float(_local_gpus()))
        threads = max(1, round(pool.cpus_per_inference_actor or 1))
        bare_options = (
            config.session
            if pool.gpus_per_actor
            else replace(config.session, providers=(Provider.CPU,))
        )
        render_batch = batch_size or pool.batch_size
        batches = sorted({*batches, render_batch})
        bare_results: tuple[InferenceBench, ...] = ()
        best = None
        # The models and the avatar just written (~0.4 GB for 4 s at 720p) are still dirty in
        # the page cache: flush them now, or the kernel's writeback steals CPU from what is
        # measured next (it cost bare inference up to 40 % of its FPS here).
        os.sync()
        if bare:
            bare_results = tuple(
                bench_inference(
                    unet, batches, threads=threads, warmup_s=bare_warmup_s, options=bare_options,
                    allow_cpu_fallback=config.allow_cpu_fallback,
                )
            )  # fmt: skip
            best = max(bare_results, key=lambda r: r.fps)
        import ray

        from lipsync_ray.pipeline import init_ray

        owns_ray = not ray.is_initialized()
        t0 = time.perf_counter()
        if owns_ray:
            init_ray(ray, config.address)
        cluster_start_s = time.perf_counter() - t0
        try:
            precision_prepare_s = 0.0
            bare_reduced: tuple[InferenceBench, ...] = ()
            if config.precision is not Precision.FP32:  # with the pool the Renderer will use
                t0 = time.perf_counter()
                prepared = prepare_generator(config, cluster_pool(config.pool, ray), avatar.path)
                precision_prepare_s = time.perf_counter() - t0
                if bare and prepared.precision is not Precision.FP32:
                    bare_reduced = tuple(
                        bench_inference(
                            prepared.path, batches, threads=threads,
                            warmup_s=min(bare_warmup_s, 3.0),
                            options=prepared.session_options(bare_options),
                        )
                    )  # fmt: skip
            config = replace(config, pool=replace(config.pool, batch_size=render_batch))
            with ProcessTreeMonitor() as monitor:
                t0 = time.perf_counter()
                with Renderer(avatar.path, config) as renderer:
                    report = renderer.render(speech, root / "out.mp4")
                    # The render's own writeback is part of its cost, and left pending it
                    # would slow the bare measurement after it (by up to 40 % here).
                    os.sync()
                    wall = time.perf_counter() - t0
                    monitor._sample()  # the workers' CPU before they are killed
        finally:
            if owns_ray:
                ray.shutdown()
        frames = report.frames
        e2e = frames / wall
        after = None
        if best is not None:
            after = bench_inference(
                unet, [best.batch], threads=threads, warmup_s=min(bare_warmup_s, 3.0),
                options=bare_options, allow_cpu_fallback=True,
            )[0]  # fmt: skip
        bare_fps = (best.fps + after.fps) / 2 if best and after else 0.0
        return RenderBench(
            model=str(model),
            frames=frames,
            seconds=seconds,
            size_wh=tuple(size_wh),
            bare_fps=bare_fps,
            bare_batch=best.batch if best else render_batch,
            bare=bare_results,
            bare_after=after,
            e2e_fps=e2e,
            ratio=e2e / bare_fps if bare_fps else 0.0,
            wall_s=wall,
            stage_cpu_ms_per_frame=dict(report.stages.cpu_ms_per_frame),
            stage_wall_ms_per_frame=dict(report.stages.ms_per_frame),
            tree_cpu_ms_per_frame=1000.0 * monitor.cpu_s / frames,
            process_cpu_ms_per_frame={
                k: 1000.0 * v / frames for k, v in monitor.cpu_by_role().items()
            },
            cluster_start_s=cluster_start_s,
            precision_prepare_s=precision_prepare_s,
            bare_reduced=bare_reduced,
            render_batch=render_batch,
            peak_pss_mb=monitor.peak_pss_bytes / 2**20,
            peak_rss_mb=monitor.peak_rss_bytes / 2**20,
            frames_generated=report.frames_generated,
            precision=dict(report.precision),
            settings={
                **report.settings,
                "threads": threads,
                "cpus": cpus,
                "bare_warmup_s": bare_warmup_s if bare else 0.0,
            },
        )
    finally:
        tmp.cleanup()


def reference_pipeline(
    avatar_path: str | Path, frames: int, *, threads: int = 0, preset: str = "veryfast"
) -> dict[str, float]:
    """The threaded single-process pipeline users run today, without its model.

    Preloads every avatar frame in RAM, composites the identity prediction (the ROI itself) in
    a thread pool, writes one JPEG per frame, then reads them back and encodes one H.264 file
    (what `ffmpeg -i %d.jpg` does). Returns CPU and wall ms per frame and peak RSS; compare with
    :func:`bench_render` on the identity model (whose inference costs nothing).
    """
    import cv2
    import psutil

    from lipsync_ray.avatar import Avatar, pingpong_indices
    from lipsync_ray.composite import composite_frame
    from lipsync_ray.encode import EncodeOptions, encode_video

    threads = threads or os.cpu_count() or 1
    avatar = Avatar.open(avatar_path)
    proc = psutil.Process()
    c0, t0 = time.process_time(), time.perf_counter()
    everything = np.arange(avatar.frame_count)
    preloaded = [f.copy() for f in avatar.read_frames(everything)]
    crops = avatar.read_crops(everything)
    boxes = avatar.boxes(everything)
    order = pingpong_indices(frames, avatar.frame_count)
    with tempfile.TemporaryDirectory(prefix="lipsync-reference-") as tmp:

        def one(i: int) -> None:
            j = order[i]
            pred = crops[j][4:324, 4:324]  # the identity model's output
            out = composite_frame(preloaded[j], boxes[j], crops[j], pred)
            cv2.imwrite(f"{tmp}/{i:08d}.jpg", out, [cv2.IMWRITE_JPEG_QUALITY, 95])

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, range(frames)))
        peak_rss = proc.memory_info().rss
        jpegs = (cv2.imread(f"{tmp}/{i:08d}.jpg") for i in range(frames))
        encode_video(jpegs, None, 16_000, Path(tmp) / "out.mp4",
                     EncodeOptions(preset=preset), expected_frames=frames)  # fmt: skip
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    return {
        "frames": frames,
        "cpu_ms_per_frame": 1000.0 * cpu / frames,
        "wall_ms_per_frame": 1000.0 * wall / frames,
        "fps": frames / wall,
        "peak_rss_mb": max(peak_rss, proc.memory_info().rss) / 2**20,
    }
