"""Compositing: build the generator's visual input and paste its prediction back.

The reference algorithm (DESIGN.md §4), for one avatar frame ``full`` (uint8 (H, W, 3) BGR)
with crop box ``(x1, y1, x2, y2)``:

1. ``crop328 = resize(full[y1:y2, x1:x2], 328x328, bicubic)``
2. ``roi = crop328[4:324, 4:324]`` (320x320), ``masked = roi`` with a filled black rectangle from
   (5, 5), width 310, height 305 (``cv2.rectangle(roi, (5, 5, 310, 305), 0, -1)``: a cv::Rect,
   so columns 5..314 and rows 5..309).
3. model input = concat(roi, masked) / 255, channels first, BGR.
4. ``pred = uint8(output * 255)`` (truncation), ``crop328[4:324, 4:324] = pred``,
   resize crop328 back to ``(x2 - x1, y2 - y1)`` bicubic, paste into a copy of the frame.

Steps 1-2 never depend on audio: the avatar bundle stores their result once. Every function
here returns new arrays and never writes to its inputs (Ray hands out read-only arrays).
"""

from __future__ import annotations

import cv2
import numpy as np

from lipsync_ray.errors import InputError

__all__ = [
    "CROP_SIZE",
    "MASK_RECT_XYWH",
    "ROI_OFFSET",
    "ROI_SIZE",
    "composite_frame",
    "crop_face",
    "model_visual_input",
    "prediction_to_uint8",
]

CROP_SIZE = 328  # side of the square face crop, pixels
ROI_SIZE = 320  # side of the model's input and output, pixels
ROI_OFFSET = (CROP_SIZE - ROI_SIZE) // 2  # = 4: the ROI is the centre of the crop
# The mouth mask in ROI coordinates, as the reference draws it: cv2.rectangle(roi,
# (5, 5, 310, 305), ...) takes a cv::Rect (x, y, width, height), filling columns 5..314 and rows
# 5..309 inclusive (310 x 305 pixels).
MASK_RECT_XYWH = (5, 5, 310, 305)
_MASK_X0, _MASK_Y0, _MASK_W, _MASK_H = MASK_RECT_XYWH
_MASK_ROWS = slice(_MASK_Y0, _MASK_Y0 + _MASK_H)
_MASK_COLS = slice(_MASK_X0, _MASK_X0 + _MASK_W)


def _check_box(box_xyxy: np.ndarray | tuple[int, int, int, int], size_wh: tuple[int, int]) -> tuple:
    x1, y1, x2, y2 = (int(v) for v in box_xyxy)
    width, height = size_wh
    if not (0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height):
        raise InputError(
            f"crop box must lie inside the {width}x{height} frame with x1 < x2 and y1 < y2, "
            f"got {(x1, y1, x2, y2)}"
        )
    return x1, y1, x2, y2


def crop_face(frame: np.ndarray, box_xyxy) -> np.ndarray:
    """Cut the face box out of a frame and resize it to 328x328.

    Args:
        frame: uint8 (H, W, 3) BGR full frame (not modified).
        box_xyxy: ``(x1, y1, x2, y2)`` in pixels, inside the frame.

    Returns:
        uint8 (328, 328, 3) BGR, bicubic resize of ``frame[y1:y2, x1:x2]``.
    """
    x1, y1, x2, y2 = _check_box(box_xyxy, (frame.shape[1], frame.shape[0]))
    return cv2.resize(frame[y1:y2, x1:x2], (CROP_SIZE, CROP_SIZE), interpolation=cv2.INTER_CUBIC)


def model_visual_input(crop328: np.ndarray) -> np.ndarray:
    """The generator's visual input for one or many crops, still uint8 and channels last.

    Args:
        crop328: uint8 (..., 328, 328, 3) BGR crops (not modified).

    Returns:
        uint8 (..., 320, 320, 6): channels 0-2 the ROI, 3-5 the ROI with the mouth area
        blacked out. The session divides by 255 and moves channels first.
    """
    if crop328.shape[-3:] != (CROP_SIZE, CROP_SIZE, 3) or crop328.dtype != np.uint8:
        raise InputError(
            f"crops must be uint8 (..., {CROP_SIZE}, {CROP_SIZE}, 3), "
            f"got {crop328.dtype} {crop328.shape}"
        )
    roi = crop328[..., ROI_OFFSET : ROI_OFFSET + ROI_SIZE, ROI_OFFSET : ROI_OFFSET + ROI_SIZE, :]
    out = np.concatenate([roi, roi], axis=-1)
    out[..., _MASK_ROWS, _MASK_COLS, 3:] = 0
    return out


def prediction_to_uint8(output: np.ndarray) -> np.ndarray:
    """Convert model output float32 (B, 3, 320, 320) in [0, 1] to uint8 (B, 320, 320, 3) BGR.

    Truncates like the reference ``(output * 255).astype(uint8)``; values are clipped to
    [0, 255] first so that a model that slightly overshoots cannot wrap around.
    """
    scaled = np.clip(output * 255.0, 0.0, 255.0)
    return np.ascontiguousarray(scaled.transpose(0, 2, 3, 1)).astype(np.uint8)


def composite_frame(
    frame: np.ndarray, box_xyxy, crop328: np.ndarray, pred: np.ndarray
) -> np.ndarray:
    """Paste one prediction back into its avatar frame (the reference "hard" paste).

    Args:
        frame: uint8 (H, W, 3) BGR full avatar frame (not modified).
        box_xyxy: the crop box the crop was cut from.
        crop328: uint8 (328, 328, 3) BGR crop of that frame (not modified).
        pred: uint8 (320, 320, 3) BGR prediction.

    Returns:
        A new uint8 (H, W, 3) BGR frame.
    """
    x1, y1, x2, y2 = _check_box(box_xyxy, (frame.shape[1], frame.shape[0]))
    if pred.shape != (ROI_SIZE, ROI_SIZE, 3) or pred.dtype != np.uint8:
        raise InputError(
            f"prediction must be uint8 ({ROI_SIZE}, {ROI_SIZE}, 3), got {pred.dtype} {pred.shape}"
        )
    patched = crop328.copy()
    patched[ROI_OFFSET : ROI_OFFSET + ROI_SIZE, ROI_OFFSET : ROI_OFFSET + ROI_SIZE] = pred
    out = frame.copy()
    out[y1:y2, x1:x2] = cv2.resize(patched, (x2 - x1, y2 - y1), interpolation=cv2.INTER_CUBIC)
    return out
