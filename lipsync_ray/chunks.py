"""The chunk plan: a render's output frames split into consecutive chunks of C frames.

Planned once per render on the driver (:func:`plan_chunks`); every part that walks the chunks
(resume, scheduling, the final join) takes the same list of :class:`ChunkRange` values.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ChunkRange", "plan_chunks"]


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
