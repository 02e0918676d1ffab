"""The run report: what a render did, as a typed value and as ``<work_dir>/report.json``."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lipsync_ray.fileio import write_json
from lipsync_ray.workdir.layout import REPORT

__all__ = ["ActorInfo", "RunReport", "StageTimes", "Timeline"]

# Stages whose CPU time is measured where they run, summed over actors, per output frame.
STAGES = (
    "features",  # driver: decode audio, mel, audio encoder (once per render)
    "model_input",  # inference actor: read prepared visual inputs + audio windows
    "inference",  # inference actor: the generator's session.run
    "decode",  # compositor: read avatar frames and crops
    "composite",  # compositor: paste predictions
    "shard_write",  # compositor: encode images + write Parquet
    "shard_read",  # compositor: read a shard back for its segment (segments mode)
    "encode",  # compositor: the chunk's H.264 segment from its shard (segments mode)
    "upload",  # compositor: the chunk's files up to a work directory off the local disk
    "download",  # driver: the segments (or shards) down from that work directory for the join
    "encode_join",  # driver: join segments by stream copy (or one encoder) + AAC + mux
    "encode_audio",  # driver: the AAC track encoded ahead in a thread (then not in encode_join)
)


@dataclass(frozen=True)
class ActorInfo:
    """Who ran where, with which provider."""

    role: str  # "inference" or "compositor"
    name: str
    pid: int
    node_id: str
    providers: tuple[str, ...] = ()  # ONNX Runtime providers actually used, best first
    gpu_ids: tuple[str, ...] = ()  # GPUs Ray assigned to the actor
    threads: int = 1
    gpu_mem_limit_bytes: int | None = None  # CUDA arena limit (None: none, or not on a GPU)
    # Inference: seconds to open the generator session, before any chunk (a TensorRT engine
    # build or cache load included), so the build time is never counted as render time.
    session_open_s: float = 0.0
    # Why an inference actor that holds a GPU, or was asked for a GPU provider alone, runs
    # on the CPU: ONNX Runtime's own reason (the library that failed to load, no device...).
    # None: no fallback.
    cpu_fallback: str | None = None


@dataclass(frozen=True)
class StageTimes:
    """Milliseconds per output frame for each stage (see ``STAGES``): wall time, and CPU time
    (all threads of the process that ran the stage; both summed over actors)."""

    ms_per_frame: dict[str, float] = field(default_factory=dict)
    cpu_ms_per_frame: dict[str, float] = field(default_factory=dict)


class Timeline:
    """Where a render's wall time goes on the driver, phase by phase.

    :meth:`mark` closes the phase that ran since the previous mark (phases follow each other
    on the driver's critical path); :meth:`add` records a duration that overlaps them (Ray's
    start-up runs while the audio encoder does). ``started_at`` is the wall clock (epoch
    seconds) at which the render began, so a caller timing the whole process can tell what
    came before it (interpreter start, imports) and after it (shutdown).
    """

    def __init__(self) -> None:
        self.started_at = time.time()
        self._last = time.perf_counter()
        self._phases: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self._phases[phase] = self._phases.get(phase, 0.0) + now - self._last
        self._last = now

    def add(self, name: str, seconds: float) -> None:
        self._phases[name] = self._phases.get(name, 0.0) + seconds

    def phases(self) -> dict[str, float]:
        return {**self._phases, "started_at": self.started_at, "finished_at": time.time()}


@dataclass(frozen=True)
class RunReport:
    """The result of :func:`lipsync_ray.render`; also written to ``<work_dir>/report.json``."""

    output: str
    work_dir: str
    frames: int
    chunks: int
    chunks_rendered: int
    chunks_reused: int
    wall_s: float
    fps: float  # frames / wall time of the whole render, start-up included
    stages: StageTimes
    retries: int
    # Frames that went through the generator in this run (silence passthrough and reused
    # chunks do not), and the mean paste-seam score of sampled frames (lipsync_ray.seams:
    # ~1 = no visible edge; the hard paste of an untrained model scores ~2).
    frames_generated: int
    seam_score: float | None
    # What ran: {"precision", "requested", "path", "gate": {psnr_db, threshold_db, passed...}}
    precision: dict
    actors: tuple[ActorInfo, ...]
    providers: tuple[str, ...]  # distinct providers that ran the generator
    audio_duration_s: float
    video_duration_s: float
    settings: dict
    ray_address: str = ""
    shards_kept: bool = False
    # Wall seconds of the driver's phases, in order: "inputs" (paths, models and audio
    # checked and decoded), "start" (audio features, while Ray, the generator's precision
    # and the actors start), "actors_ready" (waiting for their sessions), "chunks", "join";
    # "ray_init" (inside "start") is the embedded cluster's start-up; "started_at" and
    # "finished_at" are epoch seconds (see Timeline).
    phases_s: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path) -> Path:
        """Write the report as JSON (atomically)."""
        return write_json(Path(path), self.to_dict(), indent=2, default=str)

    def summary(self) -> str:
        """A few human-readable lines: the key figures."""
        stages = ", ".join(f"{k} {v:.1f}" for k, v in self.stages.cpu_ms_per_frame.items())
        return (
            f"{self.frames} frames in {self.wall_s:.1f} s = {self.fps:.1f} FPS "
            f"({self.chunks_rendered} chunks rendered, {self.chunks_reused} reused, "
            f"{self.retries} retries, {self.frames_generated} frames generated, seam score "
            f"{'-' if self.seam_score is None else f'{self.seam_score:.2f}'})\n"
            f"providers: {', '.join(self.providers) or '-'}; precision: "
            f"{self.precision.get('precision', 'fp32')}\n"
            f"CPU ms/frame: {stages}\n"
            f"output: {self.output}\nreport: {self.work_dir.rstrip('/')}/{REPORT}"
        )
