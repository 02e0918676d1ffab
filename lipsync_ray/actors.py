"""The Ray actors: generator inference and compositing. Plain classes, made remote by the driver.

Both actors open the avatar bundle themselves from its path ("move small things, read big things
where they are used"): the driver ships chunk specs (frame ranges, avatar indices, a few feature
rows) and predictions (uint8 (C, 320, 320, 3), ~0.3 MB per frame), never full frames.

Everything an actor returns is a frozen dataclass; every failure reaches the driver as an
exception that names the chunk.
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import ray

from lipsync_ray.audio import audio_windows
from lipsync_ray.avatar import Avatar
from lipsync_ray.chunks import ChunkResult, ChunkSpec, JobContext, Predictions, joined_predictions
from lipsync_ray.composite import blend_into, crossfade_frame
from lipsync_ray.contract import (
    AUDIO_CHANNELS,
    AUDIO_CONTEXT,
    AUDIO_SIZE,
    FRAME_SIZE,
    VISUAL_CHANNELS,
)
from lipsync_ray.encode import EncodeOptions, VideoCodec, encode_segment
from lipsync_ray.errors import InputError, ModelError, RenderError
from lipsync_ray.inference import (
    GPU_PROVIDERS,
    GeneratorSession,
    Provider,
    SessionOptions,
    gpu_fallback_reason,
    requires_gpu,
    with_gpu_share,
)
from lipsync_ray.report import ActorInfo
from lipsync_ray.seams import measure_seam
from lipsync_ray.shards import ShardCodec, ShardInfo, iter_shard_frames, write_shard
from lipsync_ray.storage import Location, local_copy
from lipsync_ray.workdir.layout import segment_path, shard_path

__all__ = [
    "AUDIO_CONTEXT",
    "CompositorActor",
    "InferenceActor",
]

log = logging.getLogger(__name__)

# ``describe`` runs in its own thread group, so the driver can ask whether an actor is alive
# even while a chunk (perhaps a hung one) occupies its main thread.
CONCURRENCY_GROUPS = {"control": 1}
# The inference actor's chunks run in threads of their own group, up to this many at once, and
# take turns on the one session batch by batch (``Turns``): a chunk of a short render that
# arrives behind chunks of a long one is not queued behind them. More chunks than this wait in
# Ray's queue. Each thread keeps its own input and output buffers (~60 MB for 64 frames).
INFERENCE_CHUNK_THREADS = 4
INFERENCE_CONCURRENCY_GROUPS = {**CONCURRENCY_GROUPS, "chunks": INFERENCE_CHUNK_THREADS}


class Backlog:
    """The frames an inference actor still has to infer, per ``infer`` call it runs (by Ray
    task id): what the driver asks (:meth:`InferenceActor.backlog`) to split a chunk at the
    render's end between the actors so that they finish together."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._left: dict[str, int] = {}

    @contextlib.contextmanager
    def counting(self, task_id: str, frames: int) -> Iterator[Callable[[int], None]]:
        """Count ``frames`` for ``task_id`` while the block runs; it calls the function it
        gets with the frames each batch inferred."""

        def inferred(n: int) -> None:
            with self._lock:
                self._left[task_id] -= n

        with self._lock:
            self._left[task_id] = frames
        try:
            yield inferred
        finally:
            with self._lock:
                self._left.pop(task_id, None)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._left)


