"""``lipsync-ray bench serve``: the render service (``lipsync-ray serve``) measured in one run,
through :class:`lipsync_ray.client.ServiceClient` as a user's program would call it.

On the footage and models ``bench render`` builds (:mod:`lipsync_ray.dev.bench`: a stand-in
model, the photographed avatar), it runs:

1. ``lipsync-ray render`` of one clip of ``concurrent x concurrent_seconds`` as a process,
   timed from start to exit (what the service is for: that fixed cost on every clip);
2. ``lipsync-ray serve`` as a process in a session of its own (a free loopback port, the
   state directory in a temporary directory, the token in its environment), until it prints
   ``serving on URL``;
3. against it: (a) one warm-up clip, then ``clips`` 1-s clips one after another, each timed from
   the submit call to the downloaded MP4 (p50, p95); (b) one job of the same length as the
   render of step 1, then ``concurrent`` clips of ``concurrent_seconds`` submitted at once:
   their aggregate FPS (every frame / first submit to last download) against that one job's
   FPS (its chunks phase, and its frames over submit to download) and against the whole
   ``render`` process; (c) a 1-s clip submitted ``short_after_s``
   into a ``long_seconds`` render: its latency, and the long job's total;
4. stops the service (SIGINT to its process group, the drain; SIGTERM, then SIGKILL, if it
   does not end), also after an error or Ctrl-C. Nothing else is stopped.

The one job's FPS is its chunks phase from its run report when the service keeps one in its
state directory (``report.json``, as every render writes), else ``JobStatus.fps`` (its frames
over its running time); ``single_job_fps_source`` says which.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from lipsync_ray.client import TOKEN_ENV, JobStatus, ServiceClient
from lipsync_ray.errors import InputError

__all__ = [
    "ServeBench",
    "ServeInputs",
    "ServiceMeasurements",
    "ServiceProcess",
    "bench_serve",
    "check_settings",
    "format_serve_bench",
    "measure_service",
    "percentile",
    "summarize",
]

log = logging.getLogger(__name__)

AVATAR_NAME = "bench"  # the avatar's name in the service's AVATARS_DIR
POLL_S = 0.05  # status polls while a 1-s clip renders: the latency's resolution
# Status polls of the longer jobs (the one job, the concurrent clips, the long render): every
# poll is an HTTP request through Serve's proxy to the replica; six clients polling every
# 0.05 s cost the 2-CPU machine a third of a core that the render then lacks. A user's client
# polls every 0.5 s (ServiceClient's default); 0.25 s keeps these walls within ~2 %.
THROUGHPUT_POLL_S = 0.25


def check_settings(
    *, clips: int, concurrent: int, concurrent_seconds: float, long_seconds: float,
    short_after_s: float = 5.0,
) -> None:  # fmt: skip
    """InputError, expected vs got, for settings that cannot measure what they should."""
    if isinstance(clips, bool) or not isinstance(clips, int) or clips < 1:
        raise InputError(f"--clips must be an integer >= 1, got {clips!r}")
    if isinstance(concurrent, bool) or not isinstance(concurrent, int) or concurrent < 1:
        raise InputError(f"--concurrent must be an integer >= 1, got {concurrent!r}")
    if not (math.isfinite(concurrent_seconds) and concurrent_seconds > 0):
        raise InputError(f"--concurrent-seconds must be > 0, got {concurrent_seconds!r}")
    if not (math.isfinite(long_seconds) and long_seconds > short_after_s + 1.0):
        raise InputError(
            f"--long-seconds must be > {short_after_s + 1.0:g} (the 1-s clip is sent "
            f"{short_after_s:g} s into it and should end before it), got {long_seconds!r}"
        )


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by linear interpolation between the closest ranks
    (numpy's default method)."""
    if not values:
        raise InputError("percentile of no values")
    if not 0 <= q <= 100:
        raise InputError(f"percentile must be 0-100, got {q!r}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


# ------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class ServiceMeasurements:
    """What :func:`measure_service` timed against a running service."""

    warmup_s: float  # the first clip, not counted
    latencies_s: tuple[float, ...]  # each 1-s clip: submit call to downloaded MP4
    single_job_frames: int
    single_job_fps: float
    single_job_fps_source: str  # "report.json chunks phase" or "JobStatus.fps"
    concurrent_frames: int  # every frame of the concurrent clips
    concurrent_wall_s: float  # first submit to last download
    short_latency_s: float  # the 1-s clip sent into the long render
    long_total_s: float  # the long render: submit to downloaded MP4
    short_finished_first: bool
    # the one job as a client lives it: submit call to downloaded MP4 (features, chunks, join)
    single_job_wall_s: float = 0.0


@dataclass(frozen=True)
class ServeBench:
    """One ``bench serve`` run: the figures, the ratios and the settings."""

    model: str
    avatar: str
    size_wh: tuple[int, int]
    service_start_s: float  # the `serve` process's start to "serving on"
    # (a) warm latency of 1-s clips
    clips: int
    warmup_s: float
    latencies_s: tuple[float, ...]
    p50_s: float
    p95_s: float
    # (b) concurrent clips against one job and one `render` process of the same frames
    concurrent: int
    concurrent_seconds: float
    concurrent_frames: int
    concurrent_wall_s: float
    concurrent_fps: float
    single_job_frames: int
    single_job_fps: float
    single_job_fps_source: str
    cli_render_frames: int
    cli_render_wall_s: float  # `lipsync-ray render`, the whole process
    cli_render_fps: float
    ratio_vs_single_job: float  # concurrent_fps / single_job_fps
    ratio_vs_cli_render: float  # concurrent_fps / cli_render_fps
    # (c) a short clip during a long render
    long_seconds: float
    short_after_s: float
    short_latency_s: float
    long_total_s: float
    short_finished_first: bool
    settings: dict = field(default_factory=dict)
    # the one job from submit to download, and the concurrent clips' FPS over its FPS
    single_job_wall_s: float = 0.0
    single_job_wall_fps: float = 0.0
    ratio_vs_single_job_wall: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(
    m: ServiceMeasurements, *, model: str, avatar: str, size_wh: tuple[int, int],
    service_start_s: float, concurrent: int, concurrent_seconds: float, long_seconds: float,
    short_after_s: float, cli_render_frames: int, cli_render_wall_s: float,
    settings: dict | None = None,
) -> ServeBench:  # fmt: skip
    """The figures and ratios of one run's measurements."""
    concurrent_fps = m.concurrent_frames / m.concurrent_wall_s if m.concurrent_wall_s else 0.0
    cli_fps = cli_render_frames / cli_render_wall_s if cli_render_wall_s else 0.0
    wall_fps = m.single_job_frames / m.single_job_wall_s if m.single_job_wall_s else 0.0
    return ServeBench(
        model=model, avatar=avatar, size_wh=tuple(size_wh), service_start_s=service_start_s,
        clips=len(m.latencies_s), warmup_s=m.warmup_s, latencies_s=tuple(m.latencies_s),
        p50_s=percentile(m.latencies_s, 50), p95_s=percentile(m.latencies_s, 95),
        concurrent=concurrent, concurrent_seconds=concurrent_seconds,
        concurrent_frames=m.concurrent_frames, concurrent_wall_s=m.concurrent_wall_s,
        concurrent_fps=concurrent_fps, single_job_frames=m.single_job_frames,
        single_job_fps=m.single_job_fps, single_job_fps_source=m.single_job_fps_source,
        cli_render_frames=cli_render_frames, cli_render_wall_s=cli_render_wall_s,
        cli_render_fps=cli_fps,
        ratio_vs_single_job=concurrent_fps / m.single_job_fps if m.single_job_fps else 0.0,
        ratio_vs_cli_render=concurrent_fps / cli_fps if cli_fps else 0.0,
        long_seconds=long_seconds, short_after_s=short_after_s,
        short_latency_s=m.short_latency_s, long_total_s=m.long_total_s,
        short_finished_first=m.short_finished_first, settings=dict(settings or {}),
        single_job_wall_s=m.single_job_wall_s, single_job_wall_fps=wall_fps,
        ratio_vs_single_job_wall=concurrent_fps / wall_fps if wall_fps else 0.0,
    )  # fmt: skip


def format_serve_bench(r: ServeBench) -> str:
    """``bench serve``'s table (what the command prints)."""
    total_s = r.concurrent * r.concurrent_seconds
    rows = [
        ("service start (process to `serving on`)", f"{r.service_start_s:.1f} s"),
        (f"1-s clip, warm: p50 / p95 of {r.clips} (after 1 warm-up)",
         f"{r.p50_s:.2f} s / {r.p95_s:.2f} s"),
        ("  min / max", f"{min(r.latencies_s):.2f} s / {max(r.latencies_s):.2f} s"),
        (f"{r.concurrent} concurrent {r.concurrent_seconds:g}-s clips",
         f"{r.concurrent_fps:.2f} FPS ({r.concurrent_frames} frames in "
         f"{r.concurrent_wall_s:.1f} s)"),
        (f"one service job of {total_s:g} s ({r.single_job_fps_source})",
         f"{r.single_job_fps:.2f} FPS ({r.single_job_frames} frames)"),
        ("  concurrent / one job", f"{r.ratio_vs_single_job:.2f}x"),
        (f"one service job of {total_s:g} s (submit to download)",
         f"{r.single_job_wall_fps:.2f} FPS ({r.single_job_wall_s:.1f} s)"),
        ("  concurrent / one job, submit to download", f"{r.ratio_vs_single_job_wall:.2f}x"),
        (f"`lipsync-ray render` of {total_s:g} s (whole process)",
         f"{r.cli_render_fps:.2f} FPS ({r.cli_render_wall_s:.1f} s)"),
        ("  concurrent / render", f"{r.ratio_vs_cli_render:.2f}x"),
        (f"1-s clip sent {r.short_after_s:g} s into a {r.long_seconds:g}-s render",
         f"{r.short_latency_s:.2f} s ({'before' if r.short_finished_first else 'AFTER'} "
         "the long one)"),
        (f"the {r.long_seconds:g}-s render (submit to download)", f"{r.long_total_s:.1f} s"),
    ]  # fmt: skip
    width = max(len(name) for name, _ in rows)
    head = (f"== bench serve: {r.model} model, {r.avatar} avatar "
            f"{r.size_wh[0]}x{r.size_wh[1]} ==")  # fmt: skip
    return "\n".join([head, *(f"{name:<{width}}  {value}" for name, value in rows)])


# ------------------------------------------------------------------------- the measuring


@dataclass(frozen=True)
class ServeInputs:
    """The audio files of one run, and the avatar's name on the service."""

    avatar: str
    warmup: Path  # 1 s
    clips: tuple[Path, ...]  # 1 s each
    single: Path  # concurrent x concurrent_seconds
    concurrent: tuple[Path, ...]  # concurrent_seconds each
    long: Path  # long_seconds
    short: Path  # 1 s


def _timed_render(
    client: ServiceClient, avatar: str, audio: Path, out: Path, poll_s: float = POLL_S
):
    """(seconds from the submit call to the downloaded MP4, final status, end time)."""
    t0 = time.perf_counter()
    status = client.render(avatar, audio, out, poll_s=poll_s)
    end = time.perf_counter()
    return end - t0, status, end


def measure_service(
    client: ServiceClient,
    inputs: ServeInputs,
    out_dir: Path,
    *,
    short_after_s: float = 5.0,
    job_fps: Callable[[JobStatus], tuple[float, str]] | None = None,
) -> ServiceMeasurements:
    """Time (a), (b) and (c) of the module's docstring against a running service; the MP4s
    go to ``out_dir``. ``job_fps(status)`` gives a done job's FPS and where it comes from
    (default: ``JobStatus.fps``)."""
    job_fps = job_fps or (lambda status: (status.fps or 0.0, "JobStatus.fps"))
    avatar = inputs.avatar
    warmup_s, _, _ = _timed_render(client, avatar, inputs.warmup, out_dir / "warmup.mp4")
    latencies = []
    for i, clip in enumerate(inputs.clips):
        seconds, _, _ = _timed_render(client, avatar, clip, out_dir / f"clip-{i}.mp4")
        latencies.append(seconds)
        log.info("1-s clip %d: %.2f s", i, seconds)

    single_s, single, _ = _timed_render(
        client, avatar, inputs.single, out_dir / "single.mp4", THROUGHPUT_POLL_S
    )
    single_fps, source = job_fps(single)
    log.info("one job of %d frames: %.2f FPS (%s)", single.frames_total or 0, single_fps, source)

    start = threading.Barrier(len(inputs.concurrent))
    first_submit: list[float] = []

    def one(i: int):
        start.wait()
        first_submit.append(time.perf_counter())
        out = out_dir / f"conc-{i}.mp4"
        return _timed_render(client, avatar, inputs.concurrent[i], out, THROUGHPUT_POLL_S)

    with ThreadPoolExecutor(len(inputs.concurrent)) as pool:
        results = list(pool.map(one, range(len(inputs.concurrent))))
    concurrent_frames = sum(status.frames_total or 0 for _, status, _ in results)
    concurrent_wall = max(end for _, _, end in results) - min(first_submit)

    t0 = time.perf_counter()
    long_job = client.submit(avatar, inputs.long)
    time.sleep(max(0.0, t0 + short_after_s - time.perf_counter()))
    short_latency, short, _ = _timed_render(client, avatar, inputs.short, out_dir / "s.mp4")
    long_done = client.wait(long_job.id, poll_s=THROUGHPUT_POLL_S)
    client.download(long_job.id, out_dir / "long.mp4")
    long_total = time.perf_counter() - t0
    log.info("short clip %.2f s into the long render; long render %.1f s", short_latency,
             long_total)  # fmt: skip
    return ServiceMeasurements(
        warmup_s=warmup_s,
        latencies_s=tuple(latencies),
        single_job_frames=single.frames_total or 0,
        single_job_fps=single_fps,
        single_job_fps_source=source,
        concurrent_frames=concurrent_frames,
        concurrent_wall_s=concurrent_wall,
        short_latency_s=short_latency,
        long_total_s=long_total,
        # The service's own clock: when each job finished, not when a poll saw it.
        short_finished_first=(short.finished_at or math.inf) < (long_done.finished_at or 0.0),
        single_job_wall_s=single_s,
    )


def report_fps(state_dir: Path) -> Callable[[JobStatus], tuple[float, str]]:
    """A ``job_fps`` for :func:`measure_service`: the chunks phase of the job's run report
    in the service's state directory (a ``report.json`` under a directory named with its id),
    else ``JobStatus.fps``."""
    from lipsync_ray.workdir.layout import REPORT

    def fps(status: JobStatus) -> tuple[float, str]:
        for path in state_dir.rglob(REPORT):
            if status.id not in str(path.relative_to(state_dir)):
                continue
            try:
                report = json.loads(path.read_text())
                chunks_s = float(report["phases_s"]["chunks"])
                if chunks_s > 0:
                    return report["frames"] / chunks_s, f"{REPORT} chunks phase"
            except (OSError, ValueError, KeyError, TypeError):
                break
        return status.fps or 0.0, "JobStatus.fps"

    return fps


# --------------------------------------------------------------------- the service process


def free_port() -> int:
    """A TCP port free on loopback now (the service binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServiceProcess:
    """``argv`` (a service) run in a session of its own, its output (stdout and stderr) copied
    to ``log_path``; ready once a line says ``serving on URL``. Stopping signals its process
    group only: SIGINT (the service drains), then SIGTERM, then SIGKILL."""

    def __init__(
        self, argv: Sequence[str], *, log_path: Path, env: dict | None = None,
        ready_timeout_s: float = 600.0, stop_timeout_s: float = 60.0,
    ) -> None:  # fmt: skip
        self.argv = list(argv)
        self.log_path = log_path
        self.env = env
        self.ready_timeout_s = ready_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.url: str | None = None
        self.start_s = 0.0  # process start to ready
        self._ready = threading.Event()
        self._proc: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def __enter__(self) -> ServiceProcess:
        t0 = time.perf_counter()
        self._proc = subprocess.Popen(
            self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=self.env,
            start_new_session=True,  # its own process group: stopped alone, and Ctrl-C in
            # this terminal reaches the benchmark, which stops it in order
        )  # fmt: skip
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:
            while not self._ready.wait(0.1):
                if self._proc.poll() is not None:
                    raise RuntimeError(
                        f"the service exited {self._proc.returncode} before it was ready: "
                        f"{self._tail()}"
                    )
                if time.perf_counter() - t0 > self.ready_timeout_s:
                    raise RuntimeError(
                        f"the service was not ready after {self.ready_timeout_s:g} s: "
                        f"{self._tail()}"
                    )
        except BaseException:
            self.stop()
            raise
        self.start_s = time.perf_counter() - t0
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        with open(self.log_path, "wb") as out:
            for line in self._proc.stdout:
                out.write(line)
                out.flush()
                text = line.decode(errors="replace")
                if self.url is None and "serving on " in text:
                    self.url = text.split("serving on ", 1)[1].split()[0].rstrip(".,;")
                    self._ready.set()

    def _tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            lines = []
        return " | ".join(lines[-5:]) or "(no output)"

    def stop(self) -> int | None:
        """Stop the service's process group (idempotent); its exit code."""
        proc = self._proc
        if proc is None:
            return None
        for sig, wait_s in ((signal.SIGINT, self.stop_timeout_s), (signal.SIGTERM, 10.0),
                            (signal.SIGKILL, 10.0)):  # fmt: skip
            if proc.poll() is not None:
                break
            try:
                os.killpg(proc.pid, sig)  # the group is the process's own (a new session)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                log.warning("the service (pid %d) did not stop on %s", proc.pid, sig.name)
        if proc.poll() is None:  # SIGKILL'd and still not reaped: wait for it
            proc.wait()
        if self._reader is not None:
            self._reader.join(timeout=10)
        return proc.returncode


# ----------------------------------------------------------------------------- the command


def bench_serve(
    model: str = "full",
    *,
    config=None,
    avatar: str = "photo",
    avatar_seconds: float = 4.0,
    size_wh: tuple[int, int] = (1280, 720),
    clips: int = 10,
    concurrent: int = 6,
    concurrent_seconds: float = 3.0,
    long_seconds: float = 60.0,
    short_after_s: float = 5.0,
    work_root: str | Path | None = None,
    ready_timeout_s: float = 600.0,
) -> ServeBench:
    """Run the benchmark of the module's docstring; see ``lipsync-ray bench serve --help``.

    Args:
        model: "full", "small", "identity" (stand-ins built here) or an ONNX path.
        config: a RenderConfig whose settings (not its models or paths) both the `render`
            and the service get; None: the defaults.
        avatar: "photo" or "drawn", as ``bench render``.
    """
    from lipsync_ray.config import RenderConfig
    from lipsync_ray.dev.bench import _cli, _make_avatar, _resolve_model, run_process
    from lipsync_ray.dev.models import Arch, Size, build_model, save_model
    from lipsync_ray.dev.speech import synth_speech, write_audio
    from lipsync_ray.flags import OPTION_FLAGS, render_argv
    from lipsync_ray.workdir.layout import report_path

    check_settings(clips=clips, concurrent=concurrent, concurrent_seconds=concurrent_seconds,
                   long_seconds=long_seconds, short_after_s=short_after_s)  # fmt: skip
    tmp = tempfile.TemporaryDirectory(prefix="lipsync-bench-serve-", dir=work_root)
    root = Path(tmp.name)
    try:
        unet = _resolve_model(model, root)
        encoder = save_model(build_model(Arch.AUDIO_ENCODER, Size.FULL, seed=0), root / "enc.onnx")
        bundle = _make_avatar(avatar, root / "avatars" / AVATAR_NAME, avatar_seconds, size_wh)
        audio_dir = root / "audio"
        audio_dir.mkdir()
        seeds = iter(range(1000))  # every clip its own speech

        def speech(name: str, seconds: float) -> Path:
            return write_audio(audio_dir / f"{name}.wav", synth_speech(seconds, seed=next(seeds)))

        total_s = concurrent * concurrent_seconds
        inputs = ServeInputs(
            avatar=AVATAR_NAME,
            warmup=speech("warmup", 1.0),
            clips=tuple(speech(f"clip-{i}", 1.0) for i in range(clips)),
            single=speech("single", total_s),
            concurrent=tuple(speech(f"conc-{i}", concurrent_seconds) for i in range(concurrent)),
            long=speech("long", long_seconds),
            short=speech("short", 1.0),
        )
        config = config or RenderConfig(model=str(unet), audio_encoder=str(encoder))
        config = replace(config, model=str(unet), audio_encoder=str(encoder), features=None,
                         work_dir=str(root / "render-work"))  # fmt: skip
        os.sync()  # the models and avatar just written: their writeback is not measured

        # 1. `lipsync-ray render` of the concurrent clips' total length, alone on the machine.
        run = run_process(
            _cli("render", str(bundle.path), str(inputs.single), "-o", str(root / "render.mp4"),
                 *render_argv(config)),
            log_path=root / "render.log",
        )  # fmt: skip
        cli_frames = json.loads(report_path(config.work_dir).read_text())["frames"]
        os.sync()

        # 2. The service, on the same models and settings.
        state_dir = root / "state"
        token = secrets.token_hex(16)
        argv = _cli(
            "serve", str(root / "avatars"), "--model", str(unet), "--audio-encoder", str(encoder),
            *render_argv(config, [f.option for f in OPTION_FLAGS]),
            "--host", "127.0.0.1", "--port", str(free_port()), "--state-dir", str(state_dir),
        )  # fmt: skip
        env = {**os.environ, TOKEN_ENV: token}
        out_dir = root / "out"
        out_dir.mkdir()
        with ServiceProcess(
            argv, log_path=root / "serve.log", env=env, ready_timeout_s=ready_timeout_s
        ) as service:
            log.info("service ready at %s in %.1f s", service.url, service.start_s)
            client = ServiceClient(service.url, token=token, timeout_s=120)
            measured = measure_service(
                client, inputs, out_dir, short_after_s=short_after_s,
                job_fps=report_fps(state_dir),
            )  # fmt: skip
        return summarize(
            measured, model=str(model), avatar=avatar, size_wh=size_wh,
            service_start_s=service.start_s, concurrent=concurrent,
            concurrent_seconds=concurrent_seconds, long_seconds=long_seconds,
            short_after_s=short_after_s, cli_render_frames=cli_frames,
            cli_render_wall_s=run.wall_s,
            settings={"cpus": os.cpu_count(), "poll_s": POLL_S,
                      "throughput_poll_s": THROUGHPUT_POLL_S, "avatar_seconds": avatar_seconds,
                      "render_argv": render_argv(config, [f.option for f in OPTION_FLAGS])},
        )  # fmt: skip
    finally:
        tmp.cleanup()
