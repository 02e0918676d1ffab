"""Every name in a work directory, defined once.

::

    <work_dir>/                      default: <output>.work (WORK_SUFFIX)
        manifest.json                MANIFEST: fingerprint, settings, every complete chunk
        report.json                  REPORT: the run report of the last successful render
        shards/chunk-NNNNNN.parquet  SHARDS: one Parquet file per chunk (lipsync_ray.shards)
        shards/.spare/               SPARES: released shard files a new shard overwrites
        segments/chunk-NNNNNN.mp4    SEGMENTS: one video-only H.264 segment per chunk

Files are written under a hidden temp name beside their final one and renamed into place
(:func:`lipsync_ray.fileio.partial_path`: ``.<stem>.<tag>.partial<suffix>``), so a file with
a name above is always whole, and listings that skip dot names never see one half written.

A work directory off the local disk has the same layout on the store, in the driver's
node-local mirror and in each compositor's node-local scratch (:mod:`.remote`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

__all__ = [
    "CHUNK_DIRS",
    "MANIFEST",
    "REPORT",
    "SEGMENTS",
    "SHARDS",
    "SPARES",
    "WORK_SUFFIX",
    "chunk_name",
    "manifest_path",
    "remove_chunk_dirs",
    "report_path",
    "segment_path",
    "shard_path",
    "spare_dir",
]

WORK_SUFFIX = ".work"  # the default work directory: the output's path with this appended
MANIFEST = "manifest.json"
REPORT = "report.json"
SHARDS = "shards"
SEGMENTS = "segments"
SPARES = ".spare"  # inside SHARDS; a dot name, so never listed, uploaded or mirrored
CHUNK_DIRS = (SHARDS, SEGMENTS)  # what a finished render removes unless --keep-shards


def chunk_name(chunk: int, suffix: str) -> str:
    """``chunk-NNNNNN<suffix>``: the file name of chunk ``chunk``."""
    return f"chunk-{chunk:06d}{suffix}"


def manifest_path(work_dir: str | Path) -> Path:
    return Path(work_dir) / MANIFEST


def report_path(work_dir: str | Path) -> Path:
    return Path(work_dir) / REPORT


def shard_path(work_dir: str | Path, chunk: int) -> Path:
    """``<work_dir>/shards/chunk-NNNNNN.parquet``."""
    return Path(work_dir) / SHARDS / chunk_name(chunk, ".parquet")


def segment_path(work_dir: str | Path, chunk: int) -> Path:
    """``<work_dir>/segments/chunk-NNNNNN.mp4``: the chunk's video-only H.264 segment."""
    return Path(work_dir) / SEGMENTS / chunk_name(chunk, ".mp4")


def spare_dir(work_dir: str | Path) -> Path:
    """``<work_dir>/shards/.spare``: released shard files kept for new shards to overwrite."""
    return Path(work_dir) / SHARDS / SPARES


def remove_chunk_dirs(work_dir: str | Path) -> None:
    """Delete the shards (spares included) and segments; nothing there is fine."""
    for sub in CHUNK_DIRS:
        shutil.rmtree(Path(work_dir) / sub, ignore_errors=True)
