"""The work directory of one render, as the driver sees it: one object from open to finish.

::

    work = WorkDir.open(job, config)         a work directory off the local disk is mirrored
    work.begin(fingerprint, frames, spares)  resume a render of the same inputs, or start afresh
    work.pending(plan)                       the chunks still to render (orphans adopted, every
                                             recorded file verified by its checksum)
    work.context()                           what the compositors need (JobContext)
    work.record(result)                      a finished chunk, into the manifest
    work.encode_audio_ahead(frames)          the AAC track, in a thread (once the last chunk
                                             is submitted: the CPUs are freeing up then)
    work.join(plan)                          the MP4: segments by stream copy (or one encoder
                                             over the shards) + the AAC track; chunk files are
                                             fetched from the store first when there is one
    report = work.finish(report)             report.json; shards and segments removed unless
                                             kept; output and report published to their stores
    work.close()                             (also on failure) the manifest up to the store

The manifest only records shards whose checksum it has seen, and a work directory of another
fingerprint is cleared (with --overwrite) or refused, so a resume never mixes two renders.

A work directory is the renderer's when it holds nothing yet or holds a manifest of its own:
:meth:`WorkDir.open` refuses any other folder (before Ray starts), and clearing one deletes
only the renderer's own files in it (:func:`lipsync_ray.workdir.layout.remove_chunk_files`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from lipsync_ray import audio as audio_mod
from lipsync_ray.chunks import ChunkRange, ChunkResult, JobContext
from lipsync_ray.config import EncodeMode, RenderConfig
from lipsync_ray.encode import (
    EncodedAudio,
    MediaInfo,
    concat_segments,
    encode_audio,
    encode_video,
    probe,
    remove_partials,
)
from lipsync_ray.errors import InputError, LipsyncError
from lipsync_ray.report import RunReport
from lipsync_ray.shards import iter_shard_frames, shard_metadata
from lipsync_ray.storage import stage_out
from lipsync_ray.workdir import layout
from lipsync_ray.workdir.job import Job
from lipsync_ray.workdir.manifest import Manifest

__all__ = ["Joined", "WorkDir"]

log = logging.getLogger(__name__)

TRACK_SAMPLE_RATE = 48_000  # the MP4's AAC track is encoded from the audio at this rate


@dataclass(frozen=True)
class _AheadAudio:
    """The AAC track encoded ahead (:meth:`WorkDir.encode_audio_ahead`), and its thread's
    wall and CPU seconds."""

    audio: EncodedAudio
    wall_s: float
    cpu_s: float


@dataclass(frozen=True)
class Joined:
    """The final encode: the MP4's media summary, and the driver's stages it ran."""

    media: MediaInfo
    timings_s: dict[str, float] = field(default_factory=dict)  # wall seconds per stage
    cpu_s: dict[str, float] = field(default_factory=dict)  # the driver's CPU seconds per stage


class WorkDir:
    """``job.work_dir``: its manifest, its chunk files, its report, and the store behind it.

    Driver-only. Use :meth:`open`, then :meth:`begin` once the fingerprint is known; as a
    context manager it calls :meth:`close` on the way out.
    """

    def __init__(self, job: Job, config: RenderConfig) -> None:
        self.job = job
        self.config = config
        self.path = job.work_dir
        self.segments = config.encode_mode is EncodeMode.SEGMENTS
        self._manifest: Manifest | None = None
        self._found: Manifest | None = None  # the manifest that open() found there
        self._claimed = False
        # The AAC track being encoded ahead: (video frames, its future), or None.
        self._audio: tuple[int, Future[_AheadAudio]] | None = None

    @classmethod
    def open(cls, job: Job, config: RenderConfig) -> WorkDir:
        """The job's work directory; one off the local disk is mirrored first (so a failing
        store fails here, before the audio is decoded or an actor starts). Checks that the
        directory is the renderer's (see :meth:`claim`)."""
        work = cls(job, config)
        if job.remote is not None:
            job.remote.pull()
        work.claim()
        if job.remote is not None or job.output_location is not None:
            job.output.parent.mkdir(parents=True, exist_ok=True)  # a node-local stand-in
        return work

    def claim(self) -> None:
        """Check, before anything is written, that the work directory is the renderer's: it
        does not exist, holds nothing (empty ``shards/`` and ``segments/`` aside) or holds a
        readable manifest; no name the renderer writes through is a symbolic link. An
        unreadable manifest is passed with ``--overwrite`` only where every entry beside it
        is one the renderer writes (the render then starts afresh).

        Raises:
            InputError: one line naming the directory, the manifest or the link.
        """
        self._claimed = True
        path = self.path
        if not path.is_dir():
            return
        layout.check_no_links(path)
        try:
            self._found = Manifest.load(path)
        except InputError:
            if not self.config.overwrite:
                raise
            if _foreign_entries(path):
                raise InputError(
                    "the work directory's manifest is unreadable and the directory holds "
                    "other files; not starting afresh there, use another --work-dir",
                    path=path,
                ) from None
            log.warning("%s: unreadable manifest, starting afresh (--overwrite)", path)
            return
        if self._found is None and _foreign_entries(path, manifest=False):
            raise InputError(
                "the work directory is not empty and holds no manifest of a render; "
                "use an empty or new --work-dir",
                path=path,
            )

    def __enter__(self) -> WorkDir:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def manifest(self) -> Manifest:
        if self._manifest is None:
            raise RuntimeError("WorkDir.begin() was not called")
        return self._manifest

    @property
    def fingerprint(self) -> str:
        return self.manifest.fingerprint

    @property
    def reuses_spares(self) -> bool:
        """Released shards (segments mode, shards not kept) stay as spare files for the next
        shards to overwrite; not on a store, where shards are written in scratch."""
        return self.segments and not self.config.keep_shards and self.job.remote is None

    # ------------------------------------------------------------------------- resume

    def begin(self, fingerprint: str, frames: int, *, spares: int = 0) -> None:
        """Open the manifest of a render of ``fingerprint`` (``frames`` output frames), or
        start one: a work directory of another fingerprint is wiped with ``--overwrite``, else
        refused. ``spares``: released shard files to keep for reuse (see
        :attr:`reuses_spares`; one per compositor and one more).

        Raises:
            InputError: the work directory belongs to another render (or its manifest is
                unreadable) and ``--overwrite`` is off.
        """
        if not self._claimed:
            self.claim()
        self.path.mkdir(parents=True, exist_ok=True)
        config, remote = self.config, self.job.remote
        manifest, found = self._found, self._found
        if manifest is not None and manifest.fingerprint != fingerprint:
            if not config.overwrite:
                raise InputError(
                    "the work directory belongs to a render of other inputs or settings; use "
                    "--overwrite to start again, or another --work-dir",
                    path=self.path,
                )
            manifest = None
        on_save = None
        if remote is not None:  # the store's chunk files of another render go first
            on_save = remote.attach(fingerprint, layout.manifest_path(self.path))
        if manifest is None:
            layout.remove_chunk_files(self.path, _recorded(found))
            manifest = Manifest(
                self.path, fingerprint, config.to_dict(), frames, config.pool.chunk_frames
            )
            manifest.save()  # published below, with the found one
        # What this render does with the manifest's files, part of the value from here on.
        self._manifest = replace(
            manifest, spares=spares if self.reuses_spares else 0, on_save=on_save
        )
        if remote is not None:
            remote.publish_manifest()

    def pending(self, plan: Sequence[ChunkRange]) -> list[ChunkRange]:
        """The chunks of ``plan`` that still need rendering, in order: files renamed into place
        but never recorded are adopted first, and a chunk whose recorded files are missing or
        fail their checksum is forgotten (rendered again)."""
        manifest = self.manifest
        self._adopt_orphans(plan)
        todo = [r for r in plan if not manifest.complete(r, segments=self.segments)]
        for r in todo:
            manifest.forget(r.chunk)
        return todo

    def _adopt_orphans(self, plan: Iterable[ChunkRange]) -> None:
        """Record files that were renamed into place but not yet listed (the driver died
        between a compositor's rename and the manifest update)."""
        manifest = self.manifest
        for rng in plan:
            chunk = rng.chunk
            path = layout.shard_path(self.path, chunk)
            if chunk not in manifest.chunks and path.exists():
                try:
                    fp, number, rows = shard_metadata(path)
                except Exception:  # an unreadable file is simply rendered again
                    continue
                if fp == manifest.fingerprint and number == chunk and rows == rng.frames:
                    manifest.adopt(path, rng)
            seg = layout.segment_path(self.path, chunk)
            if (
                self.segments
                and chunk in manifest.chunks
                and chunk not in manifest.segments
                and seg.exists()
            ):
                # Same fingerprint (the work dir was wiped otherwise) and renamed into place
                # whole; the frame count is checked by demuxing.
                try:
                    ok = probe(seg).video_frames == rng.frames
                except LipsyncError:
                    ok = False
                if ok:
                    manifest.adopt(seg, rng, segment=True)

    # ------------------------------------------------------------------------- chunks

    def context(self) -> JobContext:
        """The compositors' settings for this render's chunks."""
        config = self.config
        remote = self.job.remote
        return JobContext(
            str(self.path),
            self.fingerprint,
            config.shard_codec,
            self.segments,
            # A shard deleted as soon as its segment is recorded is never verified: no hash.
            shard_checksums=config.keep_shards or not self.segments,
            reuse_spares=self.reuses_spares,
            blend=config.blend,
            store=remote.store if remote is not None else None,
        )

    def record(self, result: ChunkResult) -> None:
        """Record a finished chunk. Its shard is released once recorded (without
        --keep-shards, in segments mode): the segment carries the chunk, and disk use stays
        bounded by the chunks in flight."""
        manifest = self.manifest
        if result.segment is not None:
            manifest.record_segment(result.segment)
        manifest.record(
            result.shard, release=result.segment is not None and not self.config.keep_shards
        )

    # --------------------------------------------------------------------------- end

    def encode_audio_ahead(self, frames: int) -> None:
        """Start encoding the MP4's AAC track for ``frames`` video frames in a thread
        (``lipsync-aac``); :meth:`join` muxes it instead of encoding it (the same bytes). The
        scheduler calls this once the render's last chunk is submitted: the AAC encode (~0.8
        CPU-s a minute of audio) then runs beside the last chunks, on CPUs they leave idle,
        instead of on the join's critical path. Once per work directory; later calls do
        nothing."""
        if self._audio is not None:
            return
        future: Future[_AheadAudio] = Future()
        job, options = self.job, self.config.encode

        def run() -> None:
            w0, c0 = time.perf_counter(), time.thread_time()
            try:
                track = audio_mod.load_audio(job.audio, sample_rate=TRACK_SAMPLE_RATE)
                encoded = encode_audio(track, TRACK_SAMPLE_RATE, frames, options)
            except BaseException as exc:  # raised again by the join, which needs the track
                future.set_exception(exc)
                return
            future.set_result(
                _AheadAudio(encoded, time.perf_counter() - w0, time.thread_time() - c0)
            )

        threading.Thread(target=run, name="lipsync-aac", daemon=True).start()
        self._audio = (frames, future)

    def join(self, plan: Sequence[ChunkRange]) -> Joined:
        """Write ``job.output`` from the recorded segments (stream copy) or shards (one
        encoder), with the job's audio as the AAC track. Times the download of the chunk
        files from the store (``download``), the AAC track where it was encoded ahead
        (``encode_audio``: its thread's wall and CPU) and the encode (``encode_join``)."""
        timings, cpu = {}, {}
        frames = sum(r.frames for r in plan)
        ahead = None
        if self._audio is not None and self._audio[0] == frames:
            # Waited for first: the thread's CPU is its own stage, not the join's (process_time
            # counts every thread of the driver).
            ahead = self._audio[1].result()
            timings["encode_audio"], cpu["encode_audio"] = ahead.wall_s, ahead.cpu_s
        t0, c0 = time.perf_counter(), time.process_time()
        if self.job.remote is not None:
            self.job.remote.fetch(self.manifest, segments=self.segments)
            timings["download"] = time.perf_counter() - t0
            cpu["download"] = time.process_time() - c0
            t0, c0 = time.perf_counter(), time.process_time()
        media = self._encode(plan, None if ahead is None else ahead.audio)
        timings["encode_join"] = time.perf_counter() - t0
        cpu["encode_join"] = time.process_time() - c0
        return Joined(media, timings, cpu)

    def _encode(self, plan: Sequence[ChunkRange], ahead: EncodedAudio | None) -> MediaInfo:
        job, config, manifest = self.job, self.config, self.manifest
        frames = sum(r.frames for r in plan)
        if ahead is not None:
            track: np.ndarray | EncodedAudio = ahead
        else:
            track = audio_mod.load_audio(job.audio, sample_rate=TRACK_SAMPLE_RATE)
        for stale in remove_partials(job.output):  # from a driver killed mid-encode
            log.info("removed %s, left by an interrupted encode", stale)
        if self.segments:
            segments = [self.path / manifest.segments[r.chunk].file for r in plan]
            return concat_segments(
                segments, track, TRACK_SAMPLE_RATE, job.output, config.encode,
                expected_frames=frames,
            )  # fmt: skip

        def shard_frames() -> Iterator[np.ndarray]:
            for r in plan:
                yield from iter_shard_frames(
                    self.path / manifest.chunks[r.chunk].file, r.frame_range
                )

        return encode_video(
            shard_frames(), track, TRACK_SAMPLE_RATE, job.output, config.encode,
            expected_frames=frames,
        )  # fmt: skip

    def finish(self, report: RunReport) -> RunReport:
        """After a successful join: remove the shards and segments (unless kept), write
        ``report.json``, move the output to its store and publish the work directory there.
        Returns the report as the user sees it (output and work directory as given)."""
        job = self.job
        if not self.config.keep_shards:
            layout.remove_chunk_files(self.path, _recorded(self.manifest))
        report.save(layout.report_path(self.path))
        if job.output_location is None and job.remote is None:
            return report
        if job.output_location is not None:
            stage_out(job.output, job.output_location)
            job.output.unlink(missing_ok=True)
        report = _relocate(report, job)
        report.save(layout.report_path(self.path))
        if job.remote is not None:
            job.remote.finish()
        return report

    def close(self) -> None:
        """Publish the manifest to the store (a resume from any node keeps the finished
        chunks); a no-op for a local work directory, or once :meth:`finish` published it."""
        if self.job.remote is not None:
            self.job.remote.publish_manifest()


