"""Draw docs/blend.png: the same frame pasted with ``hard`` and ``feather``, zoomed on the box.

The frame is the real photograph ``skimage.data.astronaut()`` (RGB converted to BGR), scaled 2x
into a 1280x720 frame so that the lower-face box is 220 px, the size of a face in 720p video.
Two generators make the 320x320 patch:

* top row: the small untrained stand-in UNet (``build_model(Arch.UNET328, Size.SMALL)``, run
  through ``GeneratorSession`` on the CPU with seeded random audio windows): a patch that has
  nothing to do with the photo, the worst case for a seam;
* bottom row: a "nearly right" generator, the real ROI blurred (sigma 1.5) and 8 % darker with
  a slight colour cast, the typical difference between a trained model's output and its input.

Each panel is labelled with the seam score of ``lipsync_ray.seams.measure_seam`` (about 1 for an
untouched image). Run from the repository root (needs the test extra, for scikit-image)::

    python scripts/blend_figure.py [--out docs/blend.png]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import cv2
import numpy as np

from lipsync_ray.composite import (
    ROI_OFFSET,
    ROI_SIZE,
    Blend,
    BlendOptions,
    blend_frame,
    crop_face,
    model_visual_input,
    prediction_to_uint8,
)
from lipsync_ray.dev.models import Arch, Size, build_model, save_model
from lipsync_ray.inference import GeneratorSession, Provider, SessionOptions
from lipsync_ray.seams import measure_seam

FRAME_WH = (1280, 720)
BOX_XYXY = (468, 226, 688, 446)  # nose tip to below the chin of the 2x photo, 220 px
MARGIN_PX = 16  # frame shown around the box in each panel
ZOOM = 1.0
LABEL_PX = 26


def astronaut_frame() -> np.ndarray:
    """uint8 (720, 1280, 3) BGR: the astronaut photo scaled 2x, on a grey frame."""
    from skimage import data

    photo = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)
    big = cv2.resize(photo, (1024, 1024), interpolation=cv2.INTER_CUBIC)
    frame = np.full((FRAME_WH[1], FRAME_WH[0], 3), 60, np.uint8)
    frame[:, 128:1152] = big[: FRAME_WH[1]]
    return frame


def standin_prediction(crop328: np.ndarray, workdir: Path) -> np.ndarray:
    """uint8 (320, 320, 3) BGR patch of the small untrained stand-in UNet."""
    model = save_model(
        build_model(Arch.UNET328, Size.SMALL, seed=0, weights="random"), workdir / "unet.onnx"
    )
    session = GeneratorSession(model, SessionOptions(providers=(Provider.CPU,)))
    audio = np.random.default_rng(0).normal(0.0, 1.0, (1, 32, 16, 16)).astype(np.float32)
    return prediction_to_uint8(session.run(model_visual_input(crop328[None]), audio))[0]


def nearly_right_prediction(crop328: np.ndarray) -> np.ndarray:
    """uint8 (320, 320, 3) BGR: the real ROI, blurred, darker and slightly tinted."""
    roi = crop328[ROI_OFFSET : ROI_OFFSET + ROI_SIZE, ROI_OFFSET : ROI_OFFSET + ROI_SIZE]
    soft = cv2.GaussianBlur(roi, (0, 0), 1.5).astype(np.float32)
    return np.clip(soft * 0.92 + np.float32([6.0, 0.0, -4.0]), 0, 255).astype(np.uint8)


def panel(frame: np.ndarray, box, label: str) -> np.ndarray:
    x1, y1, x2, y2 = box
    view = frame[y1 - MARGIN_PX : y2 + MARGIN_PX, x1 - MARGIN_PX : x2 + MARGIN_PX]
    view = cv2.resize(view, None, fx=ZOOM, fy=ZOOM, interpolation=cv2.INTER_CUBIC)
    bar = np.full((LABEL_PX, view.shape[1], 3), 255, np.uint8)
    cv2.putText(bar, label, (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return np.vstack([bar, view])


def make_figure() -> tuple[np.ndarray, dict[str, float]]:
    frame = astronaut_frame()
    crop = crop_face(frame, BOX_XYXY)
    with tempfile.TemporaryDirectory() as tmp:
        preds = {
            "stand-in UNet": standin_prediction(crop, Path(tmp)),
            "nearly right": nearly_right_prediction(crop),
        }
    rows, scores = [], {}
    for name, pred in preds.items():
        row = []
        for mode in (Blend.HARD, Blend.FEATHER):
            out = blend_frame(frame, BOX_XYXY, crop, pred, BlendOptions(mode))
            score = measure_seam(out, BOX_XYXY).score
            scores[f"{name} / {mode.value}"] = score
            row.append(panel(out, BOX_XYXY, f"{name}, {mode.value}: {score:.2f}"))
        gutter = np.full((row[0].shape[0], 6, 3), 255, np.uint8)
        rows.append(np.hstack([row[0], gutter, row[1]]))
    gap = np.full((6, rows[0].shape[1], 3), 255, np.uint8)
    untouched = measure_seam(frame, BOX_XYXY).score
    scores["untouched frame"] = untouched
    caption = np.full((LABEL_PX, rows[0].shape[1], 3), 255, np.uint8)
    text = f"seam score (measure_seam): untouched frame {untouched:.2f}, higher = seam"
    cv2.putText(caption, text, (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (0, 0, 0), 1, cv2.LINE_AA)
    return np.vstack([rows[0], gap, rows[1], caption]), scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/blend.png"))
    args = parser.parse_args()
    figure, scores = make_figure()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(args.out), figure, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    for name, score in scores.items():
        print(f"{name:32s} seam score {score:.2f}")
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
