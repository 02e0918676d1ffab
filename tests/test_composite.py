"""Compositing against a direct OpenCV computation of the reference algorithm
(docs/compositing.md §3)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from lipsync_ray.composite import (
    composite_frame,
    crop_face,
    model_visual_input,
    prediction_to_uint8,
)
from lipsync_ray.errors import InputError


def _frame(seed: int = 0, size_wh=(320, 240)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w, h = size_wh
    base = rng.integers(0, 256, size=(h // 8, w // 8, 3), dtype=np.uint8)
    frame = cv2.resize(base, (w, h), interpolation=cv2.INTER_LINEAR)
    frame.setflags(write=False)  # Ray hands out read-only arrays
    return frame


def _reference(frame: np.ndarray, box, model):
    """The reference script, step by step (inference_328.py of SyncTalk_2D)."""
    x1, y1, x2, y2 = box
    crop_img = frame[y1:y2, x1:x2]
    h, w = crop_img.shape[:2]
    crop_img = cv2.resize(crop_img, (328, 328), interpolation=cv2.INTER_CUBIC)
    crop_img_ori = crop_img.copy()
    img_real_ex = crop_img[4:324, 4:324].copy()
    img_real_ex_ori = img_real_ex.copy()
    img_masked = cv2.rectangle(img_real_ex_ori, (5, 5, 310, 305), (0, 0, 0), -1)
    img_masked = img_masked.transpose(2, 0, 1).astype(np.float32)
    img_real_ex = img_real_ex.transpose(2, 0, 1).astype(np.float32)
    img_concat = np.concatenate([img_real_ex / 255.0, img_masked / 255.0], axis=0)[None]
    pred = model(img_concat)[0]
    pred = pred.transpose(1, 2, 0) * 255
    pred = np.array(pred, dtype=np.uint8)
    crop_img_ori[4:324, 4:324] = pred
    crop_img_ori = cv2.resize(crop_img_ori, (w, h), interpolation=cv2.INTER_CUBIC)
    out = frame.copy()
    out[y1:y2, x1:x2] = crop_img_ori
    return img_concat.astype(np.float32), out


def _tint(x: np.ndarray) -> np.ndarray:
    """A stand-in model with a known function: a per-channel affine map of the ROI."""
    return np.clip(x[:, :3] * 0.8 + np.array([0.1, 0.0, 0.05])[None, :, None, None], 0, 1)


@pytest.mark.parametrize(
    "box",
    [
        (100, 80, 200, 180),  # inside
        (0, 0, 96, 96),  # touching the top-left corner
        (224, 144, 320, 240),  # touching the bottom-right corner
        (10, 30, 131, 140),  # not square, odd sizes
    ],
)
def test_matches_reference_script(box):
    frame = _frame()
    ref_input, ref_out = _reference(frame, box, _tint)

    crop = crop_face(frame, box)
    visual = model_visual_input(crop[None])
    x = visual.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)
    np.testing.assert_array_equal(x, ref_input)

    pred = prediction_to_uint8(_tint(x).astype(np.float32))[0]
    out = composite_frame(frame, box, crop, pred)
    np.testing.assert_array_equal(out, ref_out)
    # outside the box the frame is untouched
    mask = np.ones(frame.shape[:2], bool)
    mask[box[1] : box[3], box[0] : box[2]] = False
    np.testing.assert_array_equal(out[mask], frame[mask])


def test_mask_is_the_reference_cv_rect():
    crop = np.full((328, 328, 3), 200, np.uint8)
    visual = model_visual_input(crop)
    expected = np.full((320, 320, 3), 200, np.uint8)
    cv2.rectangle(expected, (5, 5, 310, 305), (0, 0, 0), -1)  # x, y, width, height
    np.testing.assert_array_equal(visual[..., 3:], expected)
    np.testing.assert_array_equal(visual[..., :3], crop[4:324, 4:324])
    # 310 x 305 pixels: columns 5..314, rows 5..309
    assert (visual[..., 3] == 0).sum() == 310 * 305
    assert visual[309, 314, 3] == 0 and visual[310, 314, 3] == 200 and visual[309, 315, 3] == 200


def test_identity_round_trip_psnr():
    """The identity model reproduces the frame up to the two bicubic resizes."""
    frame = _frame(1, (640, 360))
    box = (260, 150, 420, 310)
    crop = crop_face(frame, box)
    x = model_visual_input(crop[None]).transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    pred = prediction_to_uint8(x[:, :3])[0]
    out = composite_frame(frame, box, crop, pred)
    x1, y1, x2, y2 = box
    err = out[y1:y2, x1:x2].astype(np.float64) - frame[y1:y2, x1:x2]
    psnr = 10 * np.log10(255.0**2 / np.mean(err**2))
    assert psnr > 50.0, psnr  # measured 61.3 dB: only the truncation to uint8 and two resizes


def test_prediction_to_uint8_truncates_and_clips():
    out = np.array([[-0.5, 0.0, 0.999, 1.0, 1.7]], np.float32).reshape(1, 1, 1, 5)
    out = np.repeat(out, 3, axis=1)
    u8 = prediction_to_uint8(out)
    assert u8.shape == (1, 1, 5, 3)
    assert u8[0, 0, :, 0].tolist() == [0, 0, 254, 255, 255]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda f: crop_face(f, (10, 10, 10, 50)), "x1 < x2"),
        (lambda f: crop_face(f, (-1, 0, 50, 50)), "inside"),
        (lambda f: crop_face(f, (0, 0, 321, 50)), "inside"),
        (lambda f: model_visual_input(np.zeros((320, 320, 3), np.uint8)), "328"),
        (lambda f: model_visual_input(np.zeros((328, 328, 3), np.float32)), "uint8"),
        (
            lambda f: composite_frame(
                f,
                (0, 0, 50, 50),
                np.zeros((328, 328, 3), np.uint8),
                np.zeros((328, 328, 3), np.uint8),
            ),
            "prediction",
        ),
    ],
)
def test_bad_inputs(call, message):
    with pytest.raises(InputError, match=message):
        call(_frame())
