"""The audio stage: decode speech, compute Wav2Lip mel spectrograms and per-frame audio features.

Data flow (docs/model-and-audio.md §3)::

    any audio file ──load_audio──> float32 (S,) mono 16 kHz
        ──mel_spectrogram──> float32 (80, T), 80 mel frames per second, values in [-4, 4]
        ──compute_features(encode)──> float32 (N, 512), one row per output video frame
        ──audio_windows──> float32 (k, 32, 16, 16), the generator's audio input

``encode`` is a seam: the pipeline passes a function that runs the ONNX audio encoder,
tests pass NumPy functions. Users may skip the first steps with ``load_features`` (.npy).

Nothing here mutates its input arrays (they may be read-only Ray object-store views).
"""

from __future__ import annotations

import logging
import math
import struct
from collections.abc import Callable
from pathlib import Path

import av
import av.logging
import numpy as np

from lipsync_ray.contract import FEATURE_CONTEXT, FEATURE_DIM
from lipsync_ray.errors import InputError, ModelError

__all__ = [
    "FEATURE_DIM",
    "MEL_BANDS",
    "MEL_FPS",
    "MIN_AUDIO_SAMPLES",
    "SAMPLE_RATE",
    "VIDEO_FPS",
    "WINDOW_MEL_FRAMES",
    "audio_duration_s",
    "audio_windows",
    "compute_features",
    "encoder_windows",
    "load_audio",
    "load_features",
    "mel_spectrogram",
    "synth_speech",
]

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16_000  # Hz, what the audio encoder was trained on
MEL_BANDS = 80
HOP_LENGTH = 200  # samples: 12.5 ms at 16 kHz
N_FFT = 800  # samples: 50 ms at 16 kHz; also the (Hann, periodic) window length
MEL_FPS = SAMPLE_RATE // HOP_LENGTH  # 80 mel frames per second
VIDEO_FPS = 25
WINDOW_MEL_FRAMES = 16  # mel frames per encoder window (200 ms)
# FEATURE_DIM: width of one audio-encoder output row; FEATURE_CONTEXT: feature rows per
# generator input, [i - 8, i + 8) (lipsync_ray.contract).
# Centred STFT frames: T = 1 + S // HOP_LENGTH, so one encoder window needs (16 - 1) * 200 samples.
MIN_AUDIO_SAMPLES = (WINDOW_MEL_FRAMES - 1) * HOP_LENGTH  # 3000 samples = 0.1875 s

PREEMPHASIS = 0.97
FMIN_HZ = 55.0
FMAX_HZ = 7600.0
MIN_LEVEL_DB = -100.0  # amplitude floor 1e-5
REF_LEVEL_DB = 20.0
MAX_ABS_VALUE = 4.0  # normalised mel values lie in [-4, 4]

_STFT_BLOCK_FRAMES = 2048  # bounds the float64 STFT working set (~13 MB) for any audio length
# A decode that ends this far before the declared duration means a truncated or corrupt file.
_TRUNCATION_TOLERANCE_S = 0.2
_TRUNCATION_TOLERANCE_FRACTION = 0.05

# --------------------------------------------------------------------------- decode / encode


class DecoderErrorLog:
    """Collects FFmpeg's error-level log lines while a stream decodes (video or audio).

    Decoders conceal damaged data (a corrupt H.264 macroblock, an FFV1 slice or FLAC frame
    whose CRC does not match) and still return frames, so a corrupt file decodes
    "successfully": the only sign is the log. Lines from every thread are captured (frame
    threading decodes elsewhere) and can arrive late, so only those of this stream's decoder
    or demuxer (``names``) count. FFmpeg's log level is restored on exit.
    """

    def __init__(self, path: Path, names: set[str], what: str = "file") -> None:
        self.path, self.names, self.what = path, names, what

    def __enter__(self) -> DecoderErrorLog:
        self._level = av.logging.get_level()
        av.logging.set_level(av.logging.ERROR)
        self._capture = av.logging.Capture(local=False)
        self.logs = self._capture.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._capture.__exit__(*exc)
        av.logging.set_level(self._level)

    def errors(self) -> list[str]:
        return [
            m.strip()
            for level, name, m in self.logs
            if level <= av.logging.ERROR and name in self.names
        ]

    def check(self, decoded: int, unit: str = "frame") -> None:
        """Raise ``InputError`` if the decoder has reported an error so far."""
        errors = self.errors()
        if errors:
            raise InputError(
                f"{self.what} is corrupt: the decoder reported {errors[0]!r} by {unit} {decoded} "
                "(damaged data is concealed, not fixed); re-encode or re-export the source",
                path=self.path,
            )


