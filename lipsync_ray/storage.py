"""Where inputs and outputs live: local paths, or ``pyarrow.fs`` URIs and filesystems.

A render's avatar, audio, features, output and work directory may each be a plain path, a URI
that :meth:`pyarrow.fs.FileSystem.from_uri` understands (``file://``, ``s3://``, ``gs://``,
``hdfs://``), or a path inside a filesystem the caller gives (a ``SubTreeFileSystem``, say).
Everything is resolved to a :class:`Location` on the driver, before anything starts.

A location is *local* when its filesystem is the local disk (``LocalFileSystem``, or a
``SubTreeFileSystem`` over it): it is then used in place, exactly like a plain path, and on a
multi-node cluster it must be on storage that every node mounts at the same path. Anything else
is staged through a node-local cache (:func:`local_cache`: this user's own, mode 0700)::

    avatar, audio, features   stage_in: copied once per node and version (memory maps need files)
    output                    written locally, then stage_out: temp name + move, never partial
    work directory            lipsync_ray.workdir.remote: compositors write shards and segments
                              in node-local scratch and upload them; the driver mirrors the
                              work directory, keeps the manifest in step and fetches the
                              segments for the join

Failures of the store itself (no such bucket, credentials refused, an endpoint that cannot be
reached or does not answer) become one line that names the URI and the cause
(:func:`describe_failure`): an :class:`~lipsync_ray.errors.InputError` while the inputs are
checked (:func:`check_readable`, :func:`check_writable`, before anything starts), a
:class:`~lipsync_ray.errors.RenderError` once the render runs (the work directory stays
resumable). ``s3://`` filesystems get explicit timeouts and retries (:data:`S3_MAX_ATTEMPTS`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import posixpath
import re
import shutil
import stat
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from lipsync_ray.errors import InputError, LipsyncError, RenderError
from lipsync_ray.fileio import atomic_path, private_temp_dir, write_json

__all__ = [
    "S3_CONNECT_TIMEOUT_S",
    "S3_MAX_ATTEMPTS",
    "S3_REQUEST_TIMEOUT_S",
    "Location",
    "check_readable",
    "check_writable",
    "delete",
    "describe_failure",
    "download",
    "file_key",
    "inside",
    "list_files",
    "local_cache",
    "local_copy",
    "node_dir",
    "resolve",
    "stage_in",
    "stage_out",
]

log = logging.getLogger(__name__)

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_BLOCK = 8 << 20  # copy buffer, bytes

# The S3 client of every s3:// URI (pyarrow's defaults are the AWS SDK's: 3 attempts, 1 s to
# connect, 3 s without a byte). Retried: throttling, 5xx answers, refused or dropped
# connections and timeouts, with exponential backoff and jitter: 5 attempts span 5-11 s
# (measured, a refused connection each time), enough for an endpoint that restarts; an
# unreachable one fails the checks in as long.
S3_CONNECT_TIMEOUT_S = 5.0  # TCP connect to the endpoint
S3_REQUEST_TIMEOUT_S = 30.0  # a request during which no byte moves for this long is abandoned
S3_MAX_ATTEMPTS = 5  # pyarrow.fs.AwsStandardS3RetryStrategy: tries per request, the first included


@dataclass(frozen=True)
class Location:
    """A file or directory: ``path`` inside ``filesystem``; ``display`` names it in messages
    (the path or URI as the user wrote it). Picklable, so it can travel to Ray actors."""

    filesystem: pafs.FileSystem
    path: str
    display: str = field(default="", compare=False)

    def __str__(self) -> str:
        return self.display or self.path

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))

    def local_path(self) -> Path | None:
        """The real local path when the filesystem is the local disk, else None."""
        fs, path = self.filesystem, self.path
        while isinstance(fs, pafs.SubTreeFileSystem):
            path = posixpath.join(fs.base_path, path.lstrip("/"))
            fs = fs.base_fs
        return Path(path) if isinstance(fs, pafs.LocalFileSystem) else None

    def info(self) -> pafs.FileInfo:
        return self.filesystem.get_file_info(self.path)

    def join(self, *parts: str) -> Location:
        return Location(
            self.filesystem,
            posixpath.join(self.path, *parts),
            _join_display(str(self), "/".join(parts)),
        )

    def parent(self) -> Location:
        text = str(self)
        shown = text.rstrip("/").rsplit("/", 1)[0] if _URI.match(text) else str(Path(text).parent)
        return Location(self.filesystem, posixpath.dirname(self.path.rstrip("/")), shown)

    def sibling(self, suffix: str) -> Location:
        """This path with ``suffix`` appended to its name (``out.mp4`` → ``out.mp4.work``)."""
        return Location(self.filesystem, self.path + suffix, str(self) + suffix)

    def __reduce__(self):
        # pyarrow pickles an S3FileSystem without its retry strategy: set it again on arrival.
        return _unpickle_location, (self.filesystem, self.path, self.display)


def _unpickle_location(filesystem: pafs.FileSystem, path: str, display: str) -> Location:
    return Location(_tuned(filesystem), path, display)


def _tuned(fs: pafs.FileSystem) -> pafs.FileSystem:
    """An ``S3FileSystem`` with this module's timeouts and retries (and its region pinned, so
    it travels with the pickle); any other filesystem as it is. Everything else (endpoint,
    credentials, scheme) stays as the URI and the environment set it."""
    if not isinstance(fs, pafs.S3FileSystem):
        return fs
    options = dict(fs.__reduce__()[1][0])  # the keyword arguments that rebuild it
    options.update(
        region=fs.region,
        connect_timeout=S3_CONNECT_TIMEOUT_S,
        request_timeout=S3_REQUEST_TIMEOUT_S,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=S3_MAX_ATTEMPTS),
    )
    return pafs.S3FileSystem(**options)


def resolve(spec: str | Path | Location, filesystem: pafs.FileSystem | None = None) -> Location:
    """Turn a path, a URI or a location into a :class:`Location`.

    Args:
        spec: a local path (made absolute), a URI such as ``file:///data/a.wav`` or
            ``s3://bucket/a.wav``, a path inside ``filesystem``, or a location (returned as is).
        filesystem: when given, ``spec`` is a path inside it (relative to the root of a
            ``SubTreeFileSystem``; ``..`` may not leave that root).

    Raises:
        InputError: an unknown scheme, a filesystem pyarrow cannot build, a path that escapes
            the filesystem's root, or a URI together with a filesystem.
    """
    if isinstance(spec, Location):
        return spec
    text = str(spec)
    if filesystem is not None:
        if _URI.match(text):
            raise InputError("expected a path inside the given filesystem, got a URI", path=text)
        if isinstance(filesystem, pafs.LocalFileSystem):
            return Location(filesystem, os.path.abspath(text), text)
        normal = posixpath.normpath(text.lstrip("/")) if text.strip("/") else ""
        if normal == ".." or normal.startswith("../"):
            raise InputError(
                "expected a path inside the filesystem's root, got one that leaves it",
                path=text,
            )
        return Location(filesystem, "" if normal == "." else normal, text)
    if _URI.match(text):
        try:
            fs, path = pafs.FileSystem.from_uri(text)
        except Exception as exc:  # ArrowInvalid (unknown scheme), OSError (no client, no JVM)
            raise InputError(
                "expected a local path or a URI pyarrow.fs understands (file://, s3://, gs://, "
                f"hdfs://), could not open it: {describe_failure(exc)}",
                path=text,
            ) from None
        return Location(_tuned(fs), path, text)
    return Location(pafs.LocalFileSystem(), os.path.abspath(text), text)


def local_copy(spec: str | Path | Location, cache_root: Path | None = None) -> str | Path:
    """A local path for ``spec``: paths are returned unchanged, locations staged in."""
    return stage_in(spec, cache_root) if isinstance(spec, Location) else spec


def stage_in(location: Location, cache_root: Path | None = None) -> Path:
    """A local path holding the file or directory tree at ``location``.

    Local locations are used in place (no copy). Others are copied once into
    ``<cache_root>/stage/<key>/<name>`` (default :func:`local_cache`), where the key hashes the
    filesystem, the path and the size and modification time of every file, so a changed source
    is fetched again; the copy is renamed into place whole, so concurrent actors on one node
    never see half of it, and a lock makes the actors that start together on a node wait for
    one copy. Names starting with ``.`` (caches, temporary files) are not copied.

    A copy is reused only when it still is what was staged: the same files, each a regular
    file of the source's size with the modification time it was given (recorded beside it in
    ``<key>/.staged.json``). A copy that fails this (a temp cleaner removed a file, something
    wrote into it) is staged again.

    Raises:
        InputError: nothing at ``location``, or the store cannot be read.
    """
    local = location.local_path()
    if local is not None:
        return local
    with storage_errors(location, InputError, "cannot read it"):
        info = location.info()
        if info.type == pafs.FileType.NotFound:
            raise InputError("not found", path=str(location))
        files = list_files(location) if info.type == pafs.FileType.Directory else {"": info}
    digest = hashlib.sha256(f"{_identity(location.filesystem)}|{location.path}".encode())
    for rel, f in sorted(files.items()):
        digest.update(f"|{rel}:{f.size}:{f.mtime_ns}".encode())
    root = (cache_root or local_cache()) / "stage"
    final = root / digest.hexdigest()[:24]
    target = final / (location.name or "root")
    if _staged_intact(final, target, files):
        return target
    root.mkdir(parents=True, exist_ok=True)
    # One copy per node: the actors of a node start together, and all but the first wait.
    with _node_lock(root / f".{final.name}.lock"):
        if _staged_intact(final, target, files):
            return target
        if final.exists():
            log.warning("the staged copy %s is not what was staged; staging it again", final)
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
        staged = tmp / target.name
        try:
            with storage_errors(location, InputError, "cannot read it"):
                for rel, f in files.items():
                    download(location.filesystem, f.path, staged / rel if rel else staged)
            if info.type == pafs.FileType.Directory:
                staged.mkdir(exist_ok=True)  # an empty directory stays a directory
            record = {}
            for rel in files:
                copied = (staged / rel if rel else staged).stat()
                record[rel] = [copied.st_size, copied.st_mtime_ns]
            write_json(tmp / _STAGED, record)
            try:
                tmp.rename(final)
            except OSError:  # staged first by a process the lock did not reach (another host)
                if not final.is_dir():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("staged %s into %s", location, target)
    return target


def _tree(root: Path) -> set[str]:
    """Every name under ``root`` that is not a directory (files, links, others), relative,
    leaving out names that start with ``.`` as :func:`list_files` does: those are caches the
    renderer keeps beside the copy (the avatar's content stamp), never staged."""
    names = set()
    for base, dirs, leaves in os.walk(root):
        rel = os.path.relpath(base, root)
        links = [d for d in dirs if os.path.islink(os.path.join(base, d))]
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in [*leaves, *links]:
            if not name.startswith("."):
                names.add(name if rel == "." else posixpath.join(rel, name))
    return names


_STAGED = ".staged.json"  # beside a staged copy: {relative path: [size, mtime_ns]} of its files


def _staged_intact(final: Path, target: Path, files: dict[str, pafs.FileInfo]) -> bool:
    """Whether ``final`` holds the copy of ``files`` that :func:`stage_in` made: its record,
    nothing else in it, and every file a regular one (not a link) of the source's size and
    the recorded time."""
    try:
        record = json.loads((final / _STAGED).read_text())
        if not isinstance(record, dict) or record.keys() != files.keys():
            return False
        if "" not in files and _tree(target) != set(files):
            return False
        for rel, f in files.items():
            st = os.lstat(target / rel if rel else target)
            copied = [st.st_size, st.st_mtime_ns]
            if not stat.S_ISREG(st.st_mode) or copied != record[rel] or st.st_size != f.size:
                return False
    except (OSError, ValueError):
        return False
    return True


def stage_out(local_file: str | Path, location: Location) -> None:
    """Copy ``local_file`` to ``location`` under a temporary name, then move it into place, so
    the destination never holds a partial file. A no-op when both are the same file.

    Raises:
        RenderError: the store refused or failed the upload (after its retries).
    """
    local_file = Path(local_file)
    dest = location.local_path()
    if dest is not None and dest.resolve() == local_file.resolve():
        return
    fs = location.filesystem
    parent = posixpath.dirname(location.path.rstrip("/"))
    tmp = posixpath.join(parent, f".{location.name}.partial-{uuid.uuid4().hex[:8]}")
    with open(local_file, "rb") as src, storage_errors(location, RenderError, "cannot upload"):
        if parent:
            fs.create_dir(parent, recursive=True)
        try:
            with fs.open_output_stream(tmp) as out:
                shutil.copyfileobj(src, out, _BLOCK)
            fs.move(tmp, location.path)
        except BaseException:
            with contextlib.suppress(Exception):
                fs.delete_file(tmp)
            raise


def local_cache() -> Path:
    """This node's cache for this user, ``<tmp>/lipsync-ray-<uid>/storage``: made with mode
    0700 and checked to be this user's own on every call, so no other user can plant or read
    staged copies (:func:`lipsync_ray.fileio.private_temp_dir`).

    Raises:
        InputError: the directory exists but is not this user's private one.
    """
    return private_temp_dir("storage")


def node_dir(kind: str, location: Location) -> Path:
    """``<local_cache()>/<kind>/<key of location>``: a node-local directory for one location,
    the same on every node and in every process."""
    text = f"{_identity(location.filesystem)}|{location.path}"
    return local_cache() / kind / hashlib.sha256(text.encode()).hexdigest()[:24]


def file_key(location: Location) -> tuple:
    """What the file at ``location`` is: two locations with equal keys are the same file.
    On the local disk, links are followed and an existing file is known by its device and
    inode (so hard links match too); elsewhere by the filesystem and the normalised path."""
    local = location.local_path()
    if local is None:
        return ("store", *_real(location))
    try:
        st = os.stat(local)
    except OSError:
        return ("path", os.path.realpath(local))
    return ("inode", st.st_dev, st.st_ino)


def inside(location: Location, directory: Location) -> bool:
    """Whether ``location`` is ``directory`` or lies under it (links followed on the local
    disk)."""
    (fs_a, a), (fs_b, b) = _real(location), _real(directory)
    return fs_a == fs_b and (a == b or a.startswith(b.rstrip("/") + "/"))


def _real(location: Location) -> tuple[str, str]:
    local = location.local_path()
    if local is not None:
        return "local", os.path.realpath(local)
    return _identity(location.filesystem), posixpath.normpath("/" + location.path.lstrip("/"))


def delete(location: Location) -> None:
    """Remove the file or directory tree at ``location``; nothing there is fine."""
    info = location.info()
    if info.type == pafs.FileType.Directory:
        location.filesystem.delete_dir(location.path)
    elif info.type == pafs.FileType.File:
        location.filesystem.delete_file(location.path)


def delete_if_empty(location: Location) -> None:
    """Remove the directory at ``location`` when nothing is under it (an object store has no
    empty directories to remove: nothing happens there); anything else there stays."""
    if location.info().type != pafs.FileType.Directory:
        return
    selector = pafs.FileSelector(location.path, recursive=True, allow_not_found=True)
    if not location.filesystem.get_file_info(selector):
        location.filesystem.delete_dir(location.path)


# ------------------------------------------------------------------------ failures, checks

_AWS_ERROR = re.compile(r"AWS Error (\w+) during (\w+) operation: ?(.*)")
_DENIED = {"ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH",
           "EXPIRED_TOKEN", "INVALID_CLIENT_TOKEN_ID", "UNRECOGNIZED_CLIENT"}  # fmt: skip


def describe_failure(exc: BaseException, location: Location | None = None) -> str:
    """The cause of a storage failure in a few words, for a one-line error: "bucket not found",
    "credentials refused ...", "cannot connect to the endpoint http://...", not the client's
    whole message (pyarrow's S3 errors carry curl codes and request ids)."""
    text = " ".join(str(exc).split())
    aws = _AWS_ERROR.search(text)
    if aws is None:
        if isinstance(exc, FileNotFoundError):
            return "not found"
        if isinstance(exc, PermissionError):
            return "permission denied"
        return text or type(exc).__name__
    code, operation, detail = aws.groups()
    detail = re.sub(r"\s*\(Request ID: [^)]*\)", "", detail).strip()
    endpoint = _endpoint(location)
    if code == "NETWORK_CONNECTION" and "curlCode: 28" in detail:
        return (f"the endpoint {endpoint} did not answer within {S3_REQUEST_TIMEOUT_S:g} s "
                f"({S3_MAX_ATTEMPTS} attempts)")  # fmt: skip
    if code == "NETWORK_CONNECTION":
        why = detail.split("Details:")[0].split(",", 1)[-1].strip(" ;") or detail
        return f"cannot reach the endpoint {endpoint}: {why} ({S3_MAX_ATTEMPTS} attempts)"
    if code == "NO_SUCH_BUCKET":
        return "bucket not found"
    if code in ("NO_SUCH_KEY", "RESOURCE_NOT_FOUND"):
        return "not found"
    if code in _DENIED:
        return (f"credentials refused or access denied ({code} during {operation}): check "
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) and the bucket's "
                "permissions")  # fmt: skip
    return f"{code} during {operation}: {detail}" if detail else f"{code} during {operation}"


