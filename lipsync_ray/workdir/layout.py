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

What is ours: a directory with no entries, or one whose ``manifest.json`` is ours
(:mod:`.manifest`). In it the renderer deletes only the files these names describe (the
chunk files, spares and their temp files: :func:`is_chunk_file`), and a directory it made only
once it is empty; a file of the user's beside them stays. Nothing it writes follows a symbolic
link: a link at one of these names is refused (:func:`check_no_links`).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable
from pathlib import Path

from lipsync_ray.errors import InputError

__all__ = [
    "CHUNK_DIRS",
    "MANIFEST",
    "REPORT",
    "SEGMENTS",
    "SHARDS",
    "SPARES",
    "WORK_SUFFIX",
    "check_no_links",
    "chunk_file",
    "chunk_name",
    "is_chunk_file",
    "manifest_path",
    "remove_chunk_files",
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


# A chunk file's name relative to the work directory, or the temp name of one being written
# (lipsync_ray.fileio.partial_path), or a spare; "/"-separated as on a store.
_CHUNK_FILE = re.compile(
    rf"(?:{SHARDS}/(?:{re.escape(SPARES)}/)?(?:\.)?chunk-\d{{6}}(?:\.[0-9a-f]{{8}}\.partial)?"
    rf"\.parquet|{SEGMENTS}/(?:\.)?chunk-\d{{6}}(?:\.[0-9a-f]{{8}}\.partial)?\.mp4)"
)


def chunk_file(chunk: int, *, segment: bool) -> str:
    """The name relative to the work directory of chunk ``chunk``'s shard or segment: the only
    file name a manifest may record for it."""
    return (
        f"{SEGMENTS}/{chunk_name(chunk, '.mp4')}"
        if segment
        else (f"{SHARDS}/{chunk_name(chunk, '.parquet')}")
    )


def is_chunk_file(rel: str) -> bool:
    """Whether ``rel`` (relative to the work directory, ``/``-separated) is a name the renderer
    writes in ``shards/`` or ``segments/``: a chunk file, its temp file, or a spare."""
    return _CHUNK_FILE.fullmatch(rel) is not None


def check_no_links(work_dir: str | Path) -> None:
    """Refuse a work directory where a name the renderer writes through is a symbolic link
    (a link there would make a write land outside the directory).

    Raises:
        InputError: naming the link.
    """
    root = Path(work_dir)
    names = [root / MANIFEST, root / REPORT, root / SHARDS, root / SEGMENTS, spare_dir(root)]
    for sub in (root / SHARDS, root / SEGMENTS, spare_dir(root)):
        if sub.is_dir() and not sub.is_symlink():
            names += [p for p in sub.iterdir() if is_chunk_file(p.relative_to(root).as_posix())]
    for path in names:
        if path.is_symlink():
            raise InputError(
                "the work directory holds a symbolic link where the renderer writes; "
                "remove it, or use another --work-dir",
                path=path,
            )


def remove_chunk_files(work_dir: str | Path, recorded: Iterable[str] = ()) -> None:
    """Delete the renderer's files in ``shards/`` and ``segments/`` (:func:`is_chunk_file`)
    and those in ``recorded`` (names from a manifest), then each of the two directories that
    is left empty. Anything else there stays; links are removed, never followed."""
    root = Path(work_dir)
    names = {rel for rel in recorded if is_chunk_file(rel)}
    for sub in (spare_dir(root), root / SHARDS, root / SEGMENTS):
        if sub.is_dir() and not sub.is_symlink():
            names.update(
                rel for p in sub.iterdir() if is_chunk_file(rel := p.relative_to(root).as_posix())
            )
    for rel in sorted(names):
        (root / rel).unlink(missing_ok=True)
    for sub in (spare_dir(root), root / SHARDS, root / SEGMENTS):
        if sub.is_dir() and not sub.is_symlink():
            with contextlib.suppress(OSError):  # not empty: something of the user's is there
                os.rmdir(sub)
