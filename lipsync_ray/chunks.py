"""The chunk plan, and the values that carry one chunk between the driver and the actors.

A render's output frames are split into consecutive chunks of C frames, planned once per render
on the driver (:func:`plan_chunks`); every part that walks the chunks (resume, scheduling, the
final join) takes the same list of :class:`ChunkRange` values.

What crosses the actor boundary for a chunk: the driver sends a :class:`ChunkSpec` to an
inference actor, which returns :class:`Predictions`; a compositor gets both and the render's
:class:`JobContext`, and returns a :class:`ChunkResult`. At a render's end a chunk's inference
may be split between inference actors (:meth:`ChunkSpec.part`); the compositor then gets every
part's predictions, in frame order, and joins them (:func:`joined_predictions`). Plain frozen
values (NumPy arrays and numbers): this module loads neither Ray nor the libraries the actors
use, so the driver-only parts (the work directory, the scheduler) can name them without
importing the actors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from lipsync_ray.contract import FEATURE_CONTEXT
from lipsync_ray.options import BlendOptions, ShardCodec

if TYPE_CHECKING:
    from lipsync_ray.shards import ShardInfo
    from lipsync_ray.workdir.remote import WorkStore

__all__ = [
    "ChunkRange",
    "ChunkResult",
    "ChunkSpec",
    "JobContext",
    "Predictions",
    "joined_predictions",
    "plan_chunks",
]


@dataclass(frozen=True)
class ChunkRange:
    """Chunk number ``chunk``: output frames ``[start, stop)``."""

    chunk: int
    start: int  # first output frame (inclusive)
    stop: int  # last output frame (exclusive)

    @property
    def frames(self) -> int:
        return self.stop - self.start

    @property
    def frame_range(self) -> range:
        return range(self.start, self.stop)

    def describe(self) -> str:
        return f"chunk {self.chunk} (frames {self.start}-{self.stop - 1})"


def plan_chunks(frames: int, chunk_frames: int) -> list[ChunkRange]:
    """Split ``frames`` output frames into ranges of ``chunk_frames`` (the last may be short)."""
    return [
        ChunkRange(i, start, min(start + chunk_frames, frames))
        for i, start in enumerate(range(0, frames, chunk_frames))
    ]


@dataclass(frozen=True)
class ChunkSpec:
    """One chunk of output frames ``[start, stop)``, with everything needed to render it.

    The range travels as three ints (not a :class:`ChunkRange`) to keep what Ray pickles for
    every chunk flat; :attr:`range` gives it back."""

    chunk: int
    start: int
    stop: int
    avatar_indices: np.ndarray  # int64 (C,): avatar frame of each output frame
    # float32 (C + 16, 512): feature rows start-8 .. stop+8, zero where they run off the audio
    feature_rows: np.ndarray
    # float32 (C,) silence passthrough: 1 generated, 0 original avatar frame (no inference),
    # in between a cross-fade; None: every frame generated.
    weights: np.ndarray | None = None
    # Where an inference actor holds chunks of several renders at once (a service), the lower
    # priority takes the session at the next batch boundary (then the lower chunk index): the
    # renderer gives every chunk its render's frame count, so a short clip's chunks go before
    # those of a long render queued on the same actor. Frames do not depend on it.
    priority: int = 0

    @property
    def range(self) -> ChunkRange:
        return ChunkRange(self.chunk, self.start, self.stop)

    @property
    def frames(self) -> int:
        return self.stop - self.start

    def describe(self) -> str:
        return self.range.describe()

    def part(self, lo: int, hi: int) -> ChunkSpec:
        """Frames ``[lo, hi)`` of this chunk (counted from its start) as a spec of their own,
        for an inference actor: same chunk number and priority, the feature rows and avatar
        frames of those frames alone, so its predictions are those frames of the whole's."""
        if not 0 <= lo < hi <= self.frames:
            raise ValueError(f"part [{lo}, {hi}) of a chunk of {self.frames} frames")
        return ChunkSpec(
            self.chunk, self.start + lo, self.start + hi, self.avatar_indices[lo:hi],
            self.feature_rows[lo : hi + FEATURE_CONTEXT],
            None if self.weights is None else self.weights[lo:hi], self.priority,
        )  # fmt: skip


@dataclass(frozen=True)
class Predictions:
    """Generator output for one chunk: uint8 (C, 320, 320, 3) BGR."""

    chunk: int
    images: np.ndarray
    timings_s: dict[str, float]  # wall seconds per stage
    cpu_s: dict[str, float]  # CPU seconds per stage (all threads of the actor process)
    actor: str


def joined_predictions(parts: tuple[Predictions, ...]) -> Predictions:
    """One chunk's predictions from those of its parts, given in frame order: the images
    one after another, each stage's seconds summed (the session time of every part)."""
    if len(parts) == 1:
        return parts[0]
    if len({p.chunk for p in parts}) != 1:
        raise ValueError(f"parts of chunks {[p.chunk for p in parts]}, expected one chunk")
    timings: dict[str, float] = {}
    cpu: dict[str, float] = {}
    for p in parts:
        for k, v in p.timings_s.items():
            timings[k] = timings.get(k, 0.0) + v
        for k, v in p.cpu_s.items():
            cpu[k] = cpu.get(k, 0.0) + v
    images = np.concatenate([p.images for p in parts])
    return Predictions(parts[0].chunk, images, timings, cpu, "+".join(p.actor for p in parts))


@dataclass(frozen=True)
class JobContext:
    """Per-render settings a compositor needs; one value per render, shared by its chunks."""

    work_dir: str
    fingerprint: str
    codec: ShardCodec
    segments: bool  # also encode the chunk's H.264 segment
    # Checksum shards for the manifest; off when each shard is deleted as soon as its segment
    # is recorded (its checksum would never be read).
    shard_checksums: bool = True
    # Overwrite a spare file (a released shard the driver kept) rather than make a new one.
    reuse_spares: bool = False
    blend: BlendOptions = field(default_factory=BlendOptions)
    seam_every: int = 8  # measure the paste seam on every n-th generated frame (0: never)
    # A work directory off the local disk: chunks are written in node-local scratch, uploaded.
    store: WorkStore | None = None


@dataclass(frozen=True)
class ChunkResult:
    """A complete chunk: its shard (and segment), and where the time went."""

    shard: ShardInfo
    segment: ShardInfo | None
    timings_s: dict[str, float] = field(default_factory=dict)
    cpu_s: dict[str, float] = field(default_factory=dict)
    generated: int = 0  # frames that went through the generator
    seam_scores: tuple[float, ...] = ()  # seams.measure_seam scores of sampled frames