def _endpoint(location: Location | None) -> str:
    fs = None if location is None else location.filesystem
    if isinstance(fs, pafs.S3FileSystem):
        options = fs.__reduce__()[1][0]
        return options.get("endpoint_override") or f"of AWS S3 ({fs.region})"
    return "of the store"


@contextlib.contextmanager
def storage_errors(location: Location, error: type[LipsyncError], doing: str, hint: str = ""):
    """Turn a failure of the store under ``location`` into ``error`` (InputError while the
    inputs are checked, RenderError during the render): ``"<doing>: <cause>[; <hint>] (<uri>)"``.
    Errors of this package pass through unchanged."""
    try:
        yield
    except LipsyncError:
        raise
    except (OSError, pa.ArrowException) as exc:
        cause = describe_failure(exc, location) + (f"; {hint}" if hint else "")
        raise error(f"{doing}: {cause}", path=str(location)) from exc


def check_readable(location: Location) -> pafs.FileInfo:
    """``location``'s file info, fetched from the store (so also a check of the endpoint and
    the credentials); NotFound is returned, not raised.

    Raises:
        InputError: the store cannot be asked (one line: the URI and the cause).
    """
    with storage_errors(location, InputError, "cannot read it"):
        return location.info()


def check_writable(directory: Location) -> None:
    """Check that files can be written in ``directory`` (which need not exist yet): a small
    probe object is written and deleted (object stores have no permission bits to look at, and
    a missing bucket only shows on the first write). On the local disk the probe file goes
    into the nearest existing directory: permission bits do not tell (root passes them, and
    ``/proc`` or a read-only mount refuse files anyway).

    Raises:
        InputError: the URI, and why nothing can be written there.
    """
    local = directory.local_path()
    if local is not None:
        existing = next(p for p in (local, *local.parents) if p.exists())
        try:
            fd, probe = tempfile.mkstemp(prefix=".lipsync-ray-probe-", dir=existing)
        except OSError as exc:
            why = (
                "permission denied"
                if isinstance(exc, PermissionError)
                else (f"cannot create a file in {existing}: {exc.strerror or exc}")
            )
            raise InputError(f"cannot write there: {why}", path=directory) from None
        os.close(fd)
        os.unlink(probe)
        return
    target = directory
    if not _object_store(directory.filesystem):
        # Directories are real here: probe in the nearest one that exists.
        with storage_errors(directory, InputError, "cannot write there"):
            while target.path.strip("/") and target.info().type == pafs.FileType.NotFound:
                target = target.parent()
    probe = target.join(f".lipsync-ray-probe-{uuid.uuid4().hex[:8]}")
    with storage_errors(directory, InputError, "cannot write there"):
        with directory.filesystem.open_output_stream(probe.path) as out:
            out.write(b"lipsync-ray write check\n")
        directory.filesystem.delete_file(probe.path)


