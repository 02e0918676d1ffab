"""Silence detection on video frames and the passthrough cross-fade weights (issue 9)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lipsync_ray.dev.speech import synth_speech
from lipsync_ray.errors import InputError
from lipsync_ray.vad import (
    SilenceOptions,
    crossfade_weights,
    frame_levels_db,
    passthrough_weights,
    silent_frames,
)

SR = 16_000
FPS = 25


def _bursts(segments, *, floor: str = "zeros", seed: int = 0) -> np.ndarray:
    """Concatenate ("tone" | "quiet", seconds) segments: 220 Hz at amplitude 0.3 (-13.5 dBFS
    RMS) or silence, which is digital zeros, -70 dBFS noise, or that noise on a DC offset."""
    rng = np.random.default_rng(seed)
    parts = []
    for kind, seconds in segments:
        n = round(seconds * SR)
        t = np.arange(n) / SR
        parts.append(0.3 * np.sin(2 * np.pi * 220 * t) if kind == "tone" else np.zeros(n))
    x = np.concatenate(parts)
    if floor != "zeros":
        x = x + rng.normal(0, 10 ** (-70 / 20), x.size)
    if floor == "noise+dc":
        x = x + 0.05
    return x.astype(np.float32)


def _expected_silent(segments, n_frames: int, min_silence_s: float) -> np.ndarray:
    """Independent reference: a frame is silent when its 40 ms interval overlaps no tone; runs
    shorter than the minimum are speech."""
    tones, t = [], 0.0
    for kind, seconds in segments:
        if kind == "tone":
            tones.append((t, t + seconds))
        t += seconds
    silent = np.array(
        [all(not (k / FPS < b and a < (k + 1) / FPS) for a, b in tones) for k in range(n_frames)]
    )
    runs, k = [], 0
    while k < n_frames:
        if silent[k]:
            j = k
            while j < n_frames and silent[j]:
                j += 1
            runs.append((k, j))
            k = j
        else:
            k += 1
    for a, b in runs:
        if (b - a) / FPS < min_silence_s - 1e-9:
            silent[a:b] = False
    return silent


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(
        zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist(), strict=True)
    )


# Boundaries deliberately off the 40 ms frame grid; silences of 0.21, 0.37, 0.55, 0.83 s.
SEGMENTS = [
    ("quiet", 0.55),
    ("tone", 0.31),
    ("quiet", 0.21),
    ("tone", 0.47),
    ("quiet", 0.83),
    ("tone", 0.26),
    ("quiet", 0.37),
    ("tone", 0.5),
    ("quiet", 0.61),
]


@pytest.mark.parametrize("floor", ["zeros", "noise", "noise+dc"])
@pytest.mark.parametrize("min_silence_s", [0.0, 0.2, 0.4])
def test_silence_boundaries_are_frame_exact(floor, min_silence_s):
    x = _bursts(SEGMENTS, floor=floor)
    n = math.ceil(x.size / SR * FPS)
    got = silent_frames(x, SR, n, FPS, threshold_db=-45.0, min_silence_s=min_silence_s)
    expected = _expected_silent(SEGMENTS, n, min_silence_s)
    got_runs, expected_runs = _runs(got), _runs(expected)
    assert len(got_runs) == len(expected_runs), (got_runs, expected_runs)
    for (a, b), (ea, eb) in zip(got_runs, expected_runs, strict=True):
        assert abs(a - ea) <= 1 and abs(b - eb) <= 1, (got_runs, expected_runs)


def test_min_duration_rule_counts_frames():
    # tone 1.0 s, silence exactly 10 frames (0.4 s on the frame grid), tone 0.6 s
    x = _bursts([("tone", 1.0), ("quiet", 0.4), ("tone", 0.6)])
    run = np.zeros(50, bool)
    run[25:35] = True
    np.testing.assert_array_equal(silent_frames(x, SR, 50, min_silence_s=0.4), run)
    np.testing.assert_array_equal(silent_frames(x, SR, 50, min_silence_s=0.36), run)
    assert not silent_frames(x, SR, 50, min_silence_s=0.41).any()
    np.testing.assert_array_equal(silent_frames(x, SR, 50, min_silence_s=0), run)


def test_silence_at_the_edges_and_past_the_end_of_the_audio():
    x = _bursts([("quiet", 0.6), ("tone", 1.0), ("quiet", 0.2)])  # 1.8 s = 45 frames
    got = silent_frames(x, SR, 60, min_silence_s=0.4)
    expected = np.zeros(60, bool)
    expected[:15] = True  # leading silence
    expected[40:] = True  # 0.2 s trailing silence + 15 frames with no audio = 20 frames
    np.testing.assert_array_equal(got, expected)


def test_levels_are_dbfs_rms_of_each_frame():
    t = np.arange(SR) / SR
    x = (0.5 * np.sin(2 * np.pi * 400 * t) + 0.2).astype(np.float32)  # 16 periods per frame
    levels = frame_levels_db(x, SR, 25)
    np.testing.assert_allclose(levels, 20 * np.log10(0.5 / np.sqrt(2)), atol=1e-3)
    assert frame_levels_db(np.zeros(SR, np.float32), SR, 3).tolist() == [-np.inf] * 3
    assert frame_levels_db(np.zeros(0, np.float32), SR, 2).tolist() == [-np.inf] * 2
    assert frame_levels_db(x, SR, 0).shape == (0,)
    np.testing.assert_allclose(frame_levels_db(x, SR, 30, fps=30)[:29], levels[0], atol=0.05)


def test_speech_like_audio_has_no_passthrough_but_a_long_pause_does():
    speech = synth_speech(3.0, seed=1)  # pauses of 60-300 ms only
    n = 3 * FPS
    assert not silent_frames(speech, SR, n).any()
    np.testing.assert_array_equal(passthrough_weights(speech, SR, n), np.ones(n, np.float32))
    pause = np.zeros(SR, np.float32)  # 1 s of digital silence between two 3 s stretches
    x = np.concatenate([speech, pause, synth_speech(3.0, seed=2)])
    silent = silent_frames(x, SR, 7 * FPS)
    runs = _runs(silent)
    assert len(runs) == 1
    a, b = runs[0]
    assert 74 <= a <= 76 + 8 and 99 - 8 <= b <= 101  # the pause, plus speech's own quiet ends
    weights = passthrough_weights(x, SR, 7 * FPS, options=SilenceOptions(fade_frames=3))
    np.testing.assert_array_equal(weights[a : a + 3], np.float32([0.75, 0.5, 0.25]))
    np.testing.assert_array_equal(weights[b - 3 : b], np.float32([0.25, 0.5, 0.75]))
    assert (weights[a + 3 : b - 3] == 0).all() and (weights[~silent] == 1).all()


@pytest.mark.parametrize(
    ("silent", "fade", "expected"),
    [
        ("0111111110", 3, [1, 0.75, 0.5, 0.25, 0, 0, 0.25, 0.5, 0.75, 1]),
        ("1111100000", 2, [0, 0, 0, 1 / 3, 2 / 3, 1, 1, 1, 1, 1]),  # clip start: no ramp
        ("0000011111", 1, [1, 1, 1, 1, 1, 0.5, 0, 0, 0, 0]),  # clip end: no ramp
        ("0111010", 0, [1, 0, 0, 0, 1, 0, 1]),  # no fade: a cut
        ("0110", 4, [1, 0.8, 0.8, 1]),  # ramps meet in a short run
        ("1111", 2, [0, 0, 0, 0]),  # all silent
        ("0000", 2, [1, 1, 1, 1]),  # no silence
        ("", 2, []),
    ],
)
def test_crossfade_weights(silent, fade, expected):
    mask = np.array([c == "1" for c in silent], bool)
    got = crossfade_weights(mask, fade)
    assert got.dtype == np.float32 and got.shape == mask.shape
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert (got[~mask] == 1.0).all()  # speech frames are always fully generated


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((np.zeros((2, 100)), SR, 5), {}, "1-D float array"),
        ((np.zeros(100, np.int16), SR, 5), {}, "1-D float array"),
        ((np.array([0.0, np.nan]), SR, 5), {}, "finite"),
        ((np.zeros(100), 0, 5), {}, "sample_rate must be an integer >= 1"),
        ((np.zeros(100), 16000.0, 5), {}, "sample_rate must be an integer >= 1"),
        ((np.zeros(100), SR, -1), {}, "n_frames must be an integer >= 0"),
        ((np.zeros(100), SR, 2.5), {}, "n_frames must be an integer >= 0"),
        ((np.zeros(100), SR, 5, 0), {}, "fps must be > 0"),
        ((np.zeros(100), SR, 5, float("inf")), {}, "fps must be a finite number"),
        ((np.zeros(100), SR, 5), {"threshold_db": float("nan")}, "threshold_db must be a finite"),
        ((np.zeros(100), SR, 5), {"threshold_db": "-40"}, "threshold_db must be a number"),
        ((np.zeros(100), SR, 5), {"min_silence_s": -0.1}, "min_silence_s must be a finite"),
    ],
)
def test_silent_frames_rejects_bad_inputs(args, kwargs, message):
    with pytest.raises(InputError, match=message):
        silent_frames(*args, **kwargs)


@pytest.mark.parametrize(
    ("silent", "fade", "message"),
    [
        (np.array([0, 1, 1]), 2, "1-D bool array"),
        (np.zeros((2, 3), bool), 2, "1-D bool array"),
        (np.zeros(3, bool), -1, "fade_frames must be an integer >= 0"),
        (np.zeros(3, bool), 1.5, "fade_frames must be an integer >= 0"),
        (np.zeros(3, bool), True, "fade_frames must be an integer >= 0"),
    ],
)
def test_crossfade_weights_rejects_bad_inputs(silent, fade, message):
    with pytest.raises(InputError, match=message):
        crossfade_weights(silent, fade)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"threshold_db": float("inf")}, "threshold_db"),
        ({"min_silence_s": -1}, "min_silence_s"),
        ({"fade_frames": -2}, "fade_frames"),
        ({"fade_frames": 2.0}, "fade_frames"),
    ],
)
def test_silence_options_reject_bad_values(kwargs, message):
    with pytest.raises(InputError, match=message):
        SilenceOptions(**kwargs)


def test_inputs_are_not_modified():
    x = _bursts(SEGMENTS, floor="noise")
    x.setflags(write=False)
    mask = silent_frames(x, SR, 100)
    mask_copy = mask.copy()
    mask.setflags(write=False)
    crossfade_weights(mask, 3)
    np.testing.assert_array_equal(mask, mask_copy)
