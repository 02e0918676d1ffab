"""Face detection on a real photograph, and detections -> smoothed lower-face boxes."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from lipsync_ray.dev.synthetic import draw_face_frames, face_poses
from lipsync_ray.errors import InputError
from lipsync_ray.face import (
    BoxOptions,
    FaceDetection,
    MtcnnDetector,
    boxes_from_detections,
    clamp_square_boxes,
    lower_face_params,
    make_detector,
    smooth_series,
)

skimage_data = pytest.importorskip("skimage.data")

# Hand-measured on skimage.data.astronaut() (512x512): Eileen Collins' face spans about
# x 180-270, y 60-175 (hairline to chin); eyes at y ~ 102, nose tip ~ (227, 130), mouth corners
# ~ (204, 142) and (247, 144).
FACE = (180, 60, 270, 175)
MOUTH = ((204, 142), (247, 144))


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return cv2.cvtColor(skimage_data.astronaut(), cv2.COLOR_RGB2BGR)


@pytest.fixture(scope="module")
def detector() -> MtcnnDetector:
    return MtcnnDetector()


def _near(a, b, tol) -> bool:
    return bool(np.all(np.abs(np.asarray(a, float) - np.asarray(b, float)) <= tol))


def test_detects_the_astronaut_face(astronaut, detector):
    before = astronaut.copy()
    dets = detector.detect(astronaut)
    np.testing.assert_array_equal(astronaut, before)  # input not modified
    assert len(dets) == 1, dets
    det = dets[0]
    assert det.score > 0.95
    assert _near(det.box_xyxy, FACE, 12)
    left_eye, right_eye, nose, mouth_l, mouth_r = det.landmarks_xy
    assert _near(nose, (227, 130), 8)
    assert _near(mouth_l, MOUTH[0], 8) and _near(mouth_r, MOUTH[1], 8)
    assert left_eye[0] < nose[0] < right_eye[0] and left_eye[1] < nose[1] < mouth_l[1]


def test_lower_face_box_covers_the_mouth(astronaut, detector):
    ro = astronaut.copy()
    ro.setflags(write=False)
    det = detector.detect_main(ro)
    (box,) = boxes_from_detections([det], (512, 512))
    x1, y1, x2, y2 = box.tolist()
    assert x2 - x1 == y2 - y1  # square
    assert 0.95 <= (x2 - x1) / (FACE[2] - FACE[0]) <= 1.25  # about the face width
    for mx, my in MOUTH:  # the mouth lies well inside, in the upper half
        assert x1 + 10 < mx < x2 - 10 and y1 + 10 < my < (y1 + y2) / 2
    assert 102 < y1 < 130  # top between the eyes and the nose tip
    assert y2 > FACE[3]  # bottom below the chin


def test_detects_a_face_in_a_720p_frame_and_maps_back(astronaut, detector):
    frame = np.full((720, 1280, 3), 90, np.uint8)
    frame[150:662, 600:1112] = astronaut  # downscaled to 640 wide for detection
    det = detector.detect_main(frame)
    assert det is not None
    shifted = (FACE[0] + 600, FACE[1] + 150, FACE[2] + 600, FACE[3] + 150)
    assert _near(det.box_xyxy, shifted, 14)


def test_no_face_in_a_gradient(detector):
    frame = np.tile(np.linspace(0, 255, 320, dtype=np.uint8)[None, :, None], (240, 1, 3))
    assert detector.detect(frame) == []
    with pytest.raises(InputError, match="no face found in any of the 3 frames"):
        boxes_from_detections([None, None, None], (320, 240), path="clip.mp4")


def test_drawn_synthetic_face_is_detected(detector):
    frames = list(draw_face_frames(3, (320, 240), seed=1))
    for frame, pose in zip(frames, face_poses(3, (320, 240), seed=1), strict=True):
        det = detector.detect_main(frame)
        assert det is not None
        cx = (det.box_xyxy[0] + det.box_xyxy[2]) / 2
        assert abs(cx - pose.centre_xy[0]) < 10


def _det(cx: float, eye_y: float, width: float) -> FaceDetection:
    """A hand-made detection: nose 30 px below the eyes, mouth 20 px below the nose."""
    return FaceDetection(
        box_xyxy=(cx - width / 2, eye_y - 40, cx + width / 2, eye_y + 80),
        score=0.99,
        landmarks_xy=(
            (cx - 20, eye_y),
            (cx + 20, eye_y),
            (cx, eye_y + 30),
            (cx - 15, eye_y + 50),
            (cx + 15, eye_y + 50),
        ),
    )


def test_lower_face_params_geometry():
    cx, top, side = lower_face_params(
        _det(200, 100, 100), BoxOptions(width_scale=1.1, top_frac=0.5)
    )
    assert (cx, top, side) == pytest.approx((200, 115, 110))


def test_missing_frames_are_interpolated():
    dets = [_det(100 + 10 * i, 100, 80) if i in (1, 5) else None for i in range(8)]
    boxes = boxes_from_detections(dets, (640, 480), BoxOptions(smoothing_window=1, top_frac=0))
    cx = (boxes[:, 0] + boxes[:, 2]) / 2
    # held before the first and after the last detection, linear in between
    np.testing.assert_allclose(cx, [110, 110, 120, 130, 140, 150, 150, 150], atol=0.5)
    np.testing.assert_array_equal(boxes[:, 1], 100)
    np.testing.assert_array_equal(boxes[:, 2] - boxes[:, 0], 84)


def test_smoothing_removes_jitter_and_keeps_the_mean():
    rng = np.random.default_rng(0)
    jitter = rng.normal(0, 4, size=60)
    dets = [_det(300 + j, 200, 120) for j in jitter]
    raw = boxes_from_detections(dets, (640, 480), BoxOptions(smoothing_window=1))
    smooth = boxes_from_detections(dets, (640, 480), BoxOptions(smoothing_window=7))
    assert np.std(np.diff(smooth[:, 0])) < 0.5 * np.std(np.diff(raw[:, 0]))
    assert abs(smooth[:, 0].mean() - raw[:, 0].mean()) < 1.0


def test_smooth_series_matches_reference():
    values = np.array([[0.0, 1], [3, 1], [9, 1], [0, 2], [6, 2]])
    got = smooth_series(values, 3)
    padded = np.concatenate([values[:1], values, values[-1:]])
    ref = np.array([padded[i : i + 3].mean(axis=0) for i in range(len(values))])
    np.testing.assert_allclose(got, ref)
    np.testing.assert_array_equal(smooth_series(values, 1), values)


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ((160, 50, 40), (140, 50, 180, 90)),  # inside: unchanged
        ((5, 50, 40), (0, 50, 40, 90)),  # off the left edge: shifted right
        ((315, 225, 40), (280, 200, 320, 240)),  # off the bottom right corner: shifted in
        ((160, -10, 40), (140, 0, 180, 40)),  # above the top: shifted down
        ((160, 10, 300), (40, 0, 280, 240)),  # bigger than the frame: shrunk to 240
    ],
)
def test_clamp_square_boxes(params, expected):
    got = clamp_square_boxes(np.array([params], float), (320, 240))
    assert got.dtype == np.int32
    assert tuple(got[0].tolist()) == expected


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"smoothing_window": 4}, "odd"),
        ({"smoothing_window": 0}, "odd"),
        ({"width_scale": 0}, "width_scale"),
    ],
)
def test_box_options_validation(kwargs, match):
    with pytest.raises(InputError, match=match):
        BoxOptions(**kwargs)


def test_unknown_detector():
    with pytest.raises(InputError, match="face detector must be one of"):
        make_detector("haar")
