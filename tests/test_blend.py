"""Blend modes, the feather mask, the seam metric and the cross-fade helper (issue 9)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from lipsync_ray.composite import (
    ROI_OFFSET,
    ROI_SIZE,
    Blend,
    BlendOptions,
    blend_frame,
    blend_into,
    composite_frame,
    crop_face,
    crossfade_frame,
    feather_mask,
    feather_px,
    model_visual_input,
    prediction_to_uint8,
)
from lipsync_ray.errors import InputError
from lipsync_ray.seams import SEAM_EPS, measure_seam


def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.array(a)
    a.setflags(write=False)  # Ray hands out read-only arrays
    return a


def _frame(seed: int = 0, size_wh=(320, 240)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w, h = size_wh
    base = rng.integers(0, 256, size=(h // 8, w // 8, 3), dtype=np.uint8)
    return _readonly(cv2.resize(base, (w, h), interpolation=cv2.INTER_LINEAR))


def _pred(seed: int = 1) -> np.ndarray:
    return _readonly(
        np.random.default_rng(seed).integers(0, 256, (ROI_SIZE, ROI_SIZE, 3), np.uint8)
    )


def _ramp_image(size_wh=(300, 200), a=0.5, b=0.3) -> np.ndarray:
    yy, xx = np.mgrid[0 : size_wh[1], 0 : size_wh[0]].astype(np.float64)
    return 20.0 + a * xx + b * yy


def _smoothstep_mask(w: int, h: int, ramp: int) -> np.ndarray:
    """Independent per-pixel evaluation of the documented feather mask formula."""
    out = np.empty((h, w))
    for y in range(h):
        for x in range(w):
            vals = []
            for i, n in ((x, w), (y, h)):
                r = min(max(min(i, n - 1 - i) / ramp, 0.0), 1.0)
                vals.append(r * r * (3 - 2 * r))
            out[y, x] = vals[0] * vals[1]
    return out


# --- blend modes --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "box", [(100, 80, 200, 180), (0, 0, 96, 96), (224, 144, 320, 240), (10, 30, 131, 140)]
)
def test_hard_blend_is_the_reference_paste(box):
    frame, pred = _frame(), _pred()
    crop = crop_face(frame, box)
    hard = blend_frame(frame, box, crop, pred, BlendOptions(Blend.HARD))
    np.testing.assert_array_equal(hard, composite_frame(frame, box, crop, pred))
    # the reference paste, step by step (docs/compositing.md §3)
    x1, y1, x2, y2 = box
    patched = crop.copy()
    patched[4:324, 4:324] = pred
    expected = frame.copy()
    expected[y1:y2, x1:x2] = cv2.resize(patched, (x2 - x1, y2 - y1), interpolation=cv2.INTER_CUBIC)
    np.testing.assert_array_equal(hard, expected)


@pytest.mark.parametrize("mode", list(Blend))
@pytest.mark.parametrize("box", [(100, 80, 200, 180), (0, 0, 96, 96), (224, 144, 320, 240)])
def test_blend_into_writes_the_blended_frame_in_place(box, mode):
    frame, pred = _frame(), _pred()
    crop = _readonly(crop_face(frame, box))
    options = BlendOptions(mode)
    buffer = frame.copy()
    assert blend_into(buffer, box, crop, pred, options) is None
    np.testing.assert_array_equal(buffer, blend_frame(frame, box, crop, pred, options))


@pytest.mark.parametrize(
    ("box", "feather"),
    [((100, 80, 200, 180), 0.1), ((0, 0, 96, 96), 0.2), ((10, 30, 131, 140), 0.05)],
)
def test_feather_blend_mixes_the_hard_paste_into_the_frame(box, feather):
    frame, pred = _frame(), _pred()
    before = frame.copy()
    crop = _readonly(crop_face(frame, box))
    out = blend_frame(frame, box, crop, pred, BlendOptions(Blend.FEATHER, feather))
    np.testing.assert_array_equal(frame, before)
    hard = composite_frame(frame, box, crop, pred).astype(np.float64)
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    mask = _smoothstep_mask(w, h, max(1, round(feather * min(w, h))))[..., None]
    region = frame[y1:y2, x1:x2].astype(np.float64)
    expected = region + (hard[y1:y2, x1:x2] - region) * mask
    got = out[y1:y2, x1:x2].astype(np.float64)
    assert np.abs(got - expected).max() <= 0.5 + 1e-3  # rounding only
    outside = np.ones(frame.shape[:2], bool)
    outside[y1:y2, x1:x2] = False
    np.testing.assert_array_equal(out[outside], frame[outside])
    # the border of the box is the frame itself; the middle is the hard paste itself
    np.testing.assert_array_equal(out[y1, x1:x2], frame[y1, x1:x2])
    np.testing.assert_array_equal(out[y1:y2, x2 - 1], frame[y1:y2, x2 - 1])
    cy, cx = (y1 + y2) // 2, (x1 + x2) // 2
    np.testing.assert_array_equal(out[cy, cx], hard[cy, cx].astype(np.uint8))


@pytest.mark.parametrize(
    ("size_wh", "ramp"), [((220, 220), 22), ((131, 110), 11), ((7, 5), 2), ((1, 1), 3)]
)
def test_feather_mask_properties(size_wh, ramp):
    w, h = size_wh
    mask = feather_mask(size_wh, ramp)
    assert mask.shape == (h, w) and mask.dtype == np.float32
    assert not mask.flags.writeable
    assert feather_mask(size_wh, ramp) is mask  # cached per size
    np.testing.assert_allclose(mask, _smoothstep_mask(w, h, ramp), atol=1e-6)
    assert mask.min() >= 0.0 and mask.max() <= 1.0
    for edge in (mask[0], mask[-1], mask[:, 0], mask[:, -1]):
        np.testing.assert_array_equal(edge, 0.0)
    np.testing.assert_array_equal(mask, mask[::-1, ::-1])
    if min(w, h) >= 2 * ramp + 1:
        assert mask[h // 2, w // 2] == 1.0
        assert (mask == 1.0).sum() == (w - 2 * ramp) * (h - 2 * ramp)
    # smooth: the steepest step of a smoothstep over `ramp` pixels is 1.5 / ramp
    steps = (
        np.abs(np.diff(mask, axis=1)).max(initial=0),
        np.abs(np.diff(mask, axis=0)).max(initial=0),
    )
    assert max(steps) <= 1.5 / ramp + 1e-6
    # monotone from the border to the middle along the middle row
    half = mask[h // 2, : (w + 1) // 2]
    assert np.all(np.diff(half) >= 0)


def test_feather_px_scales_with_the_shorter_side():
    assert feather_px((220, 220), 0.1) == 22
    assert feather_px((300, 200), 0.1) == 20
    assert feather_px((4, 4), 0.1) == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "soft"}, "blend mode must be one of"),
        ({"feather": 0.0}, "feather must be a number in (0, 0.5]"),
        ({"feather": 0.6}, "feather must be a number in (0, 0.5]"),
        ({"feather": float("nan")}, "feather must be a number in (0, 0.5]"),
        ({"feather": True}, "feather must be a number in (0, 0.5]"),
        ({"feather": "0.1"}, "feather must be a number in (0, 0.5]"),
    ],
)
def test_blend_options_reject_bad_values(kwargs, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace("]", r"\]")):
        BlendOptions(**kwargs)


def test_blend_options_accept_the_cli_strings():
    assert BlendOptions("hard").mode is Blend.HARD
    assert BlendOptions("feather", 0.2) == BlendOptions(Blend.FEATHER, 0.2)


@pytest.mark.parametrize(("size_wh", "ramp"), [((0, 10), 2), ((10, 10), 0), ((-3, 4), 1)])
def test_feather_mask_rejects_bad_sizes(size_wh, ramp):
    with pytest.raises(InputError, match="expected a box of at least 1x1"):
        feather_mask(size_wh, ramp)


# --- cross-fade ---------------------------------------------------------------------------


def test_crossfade_is_exact_at_0_and_1_and_mixes_between():
    gen, orig = _frame(1), _frame(2)
    one, zero = crossfade_frame(gen, orig, 1.0), crossfade_frame(gen, orig, 0)
    np.testing.assert_array_equal(one, gen)
    np.testing.assert_array_equal(zero, orig)
    assert one is not gen and zero is not orig and one.flags.writeable
    for w in (0.25, 0.5, np.float32(0.75)):
        got = crossfade_frame(gen, orig, w).astype(np.float64)
        expected = float(w) * gen + (1 - float(w)) * orig
        assert np.abs(got - expected).max() <= 0.5 + 1e-3


@pytest.mark.parametrize(
    ("generated", "original", "weight", "message"),
    [
        (np.zeros((4, 4, 3), np.uint8), np.zeros((4, 5, 3), np.uint8), 0.5, "one shape"),
        (np.zeros((4, 4, 3), np.float32), np.zeros((4, 4, 3), np.uint8), 0.5, "uint8"),
        (np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4, 3), np.uint8), -0.1, r"in \[0, 1\]"),
        (np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4, 3), np.uint8), 1.5, r"in \[0, 1\]"),
        (np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4, 3), np.uint8), np.nan, r"in \[0, 1\]"),
        (np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4, 3), np.uint8), "half", r"in \[0, 1\]"),
    ],
)
def test_crossfade_rejects_bad_inputs(generated, original, weight, message):
    with pytest.raises(InputError, match=message):
        crossfade_frame(generated, original, weight)


# --- seam metric --------------------------------------------------------------------------


def test_untouched_smooth_image_scores_one():
    ramp = _ramp_image()
    m = measure_seam(ramp, (50, 40, 200, 170))
    assert m.sides == 4
    assert m.score == pytest.approx(1.0, abs=1e-6)
    flat = np.full((100, 100, 3), 90, np.uint8)
    assert measure_seam(flat, (30, 30, 70, 70)).score == pytest.approx(1.0)


def test_offset_patch_has_the_computed_seam_score():
    # f = 0.5 x + 0.5 y, and f + 30 inside the box: every step is 0.5 except the box border,
    # 30.5 on the left and top sides (the jump adds to the gradient) and 29.5 on the right
    # and bottom sides. With a 2 px seam band: seam = (30 + 1) / 4 + (29.5 + 0.5) / 4.
    img = _ramp_image((200, 200), 0.5, 0.5)
    box = (60, 50, 140, 130)
    img[50:130, 60:140] += 30.0
    m = measure_seam(img, box, band_px=2)
    assert m.seam == pytest.approx(15.25)
    assert m.inside == pytest.approx(0.5) and m.outside == pytest.approx(0.5)
    assert m.score == pytest.approx((15.25 + SEAM_EPS) / (0.5 + SEAM_EPS))


def test_constant_patch_on_a_gradient_is_a_strong_seam():
    img = np.clip(_ramp_image(), 0, 255).astype(np.uint8)[..., None].repeat(3, axis=2)
    box = (50, 40, 200, 170)
    pasted = img.copy()
    pasted[40:170, 50:200] = 128
    assert measure_seam(pasted, box).score > 10.0
    assert measure_seam(img, box).score == pytest.approx(1.0, abs=0.05)  # uint8 rounding


def test_sides_at_the_image_border_are_left_out():
    img = _ramp_image((100, 100))
    assert measure_seam(img, (0, 20, 60, 80)).sides == 3
    assert measure_seam(img, (0, 0, 60, 60)).sides == 2
    assert measure_seam(img, (0, 0, 60, 60)).score == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize(
    ("image", "box", "kwargs", "message"),
    [
        (np.zeros((50, 50, 3)), (0, 0, 50, 50), {}, "leaves no side"),
        (np.zeros((50, 50, 3)), (10, 10, 60, 40), {}, "must lie inside"),
        (np.zeros((50, 50, 3)), (20, 20, 20, 40), {}, "must lie inside"),
        (np.zeros((50, 50, 3)), (15, 15, 30, 30), {}, "too small"),
        (np.zeros((50, 50, 3)), (10, 10, 40), {}, "4 integers"),
        (np.zeros((50,)), (10, 10, 40, 40), {}, r"\(H, W\)"),
        (np.zeros((50, 50), object), (10, 10, 40, 40), {}, "numeric"),
        (np.zeros((50, 50)), (10, 10, 40, 40), {"ref_px": 0}, "ref_px must be"),
        (np.zeros((50, 50)), (10, 10, 40, 40), {"gap_px": -1}, "gap_px must be"),
        (np.zeros((50, 50)), (10, 10, 40, 40), {"band_px": 0}, "band_px must be"),
    ],
)
def test_measure_seam_rejects_bad_inputs(image, box, kwargs, message):
    with pytest.raises(InputError, match=message):
        measure_seam(image, box, **kwargs)


# --- the real photograph ------------------------------------------------------------------

# skimage.data.astronaut() scaled 2x into a 1280x720 frame (as scripts/blend_figure.py does):
# the lower-face box from the nose tip to below the chin is 220 px, a 720p face.
_BOX = (468, 210, 688, 430)  # the figure's (468, 226, 688, 446), as the photo starts 16 px up
# A short clip: the photo drifts (dx, dy) px; the box follows with a detector's jitter (jx, jy)
# and a changing side (+ds px), so each frame is pasted over a different part of the face.
_CLIP = [(0, 0, 0, 0, 0), (5, -3, 2, -1, -6), (-4, 6, -3, 2, 5)]


@pytest.fixture(scope="module")
def astronaut_clip() -> list[tuple[np.ndarray, tuple[int, int, int, int]]]:
    data = pytest.importorskip("skimage.data")
    photo = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)
    big = cv2.resize(photo, (1024, 1024), interpolation=cv2.INTER_CUBIC)
    clip = []
    for dx, dy, jx, jy, ds in _CLIP:
        frame = np.full((720, 1280, 3), 60, np.uint8)
        frame[:, 128 + dx : 1152 + dx] = big[16 - dy : 736 - dy]
        x1, y1 = _BOX[0] + dx + jx, _BOX[1] + dy + jy
        side = _BOX[2] - _BOX[0] + ds
        clip.append((_readonly(frame), (x1, y1, x1 + side, y1 + side)))
    return clip


def _nearly_right(crop: np.ndarray) -> np.ndarray:
    """A generator that is almost right: the ROI blurred, 8 % darker, slightly tinted."""
    roi = crop[ROI_OFFSET : ROI_OFFSET + ROI_SIZE, ROI_OFFSET : ROI_OFFSET + ROI_SIZE]
    soft = cv2.GaussianBlur(roi, (0, 0), 1.5).astype(np.float32)
    return np.clip(soft * 0.92 + np.float32([6.0, 0.0, -4.0]), 0, 255).astype(np.uint8)


def test_feather_reduces_the_seam_on_a_real_photograph(astronaut_clip, small_models):
    from lipsync_ray.inference import GeneratorSession, Provider, SessionOptions

    session = GeneratorSession(small_models["unet"], SessionOptions(providers=(Provider.CPU,)))
    crops = np.stack([crop_face(frame, box) for frame, box in astronaut_clip])
    audio = np.random.default_rng(0).normal(0, 1, (len(crops), 32, 16, 16)).astype(np.float32)
    standin = prediction_to_uint8(session.run(model_visual_input(crops), audio))
    for k, (frame, box) in enumerate(astronaut_clip):
        untouched = measure_seam(frame, box)
        assert 0.8 < untouched.score < 1.3, f"frame {k}: the photo itself has no seam"
        for name, pred in (
            ("stand-in UNet", standin[k]),
            ("nearly right", _nearly_right(crops[k])),
        ):
            hard = measure_seam(blend_frame(frame, box, crops[k], pred, BlendOptions("hard")), box)
            soft = measure_seam(blend_frame(frame, box, crops[k], pred, BlendOptions()), box)
            context = f"frame {k}, {name}: hard {hard}, feather {soft}"
            assert hard.score > 1.4 * untouched.score, context
            assert soft.score < 0.7 * hard.score, context
            # the step across the border, beyond the photo's own, at least halves
            assert soft.seam - untouched.seam < 0.5 * (hard.seam - untouched.seam), context
            assert soft.score < untouched.score + 0.15, context  # no worse than a mild seam
