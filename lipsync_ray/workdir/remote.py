"""A work directory off the local disk (``s3://``, ``gs://``, any non-local ``pyarrow.fs``).

::

    WorkStore        the compositors' side (travels in a JobContext): write a chunk's files in
                     node-local scratch (same layout), upload them, delete the local copies
    RemoteWorkDir    the driver's side: a node-local mirror that the manifest, resume and join
                     read and write, kept in step with the store

Order of a render on the driver: :meth:`RemoteWorkDir.pull` (mirror := store),
:meth:`~RemoteWorkDir.attach` (once the fingerprint is known; the manifest then goes up as
chunks finish, at most every 5 s), chunks upload themselves, :meth:`~RemoteWorkDir.fetch` (the
files the join reads), :meth:`~RemoteWorkDir.finish` (manifest and report up; shards and
segments removed unless kept; mirror dropped). :class:`lipsync_ray.workdir.WorkDir` makes
these calls.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow.fs as pafs

from lipsync_ray.errors import RenderError
from lipsync_ray.storage import (
    Location,
    delete,
    delete_if_empty,
    download,
    list_files,
    node_dir,
    stage_out,
    storage_errors,
)
from lipsync_ray.workdir import layout

if TYPE_CHECKING:
    from lipsync_ray.chunks import ChunkResult
    from lipsync_ray.workdir.manifest import Manifest

__all__ = ["RemoteWorkDir", "WorkStore"]

log = logging.getLogger(__name__)

_MANIFEST_EVERY_S = 5.0  # upload the manifest at most this often while chunks finish


@dataclass(frozen=True)
class WorkStore:
    """A work directory that is not on a local disk, as compositors see it (in a JobContext).

    Compositors write a chunk's files in :meth:`scratch` (node-local, same layout), then
    :meth:`publish` uploads them and deletes the local copies."""

    location: Location
    keep_shards: bool

    def scratch(self) -> Path:
        return node_dir("scratch", self.location)

    def publish(self, scratch: Path, result: ChunkResult) -> None:
        """Upload what the chunk ``result`` wrote in ``scratch``, then delete it there: the
        shard (unless it is released at once: segments mode without --keep-shards), then the
        segment, so a segment on the store always has its shard's record or file (the order
        orphan adoption relies on)."""
        names = []
        if result.segment is None or self.keep_shards:
            names.append(result.shard.file)
        if result.segment is not None:
            names.append(result.segment.file)
        for name in names:
            stage_out(scratch / name, self.location.join(name))
        for info in (result.shard, result.segment):
            if info is not None:
                (scratch / info.file).unlink(missing_ok=True)


class RemoteWorkDir:
    """The driver's side of a non-local work directory: a node-local mirror that the manifest,
    resume and encode code read and write, kept in step with the store."""

    def __init__(self, location: Location, *, keep_shards: bool) -> None:
        self.store = WorkStore(location, keep_shards)
        self.mirror = node_dir("mirror", location)
        self._remote_fingerprint: str | None = None
        self._manifest_path: Path | None = None
        self._uploaded = 0.0

    @property
    def location(self) -> Location:
        return self.store.location

    def pull(self) -> None:
        """Make the mirror a copy of the store (files of equal size are kept, and checked by
        their checksums when the manifest verifies them)."""
        with self._errors("cannot read the work directory"):
            is_dir = self.location.info().type == pafs.FileType.Directory
            wanted = list_files(self.location) if is_dir else {}
        self.mirror.mkdir(parents=True, exist_ok=True)
        for path in sorted(p for p in self.mirror.rglob("*") if p.is_file()):
            rel = path.relative_to(self.mirror).as_posix()
            if rel not in wanted or path.stat().st_size != wanted[rel].size:
                path.unlink()
        with self._errors("cannot read the work directory"):
            for rel, f in wanted.items():
                if not (self.mirror / rel).is_file():
                    download(self.location.filesystem, f.path, self.mirror / rel)
        manifest = layout.manifest_path(self.mirror)
        with contextlib.suppress(OSError, ValueError, AttributeError):
            self._remote_fingerprint = json.loads(manifest.read_text()).get("fingerprint")
        log.info("work directory %s mirrored in %s (%d files)", self.location, self.mirror,
                 len(wanted))  # fmt: skip

    def attach(self, fingerprint: str, manifest: Path) -> Callable[[Path], None]:
        """Called once the render's ``fingerprint`` is known, before its manifest (the file
        ``manifest``, in the mirror) is opened. A manifest of another render on the store
        means its chunk files belong to that render: remove them before any new chunk is
        uploaded, as the local path removes them. Returns the manifest's ``on_save`` hook,
        which publishes it as it changes (call :meth:`publish_manifest` once it is open)."""
        if fingerprint != self._remote_fingerprint:
            with self._errors("cannot clear the work directory"):
                self._remove_chunks()
        self._manifest_path = manifest
        return self._manifest_saved

    def _manifest_saved(self, path: Path) -> None:
        if time.monotonic() - self._uploaded >= _MANIFEST_EVERY_S:
            try:
                self.publish_manifest()
            except RenderError as exc:
                # Only a resume reads it, and it goes up again with the next chunk and at the
                # end: a store that is briefly away must not stop the chunks.
                log.warning("manifest not uploaded yet, will try again: %s", exc)
                self._uploaded = time.monotonic()

    def publish_manifest(self) -> None:
        if self._manifest_path is not None and self._manifest_path.is_file():
            stage_out(self._manifest_path, self.location.join(layout.MANIFEST))
            self._uploaded = time.monotonic()

    def fetch(self, manifest: Manifest, *, segments: bool) -> None:
        """Download into the mirror the files the join reads: every segment, or every shard."""
        records = manifest.segments if segments else manifest.chunks
        for info in records.values():
            local = self.mirror / info.file
            if local.is_file() and local.stat().st_size == info.bytes:
                continue
            with self._errors("cannot download a chunk for the join"):
                download(self.location.filesystem, self.location.join(info.file).path, local)

    def finish(self) -> None:
        """After a successful render (its output in place, its report written in the mirror):
        upload the manifest and the report, remove the shards and segments from the store
        unless they are kept, and drop the mirror."""
        self.publish_manifest()
        stage_out(layout.report_path(self.mirror), self.location.join(layout.REPORT))
        if not self.store.keep_shards:
            with self._errors("cannot remove the chunks from the work directory"):
                self._remove_chunks()
        shutil.rmtree(self.mirror, ignore_errors=True)

    def _remove_chunks(self) -> None:
        """Delete the renderer's chunk files on the store, then its chunk folders where that
        left them empty; anything else there stays."""
        for rel in list_files(self.location):
            if layout.is_chunk_file(rel):
                delete(self.location.join(rel))
        for folder in layout.CHUNK_DIRS:
            delete_if_empty(self.location.join(folder))

    def _errors(self, doing: str):
        hint = "the finished chunks are kept there: run again to resume"
        return storage_errors(self.location, RenderError, doing, hint)
