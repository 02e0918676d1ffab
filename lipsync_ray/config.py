"""The render configuration: one frozen value built on the driver and passed to every actor.

CLI flags, ``jobs/render_job.py`` and notebook keywords all build a :class:`RenderConfig`;
nothing below the driver reads environment variables or global state.
"""

from __future__ import annotations

import enum
import math
from dataclasses import asdict, dataclass, field, replace

from lipsync_ray.errors import InputError
from lipsync_ray.options import BlendOptions, EncodeOptions, Precision, SessionOptions, ShardCodec
from lipsync_ray.vad import SilenceOptions

__all__ = ["EncodeMode", "Placement", "PoolConfig", "RenderConfig"]


class Placement(enum.Enum):
    """Where the actor pools go on a multi-node cluster."""

    AUTO = "auto"  # Ray decides (right for one machine)
    SPLIT = "split"  # compositors on CPU-only nodes, inference actors on GPU nodes


class EncodeMode(enum.Enum):
    """How the MP4 is encoded from the shards."""

    SEGMENTS = "segments"  # one H.264 segment per chunk in parallel, joined by stream copy
    SINGLE = "single"  # one encoder over all frames (for comparison)


@dataclass(frozen=True)
class PoolConfig:
    """Actor pools and chunking."""

    # Generator actors, each with its own ONNX Runtime session. None: sized from the cluster
    # (see ``resolved``): 4 per GPU, or one single-threaded session per CPU without GPUs.
    inference_actors: int | None = None
    # GPU fraction per inference actor (0.25: four actors share one GPU). None: 0.25 when the
    # cluster has GPUs, else 0 (CPU provider).
    gpus_per_actor: float | None = None
    # CPUs per inference actor; sizes its ONNX Runtime and OpenCV threads. None: what is left
    # of the cluster's CPUs after the compositors, split between the inference actors.
    cpus_per_inference_actor: float | None = None
    # Compositing actors and their CPUs (each runs single-threaded OpenCV). None: sized from
    # the cluster's CPUs (see ``resolved``).
    compositors: int | None = None
    cpus_per_compositor: float = 0.5
    # Scheduling niceness of compositor processes (0-19; 0: as the inference actors). Above 0
    # compositing runs in the gaps inference leaves on shared CPUs.
    compositor_niceness: int = 0
    # Frames per generator call. None: 16 on GPUs, 1 on the CPU (see ``resolved``).
    batch_size: int | None = None
    # Output frames per chunk (= per shard).
    chunk_frames: int = 64
    # Chunks submitted but not yet written; bounds memory. 0: 2 per inference actor + 1.
    max_chunks_in_flight: int = 0
    # Attempts per chunk after the first before the render stops with an error.
    max_retries: int = 3
    # A chunk with no result within this many seconds is cancelled and retried.
    chunk_timeout_s: float = 900.0
    # Split the inference of a render's last chunks (one per inference actor) between the
    # inference actors by what each still has to infer, so that they finish together.
    split_tail: bool = True
    placement: Placement = Placement.AUTO

    def in_flight(self) -> int:
        return self.max_chunks_in_flight or 2 * (self.inference_actors or 1) + 1

    def resolved(
        self,
        cluster_cpus: float,
        cluster_gpus: float,
        *,
        cpu_step: float = 0.25,
        chunks: int | None = None,
    ) -> PoolConfig:
        """Fill the automatic fields (None) from the cluster's resources; explicit values win.

        With GPUs: ``GPU_ACTORS_PER_GPU`` inference actors per GPU at 1/4 GPU each and batch
        ``GPU_BATCH``; the compositors take the CPUs left after the driver and the inference
        actors' input preparation (16 CPUs, 1 GPU: 16 - 1 - 4 x 0.75 = 12). Without GPUs: one
        single-threaded inference actor per CPU at batch ``CPU_BATCH``, and ``max(2, CPUs //
        4)`` compositors (at most one per CPU). Sessions of one thread each beat one session
        with every thread: no intra-op barriers, and a compositor preempting one session does
        not stall the others (2 vCPUs, full model: two 1-thread sessions side by side ran
        14.1 FPS against 11.9 for one 2-thread session, and the 60 s benchmark render went
        from 176 to 145 s). An idle compositor costs only memory, and with a cheap model the
        second one is what keeps the second CPU busy (identity model: 39 -> 30 s).

        The CPUs left after the compositors are split between the inference actors, rounded
        down to ``cpu_step`` (at least one step each), so the whole pool fits the cluster:
        four actors on two CPUs get 0.25 CPU (one thread) each rather than waiting forever
        for CPUs that do not exist.

        ``chunks``: the number of chunks the pool will ever render (one render's, when the
        pool serves only it), or None. Automatic pool sizes are capped at it: a 1-second clip
        is one chunk, and every actor beyond the first would only cost its start-up (a second
        of CPU each on the 2-vCPU machine); the one inference actor then gets the CPUs the
        others would have had (its session gets their threads).
        """
        return self._resolve(cluster_cpus, cluster_gpus, cpu_step, chunks)[0]

    def explain(
        self, cluster_cpus: float, cluster_gpus: float, *, chunks: int | None = None
    ) -> str:
        """One line: how ``resolved`` sized the automatic fields for this cluster (the run
        report keeps it next to the resolved pool)."""
        return self._resolve(cluster_cpus, cluster_gpus, 0.25, chunks)[1]

    def _resolve(
        self, cluster_cpus: float, cluster_gpus: float, cpu_step: float, chunks: int | None
    ) -> tuple[PoolConfig, str]:
        gpus = self.gpus_per_actor
        if gpus is None:
            gpus = GPU_SHARE if cluster_gpus > 0 else 0.0
        on_gpu = gpus > 0 and cluster_gpus > 0
        why = [f"cluster {cluster_cpus:g} CPUs, {cluster_gpus:g} GPUs"]
        compositors, per_compositor = self.compositors, self.cpus_per_compositor
        if compositors is None and not on_gpu:  # on the CPU, before the actors that share it
            cpus = max(1, int(cluster_cpus))
            compositors = min(cpus, max(2, cpus // 4))
            why_compositors = (
                f"{compositors} compositors (CPU: max(2, CPUs // 4), at most the CPUs)"
            )
        actors = self.inference_actors
        if actors is None:
            if on_gpu:
                actors = max(1, math.floor(cluster_gpus / gpus + 1e-9))
                why.append(f"{actors} inference actors ({gpus:g} GPU each: all the GPUs)")
            elif self.cpus_per_inference_actor:  # as many as fit beside the compositors
                left = cluster_cpus - compositors * per_compositor
                actors = max(1, math.floor(left / self.cpus_per_inference_actor + 1e-9))
                why.append(
                    f"{actors} inference actors (CPU: {self.cpus_per_inference_actor:g} CPUs "
                    "each, beside the compositors)"
                )
            else:
                actors = max(1, int(cluster_cpus))
                why.append(f"{actors} inference actors (CPU: one single-threaded session per CPU)")
            if chunks is not None and actors > max(1, chunks):
                actors = max(1, chunks)
                why.append(f"capped at the render's {actors} chunk(s)")
        batch = self.batch_size
        if batch is None:
            batch = GPU_BATCH if on_gpu else CPU_BATCH
            why.append(f"batch {batch} ({'GPU' if on_gpu else 'CPU'} default)")
        if self.compositors is None:
            if on_gpu:
                left = cluster_cpus - DRIVER_CPUS - actors * GPU_ACTOR_CPUS
                compositors = max(1, math.floor(left + 1e-9))
                why.append(
                    f"{compositors} compositors ({cluster_cpus:g} CPUs - {DRIVER_CPUS:g} for the "
                    f"driver - {GPU_ACTOR_CPUS:g} per inference actor)"
                )
            else:
                why.append(why_compositors)
            if chunks is not None and compositors > max(1, chunks):
                compositors = max(1, chunks)
                why.append(f"compositors capped at the render's {compositors} chunk(s)")
        cpus = self.cpus_per_inference_actor
        if cpus is None:
            share = (cluster_cpus - compositors * per_compositor) / max(actors, 1)
            cpus = round(max(cpu_step, math.floor(share / cpu_step + 1e-9) * cpu_step), 4)
        pool = replace(
            self,
            gpus_per_actor=gpus,
            inference_actors=actors,
            compositors=compositors,
            cpus_per_compositor=per_compositor,
            batch_size=batch,
            cpus_per_inference_actor=cpus,
        )
        return pool, "; ".join(why) if len(why) > 1 else f"{why[0]}: all values given"


# Automatic pool sizes (PoolConfig.resolved), chosen by construction (not measured on a GPU):
# four sessions per GPU overlap their host-side work (uint8 -> float conversion, copies,
# Python) with each other's kernels, and batch 16 gives a GPU enough work per call to amortise
# the launch and copy overheads of a 320x320 UNet; on the CPU a bigger batch only adds cache
# pressure: a 1-thread session of the full model ran 7.35 FPS at batch 1, 6.87 at batch 4 and
# 6.59 at batch 8 (`lipsync-ray bench inference --threads 1`, 2 vCPUs).
GPU_SHARE = 0.25
GPU_BATCH = 16
CPU_BATCH = 1
DRIVER_CPUS = 1.0  # the driver: scheduling, audio features, the final join
GPU_ACTOR_CPUS = 0.75  # an inference actor on a GPU: input conversion and device copies


@dataclass(frozen=True)
class RenderConfig:
    """Everything a render needs besides the avatar, the audio and the output path."""

    # The UNet-328 generator (ONNX).
    model: str
    # The audio encoder (ONNX); or precomputed features [N, 512] float32 (.npy).
    audio_encoder: str | None = None
    features: str | None = None
    # Ray: None starts an embedded local cluster; "auto" joins `ray start`; or an address.
    address: str | None = None
    pool: PoolConfig = field(default_factory=PoolConfig)
    session: SessionOptions = field(default_factory=SessionOptions)
    # Render on the CPU when an inference actor that holds a GPU, or was asked for a GPU
    # provider alone (``--providers cuda``), gets a CPU session. False: the render stops
    # with an InputError naming ONNX Runtime's reason before any chunk.
    allow_cpu_fallback: bool = False
    encode: EncodeOptions = field(default_factory=EncodeOptions)
    encode_mode: EncodeMode = EncodeMode.SEGMENTS
    shard_codec: ShardCodec = ShardCodec.RAW
    # How the generated crop is pasted back: feathered edge (default) or the reference hard paste.
    blend: BlendOptions = field(default_factory=BlendOptions)
    # Silent stretches keep the original avatar frame (no inference); None: off.
    silence: SilenceOptions | None = None
    # Generator precision: fp32, int8 (CPU), fp16 (GPU) or auto (the fastest that passes the
    # quality gate for the provider). Reduced precisions are always gated (lipsync_ray.precision).
    precision: Precision = Precision.FP32
    precision_threshold_db: float = 35.0  # face-region PSNR against FP32 on held-out frames
    precision_cache: str | None = None  # None: <avatar>/.cache/precision
    # Where shards, manifest and report go; None: "<output>.work/".
    work_dir: str | None = None
    # Keep the shards after a successful encode (manifest and report are always kept).
    keep_shards: bool = False
    # First avatar frame (ping-pong offset).
    start_frame: int = 0
    # Replace an existing output and restart a work directory made from other inputs.
    overwrite: bool = False

    def __post_init__(self) -> None:
        validate(self)

    def to_dict(self) -> dict:
        """JSON-ready settings for the report and the manifest."""
        return _jsonable(asdict(self))


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.value
    return value


def validate(config: RenderConfig) -> None:
    """Check option values (not files: the driver checks those before starting anything)."""
    pool = config.pool
    checks = [
        (bool(config.model), "a generator model is required (--model)"),
        (
            config.audio_encoder is None or config.features is None,
            "give an audio encoder model (--audio-encoder) or precomputed features "
            "(--features), not both",
        ),
        (
            pool.inference_actors is None or pool.inference_actors >= 1,
            f"inference actors must be >= 1, got {pool.inference_actors}",
        ),
        (
            pool.compositors is None or pool.compositors >= 1,
            f"compositors must be >= 1, got {pool.compositors}",
        ),
        (
            pool.gpus_per_actor is None
            or 0 <= pool.gpus_per_actor <= 1
            or float(pool.gpus_per_actor).is_integer(),
            f"GPUs per actor must be a fraction in [0, 1] or a whole number, "
            f"got {pool.gpus_per_actor}",
        ),
        (
            pool.cpus_per_inference_actor is None or pool.cpus_per_inference_actor > 0,
            f"CPUs per inference actor must be > 0, got {pool.cpus_per_inference_actor}",
        ),
        (
            pool.cpus_per_compositor > 0,
            f"CPUs per compositor must be > 0, got {pool.cpus_per_compositor}",
        ),
        (
            pool.batch_size is None or 1 <= pool.batch_size <= 256,
            f"batch size must be in [1, 256], got {pool.batch_size}",
        ),
        (
            isinstance(pool.compositor_niceness, int) and 0 <= pool.compositor_niceness <= 19,
            f"compositor niceness must be in [0, 19], got {pool.compositor_niceness}",
        ),
        (
            1 <= pool.chunk_frames <= 4096,
            f"chunk frames must be in [1, 4096], got {pool.chunk_frames}",
        ),
        (
            pool.max_chunks_in_flight >= 0,
            f"chunks in flight must be >= 0, got {pool.max_chunks_in_flight}",
        ),
        (pool.max_retries >= 0, f"retries must be >= 0, got {pool.max_retries}"),
        (pool.chunk_timeout_s > 0, f"chunk timeout must be > 0 s, got {pool.chunk_timeout_s}"),
        (config.start_frame >= 0, f"start frame must be >= 0, got {config.start_frame}"),
        (0 <= config.encode.crf <= 51, f"CRF must be in [0, 51], got {config.encode.crf}"),
        (
            isinstance(config.precision, Precision),
            f"precision must be fp32, int8, fp16 or auto, got {config.precision!r}",
        ),
        (
            0 < config.precision_threshold_db < 100,
            f"precision threshold must be in (0, 100) dB, got {config.precision_threshold_db}",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise InputError(message)
