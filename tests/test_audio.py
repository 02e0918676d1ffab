"""Tests of the audio stage against independent references (librosa, scipy, direct loops)."""

from __future__ import annotations

import re
import wave
from collections.abc import Callable
from pathlib import Path

import av
import numpy as np
import pytest
from scipy.signal import chirp, lfilter, resample_poly

from lipsync_ray import audio
from lipsync_ray.audio import (
    FEATURE_DIM,
    MEL_BANDS,
    SAMPLE_RATE,
    WINDOW_MEL_FRAMES,
    audio_duration_s,
    audio_windows,
    compute_features,
    encoder_windows,
    load_audio,
    load_features,
    mel_spectrogram,
)
from lipsync_ray.dev.speech import synth_speech, write_audio
from lipsync_ray.errors import InputError, ModelError

librosa = pytest.importorskip("librosa")


def _readonly(array: np.ndarray) -> np.ndarray:
    array = np.array(array)
    array.flags.writeable = False
    return array


# --------------------------------------------------------------------------- mel parity


def _reference_mel(samples: np.ndarray) -> np.ndarray:
    """Wav2Lip's audio.melspectrogram, built from scipy and librosa (float64)."""
    emphasised = lfilter([1.0, -0.97], [1.0], samples.astype(np.float64))
    magnitude = np.abs(
        librosa.stft(
            emphasised,
            n_fft=800,
            hop_length=200,
            win_length=800,
            window="hann",
            center=True,
            pad_mode="constant",
        )
    )
    basis = librosa.filters.mel(sr=16000, n_fft=800, n_mels=80, fmin=55, fmax=7600)
    db = 20.0 * np.log10(np.maximum(1e-5, basis @ magnitude)) - 20.0
    return np.clip(8.0 * (db + 100.0) / 100.0 - 4.0, -4.0, 4.0)


def _tone(n: int, hz: float, amplitude: float = 0.3) -> np.ndarray:
    return (amplitude * np.sin(2 * np.pi * hz * np.arange(n) / SAMPLE_RATE)).astype(np.float32)


_SIGNALS: dict[str, Callable[[], np.ndarray]] = {
    "speech": lambda: synth_speech(3.0, seed=0),
    "speech-seed7-odd-length": lambda: synth_speech(2.0 + 137 / SAMPLE_RATE, seed=7),
    "chirp": lambda: (
        0.5 * chirp(np.arange(32000) / SAMPLE_RATE, f0=50, t1=2.0, f1=7900, method="log")
    ).astype(np.float32),
    "white-noise": lambda: np.random.default_rng(3).normal(0, 0.1, 24_123).astype(np.float32),
    "silence-then-tone": lambda: np.concatenate([np.zeros(8000, np.float32), _tone(16000, 440)]),
    "loud-clipped": lambda: np.clip(_tone(20000, 1000, 3.0), -1, 1),
    "silence": lambda: np.zeros(16000, np.float32),
}


