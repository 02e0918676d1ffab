"""Seam metric: how strongly a pasted box's border stands out from the image around it.

Definition (``measure_seam``). Let ``I`` be the image as float (grey levels 0-255, channels
averaged after taking absolute differences) and ``(x1, y1, x2, y2)`` the paste box. For each
side of the box, the *depth* ``k`` of a pixel counts from that side inwards: ``k = 0`` is the
box's own border row or column, ``k = 1`` the next one inside, ``k = -1`` the first one outside.
The *step* at depth ``k`` is the absolute difference between the pixel at depth ``k`` and its
neighbour one further out (depth ``k - 1``), averaged over the colour channels: the gradient
component *across* the border. For the left side, ``step_k(y) = mean_c |I[y, x1 + k, c] -
I[y, x1 + k - 1, c]|`` for ``y1 <= y < y2``; the other sides are the mirror images.

Three bands of depths, with ``n`` the box extent across the side (its width for the left and
right sides, its height for the top and bottom):

* seam band ``0 <= k < band``, ``band = ceil(ROI_OFFSET * n / CROP_SIZE) + 2`` by default:
  the box border itself *and* the border of the 320x320 generated region, which the reference
  paste puts ``4 / 328`` of the box inside it (3 px on a 220 px box), plus bicubic support;
* outside band ``-gap - ref <= k < -gap`` and inside band ``band + gap <= k < band + gap + ref``
  (``gap = 2``, ``ref = 4`` by default): the image's own gradients just outside and inside.

``seam``, ``inside`` and ``outside`` are the mean steps of the three bands (each side's mean
weighted by its length, so every side counts the same in all three) and
``score = (seam + eps) / ((inside + outside) / 2 + eps)`` with ``eps = 0.01`` grey levels.
An untouched image gives ~1 (exactly 1 on a linear ramp); a visible seam gives several times
that; a feathered paste whose border equals the frame gives ~1 or less. Sides too close to the
image border to have an outside band are left out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lipsync_ray.composite import CROP_SIZE, ROI_OFFSET
from lipsync_ray.errors import InputError

__all__ = ["SEAM_EPS", "SeamMeasure", "measure_seam"]

SEAM_EPS = 0.01  # grey levels: keeps flat images (0 / 0) at a score of 1


@dataclass(frozen=True)
class SeamMeasure:
    """Mean steps (grey levels per pixel) of the three bands, and their ratio ``score``."""

    score: float
    seam: float
    inside: float
    outside: float
    sides: int  # sides of the box that were measured (1-4)


def _default_band(extent: int) -> int:
    return math.ceil(ROI_OFFSET * extent / CROP_SIZE) + 2


def measure_seam(
    image: np.ndarray,
    box_xyxy,
    *,
    band_px: int | None = None,
    gap_px: int = 2,
    ref_px: int = 4,
) -> SeamMeasure:
    """Measure the seam along the border of ``box_xyxy`` in ``image`` (see the module docstring).

    Args:
        image: uint8 or float (H, W) or (H, W, C) image, e.g. a BGR output frame (not modified).
        box_xyxy: ``(x1, y1, x2, y2)`` the paste box, inside the image.
        band_px: seam band depth; default ``ceil(4 * n / 328) + 2`` per side.
        gap_px: depths skipped between the seam band and each reference band.
        ref_px: depth of each reference band.

    Returns:
        A ``SeamMeasure``.

    Raises:
        InputError: bad image or box, a box too small for the bands, or no side with room
            for an outside band.
    """
    img = np.asarray(image)
    if img.ndim not in (2, 3) or img.size == 0 or not np.issubdtype(img.dtype, np.number):
        raise InputError(f"image must be a numeric (H, W) or (H, W, C) array, got {img.shape}")
    if img.ndim == 2:
        img = img[..., None]
    for name, value, low in (("gap_px", gap_px, 0), ("ref_px", ref_px, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InputError(f"{name} must be an integer >= {low}, got {value!r}")
    if band_px is not None and (
        isinstance(band_px, bool) or not isinstance(band_px, int) or band_px < 1
    ):
        raise InputError(f"band_px must be an integer >= 1 or None, got {band_px!r}")
    h_img, w_img = img.shape[:2]
    try:
        x1, y1, x2, y2 = (int(v) for v in box_xyxy)
    except (TypeError, ValueError) as exc:
        raise InputError(f"box must be 4 integers (x1, y1, x2, y2), got {box_xyxy!r}") from exc
    if not (0 <= x1 < x2 <= w_img and 0 <= y1 < y2 <= h_img):
        raise InputError(
            f"box must lie inside the {w_img}x{h_img} image with x1 < x2 and y1 < y2, "
            f"got {(x1, y1, x2, y2)}"
        )
    outer = gap_px + ref_px  # outside depths -outer .. -gap-1, and one more pixel further out
    # (room outside, extent across the side, side length, strip oriented outside -> inside)
    sides = (
        (x1, x2 - x1, y2 - y1, lambda a, b: img[y1:y2, x1 - a : x1 + b]),
        (w_img - x2, x2 - x1, y2 - y1, lambda a, b: img[y1:y2, x2 - b : x2 + a][:, ::-1]),
        (y1, y2 - y1, x2 - x1, lambda a, b: img[y1 - a : y1 + b, x1:x2].swapaxes(0, 1)),
        (
            h_img - y2,
            y2 - y1,
            x2 - x1,
            lambda a, b: img[y2 - b : y2 + a, x1:x2][::-1].swapaxes(0, 1),
        ),
    )
    totals = np.zeros(3)
    weight = 0
    used = 0
    for room, extent, length, strip_of in sides:
        band = _default_band(extent) if band_px is None else band_px
        inner = band + gap_px + ref_px  # depths 0 .. inner-1 are read inside
        if 2 * inner > extent:
            raise InputError(
                f"box extent {extent} px is too small for a {band} px seam band, a {gap_px} px "
                f"gap and a {ref_px} px reference band on each side (needs {2 * inner})"
            )
        if room < outer + 1:
            continue
        strip = strip_of(outer + 1, inner).astype(np.float32)  # depths -outer-1 .. inner-1
        steps = np.abs(np.diff(strip, axis=1)).mean(axis=(0, 2))  # steps[j]: depth j - outer
        seam = steps[outer : outer + band].mean()
        inside = steps[outer + band + gap_px : outer + inner].mean()
        outside = steps[:ref_px].mean()
        totals += length * np.array([seam, inside, outside])
        weight += length
        used += 1
    if used == 0:
        raise InputError(
            f"box {(x1, y1, x2, y2)} leaves no side with {outer + 1} px of image outside it "
            f"(the outside reference band) in a {w_img}x{h_img} image"
        )
    seam, inside, outside = (float(v) for v in totals / weight)
    score = (seam + SEAM_EPS) / ((inside + outside) / 2 + SEAM_EPS)
    return SeamMeasure(score=score, seam=seam, inside=inside, outside=outside, sides=used)
