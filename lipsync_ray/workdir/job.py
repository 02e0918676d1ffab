"""A render request's paths, checked and staged: :func:`check_job_paths`, :func:`make_job`,
:func:`open_avatar`.

::

    check_job_paths(audio, output)     cheap checks before models or the avatar are opened, and
                                       before Ray starts: inputs exist and can be read, the
                                       output is none of them, the output's directory and the
                                       work directory take a probe file, an existing output
                                       needs --overwrite (storage errors are InputErrors that
                                       name the URI)
    make_job(config, avatar, ...)      a validated Job: local paths, or node-local stand-ins
    open_avatar(location)              in place when local, else staged into this node's cache
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pyarrow.fs import LocalFileSystem

from lipsync_ray.avatar import Avatar
from lipsync_ray.config import RenderConfig
from lipsync_ray.errors import InputError, ModelError
from lipsync_ray.storage import (
    Location,
    check_readable,
    check_writable,
    file_key,
    inside,
    node_dir,
    resolve,
    stage_in,
)
from lipsync_ray.workdir.layout import WORK_SUFFIX
from lipsync_ray.workdir.remote import RemoteWorkDir

__all__ = [
    "Job",
    "check_job_paths",
    "check_not_an_input",
    "config_models",
    "make_job",
    "open_avatar",
    "work_location",
]


@dataclass(frozen=True)
class Job:
    """One validated render request."""

    audio: Path
    output: Path
    work_dir: Path
    start_frame: int
    features: Path | None
    # Set where the output or the work directory is off the local disk (lipsync_ray.storage):
    # ``output`` and ``work_dir`` above are then node-local stand-ins.
    output_location: Location | None = None
    remote: RemoteWorkDir | None = None


def check_job_paths(
    audio: str | Path | Location,
    output: str | Path | Location,
    overwrite: bool,
    *,
    filesystem=None,
    work_dir: str | Path | Location | None = None,
    avatar: str | Path | Location | None = None,
    features: str | Path | Location | None = None,
    models: Sequence[str | Path] = (),
) -> tuple[Location, Location]:
    """Cheap checks of a render's own paths, before models or the avatar are opened and before
    Ray starts, in this order:

    1. the inputs: the audio and ``features`` are files that can be read, ``avatar`` is a
       directory, the ``models`` (local paths) exist;
    2. the output: an ``.mp4`` in an existing directory, not a directory, not one of the inputs
       (the same file once links are followed, hard links included) and not inside the avatar
       bundle; the work directory (``work_dir``, default ``<output>.work``) not a file; a probe
       file is written in both places and removed;
    3. last, only then: an existing output needs ``overwrite`` (so that message never hides a
       missing input).

    Paths may be URIs or paths inside ``filesystem``; returns (output, audio) resolved.

    Raises:
        InputError: one line naming the path and the cause, storage failures included (no
            such bucket, credentials refused, an endpoint that cannot be reached or times out).
        ModelError: a model file that is not there.
    """
    import pyarrow.fs as pafs

    output, audio = resolve(output, filesystem), resolve(audio, filesystem)
    work = work_location(output, work_dir, filesystem)
    inputs = [_check_input_file(audio, "audio file")]
    if features is not None:
        inputs.append(_check_input_file(resolve(features, filesystem), "feature file"))
    bundle = None
    if avatar is not None:
        bundle = resolve(avatar, filesystem)
        if check_readable(bundle).type != pafs.FileType.Directory:
            raise InputError("avatar bundle directory not found", path=bundle)
    for model in models:
        if not Path(model).is_file():
            raise ModelError("model file not found", path=model)
        inputs.append(resolve(model))

    parent = output.parent()
    parent_type = check_readable(parent).type
    if parent_type != pafs.FileType.Directory and not (
        parent_type == pafs.FileType.NotFound and _object_store(output)
    ):
        raise InputError("the output's directory does not exist", path=parent)
    output_type = check_readable(output).type
    if output_type == pafs.FileType.Directory:
        raise InputError("the output is a directory", path=output)
    suffix = Path(output.name).suffix
    if suffix.lower() not in (".mp4", ".m4v", ".mov"):
        raise InputError(f"the output must be an .mp4 file, got {suffix!r}", path=output)
    check_not_an_input(output, inputs, bundle)
    if check_readable(work).type == pafs.FileType.File:
        raise InputError("the work directory is a file", path=work)
    check_writable(parent)
    check_writable(work)
    if output_type != pafs.FileType.NotFound and not overwrite:
        raise InputError("the output exists; use --overwrite to replace it", path=output)
    return output, audio


def check_not_an_input(
    output: Location, inputs: Sequence[Location], avatar: Location | None = None
) -> None:
    """Refuse an ``output`` that is one of ``inputs`` (the same file once links are followed,
    hard links included: ``--overwrite`` would replace the input) or lies inside the
    ``avatar`` bundle (every file there is part of the avatar).

    Raises:
        InputError: naming the output and the input it would replace.
    """
    key = file_key(output)
    for source in inputs:
        if file_key(source) == key:
            raise InputError(
                f"the output is an input of this render ({source}); write it elsewhere",
                path=output,
            )
    if avatar is not None and inside(output, avatar):
        raise InputError(
            f"the output is inside the avatar bundle ({avatar}); write it elsewhere",
            path=output,
        )


def _check_input_file(location: Location, what: str) -> Location:
    """``location`` is a file that can be read (on the local disk, its first byte is read:
    permission bits do not tell for root)."""
    import pyarrow.fs as pafs

    kind = check_readable(location).type
    if kind == pafs.FileType.NotFound:
        raise InputError(f"{what} not found", path=location)
    if kind == pafs.FileType.Directory:
        article = "an" if what[0] in "aeiou" else "a"
        raise InputError(f"is a directory, expected {article} {what}", path=location)
    if kind != pafs.FileType.File:
        raise InputError(f"expected a regular {what}, got a special file", path=location)
    local = location.local_path()
    if local is not None:
        try:
            with open(local, "rb") as f:
                f.read(1)
        except OSError as exc:
            raise InputError(f"{what} not readable: {exc.strerror or exc}", path=location) from None
    return location


def make_job(
    config: RenderConfig,
    avatar: Avatar,
    audio: str | Path | Location,
    output: str | Path | Location,
    *,
    start_frame: int | None,
    work_dir: str | Path | None,
    features: str | Path | None,
    filesystem=None,
) -> Job:
    """Validate one render request against ``config`` and ``avatar`` and stage its inputs.

    ``start_frame``, ``work_dir`` and ``features`` override the config's where not None."""
    fs = filesystem
    if work_dir is None:
        work_dir = config.work_dir
    features = features if features is not None else config.features
    output_at, audio_at = check_job_paths(
        audio, output, config.overwrite, filesystem=fs, work_dir=work_dir, features=features,
        models=config_models(config), avatar=Location(LocalFileSystem(), str(avatar.path)),
    )  # fmt: skip
    start = config.start_frame if start_frame is None else start_frame
    period = max(1, 2 * avatar.frame_count - 2)
    if not 0 <= start < period:
        raise InputError(
            f"start frame must be in [0, {period}) for an avatar of "
            f"{avatar.frame_count} frames, got {start}",
            path=avatar.path,
        )
    work_at = work_location(output_at, work_dir, fs)
    if features is None and not config.audio_encoder:
        raise InputError("give an audio encoder model or precomputed features")
    output_local, work_local = output_at.local_path(), work_at.local_path()
    remote = None
    if work_local is None:
        remote = RemoteWorkDir(work_at, keep_shards=config.keep_shards)
        work_local = remote.mirror
    return Job(
        audio=stage_in(audio_at),
        output=output_local or node_dir("output", output_at) / output_at.name,
        work_dir=work_local.resolve(),
        start_frame=start,
        features=None if features is None else stage_in(resolve(features, fs)),
        output_location=None if output_local else output_at,
        remote=remote,
    )


