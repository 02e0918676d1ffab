"""Generated media for the demo and the tests: a drawn talking face, videos, a ready avatar.

The face is drawn with OpenCV (skin-coloured head with soft shading, eyes with irises, brows,
nose, closed lips) over a gradient background with a fixed
seeded texture, and drifts a little (translation and scale) from frame to frame.
``make_demo_avatar`` builds a bundle from it without face detection: the crop boxes follow
from the drawing. Whether the MTCNN detector (``face.py``) finds the drawn face is checked by
``tests/test_face.py``; for real-photograph tests use ``skimage.data.astronaut()``.

``make_photo_avatar`` is the benchmark's footage: a real photograph (scikit-image's astronaut,
Eileen Collins) on a 1280x720 stage, moving like a handheld camera, with sensor noise. Drawn
faces are flat: x264 spends 2-3x less on them than on real video, whose texture and noise are
what a production avatar looks like.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import cv2
import numpy as np

from lipsync_ray.avatar import Avatar, write_avatar
from lipsync_ray.errors import EncodeError, InputError

__all__ = [
    "FacePose",
    "draw_face_frames",
    "face_poses",
    "make_demo_avatar",
    "make_photo_avatar",
    "photo_frames",
    "pose_box",
    "write_video",
]

_SKIN = (120, 160, 215)  # BGR
# The mouth line, in head radii below the head's centre: in the lower-face box (``pose_box``:
# from 0.05 radii above the centre, 1.68 radii square) it is (0.05 + 0.515) / 1.68 of the way
# down, ROI row 106 of 320, where the stand-in generator opens the mouth.
MOUTH_Y = 0.515
# Bumped when the drawing changes, so a demo redraws the avatar it keeps (version 1 moved its
# own mouth).
AVATAR_VERSION = 2
_LIPS = (90, 80, 170)
_MOUTH = (40, 30, 70)
# pixel format for each encoder we write (all exact or near-exact for BGR input)
_PIX_FMT = {
    "libx264": "yuv420p",
    "h264": "yuv420p",
    "libx264rgb": "bgr24",
    "ffv1": "bgr0",
    "png": "rgb24",
    "mpeg4": "yuv420p",
    "mjpeg": "yuvj420p",
}


@dataclass(frozen=True)
class FacePose:
    """Where the drawn face is in one frame (pixels) and how open its mouth is (0..1)."""

    centre_xy: tuple[float, float]
    radius_xy: tuple[float, float]  # half width and half height of the head ellipse
    mouth_open: float


def face_poses(n_frames: int, size_wh: tuple[int, int] = (1280, 720), seed: int = 0) -> list:
    """The ``FacePose`` of each frame of ``draw_face_frames(n_frames, size_wh, seed)``."""
    w, h = size_wh
    rng = np.random.default_rng(seed)
    phase = rng.uniform(0, 2 * math.pi, size=4)
    base_r = 0.22 * min(w, h)
    poses = []
    for i in range(n_frames):
        t = i / 25.0
        scale = 1.0 + 0.04 * math.sin(0.7 * t + phase[0])
        cx = w / 2 + 0.02 * w * math.sin(0.9 * t + phase[1])
        cy = h / 2 + 0.015 * h * math.sin(1.3 * t + phase[2])
        # The mouth stays closed: a lip-sync model opens it (the stand-in generator does, with
        # the speech's loudness), so the avatar's own mouth must not move.
        poses.append(FacePose((cx, cy), (base_r * 0.8 * scale, base_r * scale), 0.0))
    return poses


def pose_box(pose: FacePose, size_wh: tuple[int, int]) -> tuple[int, int, int, int]:
    """The square lower-face crop box of a drawn face: nose bridge to below the chin."""
    (cx, cy), (rx, ry) = pose.centre_xy, pose.radius_xy
    side = min(round(2.1 * rx), size_wh[0], size_wh[1])
    x1 = int(np.clip(round(cx - side / 2), 0, size_wh[0] - side))
    y1 = int(np.clip(round(cy - 0.05 * ry), 0, size_wh[1] - side))
    return x1, y1, x1 + side, y1 + side


def _background(size_wh: tuple[int, int], seed: int) -> np.ndarray:
    w, h = size_wh
    rng = np.random.default_rng(seed + 1)
    gx = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, :]
    gy = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None]
    bg = np.empty((h, w, 3), np.float32)
    bg[..., 0] = 90 + 80 * gx
    bg[..., 1] = 70 + 60 * gy
    bg[..., 2] = 60 + 40 * (gx + gy) / 2
    texture = cv2.GaussianBlur(rng.normal(0, 12, (h, w)).astype(np.float32), (0, 0), 2)
    return np.clip(bg + texture[..., None], 0, 255).astype(np.uint8)


def _ell(img, centre, axes, color, angle=0.0, thickness=-1) -> None:
    # cv2 drawing takes integer geometry; 4 fractional bits keep sub-pixel motion smooth.
    c = (round(centre[0] * 16), round(centre[1] * 16))
    a = (max(1, round(axes[0] * 16)), max(1, round(axes[1] * 16)))
    cv2.ellipse(img, c, a, angle, 0, 360, color, thickness, cv2.LINE_AA, 4)


def _draw_face(canvas: np.ndarray, pose: FacePose) -> None:
    (cx, cy), (rx, ry) = pose.centre_xy, pose.radius_xy
    _ell(canvas, (cx, cy - 0.15 * ry), (rx * 1.05, ry * 0.95), (40, 50, 70))  # hair
    _ell(canvas, (cx, cy + ry * 1.1), (rx * 0.45, ry * 0.5), (105, 140, 195))  # neck
    _ell(canvas, (cx, cy), (rx, ry), _SKIN)  # head
    _ell(canvas, (cx - rx * 0.95, cy), (rx * 0.12, ry * 0.2), _SKIN)  # ears
    _ell(canvas, (cx + rx * 0.95, cy), (rx * 0.12, ry * 0.2), _SKIN)
    for side in (-1, 1):
        ex, ey = cx + side * 0.38 * rx, cy - 0.22 * ry
        _ell(canvas, (ex, ey - 0.17 * ry), (0.24 * rx, 0.04 * ry), (50, 60, 80))  # brow
        _ell(canvas, (ex, ey), (0.2 * rx, 0.09 * ry), (235, 240, 240))  # eye white
        _ell(canvas, (ex, ey), (0.08 * rx, 0.08 * rx), (70, 60, 40))  # iris
        _ell(canvas, (ex, ey), (0.035 * rx, 0.035 * rx), (10, 10, 10))  # pupil
    nose = np.array(
        [[cx, cy - 0.1 * ry], [cx - 0.12 * rx, cy + 0.2 * ry], [cx + 0.12 * rx, cy + 0.2 * ry]]
    )
    cv2.fillConvexPoly(
        canvas, np.round(nose * 16).astype(np.int32), (100, 130, 190), cv2.LINE_AA, 4
    )
    my = cy + MOUTH_Y * ry
    open_h = 0.02 * ry + 0.14 * ry * pose.mouth_open
    _ell(canvas, (cx, my), (0.36 * rx, open_h + 0.05 * ry), _LIPS)  # lips
    _ell(canvas, (cx, my), (0.3 * rx, open_h), _MOUTH)  # mouth opening
    if pose.mouth_open > 0.3:
        _ell(canvas, (cx, my - open_h * 0.6), (0.22 * rx, open_h * 0.3), (225, 230, 235))  # teeth


def draw_face_frames(
    n_frames: int, size_wh: tuple[int, int] = (1280, 720), seed: int = 0
) -> Iterator[np.ndarray]:
    """Yield ``n_frames`` uint8 (H, W, 3) BGR frames of a drawn talking face (new arrays)."""
    if n_frames < 0 or size_wh[0] < 16 or size_wh[1] < 16:
        raise InputError(f"expected n_frames >= 0 and size >= 16x16, got {n_frames}, {size_wh}")
    bg = _background(size_wh, seed)
    shading = None
    for pose in face_poses(n_frames, size_wh, seed):
        frame = bg.copy()
        _draw_face(frame, pose)
        if shading is None:  # soft vignette-like shading so the skin is not flat
            w, h = size_wh
            yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
            shading = 1.0 - 0.15 * (((xx - w / 2) / w) ** 2 + ((yy - h / 2) / h) ** 2)
            shading = shading[..., None]
        frame = cv2.GaussianBlur(frame, (3, 3), 0)
        yield np.clip(frame * shading, 0, 255).astype(np.uint8)


def write_video(
    path: str | Path,
    frames: Iterable[np.ndarray],
    fps: float = 25,
    codec: str = "libx264",
    crf: int | None = 18,
    *,
    pix_fmt: str | None = None,
    options: dict[str, str] | None = None,
) -> int:
    """Encode uint8 (H, W, 3) BGR frames to a video file with PyAV; returns the frame count.

    ``codec`` is an FFmpeg encoder name (``libx264``, ``libx264rgb`` — exact with ``crf=0`` —,
    ``ffv1``, ``png``, ``mpeg4``...); ``crf`` applies to the x264 encoders only.
    """
    path = Path(path)
    rate = int(fps) if float(fps).is_integer() else fps
    count = 0
    try:
        with av.open(str(path), mode="w") as container:
            stream = container.add_stream(codec, rate=rate)
            stream.pix_fmt = pix_fmt or _PIX_FMT.get(codec, "yuv420p")
            opts = dict(options or {})
            if crf is not None and codec in ("libx264", "h264", "libx264rgb"):
                opts.setdefault("crf", str(crf))
            stream.options = opts
            for frame in frames:
                if count == 0:
                    stream.height, stream.width = frame.shape[:2]
                vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="bgr24")
                container.mux(stream.encode(vf))
                count += 1
            container.mux(stream.encode())  # flush exactly once
    except av.FFmpegError as exc:
        raise EncodeError(f"could not encode {codec} video: {exc}", path=path) from exc
    return count


def make_demo_avatar(
    out_dir: str | Path,
    seconds: float = 4.0,
    size_wh: tuple[int, int] = (1280, 720),
    seed: int = 0,
    *,
    fps: float = 25.0,
    overwrite: bool = False,
) -> Avatar:
    """Build an avatar bundle of the drawn face, with boxes known from the drawing (no detector)."""
    n = max(1, round(seconds * fps))
    boxes = np.array([pose_box(p, size_wh) for p in face_poses(n, size_wh, seed)], np.int32)
    return write_avatar(
        out_dir,
        draw_face_frames(n, size_wh, seed),
        boxes,
        fps=fps,
        source={"kind": "synthetic", "seed": seed, "seconds": seconds, "version": AVATAR_VERSION},
        preprocessing={"detector": "synthetic-drawing", "smoothing": None},
        overwrite=overwrite,
    )


# The photo avatar: the 512x512 astronaut scaled to 1024x1024 for a 720-line frame (in
# proportion for others) and reflect-padded into a stage a margin larger than the frame, so the
# camera can move without showing an edge.
_PHOTO_SIDE_720 = 1024
_STAGE_MARGIN = 64
# The lower-face box (nose bridge to below the chin, 220 px: a 720p face) in the 1024 px photo.
_PHOTO_FACE_BOX = (340, 212, 560, 432)
PHOTO_NOISE_STD = 2.5  # grey levels of per-pixel sensor noise, fresh in every frame


def _photo_stage(size_wh: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The stage (uint8 BGR, frame + margin on every side) and the face box in its pixels
    (float ``x1, y1, x2, y2``)."""
    try:
        from skimage import data
    except ImportError as exc:
        raise InputError(
            "the photographed avatar needs scikit-image: pip install 'lipsync-ray[bench]'"
        ) from exc
    w, h = size_wh
    k = h / 720
    side = max(1, round(_PHOTO_SIDE_720 * k))
    photo = cv2.resize(
        cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR),
        (side, side),
        interpolation=cv2.INTER_CUBIC,
    )
    margin = max(1, round(_STAGE_MARGIN * k))
    sw, sh = w + 2 * margin, h + 2 * margin
    pad_x, pad_y = max(0, (sw - side + 1) // 2), max(0, sh - side)
    wide = cv2.copyMakeBorder(photo, 0, pad_y, pad_x, pad_x, cv2.BORDER_REFLECT_101)
    x0 = (wide.shape[1] - sw) // 2  # columns centred, rows from the top: the face is up there
    box = np.array(_PHOTO_FACE_BOX, np.float64) * (side / _PHOTO_SIDE_720)
    box += [pad_x - x0, 0, pad_x - x0, 0]
    return np.ascontiguousarray(wide[:sh, x0 : x0 + sw]), box


def _camera(i: int, size_wh: tuple[int, int], phase: np.ndarray) -> tuple[np.ndarray, float]:
    """Frame ``i``'s stage-to-frame affine (2x3) and its scale: a slow handheld drift of up to
    12 px (at 720 lines), 2 % zoom and 1 degree of roll."""
    w, h = size_wh
    k = h / 720
    margin = max(1, round(_STAGE_MARGIN * k))
    t = i / 25.0
    dx = 12.0 * k * math.sin(0.8 * t + phase[0])
    dy = 8.0 * k * math.sin(1.1 * t + phase[1])
    scale = 1.0 + 0.02 * math.sin(0.5 * t + phase[2])
    angle = 1.0 * math.sin(0.6 * t + phase[3])
    m = cv2.getRotationMatrix2D((w / 2 + margin, h / 2 + margin), angle, scale)
    m[0, 2] += dx - margin
    m[1, 2] += dy - margin
    return m, scale


def photo_frames(
    n_frames: int,
    size_wh: tuple[int, int] = (1280, 720),
    seed: int = 0,
    *,
    noise_std: float = PHOTO_NOISE_STD,
) -> tuple[Iterator[np.ndarray], np.ndarray]:
    """Frames of the photographed face (uint8 (H, W, 3) BGR, generated lazily) and their
    lower-face boxes int32 (n_frames, 4) ``x1, y1, x2, y2``, which follow the camera."""
    stage, (x1, y1, x2, y2) = _photo_stage(size_wh)
    phase = np.random.default_rng(seed).uniform(0, 2 * math.pi, size=4)
    w, h = size_wh
    centre = np.array([(x1 + x2) / 2, (y1 + y2) / 2, 1.0])
    boxes = []
    for i in range(n_frames):
        m, scale = _camera(i, size_wh, phase)
        cx, cy = m @ centre
        side = min(round((x2 - x1) * scale), w, h)
        bx = int(np.clip(round(cx - side / 2), 0, w - side))
        by = int(np.clip(round(cy - side / 2), 0, h - side))
        boxes.append((bx, by, bx + side, by + side))

    def frames() -> Iterator[np.ndarray]:
        for i in range(n_frames):
            m, _ = _camera(i, size_wh, phase)
            frame = cv2.warpAffine(
                stage, m, size_wh, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101
            )
            if noise_std > 0:
                rng = np.random.default_rng([seed, i])
                noise = rng.normal(0.0, noise_std, frame.shape).astype(np.float32)
                frame = np.clip(frame + noise, 0, 255).astype(np.uint8)
            yield frame

    return frames(), np.array(boxes, np.int32)


def make_photo_avatar(
    out_dir: str | Path,
    seconds: float = 4.0,
    size_wh: tuple[int, int] = (1280, 720),
    seed: int = 0,
    *,
    fps: float = 25.0,
    noise_std: float = PHOTO_NOISE_STD,
    overwrite: bool = False,
) -> Avatar:
    """Build an avatar bundle of the photographed face (see :func:`photo_frames`); its boxes
    are known from the camera's motion, so no detector runs."""
    n = max(1, round(seconds * fps))
    frames, boxes = photo_frames(n, size_wh, seed, noise_std=noise_std)
    return write_avatar(
        out_dir,
        frames,
        boxes,
        fps=fps,
        source={
            "kind": "photo",
            "image": "skimage.data.astronaut",
            "seed": seed,
            "seconds": seconds,
            "noise_std": noise_std,
        },
        preprocessing={"detector": "synthetic-camera", "smoothing": None},
        overwrite=overwrite,
    )
