"""The avatar bundle: everything about one person's video that never depends on audio.

A bundle is a directory::

    avatar.json          metadata (below)
    frames.npy           uint8 (N, H, W, 3) BGR full frames
    crops.npy            uint8 (N, 328, 328, 3) BGR bicubic crops of the face boxes
    visual_inputs.npy    uint8 (N, 320, 320, 6) the generator's visual input (ROI + masked ROI)
    .content-stamp.json  when the arrays last held their digests (lipsync_ray.avatar_digest)

``avatar.json``: ``{"version": 1, "fps": 25.0, "frame_count": N, "size_wh": [W, H],
"boxes": [[x1, y1, x2, y2], ...], "preprocessing": {...}, "source": {...},
"files": {"frames": "frames.npy", ...}, "content_sha256": {"frames": hex, ...}}``. ``boxes``
has one int box per frame, inside the frame; ``content_sha256`` (SHA-256 of each array's rows,
hashed as they are written) is absent in bundles prepared before it.

Storage, chosen by measurement (a one-off script: 192 frames of 1280x720 made from
``skimage.data.astronaut()`` moving over a gradient with sigma-2 camera noise; read a random
contiguous chunk of 64 frames, median of 3; "cold" = the file's pages evicted with
``posix_fadvise(DONTNEED)`` first; 2-core VM, Python 3.11, PyAV 18 / FFmpeg 8)::

    option                           KB/frame  cold ms/f  warm ms/f  encode ms/f  exact
    raw .npy, np.load(mmap)              2700       2.07       0.60          0.0  yes
    H.264 RGB lossless (crf 0, g32)      1160     106.45     106.25         58.2  yes
    H.264 yuv444p crf 0 (g32)             883     120.47     125.82        103.3  no, 52 dB
    H.264 yuv420p crf 10 (g32)            154      28.00      18.97         34.4  no, 38 dB
    JPEG q95 rows in Parquet              230       9.87       5.87          3.9  no
    PNG (level 1) rows in Parquet        1597      47.52      41.56         71.1  yes

Decoding a lossless video costs ~100 ms per 720p frame on a CPU core, i.e. more than the whole
per-frame budget of the renderer; JPEG is lossy and still ~10x slower than a memory map. So
frames and crops are raw ``.npy`` files read through ``np.load(mmap_mode="r")``: a 64-frame
chunk costs ~0.6 ms/frame warm and ~2 ms/frame from disk, and ranges are read without decoding.
The price is disk: ~3.6 MB per 720p frame for all three arrays (2.7 + 0.3 + 0.6 MB), so a
5-minute avatar (7,500 frames) needs ~27 GB. The visual input is stored rather than derived
from the crops because deriving it (``composite.model_visual_input``) measured 1.4-4 ms/frame
(the 0.2 ms/frame threshold is far off), while reading it from a warm map costs ~0.16 ms/frame.

Writing streams: frames are appended to ``.npy`` files whose header is rewritten with the final
row count at the end, so no more than one chunk of frames is ever held in memory. A bundle is
written into a temporary sibling directory and renamed into place, so a failed write never
leaves a half bundle at the target path.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import shutil
import struct
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lipsync_ray.avatar_digest import CONTENT_KEY, write_stamp
from lipsync_ray.composite import (
    CROP_SIZE,
    MASK_RECT_XYWH,
    ROI_OFFSET,
    ROI_SIZE,
    crop_face,
    model_visual_input,
)
from lipsync_ray.errors import InputError

__all__ = [
    "AVATAR_VERSION",
    "Avatar",
    "AvatarInfo",
    "default_preprocessing",
    "pingpong_indices",
    "write_avatar",
]

logger = logging.getLogger(__name__)

AVATAR_VERSION = 1
META_NAME = "avatar.json"
_CHUNK = 64  # frames per write/derive step: bounds memory while writing
# name -> (file name, row shape after the frame axis; None = (H, W, 3) from size_wh)
_ARRAYS: dict[str, tuple[str, tuple[int, ...] | None]] = {
    "frames": ("frames.npy", None),
    "crops": ("crops.npy", (CROP_SIZE, CROP_SIZE, 3)),
    "visual_inputs": ("visual_inputs.npy", (ROI_SIZE, ROI_SIZE, 6)),
}
ProgressFn = Callable[[int, "int | None"], None]


def default_preprocessing(detector: str | None = None, smoothing: Any = None) -> dict[str, Any]:
    """The preprocessing record stored in ``avatar.json`` (constants of ``composite``)."""
    return {
        "crop_size": CROP_SIZE,
        "roi_offset": ROI_OFFSET,
        "roi_size": ROI_SIZE,
        "mask_rect_xywh": list(MASK_RECT_XYWH),
        "resize_interpolation": "bicubic",
        "detector": detector,
        "smoothing": smoothing,
    }


@dataclass(frozen=True)
class AvatarInfo:
    """Validated metadata of a bundle. ``boxes`` is a read-only int32 (N, 4) xyxy array."""

    path: str
    fps: float
    frame_count: int
    size_wh: tuple[int, int]
    boxes: np.ndarray = field(compare=False, repr=False)
    preprocessing: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    source: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    files: dict[str, str] = field(default_factory=dict, compare=False, repr=False)


class Avatar:
    """A read-only view of an avatar bundle; picklable (only the path and metadata travel).

    The data files are memory-mapped lazily on first read, in whichever process reads them, so
    Ray actors can receive an ``Avatar`` (or its path) and read ranges themselves.
    """

    def __init__(self, info: AvatarInfo) -> None:
        self.info = info
        info.boxes.setflags(write=False)  # also after unpickling, which returns writable arrays
        self._maps: dict[str, np.ndarray] = {}

    @classmethod
    def open(cls, path: str | Path) -> Avatar:
        """Open and validate a bundle; raises ``InputError`` naming the offending file."""
        return cls(_read_info(Path(path)))

    def __reduce__(self):
        return (Avatar, (self.info,))

    def __repr__(self) -> str:
        w, h = self.size_wh
        return f"Avatar({self.info.path!r}, {self.frame_count} frames, {w}x{h}, {self.fps} fps)"

    @property
    def path(self) -> Path:
        return Path(self.info.path)

    @property
    def frame_count(self) -> int:
        return self.info.frame_count

    @property
    def fps(self) -> float:
        return self.info.fps

    @property
    def size_wh(self) -> tuple[int, int]:
        return self.info.size_wh

    def boxes(self, indices: np.ndarray | Iterable[int]) -> np.ndarray:
        """Crop boxes of the given avatar frames: new int32 (k, 4) array, xyxy pixels."""
        return self.info.boxes[self._check_indices(indices)]

    def read_frames(
        self, indices: np.ndarray | Iterable[int], out: np.ndarray | None = None
    ) -> np.ndarray:
        """Full frames: uint8 (k, H, W, 3) BGR. Indices may repeat and jump.

        ``out``: a C-contiguous uint8 (k, H, W, 3) array to fill and return (a compositor
        reuses one buffer per chunk: fresh 180 MB arrays cost page faults on every chunk);
        None: a new array."""
        return self._gather("frames", indices, out)

    def read_crops(self, indices: np.ndarray | Iterable[int]) -> np.ndarray:
        """328x328 face crops: new uint8 (k, 328, 328, 3) BGR array."""
        return self._gather("crops", indices)

    def read_visual_inputs(
        self, indices: np.ndarray | Iterable[int], out: np.ndarray | None = None
    ) -> np.ndarray:
        """Generator visual inputs: uint8 (k, 320, 320, 6) (ROI BGR, masked ROI BGR), in
        ``out`` when given (as :meth:`read_frames`), else a new array."""
        return self._gather("visual_inputs", indices, out)

    def _check_indices(self, indices: np.ndarray | Iterable[int]) -> np.ndarray:
        idx = np.asarray(indices if isinstance(indices, np.ndarray) else list(indices))
        if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
            raise InputError(
                f"avatar frame indices must be a 1-D integer array, got {idx.dtype} {idx.shape}",
                path=self.info.path,
            )
        idx = idx.astype(np.int64, copy=False)
        if idx.size and (idx.min() < 0 or idx.max() >= self.frame_count):
            raise InputError(
                f"avatar frame indices must lie in [0, {self.frame_count}), "
                f"got [{idx.min()}, {idx.max()}]",
                path=self.info.path,
            )
        return idx

    def _array(self, name: str) -> np.ndarray:
        arr = self._maps.get(name)
        if arr is None:
            arr = np.load(self.path / self.info.files[name], mmap_mode="r")
            self._maps[name] = arr
        return arr

    def _gather(
        self, name: str, indices: np.ndarray | Iterable[int], out: np.ndarray | None = None
    ) -> np.ndarray:
        # Each distinct contiguous run of frames is read from the map once (one sequential
        # read), then copied to every output position that uses it (ping-pong repeats).
        idx = self._check_indices(indices)
        arr = self._array(name)
        shape = (idx.size, *arr.shape[1:])
        if out is None:
            out = np.empty(shape, dtype=arr.dtype)
        elif out.shape != shape or out.dtype != arr.dtype or not out.flags.c_contiguous:
            raise InputError(
                f"{name}: expected a C-contiguous {arr.dtype} {shape} buffer, got "
                f"{out.dtype} {out.shape}",
                path=self.info.path,
            )
        if idx.size == 0:
            return out
        first = int(idx[0])
        if np.array_equal(idx, np.arange(first, first + idx.size)):
            np.copyto(out, arr[first : first + idx.size])
            return out
        uniq, inverse = np.unique(idx, return_inverse=True)
        run_starts = np.concatenate([[0], np.flatnonzero(np.diff(uniq) != 1) + 1, [uniq.size]])
        for a, b in itertools.pairwise(run_starts):
            block = arr[uniq[a] : uniq[b - 1] + 1]
            for j in np.flatnonzero((inverse >= a) & (inverse < b)):
                out[j] = block[inverse[j] - a]
        return out


def pingpong_indices(
    output_frames: int | np.ndarray, avatar_frames: int, start: int = 0
) -> np.ndarray:
    """Avatar frame for each output frame, walking the avatar forwards and backwards.

    With ``N = avatar_frames`` the walk is ``0, 1, ..., N-1, N-2, ..., 1, 0, 1, ...``: period
    ``P = 2N - 2``, no frame repeated at the turns. ``start`` is a phase of that cycle in
    ``[0, P)`` (``[0, 1)`` when N == 1): output frame ``i`` takes phase ``(i + start) % P``,
    and phase ``q`` maps to ``q`` if ``q < N`` else ``P - q``. So ``start = s < N`` begins at
    avatar frame ``s`` walking forwards, ``start = P - s`` begins at ``s`` walking backwards.

    Args:
        output_frames: a count ``n`` (returns the map for output frames ``0..n-1``) or an
            integer array of output frame indices (>= 0).
        avatar_frames: N >= 1.
        start: phase offset, see above.

    Returns:
        int64 array of avatar frame indices, one per output frame.
    """
    if int(avatar_frames) != avatar_frames or avatar_frames < 1:
        raise InputError(f"avatar frame count must be an integer >= 1, got {avatar_frames}")
    n_avatar = int(avatar_frames)
    period = max(2 * n_avatar - 2, 1)
    if int(start) != start or not 0 <= start < period:
        raise InputError(f"ping-pong start must be an integer in [0, {period}), got {start}")
    if isinstance(output_frames, np.ndarray):
        if output_frames.size and (
            not np.issubdtype(output_frames.dtype, np.integer) or output_frames.min() < 0
        ):
            raise InputError("output frame indices must be integers >= 0")
        out_idx = output_frames.astype(np.int64)
    else:
        if int(output_frames) != output_frames or output_frames < 0:
            raise InputError(f"output frame count must be an integer >= 0, got {output_frames}")
        out_idx = np.arange(int(output_frames), dtype=np.int64)
    phase = (out_idx + int(start)) % period
    return np.where(phase < n_avatar, phase, period - phase).astype(np.int64)


def write_avatar(
    path: str | Path,
    frames: Iterable[np.ndarray],
    boxes: np.ndarray,
    *,
    fps: float = 25.0,
    source: dict[str, Any] | None = None,
    preprocessing: dict[str, Any] | None = None,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
) -> Avatar:
    """Write a bundle from a stream of frames and their crop boxes.

    Args:
        path: the bundle directory to create (must not exist unless ``overwrite``).
        frames: uint8 (H, W, 3) BGR frames, all the same size; consumed once, never all held.
        boxes: int (N, 4) xyxy crop boxes, one per frame, inside the frame.
        fps: frame rate recorded in the metadata.
        source: free-form description of where the frames came from (JSON-serialisable).
        preprocessing: overrides of the preprocessing record (detector, smoothing).
        overwrite: replace an existing bundle (atomically: the old one stays until the new
            one is complete).
        progress: called as ``progress(frames_done, total)`` while writing.

    Returns:
        The opened bundle.
    """
    boxes = np.asarray(boxes)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise InputError(f"boxes must have shape (N, 4), got {boxes.shape}", path=path)
    writer = BundleWriter(path, overwrite=overwrite)
    try:
        for frame in frames:
            if writer.frame_count == len(boxes):  # stop early: more frames than boxes
                raise InputError(f"expected {len(boxes)} frames (one per box), got more", path=path)
            writer.add_frame(frame)
            if progress is not None:
                progress(writer.frame_count, len(boxes))
        return writer.commit(boxes, fps=fps, source=source, preprocessing=preprocessing)
    except BaseException:
        writer.abort()
        raise


class BundleWriter:
    """Low-level streaming bundle writer (used by ``write_avatar`` and ``prepare``).

    Call ``add_frame`` for every frame, then ``commit(boxes, ...)``, which derives the crops and
    visual inputs from the frames already on disk and renames the bundle into place; or
    ``abort()``. ``frames_map()`` gives read access to the frames written so far after
    ``finish_frames()``, for a second pass (face detection needs the whole video first).
    """

    def __init__(self, path: str | Path, *, overwrite: bool = False) -> None:
        self.path = Path(path)
        self.overwrite = overwrite
        check_target(self.path, overwrite)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.parent / f".{self.path.name}.tmp-{uuid.uuid4().hex[:8]}"
        self.tmp.mkdir()
        self._frames = _NpyAppender(self.tmp / _ARRAYS["frames"][0])
        self.size_wh: tuple[int, int] | None = None

    @property
    def frame_count(self) -> int:
        return self._frames.rows

    def add_frame(self, frame: np.ndarray) -> None:
        """Append one uint8 (H, W, 3) BGR frame (copied; not modified)."""
        if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.shape[2:] != (3,):
            got = getattr(frame, "dtype", type(frame).__name__), getattr(frame, "shape", "")
            raise InputError(
                f"frames must be uint8 (H, W, 3) arrays, got {got[0]} {got[1]} "
                f"at frame {self.frame_count}",
                path=self.path,
            )
        size_wh = (frame.shape[1], frame.shape[0])
        if self.size_wh is None:
            self.size_wh = size_wh
        elif size_wh != self.size_wh:
            raise InputError(
                f"all frames must be {self.size_wh[0]}x{self.size_wh[1]}, got "
                f"{size_wh[0]}x{size_wh[1]} at frame {self.frame_count}",
                path=self.path,
            )
        self._frames.append(frame[None])

    def finish_frames(self) -> None:
        if not self._frames.closed:
            self._frames.close()

    def frames_map(self) -> np.ndarray:
        """Read-only map of the frames written so far: uint8 (N, H, W, 3) BGR."""
        self.finish_frames()
        return np.load(self._frames.path, mmap_mode="r")

    def commit(
        self,
        boxes: np.ndarray,
        *,
        fps: float,
        source: dict[str, Any] | None = None,
        preprocessing: dict[str, Any] | None = None,
        progress: ProgressFn | None = None,
    ) -> Avatar:
        self.finish_frames()
        n = self.frame_count
        if n == 0 or self.size_wh is None:
            raise InputError("an avatar needs at least one frame, got 0", path=self.path)
        if not (isinstance(fps, int | float) and math.isfinite(fps) and fps > 0):
            raise InputError(f"fps must be a finite number > 0, got {fps}", path=self.path)
        boxes = validate_boxes(boxes, n, self.size_wh, self.path)
        frames = self.frames_map()
        crops_out = _NpyAppender(self.tmp / _ARRAYS["crops"][0])
        inputs_out = _NpyAppender(self.tmp / _ARRAYS["visual_inputs"][0])
        for lo in range(0, n, _CHUNK):
            hi = min(lo + _CHUNK, n)
            crops = np.stack([crop_face(frames[j], boxes[j]) for j in range(lo, hi)])
            crops_out.append(crops)
            inputs_out.append(model_visual_input(crops))
            if progress is not None:
                progress(hi, n)
        crops_out.close()
        inputs_out.close()
        del frames
        writers = {"frames": self._frames, "crops": crops_out, "visual_inputs": inputs_out}
        digests = {name: w.sha256.hexdigest() for name, w in writers.items()}
        prep = default_preprocessing()
        prep.update(preprocessing or {})
        meta = {
            "version": AVATAR_VERSION,
            "fps": float(fps),
            "frame_count": n,
            "size_wh": list(self.size_wh),
            "boxes": boxes.tolist(),
            "preprocessing": prep,
            "source": source or {},
            "files": {name: file for name, (file, _) in _ARRAYS.items()},
            CONTENT_KEY: digests,
        }
        (self.tmp / META_NAME).write_text(json.dumps(meta, indent=1) + "\n")
        _replace_dir(self.tmp, self.path, self.overwrite)
        write_stamp(self.path, meta["files"], digests)
        logger.info("wrote avatar %s: %d frames %dx%d", self.path, n, *self.size_wh)
        return Avatar.open(self.path)

    def abort(self) -> None:
        self._frames.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def check_target(path: Path, overwrite: bool) -> None:
    """Refuse to write over an existing path unless ``overwrite`` (and then only a directory)."""
    if path.exists() and not overwrite:
        raise InputError("output already exists (pass overwrite=True to replace it)", path=path)
    if path.exists() and not path.is_dir():
        raise InputError("output exists and is not a directory", path=path)


def validate_boxes(
    boxes: Any, count: int, size_wh: tuple[int, int], path: str | Path
) -> np.ndarray:
    """Check ``count`` integer xyxy boxes inside a ``size_wh`` frame; return int32 (N, 4)."""
    arr = np.asarray(boxes)
    if arr.dtype == object or arr.ndim != 2 or arr.shape != (count, 4):
        raise InputError(
            f"expected {count} boxes of 4 integers (one per frame), got shape {arr.shape}",
            path=path,
        )
    if arr.dtype == bool or not (
        np.issubdtype(arr.dtype, np.integer)
        or (np.issubdtype(arr.dtype, np.floating) and np.all(arr == np.round(arr)))
    ):
        raise InputError(f"boxes must be integers, got {arr.dtype} values", path=path)
    arr = arr.astype(np.int64)
    w, h = size_wh
    bad = ~(
        (arr[:, 0] >= 0)
        & (arr[:, 1] >= 0)
        & (arr[:, 0] < arr[:, 2])
        & (arr[:, 1] < arr[:, 3])
        & (arr[:, 2] <= w)
        & (arr[:, 3] <= h)
    )
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        raise InputError(
            f"box {k} must satisfy 0 <= x1 < x2 <= {w} and 0 <= y1 < y2 <= {h}, "
            f"got {arr[k].tolist()}",
            path=path,
        )
    return arr.astype(np.int32)


def _replace_dir(tmp: Path, target: Path, overwrite: bool) -> None:
    if target.exists():
        if not overwrite:
            raise InputError("output already exists", path=target)
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(target)


class _NpyAppender:
    """Append C-order rows to a ``.npy`` file whose row count is known only at the end.

    The header is written as a fixed 128-byte placeholder and rewritten on ``close`` (format
    1.0: magic, 2-byte header length, a dict literal padded with spaces, newline).
    """

    _HEADER_BYTES = 128

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "wb")  # noqa: SIM115 (closed in close())
        self._file.write(b"\0" * self._HEADER_BYTES)
        self.row_shape: tuple[int, ...] | None = None
        self.rows = 0
        self.closed = False
        self.sha256 = hashlib.sha256()  # of the rows, as they are written (avatar_digest)

    def append(self, rows: np.ndarray) -> None:
        """Append a stack of uint8 rows, shape (k, *row_shape); the first call sets row_shape."""
        if self.row_shape is None:
            self.row_shape = tuple(rows.shape[1:])
        if rows.shape[1:] != self.row_shape or rows.dtype != np.uint8:
            raise ValueError(f"rows {rows.dtype} {rows.shape} do not fit {self.row_shape}")
        data = np.ascontiguousarray(rows).data
        self._file.write(data)
        self.sha256.update(data)
        self.rows += rows.shape[0]

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        shape = (self.rows, *(self.row_shape or ()))
        header = f"{{'descr': '|u1', 'fortran_order': False, 'shape': {shape}, }}"
        room = self._HEADER_BYTES - 10  # 6 magic + 2 version + 2 length
        if len(header) + 1 > room:
            raise ValueError(f"npy header too long: {header}")
        header = header.ljust(room - 1) + "\n"
        self._file.seek(0)
        self._file.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", room) + header.encode("latin1"))
        self._file.close()


# --- reading and validating -------------------------------------------------------------------


def _read_info(root: Path) -> AvatarInfo:
    meta_path = root / META_NAME
    if not root.is_dir():
        raise InputError("avatar bundle directory not found", path=root)
    if not meta_path.is_file():
        raise InputError(f"avatar bundle has no {META_NAME}", path=meta_path)
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(
            f"expected a JSON object, could not parse it: {exc}", path=meta_path
        ) from exc
    if not isinstance(meta, dict):
        raise InputError(f"expected a JSON object, got {type(meta).__name__}", path=meta_path)
    if meta.get("version") != AVATAR_VERSION:
        raise InputError(
            f"avatar version must be {AVATAR_VERSION}, got {meta.get('version')!r}",
            path=meta_path,
        )
    fps = meta.get("fps")
    if isinstance(fps, bool) or not isinstance(fps, int | float) or not fps > 0:
        raise InputError(f"fps must be a number > 0, got {fps!r}", path=meta_path)
    n = meta.get("frame_count")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InputError(f"frame_count must be an integer >= 1, got {n!r}", path=meta_path)
    size = meta.get("size_wh")
    if not (
        isinstance(size, list)
        and len(size) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)
    ):
        raise InputError(f"size_wh must be two integers > 0, got {size!r}", path=meta_path)
    size_wh = (size[0], size[1])
    raw_boxes = meta.get("boxes")
    if not isinstance(raw_boxes, list) or any(
        not isinstance(b, list) or any(isinstance(v, bool) or not isinstance(v, int) for v in b)
        for b in raw_boxes
    ):
        raise InputError("boxes must be a list of [x1, y1, x2, y2] integer lists", path=meta_path)
    if len(raw_boxes) != n:
        raise InputError(
            f"expected {n} boxes (one per frame), got {len(raw_boxes)}", path=meta_path
        )
    boxes = validate_boxes(raw_boxes, n, size_wh, meta_path)
    boxes.setflags(write=False)
    prep = meta.get("preprocessing", {})
    expected_prep = default_preprocessing()
    for key in ("crop_size", "roi_offset", "roi_size", "mask_rect_xywh"):
        if isinstance(prep, dict) and key in prep and prep[key] != expected_prep[key]:
            raise InputError(
                f"preprocessing {key} must be {expected_prep[key]} (this version's model "
                f"input), got {prep[key]!r}; prepare the avatar again",
                path=meta_path,
            )
    files = meta.get("files")
    if not isinstance(files, dict):
        raise InputError("files must map names to relative paths", path=meta_path)
    resolved: dict[str, str] = {}
    for name, (_, row_shape) in _ARRAYS.items():
        rel = files.get(name)
        if not isinstance(rel, str) or not rel:
            raise InputError(f"files must name the {name!r} array", path=meta_path)
        file_path = (root / rel).resolve()
        if Path(rel).is_absolute() or not file_path.is_relative_to(root.resolve()):
            raise InputError(
                f"file paths must stay inside the bundle, got {rel!r} for {name!r}",
                path=meta_path,
            )
        shape = (n, size_wh[1], size_wh[0], 3) if row_shape is None else (n, *row_shape)
        _check_npy(file_path, shape)
        resolved[name] = rel
    return AvatarInfo(
        path=str(root),
        fps=float(fps),
        frame_count=n,
        size_wh=size_wh,
        boxes=boxes,
        preprocessing=prep if isinstance(prep, dict) else {},
        source=meta.get("source") if isinstance(meta.get("source"), dict) else {},
        files=resolved,
    )


def _check_npy(path: Path, shape: tuple[int, ...]) -> None:
    """Check an ``.npy`` file's header (uint8, C order, ``shape``) and its length."""
    if not path.is_file():
        raise InputError("avatar data file is missing", path=path)
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                got_shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                got_shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            offset = f.tell()
    except (OSError, ValueError) as exc:
        raise InputError(
            f"expected a .npy array file, could not read it: {exc}", path=path
        ) from exc
    if dtype != np.uint8 or fortran or tuple(got_shape) != shape:
        raise InputError(
            f"expected uint8 C-order array of shape {shape}, got {dtype} {tuple(got_shape)}"
            + (" (Fortran order)" if fortran else ""),
            path=path,
        )
    expected = offset + math.prod(shape)
    size = path.stat().st_size
    if size != expected:
        raise InputError(
            f"expected {expected} bytes for shape {shape}, got {size} (truncated or corrupt)",
            path=path,
        )