def _check_file(path: Path) -> None:
    if not path.exists():
        raise InputError("audio file not found: expected an existing file", path=path)
    if not path.is_file():
        raise InputError("expected an audio file, got a directory or special file", path=path)


def _declared_duration_s(
    container: av.container.InputContainer, stream: av.AudioStream
) -> float | None:
    """The duration the container/stream header claims, in seconds, or None if unknown."""
    if stream.duration is not None and stream.time_base is not None and stream.duration > 0:
        return float(stream.duration * stream.time_base)
    if container.duration is not None and container.duration > 0:
        return container.duration / av.time_base
    return None


def _wav_declared_duration_s(path: Path) -> float | None:
    """The duration a RIFF/WAVE header declares, or None if not a WAV or not stated.

    Needed because FFmpeg clamps a WAV's data size to the file size, so a truncated WAV looks
    complete to it.
    """
    with path.open("rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        byte_rate = 0
        for _ in range(64):  # chunks before "data"; bounded against malformed files
            chunk = f.read(8)
            if len(chunk) < 8:
                return None
            chunk_id, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
            if chunk_id == b"data":
                # 0 and 0xFFFFFFFF mark a streamed WAV whose length was never filled in.
                if byte_rate == 0 or size in (0, 0xFFFFFFFF):
                    return None
                return size / byte_rate
            body = f.read(size + (size & 1))
            if chunk_id == b"fmt " and len(body) >= 12:
                byte_rate = struct.unpack("<I", body[8:12])[0]
    return None


def _decode_error(exc: Exception) -> str:
    if isinstance(exc, av.error.FFmpegError) and exc.strerror:
        return exc.strerror
    return str(exc)


def load_audio(path: str | Path, *, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Decode the first audio stream of any container PyAV reads to mono 16 kHz.

    ``sample_rate`` picks another output rate (the MP4's AAC track is made from 48 kHz); the
    model's features always use the default.

    Channels are averaged (mean of L and R, not FFmpeg's default ``0.707 * (L + R)``) and
    resampled by FFmpeg's swresample through ``av.AudioResampler``.

    Returns:
        float32 (S,) samples, nominally in [-1, 1], at ``sample_rate``, at least 0.1875 s.

    Raises:
        InputError: missing file, no audio stream, undecodable or truncated data, no samples,
            or less audio than one encoder window needs (0.1875 s).
    """
    path = Path(path)
    _check_file(path)
    chunks: list[np.ndarray] = []
    try:
        with av.open(str(path), mode="r", metadata_errors="ignore") as container:
            if not container.streams.audio:
                kinds = sorted({s.type for s in container.streams})
                got = f"only {'/'.join(kinds)} streams" if kinds else "no streams"
                raise InputError(
                    f"expected a file with an audio stream, got {got} "
                    f"(format {container.format.name})",
                    path=path,
                )
            stream = container.streams.audio[0]
            declared_s = _wav_declared_duration_s(path) or _declared_duration_s(container, stream)
            # rematrix_maxval=1 normalises the downmix matrix: stereo -> (L + R) / 2.
            resampler = av.AudioResampler(
                format="flt",
                layout="mono",
                rate=sample_rate,
                options={"rematrix_maxval": "1.0"},
            )
            codec_name = stream.codec_context.name
            names = {codec_name, *container.format.name.split(",")}
            with DecoderErrorLog(path, names) as log:
                for frame in container.decode(stream):
                    for out in resampler.resample(frame):
                        chunks.append(out.to_ndarray().reshape(-1))
                # Flush exactly once: a second flush of the filter graph raises EOF.
                for out in resampler.resample(None):
                    chunks.append(out.to_ndarray().reshape(-1))
            decoder_errors = log.errors()
    except InputError:
        raise
    except (av.error.FFmpegError, ValueError, OSError) as exc:
        raise InputError(
            "cannot decode audio (not audio, or corrupt): expected a readable audio file "
            f"(WAV, MP3, M4A/AAC, FLAC, OGG), got: {_decode_error(exc)}",
            path=path,
        ) from exc

    samples = (
        np.concatenate(chunks).astype(np.float32, copy=False) if chunks else np.zeros(0, np.float32)
    )
    decoded_s = samples.size / sample_rate
    if samples.size == 0:
        raise InputError(
            f"expected audio samples, got none ({codec_name} stream is empty)", path=path
        )
    if declared_s is not None:
        shortfall_s = declared_s - decoded_s
        if shortfall_s > max(_TRUNCATION_TOLERANCE_S, _TRUNCATION_TOLERANCE_FRACTION * declared_s):
            raise InputError(
                f"audio file is truncated or corrupt: expected {declared_s:.3f} s of audio "
                f"(from its header), got {decoded_s:.3f} s decodable",
                path=path,
            )
    if decoder_errors:  # after the truncation check, whose message is more precise
        raise InputError(
            f"audio file is corrupt: the {codec_name} decoder reported {decoder_errors[0]!r} "
            "(damaged data is concealed, not fixed); re-encode or re-export the source",
            path=path,
        )
    if not np.all(np.isfinite(samples)):
        raise InputError("expected finite audio samples, got NaN or infinity", path=path)
    if samples.size < MIN_AUDIO_SAMPLES * sample_rate / SAMPLE_RATE:
        raise InputError(
            f"audio too short: expected at least {MIN_AUDIO_SAMPLES / SAMPLE_RATE:.4f} s "
            f"({WINDOW_MEL_FRAMES} mel frames, one encoder window), got {decoded_s:.4f} s",
            path=path,
        )
    logger.debug("decoded %s: %s, %.3f s", path, codec_name, decoded_s)
    return samples


def audio_duration_s(path: str | Path) -> float:
    """Duration of the first audio stream in seconds, from the header when it has one.

    Falls back to decoding (and counting samples) when the container declares no duration.
    """
    path = Path(path)
    _check_file(path)
    try:
        with av.open(str(path), mode="r", metadata_errors="ignore") as container:
            if not container.streams.audio:
                raise InputError("expected a file with an audio stream, got none", path=path)
            stream = container.streams.audio[0]
            declared = _declared_duration_s(container, stream)
            if declared is not None:
                return declared
            n_samples = sum(frame.samples for frame in container.decode(stream))
            return n_samples / stream.rate
    except InputError:
        raise
    except (av.error.FFmpegError, ValueError, OSError) as exc:
        raise InputError(
            f"expected a readable audio file, got: {_decode_error(exc)}", path=path
        ) from exc


# --------------------------------------------------------------------------- synthetic speech


def _resonator_response(freqs_hz: np.ndarray, f_hz: float, bw_hz: float, sr: int) -> np.ndarray:
    """Complex response of a unity-DC-gain two-pole digital resonator (Klatt style)."""
    r = math.exp(-math.pi * bw_hz / sr)
    c1, c2 = 2.0 * r * math.cos(2.0 * math.pi * f_hz / sr), r * r
    z1 = np.exp(-2j * np.pi * freqs_hz / sr)
    return (1.0 - c1 + c2) / (1.0 - c1 * z1 + c2 * z1 * z1)


def _rosenberg(phase: np.ndarray, open_q: float = 0.4, close_q: float = 0.16) -> np.ndarray:
    """Rosenberg glottal flow for a fractional cycle phase in [0, 1)."""
    rise = 0.5 * (1.0 - np.cos(np.pi * phase / open_q))
    fall = np.cos(0.5 * np.pi * (phase - open_q) / close_q)
    return np.where(phase < open_q, rise, np.where(phase < open_q + close_q, fall, 0.0))


def synth_speech(duration_s: float, *, seed: int = 0, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """A seeded, deterministic speech-like signal for tests, demos and benchmarks.

    Voiced stretches (0.25-0.9 s) of a jittered Rosenberg glottal-pulse train (f0 100-220 Hz with
    intonation) through three formant resonators that change every 80-200 ms; some of those
    "phonemes" are unvoiced (noise through high formants). Stretches are separated by pauses
    of exact digital silence (60-300 ms) and shaped by a syllable-rate amplitude envelope.

    Returns:
        float32 (round(duration_s * sample_rate),) with peak amplitude 0.5.
    """
    if not (math.isfinite(duration_s) and duration_s > 0):
        raise InputError(f"duration must be > 0 seconds, got {duration_s}")
    if sample_rate < 8_000:
        raise InputError(f"sample rate must be >= 8000 Hz, got {sample_rate}")
    sr = int(sample_rate)
    rng = np.random.default_rng(seed)
    n_total = round(duration_s * sr)
    out = np.zeros(n_total, np.float64)
    nyquist_cap = 0.45 * sr
    pos = int(rng.uniform(0.03, 0.12) * sr)  # a little leading silence
    while pos < n_total:
        n_seg = int(rng.uniform(0.25, 0.9) * sr)
        t = np.arange(n_seg) / sr
        # Source: intonation contour with per-sample jitter, then the glottal flow derivative.
        f0 = rng.uniform(100.0, 220.0) * (1.0 + 0.08 * np.sin(2 * np.pi * rng.uniform(1, 3) * t))
        f0 *= 1.0 + 0.02 * np.repeat(rng.standard_normal(n_seg // 64 + 1), 64)[:n_seg]
        phase = np.cumsum(f0 / sr)
        voiced = np.diff(_rosenberg(phase % 1.0), prepend=0.0) * 8.0
        voiced += 0.02 * rng.standard_normal(n_seg)  # aspiration
        noise = 0.3 * rng.standard_normal(n_seg)
        segment = np.zeros(n_seg + 1024)
        # Phonemes: overlap-added crossfaded chunks, each filtered by its formants via the FFT.
        ov = int(0.01 * sr)
        start = 0
        while start < n_seg:
            stop = min(n_seg, start + int(rng.uniform(0.08, 0.2) * sr))
            a, b = max(0, start - ov), min(n_seg, stop + ov)
            # Linear crossfades centred on the boundaries; neighbouring weights sum to 1.
            n = np.arange(a, b) + 0.5
            weight = np.ones(b - a)
            if start > 0:
                weight *= np.clip((n - (start - ov)) / (2 * ov), 0.0, 1.0)
            if stop < n_seg:
                weight *= np.clip(((stop + ov) - n) / (2 * ov), 0.0, 1.0)
            if rng.random() < 0.15:  # unvoiced, fricative-like
                src = noise[a:b]
                formants = [(rng.uniform(2500, 4000), 300.0), (rng.uniform(4500, 6500), 500.0)]
            else:
                src = voiced[a:b]
                formants = [
                    (rng.uniform(300, 800), rng.uniform(60, 120)),
                    (rng.uniform(900, 2300), rng.uniform(80, 150)),
                    (rng.uniform(2300, 3200), rng.uniform(100, 200)),
                ]
            n_fft = 1 << math.ceil(math.log2(b - a + 1024))
            spectrum = np.fft.rfft(src * weight, n_fft)
            freqs = np.fft.rfftfreq(n_fft, 1.0 / sr)
            for f_hz, bw_hz in formants:
                spectrum *= _resonator_response(freqs, min(f_hz, nyquist_cap), bw_hz, sr)
            filtered = np.fft.irfft(spectrum, n_fft)[: b - a + 1024]
            segment[a : a + filtered.size] += filtered[: segment.size - a]
            start = stop
        segment = segment[:n_seg]
        # Syllable-rate envelope with smooth 30 ms attack and release, so pauses are true zeros.
        env = 0.55 + 0.45 * np.sin(
            2 * np.pi * rng.uniform(3.0, 6.0) * t + rng.uniform(0, 2 * np.pi)
        )
        ramp = min(int(0.03 * sr), n_seg // 2)
        edge = 0.5 - 0.5 * np.cos(np.pi * np.arange(ramp) / ramp)
        env[:ramp] *= edge
        env[n_seg - ramp :] *= edge[::-1]
        end = min(n_total, pos + n_seg)
        out[pos:end] = (segment * env * rng.uniform(0.5, 1.0))[: end - pos]
        pos = end + int(rng.uniform(0.06, 0.3) * sr)
    peak = float(np.max(np.abs(out)))
    if peak > 0:
        out *= 0.5 / peak
    return out.astype(np.float32)


# --------------------------------------------------------------------------- mel spectrogram


# Slaney's Auditory Toolbox mel scale: linear (200/3 Hz per mel) below 1 kHz, log above.
_F_SP, _MIN_LOG_HZ, _LOGSTEP = 200.0 / 3.0, 1000.0, math.log(6.4) / 27.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP


def _hz_to_mel_slaney(hz: float) -> float:
    if hz < _MIN_LOG_HZ:
        return hz / _F_SP
    return _MIN_LOG_MEL + math.log(hz / _MIN_LOG_HZ) / _LOGSTEP


def _mel_to_hz_slaney(mel: np.ndarray) -> np.ndarray:
    log_part = _MIN_LOG_HZ * np.exp(_LOGSTEP * (np.maximum(mel, _MIN_LOG_MEL) - _MIN_LOG_MEL))
    return np.where(mel >= _MIN_LOG_MEL, log_part, _F_SP * mel)


def _mel_filterbank() -> np.ndarray:
    """float64 (80, 401) triangular Slaney-normalised (area 1 per band) filters, 55-7600 Hz."""
    fft_hz = np.fft.rfftfreq(N_FFT, 1.0 / SAMPLE_RATE)
    edges_mel = np.linspace(_hz_to_mel_slaney(FMIN_HZ), _hz_to_mel_slaney(FMAX_HZ), MEL_BANDS + 2)
    edges_hz = _mel_to_hz_slaney(edges_mel)
    widths = np.diff(edges_hz)
    ramps = edges_hz[:, None] - fft_hz[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    return weights * (2.0 / (edges_hz[2:] - edges_hz[:-2]))[:, None]


_MEL_BASIS = _mel_filterbank()
_HANN = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(N_FFT) / N_FFT)  # periodic


def mel_spectrogram(samples: np.ndarray) -> np.ndarray:
    """Wav2Lip mel spectrogram of mono 16 kHz audio (docs/model-and-audio.md §3.2).

    Pre-emphasis 0.97 (``y[0] = x[0]``), centred STFT (400 zeros each side; n_fft 800,
    hop 200, periodic Hann 800), magnitude, Slaney mel 55-7600 Hz, ``20 log10(max(1e-5, m))
    - 20``, then ``clip(8 * (S + 100) / 100 - 4, -4, 4)``.

    Args:
        samples: float (S,) mono at ``SAMPLE_RATE``. Not mutated.

    Returns:
        float32 (80, T) with T = 1 + S // 200.
    """
    x = np.asarray(samples, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise InputError(f"expected mono samples of shape (S,) with S > 0, got {np.shape(samples)}")
    emphasised = np.empty_like(x)
    emphasised[0] = x[0]
    emphasised[1:] = x[1:] - PREEMPHASIS * x[:-1]
    padded = np.pad(emphasised, N_FFT // 2, mode="constant")
    n_frames = 1 + x.size // HOP_LENGTH
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP_LENGTH][:n_frames]
    mel = np.empty((MEL_BANDS, n_frames), np.float64)
    for a in range(0, n_frames, _STFT_BLOCK_FRAMES):
        block = frames[a : a + _STFT_BLOCK_FRAMES] * _HANN
        magnitude = np.abs(np.fft.rfft(block, axis=1))  # (b, 401)
        mel[:, a : a + block.shape[0]] = _MEL_BASIS @ magnitude.T
    db = 20.0 * np.log10(np.maximum(10.0 ** (MIN_LEVEL_DB / 20.0), mel)) - REF_LEVEL_DB
    scaled = 2.0 * MAX_ABS_VALUE * (db - MIN_LEVEL_DB) / -MIN_LEVEL_DB - MAX_ABS_VALUE
    return np.clip(scaled, -MAX_ABS_VALUE, MAX_ABS_VALUE).astype(np.float32)


# --------------------------------------------------------------------------- encoder schedule


def _check_mel(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel)
    if mel.ndim != 2 or mel.shape[0] != MEL_BANDS:
        raise InputError(f"expected a mel spectrogram of shape ({MEL_BANDS}, T), got {mel.shape}")
    if mel.shape[1] < WINDOW_MEL_FRAMES:
        raise InputError(
            f"audio too short: expected at least {WINDOW_MEL_FRAMES} mel frames "
            f"({MIN_AUDIO_SAMPLES / SAMPLE_RATE:.4f} s) for one encoder window, got {mel.shape[1]}"
        )
    return mel


def feature_count(n_mel_frames: int, fps: float = float(VIDEO_FPS)) -> int:
    """N: the rows :func:`compute_features` makes of a mel spectrogram of ``n_mel_frames``
    (one per output video frame: W windows + 2), known before the encoder runs."""
    return int(_window_starts(n_mel_frames, fps).size) + 2


def _window_starts(n_mel_frames: int, fps: float) -> np.ndarray:
    """int64 (W,) first mel frame of each encoder window (one window per video frame).

    W = int((T - 16) / 80 * fps) + 2, written exactly as the reference so float rounding agrees.
    """
    if not (math.isfinite(fps) and fps > 0):
        raise InputError(f"fps must be > 0, got {fps}")
    n_windows = int((n_mel_frames - WINDOW_MEL_FRAMES) / MEL_FPS * fps) + 2
    # (80 * k) / fps in float64 then truncation: the same operations as int(80 * k / fps).
    starts = ((MEL_FPS * np.arange(n_windows, dtype=np.float64)) / fps).astype(np.int64)
    return np.minimum(starts, n_mel_frames - WINDOW_MEL_FRAMES)  # the tail window is shifted left


def _gather_windows(mel: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """float32 (len(starts), 1, 80, 16) copies of mel[:, s:s+16]."""
    cols = starts[:, None] + np.arange(WINDOW_MEL_FRAMES)[None, :]  # (W, 16)
    windows = mel[:, cols].transpose(1, 0, 2)[:, None]  # (W, 1, 80, 16), gathered, not cast whole
    return np.ascontiguousarray(windows, dtype=np.float32)


def encoder_windows(mel: np.ndarray, fps: float = float(VIDEO_FPS)) -> np.ndarray:
    """All audio-encoder inputs of a mel spectrogram (docs/model-and-audio.md §3.3).

    Window k covers mel frames [int(80 k / fps), +16), shifted left to T - 16 when it runs past
    the end; W = int((T - 16) / 80 * fps) + 2.

    Args:
        mel: float (80, T), T >= 16. Not mutated.

    Returns:
        float32 (W, 1, 80, 16).
    """
    mel = _check_mel(mel)
    return _gather_windows(mel, _window_starts(mel.shape[1], fps))


def compute_features(
    mel: np.ndarray,
    encode: Callable[[np.ndarray], np.ndarray],
    *,
    batch_size: int = 64,
    fps: float = float(VIDEO_FPS),
) -> np.ndarray:
    """Per-video-frame audio features: encode every window, pad the ends, smooth
    (docs/model-and-audio.md §3.3).

    Windows are built one batch at a time, so memory stays flat for any audio length.
    After encoding, the first and the last rows are repeated once (N = W + 2), then each row
    becomes the mean of itself and its two neighbours (edges replicated).

    Args:
        mel: float (80, T), T >= 16. Not mutated.
        encode: float32 (b, 1, 80, 16) -> (b, 512): the ONNX audio encoder or a test stand-in.
        batch_size: windows per ``encode`` call; does not change the result.

    Returns:
        float32 (N, 512), N = W + 2 = number of output video frames.

    Raises:
        InputError: bad mel shape or too short. ModelError: ``encode`` returned a bad shape or
            non-finite values.
    """
    mel = _check_mel(mel)
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    starts = _window_starts(mel.shape[1], fps)
    rows = np.empty((starts.size + 2, FEATURE_DIM), np.float32)
    for a in range(0, starts.size, batch_size):
        batch = _gather_windows(mel, starts[a : a + batch_size])
        encoded = np.asarray(encode(batch))
        if encoded.shape != (batch.shape[0], FEATURE_DIM):
            raise ModelError(
                f"audio encoder output: expected shape ({batch.shape[0]}, {FEATURE_DIM}) for a "
                f"batch of {batch.shape[0]} windows, got {encoded.shape}"
            )
        if not np.all(np.isfinite(encoded)):
            raise ModelError("audio encoder output: expected finite values, got NaN or infinity")
        rows[1 + a : 1 + a + batch.shape[0]] = encoded
    rows[0], rows[-1] = rows[1], rows[-2]
    padded = np.concatenate([rows[:1], rows, rows[-1:]]).astype(np.float64)
    smoothed = (padded[:-2] + padded[1:-1] + padded[2:]) / 3.0
    return smoothed.astype(np.float32)


def load_features(path: str | Path) -> np.ndarray:
    """Read precomputed audio features (docs/model-and-audio.md §3.6) from a ``.npy`` file;
    pickles are refused.

    Returns:
        float32 (N, 512), N >= 1, C-contiguous.

    Raises:
        InputError: missing or unreadable file, object/pickled arrays, wrong shape or dtype,
            NaN or infinity.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError("feature file not found: expected an existing .npy file", path=path)
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as exc:  # object arrays raise ValueError when allow_pickle=False
        raise InputError(
            f"expected a numeric .npy array (pickles are refused), got: {exc}", path=path
        ) from exc
    except (OSError, EOFError) as exc:
        raise InputError(f"expected a readable .npy file, got: {exc}", path=path) from exc
    if not isinstance(array, np.ndarray):  # an .npz archive
        raise InputError(f"expected a single .npy array, got {type(array).__name__}", path=path)
    if array.dtype.kind not in "fiu":
        raise InputError(f"expected a real numeric dtype (float32), got {array.dtype}", path=path)
    if array.ndim != 2 or array.shape[1] != FEATURE_DIM or array.shape[0] < 1:
        raise InputError(
            f"expected features of shape (N >= 1, {FEATURE_DIM}), got {array.shape}", path=path
        )
    with np.errstate(over="ignore"):  # values beyond float32 become inf, rejected below
        features = np.ascontiguousarray(array, dtype=np.float32)
    if not np.all(np.isfinite(features)):
        raise InputError(
            "expected finite features, got NaN or infinity (after float32 cast)", path=path
        )
    return features


def audio_windows(features: np.ndarray, frame_indices: np.ndarray) -> np.ndarray:
    """The generator's audio input for some output frames (docs/model-and-audio.md §3.5).

    For frame i: rows [i - 8, i + 8) of ``features``, zero where that runs off either end,
    flattened (16 x 512 = 8192) and reshaped to (32, 16, 16). Gathers only the rows needed.

    Args:
        features: float (N, 512). Not mutated.
        frame_indices: int (k,) output frame indices in [0, N).

    Returns:
        float32 (k, 32, 16, 16).
    """
    features = np.asarray(features)
    if features.ndim != 2 or features.shape[1] != FEATURE_DIM or features.shape[0] < 1:
        raise InputError(
            f"expected features of shape (N >= 1, {FEATURE_DIM}), got {features.shape}"
        )
    index = np.asarray(frame_indices)
    if index.ndim != 1 or (index.size and index.dtype.kind not in "iu"):
        raise InputError(
            f"expected a 1-D integer array of frame indices, got {index.dtype} {index.shape}"
        )
    n = features.shape[0]
    if index.size and (index.min() < 0 or index.max() >= n):
        raise InputError(f"frame indices must lie in [0, {n}), got [{index.min()}, {index.max()}]")
    half = FEATURE_CONTEXT // 2
    rows = index.astype(np.int64)[:, None] + np.arange(-half, half)[None, :]  # (k, 16)
    inside = (rows >= 0) & (rows < n)
    gathered = features[np.clip(rows, 0, n - 1)].astype(np.float32, copy=False)  # (k, 16, 512)
    gathered[~inside] = 0.0
    return gathered.reshape(index.size, 32, 16, 16)
