"""``prepare``: turn a talking-head video (or a SyncTalk_2D dataset) into an avatar bundle.

Video path, streaming (never the whole video in memory):

1. decode any container PyAV opens (H.264, FFV1, PNG, lossless x264, ...) frame by frame;
2. normalise to ``options.fps`` by timestamp: output frame ``k`` takes the source frame on
   screen at time ``k / fps`` (frames are dropped or repeated; the size is kept);
3. append each output frame to the bundle and detect the face on each distinct source frame
   (``face.py``), or take the boxes from a boxes file (one box per *source* frame);
4. turn detections into smoothed square lower-face boxes, then derive the crops and the
   model's visual inputs from the frames on disk (``avatar.BundleWriter``).

A truncated file is detected by comparing the frames decoded with the count (or duration)
in the container header, where the container has one.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import cv2
import numpy as np

from lipsync_ray.audio import DecoderErrorLog
from lipsync_ray.avatar import BundleWriter, check_target, validate_boxes
from lipsync_ray.errors import InputError
from lipsync_ray.face import DETECTORS, BoxOptions, FaceDetection, boxes_from_detections
from lipsync_ray.face import make_detector as _make_detector

__all__ = ["PrepareOptions", "PrepareSummary", "import_synctalk_dataset", "prepare_avatar"]

logger = logging.getLogger(__name__)

ProgressFn = Callable[[int, "int | None"], None]
_SYNCTALK_MIN_POINTS = 53  # the crop rule reads landmarks 1, 31 and 52


@dataclass(frozen=True)
class PrepareOptions:
    """How a video becomes an avatar."""

    fps: float = 25.0  # output frame rate; source frames are dropped/repeated by timestamp
    detector: str = "mtcnn"  # face detector (see face.DETECTORS); unused with a boxes file
    # Boxes are smoothed with a centred moving average of this many frames (odd; 1 = off):
    # 5 frames (0.2 s at 25 fps) removes detector jitter without lagging head motion.
    smoothing_window: int = 5
    width_scale: float = 1.05  # crop side / detected face width
    top_frac: float = 0.4  # crop top between the eye line (0) and the nose tip (1)
    detect_threads: int = 1  # ONNX Runtime threads for the detector

    def __post_init__(self) -> None:
        if not (math.isfinite(self.fps) and self.fps > 0):
            raise InputError(f"fps must be a finite number > 0, got {self.fps}")
        if self.detector not in DETECTORS:
            raise InputError(f"detector must be one of {list(DETECTORS)}, got {self.detector!r}")
        self.box_options()  # validates the box fields

    def box_options(self) -> BoxOptions:
        return BoxOptions(
            width_scale=self.width_scale,
            top_frac=self.top_frac,
            smoothing_window=self.smoothing_window,
        )


@dataclass(frozen=True)
class PrepareSummary:
    """What ``prepare`` made."""

    frames: int
    fps: float
    size_wh: tuple[int, int]
    detector: str  # detector name, "boxes-file" or "synctalk-landmarks"
    path: str
    seconds: float  # wall time


@dataclass(frozen=True)
class _VideoFacts:
    codec: str
    source_fps: float | None
    expected_frames: int | None  # from the container header, when known


def prepare_avatar(
    video: str | Path,
    out_dir: str | Path,
    options: PrepareOptions = PrepareOptions(),
    *,
    boxes_file: str | Path | None = None,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
) -> PrepareSummary:
    """Build an avatar bundle from a video of one person.

    Args:
        video: any video file PyAV can decode.
        out_dir: the bundle directory to create.
        options: frame rate, detector and box settings.
        boxes_file: JSON ``{"boxes": [[x1, y1, x2, y2], ...]}``, one integer box per *source*
            frame; skips face detection and smoothing.
        overwrite: replace an existing bundle at ``out_dir``.
        progress: called as ``progress(output_frames_done, expected_total_or_None)``.

    Raises:
        InputError: missing, non-video, corrupt or truncated file, no frames, no face, bad
            boxes file, existing output.
    """
    started = time.perf_counter()
    video, out_dir = Path(video), Path(out_dir)
    if not video.is_file():
        raise InputError("video file not found", path=video)
    check_target(out_dir, overwrite)
    raw_boxes = _read_boxes_file(Path(boxes_file)) if boxes_file is not None else None
    detector = (
        None
        if raw_boxes is not None
        else _make_detector(options.detector, threads=options.detect_threads)
    )
    writer = BundleWriter(out_dir, overwrite=overwrite)
    try:
        facts, frames = _open_video(video)
        expected_out = None
        if facts.expected_frames and facts.source_fps:
            expected_out = math.ceil(facts.expected_frames / facts.source_fps * options.fps - 1e-6)
        source_index: list[int] = []
        detections: list[FaceDetection | None] = []
        last_src, last_det = -1, None
        for src, frame in _resample(frames, options.fps):
            writer.add_frame(frame)
            source_index.append(src)
            if detector is not None:
                if src != last_src:
                    last_src, last_det = src, detector.detect_main(frame)
                detections.append(last_det)
            if progress is not None:
                progress(len(source_index), expected_out)
        n_source = source_index[-1] + 1 if source_index else 0
        if n_source == 0:
            raise InputError("video has no frames", path=video)
        _check_complete(video, facts, frames.decoded)
        size_wh = writer.size_wh
        assert size_wh is not None
        if raw_boxes is not None:
            src_boxes = validate_boxes(raw_boxes, frames.decoded, size_wh, Path(boxes_file))
            boxes = src_boxes[np.asarray(source_index)]
            detector_name = "boxes-file"
        else:
            boxes = boxes_from_detections(detections, size_wh, options.box_options(), path=video)
            detector_name = options.detector
        source = {
            "kind": "video",
            "path": str(video),
            "codec": facts.codec,
            "source_fps": facts.source_fps,
            "source_frames": frames.decoded,
            "boxes_file": None if boxes_file is None else str(boxes_file),
        }
        smoothing = (
            None
            if raw_boxes is not None
            else {
                "method": "centred moving average",
                "window": options.smoothing_window,
                "width_scale": options.width_scale,
                "top_frac": options.top_frac,
            }
        )
        avatar = writer.commit(
            boxes,
            fps=options.fps,
            source=source,
            preprocessing={"detector": detector_name, "smoothing": smoothing},
        )
    except BaseException:
        writer.abort()
        raise
    seconds = time.perf_counter() - started
    logger.info(
        "prepared %s from %s: %d frames in %.1f s", out_dir, video, len(source_index), seconds
    )
    return PrepareSummary(
        frames=avatar.frame_count,
        fps=avatar.fps,
        size_wh=avatar.size_wh,
        detector=detector_name,
        path=str(out_dir),
        seconds=seconds,
    )


class _Frames:
    """Iterator over ``(time_s, frame, duration_s)`` of a video; counts decoded frames."""

    def __init__(self, path: Path, container, stream) -> None:
        self.path, self._container, self._stream = path, container, stream
        self.rate = float(stream.average_rate) if stream.average_rate else None
        self.decoded = 0

    def __iter__(self) -> Iterator[tuple[float, np.ndarray, float | None]]:
        stream = self._stream
        tb = float(stream.time_base) if stream.time_base else None
        try:
            names = {stream.codec_context.name, *self._container.format.name.split(",")}
            with self._container, DecoderErrorLog(self.path, names, "video") as errors:
                for frame in self._container.decode(stream):
                    if frame.pts is not None and tb is not None:
                        t = frame.pts * tb
                    else:
                        t = self.decoded / (self.rate or 25.0)
                    dur = frame.duration * tb if frame.duration and tb else None
                    image = frame.to_ndarray(format="bgr24")
                    self.decoded += 1
                    errors.check(self.decoded)
                    yield t, image, dur
                errors.check(self.decoded)
        except av.FFmpegError as exc:
            raise InputError(
                f"video is corrupt or truncated after {self.decoded} frames: {exc}",
                path=self.path,
            ) from exc


def _open_video(path: Path) -> tuple[_VideoFacts, _Frames]:
    try:
        container = av.open(str(path))
    except (av.FFmpegError, UnicodeDecodeError) as exc:
        raise InputError(f"expected a video file, could not open it: {exc}", path=path) from exc
    if not container.streams.video:
        container.close()
        raise InputError("expected a video stream, the file has none", path=path)
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    rate = float(stream.average_rate) if stream.average_rate else None
    expected = stream.frames or None
    if expected is None and rate:
        if stream.duration and stream.time_base:
            expected = round(float(stream.duration * stream.time_base) * rate)
        elif container.duration:  # microseconds
            expected = round(container.duration / 1e6 * rate)
    facts = _VideoFacts(codec=stream.codec_context.name, source_fps=rate, expected_frames=expected)
    return facts, _Frames(path, container, stream)


def _resample(frames: _Frames, fps: float) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(source_index, frame)`` at ``fps``: output k shows the source frame on screen at
    ``t0 + k / fps``; a source frame is on screen from its timestamp to the next one's, and the
    last one for its own duration (or one source frame period)."""
    eps = 1e-3 / fps  # timestamps are rounded to the stream's time base
    k = 0
    first_t: float | None = None
    prev: tuple[int, float, np.ndarray, float | None] | None = None
    for i, (t, image, dur) in enumerate(frames):
        if first_t is None:
            first_t = t
        elif prev is not None:
            while first_t + k / fps < t - eps:
                yield prev[0], prev[2]
                k += 1
        prev = (i, t, image, dur)
    if prev is None or first_t is None:
        return
    end = prev[1] + (prev[3] or (1.0 / frames.rate if frames.rate else 1.0 / fps))
    while k == 0 or first_t + k / fps < end - eps:
        yield prev[0], prev[2]
        k += 1


