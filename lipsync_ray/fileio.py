"""Atomic file writes and file hashes: the one place either is done.

::

    atomic_path(path, fsync=False)     a temp path beside ``path``; renamed onto it when the
                                       block succeeds, removed when it fails
    write_bytes / write_text / write_json(path, ..., fsync=False)
    partial_path(path), partials(path) the temp name, and the leftovers of a killed writer
    file_sha256(*paths, prefix=b"")    SHA-256 of the files' bytes, one after the other
    private_temp_dir(name)             ``<tmp>/lipsync-ray-<uid>/<name>``: this user's, mode 0700

A file at its final name is always whole: the temp file sits in the same directory (so the
rename is atomic on POSIX) and is named ``.<stem>.<tag>.partial<suffix>``: hidden (listings of a
work directory skip dot names), unique per writer, and with the final suffix kept.

``fsync`` forces the bytes to disk before the rename, so a power cut leaves the old file or the
new one, never a torn one. It is off by default: what can be made again cheaply (shards,
manifests, reports, downloads) is checked on resume instead of paid for on every write.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from lipsync_ray.errors import InputError, LipsyncError

__all__ = [
    "atomic_path",
    "file_sha256",
    "partial_path",
    "partials",
    "private_temp_dir",
    "write_bytes",
    "write_json",
    "write_text",
]

_BLOCK = 1 << 20  # hashing buffer, bytes


def partial_path(path: str | Path, tag: str | None = None) -> Path:
    """``<dir>/.<stem>.<tag>.partial<suffix>``: where a writer of ``path`` writes first
    (``tag``: 8 random hex digits unless given)."""
    path = Path(path)
    return path.with_name(f".{path.stem}.{tag or uuid.uuid4().hex[:8]}.partial{path.suffix}")


def partials(path: str | Path) -> list[Path]:
    """The temp files that writers of ``path`` left beside it (sorted)."""
    path = Path(path)
    return sorted(path.parent.glob(partial_path(path, "*").name))


@contextlib.contextmanager
def atomic_path(path: str | Path, *, fsync: bool = False) -> Iterator[Path]:
    """Yield a temp path beside ``path`` to write; on success it is renamed onto ``path``
    (after an fsync with ``fsync``), on any exception it is removed and ``path`` is untouched.
    The directory must exist."""
    path = Path(path)
    tmp = partial_path(path)
    try:
        yield tmp
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | Path, data: bytes, *, fsync: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`); returns ``path``."""
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str, *, fsync: bool = False) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path``."""
    return write_bytes(path, text.encode(), fsync=fsync)


def write_json(path: str | Path, obj, *, fsync: bool = False, **dumps) -> Path:
    """Write ``json.dumps(obj, **dumps)`` to ``path`` atomically; returns ``path``."""
    return write_text(path, json.dumps(obj, **dumps), fsync=fsync)


def file_sha256(*paths: str | Path, prefix: bytes = b"") -> str:
    """Hex SHA-256 of ``prefix`` and then the bytes of every file in ``paths``, in order (one
    path: the file's own SHA-256)."""
    digest = hashlib.sha256(prefix)
    for path in paths:
        with open(path, "rb") as f:
            while block := f.read(_BLOCK):
                digest.update(block)
    return digest.hexdigest()


def private_temp_dir(name: str, *, error: type[LipsyncError] = InputError) -> Path:
    """``<tmp>/lipsync-ray-<uid>/<name>`` (``tempfile.gettempdir()``, read at each call), made
    with mode 0700; returned once both directories are verified to be this user's own.

    The system temp directory is shared: another user could make these paths first and plant
    files in them (a model, a TensorRT plan, a staged avatar), so neither may be a link,
    owned by someone else, or writable by the group or others. One of ours that others may
    only read (made by an older version, or by ``mkdir -p``) is closed to them (chmod 0700).

    Raises:
        ``error``: a path that is not this user's private directory (the message names it).
    """
    uid = os.getuid()
    base = Path(tempfile.gettempdir()) / f"lipsync-ray-{uid}"
    for path in (base, base / name):
        try:
            path.mkdir(mode=0o700, exist_ok=True)
            info = os.lstat(path)
            ours = stat.S_ISDIR(info.st_mode) and info.st_uid == uid
            if ours and not info.st_mode & 0o022:
                if info.st_mode & 0o077:
                    os.chmod(path, 0o700)
                continue
        except OSError as exc:
            raise error(f"cannot make a private directory: {exc.strerror}", path=path) from exc
        kind = "a link" if stat.S_ISLNK(info.st_mode) else f"mode {info.st_mode & 0o777:o}"
        raise error(
            f"expected a private directory of uid {uid} (mode 700, not a link), got {kind} "
            f"owned by uid {info.st_uid}: remove it, or set TMPDIR to another directory",
            path=path,
        )
    return base / name
