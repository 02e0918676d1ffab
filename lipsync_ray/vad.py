"""Silence passthrough: find output frames whose audio is silent, and cross-fade weights.

Energy-based voice activity on the decoded mono audio (``audio.load_audio``: float32, 16 kHz):

1. ``frame_levels_db``: output video frame ``k`` is on screen during ``[k / fps, (k + 1) / fps)``;
   its level is the RMS, in dB relative to full scale (amplitude 1.0 = 0 dBFS), of the samples
   in that interval with their mean removed (a DC offset is not speech). An interval with no
   samples (past the end of the audio) is silent (-inf).
2. ``silent_frames``: a frame is silent when its level is below ``threshold_db``; runs of
   silent frames shorter than ``min_silence_s`` are speech again (short gaps between words keep
   the generated mouth moving instead of flickering to the original frame).
3. ``crossfade_weights``: 1.0 = the generated composite, 0.0 = the original avatar frame
   (no inference needed). Inside each silent run, the ``fade_frames`` frames next to speech
   ramp linearly from 1 down to 0, so speech frames always stay fully generated and the mouth
   does not snap; a silent run at the start or end of the clip starts or ends at 0.

``composite.crossfade_frame`` applies a weight to one frame. Nothing here mutates its inputs.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lipsync_ray.errors import InputError

# numpy is imported inside the functions that compute: SilenceOptions is part of RenderConfig,
# which the CLI module loads, and `lipsync-ray submit` (a client) must start without numpy.
if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "SilenceOptions",
    "crossfade_weights",
    "frame_levels_db",
    "passthrough_weights",
    "silent_frames",
]

# RMS over one 40 ms frame. Speech is typically -35 to -15 dBFS, a quiet room's noise floor
# -70 to -55 dBFS, digital silence -inf: -45 dBFS sits ~10 dB above a normal noise floor and
# well below speech; the quietest syllables dip lower, but only briefly (see min_silence_s).
DEFAULT_THRESHOLD_DB = -45.0
# A pause must last 0.4 s (10 frames at 25 fps) to show the original frames: shorter pauses
# between words and syllable dips stay generated.
DEFAULT_MIN_SILENCE_S = 0.4
# 4 frames (0.16 s at 25 fps) of fade inside each silent run, next to speech.
DEFAULT_FADE_FRAMES = 4


@dataclass(frozen=True)
class SilenceOptions:
    """Silence passthrough settings, built once on the driver (``--silence-passthrough``)."""

    threshold_db: float = DEFAULT_THRESHOLD_DB  # dBFS RMS per video frame; below = silent
    min_silence_s: float = DEFAULT_MIN_SILENCE_S  # shorter silent runs count as speech
    fade_frames: int = DEFAULT_FADE_FRAMES  # linear ramp length inside silent runs (0 = cut)

    def __post_init__(self) -> None:
        _check_real("threshold_db", self.threshold_db)
        _check_real("min_silence_s", self.min_silence_s, low=0.0)
        _check_int("fade_frames", self.fade_frames, low=0)


def _check_real(name: str, value, low: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or (low is not None and v < low):
        bound = "" if low is None else f" >= {low}"
        raise InputError(f"{name} must be a finite number{bound}, got {value!r}")
    return v


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise InputError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _check_samples(samples) -> np.ndarray:
    import numpy as np

    x = np.asarray(samples)
    if x.ndim != 1 or not (np.issubdtype(x.dtype, np.floating) or x.size == 0):
        raise InputError(f"audio samples must be a 1-D float array, got {x.dtype} {x.shape}")
    if not np.isfinite(x).all():
        raise InputError("audio samples must be finite, got NaN or Inf")
    return x


def frame_levels_db(samples, sample_rate: int, n_frames: int, fps: float = 25.0) -> np.ndarray:
    """Level of the audio under each output video frame.

    Args:
        samples: float (S,) mono samples, full scale 1.0 (not modified).
        sample_rate: samples per second (> 0).
        n_frames: number of output frames (>= 0); frames past the audio are silent.
        fps: output frame rate (> 0).

    Returns:
        float64 (n_frames,): dBFS of the mean-removed RMS over samples
        ``[round(k * sr / fps), round((k + 1) * sr / fps))``; -inf for no samples or zero energy.
    """
    import numpy as np

    x = _check_samples(samples)
    sr = _check_int("sample_rate", sample_rate, low=1)
    n = _check_int("n_frames", n_frames, low=0)
    rate = _check_real("fps", fps)
    if rate <= 0:
        raise InputError(f"fps must be > 0, got {fps!r}")
    bounds = np.minimum(np.round(np.arange(n + 1) * (sr / rate)).astype(np.int64), x.size)
    # Window sums from cumulative sums (float64: 60 s of audio is ~1e6 samples, far from
    # losing precision), so the cost is O(samples) whatever the frame rate.
    x64 = x.astype(np.float64)
    c1 = np.concatenate([[0.0], np.cumsum(x64)])
    c2 = np.concatenate([[0.0], np.cumsum(x64 * x64)])
    count = np.diff(bounds).astype(np.float64)
    s1, s2 = np.diff(c1[bounds]), np.diff(c2[bounds])
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = s1 / count
        var = np.maximum(s2 / count - mean * mean, 0.0)
        levels = 10.0 * np.log10(var)  # 20 log10(rms)
    levels[(count == 0) | ~np.isfinite(levels)] = -np.inf
    return levels


def silent_frames(
    samples,
    sample_rate: int,
    n_frames: int,
    fps: float = 25.0,
    threshold_db: float = DEFAULT_THRESHOLD_DB,
    min_silence_s: float = DEFAULT_MIN_SILENCE_S,
) -> np.ndarray:
    """Which output frames are silent (energy below a threshold, in long enough runs).

    Args:
        samples: float (S,) mono samples, full scale 1.0 (not modified).
        sample_rate: samples per second (> 0).
        n_frames: number of output frames (>= 0).
        fps: output frame rate (> 0).
        threshold_db: a frame whose ``frame_levels_db`` is below this is silent (dBFS).
        min_silence_s: runs of silent frames lasting less than this (``length / fps``) are
            not silent (>= 0; 0 keeps every silent frame).

    Returns:
        bool (n_frames,), True = silent.
    """
    import numpy as np

    threshold = _check_real("threshold_db", threshold_db)
    min_s = _check_real("min_silence_s", min_silence_s, low=0.0)
    silent = frame_levels_db(samples, sample_rate, n_frames, fps) < threshold
    min_len = math.ceil(min_s * float(fps) - 1e-9)
    if min_len <= 1 or not silent.any():
        return silent
    edges = np.diff(np.concatenate([[0], silent.view(np.int8), [0]]))
    starts, stops = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    for a, b in zip(starts, stops, strict=True):
        if b - a < min_len:
            silent[a:b] = False
    return silent


def crossfade_weights(silent, fade_frames: int) -> np.ndarray:
    """Per-frame weight of the generated composite against the original avatar frame.

    Args:
        silent: bool (n_frames,), True = silent (e.g. from ``silent_frames``).
        fade_frames: ramp length F >= 0 inside each silent run next to speech.

    Returns:
        float32 (n_frames,): 1.0 for every non-silent frame; a silent frame ``d`` frames away
        from the nearest non-silent frame (``d = 1`` next to it) gets ``max(0, 1 - d / (F + 1))``
        (so with F = 3: 0.75, 0.5, 0.25, then 0). With no non-silent frame at all, every
        weight is 0. Frames with weight 0 need no inference.
    """
    import numpy as np

    s = np.asarray(silent)
    if s.ndim != 1 or s.dtype != bool:
        raise InputError(f"silent must be a 1-D bool array, got {s.dtype} {s.shape}")
    fade = _check_int("fade_frames", fade_frames, low=0)
    n = s.size
    speech = np.flatnonzero(~s)
    if speech.size == 0:
        return np.zeros(n, np.float32)
    idx = np.arange(n)
    pos = np.searchsorted(speech, idx)  # first speech frame at or after idx
    after = np.where(pos < speech.size, speech[np.minimum(pos, speech.size - 1)] - idx, n + 1)
    before = np.where(pos > 0, idx - speech[np.maximum(pos - 1, 0)], n + 1)
    distance = np.minimum(after, before)  # 0 on speech frames
    weights = np.clip(1.0 - distance / (fade + 1.0), 0.0, 1.0)
    return weights.astype(np.float32)


def passthrough_weights(
    samples,
    sample_rate: int,
    n_frames: int,
    fps: float = 25.0,
    options: SilenceOptions = SilenceOptions(),
) -> np.ndarray:
    """``crossfade_weights(silent_frames(...), options.fade_frames)``: float32 (n_frames,)."""
    silent = silent_frames(
        samples,
        sample_rate,
        n_frames,
        fps,
        threshold_db=options.threshold_db,
        min_silence_s=options.min_silence_s,
    )
    return crossfade_weights(silent, options.fade_frames)