class Turns:
    """One holder at a time, the lowest key first: the chunks an inference actor holds at once
    take turns on its session at batch boundaries.

    ``key`` orders the waiting chunks (``(priority, chunk index)``: a short render's chunks
    first, then a render's chunks in order, so a render alone runs its chunks one after another
    as a single-threaded actor did); equal keys go in the order they asked. A chunk of a long
    render waits while lower keys keep coming: a stream of short clips can hold it back.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._waiting: list[tuple[tuple[int, ...], int]] = []  # a heap of (key, ticket)
        self._tickets = itertools.count()
        self._busy = False
        self._holder: str | None = None

    @property
    def holder(self) -> str | None:
        """The ``holder`` given by the block that holds the session now; None when idle."""
        return self._holder

    @contextlib.contextmanager
    def turn(self, key: tuple[int, ...], holder: str | None = None) -> Iterator[None]:
        """Hold the session while the block runs; wait first for every lower key. ``holder``
        names the holder (a Ray task id) for :attr:`holder` while the block runs."""
        with self._cond:
            entry = (tuple(key), next(self._tickets))
            heapq.heappush(self._waiting, entry)
            while self._busy or self._waiting[0] != entry:
                self._cond.wait()
            heapq.heappop(self._waiting)
            self._busy, self._holder = True, holder
        try:
            yield
        finally:
            with self._cond:
                self._busy, self._holder = False, None
                self._cond.notify_all()


class _StageClock:
    """Wall and CPU seconds per stage; CPU counts every thread of this process."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def restart(self) -> None:
        """Count from now: the time since the last lap (a wait) goes to no stage."""
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def lap(self, stage: str) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        self.wall[stage] = self.wall.get(stage, 0.0) + wall - self._wall
        self.cpu[stage] = self.cpu.get(stage, 0.0) + cpu - self._cpu
        self._wall, self._cpu = wall, cpu


def _actor_info(
    role: str, providers=(), threads: int = 1, *, gpu_mem_limit_bytes: int | None = None
) -> ActorInfo:
    import ray

    ctx = ray.get_runtime_context()
    return ActorInfo(
        role=role,
        name=f"{role}-{ctx.get_actor_id()[:8] if ctx.get_actor_id() else 'local'}",
        pid=os.getpid(),
        node_id=ctx.get_node_id(),
        providers=tuple(providers),
        gpu_ids=tuple(str(g) for g in ray.get_gpu_ids()),
        threads=threads,
        gpu_mem_limit_bytes=gpu_mem_limit_bytes,
    )


# glibc malloc settings of the actor processes (see ``retain_freed_memory``).
MALLOC_MMAP_THRESHOLD_BYTES = 64 << 20
MALLOC_TRIM_THRESHOLD_BYTES = 512 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, <malloc.h>


