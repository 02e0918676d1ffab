"""The stand-in models (issues 17 and 25): the mouth opens with the speech, and nothing else shows.

The audio encoder and the UNet with their default FACE weights, run through ONNX Runtime on
the encoder's own features: silence returns the ROI (FULL: every level), a louder sound opens
a larger dark mouth inside the mouth rectangle only, the opening follows a speech clip's
loudness, and the ROI's border passes through whatever the audio (a foreign encoder's features
too). Checked on a drawn face and on a real photograph, pasted with the render's own blend and
seam metric; then once end to end through ``lipsync-ray demo``.
"""

from __future__ import annotations

import cv2
import numpy as np
import onnxruntime as ort
import pytest

from lipsync_ray.audio import audio_windows, compute_features, mel_spectrogram
from lipsync_ray.composite import (
    ROI_OFFSET,
    ROI_SIZE,
    blend_frame,
    crop_face,
    model_visual_input,
    prediction_to_uint8,
)
from lipsync_ray.dev._face_weights import OPEN_RECT_ROI_XYXY
from lipsync_ray.dev.demo import _frame_rms
from lipsync_ray.dev.models import Arch, Size, build_model
from lipsync_ray.dev.speech import synth_speech
from lipsync_ray.dev.synthetic import draw_face_frames, face_poses, pose_box
from lipsync_ray.seams import measure_seam

BORDER_PX = 24  # the mouth mask is 0 this far (and further) from every side of the ROI
X1, Y1, X2, Y2 = (round(v) for v in OPEN_RECT_ROI_XYXY)
MOUTH = np.s_[Y1:Y2, X1:X2]  # where the opening may be, rows and columns of an (H, W, 3) ROI
OPEN_LEVELS = 40  # a pixel this much darker than in silence is part of the opening
# A tone at these amplitudes (peak, full scale 1): the quietest stays below the opening's
# threshold, the others open it further and further.
AMPLITUDES = (0.002, 0.02, 0.06, 0.2, 0.5)


def _session(model) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


@pytest.fixture(scope="module")
def encoder() -> ort.InferenceSession:
    return _session(build_model(Arch.AUDIO_ENCODER, Size.SMALL, seed=0))


@pytest.fixture(scope="module")
def small() -> ort.InferenceSession:
    return _session(build_model(Arch.UNET328, Size.SMALL, seed=0))


@pytest.fixture(scope="module")
def full() -> ort.InferenceSession:
    """FULL for pictures: it returns every level of the ROI, SMALL only its luma (~6 levels)."""
    return _session(build_model(Arch.UNET328, Size.FULL, seed=0))


def _drawn() -> tuple[np.ndarray, tuple[int, int, int, int]]:
    frame = next(draw_face_frames(1, (640, 360), seed=3))
    return frame, pose_box(face_poses(1, (640, 360), seed=3)[0], (640, 360))


def _photo() -> tuple[np.ndarray, tuple[int, int, int, int]]:
    data = pytest.importorskip("skimage.data")
    photo = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)  # 512x512, face near the top
    frame = np.full((720, 1280, 3), 60, np.uint8)
    frame[:, 128:1152] = cv2.resize(photo, (1024, 1024), interpolation=cv2.INTER_CUBIC)[16:736]
    return frame, (468, 210, 688, 430)  # nose tip to below the chin, as tests/test_blend.py


FACES = {"drawn": _drawn, "photo": _photo}


def _features(encoder, samples: np.ndarray) -> np.ndarray:
    """float32 (N, 512): the stand-in encoder's features of 16 kHz samples, as a render's."""
    mel = mel_spectrogram(samples)
    return compute_features(mel, lambda batch: encoder.run(["features"], {"mel": batch})[0])


def _tone(amplitude: float, seconds: float = 1.0) -> np.ndarray:
    """A 200 Hz vowel-like tone with harmonics, peak ``amplitude``."""
    t = np.arange(round(seconds * 16_000)) / 16_000
    wave = sum(np.sin(2 * np.pi * 200 * k * t) / k for k in range(1, 8))
    return (amplitude * wave / np.abs(wave).max()).astype(np.float32)


