"""The job runner: takes submitted jobs, runs at most ``max_running`` at once, each in its own
thread through a warm Renderer, and keeps every job's record in the database.

Each job has its own directory, ``<state_dir>/jobs/<id>/``::

    audio        the uploaded bytes, as received
    work/        the render's work directory (manifest, chunks, report.json)
    output.mp4   the result, there once the render succeeded

A render's chunks are recorded in its work directory as they finish, so a job interrupted by
a crash, a kill or a drain resumes where it was: a restarted service queues every job whose
record is not final again, and the render reuses the chunks already made.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from lipsync_ray.errors import Cancelled, InputError, LipsyncError
from lipsync_ray.service.avatars import AvatarCatalog
from lipsync_ray.service.jobs import JobOptions, JobRecord, JobState, check_job_id
from lipsync_ray.service.settings import ServiceSettings
from lipsync_ray.service.store import JobStore
from lipsync_ray.service.warm import WarmKey, WarmRenderers

__all__ = ["JobManager", "UnknownJobError"]

log = logging.getLogger(__name__)

AUDIO_NAME = "audio"
OUTPUT_NAME = "output.mp4"
WORK_NAME = "work"
CANCEL_GRACE_S = 10.0  # after a drain's cancel, how long the renders get to stop


class UnknownJobError(InputError):
    """No job with that id."""


class DrainingError(LipsyncError):
    """The service is shutting down and takes no new job."""


class JobManager:
    """Submitted jobs, their threads and their records.

    Args:
        settings: the service's settings (state directory, limits, the base RenderConfig).
        make_renderer: ``(avatar location, RenderConfig) -> Renderer`` (tests pass fakes);
            default: :class:`lipsync_ray.pipeline.Renderer`.
    """

    def __init__(
        self,
        settings: ServiceSettings,
        *,
        make_renderer: Callable | None = None,
    ) -> None:
        self.settings = settings
        self.jobs_dir = Path(settings.state_dir) / "jobs"
        self.uploads_dir = Path(settings.state_dir) / "uploads"
        for d in (self.jobs_dir, self.uploads_dir):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        for stale in self.uploads_dir.glob("upload-*"):  # bodies of requests a crash cut off
            stale.unlink(missing_ok=True)
        self.store = JobStore(settings.state_dir)
        self.catalog = AvatarCatalog(settings.avatars)
        self.defaults = JobOptions.defaults(settings.config)
        self._make_renderer = make_renderer or _pipeline_renderer
        self.warm = WarmRenderers(self._make, settings.max_warm)
        self._lock = threading.Lock()
        self._live: dict[str, JobRecord] = {}  # running jobs: their latest record
        self._cancels: dict[str, threading.Event] = {}
        self._futures: dict[str, Future] = {}
        self._draining = False
        self._executor = ThreadPoolExecutor(settings.max_running, thread_name_prefix="job")

    # ------------------------------------------------------------------------ requests

    def resume(self) -> list[str]:
        """Queue every job a previous run left unfinished (oldest first); their ids."""
        ids = []
        for record in self.store.unfinished():
            log.info("resuming job %s (%s, %d frames done)", record.id, record.state.value,
                     record.frames_done)  # fmt: skip
            self._queue(record.id)
            ids.append(record.id)
        return ids

    def new_upload(self) -> Path:
        """A fresh file for an upload's bytes (the caller writes it, then :meth:`submit`)."""
        fd, name = tempfile.mkstemp(dir=self.uploads_dir, prefix="upload-")
        os.close(fd)
        return Path(name)

    def check_audio(self, upload: Path) -> None:
        """Decode the uploaded audio; InputError (without the file's path) when it is bad."""
        from lipsync_ray.audio import load_audio

        try:
            load_audio(upload)
        except InputError as exc:
            raise InputError(f"bad audio: {exc.message}") from None

    def submit(self, avatar: str, options: JobOptions, upload: Path) -> JobRecord:
        """Make a job of an upload already checked (:meth:`check_audio`), queue it."""
        if self._draining:
            raise DrainingError("the service is shutting down: no new jobs")
        self.catalog.location(avatar)  # UnknownAvatarError
        record = JobRecord.new(avatar, options)
        job_dir = self.job_dir(record.id)
        job_dir.mkdir(mode=0o700)
        os.replace(upload, job_dir / AUDIO_NAME)
        self.store.put(record)
        log.info("job %s queued: avatar %r, %s", record.id, avatar, options.to_dict())
        self._queue(record.id)
        return record

    def get(self, job_id: str) -> JobRecord:
        if not check_job_id(job_id):
            raise UnknownJobError(f"unknown job {job_id[:64]!r}")
        with self._lock:
            live = self._live.get(job_id)
        record = live or self.store.get(job_id)
        if record is None:
            raise UnknownJobError(f"unknown job {job_id!r}")
        return record

    def list(self, limit: int = 100) -> list[JobRecord]:
        records = self.store.list(limit)
        with self._lock:
            return [self._live.get(r.id, r) for r in records]

    def video(self, job_id: str) -> Path | None:
        """The MP4 of a done job, else None."""
        record = self.get(job_id)
        if record.state is not JobState.DONE:
            return None
        return self.job_dir(job_id) / OUTPUT_NAME

    def cancel(self, job_id: str) -> JobRecord:
        """Cancel a queued or running job (a finished one is returned unchanged)."""
        self.get(job_id)  # UnknownJobError
        with self._lock:
            record = self._live.get(job_id) or self.store.get(job_id)
            if record is None or record.state.finished:
                return record
            record = self._put(record, state=JobState.CANCELLED, finished_at=time.time(),
                               error=None)  # fmt: skip
            event = self._cancels.setdefault(job_id, threading.Event())
        event.set()
        log.info("job %s cancelled", job_id)
        return record

    def job_dir(self, job_id: str) -> Path:
        if not check_job_id(job_id):  # only a generated id ever names a directory
            raise UnknownJobError(f"unknown job {job_id[:64]!r}")
        return self.jobs_dir / job_id

    # ---------------------------------------------------------------------- lifecycle

    @property
    def draining(self) -> bool:
        return self._draining

    def drain(self, timeout_s: float) -> None:
        """Take no new job, leave the queued ones queued, give the running ones ``timeout_s``
        seconds, then cancel them (their records stay unfinished: a restart resumes them),
        and close the warm Renderers."""
        with self._lock:
            self._draining = True
            futures = dict(self._futures)
        self._executor.shutdown(wait=False, cancel_futures=True)
        running = [f for f in futures.values() if not f.done()]
        log.info("draining: %d job(s) running, up to %g s", len(running), timeout_s)
        deadline = time.monotonic() + timeout_s
        for future in running:
            with contextlib.suppress(Exception):
                future.result(timeout=max(0.0, deadline - time.monotonic()))
        left = [i for i, f in futures.items() if not f.done()]
        if left:
            log.info("drain: %d job(s) still running, stopped (resumable): %s", len(left), left)
            with self._lock:
                for job_id in left:
                    self._cancels.setdefault(job_id, threading.Event()).set()
            deadline = time.monotonic() + CANCEL_GRACE_S
            for job_id in left:
                with contextlib.suppress(Exception):
                    futures[job_id].result(timeout=max(0.0, deadline - time.monotonic()))
        self.warm.close()

    def close(self) -> None:
        self.warm.close()
        self.store.close()

    # -------------------------------------------------------------------------- runner

    def _queue(self, job_id: str) -> None:
        with self._lock:
            self._cancels.setdefault(job_id, threading.Event())
            try:
                self._futures[job_id] = self._executor.submit(self._run, job_id)
            except RuntimeError:  # a drain began meanwhile: the record stays queued
                log.info("job %s stays queued for the next start (draining)", job_id)

    def _put(self, record: JobRecord, **changes) -> JobRecord:
        """Store ``record`` with ``changes`` (under ``self._lock``)."""
        record = self.store.update(record, **changes)
        if record.id in self._live:
            self._live[record.id] = record
        return record

    def _transition(self, job_id: str, **changes) -> JobRecord | None:
        """Apply ``changes`` to a job that is not final yet; None when it is (cancelled)."""
        with self._lock:
            record = self._live.get(job_id) or self.store.get(job_id)
            if record is None or record.state.finished:
                return None
            return self._put(record, **changes)

    def _run(self, job_id: str) -> None:
        with self._lock:
            if self._draining:
                return
            cancel = self._cancels.setdefault(job_id, threading.Event())
            record = self.store.get(job_id)
            if record is None or record.state.finished or cancel.is_set():
                return
            self._live[job_id] = record
            self._put(record, state=JobState.RUNNING, started_at=time.time(),
                      finished_at=None, error=None, frames_reused=0)  # fmt: skip
        try:
            self._render(job_id, record, cancel)
            self._transition(job_id, state=JobState.DONE, finished_at=time.time())
            log.info("job %s done", job_id)
        except Cancelled:
            if not self._draining:  # a user's cancel: the record says so already
                self._transition(job_id, state=JobState.CANCELLED, finished_at=time.time())
            else:  # a drain: left for the next start to resume
                self._transition(job_id, state=JobState.QUEUED)
        except LipsyncError as exc:
            log.info("job %s failed: %s", job_id, exc)
            self._fail(job_id, str(exc))
        except Exception as exc:
            log.exception("job %s failed unexpectedly", job_id)
            self._fail(job_id, f"unexpected {type(exc).__name__}: {exc}")
        finally:
            with self._lock:
                self._live.pop(job_id, None)
                self._cancels.pop(job_id, None)
                self._futures.pop(job_id, None)

    def _fail(self, job_id: str, message: str) -> None:
        line = message.strip().splitlines()[0] if message.strip() else "failed"
        self._transition(job_id, state=JobState.FAILED, finished_at=time.time(), error=line)

    def _render(self, job_id: str, record: JobRecord, cancel: threading.Event) -> None:
        job_dir = self.job_dir(job_id)
        output = job_dir / OUTPUT_NAME
        if output.exists():  # rendered before a crash, the record not updated yet
            return
        config = record.options.renderer_config(self.settings.config)
        key = WarmKey.of(record.avatar, config)

        first = [True]  # the first call tells the frames reused from the work directory

        def on_frames(done: int, total: int) -> None:
            reused = {"frames_reused": int(done)} if first[0] else {}
            first[0] = False
            self._transition(job_id, frames_done=int(done), frames_total=int(total), **reused)

        with self.warm.lease(key, cancel) as renderer:
            report = renderer.render(
                job_dir / AUDIO_NAME,
                output,
                start_frame=record.options.start_frame,
                work_dir=job_dir / WORK_NAME,
                on_frames=on_frames,
                cancel=cancel,
            )
        frames = getattr(report, "frames", None)
        if frames is not None:
            self._transition(job_id, frames_done=frames, frames_total=frames)

    def _make(self, key: WarmKey):
        location = self.catalog.location(key.avatar)
        log.info("starting a warm renderer for avatar %r", key.avatar)
        return self._make_renderer(location, key.config)


def _pipeline_renderer(location, config):
    from lipsync_ray.pipeline import Renderer

    return Renderer(location, config)