def _check_complete(path: Path, facts: _VideoFacts, decoded: int) -> None:
    expected = facts.expected_frames
    if expected and decoded < expected - max(1, round(0.01 * expected)):
        raise InputError(
            f"video is truncated: expected {expected} frames from its header, decoded {decoded}",
            path=path,
        )


def _read_boxes_file(path: Path) -> list:
    if not path.is_file():
        raise InputError("boxes file not found", path=path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(
            f"expected a JSON boxes file, could not parse it: {exc}", path=path
        ) from exc
    boxes = data.get("boxes") if isinstance(data, dict) else None
    if not isinstance(boxes, list) or not boxes:
        raise InputError(
            'expected {"boxes": [[x1, y1, x2, y2], ...]} with one box per frame', path=path
        )
    for k, box in enumerate(boxes):
        if not (
            isinstance(box, list)
            and len(box) == 4
            and all(isinstance(v, int) and not isinstance(v, bool) for v in box)
        ):
            raise InputError(f"box {k} must be 4 integers [x1, y1, x2, y2], got {box!r}", path=path)
    return boxes


# --- SyncTalk_2D datasets --------------------------------------------------------------------


def import_synctalk_dataset(
    dataset_dir: str | Path,
    out_dir: str | Path,
    *,
    fps: float = 25.0,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
) -> PrepareSummary:
    """Build a bundle from a SyncTalk_2D dataset directory (already at ``fps``).

    Reads ``full_body_img/<k>.jpg`` (k = 0..N-1, BGR) and ``landmarks/<k>.lms`` ("x y" per
    line, truncated to int as the reference does); the crop box is the reference's:
    ``x1 = lms[1].x, y1 = lms[52].y, x2 = lms[31].x, side = x2 - x1, y2 = y1 + side``.
    """
    started = time.perf_counter()
    root, out_dir = Path(dataset_dir), Path(out_dir)
    img_dir, lms_dir = root / "full_body_img", root / "landmarks"
    for d in (img_dir, lms_dir):
        if not d.is_dir():
            raise InputError("SyncTalk dataset directory is missing", path=d)
    stems = sorted(int(p.stem) for p in img_dir.glob("*.jpg") if p.stem.isdigit())
    if not stems:
        raise InputError("expected full_body_img/<k>.jpg images, found none", path=img_dir)
    if stems != list(range(len(stems))):
        missing = sorted(set(range(stems[-1] + 1)) - set(stems))[0]
        raise InputError(
            "expected images numbered 0..N-1, this one is missing", path=img_dir / f"{missing}.jpg"
        )
    n = len(stems)
    check_target(out_dir, overwrite)
    writer = BundleWriter(out_dir, overwrite=overwrite)
    try:
        boxes = np.empty((n, 4), np.int64)
        for k in range(n):
            img_path = img_dir / f"{k}.jpg"
            image = cv2.imread(str(img_path), cv2.IMREAD_COLOR)
            if image is None:
                raise InputError("expected a JPEG image, could not decode it", path=img_path)
            writer.add_frame(image)
            box = _synctalk_box(lms_dir / f"{k}.lms")
            validate_boxes(box[None], 1, (image.shape[1], image.shape[0]), lms_dir / f"{k}.lms")
            boxes[k] = box
            if progress is not None:
                progress(k + 1, n)
        avatar = writer.commit(
            boxes,
            fps=fps,
            source={"kind": "synctalk_dataset", "path": str(root), "frames": n},
            preprocessing={"detector": "synctalk-landmarks", "smoothing": None},
        )
    except BaseException:
        writer.abort()
        raise
    return PrepareSummary(
        frames=avatar.frame_count,
        fps=avatar.fps,
        size_wh=avatar.size_wh,
        detector="synctalk-landmarks",
        path=str(out_dir),
        seconds=time.perf_counter() - started,
    )


def _synctalk_box(path: Path) -> np.ndarray:
    if not path.is_file():
        raise InputError("landmark file is missing", path=path)
    try:
        pts = np.loadtxt(path, dtype=np.float32, ndmin=2)
    except ValueError as exc:
        raise InputError(f"expected 'x y' per line, could not parse: {exc}", path=path) from exc
    if pts.shape[1] != 2 or pts.shape[0] < _SYNCTALK_MIN_POINTS or not np.isfinite(pts).all():
        raise InputError(
            f"expected at least {_SYNCTALK_MIN_POINTS} finite 'x y' landmark lines, "
            f"got shape {pts.shape}",
            path=path,
        )
    lms = pts.astype(np.int32)
    x1, y1, x2 = int(lms[1, 0]), int(lms[52, 1]), int(lms[31, 0])
    return np.array([x1, y1, x2, y1 + (x2 - x1)], np.int64)
