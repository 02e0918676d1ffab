"""The driver: validate, compute audio features once, plan chunks, run the actor pools, encode.

::

    Renderer(avatar, config)                  one avatar, one set of models, warm actor pools
      └─ render(audio, output)                 one MP4; call it as often as you like
           ├─ validate the job's inputs (before any actor or file is created)
           ├─ features = audio encoder(mel(audio))            N x 512, driver, once
           ├─ plan: N output frames → chunks of C; avatar frame of each output frame (ping-pong)
           ├─ resume: reuse every chunk whose shard (and segment) the manifest verifies
           ├─ InferenceActor pool ──predictions (ObjectRef)──▶ CompositorActor pool ──▶ shards
           │     at most `in_flight` chunks submitted at once: memory is flat in duration
           └─ encode: segments joined by stream copy (or one encoder over the shards) + AAC

    render(avatar, audio, output, config)     = a Renderer used once
    render_batch(avatar, jobs, config)        = a Renderer used for every job (lipsync_ray.batch)

Chunks are idempotent: a retried or re-run chunk rewrites the same shard atomically, and the
manifest only records shards whose checksum it has seen, so Ray's at-least-once execution can
neither duplicate nor drop frames.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from lipsync_ray import audio as audio_mod
from lipsync_ray.actors import (
    AUDIO_CONTEXT,
    CONCURRENCY_GROUPS,
    ChunkResult,
    ChunkSpec,
    CompositorActor,
    InferenceActor,
    JobContext,
    segment_path,
)
from lipsync_ray.avatar import Avatar, pingpong_indices
from lipsync_ray.config import EncodeMode, Placement, PoolConfig, RenderConfig
from lipsync_ray.encode import concat_segments, encode_video, probe
from lipsync_ray.errors import InputError, LipsyncError, RenderError
from lipsync_ray.inference import (
    EncoderSession,
    Provider,
    check_encoder_model,
    check_generator_model,
)
from lipsync_ray.precision import Precision, PreparedModel, calibration_features, prepare_model
from lipsync_ray.report import STAGES, ActorInfo, RunReport, StageTimes
from lipsync_ray.shards import (
    Manifest,
    file_sha256,
    iter_shard_frames,
    shard_metadata,
    shard_path,
)
from lipsync_ray.storage import (
    Location,
    RemoteWorkDir,
    node_dir,
    relocate,
    resolve,
    stage_in,
    stage_out,
)
from lipsync_ray.vad import passthrough_weights

__all__ = ["Renderer", "plan_chunks", "render"]

log = logging.getLogger(__name__)

TRACK_SAMPLE_RATE = 48_000  # the MP4's AAC track is encoded from the audio at this rate
ACTOR_START_TIMEOUT_S = 600.0
# Actor tasks run as soon as their arguments are ready, not in submission order. In order, a
# task waits for every earlier one's arguments: the `describe` probe of `_await_actors` would
# queue behind a `composite` whose predictions come from a hung `infer`, and the driver would
# block there (up to ACTOR_START_TIMEOUT_S) instead of restarting the hung actor. Order between
# chunks never mattered: `encode_chunk` takes the `composite` result as its argument.
_UNORDERED = {"allow_out_of_order_execution": True}


def plan_chunks(frames: int, chunk_frames: int) -> list[tuple[int, int, int]]:
    """Split ``frames`` output frames into ``(chunk, start, stop)`` ranges of ``chunk_frames``."""
    return [
        (i, start, min(start + chunk_frames, frames))
        for i, start in enumerate(range(0, frames, chunk_frames))
    ]


def padded_rows(features: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Feature rows ``[start - 8, stop + 8)`` with zeros where they run off either end."""
    lo, hi = start - AUDIO_CONTEXT, stop + AUDIO_CONTEXT
    rows = np.zeros((hi - lo, features.shape[1]), dtype=np.float32)
    a, b = max(lo, 0), min(hi, len(features))
    rows[a - lo : b - lo] = features[a:b]
    return rows


class _Progress:
    """Frames, FPS and ETA: a live line on a terminal, a log line every 10 % otherwise."""

    def __init__(self, total: int, done: int = 0) -> None:
        self.total, self.done, self.start = total, done, time.monotonic()
        self.rendered = 0
        self.tty = sys.stderr.isatty()
        self._next_log = 0.1

    def update(self, frames: int) -> None:
        self.done += frames
        self.rendered += frames
        elapsed = max(time.monotonic() - self.start, 1e-6)
        fps = self.rendered / elapsed
        eta = (self.total - self.done) / fps if fps > 0 else float("inf")
        line = f"{self.done}/{self.total} frames  {fps:.1f} FPS  ETA {eta:.0f} s"
        if self.tty:
            sys.stderr.write(f"\r{line}   ")
            sys.stderr.flush()
        elif self.done / self.total >= self._next_log or self.done == self.total:
            log.info(line)
            self._next_log = self.done / self.total + 0.1

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


