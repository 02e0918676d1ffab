"""``<work_dir>/manifest.json``: what a render has finished, so a re-run can resume. Driver-only.

The manifest records a chunk's shard and segment only once their checksums are known (the
compositor computed them after the rename), and a record is saved before a released shard's
file goes: a crash between the two leaves a file, never a record of a missing one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lipsync_ray.chunks import ChunkRange
from lipsync_ray.errors import InputError
from lipsync_ray.fileio import write_json
from lipsync_ray.shards import ShardInfo, verify_file
from lipsync_ray.workdir.layout import chunk_file, manifest_path, spare_dir

__all__ = ["MANIFEST_VERSION", "Manifest", "keep_spare"]

MANIFEST_VERSION = 1


def keep_spare(path: Path, work_dir: str | Path, limit: int) -> bool:
    """Move the released shard ``path`` into the spare directory, unless it holds ``limit``
    files already. Returns whether it was kept (the caller deletes it otherwise)."""
    if limit < 1:
        return False
    spares = spare_dir(work_dir)
    spares.mkdir(parents=True, exist_ok=True)
    if spares.is_symlink() or spares.parent.is_symlink():  # a move there would leave the dir
        return False
    if sum(1 for _ in spares.glob("*.parquet")) >= limit:
        return False
    try:
        os.replace(path, spares / path.name)
    except FileNotFoundError:
        return False
    return True


@dataclass
class Manifest:
    """The fingerprint and every complete chunk of one work directory."""

    work_dir: Path
    fingerprint: str
    settings: dict
    frames: int
    chunk_frames: int
    chunks: dict[int, ShardInfo] = field(default_factory=dict)
    segments: dict[int, ShardInfo] = field(default_factory=dict)  # H.264 segments, same keys
    # Chunks whose shard was deleted after its segment was made (--keep-shards off): complete
    # when their segment verifies.
    released: set[int] = field(default_factory=set)
    # How this render treats the files (given when the manifest is made or opened, never
    # changed after; not saved):
    # called with the manifest's path after every save (a work directory off the local disk
    # uploads it: RemoteWorkDir.attach gives the hook);
    on_save: Callable[[Path], None] | None = field(default=None, compare=False, repr=False)
    # released shard files kept in ``spare_dir`` for new shards to overwrite (0: deleted).
    spares: int = field(default=0, compare=False, repr=False)

    @property
    def path(self) -> Path:
        return manifest_path(self.work_dir)

    @classmethod
    def load(cls, work_dir: Path) -> Manifest | None:
        """The manifest in ``work_dir``, or None if there is none.

        Every field is checked: a file name must be the one the layout gives its chunk
        (:func:`~lipsync_ray.workdir.layout.chunk_file`), so no recorded name leads out of
        the work directory.

        Raises:
            InputError: the file is not a manifest of this version (unparseable, truncated,
                not an object, a field of the wrong type); one line, naming it.
        """
        path = manifest_path(work_dir)
        if not path.exists() and not path.is_symlink():
            return None
        try:
            if path.is_symlink() or not path.is_file():
                raise ValueError("not a regular file")
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                raise ValueError(f"expected a JSON object, got {type(data).__name__}")
            version = data.get("version")
            if not _is_int(version) or version != MANIFEST_VERSION:
                raise ValueError(f"version {version!r:.20}, expected {MANIFEST_VERSION}")
            released = data.get("released", [])
            if not isinstance(released, list) or not all(_is_int(k) for k in released):
                raise ValueError("released must be a list of chunk numbers")
            return cls(
                work_dir=work_dir,
                fingerprint=_typed(data, "fingerprint", str),
                settings=_typed(data, "settings", dict),
                frames=_count(data, "frames"),
                chunk_frames=_count(data, "chunk_frames"),
                chunks=_records(data.get("chunks"), "chunks", segment=False),
                segments=_records(data.get("segments", {}), "segments", segment=True),
                released=set(released),
            )
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise InputError(
                f"the work directory's manifest is unreadable ({exc}); "
                "use --overwrite to start the render again",
                path=path,
            ) from exc

    def record(self, info: ShardInfo, *, release: bool = False) -> None:
        """Record a complete shard (and its segment, noted before). With ``release`` the shard
        file goes once the record is saved (its segment now carries the chunk): to the spare
        files while there are fewer than :attr:`spares`, else deleted."""
        self.chunks[info.chunk] = info
        if release:
            self.released.add(info.chunk)
        self.save()  # first the record, then the deletion: a crash between leaves a file
        if release:
            path = self.work_dir / info.file
            if not keep_spare(path, self.work_dir, self.spares):
                path.unlink(missing_ok=True)

    def record_segment(self, info: ShardInfo) -> None:
        """Note a chunk's segment; saved together with the chunk's shard by :meth:`record`."""
        self.segments[info.chunk] = info

    def adopt(self, path: Path, chunk: ChunkRange, *, segment: bool = False) -> None:
        """Record a file that is known to be whole (renamed into place) but not yet listed."""
        info = ShardInfo.of_file(
            path,
            self.work_dir,
            chunk=chunk.chunk,
            start=chunk.start,
            stop=chunk.stop,
            rows=chunk.frames,
        )
        if segment:
            self.segments[chunk.chunk] = info
        else:
            self.record(info)

    def forget(self, chunk: int) -> None:
        dropped = self.chunks.pop(chunk, None), self.segments.pop(chunk, None)
        self.released.discard(chunk)
        if any(d is not None for d in dropped):
            self.save()

    def save(self) -> None:
        data = {
            "version": MANIFEST_VERSION,
            "fingerprint": self.fingerprint,
            "frames": self.frames,
            "chunk_frames": self.chunk_frames,
            "settings": self.settings,
            "chunks": {f"{k:06d}": asdict(v) for k, v in sorted(self.chunks.items())},
            "segments": {f"{k:06d}": asdict(v) for k, v in sorted(self.segments.items())},
            "released": sorted(self.released),
        }
        self.work_dir.mkdir(parents=True, exist_ok=True)
        write_json(self.path, data, indent=1)
        if self.on_save is not None:
            self.on_save(self.path)

    def verified(self, chunk: ChunkRange) -> bool:
        """True when the chunk's shard is recorded, present, whole and unchanged."""
        return self._verified(self.chunks.get(chunk.chunk), chunk)

    def complete(self, chunk: ChunkRange, *, segments: bool) -> bool:
        """Whether a chunk needs no more work: its segment verifies (segments mode) and its
        shard verifies or was released after the segment was made."""
        if not segments:
            return self.verified(chunk)
        if not self.verified_segment(chunk):
            return False
        return chunk.chunk in self.released or self.verified(chunk)

    def verified_segment(self, chunk: ChunkRange) -> bool:
        """True when the chunk's H.264 segment is recorded, present, whole and unchanged."""
        return self._verified(self.segments.get(chunk.chunk), chunk)

    def _verified(self, info: ShardInfo | None, chunk: ChunkRange) -> bool:
        if info is None or (info.start, info.stop, info.rows) != (
            chunk.start,
            chunk.stop,
            chunk.frames,
        ):
            return False
        return verify_file(self.work_dir / info.file, info)


