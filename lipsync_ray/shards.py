"""Parquet shards: one file per chunk of output frames, its schema, writing, reading, checks.

Shard schema (one row per output frame, in frame order)::

    frame_index   int64    output frame number, 0-based, at 25 fps
    avatar_index  int64    avatar frame the output frame was composited onto
    height        int32    frame height, pixels
    width         int32    frame width, pixels
    codec         string   "jpeg", "png" or "raw" (raw = BGR uint8 bytes, row-major H x W x 3)
    image         binary   the frame, encoded with ``codec``

The file's key-value metadata holds ``lipsync_ray.fingerprint`` (the render's fingerprint) and
``lipsync_ray.chunk`` (the chunk number), so an orphan shard (written, renamed, but not yet in
the manifest when the driver died) can still be verified and reused.

Shards are written to a temp name beside ``chunk-NNNNNN.parquet`` (:mod:`lipsync_ray.fileio`)
and renamed when complete: a file named ``chunk-NNNNNN.parquet`` is always whole. Where the
files live is :mod:`lipsync_ray.workdir.layout`.

Spare files: a shard released as soon as its segment is recorded (segments mode without
``--keep-shards``) can be moved to ``shards/.spare/`` instead of deleted (the manifest does,
:mod:`lipsync_ray.workdir.manifest`), and the next :func:`write_shard` overwrites it in place.
Writing 177 MB into pages the file already has costs ~0.7 CPU ms per 720p frame, about two
memory copies (the page buffer, then the file); a new file ~1.0-5 ms, the rest the kernel
finding fresh pages (on a VM that returns freed memory to its host, the upper end). Measured
by ``scripts/shard_write_cost.py``; write options: :func:`parquet_write_options`.
"""

from __future__ import annotations

import mmap
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lipsync_ray.errors import ShardError
from lipsync_ray.fileio import atomic_path, file_sha256
from lipsync_ray.options import ShardCodec
from lipsync_ray.workdir.layout import spare_dir

__all__ = [
    "SHARD_SCHEMA",
    "ShardCodec",
    "ShardInfo",
    "decode_image",
    "encode_image",
    "iter_shard_frames",
    "parquet_write_options",
    "read_shard",
    "verify_file",
    "write_shard",
]

FINGERPRINT_KEY = b"lipsync_ray.fingerprint"
CHUNK_KEY = b"lipsync_ray.chunk"
JPEG_QUALITY = 95