def retain_freed_memory() -> bool:
    """Keep memory this process frees for its next allocation instead of returning it.

    Every chunk allocates the same arrays again (model tensors, colour-converted frames,
    encoder pictures: 1-10 MB each). By default glibc serves such blocks with fresh mappings
    and trims the heap when they are freed, so every chunk faults all their pages in again.
    On a VM that hands freed pages back to its host (virtio-balloon free page reporting) each
    of those faults is expensive: ~1.3 CPU ms per 720p frame of system time in the encode path
    on the 2-vCPU benchmark machine. Blocks below 64 MB now come from the heap, which keeps up
    to 512 MB free. Memory stays flat: the sizes recur, so the heap reaches its high-water mark
    in the first chunk. Returns False where it does not apply (not glibc).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(
        mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD_BYTES)
        and mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD_BYTES)
    )


def session_options_here(options: SessionOptions) -> SessionOptions:
    """``options`` fitted to the GPUs Ray gave the calling worker (see ``with_gpu_share``)."""
    import ray

    share = ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0)
    return with_gpu_share(options, [str(g) for g in ray.get_gpu_ids()], share)


def _cpu_fallback(requested: SessionOptions, here: SessionOptions) -> str | None:
    """Why this actor's CPU session should have been a GPU one (ONNX Runtime's reason), or
    None when the CPU is what was asked for: no GPU from Ray and CPU allowed, or CPU only."""
    wanted = [p for p in requested.providers if p in GPU_PROVIDERS]
    if not wanted:
        return None
    if not ray.get_gpu_ids():
        if not requires_gpu(requested):
            return None
        return "Ray gave this actor no GPU (GPUs per actor is 0, or the cluster has none)"
    provider = Provider.CUDA if Provider.CUDA in wanted else wanted[0]
    return gpu_fallback_reason(provider, here).replace("\n", " ")


class InferenceActor:
    """Owns one ONNX Runtime generator session; turns chunk specs into predictions."""

    def __init__(
        self,
        model: str,
        avatar: str | Location,
        session_options: SessionOptions,
        cpus: float,
        batch_size: int,
    ) -> None:
        retain_freed_memory()
        requested = session_options
        session_options = session_options_here(session_options)
        # TensorRT's batch profile spans 1..batch_size (a partial batch reuses the engine).
        session_options = replace(session_options, trt_max_batch=batch_size)
        self.avatar = Avatar.open(local_copy(avatar))
        self.session = GeneratorSession(model, session_options, cpus=max(1, round(cpus)))
        self.batch_size = batch_size
        on_cpu = self.session.providers[0] == Provider.CPU.value
        fallback = _cpu_fallback(requested, session_options) if on_cpu else None
        if fallback is None:
            # The first calls of a fresh session run at about half speed (ONNX Runtime plans
            # its memory and the process faults its arenas in): pay that here, while the
            # driver computes the audio features, not in the first chunk. (An actor that fell
            # back to the CPU is about to be refused: no point.)
            t0 = time.perf_counter()
            warm_up(self.session, batch_size)
            log.debug("generator warmed up in %.2f s", time.perf_counter() - t0)
        self.info = replace(
            _actor_info(
                "inference",
                self.session.providers,
                self.session.threads,
                # what bounds the CUDA arena, when the session got a GPU provider at all
                gpu_mem_limit_bytes=None if on_cpu else session_options.gpu_mem_limit_bytes,
            ),
            cpu_fallback=fallback,
        )
        self.info = replace(self.info, session_open_s=round(self.session.session_open_s, 3))
        # Per chunk thread, reused from chunk to chunk (fresh 40 MB arrays fault in every page,
        # every chunk).
        self._local = threading.local()
        self._turns = Turns()
        self._backlog = Backlog()
        log.info("inference actor ready: %s", self.info)

    @ray.method(concurrency_group="control")
    def describe(self) -> ActorInfo:
        return self.info

    @ray.method(concurrency_group="control")
    def session_holder(self) -> str | None:
        """The Ray task id (hex) of the ``infer`` call that holds the session now, None when
        no chunk does: where a chunk hangs, the driver charges the hang to that chunk, not to
        the other chunks waiting here for their turn."""
        return self._turns.holder

    @ray.method(concurrency_group="control")
    def backlog(self) -> dict[str, int]:
        """Frames still to infer in each ``infer`` call running here (queued for its turn or
        inferring), by Ray task id; calls Ray has not handed to a thread yet are not in it."""
        return self._backlog.snapshot()

    def _buffers(self, frames: int) -> tuple[np.ndarray, np.ndarray]:
        """This thread's (visual inputs, output images) buffers for ``frames`` frames."""
        local = self._local
        if getattr(local, "visual", None) is None or len(local.visual) < frames:
            local.visual = np.empty((frames, FRAME_SIZE, FRAME_SIZE, VISUAL_CHANNELS), np.uint8)
            local.images = np.empty((frames, FRAME_SIZE, FRAME_SIZE, 3), np.uint8)
        return local.visual[:frames], local.images[:frames]

    @ray.method(concurrency_group="chunks")
    def infer(self, spec: ChunkSpec) -> Predictions:
        """The chunk's predictions. Several chunks may be here at once (one thread each):
        they take turns on the session (:class:`Turns`), and the stage clock counts only the
        turns, not the waits between them. Its frames still to infer are in :meth:`backlog`
        while it runs."""
        clock = _StageClock()
        key = (spec.priority, spec.chunk)
        task_id = ray.get_runtime_context().get_task_id()
        visual_buf, out = self._buffers(spec.frames)
        rows = np.arange(spec.frames) if spec.weights is None else np.flatnonzero(spec.weights > 0)
        with self._backlog.counting(task_id, len(rows)) as inferred:
            with self._turns.turn(key, task_id):
                clock.restart()
                visual = self.avatar.read_visual_inputs(spec.avatar_indices, visual_buf)
                audio = audio_windows(spec.feature_rows, np.arange(spec.frames) + AUDIO_CONTEXT)
                # Returning copies it into the object store, so the buffer is free afterwards.
                if spec.weights is not None:
                    out[:] = 0  # frames that skip inference
                clock.lap("model_input")
            for b in range(0, len(rows), self.batch_size):
                batch = rows[b : b + self.batch_size]
                with self._turns.turn(key, task_id):
                    clock.restart()
                    if len(batch) == batch[-1] - batch[0] + 1:  # contiguous: views, no copies
                        lo, hi = batch[0], batch[-1] + 1
                        # Written in place: with graph I/O the session binds ``out`` as output.
                        self.session.predict(visual[lo:hi], audio[lo:hi], out=out[lo:hi])
                    else:
                        out[batch] = self.session.predict(visual[batch], audio[batch])
                    clock.lap("inference")
                inferred(len(batch))
        return Predictions(spec.chunk, out, clock.wall, clock.cpu, self.info.name)