_INFO_TYPES = {"chunk": int, "start": int, "stop": int, "rows": int, "sha256": str,
               "bytes": int, "file": str}  # fmt: skip


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _typed(data: dict, key: str, kind: type):
    value = data.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{key} must be a JSON {kind.__name__}, got {value!r:.40}")
    return value


def _count(data: dict, key: str) -> int:
    value = _typed(data, key, int)
    if value < 0:
        raise ValueError(f"{key} must be >= 0, got {value}")
    return value


def _records(value, key: str, *, segment: bool) -> dict[int, ShardInfo]:
    """A manifest's ``chunks`` or ``segments``: chunk number (6 digits) -> its record."""
    if not isinstance(value, dict):
        raise ValueError(f"{key} must be a JSON object")
    records = {}
    for name, fields in value.items():
        if not (isinstance(fields, dict) and fields.keys() == _INFO_TYPES.keys()):
            raise ValueError(f"{key}[{name!r:.20}] must have the fields {sorted(_INFO_TYPES)}")
        for field_name, kind in _INFO_TYPES.items():
            _typed(fields, field_name, kind)
        info = ShardInfo(**fields)
        if not (name.isdigit() and int(name) == info.chunk):
            raise ValueError(f"{key}[{name!r:.20}] records chunk {info.chunk}")
        if info.file != chunk_file(info.chunk, segment=segment):
            raise ValueError(
                f"{key}[{name!r:.20}] names {info.file!r:.60}, expected "
                f"{chunk_file(info.chunk, segment=segment)!r}"
            )
        records[info.chunk] = info
    return records
