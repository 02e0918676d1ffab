"""Batch renders: many audios onto one avatar with one set of warm actors.

A jobs file is JSON Lines, one render per line::

    {"audio": "clips/001.wav", "output": "out/001.mp4"}
    {"audio": "clips/002.mp3", "output": "out/002.mp4", "start_frame": 40}

Keys: ``audio`` and ``output`` (required), ``start_frame``, ``work_dir`` and ``features``
(optional, override the shared config). Relative paths are relative to the jobs file; URIs
(``s3://...``, ``file://...``; see :mod:`lipsync_ray.storage`) are taken as they are. Each job
has its own work directory, manifest, report and resume; a failing job is recorded and the
others go on.

What concerns the file as a whole is refused before anything starts (:func:`check_jobs`, one
line that names the line): a value of the wrong type, two jobs with the same output or
overlapping work directories, a job whose output is a job's audio or features.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lipsync_ray.config import RenderConfig
from lipsync_ray.errors import InputError, LipsyncError
from lipsync_ray.pipeline import Renderer
from lipsync_ray.report import ActorInfo
from lipsync_ray.storage import Location, file_key, inside, resolve
from lipsync_ray.workdir.job import work_location
from lipsync_ray.workdir.layout import REPORT

__all__ = ["BatchJob", "BatchReport", "JobOutcome", "check_jobs", "load_jobs", "render_batch"]

log = logging.getLogger(__name__)

_KEYS = {"audio", "output", "start_frame", "work_dir", "features"}
_PATHS = ("audio", "output", "work_dir", "features")  # path keys (audio, output required)
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


@dataclass(frozen=True)
class BatchJob:
    """One render of a batch."""

    audio: str
    output: str
    start_frame: int | None = None
    work_dir: str | None = None
    features: str | None = None
    line: int | None = None  # its line in the jobs file (for messages), None when built in code
    source: str | None = None  # that jobs file

    def where(self, index: int) -> str:
        """``line N`` of the jobs file, or ``job N`` (0-based) when built in code."""
        return f"line {self.line}" if self.line is not None else f"job {index}"


@dataclass(frozen=True)
class JobOutcome:
    """What became of one job."""

    index: int
    audio: str
    output: str
    ok: bool
    exit_code: int  # 0 done, 2 bad input, 1 other failure
    error: str = ""
    frames: int = 0
    fps: float = 0.0
    wall_s: float = 0.0
    chunks_reused: int = 0
    report: str = ""  # the job's report.json


@dataclass(frozen=True)
class BatchReport:
    """The batch summary; also written as JSON by :func:`render_batch` when asked."""

    jobs: tuple[JobOutcome, ...]
    wall_s: float
    actors: tuple[ActorInfo, ...]  # started once, shared by every job
    settings: dict = field(default_factory=dict)

    @property
    def failed(self) -> tuple[JobOutcome, ...]:
        return tuple(j for j in self.jobs if not j.ok)

    @property
    def exit_code(self) -> int:
        """0 when every job succeeded; 2 when the failures are all bad inputs; else 1."""
        codes = {j.exit_code for j in self.failed}
        return 0 if not codes else 2 if codes == {2} else 1

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(asdict(self), indent=2, default=str))
        return path

    def summary(self) -> str:
        lines = [
            f"{len(self.jobs) - len(self.failed)}/{len(self.jobs)} jobs done in "
            f"{self.wall_s:.1f} s on {len(self.actors)} actors started once"
        ]
        for j in self.jobs:
            status = f"{j.frames} frames, {j.fps:.1f} FPS" if j.ok else f"FAILED: {j.error}"
            lines.append(f"  [{j.index}] {j.output}: {status}")
        return "\n".join(lines)


def load_jobs(path: str | Path) -> list[BatchJob]:
    """Read a JSON Lines jobs file; relative paths are taken relative to its directory."""
    path = Path(path)
    if not path.is_file():
        raise InputError("jobs file not found", path=path)
    base = path.parent
    jobs = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"line {number}: not JSON ({exc.msg})", path=path) from None
        if not isinstance(entry, dict) or not {"audio", "output"} <= entry.keys():
            raise InputError(
                f'line {number}: expected an object with "audio" and "output", '
                f"got {line.strip()!r}",
                path=path,
            )
        unknown = set(entry) - _KEYS
        if unknown:
            raise InputError(
                f"line {number}: unknown keys {sorted(unknown)}, expected some of {sorted(_KEYS)}",
                path=path,
            )
        _check_types(entry, f"line {number}", path)

        paths = {
            key: _rebase(entry.get(key), base, f'line {number}: "{key}"', path) for key in _PATHS
        }
        jobs.append(
            BatchJob(
                audio=paths["audio"],
                output=paths["output"],
                start_frame=entry.get("start_frame"),
                work_dir=paths["work_dir"],
                features=paths["features"],
                line=number,
                source=str(path),
            )
        )
    if not jobs:
        raise InputError("expected at least one job, got an empty jobs file", path=path)
    return jobs


def _rebase(value: str | None, base: Path, what: str, source: Path) -> str | None:
    """A jobs file's path: URIs and absolute paths as they are, a relative one under ``base``
    (the jobs file's folder), which it may not leave: a file passed around (or generated)
    must not reach elsewhere by ``..``; elsewhere is said explicitly."""
    if value is None or _URI.match(str(value)) or Path(value).is_absolute():
        return value
    if ".." in Path(value).parts and not _inside(base / value, base):
        raise InputError(
            f"{what} leaves the jobs file's folder ({value!r}); give an absolute path or a "
            "URI for a file elsewhere",
            path=source,
        )
    return str(base / value)


def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or under it, by name (``..`` resolved, links not)."""
    return Path(os.path.normpath(path.absolute())).is_relative_to(
        Path(os.path.normpath(folder.absolute()))
    )


def _check_types(values: dict, where: str, source: str | Path | None) -> None:
    """The types a job's values must have: paths are non-empty strings (audio and output
    required), ``start_frame`` an int >= 0 or absent."""
    for key in _PATHS:
        value = values.get(key)
        if value is None and key not in ("audio", "output"):
            continue
        if not isinstance(value, str) or not value.strip():
            raise InputError(
                f'{where}: "{key}" must be a non-empty string (a path or URI), got {value!r}',
                path=source,
            )
    start = values.get("start_frame")
    if start is not None and (isinstance(start, bool) or not isinstance(start, int) or start < 0):
        raise InputError(
            f'{where}: "start_frame" must be an integer >= 0, got {start!r}', path=source
        )


def check_jobs(
    jobs: Sequence[BatchJob], *, avatar: str | Path | None = None, filesystem=None
) -> None:
    """Check a batch as a whole before anything starts: every job's values have the right
    types; no two jobs write the same output (links followed) or work directories of which
    one is, or is inside, the other; no job's output is a job's audio or features (its own
    included), or lies inside the ``avatar`` bundle. Per-job problems that concern one job
    only (a missing audio file, say) are left to the job: it fails and the others go on.

    Raises:
        InputError: one line naming the job's line in the jobs file (or its index).
    """
    bundle = None if avatar is None else resolve(avatar, filesystem)
    reads: dict[tuple, str] = {}  # file key -> "the audio file of line N"
    for index, job in enumerate(jobs):
        _check_types(asdict(job), job.where(index), job.source)
        for value, what in ((job.audio, "audio file"), (job.features, "feature file")):
            if value is not None:
                key = file_key(_locate(job, index, value, filesystem))
                reads.setdefault(key, f"the {what} of {job.where(index)}")
    outputs: dict[tuple, str] = {}  # file key -> "line N"
    work_dirs: list[tuple[Location, str]] = []
    for index, job in enumerate(jobs):
        where = job.where(index)
        output = _locate(job, index, job.output, filesystem)
        given = _locate(job, index, job.work_dir, filesystem) if job.work_dir else None
        work = work_location(output, given)
        key = file_key(output)
        problem = None
        if key in outputs:
            problem = f"the output {job.output} is also the output of {outputs[key]}"
        elif key in reads:
            problem = f"the output {job.output} is {reads[key]}"
        elif bundle is not None and inside(output, bundle):
            problem = f"the output {job.output} is inside the avatar bundle {avatar}"
        for other_work, other in work_dirs:
            if problem is None and (inside(work, other_work) or inside(other_work, work)):
                problem = f"the work directory {work} overlaps that of {other} ({other_work})"
        if problem is not None:
            raise InputError(f"{where}: {problem}", path=job.source)
        outputs[key] = where
        work_dirs.append((work, where))


def _locate(job: BatchJob, index: int, value: str, filesystem) -> Location:
    """``value`` (one of ``job``'s paths) resolved; its errors name the job's line."""
    try:
        return resolve(value, filesystem)
    except InputError as exc:
        raise InputError(f"{job.where(index)}: {exc}", path=job.source) from None


def render_batch(
    avatar: str | Path,
    jobs: Sequence[BatchJob],
    config: RenderConfig,
    *,
    summary_path: str | Path | None = None,
    filesystem=None,
) -> BatchReport:
    """Render every job on one set of actors; a failing job does not stop the others.

    With ``filesystem`` (a ``pyarrow.fs.FileSystem``) the avatar and the jobs' paths are paths
    inside it; without, each may be a local path or a URI (see :mod:`lipsync_ray.storage`).

    Raises only for problems shared by all jobs (the avatar, the models, the batch as a whole:
    :func:`check_jobs`, before anything starts); per-job errors are in the returned report.
    """
    check_jobs(jobs, avatar=avatar, filesystem=filesystem)
    t0 = time.perf_counter()
    outcomes = []
    with Renderer(avatar, config, filesystem=filesystem) as renderer:
        for index, job in enumerate(jobs):
            started = time.perf_counter()
            try:
                report = renderer.render(
                    job.audio,
                    job.output,
                    start_frame=job.start_frame,
                    work_dir=job.work_dir,
                    features=job.features,
                )
            except LipsyncError as exc:
                log.error("job %d (%s) failed: %s", index, job.output, exc)
                outcomes.append(
                    JobOutcome(index, job.audio, job.output, False, exc.exit_code, str(exc),
                               wall_s=time.perf_counter() - started)
                )  # fmt: skip
                continue
            except Exception as exc:  # one job's crash must not take the batch down
                log.exception("job %d (%s) crashed", index, job.output)
                outcomes.append(
                    JobOutcome(index, job.audio, job.output, False, 1,
                               f"{type(exc).__name__}: {exc}", wall_s=time.perf_counter() - started)
                )  # fmt: skip
                continue
            outcomes.append(
                JobOutcome(
                    index=index,
                    audio=job.audio,
                    output=job.output,
                    ok=True,
                    exit_code=0,
                    frames=report.frames,
                    fps=report.fps,
                    wall_s=report.wall_s,
                    chunks_reused=report.chunks_reused,
                    report=posixpath.join(report.work_dir, REPORT),
                )
            )
        actors = tuple(renderer.actor_infos)
    batch = BatchReport(
        jobs=tuple(outcomes),
        wall_s=time.perf_counter() - t0,
        actors=actors,
        settings=config.to_dict(),
    )
    if summary_path is not None:
        batch.save(summary_path)
    return batch
