"""Speech files for tests, demos and benchmarks (tooling; the runtime never imports this).

``synth_speech`` is the runtime's own seeded synthesiser (``lipsync_ray.audio``), re-exported
here: INT8 calibration (``precision.calibration_features``) runs on it, so it stays in the
runtime. ``write_audio`` encodes samples to any of the formats ``load_audio`` reads.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from lipsync_ray.audio import SAMPLE_RATE, synth_speech
from lipsync_ray.errors import InputError

__all__ = ["synth_speech", "write_audio"]

# suffix -> encoder names to try in order (the first one this PyAV build has wins)
_ENCODERS: dict[str, tuple[str, ...]] = {
    ".wav": ("pcm_s16le",),
    ".mp3": ("libmp3lame",),
    ".m4a": ("aac",),
    ".flac": ("flac",),
    ".ogg": ("libvorbis", "libopus"),
    ".opus": ("libopus",),
}
_OPUS_RATES = (8_000, 12_000, 16_000, 24_000, 48_000)


def write_audio(path: str | Path, samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> Path:
    """Encode samples to an audio file; the codec follows the suffix.

    ``.wav`` pcm_s16le, ``.mp3`` libmp3lame, ``.m4a`` aac, ``.flac`` flac,
    ``.ogg`` libvorbis or else libopus, ``.opus`` libopus (Opus is written at 48 kHz unless
    ``sample_rate`` is one it supports).

    Args:
        samples: float (S,) mono or (S, C) with C in {1, 2}, in [-1, 1] (clipped). Not mutated.
        sample_rate: Hz, of ``samples``.

    Returns:
        the path written.

    Raises:
        InputError: bad shape, non-finite samples, bad rate, unknown suffix or no encoder.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _ENCODERS:
        raise InputError(
            f"expected one of {sorted(_ENCODERS)} as suffix, got {suffix!r}", path=path
        )
    codec = next((c for c in _ENCODERS[suffix] if c in av.codecs_available), None)
    if codec is None:
        raise InputError(
            f"this PyAV build has no encoder for {suffix}: expected one of {_ENCODERS[suffix]}",
            path=path,
        )
    if not (isinstance(sample_rate, int | np.integer) and sample_rate > 0):
        raise InputError(f"sample rate must be a positive integer, got {sample_rate!r}", path=path)
    data = np.asarray(samples)
    if data.ndim == 1:
        data = data[:, None]
    if data.ndim != 2 or data.shape[1] not in (1, 2) or data.shape[0] == 0:
        raise InputError(
            f"expected samples of shape (S,) or (S, 1|2), got {np.shape(samples)}", path=path
        )
    if not np.all(np.isfinite(data)):
        raise InputError("expected finite samples, got NaN or infinity", path=path)
    planar = np.ascontiguousarray(np.clip(data, -1.0, 1.0).T, dtype=np.float32)  # (C, S)
    layout = "mono" if planar.shape[0] == 1 else "stereo"
    rate = int(sample_rate)
    if codec == "libopus" and rate not in _OPUS_RATES:
        rate = 48_000
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with av.open(str(path), mode="w") as container:
            stream = container.add_stream(codec, rate=rate, layout=layout)
            # The codec context converts format, rate and frame size itself (and flushes once).
            step = int(sample_rate)  # one second per frame
            for start in range(0, planar.shape[1], step):
                frame = av.AudioFrame.from_ndarray(
                    np.ascontiguousarray(planar[:, start : start + step]),
                    format="fltp",
                    layout=layout,
                )
                frame.sample_rate = int(sample_rate)
                frame.time_base = Fraction(1, int(sample_rate))
                frame.pts = start
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))
    except av.error.FFmpegError as exc:
        path.unlink(missing_ok=True)
        raise InputError(f"could not encode {suffix} with {codec}: {exc}", path=path) from exc
    return path
