"""Benchmarks as programs: every speed claim is a ratio measured in one run on one machine.

- :func:`bench_inference`: bare ONNX Runtime generator FPS per batch size (the denominator).
- :func:`bench_render`: ``lipsync-ray render`` of generated footage (a photographed face by
  default) with S seconds of speech, run as a process and timed from its start to its exit,
  next to the bare FPS of the same model (one session, best batch) measured in the same run,
  with per-stage CPU, the phases of its wall time and the peak memory of the whole process
  tree (driver, raylet, workers); optionally beside ``lipsync-ray reference``, the
  single-process scripts it replaces (:mod:`lipsync_ray.dev.reference`), on the same footage.

``bench encode`` is :mod:`lipsync_ray.dev.bench_encode`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from lipsync_ray.dev.cpu_budget import chunks_window, cpu_table, split_periods
from lipsync_ray.errors import InputError
from lipsync_ray.flags import render_argv
from lipsync_ray.inference import (
    GeneratorSession,
    Provider,
    SessionOptions,
    gpu_fallback_reason,
    requires_gpu,
)

__all__ = [
    "InferenceBench",
    "ProcessRun",
    "RenderBench",
    "bench_inference",
    "bench_render",
    "run_process",
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
            from lipsync_ray.quantize import convert_fp16

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


_PROVISIONAL_ROLES = ("ray (other)", "ray::IDLE")
# Ray's Python daemons by the script they run (the head node's, started by ray.init).
_RAY_SCRIPTS = {
    "log_monitor.py": "ray log monitor",
    "monitor.py": "ray autoscaler monitor",
    "dashboard.py": "ray dashboard",
}


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
    The process tree is listed again every ``list_every``-th sample (default: with PSS; a worker
    that starts between listings is first seen at the next one).
    """

    def __init__(
        self,
        pid: int | None = None,
        interval_s: float = 0.5,
        pss_every: int = 8,
        list_every: int | None = None,
    ) -> None:
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
        self.list_every = list_every or pss_every
        self._samples = 0
        self._procs: list = []
        self.monitor_cpu_s = 0.0  # the sampling thread's own CPU time
        # (epoch seconds, the sampling thread's CPU so far, {pid: CPU seconds}) per sample
        self._history: list[tuple[float, float, dict[int, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _tree(self):
        try:
            return [self.root, *self.root.children(recursive=True)]
        except self._psutil.Error:
            return [self.root]

    def _sample(self) -> None:
        t0 = time.thread_time()
        at = time.time()
        pss = rss = 0
        full = self._samples % self.pss_every == 0
        self._samples += 1
        listing = (self._samples - 1) % self.list_every == 0
        if listing or not self._procs:  # listing the tree scans every process on the machine
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
            if self._role.get(proc.pid, "ray (other)") in _PROVISIONAL_ROLES:
                # A worker is "python default_worker.py", then "ray::IDLE", then its actor
                # class: its role is read again until it names an actor.
                self._role[proc.pid] = self._role_of(proc)
        self._history.append((at, self.monitor_cpu_s, dict(self._cpu)))
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
        return total - self._own_cpu_s()

    def _own_cpu_s(self) -> float:
        """The sampling thread's CPU where it is part of the measured tree (its root is this
        process), else 0."""
        return self.monitor_cpu_s if self.root.pid == os.getpid() else 0.0

    def cpu_by_role(self) -> dict[str, float]:
        """CPU seconds since the monitor started per kind of process: "driver", an actor
        class ("ray::InferenceActor"), "raylet", "gcs_server", or "ray (other)" (agents,
        log monitor)."""
        return self._by_role(self._cpu, self.monitor_cpu_s)

    def cpu_by_role_history(self) -> list[tuple[float, dict[str, float]]]:
        """:meth:`cpu_by_role` as it stood at each sample, (epoch seconds, {role: CPU
        seconds}), with every process under the role it was last seen with (a worker that
        became an actor counts as that actor from its start)."""
        return [(at, self._by_role(cpu, own)) for at, own, cpu in self._history]

    def _by_role(self, cpu: dict[int, float], monitor_cpu_s: float) -> dict[str, float]:
        own = monitor_cpu_s if self.root.pid == os.getpid() else 0.0
        out: dict[str, float] = {"monitor": own}
        for pid, v in cpu.items():
            role = self._role.get(pid, "ray (other)")
            out[role] = out.get(role, 0.0) + v - self._base.get(pid, 0.0)
        out["driver"] = out.get("driver", 0.0) - own
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
            # "ray::InferenceActor.infer" -> the class; Ray's agents are "ray::DashboardAgent"
            # and "ray::RuntimeEnvAgent", a worker between tasks "ray::IDLE"
            return first.split(".")[0].split()[0]
        name = Path(first).name
        if name in ("raylet", "gcs_server"):
            return name
        script = next((Path(a).name for a in args[1:3] if a.endswith(".py")), "")
        if script == "default_worker.py":  # a worker not yet named by its first task
            return "ray::IDLE"
        return _RAY_SCRIPTS.get(script, "ray (other)")


@dataclass(frozen=True)
class ProcessRun:
    """One command line run as a user runs it: timed from its start to its exit, with the CPU
    and memory of its whole process tree (driver, Ray's processes, workers)."""

    argv: tuple[str, ...]
    wall_s: float  # start to exit
    cpu_s: float  # the whole tree, the monitor's own left out
    cpu_by_role_s: dict[str, float]
    peak_pss_mb: float
    peak_rss_mb: float
    started_at: float  # epoch seconds
    exited_at: float
    stdout: str
    # cpu_by_role_s as it stood at each sample of the monitor: (epoch seconds, {role: s})
    cpu_by_role_history: tuple[tuple[float, dict[str, float]], ...] = ()


def run_process(argv: Sequence[str], *, log_path: Path, env: dict | None = None) -> ProcessRun:
    """Run ``argv`` to its end under a :class:`ProcessTreeMonitor`; its stderr goes to
    ``log_path``. Raises RuntimeError (with the log's last lines) when it fails."""
    import subprocess

    with open(log_path, "wb") as err:
        started = time.time()
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=err, env=env)
        # Listed every second: a short render's actors live only a few seconds.
        with ProcessTreeMonitor(proc.pid, list_every=2) as monitor:
            out, _ = proc.communicate()
            wall = time.perf_counter() - t0
        exited = time.time()
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
        raise RuntimeError(f"{argv[3:5]} exited {proc.returncode}: " + " | ".join(tail))
    return ProcessRun(
        argv=tuple(argv),
        wall_s=wall,
        cpu_s=monitor.cpu_s,
        cpu_by_role_s=monitor.cpu_by_role(),
        peak_pss_mb=monitor.peak_pss_bytes / 2**20,
        peak_rss_mb=monitor.peak_rss_bytes / 2**20,
        started_at=started,
        exited_at=exited,
        stdout=out.decode(errors="replace"),
        cpu_by_role_history=tuple(monitor.cpu_by_role_history()),
    )


@dataclass(frozen=True)
class RenderBench:
    """One benchmark run: ``lipsync-ray render`` as a process, bare inference of the same model
    beside it, and (optionally) the single-process reference on the same footage."""

    model: str
    avatar: str  # "photo" (a photographed face, moving, with sensor noise) or "drawn"
    frames: int
    seconds: float
    size_wh: tuple[int, int]
    # Bare inference: one session (every CPU thread; on a GPU the actor's), at the best batch:
    # the mean of a measurement before the render (every batch in ``bare``) and one after it at
    # that batch (``bare_after``). Shared cloud CPUs drift (the same bare benchmark measured
    # 6 to 12.6 FPS within minutes on the 2-core CI machine), so one measurement on one side
    # of a render would tilt the ratio either way.
    bare_fps: float
    bare_batch: int
    bare: tuple[InferenceBench, ...]
    bare_after: InferenceBench | None
    # frames / wall time of the whole `lipsync-ray render` process, start to exit: Python's
    # start and imports, the embedded Ray cluster's start, actors and sessions, features,
    # every chunk, the join, and the shutdown.
    e2e_fps: float
    ratio: float  # e2e_fps / bare_fps
    wall_s: float
    # Where the wall time went: "before_render" (interpreter, imports, arguments, model and
    # avatar checks), the render's own phases (RunReport.phases_s: inputs, start with
    # ray_init inside it, actors_ready, chunks, join) and "shutdown" (report to exit).
    phases_s: dict[str, float]
    stage_cpu_ms_per_frame: dict[str, float]
    stage_wall_ms_per_frame: dict[str, float]
    tree_cpu_ms_per_frame: float  # all processes: driver, raylet, GCS, workers
    process_cpu_ms_per_frame: dict[str, float]  # the same, per kind of process
    cluster_start_s: float  # the embedded cluster's start-up inside the render ("ray_init")
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
    # The single-process references (lipsync_ray.dev.reference) on the same footage and model,
    # each as a process, by style ("jpeg", "threaded"): {"style", "wall_s", "fps",
    # "cpu_ms_per_frame", "peak_rss_mb", "phases_s", ...}. ``reference`` is the faster of them,
    # and its wall over the render's is ``speedup``. Empty without ``reference``.
    reference: dict = field(default_factory=dict)
    references: dict = field(default_factory=dict)
    speedup: float = 0.0
    settings: dict = field(default_factory=dict)
    # Where the tree's CPU went, by process and stage, start-up apart from the steady state
    # (lipsync_ray.dev.cpu_budget.CpuTable.to_dict).
    cpu_table: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


AVATARS = ("photo", "drawn")


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
    from lipsync_ray.dev.models import Arch, Size, build_model, save_model

    if model in ("full", "small", "identity"):
        arch = Arch.IDENTITY if model == "identity" else Arch.UNET328
        size = Size.SMALL if model == "small" else Size.FULL
        return save_model(build_model(arch, size, seed=0), root / f"unet-{model}.onnx")
    return Path(model)


def _make_avatar(kind: str, path: Path, seconds: float, size_wh: tuple[int, int]):
    from lipsync_ray.dev.synthetic import make_demo_avatar, make_photo_avatar
    from lipsync_ray.errors import InputError

    if kind == "photo":
        return make_photo_avatar(path, seconds=seconds, size_wh=size_wh)
    if kind == "drawn":
        return make_demo_avatar(path, seconds=seconds, size_wh=size_wh)
    raise InputError(f"avatar must be one of {', '.join(AVATARS)}, got {kind!r}")


def _cli(*args: str) -> list[str]:
    import sys

    return [sys.executable, "-m", "lipsync_ray.cli", *args]


# Both scripts the render is measured against (lipsync_ray.dev.reference.ReferenceStyle).
REFERENCE_STYLES = ("jpeg", "threaded")


def _run_reference(
    style: str, avatar: Path, speech: Path, out: Path, unet: Path, encoder: Path, config,
    *, log_path: Path,
) -> dict:  # fmt: skip
    """``lipsync-ray reference --style STYLE`` as a process, timed from start to exit."""
    import json

    run = run_process(
        _cli(
            "reference", str(avatar), str(speech), "-o", str(out), "--style", style,
            "--model", str(unet), "--audio-encoder", str(encoder),
            *render_argv(config, ["--crf", "--preset", "--x264-params"]),
        ),
        log_path=log_path,
    )  # fmt: skip
    inner = json.loads(run.stdout.strip().splitlines()[-1])
    return {
        "style": style,
        "wall_s": run.wall_s,
        "fps": inner["frames"] / run.wall_s,
        "frames": inner["frames"],
        "cpu_ms_per_frame": 1000.0 * run.cpu_s / inner["frames"],
        "peak_rss_mb": run.peak_rss_mb,
        "phases_s": {"before_run": run.wall_s - inner["wall_s"], **inner["phases_s"]},
        "provider": inner["provider"],
    }


def bench_render(
    model: str = "full",
    seconds: float = 60.0,
    *,
    config=None,
    avatar: str = "photo",
    avatar_seconds: float = 4.0,
    size_wh: tuple[int, int] = (1280, 720),
    batches: Sequence[int] = (1, 4, 8),
    work_root: str | Path | None = None,
    bare: bool = True,
    batch_size: int | None = None,
    pause_every_s: float | None = None,
    bare_warmup_s: float = 10.0,
    reference: bool = False,
) -> RenderBench:
    """Run ``lipsync-ray render`` on generated footage with ``seconds`` of speech, as a user
    runs it (a process, timed from start to exit); measure it against bare inference and,
    with ``reference``, against the single-process reference on the same footage.

    Args:
        model: "full", "small", "identity" (stand-ins built here) or an ONNX path.
        seconds: audio length.
        config: a :class:`~lipsync_ray.config.RenderConfig` to start from (model paths are
            replaced); None: the defaults.
        avatar: "photo" (default: a photographed face moving with sensor noise, what real
            footage costs the encoder) or "drawn" (the demo's flat drawn face).
        bare: measure bare inference first (on a GPU the actor's threads, on the CPU every
            CPU; batches ``batches`` and the render's, after
            ``bare_warmup_s`` of untimed inference); measure the fastest batch again after the
            render; the bare FPS is the mean of the two. With a reduced precision, its
            generator is measured too once prepared (reported, not used in the ratio).
        batch_size: frames per generator call in the render; None: the config's (the
            pipeline's default: 1 per single-threaded session on the CPU). Not the fastest
            bare batch: bare runs one session with every thread, the render one per CPU.
        pause_every_s: insert one second of silence every this many seconds of speech (to
            measure silence passthrough); None: continuous speech.
        reference: also run ``lipsync-ray reference`` (lipsync_ray.dev.reference) in both
            styles on the same avatar, audio and model, with the render's preset, CRF and x264
            options; ``speedup`` is against the faster.
    """
    import json

    from lipsync_ray.config import RenderConfig
    from lipsync_ray.dev.models import Arch, Size, build_model, save_model
    from lipsync_ray.dev.speech import synth_speech, write_audio
    from lipsync_ray.pools import prepare_generator
    from lipsync_ray.precision import Precision
    from lipsync_ray.workdir.layout import report_path

    tmp = tempfile.TemporaryDirectory(prefix="lipsync-bench-", dir=work_root)
    root = Path(tmp.name)
    try:
        unet = _resolve_model(model, root)
        encoder = save_model(build_model(Arch.AUDIO_ENCODER, Size.FULL, seed=0), root / "enc.onnx")
        bundle = _make_avatar(avatar, root / "avatar", avatar_seconds, size_wh)
        samples = synth_speech(seconds, seed=0)
        if pause_every_s:
            step = int(pause_every_s * 16_000)
            for start in range(step, len(samples), step + 16_000):
                samples[start : start + 16_000] = 0.0
        speech = write_audio(root / "speech.wav", samples)
        config = config or RenderConfig(model=str(unet), audio_encoder=str(encoder))
        config = replace(
            config,
            model=str(unet),
            audio_encoder=str(encoder),
            features=None,
            work_dir=str(root / "work"),
        )
        if batch_size:
            config = replace(config, pool=replace(config.pool, batch_size=batch_size))
        cpus = os.cpu_count() or 1
        # Sized as the render's pool will be (an embedded cluster is this machine), and bare
        # inference on the render's provider and batch, so the ratio means the same on a GPU.
        # On the CPU the render runs one single-threaded session per CPU; bare is what one
        # session does with every CPU (what a script running the model alone gets).
        pool = config.pool.resolved(float(cpus), float(_local_gpus()))
        threads = max(1, round(pool.cpus_per_inference_actor or 1)) if pool.gpus_per_actor else cpus
        bare_options = (
            config.session
            if pool.gpus_per_actor
            else replace(config.session, providers=(Provider.CPU,))
        )
        render_batch = pool.batch_size
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
        precision_prepare_s = 0.0
        bare_reduced: tuple[InferenceBench, ...] = ()
        if config.precision is not Precision.FP32:  # cached where the render will find it
            t0 = time.perf_counter()
            prepared = prepare_generator(config, pool, bundle.path)
            precision_prepare_s = time.perf_counter() - t0
            if bare and prepared.precision is not Precision.FP32:
                bare_reduced = tuple(
                    bench_inference(
                        prepared.path, batches, threads=threads,
                        warmup_s=min(bare_warmup_s, 3.0),
                        options=prepared.session_options(bare_options),
                    )
                )  # fmt: skip
            os.sync()
        out = root / "out.mp4"
        run = run_process(
            _cli("render", str(bundle.path), str(speech), "-o", str(out), *render_argv(config)),
            log_path=root / "render.log",
        )
        # The render's writeback is part of its cost, and left pending it would slow what is
        # measured after it (by up to 40 % here).
        os.sync()
        report = json.loads(report_path(root / "work").read_text())
        frames = report["frames"]
        phases = {k: v for k, v in report["phases_s"].items() if not k.endswith("_at")}
        phases = {
            "before_render": report["phases_s"]["started_at"] - run.started_at,
            **phases,
            "shutdown": run.exited_at - report["phases_s"]["finished_at"],
        }
        table = cpu_table(
            split_periods(
                run.cpu_by_role_history, run.cpu_by_role_s, *chunks_window(report["phases_s"])
            ),
            report["stages"]["cpu_ms_per_frame"],
            frames,
        )
        references: dict[str, dict] = {}
        if reference:
            for style in REFERENCE_STYLES:
                references[style] = _run_reference(
                    style, bundle.path, speech, root / f"ref-{style}.mp4", unet, encoder, config,
                    log_path=root / f"reference-{style}.log",
                )  # fmt: skip
                os.sync()
        ref = min(references.values(), key=lambda r: r["wall_s"]) if references else {}
        after = None
        if best is not None:
            after = bench_inference(
                unet, [best.batch], threads=threads, warmup_s=min(bare_warmup_s, 3.0),
                options=bare_options, allow_cpu_fallback=True,
            )[0]  # fmt: skip
        bare_fps = (best.fps + after.fps) / 2 if best and after else 0.0
        e2e = frames / run.wall_s
        return RenderBench(
            model=str(model),
            avatar=avatar,
            frames=frames,
            seconds=seconds,
            size_wh=tuple(size_wh),
            bare_fps=bare_fps,
            bare_batch=best.batch if best else render_batch,
            bare=bare_results,
            bare_after=after,
            e2e_fps=e2e,
            ratio=e2e / bare_fps if bare_fps else 0.0,
            wall_s=run.wall_s,
            phases_s=phases,
            stage_cpu_ms_per_frame=dict(report["stages"]["cpu_ms_per_frame"]),
            stage_wall_ms_per_frame=dict(report["stages"]["ms_per_frame"]),
            tree_cpu_ms_per_frame=1000.0 * run.cpu_s / frames,
            process_cpu_ms_per_frame={k: 1000.0 * v / frames for k, v in run.cpu_by_role_s.items()},
            cluster_start_s=float(phases.get("ray_init", 0.0)),
            precision_prepare_s=precision_prepare_s,
            bare_reduced=bare_reduced,
            render_batch=render_batch,
            peak_pss_mb=run.peak_pss_mb,
            peak_rss_mb=run.peak_rss_mb,
            frames_generated=report["frames_generated"],
            precision=dict(report["precision"]),
            reference=ref,
            references=references,
            speedup=ref["wall_s"] / run.wall_s if ref else 0.0,
            settings={
                **report["settings"],
                "threads": threads,
                "cpus": cpus,
                "bare_warmup_s": bare_warmup_s if bare else 0.0,
            },
            cpu_table=table.to_dict(),
        )
    finally:
        tmp.cleanup()