def warm_up(session: GeneratorSession, batch_size: int) -> None:
    """Run ``session`` once on a batch of zeros (``batch_size`` frames; one for a fixed-batch
    model). Outputs are discarded; later outputs do not depend on it."""
    batch = 1 if session.fixed_batch else batch_size
    visual = np.zeros((batch, FRAME_SIZE, FRAME_SIZE, VISUAL_CHANNELS), np.uint8)
    audio = np.zeros((batch, AUDIO_CHANNELS, AUDIO_SIZE, AUDIO_SIZE), np.float32)
    try:
        session.predict(visual, audio)  # the path the chunks take (graph I/O or not)
    except ModelError as exc:
        # A model that fails on real inputs fails on the first chunk too, where the error
        # names the chunk and its frames; here it only means the warm-up did not happen.
        log.debug("warm-up failed: %s", exc)


def _staged(method):
    """For a work directory off the local disk (``job.store``): run the compositor step in
    this node's scratch directory, then upload what it wrote (see ``WorkStore.publish``)."""

    @functools.wraps(method)
    def run(
        self, spec: ChunkSpec, predictions: Predictions, job: JobContext, *more: Predictions
    ) -> ChunkResult:
        if job.store is None:
            return method(self, spec, predictions, job, *more)
        scratch = job.store.scratch()
        result = method(self, spec, predictions, replace(job, work_dir=str(scratch)), *more)
        clock = _StageClock()
        job.store.publish(scratch, result)
        clock.lap("upload")
        return replace(
            result,
            timings_s={**result.timings_s, **clock.wall},
            cpu_s={**result.cpu_s, **clock.cpu},
        )

    return run


def see_gpus_for_nvenc(codec: VideoCodec, environ=os.environ) -> bool:
    """Let an actor that holds no Ray GPU see the node's GPUs, when it encodes with NVENC.

    NVENC is a block of its own on the card: compositors use it without a ``num_gpus`` share.
    But Ray hides every GPU from an actor with ``num_gpus=0`` by setting
    ``CUDA_VISIBLE_DEVICES=""`` when the actor starts (the default until Ray made
    ``RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO`` off by default; the variable is not touched again
    after the actor starts), and FFmpeg then finds no CUDA device. Removing the empty value
    restores what the node's processes see. Returns True when it changed the environment."""
    if codec is not VideoCodec.H264_NVENC or environ.get("CUDA_VISIBLE_DEVICES") != "":
        return False
    del environ["CUDA_VISIBLE_DEVICES"]
    return True


