"""The driver: validate, compute audio features once, plan chunks, run the actor pools, encode.

::

    render(avatar, audio, output, config)
      ├─ validate every input (before any actor or file is created)
      ├─ features = audio encoder(mel(audio))            N x 512, driver, once
      ├─ plan: N output frames → chunks of C; avatar frame of each output frame (ping-pong)
      ├─ resume: reuse every chunk whose shard (and segment) the manifest verifies
      ├─ InferenceActor pool ──predictions (ObjectRef)──▶ CompositorActor pool ──▶ shards
      │     at most `in_flight` chunks submitted at once: memory is flat in duration
      └─ encode: segments joined by stream copy (or one encoder over the shards) + AAC → MP4

Chunks are idempotent: a retried or re-run chunk rewrites the same shard atomically, and the
manifest only records shards whose checksum it has seen, so Ray's at-least-once execution can
neither duplicate nor drop frames.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from lipsync_ray import audio as audio_mod
from lipsync_ray.actors import (
    AUDIO_CONTEXT,
    ChunkResult,
    ChunkSpec,
    CompositorActor,
    InferenceActor,
)
from lipsync_ray.avatar import Avatar, pingpong_indices
from lipsync_ray.config import EncodeMode, PoolConfig, RenderConfig
from lipsync_ray.encode import concat_segments, encode_video
from lipsync_ray.errors import InputError, LipsyncError, RenderError
from lipsync_ray.inference import EncoderSession, SessionOptions, check_model_file
from lipsync_ray.report import STAGES, ActorInfo, RunReport, StageTimes
from lipsync_ray.shards import Manifest, iter_shard_frames, shard_metadata, shard_path

__all__ = ["plan_chunks", "render"]

log = logging.getLogger(__name__)

TRACK_SAMPLE_RATE = 48_000  # the MP4's AAC track is encoded from the audio at this rate


@dataclass(frozen=True)
class _Inputs:
    avatar: Avatar
    audio: Path
    output: Path
    work_dir: Path


def plan_chunks(frames: int, chunk_frames: int) -> list[tuple[int, int, int]]:
    """Split ``frames`` output frames into ``(chunk, start, stop)`` ranges of ``chunk_frames``."""
    return [
        (i, start, min(start + chunk_frames, frames))
        for i, start in enumerate(range(0, frames, chunk_frames))
    ]


def _padded_rows(features: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Feature rows ``[start - 8, stop + 8)`` with zeros where they run off either end."""
    lo, hi = start - AUDIO_CONTEXT, stop + AUDIO_CONTEXT
    rows = np.zeros((hi - lo, features.shape[1]), dtype=np.float32)
    a, b = max(lo, 0), min(hi, len(features))
    rows[a - lo : b - lo] = features[a:b]
    return rows


def _validate(avatar: str | Path, audio: str | Path, output: str | Path, config: RenderConfig):
    output = Path(output)
    if not output.parent.is_dir():
        raise InputError("the output's directory does not exist", path=output.parent)
    if output.exists() and not config.overwrite:
        raise InputError("the output exists; use --overwrite to replace it", path=output)
    if output.suffix.lower() not in (".mp4", ".m4v", ".mov"):
        raise InputError(f"the output must be an .mp4 file, got {output.suffix!r}", path=output)
    audio = Path(audio)
    if not audio.is_file():
        raise InputError("audio file not found", path=audio)
    check_model_file(config.model)
    if config.audio_encoder:
        check_model_file(config.audio_encoder)
    opened = Avatar.open(avatar)
    if config.start_frame >= max(1, 2 * opened.frame_count - 2):
        raise InputError(
            f"start frame must be < {max(1, 2 * opened.frame_count - 2)} for an avatar of "
            f"{opened.frame_count} frames, got {config.start_frame}",
            path=avatar,
        )
    return _Inputs(opened, audio, output, config.work_dir_for(output).resolve())


def _features(inputs: _Inputs, config: RenderConfig) -> np.ndarray:
    if config.features:
        return audio_mod.load_features(config.features)
    samples = audio_mod.load_audio(inputs.audio)
    mel = audio_mod.mel_spectrogram(samples)
    encoder = EncoderSession(Path(config.audio_encoder), replace_cpu(config.session), cpus=2)
    return audio_mod.compute_features(mel, encoder)


def replace_cpu(options: SessionOptions) -> SessionOptions:
    """The driver's small audio encoder always runs on the CPU provider."""
    from lipsync_ray.inference import Provider

    return replace(options, providers=(Provider.CPU,))


