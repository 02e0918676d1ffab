"""The driver: validate, compute audio features once, plan chunks, run the actor pools, encode.

::

    Renderer(avatar, config)                  one avatar, one set of models, warm actor pools
      └─ render(audio, output)                 one MP4; call it as often as you like, from
           │                                    several threads at once (a FairShare of the pools)
           ├─ validate the job's inputs (before any actor or file is created)
           ├─ features = audio encoder(mel(audio))            N x 512, driver, once
           ├─ plan: N output frames → chunks of C; avatar frame of each output frame (ping-pong)
           ├─ resume: reuse every chunk whose shard (and segment) the manifest verifies
           ├─ InferenceActor pool ──predictions (ObjectRef)──▶ CompositorActor pool ──▶ shards
           │     at most `in_flight` chunks submitted at once: memory is flat in duration
           ├─ encode: segments joined by stream copy (or one encoder over the shards) + AAC
           └─ hooks: on_frames(done, total) at plan time and after each chunk; cancel (an
                 Event): no more chunks, Cancelled raised, the work directory left resumable

    render(avatar, audio, output, config)     = a Renderer used once
    render_batch(avatar, jobs, config)        = a Renderer used for every job (lipsync_ray.batch)

Where the parts live: what a ``Renderer`` resolves once per avatar and models (pool sizes, the
generator's precision, the actors: a frozen ``Pools``) in :mod:`lipsync_ray.pools`; the chunk
scheduling loop (retries, hung chunks) in :mod:`lipsync_ray.scheduler`; the job's paths, the
manifest, resume, the final encode and the store behind a remote work directory in
:mod:`lipsync_ray.workdir` (one ``WorkDir`` per render).

Chunks are idempotent: a retried or re-run chunk rewrites the same shard atomically, and the
manifest only records shards whose checksum it has seen, so Ray's at-least-once execution can
neither duplicate nor drop frames.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Generic, TypeVar

import numpy as np

from lipsync_ray import audio as audio_mod
from lipsync_ray.avatar import pingpong_indices
from lipsync_ray.chunks import ChunkRange, ChunkSpec, plan_chunks
from lipsync_ray.concurrency import Counter, OnFrames, RenderHooks, WorkDirsInUse
from lipsync_ray.config import RenderConfig
from lipsync_ray.embedded import init_ray
from lipsync_ray.encode import check_video_encoder
from lipsync_ray.fileio import file_sha256
from lipsync_ray.inference import (
    EncoderSession,
    Provider,
    check_encoder_model,
    check_generator_model,
)
from lipsync_ray.pools import (
    Pools,
    check_cpu_fallback,
    check_gpu_request,
    describe_actors,
    start_pools,
)
from lipsync_ray.progress import FrameProgress
from lipsync_ray.report import STAGES, ActorInfo, RunReport, StageTimes, Timeline
from lipsync_ray.scheduler import ChunkScheduler, ChunkTotals, FairShare, padded_rows
from lipsync_ray.storage import Location, resolve
from lipsync_ray.vad import passthrough_weights
from lipsync_ray.workdir.directory import Joined, WorkDir
from lipsync_ray.workdir.fingerprint import avatar_identity, render_fingerprint
from lipsync_ray.workdir.job import Job, check_job_paths, config_models, make_job, open_avatar

__all__ = ["RenderJob", "Renderer", "check_gpu_request", "plan_chunks", "render"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# Frames, FPS and ETA: a live tqdm bar on a terminal, a log line every 10 % otherwise.
_Progress = partial(FrameProgress, logger=log)


class _Once(Generic[T]):
    """A value made by the first :meth:`get` that succeeds, then returned by every call
    (thread-safe: concurrent first calls make it once)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._value: T | None = None

    def get(self, make: Callable[[], T]) -> T:
        with self._lock:
            if self._value is None:
                self._value = make()
            return self._value

    def peek(self) -> T | None:
        """The value, or None while no :meth:`get` has made it."""
        return self._value