class CompositorActor:
    """Pastes predictions into avatar frames, writes one shard per chunk and encodes the
    chunk's H.264 segment.

    One actor serves every render of a :class:`~lipsync_ray.pipeline.Renderer` (same avatar,
    same encoder settings); where to write comes with each chunk in a :class:`JobContext`.
    The chunk's frames live in one buffer reused from chunk to chunk: a fresh 180 MB array
    per chunk costs ~45,000 page faults, several ms per frame on a VM.
    """

    def __init__(
        self, avatar: str | Location, encode: EncodeOptions, cpus: float, niceness: int = 0
    ) -> None:
        import cv2

        if niceness > 0:
            # Compositing yields the CPU to inference: it runs in the gaps the generator's
            # threads leave instead of preempting one of them mid-operator (the other then
            # waits at the operator's barrier). Backpressure keeps it from falling behind.
            os.nice(niceness)
        retain_freed_memory()
        see_gpus_for_nvenc(encode.codec)
        threads = max(1, round(cpus))
        cv2.setNumThreads(threads)
        self.avatar = Avatar.open(local_copy(avatar))
        self.encode = replace(encode, threads=threads)
        self.info = _actor_info("compositor", threads=threads)
        self._buffer = np.empty((0, 0, 0, 3), np.uint8)

    @ray.method(concurrency_group="control")
    def describe(self) -> ActorInfo:
        return self.info

    def _frames(self, count: int) -> np.ndarray:
        """A C-contiguous uint8 (count, H, W, 3) view of the reused chunk buffer."""
        w, h = self.avatar.size_wh
        if len(self._buffer) < count or self._buffer.shape[1:3] != (h, w):
            self._buffer = np.empty((count, h, w, 3), np.uint8)
        return self._buffer[:count]

    @_staged
    def composite(
        self, spec: ChunkSpec, predictions: Predictions, job: JobContext, *more: Predictions
    ) -> ChunkResult:
        """Composite the chunk, write its shard and (``job.segments``) its H.264 segment.
        A chunk whose inference was split comes with the predictions of every part
        (``predictions`` then ``more``, in frame order), joined here."""
        predictions = joined_predictions((predictions, *more))
        if len(predictions.images) != spec.frames:
            raise RenderError(
                f"{spec.describe()}: predictions of {len(predictions.images)} frames, "
                f"expected {spec.frames}"
            )
        clock = _StageClock()
        idx = spec.avatar_indices
        frames = self.avatar.read_frames(idx, out=self._frames(spec.frames))
        crops = self.avatar.read_crops(idx)
        boxes = self.avatar.boxes(idx)
        clock.lap("decode")
        seams = []
        weights = spec.weights
        generated = 0
        for i in range(spec.frames):
            w = 1.0 if weights is None else float(weights[i])
            if w <= 0.0:
                continue  # silence passthrough: the avatar frame itself
            original = None if w >= 1.0 else frames[i].copy()
            blend_into(frames[i], boxes[i], crops[i], predictions.images[i], job.blend)
            if job.seam_every and generated % job.seam_every == 0:
                seams.append(_seam(frames[i], boxes[i]))
            generated += 1
            if original is not None:
                frames[i] = crossfade_frame(frames[i], original, w)
        clock.lap("composite")
        work_dir = Path(job.work_dir)
        shard = write_shard(
            shard_path(work_dir, spec.chunk),
            spec.chunk,
            np.arange(spec.start, spec.stop),
            idx,
            frames,
            job.codec,
            job.fingerprint,
            work_dir,
            checksum=job.shard_checksums,
            reuse_spare=job.reuse_spares,
        )
        clock.lap("shard_write")
        segment = None
        if job.segments:
            segment = self._encode_segment(spec, frames, shard, work_dir, job, clock)
        return ChunkResult(
            shard=shard,
            segment=segment,
            timings_s={**predictions.timings_s, **clock.wall},
            cpu_s={**predictions.cpu_s, **clock.cpu},
            generated=generated,
            seam_scores=tuple(s for s in seams if s is not None),
        )

    def _encode_segment(
        self,
        spec: ChunkSpec,
        frames: np.ndarray,
        shard: ShardInfo,
        work_dir: Path,
        job: JobContext,
        clock: _StageClock,
    ) -> ShardInfo:
        """Encode the chunk's video-only H.264 segment from the frames as the shard stores
        them: raw shards hold the buffer's bytes exactly; lossy ones are read back first."""
        if job.codec is not ShardCodec.RAW:
            expected = range(spec.start, spec.stop)
            frames = list(iter_shard_frames(work_dir / shard.file, expected))
            clock.lap("shard_read")
        path = segment_path(work_dir, spec.chunk)
        path.parent.mkdir(parents=True, exist_ok=True)
        written = encode_segment(frames, path, self.encode)
        clock.lap("encode")
        return ShardInfo.of_file(
            path, work_dir, chunk=spec.chunk, start=spec.start, stop=spec.stop, rows=written
        )


def _seam(frame: np.ndarray, box) -> float | None:
    """The seam score of one pasted frame; None where the box leaves no room to measure."""

    try:
        return float(measure_seam(frame, box).score)
    except InputError:
        return None