@dataclass
class _Task:
    spec: ChunkSpec
    attempt: int
    submitted: float
    inference: int
    compositor: int
    predictions: object  # ObjectRef[Predictions]
    system_failures: int = 0  # lost workers or nodes; not counted against max_retries
    timed_out: bool = False  # its actor was restarted because the chunk hung


@dataclass(frozen=True)
class _Job:
    """One validated render request."""

    audio: Path
    output: Path
    work_dir: Path
    start_frame: int
    features: Path | None
    # Set where the output or the work directory is off the local disk (lipsync_ray.storage):
    # ``output`` and ``work_dir`` above are then node-local stand-ins.
    output_location: Location | None = None
    remote: RemoteWorkDir | None = None


class Renderer:
    """Renders many audios onto one avatar with one set of warm actor pools.

    Args:
        avatar: an avatar bundle directory: a path, a URI (``s3://...``) or a location.
        config: models, pools and encoding settings (per-render values such as the start frame
            and the work directory can be overridden in :meth:`render`).
        filesystem: a ``pyarrow.fs`` filesystem in which the avatar and every render's paths
            are taken (see :mod:`lipsync_ray.storage`); None: local paths and URIs.

    Use as a context manager (or call :meth:`close`): it owns the actors, and the embedded Ray
    cluster when it started one.
    """

    def __init__(
        self, avatar: str | Path | Location, config: RenderConfig, *, filesystem=None
    ) -> None:
        self.config = config
        self.filesystem = filesystem
        check_generator_model(config.model)
        if config.audio_encoder:
            check_encoder_model(config.audio_encoder)
        self.avatar, self._avatar_location = _open_avatar(resolve(avatar, filesystem))
        self._prepared: PreparedModel | None = None
        self._model_sha = ""
        self._avatar_sha = self._hash_avatar()
        self._encoder: EncoderSession | None = None
        self._ray = None
        self._owns_ray = False
        self._inference: list = []
        self._compositors: list = []
        self._ready: list = []
        self.actor_infos: list[ActorInfo] = []
        self.pool: PoolConfig = config.pool
        self.renders = 0

    # ------------------------------------------------------------------------- lifecycle

    def __enter__(self) -> Renderer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the actors, and the embedded Ray cluster if this renderer started it."""
        if self._ray is not None:
            for actor in self._inference + self._compositors:
                with contextlib.suppress(Exception):  # already gone
                    self._ray.kill(actor, no_restart=True)
            self._inference, self._compositors = [], []
            if self._owns_ray:
                self._ray.shutdown()
            self._ray = None

    def _hash_avatar(self) -> str:
        root = Path(self.avatar.path)
        parts = [file_sha256(root / "avatar.json")]
        parts += [f"{p.name}:{p.stat().st_size}" for p in sorted(root.iterdir()) if p.is_file()]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()

    def _ensure_ray(self):
        if self._ray is None:
            import ray

            if not ray.is_initialized():
                init_ray(ray, self.config.address)
                self._owns_ray = True
            self._ray = ray
            resources = ray.cluster_resources()
            self.pool = self.config.pool.resolved(
                resources.get("CPU", 1.0), resources.get("GPU", 0.0)
            )
        return self._ray

    def _start_pools(self) -> None:
        """Create the actors without waiting for them (they start while features compute)."""
        ray = self._ensure_ray()
        if self._inference:
            return
        pool, config = self.pool, self.config
        gpus = pool.gpus_per_actor or 0.0
        if 0 < gpus < 1 and config.session.gpu_mem_limit_bytes is None:
            log.info("%.2f GPU per actor: --gpu-mem-limit bounds each actor's CUDA arena", gpus)
        # A staged avatar travels as its location: each node stages its own copy.
        avatar = self._avatar_location or str(Path(self.avatar.path).resolve())
        prepared = self._prepare_model(None)
        model = str(prepared.path.resolve())
        session = prepared.session_options(config.session)
        inference_cls = ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(InferenceActor)
        compositor_cls = ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(CompositorActor)
        self._inference = [
            inference_cls.options(
                num_cpus=pool.cpus_per_inference_actor,
                num_gpus=gpus,
                max_restarts=-1,  # chunks bound the retries (max_retries, SYSTEM_RETRIES)
                max_task_retries=0,
                **_UNORDERED,
            ).remote(model, avatar, session, pool.cpus_per_inference_actor, pool.batch_size)
            for _ in range(pool.inference_actors)
        ]
        placements = _compositor_placements(ray, pool)
        self._compositors = [
            compositor_cls.options(
                num_cpus=pool.cpus_per_compositor,
                max_restarts=-1,  # chunks bound the retries (max_retries, SYSTEM_RETRIES)
                max_task_retries=0,
                **_UNORDERED,
                **placements[k % len(placements)],
            ).remote(avatar, config.encode, pool.cpus_per_compositor, pool.compositor_niceness)
            for k in range(pool.compositors)
        ]
        self._ready = [a.describe.remote() for a in self._inference + self._compositors]

    def _prepare_model(self, features: np.ndarray | None) -> PreparedModel:
        """The generator the actors load: FP32 as given, or a gated INT8/FP16 version (made
        once per model, avatar and settings, then cached). Runs on the driver, before actors."""
        if self._prepared is None:
            config = self.config
            self._ensure_ray()
            gpu = bool(self.pool.gpus_per_actor) and any(
                p is not Provider.CPU for p in config.session.providers
            )
            if config.precision is Precision.FP32:
                path = Path(config.model)
                self._prepared = PreparedModel(path, Precision.FP32, Precision.FP32, None, False)
            else:
                if config.audio_encoder:
                    features = calibration_features(config.audio_encoder)
                self._prepared = prepare_model(
                    config.model,
                    self.avatar,
                    config.precision,
                    provider_is_gpu=gpu,
                    features=features,
                    cache_dir=config.precision_cache,
                    threshold_db=config.precision_threshold_db,
                    session=config.session if gpu else None,
                )
                log.info("generator precision: %s", self._prepared.to_dict())
            self._model_sha = file_sha256(self._prepared.path)
        return self._prepared

    def _await_actors(self, task: _Task) -> None:
        """Block until the two actors of a failed chunk answer again (Ray restarts them).

        "Unavailable" means restarting (its node died, or its process): poll. "Died" means
        its restarts are used up: the render cannot go on."""
        ray = self._ray
        errors = ray.exceptions
        deadline = time.monotonic() + ACTOR_START_TIMEOUT_S
        for actor in (self._inference[task.inference], self._compositors[task.compositor]):
            while True:
                try:
                    ray.get(actor.describe.remote(), timeout=max(1.0, deadline - time.monotonic()))
                    break
                except (errors.ActorUnavailableError, errors.GetTimeoutError) as exc:
                    if time.monotonic() > deadline:
                        raise RenderError(
                            f"{task.spec.describe()}: an actor did not come back within "
                            f"{ACTOR_START_TIMEOUT_S:.0f} s: {_short(exc)}"
                        ) from exc
                    time.sleep(0.5)
                except errors.RayError as exc:
                    raise RenderError(
                        f"{task.spec.describe()}: an actor died and could not be restarted: "
                        f"{_short(exc)}"
                    ) from exc

    def _ensure_pools(self) -> None:
        """Start the actors if needed and wait until every one has opened its session."""
        self._start_pools()
        if self._ready:
            self.actor_infos = list(_gather(self._ray, self._ready, ACTOR_START_TIMEOUT_S))
            self._ready = []

    # ---------------------------------------------------------------------------- render

    def _job(
        self,
        audio: str | Path,
        output: str | Path,
        start_frame: int | None,
        work_dir: str | Path | None,
        features: str | Path | None,
    ) -> _Job:
        config, fs = self.config, self.filesystem
        output_at, audio_at = check_job_paths(audio, output, config.overwrite, filesystem=fs)
        start = config.start_frame if start_frame is None else start_frame
        period = max(1, 2 * self.avatar.frame_count - 2)
        if not 0 <= start < period:
            raise InputError(
                f"start frame must be in [0, {period}) for an avatar of "
                f"{self.avatar.frame_count} frames, got {start}",
                path=self.avatar.path,
            )
        if work_dir is None:
            work_dir = config.work_dir
        work_at = resolve(work_dir, fs) if work_dir else output_at.sibling(".work")
        features = features if features is not None else config.features
        if features is None and not config.audio_encoder:
            raise InputError("give an audio encoder model or precomputed features")
        output_local, work_local = output_at.local_path(), work_at.local_path()
        remote = None
        if work_local is None:
            remote = RemoteWorkDir(work_at, keep_shards=config.keep_shards)
            work_local = remote.mirror
        return _Job(
            audio=stage_in(audio_at),
            output=output_local or node_dir("output", output_at) / output_at.name,
            work_dir=work_local.resolve(),
            start_frame=start,
            features=None if features is None else stage_in(resolve(features, fs)),
            output_location=None if output_local else output_at,
            remote=remote,
        )

    def _decode(self, job: _Job) -> tuple[np.ndarray, np.ndarray | None]:
        """Precomputed features [N, 512] or the mel spectrogram [80, T] of the job's audio,
        and the 16 kHz samples when silence passthrough needs them.

        Decoding validates the audio, so a bad file fails here, before any actor starts."""
        samples = None
        if job.features is None or self.config.silence is not None:
            samples = audio_mod.load_audio(job.audio)
        if job.features is not None:
            return audio_mod.load_features(job.features), samples
        return audio_mod.mel_spectrogram(samples), samples

    def _features(self, job: _Job, decoded: np.ndarray) -> np.ndarray:
        if job.features is not None:
            return decoded
        if self._encoder is None:
            # The audio encoder is small (~0.09 GMAC per window): it runs once per render on
            # the driver's CPU, never on a GPU actor.
            options = replace(self.config.session, providers=(Provider.CPU,))
            self._encoder = EncoderSession(Path(self.config.audio_encoder), options, cpus=2)
        return audio_mod.compute_features(decoded, self._encoder)

    def _fingerprint(self, job: _Job, features: np.ndarray) -> str:
        """Hash of everything that decides the pixels of the shards and segments."""
        config = self.config
        parts = {
            "avatar": self._avatar_sha,
            "features": hashlib.sha256(np.ascontiguousarray(features).tobytes()).hexdigest(),
            "model": self._model_sha,  # the file the actors run (FP32, INT8 or FP16)
            "chunk_frames": config.pool.chunk_frames,
            "batch_size": config.pool.batch_size,
            "start_frame": job.start_frame,
            "shard_codec": config.shard_codec.value,
            "encode_mode": config.encode_mode.value,
            "encode": [config.encode.crf, config.encode.preset, config.encode.codec.value],
            "blend": [config.blend.mode.value, config.blend.feather],
            "silence": None if config.silence is None else asdict(config.silence),
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    def render(
        self,
        audio: str | Path,
        output: str | Path,
        *,
        start_frame: int | None = None,
        work_dir: str | Path | None = None,
        features: str | Path | None = None,
    ) -> RunReport:
        """Render one MP4; see :func:`render`. Keyword arguments override the config.

        Paths may be URIs, or paths inside the renderer's ``filesystem``."""
        t_start = time.perf_counter()
        job = self._job(audio, output, start_frame, work_dir, features)
        if job.output_location is None and job.remote is None:
            return self._render(job, t_start)
        if job.remote is not None:
            job.remote.pull()
        job.output.parent.mkdir(parents=True, exist_ok=True)
        try:
            report = self._render(job, t_start)
        finally:
            if job.remote is not None:
                job.remote.publish_manifest()  # a resume from any node keeps finished chunks
        if job.output_location is not None:
            stage_out(job.output, job.output_location)
            job.output.unlink(missing_ok=True)
        report = relocate(report, job.output_location, job.remote and job.remote.location)
        if job.remote is not None:
            job.remote.finish(report)
        else:
            report.save(job.work_dir / "report.json")
        return report

    def _render(self, job: _Job, t_start: float) -> RunReport:
        config = self.config
        t0 = time.perf_counter()
        decoded, samples = self._decode(job)
        self._prepare_model(decoded if job.features is not None else None)
        self._start_pools()  # actors boot while the driver runs the audio encoder
        feats = self._features(job, decoded)
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
        del samples
        features_s = time.perf_counter() - t0
        frames = len(feats)
        avatar_idx = pingpong_indices(frames, self.avatar.frame_count, job.start_frame)
        chunks = plan_chunks(frames, config.pool.chunk_frames)
        fingerprint = self._fingerprint(job, feats)
        job.work_dir.mkdir(parents=True, exist_ok=True)
        manifest = _open_manifest(job.work_dir, config, fingerprint, frames)
        if job.remote is not None:
            job.remote.attach(manifest)
        segments = config.encode_mode is EncodeMode.SEGMENTS
        _adopt_orphans(manifest, chunks, fingerprint, segments)
        todo = [
            (c, s, e) for c, s, e in chunks if not manifest.complete(c, s, e, segments=segments)
        ]
        for c, _, _ in todo:
            manifest.forget(c)
        reused = len(chunks) - len(todo)
        log.info(
            "%d frames in %d chunks of %d (%d reused); features %.1f s",
            frames, len(chunks), config.pool.chunk_frames, reused, features_s,
        )  # fmt: skip
        timings: dict[str, float] = {}
        cpu: dict[str, float] = {}
        retries = 0
        quality = _Quality()
        if todo:
            self._ensure_pools()
            context = JobContext(
                str(job.work_dir),
                fingerprint,
                config.shard_codec,
                segments,
                shard_checksums=config.keep_shards or not segments,
                blend=config.blend,
                store=job.remote.store if job.remote is not None else None,
            )
            specs = (
                ChunkSpec(
                    c, s, e, avatar_idx[s:e], padded_rows(feats, s, e),
                    None if weights is None else weights[s:e],
                )
                for c, s, e in todo
            )  # fmt: skip
            progress = _Progress(frames, done=frames - sum(e - s for _, s, e in todo))
            try:
                timings, cpu, retries, quality = self._run_chunks(
                    specs, context, manifest, progress
                )
            finally:
                progress.close()
        t0, c0 = time.perf_counter(), time.process_time()
        if job.remote is not None:
            job.remote.fetch(manifest, segments=segments)
        media = _encode(job, config, manifest, frames)
        timings["encode_join"] = time.perf_counter() - t0
        cpu["encode_join"] = time.process_time() - c0
        timings["features"] = cpu["features"] = features_s
        if not config.keep_shards:
            shutil.rmtree(job.work_dir / "shards", ignore_errors=True)
            shutil.rmtree(job.work_dir / "segments", ignore_errors=True)
        wall = time.perf_counter() - t_start
        self.renders += 1
        report = RunReport(
            output=str(job.output),
            work_dir=str(job.work_dir),
            frames=frames,
            chunks=len(chunks),
            chunks_rendered=len(todo),
            chunks_reused=reused,
            wall_s=wall,
            fps=frames / wall,
            stages=StageTimes(
                _per_frame(timings, rendered=sum(e - s for _, s, e in todo), total=frames),
                _per_frame(cpu, rendered=sum(e - s for _, s, e in todo), total=frames),
            ),
            retries=retries,
            frames_generated=quality.generated,
            precision=self._prepared.to_dict() if self._prepared else {},
            seam_score=quality.seam(),
            actors=tuple(self.actor_infos),
            providers=tuple(
                sorted({i.providers[0] for i in self.actor_infos if i.role == "inference"})
            ),
            audio_duration_s=float(media.audio_duration_s or 0.0),
            video_duration_s=float(media.video_duration_s),
            settings={
                **config.to_dict(),
                "start_frame": job.start_frame,
                "work_dir": str(job.work_dir),
                "pool_resolved": asdict(self.pool),
                "fingerprint": fingerprint,
                "renders_on_these_actors": self.renders,
            },
            ray_address=self._ray.get_runtime_context().gcs_address if self._ray else "",
            shards_kept=config.keep_shards,
        )
        report.save(job.work_dir / "report.json")
        return report

    # ------------------------------------------------------------------------ scheduling

    def _run_chunks(
        self,
        specs: Iterator[ChunkSpec],
        context: JobContext,
        manifest: Manifest,
        progress: _Progress,
    ) -> tuple[dict[str, float], dict[str, float], int, _Quality]:
        """Run every chunk through both pools with bounded in-flight work, retries, timeouts.

        Returns wall and CPU seconds per stage (summed over chunks), the retry count, and the
        generated-frame and seam figures."""
        ray, pool = self._ray, self.pool
        retry: deque[tuple[ChunkSpec, int, int]] = deque()
        inflight: dict[object, _Task] = {}
        load_inf = [0] * len(self._inference)
        load_comp = [0] * len(self._compositors)
        timings: dict[str, float] = {}
        cpu: dict[str, float] = {}
        retries = 0
        quality = _Quality()
        limit = pool.in_flight()
        context_ref = ray.put(context)

        def submit(spec: ChunkSpec, attempt: int, system_failures: int = 0) -> None:
            i = min(range(len(load_inf)), key=load_inf.__getitem__)
            c = min(range(len(load_comp)), key=load_comp.__getitem__)
            preds = self._inference[i].infer.remote(spec)
            # One compositor call writes the chunk's shard and encodes its segment from the
            # same frames: no second task, no re-read.
            ref = self._compositors[c].composite.remote(spec, preds, context_ref)
            load_inf[i] += 1
            load_comp[c] += 1
            inflight[ref] = _Task(spec, attempt, time.monotonic(), i, c, preds, system_failures)

        def failed(task: _Task, exc: BaseException) -> None:
            nonlocal retries
            cause = _root_cause(ray, exc)
            chunk = task.spec.describe()
            if isinstance(cause, InputError):
                # Bad input (a model that outputs NaN, say) fails the same way every time.
                raise type(cause)(f"{chunk}: {cause.message}", path=cause.path) from None
            system = _is_system_failure(ray, cause)
            if system and not task.timed_out:
                # The machinery failed (a worker or node died): wait for the actors to come
                # back (within ACTOR_START_TIMEOUT_S), then run the chunk again without using
                # its retry budget: not the chunk's fault.
                self._await_actors(task)
                task.system_failures += 1
                if task.system_failures > SYSTEM_RETRIES:
                    raise RenderError(
                        f"{chunk}: its workers died {task.system_failures} times; last: "
                        f"{_short(cause)}"
                    )
                log.warning("%s lost its worker (%s); running it again", chunk, _short(cause))
                retries += 1
                retry.append((task.spec, task.attempt, task.system_failures))
                return
            reason = (
                f"no result within {pool.chunk_timeout_s:g} s (hung)"
                if task.timed_out
                else _short(cause)
            )
            if task.attempt >= pool.max_retries:
                raise RenderError(f"{chunk} failed {task.attempt + 1} times; last error: {reason}")
            if system:
                # We restarted its hung actor: retry once the actor answers again. (Checked
                # after the budget: the last hang names the chunk, not a used-up restart.)
                self._await_actors(task)
            retries += 1
            log.warning("%s failed (attempt %d), retrying: %s", chunk, task.attempt + 1, reason)
            retry.append((task.spec, task.attempt + 1, task.system_failures))

        pending = iter(specs)
        exhausted = False
        last_progress = time.monotonic()
        while True:
            while len(inflight) < limit:
                if retry:
                    submit(*retry.popleft())
                    continue
                spec = None if exhausted else next(pending, None)
                if spec is None:
                    exhausted = True
                    break
                submit(spec, 0)
            if not inflight:
                break
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=1.0)
            for ref in ready:
                task = inflight.pop(ref)
                load_inf[task.inference] -= 1
                load_comp[task.compositor] -= 1
                try:
                    result: ChunkResult = ray.get(ref)
                except (ray.exceptions.RayError, LipsyncError) as exc:
                    failed(task, exc)
                    continue
                if result.segment is not None:
                    manifest.record_segment(result.segment)
                # Released once recorded (without --keep-shards): the segment carries the
                # chunk, and disk use stays bounded by the chunks in flight.
                manifest.record(
                    result.shard,
                    release=result.segment is not None and not self.config.keep_shards,
                )
                for k, v in result.timings_s.items():
                    timings[k] = timings.get(k, 0.0) + v
                for k, v in result.cpu_s.items():
                    cpu[k] = cpu.get(k, 0.0) + v
                quality.generated += result.generated
                quality.seams.extend(result.seam_scores)
                progress.update(result.shard.rows)
            now = time.monotonic()
            if ready:
                last_progress = now
            # "No progress": no chunk finished within the timeout. The oldest chunk in flight
            # is the one holding the others up.
            oldest = min(inflight.values(), key=lambda t: t.submitted, default=None)
            if (
                oldest is not None
                and now - max(oldest.submitted, last_progress) > pool.chunk_timeout_s
            ):
                task = oldest
                # A hung chunk: restart the actor that holds it (Ray cannot interrupt a running
                # method of a threaded actor); its tasks fail with RayActorError and are retried.
                done, _ = ray.wait([task.predictions], timeout=0)
                actors = self._compositors if done else self._inference
                index = task.compositor if done else task.inference
                log.warning(
                    "%s made no progress for %.0f s; restarting its actor",
                    task.spec.describe(), now - max(task.submitted, last_progress),
                )  # fmt: skip
                ray.kill(actors[index], no_restart=False)
                last_progress = now  # the restart is an event: the others get a full timeout
                task.timed_out = True
                task.submitted = now  # its failure arrives through ray.wait
        return timings, cpu, retries, quality