def config_models(config: RenderConfig) -> tuple[str, ...]:
    """The model files a render with ``config`` reads: the generator and the audio encoder."""
    return tuple(str(m) for m in (config.model, config.audio_encoder) if m)


def work_location(
    output: Location, work_dir: str | Path | Location | None, filesystem=None
) -> Location:
    """A render's work directory: ``work_dir`` (in ``filesystem``), or by default
    ``<output>.work`` beside the output."""
    return resolve(work_dir, filesystem) if work_dir else output.sibling(WORK_SUFFIX)


def _object_store(location: Location) -> bool:
    """S3 and GCS have no directories: an output's "directory" appears with its first file."""
    fs = location.filesystem
    while hasattr(fs, "base_fs"):  # SubTreeFileSystem
        fs = fs.base_fs
    return fs.type_name in ("s3", "gcs")


def open_avatar(location: Location) -> tuple[Avatar, Location | None]:
    """Open the avatar bundle at ``location``: in place when it is local, else staged into
    this node's cache (then also returned, for the actors to stage on their nodes). Errors
    about a staged copy name the file at its source."""
    local = location.local_path()
    if local is not None:
        return Avatar.open(local), None
    import pyarrow.fs as pafs

    if check_readable(location).type != pafs.FileType.Directory:
        raise InputError("avatar bundle directory not found", path=location)
    staged = stage_in(location)
    try:
        return Avatar.open(staged), location
    except InputError as exc:
        path = exc.path
        if path is not None and path.startswith(str(staged)):
            path = str(location) + path[len(str(staged)) :]
        raise type(exc)(exc.message, path=path) from None