SHARD_SCHEMA = pa.schema(
    [
        pa.field("frame_index", pa.int64(), nullable=False),
        pa.field("avatar_index", pa.int64(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("codec", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
    ]
)


def encode_image(frame: np.ndarray, codec: ShardCodec) -> bytes:
    """Encode a uint8 (H, W, 3) BGR frame for the ``image`` column."""
    if codec is ShardCodec.RAW:
        return np.ascontiguousarray(frame).tobytes()
    if codec is ShardCodec.JPEG:
        ok, buf = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    else:
        ok, buf = cv2.imencode(".png", frame, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise ShardError(f"OpenCV could not encode a {frame.shape} frame as {codec.value}")
    return buf.tobytes()


def decode_image(data: bytes, codec: str, height: int, width: int) -> np.ndarray:
    """Decode one ``image`` cell back to uint8 (height, width, 3) BGR."""
    if codec == ShardCodec.RAW.value:
        frame = np.frombuffer(data, dtype=np.uint8)
        if frame.size != height * width * 3:
            raise ShardError(f"raw frame has {frame.size} bytes, expected {height * width * 3}")
        return frame.reshape(height, width, 3)
    if codec not in (ShardCodec.JPEG.value, ShardCodec.PNG.value):
        raise ShardError(f"unknown shard codec {codec!r}, expected jpeg, png or raw")
    frame = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if frame is None or frame.shape != (height, width, 3):
        raise ShardError(f"could not decode a {width}x{height} {codec} frame")
    return frame


def _claim_spare(spares: Path, tmp: Path) -> bool:
    """Rename one spare file to ``tmp``; compositors racing for the same file each get another
    or none. Anything there that is not a regular file (a link planted to make the write land
    elsewhere) is removed, never written through; so is a spare directory that is a link."""
    if spares.is_symlink() or spares.parent.is_symlink() or not spares.is_dir():
        return False
    for spare in sorted(spares.glob("*.parquet")):
        try:
            os.replace(spare, tmp)
        except FileNotFoundError:
            continue
        if stat.S_ISREG(os.lstat(tmp).st_mode):
            return True
        tmp.unlink()
    return False


@dataclass(frozen=True)
class ShardInfo:
    """What the manifest records about one complete shard."""

    chunk: int
    start: int  # first output frame (inclusive)
    stop: int  # last output frame (exclusive)
    rows: int
    sha256: str  # of the whole file; "" for a shard released as soon as it was recorded
    bytes: int
    file: str  # path relative to the work directory

    @classmethod
    def of_file(
        cls,
        path: Path,
        work_dir: Path,
        *,
        chunk: int,
        start: int,
        stop: int,
        rows: int,
        checksum: bool = True,
    ) -> ShardInfo:
        """The record of ``path``, a whole file in ``work_dir`` that holds ``rows`` frames of
        ``chunk`` (output frames ``[start, stop)``): its size, and its SHA-256 unless
        ``checksum`` is off (a shard released as soon as it is recorded is never verified)."""
        return cls(
            chunk=chunk,
            start=start,
            stop=stop,
            rows=rows,
            sha256=file_sha256(path) if checksum else "",
            bytes=path.stat().st_size,
            file=str(path.relative_to(work_dir)),
        )


def write_shard(
    path: Path,
    chunk: int,
    frame_indices: np.ndarray,
    avatar_indices: np.ndarray,
    frames: Sequence[np.ndarray] | np.ndarray,
    codec: ShardCodec,
    fingerprint: str,
    work_dir: Path,
    *,
    checksum: bool = True,
    reuse_spare: bool = False,
) -> ShardInfo:
    """Encode ``frames`` (uint8 (H, W, 3) BGR each, or one (C, H, W, 3) array) and write them
    atomically as one shard. ``checksum=False`` leaves ``sha256`` empty (a shard deleted as
    soon as its segment is recorded is never verified; hashing 180 MB costs ~1.7 ms a frame).
    ``reuse_spare`` overwrites a file from :func:`spare_dir` when there is one (see the module
    docstring); the shard's bytes are the same either way.

    Raw frames given as one C-contiguous array go into the ``image`` column without a copy.
    The shard is renamed into place without an fsync (forcing 180 MB per chunk to disk costs
    more than the render of a lost chunk): one torn by a power cut fails its manifest checksum
    on resume and is rendered again.
    """
    if not (len(frame_indices) == len(avatar_indices) == len(frames) > 0):
        raise ShardError(
            f"chunk {chunk}: {len(frame_indices)} frame indices, {len(avatar_indices)} avatar "
            f"indices and {len(frames)} frames must be equal and non-zero",
            path=path,
        )
    height, width = frames[0].shape[:2]
    table = pa.table(
        {
            "frame_index": pa.array(np.asarray(frame_indices, np.int64)),
            "avatar_index": pa.array(np.asarray(avatar_indices, np.int64)),
            "height": pa.array(np.full(len(frames), height, np.int32)),
            "width": pa.array(np.full(len(frames), width, np.int32)),
            "codec": pa.array([codec.value] * len(frames), pa.string()),
            "image": _image_column(frames, codec),
        },
        schema=SHARD_SCHEMA.with_metadata(
            {FINGERPRINT_KEY: fingerprint.encode(), CHUNK_KEY: str(chunk).encode()}
        ),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    options = parquet_write_options(len(frames))
    with atomic_path(path) as tmp:
        if not (reuse_spare and _write_over_spare(table, tmp, spare_dir(work_dir), options)):
            pq.write_table(table, tmp, **options)
    return ShardInfo.of_file(
        path,
        work_dir,
        chunk=chunk,
        start=int(frame_indices[0]),
        stop=int(frame_indices[-1]) + 1,
        rows=len(frames),
        checksum=checksum,
    )


# Every column but ``image``: small, so dictionaries and statistics cost nothing there.
_SMALL_COLUMNS = tuple(name for name in SHARD_SCHEMA.names if name != "image")
# A page is flushed once it holds this many bytes, checked after every value (batch of 1):
# each image is one page of its own. Parquet's default checks every 1,024 values, which put a
# whole 64-frame chunk (177 MB at 720p) into one page buffer, grown by reallocation and
# faulted in afresh every chunk; a frame-sized buffer is reused from page to page.
_DATA_PAGE_BYTES = 1 << 20


def parquet_write_options(rows: int) -> dict[str, object]:
    """Keyword arguments to ``pyarrow.parquet.write_table`` for one shard of ``rows`` frames
    (docs/shard-schema.md §5). Images neither compress (raw pixels, or JPEG/PNG already) nor
    repeat: no compression, and for ``image`` no dictionary (hashing 2.8 MB values), no
    min/max statistics, one page per frame; no page checksums or page index (the manifest
    checksums whole files)."""
    return dict(
        compression="none",
        row_group_size=rows,
        use_dictionary=list(_SMALL_COLUMNS),
        write_statistics=list(_SMALL_COLUMNS),
        write_batch_size=1,
        data_page_size=_DATA_PAGE_BYTES,
        write_page_checksum=False,
        write_page_index=False,
    )


# Room for Parquet's page headers, lengths and footer around the table's own bytes.
_PARQUET_SLACK_BYTES = 1 << 20


def _write_over_spare(table: pa.Table, tmp: Path, spares: Path, options: dict) -> bool:
    """Write ``table`` as Parquet over a spare file renamed to ``tmp``, through a writable
    memory map (a plain write would truncate the file and free its pages first). False when
    there is no spare or the write fails; ``tmp`` is then overwritten from scratch."""
    if not _claim_spare(spares, tmp):
        return False
    try:
        # O_NOFOLLOW and the descriptor from here on: the file written is the one checked.
        fd = os.open(tmp, os.O_RDWR | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        size = table.nbytes + _PARQUET_SLACK_BYTES
        have = os.fstat(fd).st_size
        if have < size:
            if not hasattr(os, "posix_fallocate"):  # macOS: a hole could end in SIGBUS
                return False
            # Allocated, not a hole: a full disk fails here with ENOSPC, not with a SIGBUS
            # when the memory map first writes to the new pages.
            os.posix_fallocate(fd, 0, size)
        with mmap.mmap(fd, max(have, size)) as mapped:
            buffer = pa.py_buffer(mapped)
            sink = pa.FixedSizeBufferWriter(buffer)
            pq.write_table(table, sink, **options)
            end = sink.tell()
            sink.close()
            del sink, buffer  # the map closes only once no buffer exports it
        os.ftruncate(fd, end)
    except (OSError, ValueError, BufferError, pa.ArrowException):
        return False
    finally:
        os.close(fd)
    return True


# Offsets of a ``binary`` column are int32: one array holds at most 2 GiB of images.
_MAX_BINARY_BYTES = 2**31 - 1


def _image_column(frames: Sequence[np.ndarray] | np.ndarray, codec: ShardCodec) -> pa.ChunkedArray:
    """The ``image`` column; raw frames in one C-contiguous array are wrapped, not copied."""
    if not (
        codec is ShardCodec.RAW
        and isinstance(frames, np.ndarray)
        and frames.dtype == np.uint8
        and frames.ndim == 4
        and frames.flags.c_contiguous
    ):
        return pa.chunked_array([pa.array([encode_image(f, codec) for f in frames], pa.binary())])
    size = frames[0].nbytes
    step = max(1, _MAX_BINARY_BYTES // size)
    pieces = []
    for lo in range(0, len(frames), step):
        block = frames[lo : lo + step]
        offsets = np.arange(0, (len(block) + 1) * size, size, dtype=np.int32)
        pieces.append(
            pa.Array.from_buffers(
                pa.binary(), len(block), [None, pa.py_buffer(offsets), pa.py_buffer(block)]
            )
        )
    return pa.chunked_array(pieces, pa.binary())


def read_shard(path: str | Path) -> pa.Table:
    """Read one shard with plain pyarrow, checking its schema."""
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise ShardError(f"unreadable shard: {exc}", path=path) from exc
    if not table.schema.remove_metadata().equals(SHARD_SCHEMA):
        raise ShardError(f"unexpected shard schema: {table.schema}", path=path)
    return table


def shard_metadata(path: str | Path) -> tuple[str, int, int]:
    """(fingerprint, chunk, rows) from a shard's footer without reading its images."""
    meta = pq.read_metadata(path)
    kv = meta.metadata or {}
    return kv.get(FINGERPRINT_KEY, b"").decode(), int(kv.get(CHUNK_KEY, b"-1")), meta.num_rows


def iter_shard_frames(path: str | Path, expected: range) -> Iterator[np.ndarray]:
    """Yield the frames of one shard, in order, checking they are exactly ``expected``."""
    table = read_shard(path)
    indices = table.column("frame_index").to_numpy()
    if len(indices) != len(expected) or not np.array_equal(
        indices, np.arange(expected.start, expected.stop)
    ):
        raise ShardError(
            f"shard holds frames {indices[:1]}..{indices[-1:]} ({len(indices)} rows), "
            f"expected {expected.start}..{expected.stop - 1}",
            path=path,
        )
    heights = table.column("height").to_numpy()
    widths = table.column("width").to_numpy()
    codecs = table.column("codec").to_pylist()
    images = table.column("image")
    for i in range(len(indices)):
        yield decode_image(images[i].as_py(), codecs[i], int(heights[i]), int(widths[i]))


def verify_file(path: str | Path, info: ShardInfo) -> bool:
    """True when the file at ``path`` (a shard or a segment) has the size and SHA-256 that
    ``info`` recorded; False when it differs, is missing, or ``info`` has no checksum."""
    try:
        return Path(path).stat().st_size == info.bytes and file_sha256(path) == info.sha256
    except OSError:
        return False