@pytest.mark.slow  # librosa's first call compiles (numba): ~20 s on 2 cores
@pytest.mark.parametrize("name", list(_SIGNALS))
def test_mel_matches_librosa_reference(name: str) -> None:
    samples = _readonly(_SIGNALS[name]())
    mel = mel_spectrogram(samples)
    expected = _reference_mel(samples)
    assert mel.dtype == np.float32
    assert mel.shape == expected.shape == (MEL_BANDS, 1 + samples.size // 200)
    assert np.max(np.abs(mel - expected)) <= 1e-3  # measured: about 2e-7
    assert mel.min() >= -4.0 and mel.max() <= 4.0


def test_mel_of_silence_is_the_floor_and_speech_has_pauses() -> None:
    assert np.all(mel_spectrogram(np.zeros(4000, np.float32)) == -4.0)
    mel = mel_spectrogram(synth_speech(3.0, seed=1))
    assert np.any(np.all(mel == -4.0, axis=0)), "expected some fully silent frames"
    assert mel.max() > 0.0


@pytest.mark.parametrize("shape", [(0,), (100, 2)])
def test_mel_rejects_bad_shapes(shape: tuple[int, ...]) -> None:
    with pytest.raises(InputError, match="expected mono samples"):
        mel_spectrogram(np.zeros(shape, np.float32))


# --------------------------------------------------------------------------- synth_speech


def test_synth_speech_is_seeded_and_speech_like() -> None:
    x = synth_speech(3.0, seed=4)
    assert x.dtype == np.float32 and x.shape == (48000,)
    assert np.array_equal(x, synth_speech(3.0, seed=4))
    assert not np.array_equal(x, synth_speech(3.0, seed=5))
    assert np.isclose(np.abs(x).max(), 0.5)
    # pauses of real digital silence, at least 50 ms long
    zero = np.concatenate([[0], (x == 0).astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(zero))
    runs = edges[1::2] - edges[::2]
    assert np.sum(runs >= 800) >= 2
    # the loudest 50 ms has a fundamental in the 100-220 Hz range (autocorrelation peak)
    energy = np.convolve(x.astype(np.float64) ** 2, np.ones(800), mode="valid")
    start = int(np.argmax(energy))
    chunk = x[start : start + 800].astype(np.float64)
    acf = np.correlate(chunk, chunk, mode="full")[799:]
    lag = 16000 // 240 + int(np.argmax(acf[16000 // 240 : 16000 // 90]))
    assert 90 <= SAMPLE_RATE / lag <= 240


def test_synth_speech_other_rate() -> None:
    x = synth_speech(0.5, seed=0, sample_rate=44100)
    assert x.shape == (22050,) and np.all(np.isfinite(x))


# --------------------------------------------------------------------------- decode round trips


def _stereo_source(rate: int, duration_s: float = 2.0) -> np.ndarray:
    left = synth_speech(duration_s, seed=11, sample_rate=rate)
    right = 0.6 * synth_speech(duration_s, seed=12, sample_rate=rate)
    return np.stack([left, right], axis=1)  # (S, 2)


def _expected_16k_mono(source: np.ndarray, rate: int) -> np.ndarray:
    mono = source.astype(np.float64).mean(axis=1)
    g = np.gcd(rate, SAMPLE_RATE)
    return resample_poly(mono, SAMPLE_RATE // g, rate // g)


@pytest.mark.parametrize(
    ("suffix", "rate", "lossless"),
    [
        (".wav", 44100, True),
        (".flac", 48000, True),
        (".mp3", 44100, False),
        (".m4a", 44100, False),
        (".ogg", 48000, False),
    ],
)
def test_load_audio_round_trip(tmp_path: Path, suffix: str, rate: int, lossless: bool) -> None:
    source = _stereo_source(rate)
    path = write_audio(tmp_path / f"speech{suffix}", source, rate)
    got = load_audio(path)
    expected = _expected_16k_mono(source, rate)
    assert got.dtype == np.float32 and got.ndim == 1
    if lossless:
        assert got.size == expected.size
    else:  # encoder padding: at most one codec frame at 48 kHz, in 16 kHz samples
        assert 0 <= got.size - expected.size <= 1024
    n = expected.size
    corr = np.corrcoef(got[:n], expected)[0, 1]
    if lossless:  # swresample vs scipy's polyphase filter plus s16 quantisation
        assert np.max(np.abs(got[:n] - expected)) < 5e-3
        assert corr > 0.9999
    else:
        assert corr > 0.95
    # what the model sees: the mel spectrogram, close on average even for lossy codecs
    mel_diff = np.abs(mel_spectrogram(got[:n]) - mel_spectrogram(expected.astype(np.float32)))
    assert mel_diff.mean() < (0.01 if lossless else 0.1)  # measured: 0.001, 0.025-0.045
    assert audio_duration_s(path) == pytest.approx(2.0, abs=0.05)


def test_load_audio_16k_mono_wav_is_exact(tmp_path: Path) -> None:
    x = synth_speech(1.0, seed=2)
    got = load_audio(write_audio(tmp_path / "a.wav", x))
    with wave.open(str(tmp_path / "a.wav")) as w:
        pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2") / 32768.0
    np.testing.assert_allclose(got, pcm, atol=1e-7)
    assert np.max(np.abs(got - x)) <= 1.0 / 32768


def test_load_audio_downmix_is_the_channel_mean(tmp_path: Path) -> None:
    x = synth_speech(1.0, seed=3)
    both = np.stack([x, x], axis=1)
    got = load_audio(write_audio(tmp_path / "s.flac", both))
    assert np.max(np.abs(got - x)) <= 2.0 / 32768  # not 1.414 * x (FFmpeg's default downmix)


def test_load_audio_takes_the_audio_track_of_a_video(tmp_path: Path) -> None:
    x = synth_speech(1.0, seed=6)
    path = tmp_path / "talk.mp4"
    with av.open(str(path), "w") as container:
        video = container.add_stream("mpeg4", rate=25)
        video.width, video.height, video.pix_fmt = 64, 64, "yuv420p"
        sound = container.add_stream("aac", rate=SAMPLE_RATE, layout="mono")
        for _ in range(25):
            image = av.VideoFrame.from_ndarray(np.zeros((64, 64, 3), np.uint8), format="bgr24")
            container.mux(video.encode(image))
        frame = av.AudioFrame.from_ndarray(x[None], format="fltp", layout="mono")
        frame.sample_rate, frame.pts = SAMPLE_RATE, 0
        container.mux(sound.encode(frame))
        container.mux(sound.encode(None))
        container.mux(video.encode(None))
    got = load_audio(path)
    assert 0 <= got.size - x.size <= 1024
    assert np.corrcoef(got[: x.size], x)[0, 1] > 0.95


# --------------------------------------------------------------------------- bad audio files


def _write_speech(path: Path, seconds: float = 2.0) -> Path:
    return write_audio(path, _stereo_source(44100, seconds), 44100)


def _truncate(suffix: str) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        path = _write_speech(tmp / f"cut{suffix}")
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return path

    return make


def _corrupt_middle(tmp: Path) -> Path:
    path = _write_speech(tmp / "bad.mp3")
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 2000] = np.random.default_rng(0).integers(0, 256, 2000, np.uint8).tobytes()
    path.write_bytes(bytes(data))
    return path


def _video_only(tmp: Path) -> Path:
    path = tmp / "silent.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for _ in range(5):
            frame = av.VideoFrame.from_ndarray(np.zeros((64, 64, 3), np.uint8), format="bgr24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def _zero_length_wav(tmp: Path) -> Path:
    path = tmp / "empty.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
    return path


def _write_bytes(name: str, data: bytes) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        (tmp / name).write_bytes(data)
        return tmp / name

    return make


_RANDOM = np.random.default_rng(0).integers(0, 256, 50_000, np.uint8).tobytes()

BAD_AUDIO = [
    ("missing", lambda tmp: tmp / "nope.wav", "not found"),
    ("directory", lambda tmp: tmp, "directory"),
    ("empty-file", _write_bytes("e.wav", b""), "readable audio file"),
    ("random-bytes", _write_bytes("noise.wav", _RANDOM), "readable audio file"),
    ("random-bytes-no-suffix", _write_bytes("noise", _RANDOM), "readable audio file"),
    ("text-file", _write_bytes("notes.txt", b"hello world\n" * 100), "audio stream"),
    ("text-as-mp3", _write_bytes("notes.mp3", b"hello world\n" * 100), "readable audio file"),
    ("video-without-audio", _video_only, "got only video streams"),
    ("zero-length-wav", _zero_length_wav, "got none"),
    ("too-short", lambda tmp: write_audio(tmp / "s.wav", np.zeros(2000, np.float32)), "too short"),
    ("truncated-wav", _truncate(".wav"), "truncated"),
    ("truncated-mp3", _truncate(".mp3"), "truncated"),
    # FLAC, M4A and MP3 fail either in the decoder or in the duration check: both say "corrupt".
    ("truncated-flac", _truncate(".flac"), "corrupt"),
    ("truncated-m4a", _truncate(".m4a"), "corrupt"),
    ("corrupt-mp3", _corrupt_middle, "corrupt"),
]


@pytest.mark.parametrize(
    ("make", "message"), [c[1:] for c in BAD_AUDIO], ids=[c[0] for c in BAD_AUDIO]
)
def test_load_audio_rejects_bad_files(
    tmp_path: Path, make: Callable[[Path], Path], message: str
) -> None:
    path = make(tmp_path)
    with pytest.raises(InputError, match=re.escape(message)) as info:
        load_audio(path)
    assert info.value.path == str(path)
    assert "expected" in str(info.value)


def test_load_audio_accepts_exactly_one_window(tmp_path: Path) -> None:
    got = load_audio(write_audio(tmp_path / "w.wav", np.zeros(audio.MIN_AUDIO_SAMPLES, np.float32)))
    assert mel_spectrogram(got).shape[1] == WINDOW_MEL_FRAMES


@pytest.mark.parametrize(
    ("name", "samples", "message"),
    [
        ("x.xyz", np.zeros(100, np.float32), "suffix"),
        ("x.wav", np.full(100, np.nan, np.float32), "finite"),
        ("x.wav", np.zeros((100, 3), np.float32), "shape"),
        ("x.wav", np.zeros(0, np.float32), "shape"),
    ],
)
def test_write_audio_rejects_bad_input(
    tmp_path: Path, name: str, samples: np.ndarray, message: str
) -> None:
    with pytest.raises(InputError, match=re.escape(message)):
        write_audio(tmp_path / name, samples)


# --------------------------------------------------------------------------- encoder schedule


def _reference_windows(mel: np.ndarray, fps: float) -> list[np.ndarray]:
    t = mel.shape[1]
    count = int((t - 16) / 80 * fps) + 2
    windows = []
    for k in range(count):
        start = int(80 * k / fps)
        if start + 16 > t:
            start = t - 16
        windows.append(mel[:, start : start + 16])
    return windows


@pytest.mark.parametrize("n_frames", [16, 17, 19, 20, 21, 35, 100, 801, 1003])
@pytest.mark.parametrize("fps", [25.0, 30.0])
def test_encoder_windows_follow_the_schedule(n_frames: int, fps: float) -> None:
    mel = _readonly(np.random.default_rng(n_frames).normal(size=(80, n_frames)).astype(np.float32))
    got = encoder_windows(mel, fps)
    expected = _reference_windows(mel, fps)
    assert got.dtype == np.float32
    assert got.shape == (len(expected), 1, 80, 16)
    assert got.shape[0] == int((n_frames - 16) / 80 * fps) + 2
    for k, window in enumerate(expected):
        np.testing.assert_array_equal(got[k, 0], window)


def test_encoder_windows_rejects_short_or_misshapen_mel() -> None:
    with pytest.raises(InputError, match="too short"):
        encoder_windows(np.zeros((80, 15), np.float32))
    with pytest.raises(InputError, match=re.escape("(80, T)")):
        encoder_windows(np.zeros((40, 100), np.float32))


def _projection_encoder(seed: int = 0) -> tuple[Callable[[np.ndarray], np.ndarray], list[int]]:
    weights = np.random.default_rng(seed).normal(0, 0.05, (80 * 16, FEATURE_DIM))
    calls: list[int] = []

    def encode(batch: np.ndarray) -> np.ndarray:
        assert batch.dtype == np.float32 and batch.shape[1:] == (1, 80, 16)
        calls.append(batch.shape[0])
        return (batch.reshape(batch.shape[0], -1).astype(np.float64) @ weights).astype(np.float32)

    return encode, calls


def _reference_features(mel: np.ndarray, encode: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    rows = [encode(w[None, None].astype(np.float32))[0] for w in _reference_windows(mel, 25.0)]
    rows = [rows[0], *rows, rows[-1]]
    smoothed = []
    for i in range(len(rows)):
        left, right = rows[max(i - 1, 0)], rows[min(i + 1, len(rows) - 1)]
        smoothed.append((left.astype(np.float64) + rows[i] + right) / 3.0)
    return np.stack(smoothed)


@pytest.mark.parametrize("n_samples", [3000, 3200, 16000, 40_123])
def test_compute_features_matches_direct_loop(n_samples: int) -> None:
    mel = _readonly(mel_spectrogram(synth_speech(n_samples / SAMPLE_RATE, seed=n_samples)))
    encode, _ = _projection_encoder()
    got = compute_features(mel, encode)
    expected = _reference_features(mel, encode)
    n_windows = int((mel.shape[1] - 16) / 80 * 25) + 2
    assert got.dtype == np.float32
    assert got.shape == (n_windows + 2, FEATURE_DIM)
    assert audio.feature_count(mel.shape[1]) == len(got)  # known before the encoder runs
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_compute_features_ends_and_batching() -> None:
    mel = _readonly(mel_spectrogram(synth_speech(2.0, seed=9)))
    encode, calls = _projection_encoder(1)
    raw = encode(encoder_windows(mel))  # (W, 512)
    reference = compute_features(mel, encode, batch_size=64)
    # repeated ends: row 0 averages raw[0] three times (two copies + edge replication)
    np.testing.assert_allclose(reference[0], raw[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(reference[1], (2 * raw[0] + raw[1]) / 3, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(reference[-1], raw[-1], rtol=1e-5, atol=1e-6)
    for batch_size in (1, 7, 50, 10_000):
        calls.clear()
        got = compute_features(mel, encode, batch_size=batch_size)
        assert max(calls) <= batch_size and sum(calls) == raw.shape[0]
        np.testing.assert_allclose(got, reference, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("encode", "error", "message"),
    [
        (lambda b: np.zeros((b.shape[0], 256), np.float32), ModelError, "expected shape"),
        (lambda b: np.zeros((1, FEATURE_DIM), np.float32), ModelError, "expected shape"),
        (lambda b: np.full((b.shape[0], FEATURE_DIM), np.nan), ModelError, "finite"),
    ],
)
def test_compute_features_rejects_bad_encoder_output(
    encode: Callable[[np.ndarray], np.ndarray], error: type[Exception], message: str
) -> None:
    mel = mel_spectrogram(synth_speech(1.0, seed=0))
    with pytest.raises(error, match=re.escape(message)):
        compute_features(mel, encode, batch_size=4)


# --------------------------------------------------------------------------- generator windows


def _reference_audio_window(features: np.ndarray, index: int) -> np.ndarray:
    """SyncTalk_2D's get_audio_features, followed by reshape(32, 16, 16)."""
    left, right = index - 8, index + 8
    pad_left = pad_right = 0
    if left < 0:
        pad_left, left = -left, 0
    if right > features.shape[0]:
        pad_right, right = right - features.shape[0], features.shape[0]
    rows = features[left:right]
    rows = np.concatenate(
        [np.zeros((pad_left, FEATURE_DIM)), rows, np.zeros((pad_right, FEATURE_DIM))]
    )
    return rows.reshape(32, 16, 16)


@pytest.mark.parametrize("n_rows", [1, 5, 16, 17, 40])
def test_audio_windows_match_per_frame_reference(n_rows: int) -> None:
    features = _readonly(np.random.default_rng(n_rows).normal(size=(n_rows, FEATURE_DIM)))
    index = np.arange(n_rows)
    got = audio_windows(features, index)
    assert got.dtype == np.float32 and got.shape == (n_rows, 32, 16, 16)
    for i in index:
        expected = _reference_audio_window(features, i).astype(np.float32)
        np.testing.assert_array_equal(got[i], expected)
    # zero padding off both ends, real rows in the middle
    flat = got.reshape(n_rows, 16, FEATURE_DIM)
    assert np.all(flat[0, :8] == 0) and np.all(flat[-1, 8 + 1 :] == 0)
    np.testing.assert_array_equal(flat[0, 8], features[0].astype(np.float32))


def test_audio_windows_subset_and_empty() -> None:
    features = np.random.default_rng(0).normal(size=(30, FEATURE_DIM)).astype(np.float32)
    index = np.array([29, 3, 3, 15])
    got = audio_windows(features, index)
    for row, i in zip(got, index, strict=True):
        np.testing.assert_array_equal(row, _reference_audio_window(features, i))
    assert audio_windows(features, np.array([], np.int64)).shape == (0, 32, 16, 16)


@pytest.mark.parametrize(
    ("features", "index", "message"),
    [
        (np.zeros((10, FEATURE_DIM)), np.array([10]), "[0, 10)"),
        (np.zeros((10, FEATURE_DIM)), np.array([-1]), "[0, 10)"),
        (np.zeros((10, FEATURE_DIM)), np.array([1.5]), "integer"),
        (np.zeros((10, 256)), np.array([0]), "shape"),
    ],
)
def test_audio_windows_rejects_bad_input(
    features: np.ndarray, index: np.ndarray, message: str
) -> None:
    with pytest.raises(InputError, match=re.escape(message)):
        audio_windows(features, index)


# --------------------------------------------------------------------------- feature files


def test_load_features_round_trip(tmp_path: Path) -> None:
    features = np.random.default_rng(0).normal(size=(7, FEATURE_DIM))
    np.save(tmp_path / "f.npy", features)  # float64 on disk
    got = load_features(tmp_path / "f.npy")
    assert got.dtype == np.float32 and got.shape == (7, FEATURE_DIM)
    np.testing.assert_array_equal(got, features.astype(np.float32))


def _save(array: np.ndarray, name: str = "f.npy") -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        np.save(tmp / name, array, allow_pickle=True)
        return tmp / name

    return make


def _object_array(tmp: Path) -> Path:
    array = np.empty((2, FEATURE_DIM), dtype=object)
    array[:] = 0.0
    return _save(array)(tmp)


def _nan_features() -> np.ndarray:
    array = np.zeros((3, FEATURE_DIM), np.float32)
    array[1, 7] = np.nan
    return array


def _npz(tmp: Path) -> Path:
    np.savez(tmp / "f.npz", features=np.zeros((3, FEATURE_DIM)))
    return tmp / "f.npz"


BAD_FEATURES = [
    ("missing", lambda tmp: tmp / "nope.npy", "not found"),
    ("text-file", _write_bytes("f.npy", b"not an array\n"), "npy"),
    ("pickled-objects", _object_array, "pickles are refused"),
    ("wrong-width", _save(np.zeros((3, 256), np.float32)), "got (3, 256)"),
    ("one-dimensional", _save(np.zeros(FEATURE_DIM, np.float32)), f"got ({FEATURE_DIM},)"),
    ("three-dimensional", _save(np.zeros((1, 3, FEATURE_DIM), np.float32)), "shape"),
    ("no-rows", _save(np.zeros((0, FEATURE_DIM), np.float32)), "N >= 1"),
    ("nan", _save(_nan_features()), "NaN"),
    ("overflows-float32", _save(np.full((2, FEATURE_DIM), 1e300)), "infinity"),
    ("complex", _save(np.zeros((2, FEATURE_DIM), np.complex64)), "dtype"),
    ("strings", _save(np.full((2, FEATURE_DIM), "a")), "dtype"),
    ("npz-archive", _npz, "single .npy array"),
]


@pytest.mark.parametrize(
    ("make", "message"), [c[1:] for c in BAD_FEATURES], ids=[c[0] for c in BAD_FEATURES]
)
def test_load_features_rejects_bad_files(
    tmp_path: Path, make: Callable[[Path], Path], message: str
) -> None:
    path = make(tmp_path)
    with pytest.raises(InputError, match=re.escape(message)) as info:
        load_features(path)
    assert info.value.path == str(path)