@dataclass
class _Quality:
    generated: int = 0
    seams: list[float] = field(default_factory=list)

    def seam(self) -> float | None:
        return float(np.mean(self.seams)) if self.seams else None


def check_job_paths(
    audio: str | Path | Location,
    output: str | Path | Location,
    overwrite: bool,
    *,
    filesystem=None,
) -> tuple[Location, Location]:
    """Cheap checks of a render's own paths, before models or the avatar are opened.

    Paths may be URIs or paths inside ``filesystem``; returns (output, audio) resolved."""
    import pyarrow.fs as pafs

    output, audio = resolve(output, filesystem), resolve(audio, filesystem)
    parent = output.parent()
    parent_type = parent.info().type
    if parent_type != pafs.FileType.Directory and not (
        parent_type == pafs.FileType.NotFound and _object_store(output)
    ):
        raise InputError("the output's directory does not exist", path=parent)
    output_type = output.info().type
    if output_type == pafs.FileType.Directory:
        raise InputError("the output is a directory", path=output)
    if output_type != pafs.FileType.NotFound and not overwrite:
        raise InputError("the output exists; use --overwrite to replace it", path=output)
    suffix = Path(output.name).suffix
    if suffix.lower() not in (".mp4", ".m4v", ".mov"):
        raise InputError(f"the output must be an .mp4 file, got {suffix!r}", path=output)
    audio_type = audio.info().type
    if audio_type != pafs.FileType.File:
        what = (
            "is a directory, expected an audio file"
            if audio_type == pafs.FileType.Directory
            else "audio file not found"
        )
        raise InputError(what, path=audio)
    return output, audio