def _recorded(manifest: Manifest | None) -> list[str]:
    """The chunk files a manifest accounts for (names relative to its work directory)."""
    if manifest is None:
        return []
    return [info.file for info in (*manifest.chunks.values(), *manifest.segments.values())]


# What a work directory of the renderer's holds at its top level; the chunk directories are
# checked by name inside (layout.is_chunk_file).
_OURS = {layout.MANIFEST, layout.REPORT}


def _foreign_entries(path: Path, *, manifest: bool = True) -> bool:
    """Whether the directory ``path`` holds anything the renderer did not write: with
    ``manifest`` off, any entry but empty ``shards/`` and ``segments/`` counts."""
    for entry in os.scandir(path):
        name = entry.name
        if name in layout.CHUNK_DIRS and entry.is_dir(follow_symlinks=False):
            if any(not (manifest and layout.is_chunk_file(rel)) for rel in _chunk_dir(path, name)):
                return True
        elif not manifest or (name not in _OURS and not _partial_of(name)):
            return True
    return False


def _chunk_dir(path: Path, name: str) -> list[str]:
    """The entries of ``path/name`` (``shards/.spare``'s instead of itself), relative to
    ``path``."""
    rels = []
    with os.scandir(path / name) as entries:
        for entry in entries:
            rel = f"{name}/{entry.name}"
            if rel == f"{layout.SHARDS}/{layout.SPARES}" and entry.is_dir(follow_symlinks=False):
                rels += _chunk_dir(path, rel)
            else:
                rels.append(rel)
    return rels


def _partial_of(name: str) -> bool:
    """A temp file of the manifest or the report (lipsync_ray.fileio.partial_path)."""
    return any(
        name.startswith(f".{Path(ours).stem}.") and name.endswith(f".partial{Path(ours).suffix}")
        for ours in _OURS
    )


def _relocate(report: RunReport, job: Job) -> RunReport:
    """The report as the user sees it: the output and work directory as given, not the
    node-local paths they were staged through."""
    changes: dict = {}
    if job.output_location is not None:
        changes["output"] = str(job.output_location)
    if job.remote is not None:
        work = str(job.remote.location)
        changes["work_dir"] = work
        changes["settings"] = {**report.settings, "work_dir": work}
    return replace(report, **changes) if changes else report