class Renderer:
    """Renders many audios onto one avatar with one set of warm actor pools.

    Args:
        avatar: an avatar bundle directory: a path, a URI (``s3://...``) or a location.
        config: models, pools and encoding settings (per-render values such as the start frame
            and the work directory can be overridden in :meth:`render`).
        filesystem: a ``pyarrow.fs`` filesystem in which the avatar and every render's paths
            are taken (see :mod:`lipsync_ray.storage`); None: local paths and URIs.
        once: this renderer renders one job only (what :func:`render` does): automatic pool
            sizes are capped at that job's chunks, so a short clip starts no idle actor.

    Life cycle: the constructor checks the models and opens (and hashes) the avatar. The first
    :meth:`render` connects Ray and makes the :class:`Pools` (pool sizes, the generator's
    precision, the actors), once; later renders find them. What belongs to one render (its
    paths, work directory, features, plan, fingerprint and phases: :class:`RenderJob`) lives
    in that call only, so renders never share mutable state.

    Several threads may call :meth:`render` at the same time (a service does): their chunks
    share the pools through one :class:`~lipsync_ray.concurrency.FairShare` (an equal part of
    the in-flight chunks each, every chunk to the least-loaded actors of all renders), so a
    short render started during a long one finishes in seconds; the frames are those of each
    render run alone. What they do share is made once under a lock (Ray, the pools, the
    actors' descriptions, the audio encoder's session, whose ``run`` ONNX Runtime allows from
    several threads) or counted under one (the renders served). A render whose work directory
    another running render uses is refused (InputError).

    Use as a context manager (or call :meth:`close`): it owns the actors, and the embedded Ray
    cluster when it started one.
    """

    def __init__(
        self,
        avatar: str | Path | Location,
        config: RenderConfig,
        *,
        filesystem=None,
        once: bool = False,
    ) -> None:
        self.config = config
        self.filesystem = filesystem
        self._once = once
        check_generator_model(config.model)
        if config.audio_encoder:
            check_encoder_model(config.audio_encoder)
        self.avatar, self._avatar_location = open_avatar(resolve(avatar, filesystem))
        check_video_encoder(config.encode, self.avatar.size_wh)  # NVENC fails here, not in Ray
        self._avatar_sha = avatar_identity(self.avatar.path)
        # Ray, connected (and started when ``_owns_ray``) with the pools, under their lock.
        self._ray = None
        self._owns_ray = False
        self._pools: _Once[Pools] = _Once()
        self._actors: _Once[tuple[ActorInfo, ...]] = _Once()  # once a render waited for them
        self._encoder: _Once[EncoderSession] = _Once()  # the audio encoder, on the driver
        self._shares: _Once[FairShare] = _Once()  # the pools' chunks, shared by renders
        self._served = Counter()  # renders finished on these actors
        self._working = WorkDirsInUse()  # the work directories of the running renders
        import ray

        if not (ray.is_initialized() or config.address or os.environ.get("RAY_ADDRESS")):
            check_gpu_request(config)  # this machine will run the actors: fail before Ray

    @property
    def pools(self) -> Pools | None:
        """The warm pools, once a render made them."""
        return self._pools.peek()

    @property
    def actor_infos(self) -> tuple[ActorInfo, ...]:
        """What every actor reported once a render waited for them (empty before)."""
        return self._actors.peek() or ()

    # ------------------------------------------------------------------------- lifecycle

    def __enter__(self) -> Renderer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the actors, and the embedded Ray cluster if this renderer started it (a later
        render starts afresh)."""
        if self._ray is not None:
            pools = self._pools.peek()
            for actor in pools.actors if pools else ():
                with contextlib.suppress(Exception):  # already gone
                    self._ray.kill(actor, no_restart=True)
            if self._owns_ray:
                self._ray.shutdown()
            self._ray, self._owns_ray = None, False
        self._pools, self._actors, self._shares = _Once(), _Once(), _Once()

    def _warm(self, timeline: Timeline, *, chunks: int, calibration: np.ndarray | None) -> Pools:
        """The pools, made by the first render: ``chunks`` are its chunks (the cap on
        automatic sizes with ``once``), ``calibration`` its precomputed features (when the
        precision needs them and there is no audio encoder)."""
        cap = chunks if self._once else None
        return self._pools.get(partial(self._start, timeline, cap, calibration))

    def _start(self, timeline: Timeline, chunks: int | None, calibration) -> Pools:
        if self._ray is None:
            import ray

            if not ray.is_initialized():
                t0 = time.perf_counter()
                init_ray(ray, self.config.address)
                timeline.add("ray_init", time.perf_counter() - t0)
                self._owns_ray = True
            self._ray = ray
        return start_pools(self._ray, self.config, self.avatar, self._avatar_location,
                           chunks=chunks, calibration=calibration)  # fmt: skip

    def _fair_share(self, pools: Pools) -> FairShare:
        """The one FairShare of ``pools`` (made by the first render that runs chunks)."""
        return self._shares.get(
            lambda: FairShare(pools.pool.in_flight(), len(pools.inference), len(pools.compositors))
        )

    def _ready(self, pools: Pools) -> tuple[ActorInfo, ...]:
        """Every actor's description, waited for by the first render that needs the actors;
        checked for a CPU fallback by every render."""
        infos = self._actors.get(partial(describe_actors, self._ray, pools))
        check_cpu_fallback(infos, self.config)
        return infos

    # ---------------------------------------------------------------------------- render

    def _decode(self, job: Job) -> tuple[np.ndarray, np.ndarray | None]:
        """Precomputed features [N, 512] or the mel spectrogram [80, T] of the job's audio,
        and the 16 kHz samples when silence passthrough needs them.

        Decoding validates the audio, so a bad file fails here, before any actor starts."""
        samples = None
        if job.features is None or self.config.silence is not None:
            samples = audio_mod.load_audio(job.audio)
        if job.features is not None:
            return audio_mod.load_features(job.features), samples
        return audio_mod.mel_spectrogram(samples), samples

    def _features(self, job: Job, decoded: np.ndarray) -> np.ndarray:
        if job.features is not None:
            return decoded
        return audio_mod.compute_features(decoded, self._encoder.get(self._open_encoder))

    def _open_encoder(self) -> EncoderSession:
        # The audio encoder is small (~0.09 GMAC per window): it runs once per render on the
        # driver's CPU, never on a GPU actor.
        options = replace(self.config.session, providers=(Provider.CPU,))
        return EncoderSession(Path(self.config.audio_encoder), options, cpus=2)

    def _fingerprint(self, job: Job, pools: Pools, features: np.ndarray) -> str:
        """Hash of everything that decides the pixels of the shards and segments."""
        return render_fingerprint(
            self.config,
            pools.pool,
            avatar=self._avatar_sha,
            model=pools.model_sha,
            features=features,
            start_frame=job.start_frame,
            audio=file_sha256(job.audio),
        )

    def render(
        self,
        audio: str | Path,
        output: str | Path,
        *,
        start_frame: int | None = None,
        work_dir: str | Path | None = None,
        features: str | Path | None = None,
        on_frames: OnFrames | None = None,
        cancel: threading.Event | None = None,
    ) -> RunReport:
        """Render one MP4; see :func:`render`. Keyword arguments override the config.

        Paths may be URIs, or paths inside the renderer's ``filesystem``. May be called from
        several threads at once (see the class).

        Args:
            on_frames: ``on_frames(done, total)``, called in this thread once the plan is known
                (``done``: the frames reused from the work directory, maybe 0) and after every
                finished chunk; an exception it raises is logged, never breaks the render.
            cancel: once set, no more chunks are submitted and the render raises
                :class:`~lipsync_ray.errors.Cancelled` within about 0.2 s; the work directory
                keeps the finished chunks, so a later render of the same inputs resumes.
        """
        started, timeline = time.perf_counter(), Timeline()
        job = make_job(
            self.config,
            self.avatar,
            audio,
            output,
            start_frame=start_frame,
            work_dir=work_dir,
            features=features,
            filesystem=self.filesystem,
        )
        hooks = RenderHooks(on_frames, cancel)
        with self._working.hold(job.work_dir), WorkDir.open(job, self.config) as work:
            return work.finish(self._render(job, work, timeline, started, hooks))

    def _render(
        self, job: Job, work: WorkDir, timeline: Timeline, started: float, hooks: RenderHooks
    ) -> RunReport:
        chunk_frames = self.config.pool.chunk_frames
        hooks.check(job.work_dir)
        inputs, pools = self._inputs(job, timeline)
        hooks.check(job.work_dir)
        frames = len(inputs.features)
        run = RenderJob(
            job, work, timeline, started, pools, inputs,
            plan=tuple(plan_chunks(frames, chunk_frames)),
            fingerprint=self._fingerprint(job, pools, inputs.features),
        )  # fmt: skip
        # Spare files for released shards: one per compositor and one more.
        work.begin(run.fingerprint, frames, spares=pools.pool.compositors + 1)
        todo = work.pending(run.plan)
        log.info(
            "%d frames in %d chunks of %d (%d reused); features %.1f s",
            frames, len(run.plan), chunk_frames, len(run.plan) - len(todo), inputs.elapsed_s,
        )  # fmt: skip
        hooks.frames(frames - sum(r.frames for r in todo), frames)
        totals = self._run_chunks(run, todo, hooks) if todo else ChunkTotals()
        timeline.mark("chunks")
        hooks.check(job.work_dir)
        joined = work.join(run.plan)
        timeline.mark("join")
        return self._report(run, todo, totals, joined, renders=self._served.next())

    def _report(
        self,
        run: RenderJob,
        todo: list[ChunkRange],
        totals: ChunkTotals,
        joined: Joined,
        *,
        renders: int,
    ) -> RunReport:
        config, job, pools, inputs = self.config, run.job, run.pools, run.inputs
        frames = len(inputs.features)
        # Decoding, the mel spectrogram and the encoder: wall and CPU of the driver meanwhile
        # (its main thread mostly waits for Ray's processes then; their CPU is not counted).
        timings = {**totals.timings, **joined.timings_s, "features": inputs.wall_s}
        cpu = {**totals.cpu, **joined.cpu_s, "features": inputs.cpu_s}
        wall = time.perf_counter() - run.started
        rendered = sum(r.frames for r in todo)
        actors = self.actor_infos
        return RunReport(
            output=str(job.output),
            work_dir=str(job.work_dir),
            frames=frames,
            chunks=len(run.plan),
            chunks_rendered=len(todo),
            chunks_reused=len(run.plan) - len(todo),
            wall_s=wall,
            fps=frames / wall,
            stages=StageTimes(
                _per_frame(timings, rendered=rendered, total=frames),
                _per_frame(cpu, rendered=rendered, total=frames),
            ),
            retries=totals.retries,
            frames_generated=totals.generated,
            precision=pools.model.to_dict(),
            seam_score=totals.seam(),
            actors=actors,
            providers=tuple(sorted({i.providers[0] for i in actors if i.role == "inference"})),
            audio_duration_s=float(joined.media.audio_duration_s or 0.0),
            video_duration_s=float(joined.media.video_duration_s),
            settings={
                **config.to_dict(),
                "start_frame": job.start_frame,
                "work_dir": str(job.work_dir),
                "pool_resolved": asdict(pools.pool),
                "pool_sizing": pools.sizing,
                "fingerprint": run.fingerprint,
                "renders_on_these_actors": renders,
            },
            ray_address=self._ray.get_runtime_context().gcs_address,
            shards_kept=config.keep_shards,
            phases_s=run.timeline.phases(),
        )

    def _inputs(self, job: Job, timeline: Timeline) -> tuple[_Inputs, Pools]:
        """Decode the audio and compute its features while Ray, the generator's precision and
        the actors start (the first render's pools); the silence passthrough weights when
        asked for."""
        config = self.config
        t0, c_start = time.perf_counter(), time.process_time()
        decoded, samples = self._decode(job)
        decode_wall, decode_cpu = time.perf_counter() - t0, time.process_time() - c_start
        timeline.mark("inputs")
        # the chunks this render will have, before the encoder runs (they cap the pool sizes)
        n_mel = decoded.shape[1]
        frames = len(decoded) if job.features is not None else audio_mod.feature_count(n_mel)
        chunks = -(-frames // config.pool.chunk_frames)
        # The audio encoder runs in a thread while this one starts Ray (when not up yet), the
        # generator's precision and the actors: on a short clip Ray's start-up is most of the
        # wall time, so it should not wait for the features, nor they for it. (Ray is started
        # from the main thread: it installs its SIGTERM handler only there.)
        with ThreadPoolExecutor(1, thread_name_prefix="lipsync-features") as executor:
            pending = executor.submit(_timed, self._features, job, decoded)
            try:
                calibration = decoded if job.features is not None else None
                pools = self._warm(timeline, chunks=chunks, calibration=calibration)
            finally:
                feats, features_wall, features_cpu = pending.result()
        timeline.mark("start")
        del decoded
        weights = None
        if config.silence is not None:
            weights = passthrough_weights(
                samples, audio_mod.SAMPLE_RATE, len(feats), audio_mod.VIDEO_FPS, config.silence
            )
            log.info(
                "silence passthrough: %d of %d frames keep the avatar frame",
                int((weights == 0).sum()), len(weights),
            )  # fmt: skip
        inputs = _Inputs(
            features=feats,
            weights=weights,
            wall_s=features_wall + decode_wall,
            cpu_s=features_cpu + decode_cpu,
            elapsed_s=time.perf_counter() - t0,  # Ray's start beside decoding and features
        )
        return inputs, pools

    def _run_chunks(
        self, run: RenderJob, todo: list[ChunkRange], hooks: RenderHooks
    ) -> ChunkTotals:
        """Render the chunks ``todo`` through the actor pools, on this render's share of them;
        each is recorded in the work directory."""
        pools = run.pools
        self._ready(pools)
        run.timeline.mark("actors_ready")
        feats, weights = run.inputs.features, run.inputs.weights
        frames = len(feats)
        avatar_idx = pingpong_indices(frames, self.avatar.frame_count, run.job.start_frame)
        specs = (
            ChunkSpec(
                r.chunk, r.start, r.stop, avatar_idx[r.start : r.stop], padded_rows(feats, r),
                None if weights is None else weights[r.start : r.stop], priority=frames,
            )
            for r in todo
        )  # fmt: skip
        progress = _Progress(frames, done=frames - sum(r.frames for r in todo))

        def finished(rows: int) -> None:
            progress.update(rows)
            hooks.frames(progress.done, frames)

        try:
            with self._fair_share(pools).share() as share:
                scheduler = ChunkScheduler(
                    self._ray, pools.inference, pools.compositors, pools.pool, run.work,
                    finished, share=share, cancel=hooks.cancel,
                    on_submitted_all=partial(run.work.encode_audio_ahead, frames),
                )  # fmt: skip
                return scheduler.run(specs, run.work.context())
        finally:
            progress.close()


@dataclass(frozen=True)
class _Inputs:
    """A render's audio, made ready on the driver."""

    features: np.ndarray  # float32 (N, 512): one row per output frame
    weights: np.ndarray | None  # float32 (N,) silence passthrough weights, or None
    wall_s: float  # decoding and features: wall seconds
    cpu_s: float  # ... and the driver's CPU seconds meanwhile
    elapsed_s: float  # from the start of decoding to the features (Ray's start beside them)


@dataclass(frozen=True)
class RenderJob:
    """One :meth:`Renderer.render` call once its inputs are ready: what belongs to this render
    and no other (the renderer keeps none of it, so renders never share mutable state)."""

    job: Job  # the request's paths, checked and staged
    work: WorkDir  # its work directory: manifest, chunk files, report
    timeline: Timeline  # its driver phases
    started: float  # time.perf_counter() when render() was called
    pools: Pools  # the renderer's warm pools it runs on (frozen, shared by every render)
    inputs: _Inputs  # features and silence weights
    plan: tuple[ChunkRange, ...]  # every chunk of the output, in order
    fingerprint: str  # of the inputs and settings: its work directory's chunks belong to it


def _timed(fn, *args):
    """``fn(*args)``, its wall seconds and the process's CPU seconds meanwhile."""
    w0, c0 = time.perf_counter(), time.process_time()
    result = fn(*args)
    return result, time.perf_counter() - w0, time.process_time() - c0


def _per_frame(timings: dict[str, float], *, rendered: int, total: int) -> dict[str, float]:
    """Milliseconds per frame: actor stages over rendered frames, driver stages over all."""
    out = {}
    for stage in STAGES:
        if stage in timings:
            driver = stage in ("features", "download", "encode_join", "encode_audio")
            frames = total if driver else rendered
            out[stage] = 1000.0 * timings[stage] / max(frames, 1)
    return out


def render(
    avatar: str | Path | Location,
    audio: str | Path | Location,
    output: str | Path | Location,
    config: RenderConfig,
    *,
    filesystem=None,
    on_frames: OnFrames | None = None,
    cancel: threading.Event | None = None,
) -> RunReport:
    """Render ``output`` (H.264 + AAC MP4): ``avatar``'s frames with lips following ``audio``.

    Args:
        avatar: an avatar bundle directory (see :mod:`lipsync_ray.avatar`).
        audio: any audio file PyAV decodes; also the MP4's sound track.
        output: the MP4 to write. Nothing is left at this path unless the render succeeds.
        config: models, pools and encoding settings.
        filesystem: a ``pyarrow.fs.FileSystem`` (a ``SubTreeFileSystem``, say) in which the
            avatar, audio, output and work directory paths are taken. Without it each may be a
            local path or a URI (``file://``, ``s3://``, ``gs://``); see
            :mod:`lipsync_ray.storage` for what must be shared on a multi-node cluster.
        on_frames: ``on_frames(done, total)``: progress, once the plan is known and after
            every chunk (see :meth:`Renderer.render`).
        cancel: a ``threading.Event``; once set the render stops (see :meth:`Renderer.render`).

    Returns:
        The run report, also written to ``<work_dir>/report.json``.

    Raises:
        InputError: bad inputs (checked before anything starts).
        RenderError, EncodeError, ShardError: the render could not finish; the work directory
            keeps every complete chunk, and re-running the same call resumes.
        Cancelled: ``cancel`` was set; likewise resumable.
    """
    # Storage too (probe files, credentials, endpoints): a bad path fails before models load.
    check_job_paths(
        audio, output, config.overwrite, filesystem=filesystem, work_dir=config.work_dir,
        avatar=avatar, features=config.features, models=config_models(config),
    )  # fmt: skip
    with Renderer(avatar, config, filesystem=filesystem, once=True) as renderer:
        return renderer.render(audio, output, on_frames=on_frames, cancel=cancel)