def _window(encoder, samples: np.ndarray) -> np.ndarray:
    """float32 (1, 32, 16, 16): the generator's audio input for the clip's middle frame."""
    features = _features(encoder, samples)
    return audio_windows(features, np.array([len(features) // 2]))


def _predict(session, crop: np.ndarray, audio: np.ndarray) -> np.ndarray:
    """uint8 (k, 320, 320, 3) BGR predictions for one 328x328 crop, as the render makes them."""
    visual = model_visual_input(crop[None]).astype(np.float32) / 255.0
    visual = np.repeat(visual.transpose(0, 3, 1, 2), len(audio), axis=0)
    out = session.run(["output"], {"input": visual, "audio": audio})[0]
    return prediction_to_uint8(out)


def _roi(crop: np.ndarray) -> np.ndarray:
    return crop[ROI_OFFSET : ROI_OFFSET + ROI_SIZE, ROI_OFFSET : ROI_OFFSET + ROI_SIZE]


def _border(image: np.ndarray) -> np.ndarray:
    """The ROI's pixels within BORDER_PX of a side, (n, 3) int."""
    keep = np.ones(image.shape[:2], bool)
    keep[BORDER_PX:-BORDER_PX, BORDER_PX:-BORDER_PX] = False
    return image[keep].astype(np.int64)


def _darkening(silent: np.ndarray, preds: np.ndarray) -> np.ndarray:
    """float (k, 320, 320): luma of the silent prediction minus each prediction's."""
    luma = [cv2.cvtColor(p, cv2.COLOR_BGR2GRAY).astype(np.float64) for p in preds]
    return cv2.cvtColor(silent, cv2.COLOR_BGR2GRAY).astype(np.float64) - np.array(luma)


def test_the_encoder_measures_loudness(encoder):
    """Digital silence gives exactly zero opening features; a louder tone gives larger ones."""
    # Row 8 of the window is the frame's own; its first half's even positions are the opening.
    opening = [_window(encoder, _tone(a))[0, 16, ::2, ::2] for a in (0.0, *AMPLITUDES)]
    peaks = [float(o.max()) for o in opening]
    assert peaks[0] == 0.0 and (opening[0] == 0.0).all()
    assert np.all(np.diff(peaks[1:]) > 0), peaks


@pytest.mark.slow  # the full-size stand-in generator
@pytest.mark.parametrize("face", FACES)
def test_silence_returns_the_face(full, encoder, face):
    frame, box = FACES[face]()
    crop = crop_face(frame, box)
    silence = _window(encoder, np.zeros(16_000, np.float32))
    pred = _predict(full, crop, silence)[0].astype(np.int64)
    # Every level comes back, the mouth's too (255 as 254: the sigmoid never reaches 1).
    assert np.abs(pred - _roi(crop)).max() <= 1
    assert np.abs(pred - _roi(crop)).mean() < 0.05


def test_a_louder_sound_opens_a_larger_dark_mouth(small, encoder):
    """SMALL (fast): the opening is measured against its own silent prediction."""
    frame, box = _drawn()
    crop = crop_face(frame, box)
    audio = np.concatenate([_window(encoder, _tone(a)) for a in (0.0, *AMPLITUDES)])
    preds = _predict(small, crop, audio)
    dark = _darkening(preds[0], preds[1:])
    area = (dark > OPEN_LEVELS).sum(axis=(1, 2))
    assert area[0] == 0 and np.abs(dark[0]).max() <= 1, area  # below the threshold: closed
    assert np.all(np.diff(area[1:]) > 0), area  # grows with the loudness
    assert area[-1] > 2000, area  # px: a mouth, not a dot (the loudest opens ~70x40 px)
    outside = np.ones(dark.shape[1:], bool)
    outside[MOUTH] = False
    assert np.abs(dark[:, outside]).max() <= 1  # nothing changes outside the mouth


def test_the_opening_follows_a_speech_clip(small, encoder):
    """Per frame, the mouth's darkening correlates with the loudness (RMS over its 40 ms).

    Measured on 6 s clips of seeds 0-3: r = 0.68, 0.80, 0.77, 0.82 (the old generator, which
    shaded the chin by the audio's change, had r = -0.05); pauses stay exactly closed.
    """
    samples = synth_speech(6.0, seed=2)
    features = _features(encoder, samples)
    n = len(features) - 2  # the last rows repeat the clip's tail window
    frame, box = _drawn()
    crop = crop_face(frame, box)
    silent = _predict(small, crop, np.zeros((1, 32, 16, 16), np.float32))[0]
    preds = [
        _predict(small, crop, audio_windows(features, rows))
        for rows in np.split(np.arange(n), range(25, n, 25))
    ]
    darkening = _darkening(silent, np.concatenate(preds))[:, Y1:Y2, X1:X2].mean(axis=(1, 2))
    rms = _frame_rms(samples, n)
    r = float(np.corrcoef(darkening, rms)[0, 1])
    assert r > 0.65, r
    silent_frames = np.r_[True, rms == 0.0, True]
    pause = silent_frames[:-2] & silent_frames[1:-1] & silent_frames[2:]
    assert pause.sum() >= 10 and np.abs(darkening[pause]).max() == 0.0


@pytest.mark.slow  # the full-size stand-in generator
@pytest.mark.parametrize("face", FACES)
def test_a_pasted_frame_has_no_seam(full, encoder, face):
    frame, box = FACES[face]()
    crop = crop_face(frame, box)
    untouched = measure_seam(frame, box)
    audio = np.concatenate([_window(encoder, _tone(a)) for a in (0.0, 0.5)])
    for name, pred in zip(("silent", "loud"), _predict(full, crop, audio), strict=True):
        pasted = blend_frame(frame, box, crop, pred)
        seam = measure_seam(pasted, box)
        context = f"{name}: pasted {seam}, untouched {untouched}"
        assert seam.score >= 0.95 * untouched.score, context
        assert abs(seam.score - untouched.score) < 0.05, context


@pytest.mark.slow  # the full-size stand-in generator
@pytest.mark.parametrize("face", FACES)
def test_any_features_change_the_mouth_only(full, face):
    """Features from another encoder (rectified noise) may open the mouth anywhere in its
    rectangle, but the ROI's border passes through untouched."""
    frame, box = FACES[face]()
    crop = crop_face(frame, box)
    roi = _roi(crop).astype(np.int64)
    rng = np.random.default_rng(2)
    noise = np.maximum(rng.normal(0.5, 1.5, (2, 32, 16, 16)), 0.0).astype(np.float32)
    for pred in _predict(full, crop, noise).astype(np.int64):
        assert np.abs(pred - roi)[MOUTH].mean() > 2.0  # levels: visible
        assert np.abs(_border(pred) - _border(roi)).max() <= 1


@pytest.mark.ray
@pytest.mark.slow
def test_demo_output_matches_its_avatar(own_ray_cluster, tmp_path):
    """The demo end to end: outside the mouth as in the avatar's own frames, the mouth open
    with the speech and closed in its pauses, the figures printed are the ones measured, and
    a work directory that holds only the manifest and the report. The demo starts its own
    (embedded) cluster: no shared one, whose simulated GPU it would join."""
    from lipsync_ray.avatar import Avatar
    from lipsync_ray.dev.demo import _untouched_seam, describe, measure_mouth, run_demo

    report = run_demo(tmp_path / "demo", seconds=2.0)
    mouth = measure_mouth(report, tmp_path / "demo")
    assert mouth.frames == report.frames
    # H.264 and the paste's truncation alone move the box by ~1-2 levels.
    assert mouth.outside_diff <= 2.5, mouth
    assert mouth.correlation > 0.5 and mouth.loud_darkening > 20, mouth
    assert mouth.pause_frames >= 3 and mouth.pause_darkening <= 3.0, mouth
    avatar = Avatar.open(tmp_path / "demo" / "avatar")
    assert abs(report.seam_score - _untouched_seam(avatar)) < 0.05, report.seam_score
    work = tmp_path / "demo" / "demo.mp4.work"
    assert sorted(p.name for p in work.iterdir()) == ["manifest.json", "report.json"]
    text = describe(report, tmp_path / "demo")
    for expected in (
        str(report.output),
        f"correlation of {mouth.correlation:.2f} over {mouth.frames} frames",
        f"at most {mouth.pause_darkening:.1f} levels",
        f"by {mouth.outside_diff:.1f} levels",
        f"the seam score, {report.seam_score:.2f}",
        str(work / "report.json"),
    ):
        assert expected in text


def test_the_demo_rebuilds_what_an_older_version_left(tmp_path):
    """Models without this design's version and an avatar that moved its own mouth (version 1,
    or none) are not reused."""
    from lipsync_ray.dev.demo import _current_avatar, _current_model
    from lipsync_ray.dev.models import save_model
    from lipsync_ray.dev.synthetic import make_demo_avatar

    model = build_model(Arch.AUDIO_ENCODER, Size.SMALL)
    assert _current_model(save_model(model, tmp_path / "now.onnx"))
    del model.metadata_props[:]
    assert not _current_model(save_model(model, tmp_path / "old.onnx"))
    assert not _current_model(tmp_path / "missing.onnx")
    avatar = make_demo_avatar(tmp_path / "avatar", seconds=0.2, size_wh=(160, 96))
    assert _current_avatar(avatar.path)
    info = (avatar.path / "avatar.json").read_text().replace('"version": 2', '"version": 1')
    (avatar.path / "avatar.json").write_text(info)
    assert not _current_avatar(avatar.path) and not _current_avatar(tmp_path / "none")