def _object_store(location: Location) -> bool:
    """S3 and GCS have no directories: an output's "directory" appears with its first file."""
    fs = location.filesystem
    while hasattr(fs, "base_fs"):  # SubTreeFileSystem
        fs = fs.base_fs
    return fs.type_name in ("s3", "gcs")


def _open_avatar(location: Location) -> tuple[Avatar, Location | None]:
    """Open the avatar bundle at ``location``: in place when it is local, else staged into
    this node's cache (then also returned, for the actors to stage on their nodes). Errors
    about a staged copy name the file at its source."""
    local = location.local_path()
    if local is not None:
        return Avatar.open(local), None
    import pyarrow.fs as pafs

    if location.info().type != pafs.FileType.Directory:
        raise InputError("avatar bundle directory not found", path=location)
    staged = stage_in(location)
    try:
        return Avatar.open(staged), location
    except InputError as exc:
        path = exc.path
        if path is not None and path.startswith(str(staged)):
            path = str(location) + path[len(str(staged)) :]
        raise type(exc)(exc.message, path=path) from None


def _per_frame(timings: dict[str, float], *, rendered: int, total: int) -> dict[str, float]:
    """Milliseconds per frame: actor stages over rendered frames, driver stages over all."""
    out = {}
    for stage in STAGES:
        if stage in timings:
            frames = total if stage in ("features", "encode_join") else rendered
            out[stage] = 1000.0 * timings[stage] / max(frames, 1)
    return out