def _sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fingerprint(inputs: _Inputs, config: RenderConfig, features: np.ndarray) -> str:
    """Hash of everything that decides the pixels of the shards and segments."""
    avatar_dir = Path(inputs.avatar.info.path)
    parts = {
        "avatar": _sha256(avatar_dir / "avatar.json"),
        "avatar_files": sorted(
            (p.name, p.stat().st_size) for p in avatar_dir.iterdir() if p.is_file()
        ),
        "features": hashlib.sha256(np.ascontiguousarray(features).tobytes()).hexdigest(),
        "model": _sha256(config.model),
        "chunk_frames": config.pool.chunk_frames,
        "batch_size": config.pool.batch_size,
        "start_frame": config.start_frame,
        "shard_codec": config.shard_codec.value,
        "encode_mode": config.encode_mode.value,
        "encode": [config.encode.crf, config.encode.preset, config.encode.codec.value],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


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


@dataclass
class _Pools:
    inference: list
    compositors: list
    infos: list[ActorInfo] = field(default_factory=list)


def _start_pools(ray, inputs: _Inputs, config: RenderConfig, pool: PoolConfig, fingerprint: str):
    segments = config.encode if config.encode_mode is EncodeMode.SEGMENTS else None
    gpus = pool.gpus_per_actor or 0.0
    session = config.session
    if gpus and gpus < 1 and session.gpu_mem_limit_bytes is None:
        log.info("fractional GPU %.2f per actor: set --gpu-mem-limit to bound each arena", gpus)
    inference_cls = ray.remote(InferenceActor)
    compositor_cls = ray.remote(CompositorActor)
    avatar = str(inputs.avatar.info.path)
    inference = [
        inference_cls.options(
            num_cpus=pool.cpus_per_inference_actor,
            num_gpus=gpus,
            max_restarts=3,
            max_task_retries=0,
        ).remote(
            str(Path(config.model).resolve()),
            avatar,
            session,
            pool.cpus_per_inference_actor,
            pool.batch_size,
        )
        for _ in range(pool.inference_actors)
    ]
    compositors = [
        compositor_cls.options(
            num_cpus=pool.cpus_per_compositor, max_restarts=3, max_task_retries=0
        ).remote(
            avatar,
            str(inputs.work_dir),
            config.shard_codec,
            fingerprint,
            segments,
            pool.cpus_per_compositor,
        )
        for _ in range(pool.compositors)
    ]
    infos = _gather(ray, [a.describe.remote() for a in inference + compositors], timeout_s=600)
    return _Pools(inference, compositors, list(infos))


def _gather(ray, refs, timeout_s: float):
    try:
        return ray.get(refs, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError as exc:
        raise RenderError(
            f"actors did not start within {timeout_s:.0f} s: the cluster may lack the requested "
            "CPUs/GPUs (see `ray status`)"
        ) from exc
    except ray.exceptions.RayTaskError as exc:
        cause = exc.as_instanceof_cause()
        if isinstance(cause, LipsyncError):
            raise cause from None
        raise RenderError(f"an actor failed to start: {exc}") from exc


def _run_chunks(
    ray,
    pools: _Pools,
    specs: list[ChunkSpec],
    pool: PoolConfig,
    manifest: Manifest,
    progress: _Progress,
) -> tuple[dict[str, float], int]:
    """Run every chunk through both pools with bounded in-flight work, retries and timeouts."""
    pending: deque[tuple[ChunkSpec, int]] = deque((s, 0) for s in specs)
    inflight: dict[object, _Task] = {}
    load_inf = [0] * len(pools.inference)
    load_comp = [0] * len(pools.compositors)
    timings: dict[str, float] = {}
    retries = 0
    limit = pool.in_flight()

    def submit(spec: ChunkSpec, attempt: int) -> None:
        i = min(range(len(load_inf)), key=load_inf.__getitem__)
        c = min(range(len(load_comp)), key=load_comp.__getitem__)
        preds = pools.inference[i].infer.remote(spec)
        ref = pools.compositors[c].composite.remote(spec, preds)
        load_inf[i] += 1
        load_comp[c] += 1
        inflight[ref] = _Task(spec, attempt, time.monotonic(), i, c, preds)

    def failed(task: _Task, reason: str) -> None:
        nonlocal retries
        if task.attempt >= pool.max_retries:
            raise RenderError(
                f"{task.spec.describe()} failed {task.attempt + 1} times; last error: {reason}"
            )
        retries += 1
        log.warning(
            "%s failed (attempt %d), retrying: %s", task.spec.describe(), task.attempt + 1, reason
        )
        pending.appendleft((task.spec, task.attempt + 1))

    while pending or inflight:
        while pending and len(inflight) < limit:
            submit(*pending.popleft())
        ready, _ = ray.wait(list(inflight), num_returns=1, timeout=1.0)
        for ref in ready:
            task = inflight.pop(ref)
            load_inf[task.inference] -= 1
            load_comp[task.compositor] -= 1
            try:
                result: ChunkResult = ray.get(ref)
            except (ray.exceptions.RayError, LipsyncError) as exc:
                failed(task, _short(exc))
                continue
            if result.segment is not None:
                manifest.record_segment(result.segment)
            manifest.record(result.shard)
            for k, v in result.timings_s.items():
                timings[k] = timings.get(k, 0.0) + v
            progress.update(result.shard.rows)
        now = time.monotonic()
        for task in list(inflight.values()):
            if now - task.submitted <= pool.chunk_timeout_s:
                continue
            # A hung chunk: restart the actor that holds it (Ray cannot interrupt a running
            # method of a threaded actor); its tasks fail with RayActorError and are retried.
            done, _ = ray.wait([task.predictions], timeout=0)
            stuck = pools.compositors[task.compositor] if done else pools.inference[task.inference]
            log.warning(
                "%s hung for %.0f s; restarting its actor",
                task.spec.describe(),
                now - task.submitted,
            )
            ray.kill(stuck, no_restart=False)
            task.submitted = now  # its failure arrives through ray.wait
    return timings, retries


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__


def _track_audio(path: Path) -> np.ndarray:
    """The input audio as float32 mono at 48 kHz for the AAC track."""
    return audio_mod.load_audio(path, sample_rate=TRACK_SAMPLE_RATE)


def _encode(inputs: _Inputs, config: RenderConfig, manifest: Manifest, frames: int):
    track = _track_audio(inputs.audio)
    chunks = plan_chunks(frames, config.pool.chunk_frames)
    if config.encode_mode is EncodeMode.SEGMENTS:
        segments = [inputs.work_dir / manifest.segments[c].file for c, _, _ in chunks]
        return concat_segments(
            segments, track, TRACK_SAMPLE_RATE, inputs.output, config.encode, expected_frames=frames
        )

    def shard_frames() -> Iterator[np.ndarray]:
        for c, start, stop in chunks:
            yield from iter_shard_frames(
                inputs.work_dir / manifest.chunks[c].file, range(start, stop)
            )

    return encode_video(
        shard_frames(),
        track,
        TRACK_SAMPLE_RATE,
        inputs.output,
        config.encode,
        expected_frames=frames,
    )


def _open_manifest(
    inputs: _Inputs, config: RenderConfig, fingerprint: str, frames: int
) -> Manifest:
    work_dir = inputs.work_dir
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


def _adopt_orphans(manifest: Manifest, chunks, fingerprint: str) -> None:
    """Record shards that were renamed into place but not yet in the manifest (driver died)."""
    for chunk, start, stop in chunks:
        if chunk in manifest.chunks:
            continue
        path = shard_path(manifest.work_dir, chunk)
        if not path.exists():
            continue
        try:
            fp, number, rows = shard_metadata(path)
        except Exception:  # an unreadable file is simply rendered again
            continue
        if fp == fingerprint and number == chunk and rows == stop - start:
            manifest.adopt(path, chunk, start, stop)


def render(
    avatar: str | Path, audio: str | Path, output: str | Path, config: RenderConfig
) -> RunReport:
    """Render ``output`` (H.264 + AAC MP4): ``avatar``'s frames with lips following ``audio``.

    Args:
        avatar: an avatar bundle directory (see :mod:`lipsync_ray.avatar`).
        audio: any audio file PyAV decodes; also the MP4's sound track.
        output: the MP4 to write. Nothing is left at this path unless the render succeeds.
        config: models, pools and encoding settings.

    Returns:
        The run report, also written to ``<work_dir>/report.json``.

    Raises:
        InputError: bad inputs (checked before anything starts).
        RenderError, EncodeError, ShardError: the render could not finish; the work directory
            keeps every complete chunk, and re-running the same call resumes.
    """
    import ray

    t_start = time.perf_counter()
    inputs = _validate(avatar, audio, output, config)
    t0 = time.perf_counter()
    features = _features(inputs, config)
    features_s = time.perf_counter() - t0
    frames = len(features)
    avatar_idx = pingpong_indices(frames, inputs.avatar.frame_count, config.start_frame)
    chunks = plan_chunks(frames, config.pool.chunk_frames)
    fingerprint = _fingerprint(inputs, config, features)
    inputs.work_dir.mkdir(parents=True, exist_ok=True)
    manifest = _open_manifest(inputs, config, fingerprint, frames)
    _adopt_orphans(manifest, chunks, fingerprint)
    segments = config.encode_mode is EncodeMode.SEGMENTS
    todo = [
        (c, s, e)
        for c, s, e in chunks
        if not (manifest.verified(c, s, e) and (not segments or manifest.verified_segment(c, s, e)))
    ]
    for c, _, _ in todo:
        manifest.forget(c)
    reused = len(chunks) - len(todo)
    log.info(
        "%d frames in %d chunks of %d (%d reused); features %.1f s",
        frames,
        len(chunks),
        config.pool.chunk_frames,
        reused,
        features_s,
    )

    owns_ray = not ray.is_initialized()
    if owns_ray:
        _init_ray(ray, config.address)
    try:
        resources = ray.cluster_resources()
        pool = config.pool.resolved(resources.get("CPU", 1.0), resources.get("GPU", 0.0))
        progress = _Progress(frames, done=sum(e - s for c, s, e in chunks if (c, s, e) not in todo))
        infos: list[ActorInfo] = []
        timings: dict[str, float] = {}
        retries = 0
        if todo:
            pools = _start_pools(ray, inputs, config, pool, fingerprint)
            infos = pools.infos
            specs = [
                ChunkSpec(c, s, e, avatar_idx[s:e], _padded_rows(features, s, e))
                for c, s, e in todo
            ]
            try:
                timings, retries = _run_chunks(ray, pools, specs, pool, manifest, progress)
            finally:
                progress.close()
                for actor in pools.inference + pools.compositors:
                    ray.kill(actor, no_restart=True)
        address = ray.get_runtime_context().gcs_address
    finally:
        if owns_ray:
            ray.shutdown()

    t0 = time.perf_counter()
    media = _encode(inputs, config, manifest, frames)
    encode_s = time.perf_counter() - t0
    timings["encode"] = timings.get("encode", 0.0) + encode_s
    timings["features"] = features_s
    if not config.keep_shards:
        shutil.rmtree(inputs.work_dir / "shards", ignore_errors=True)
        shutil.rmtree(inputs.work_dir / "segments", ignore_errors=True)
    wall = time.perf_counter() - t_start
    rendered = sum(e - s for _, s, e in todo)
    per_frame = {
        k: 1000.0 * timings[k] / max(rendered if k not in ("features", "encode") else frames, 1)
        for k in STAGES
        if k in timings
    }
    report = RunReport(
        output=str(inputs.output),
        work_dir=str(inputs.work_dir),
        frames=frames,
        chunks=len(chunks),
        chunks_rendered=len(todo),
        chunks_reused=reused,
        wall_s=wall,
        fps=frames / wall,
        stages=StageTimes(per_frame),
        retries=retries,
        actors=tuple(infos),
        providers=tuple(
            sorted({i.providers[0] for i in infos if i.role == "inference" and i.providers})
        ),
        audio_duration_s=float(media.audio_duration_s or 0.0),
        video_duration_s=float(media.video_duration_s),
        settings={
            **config.to_dict(),
            "pool_resolved": _pool_dict(pool),
            "fingerprint": fingerprint,
        },
        ray_address=address,
        shards_kept=config.keep_shards,
    )
    report.save(inputs.work_dir / "report.json")
    return report


def _init_ray(ray, address: str | None) -> None:
    """Join a cluster (``address``, or RAY_ADDRESS as set inside `ray job submit`), or start an
    embedded one whose dashboard stays on 127.0.0.1. Token authentication is Ray's default for
    ``ray.init()`` since 2.60; ``ray start`` needs RAY_AUTH_MODE=token (see the README)."""
    import os

    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
        return
    ray.init(
        include_dashboard=False,
        dashboard_host="127.0.0.1",
        log_to_driver=False,
        configure_logging=False,
    )


def _pool_dict(pool: PoolConfig) -> dict:
    from dataclasses import asdict

    return asdict(pool)