def _object_store(fs: pafs.FileSystem) -> bool:
    """S3 and GCS have no directories: a prefix appears with its first object."""
    while isinstance(fs, pafs.SubTreeFileSystem):
        fs = fs.base_fs
    return fs.type_name in ("s3", "gcs")


@contextlib.contextmanager
def _node_lock(path: Path):
    """An exclusive lock between the processes of this node (flock: released if one dies)."""
    import fcntl

    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# -------------------------------------------------------------------------------- helpers


def _join_display(base: str, rel: str) -> str:
    return f"{base.rstrip('/')}/{rel}" if _URI.match(base) else str(Path(base) / rel)


def _identity(fs: pafs.FileSystem) -> str:
    """A stable name for a filesystem: its type, and the roots of any sub-trees."""
    if isinstance(fs, pafs.SubTreeFileSystem):
        return f"{_identity(fs.base_fs)}/{fs.base_path}"
    if isinstance(fs, pafs.PyFileSystem):
        return f"{fs.type_name}:{fs.handler!r}"
    return fs.type_name


def list_files(location: Location) -> dict[str, pafs.FileInfo]:
    """Every file under a directory location, by path relative to it (``/``-separated),
    leaving out names that start with ``.``."""
    selector = pafs.FileSelector(location.path, recursive=True, allow_not_found=True)
    base = location.path.rstrip("/")
    files = {}
    for info in location.filesystem.get_file_info(selector):
        if info.type != pafs.FileType.File:
            continue
        rel = posixpath.relpath(info.path, base) if base else info.path.lstrip("/")
        if not any(part.startswith(".") for part in rel.split("/")):
            files[rel] = info
    return files


def download(fs: pafs.FileSystem, path: str, local: Path) -> None:
    """Copy one file to ``local``, atomically (temp name + rename)."""
    local.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(local) as tmp, fs.open_input_stream(path) as src, open(tmp, "wb") as out:
        shutil.copyfileobj(src, out, _BLOCK)