def _compositor_placements(ray, pool: PoolConfig) -> list[dict]:
    """Scheduling options for compositors, cycled over the pool.

    ``Placement.SPLIT`` pins compositors (softly: Ray may still move a restarted one) to the
    alive nodes that have CPUs and no GPU, round-robin, so GPU nodes keep their CPUs for the
    inference actors feeding the GPUs. With no CPU-only node it says so and lets Ray decide.
    """
    if pool.placement is not Placement.SPLIT:
        return [{}]
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    cpu_nodes = [
        n["NodeID"]
        for n in ray.nodes()
        if n.get("Alive") and n["Resources"].get("CPU", 0) > 0 and not n["Resources"].get("GPU")
    ]
    if not cpu_nodes:
        log.warning("placement 'split': the cluster has no CPU-only node; Ray places compositors")
        return [{}]
    return [
        {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=node, soft=True)}
        for node in sorted(cpu_nodes)
    ]


# A chunk may lose its workers this many times (nodes or processes dying) before the render
# stops; each loss waits for Ray to restart the actors (they restart without limit: the
# chunks bound the work, not the actors).
SYSTEM_RETRIES = 8


def _root_cause(ray, exc: BaseException) -> BaseException:
    """The exception behind Ray's wrappers (a task error wraps the actor's own exception)."""
    seen = 0
    while isinstance(exc, ray.exceptions.RayTaskError) and exc.cause is not None and seen < 8:
        exc, seen = exc.cause, seen + 1
    return exc


def _is_system_failure(ray, exc: BaseException) -> bool:
    errors = ray.exceptions
    return isinstance(
        exc,
        (
            errors.RayActorError,
            errors.ObjectLostError,
            errors.WorkerCrashedError,
            errors.NodeDiedError,
            errors.LocalRayletDiedError,
        ),
    )


def _gather(ray, refs, timeout_s: float):
    try:
        return ray.get(refs, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError as exc:
        raise RenderError(
            f"actors did not start within {timeout_s:.0f} s: the cluster may lack the requested "
            "CPUs/GPUs (see `ray status`)"
        ) from exc
    except ray.exceptions.RayError as exc:
        cause = _root_cause(ray, exc)
        if isinstance(cause, LipsyncError):
            raise cause from None
        raise RenderError(f"an actor failed to start: {_short(cause)}") from exc


def _short(exc: BaseException) -> str:
    text = [line for line in str(exc).strip().splitlines() if line.strip()]
    return text[-1].strip() if text else type(exc).__name__


def _encode(job: _Job, config: RenderConfig, manifest: Manifest, frames: int):
    track = audio_mod.load_audio(job.audio, sample_rate=TRACK_SAMPLE_RATE)
    chunks = plan_chunks(frames, config.pool.chunk_frames)
    if config.encode_mode is EncodeMode.SEGMENTS:
        segments = [job.work_dir / manifest.segments[c].file for c, _, _ in chunks]
        return concat_segments(
            segments, track, TRACK_SAMPLE_RATE, job.output, config.encode, expected_frames=frames
        )

    def shard_frames() -> Iterator[np.ndarray]:
        for c, start, stop in chunks:
            path = job.work_dir / manifest.chunks[c].file
            yield from iter_shard_frames(path, range(start, stop))

    return encode_video(
        shard_frames(), track, TRACK_SAMPLE_RATE, job.output, config.encode, expected_frames=frames
    )


def _open_manifest(work_dir: Path, config: RenderConfig, fingerprint: str, frames: int) -> Manifest:
    existing = Manifest.load(work_dir)
    if existing is not None and existing.fingerprint != fingerprint:
        if not config.overwrite:
            raise InputError(
                "the work directory belongs to a render of other inputs or settings; use "
                "--overwrite to start again, or another --work-dir",
                path=work_dir,
            )
        existing = None
    if existing is None:
        for sub in ("shards", "segments"):
            shutil.rmtree(work_dir / sub, ignore_errors=True)
        existing = Manifest(
            work_dir, fingerprint, config.to_dict(), frames, config.pool.chunk_frames
        )
        existing.save()
    return existing


def _adopt_orphans(manifest: Manifest, chunks, fingerprint: str, segments: bool) -> None:
    """Record files that were renamed into place but not yet listed (the driver died between
    a compositor's rename and the manifest update)."""
    for chunk, start, stop in chunks:
        path = shard_path(manifest.work_dir, chunk)
        if chunk not in manifest.chunks and path.exists():
            try:
                fp, number, rows = shard_metadata(path)
            except Exception:  # an unreadable file is simply rendered again
                continue
            if fp == fingerprint and number == chunk and rows == stop - start:
                manifest.adopt(path, chunk, start, stop)
        seg = segment_path(manifest.work_dir, chunk)
        if (
            segments
            and chunk in manifest.chunks
            and chunk not in manifest.segments
            and seg.exists()
        ):
            # Same fingerprint (the work dir was wiped otherwise) and renamed into place whole;
            # the frame count is checked by demuxing.
            try:
                ok = probe(seg).video_frames == stop - start
            except LipsyncError:
                ok = False
            if ok:
                manifest.adopt(seg, chunk, start, stop, segment=True)


def init_ray(ray, address: str | None) -> None:
    """Join a cluster (``address``, or RAY_ADDRESS as set inside `ray job submit`), or start an
    embedded one whose dashboard stays on 127.0.0.1. Token authentication is Ray's default for
    ``ray.init()`` since 2.60; ``ray start`` needs RAY_AUTH_MODE=token (see the README)."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
        return
    ray.init(
        # "local": always a new cluster, even when a `ray start` cluster runs on this machine
        # (ray.init() would otherwise join it); --address auto joins one on purpose.
        address="local",
        include_dashboard=False,
        dashboard_host="127.0.0.1",
        log_to_driver=False,
        configure_logging=False,
    )


def render(
    avatar: str | Path | Location,
    audio: str | Path | Location,
    output: str | Path | Location,
    config: RenderConfig,
    *,
    filesystem=None,
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

    Returns:
        The run report, also written to ``<work_dir>/report.json``.

    Raises:
        InputError: bad inputs (checked before anything starts).
        RenderError, EncodeError, ShardError: the render could not finish; the work directory
            keeps every complete chunk, and re-running the same call resumes.
    """
    check_job_paths(audio, output, config.overwrite, filesystem=filesystem)
    with Renderer(avatar, config, filesystem=filesystem) as renderer:
        return renderer.render(audio, output)
