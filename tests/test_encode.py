"""Tests of the encode stage: frames -> H.264 (+ AAC) -> decode with PyAV -> compare.

Every frame carries its own index as an 8-bit pattern of black and white blocks along
the top, so a dropped, repeated or swapped frame is caught by reading the pattern back
after decoding, independently of the encoder's own frame count.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import av
import numpy as np
import pytest
from helpers import psnr_db

from lipsync_ray.encode import (
    EncodeOptions,
    MediaInfo,
    VideoCodec,
    available_video_codecs,
    concat_segments,
    encode_audio,
    encode_segment,
    encode_video,
    probe,
    remove_partials,
)
from lipsync_ray.errors import EncodeError, InputError

W, H = 128, 96
FPS = 25
SR = 16_000
SEGMENT_SIZES = (7, 16, 1, 9)
N = sum(SEGMENT_SIZES)  # 33
BIT_PX = 16  # one bit of the frame index = a 16x16 block in the top strip
# Measured at 128x96, crf 20 (PyAV 18.1 / FFmpeg 8.1): the BGR -> yuv420p -> BGR conversion
# alone gives 38.5-38.8 dB; after encoding, per frame 34.3-37.1 dB (veryfast) and
# 35.8-37.9 dB (ultrafast), mean 35.3-36.5, in single and segment mode alike. The bounds
# keep a margin of about 2 dB.
MIN_PSNR_DB = 32.0
MIN_MEAN_PSNR_DB = 33.0


def make_frame(i: int, w: int = W, h: int = H) -> np.ndarray:
    """uint8 (h, w, 3) BGR: smooth colour waves that move with i, and i as 8 bits on top."""
    y, x = np.mgrid[0:h, 0:w] / np.float64(max(w, h))
    phase = 2 * np.pi * i / 25
    frame = np.stack(
        [
            128 + 80 * np.sin(2 * np.pi * (x + 0.5 * y) + phase),
            128 + 80 * np.sin(2 * np.pi * (1.5 * y - x) - 2 * phase),
            128 + 80 * np.cos(2 * np.pi * 2 * (x * y) + 3 * phase),
        ],
        axis=-1,
    ).astype(np.uint8)
    for bit in range(8):
        frame[:BIT_PX, bit * BIT_PX : (bit + 1) * BIT_PX] = 224 if (i >> bit) & 1 else 32
    frame.flags.writeable = False  # the encoder must not need to write to its inputs
    return frame


def read_index(frame: np.ndarray) -> int:
    """The frame index drawn by make_frame, read back from a decoded frame."""
    index = 0
    for bit in range(8):
        block = frame[2 : BIT_PX - 2, bit * BIT_PX + 2 : (bit + 1) * BIT_PX - 2]
        index |= int(block.mean() > 127) << bit
    return index


def tone(duration_s: float, start_s: float = 0.0, hz: float = 440.0, sr: int = SR) -> np.ndarray:
    """float32 mono at sr: silence until start_s, then a sine at half scale."""
    t = np.arange(round(duration_s * sr)) / sr
    return np.where(t >= start_s, 0.5 * np.sin(2 * np.pi * hz * t), 0.0).astype(np.float32)


@dataclasses.dataclass
class Decoded:
    frames: list[np.ndarray]  # uint8 (H, W, 3) BGR
    frame_times_s: list[float]
    key_frame_indices: list[int]
    audio: np.ndarray | None  # float32 mono at the stream's rate
    audio_rate: int | None


def decode(path: Path) -> Decoded:
    """Decode everything with PyAV, independently of the module's probe()."""
    with av.open(str(path)) as container:
        video = container.streams.video[0]
        frames, times = [], []
        for frame in container.decode(video):
            frames.append(frame.to_ndarray(format="bgr24"))
            times.append(float(frame.time))
    with av.open(str(path)) as container:
        video = container.streams.video[0]
        keys = [round(p.pts * p.time_base * FPS) for p in container.demux(video) if p.is_keyframe]
    audio, rate = None, None
    with av.open(str(path)) as container:
        if container.streams.audio:
            rate = container.streams.audio[0].rate
            chunks = [f.to_ndarray()[0] for f in container.decode(audio=0)]
            audio = np.concatenate(chunks)
    return Decoded(frames, times, sorted(keys), audio, rate)


def write_segments(directory: Path, options: EncodeOptions, sizes=SEGMENT_SIZES) -> list[Path]:
    """Encode frames 0..sum(sizes)-1 as segments; thread counts differ, as between actors."""
    paths, start = [], 0
    for k, size in enumerate(sizes):
        path = directory / f"seg{k:03d}.mp4"
        seg_options = dataclasses.replace(options, threads=(1, 2, 0)[k % 3])
        frames = (make_frame(i) for i in range(start, start + size))
        written = encode_segment(frames, path, seg_options)
        assert written == size
        paths.append(path)
        start += size
    return paths


def check_frames(decoded: Decoded, n: int) -> list[float]:
    """Frame-exact sequence, right size, right order, decent quality; returns PSNRs."""
    assert len(decoded.frames) == n
    assert [read_index(f) for f in decoded.frames] == list(range(n))
    assert decoded.frames[0].shape == (H, W, 3)
    assert np.allclose(np.diff(decoded.frame_times_s), 1 / FPS)
    assert decoded.frame_times_s[0] == pytest.approx(0.0)
    values = [psnr_db(f, make_frame(i)) for i, f in enumerate(decoded.frames)]
    assert min(values) > MIN_PSNR_DB
    assert np.mean(values) > MIN_MEAN_PSNR_DB
    return values


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize(
    "audio_s", [None, 0.5, N / FPS, 2.0], ids=["no-audio", "shorter", "exact", "longer"]
)
def test_single_mode_round_trip(tmp_path: Path, audio_s: float | None) -> None:
    audio = None if audio_s is None else tone(audio_s)
    out = tmp_path / "out.mp4"
    info = encode_video(
        (make_frame(i) for i in range(N)), audio, SR, out, EncodeOptions(), expected_frames=N
    )
    assert isinstance(info, MediaInfo)
    assert info.path == out
    assert (info.video_frames, info.size_wh, info.fps) == (N, (W, H), FPS)
    assert info.video_codec == "h264"
    assert info.video_duration_s == pytest.approx(N / FPS)
    decoded = decode(out)
    check_frames(decoded, N)
    assert decoded.key_frame_indices[0] == 0
    if audio_s is None:
        assert decoded.audio is None and info.audio_duration_s is None and info.audio_codec is None
        return
    assert info.audio_codec == "aac"
    assert abs(info.audio_duration_s - N / FPS) <= 1 / FPS
    # The decoded length, AAC padding included (measured: +128 samples, 2.7 ms, at N=33).
    decoded_s = len(decoded.audio) / decoded.audio_rate
    assert abs(decoded_s - N / FPS) <= 1 / FPS
    # Where there was input, the tone is there; past its end, silence (zero padding).
    played = decoded.audio[: int(min(audio_s, N / FPS) * decoded.audio_rate) - 2048]
    spectrum = np.abs(np.fft.rfft(played))
    assert np.fft.rfftfreq(len(played), 1 / decoded.audio_rate)[spectrum.argmax()] == (
        pytest.approx(440, abs=5)
    )
    if audio_s < N / FPS:
        tail = decoded.audio[int(audio_s * decoded.audio_rate) + 2048 :]
        assert np.abs(tail).max() < 0.01


@pytest.mark.parametrize("sample_rate", [SR, 44_100, 48_000])
def test_audio_is_aligned_with_video(tmp_path: Path, sample_rate: int) -> None:
    """A tone that starts at 0.6 s starts at 0.6 s in the output: priming is accounted for."""
    out = tmp_path / "out.mp4"
    encode_video(
        (make_frame(i) for i in range(N)),
        tone(N / FPS, start_s=0.6, sr=sample_rate),
        sample_rate,
        out,
        EncodeOptions(),
        expected_frames=N,
    )
    decoded = decode(out)
    onset = np.argmax(np.abs(decoded.audio) > 0.1) / decoded.audio_rate
    assert onset == pytest.approx(0.6, abs=0.003)


@pytest.mark.parametrize(
    ("preset", "audio_s"),
    [("veryfast", 1.0), ("ultrafast", None)],  # with B-frames and audio; without either
)
def test_segment_mode_matches_source_and_single_mode(
    tmp_path: Path, preset: str, audio_s: float | None
) -> None:
    options = EncodeOptions(preset=preset)
    segments = write_segments(tmp_path, options)
    out = tmp_path / "joined.mp4"
    audio = None if audio_s is None else tone(audio_s)
    info = concat_segments(segments, audio, SR, out, options, expected_frames=N)
    assert (info.video_frames, info.size_wh, info.path) == (N, (W, H), out)
    if audio is None:
        assert info.audio_duration_s is None
    else:
        assert abs(info.audio_duration_s - info.video_duration_s) <= 1 / FPS

    joined = decode(out)
    joined_psnr = check_frames(joined, N)
    if audio is not None:
        assert abs(len(joined.audio) / joined.audio_rate - N / FPS) <= 1 / FPS
    starts = list(np.cumsum((0, *SEGMENT_SIZES[:-1])))
    assert set(starts) <= set(joined.key_frame_indices)
    with av.open(str(out)) as container:
        packets = [p for p in container.demux(container.streams.video[0]) if p.size]
    dts = [p.dts for p in packets]
    assert dts == sorted(set(dts))  # strictly increasing decode times
    assert sorted(p.pts for p in packets) == [i * packets[0].duration for i in range(N)]

    single_out = tmp_path / "single.mp4"
    encode_video(
        (make_frame(i) for i in range(N)), None, SR, single_out, options, expected_frames=N
    )
    single = decode(single_out)
    single_psnr = check_frames(single, N)
    # Same encoder settings, so the same quality to within noise, frame by frame too.
    assert abs(np.mean(joined_psnr) - np.mean(single_psnr)) < 1.0
    for a, b in zip(joined.frames, single.frames, strict=True):
        assert psnr_db(a, b) > MIN_PSNR_DB
    # Only the final file and the segments are left: no temp files.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [*(s.name for s in segments), "joined.mp4", "single.mp4"]
    )


def test_probe_counts_frames(tmp_path: Path) -> None:
    path = tmp_path / "seg.mp4"
    encode_segment((make_frame(i) for i in range(5)), path, EncodeOptions(), size_wh=(W, H))
    info = probe(path)
    assert (info.video_frames, info.size_wh, info.audio_duration_s) == (5, (W, H), None)
    assert info.video_duration_s == pytest.approx(5 / FPS)


def test_codecs() -> None:
    usable = available_video_codecs()
    assert VideoCodec.LIBX264 in usable
    assert available_video_codecs() is usable  # cached


def test_unavailable_codec_is_refused(tmp_path: Path) -> None:
    if VideoCodec.H264_NVENC in available_video_codecs():
        pytest.skip("NVENC is usable here")
    options = EncodeOptions(codec=VideoCodec.H264_NVENC)
    with pytest.raises(InputError, match="h264_nvenc is not usable"):
        encode_segment([make_frame(0)], tmp_path / "seg.mp4", options)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- atomicity


def wrong_size_midway():
    yield from (make_frame(i) for i in range(5))
    yield make_frame(5, w=W + 2)


def failing_generator():
    yield from (make_frame(i) for i in range(5))
    raise RuntimeError("upstream failure")


@pytest.mark.parametrize(
    ("case", "error", "match"),
    [
        ("concat-expected-frames", EncodeError, f"expected {N + 1} frames"),
        ("single-expected-frames", EncodeError, f"expected {N + 1} frames"),
        ("single-wrong-size-midway", EncodeError, "frame 5: expected size 128x96, got 130x96"),
        ("segment-wrong-size-midway", EncodeError, "frame 5: expected size 128x96, got 130x96"),
        ("segment-upstream-error", EncodeError, "upstream failure"),
    ],
)
def test_failure_leaves_the_previous_output(
    tmp_path: Path, case: str, error: type, match: str
) -> None:
    seg_dir = tmp_path / "segments"
    seg_dir.mkdir()
    segments = write_segments(seg_dir, EncodeOptions()) if case.startswith("concat") else []
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "out.mp4"
    out.write_bytes(b"an older result")  # stays as it was: a failed call replaces nothing
    options = EncodeOptions()
    with pytest.raises(error, match=match):
        if case == "concat-expected-frames":
            concat_segments(segments, tone(1.0), SR, out, options, expected_frames=N + 1)
        elif case == "single-expected-frames":
            frames = (make_frame(i) for i in range(N))
            encode_video(frames, tone(1.0), SR, out, options, expected_frames=N + 1)
        elif case == "single-wrong-size-midway":
            encode_video(wrong_size_midway(), tone(1.0), SR, out, options, expected_frames=6)
        elif case == "segment-wrong-size-midway":
            encode_segment(wrong_size_midway(), out, options)
        else:
            encode_segment(failing_generator(), out, options)
    assert list(out_dir.iterdir()) == [out]  # no temp file left either
    assert out.read_bytes() == b"an older result"


# --------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    ("frames", "size_wh", "error", "match"),
    [
        ([make_frame(0, w=127)], None, EncodeError, "even width and height.*got 127x96"),
        ([make_frame(0, h=95)], None, EncodeError, "even width and height.*got 128x95"),
        ([make_frame(0)], (127, 96), InputError, "even width and height.*got 127x96"),
        (
            [make_frame(0).astype(np.float32)],
            None,
            EncodeError,
            "expected dtype uint8, got float32",
        ),
        ([make_frame(0)[:, :, :2]], None, EncodeError, r"expected shape \(H, W, 3\)"),
        ([np.zeros((H, W, 4), np.uint8)], None, EncodeError, r"expected shape \(H, W, 3\)"),
        ([np.zeros((H, W), np.uint8)], None, EncodeError, r"expected shape \(H, W, 3\)"),
        ([make_frame(0).tolist()], None, EncodeError, "expected a numpy array, got list"),
        ([], None, EncodeError, "expected at least one frame, got 0"),
        ([make_frame(0), make_frame(1)[:, :, :1]], None, EncodeError, "frame 1: expected shape"),
        ([make_frame(0)], (W + 2, H), EncodeError, "frame 0: expected size 130x96, got 128x96"),
    ],
    ids=[
        "odd-width",
        "odd-height",
        "odd-size_wh",
        "float-frame",
        "two-channels",
        "four-channels",
        "grey",
        "not-array",
        "empty",
        "bad-second-frame",
        "size_wh-mismatch",
    ],
)
def test_bad_frames(tmp_path: Path, frames, size_wh, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        encode_segment(frames, tmp_path / "seg.mp4", EncodeOptions(), size_wh=size_wh)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"fps": 0}, "fps must be an int > 0, got 0"),
        ({"fps": 25.0}, "fps must be an int > 0"),
        ({"crf": 52}, "crf must be in 0..51, got 52"),
        ({"preset": "warp"}, "preset must be one of"),
        ({"codec": "libx264"}, "codec must be a VideoCodec"),
        ({"threads": -1}, "threads must be >= 0, got -1"),
        ({"audio_bitrate": 0}, "audio_bitrate must be > 0"),
    ],
)
def test_bad_options(kwargs: dict, match: str) -> None:
    with pytest.raises(InputError, match=match):
        EncodeOptions(**kwargs)


@pytest.mark.parametrize(
    ("audio", "sample_rate", "output", "expected_frames", "match"),
    [
        (tone(1.0)[None, :], SR, "out.mp4", N, r"expected mono audio of shape \(n,\)"),
        (np.zeros(100, np.int16), SR, "out.mp4", N, "expected float32 audio samples, got int16"),
        (np.full(100, np.nan, np.float32), SR, "out.mp4", N, "expected finite audio"),
        (tone(1.0), 0, "out.mp4", N, "sample rate must be an int > 0, got 0"),
        (None, SR, "out.avi", N, "expected an output suffix"),
        (None, SR, "missing-dir/out.mp4", N, "expected an existing output directory"),
        (None, SR, "out.mp4", 0, "expected_frames must be an int > 0, got 0"),
    ],
)
def test_bad_encode_video_arguments(
    tmp_path: Path, audio, sample_rate: int, output: str, expected_frames: int, match: str
) -> None:
    frames = (make_frame(i) for i in range(3))
    with pytest.raises(InputError, match=match):
        encode_video(
            frames,
            audio,
            sample_rate,
            tmp_path / output,
            EncodeOptions(),
            expected_frames=expected_frames,
        )
    assert list(tmp_path.iterdir()) == []


def _other_size(directory: Path) -> Path:
    path = directory / "other.mp4"
    encode_segment([make_frame(0, w=W + 16)] * 2, path, EncodeOptions())
    return path


def _other_preset(directory: Path) -> Path:
    path = directory / "other.mp4"
    encode_segment([make_frame(0)] * 2, path, EncodeOptions(preset="ultrafast"))
    return path


def _other_fps(directory: Path) -> Path:
    path = directory / "other.mp4"
    encode_segment([make_frame(0)] * 2, path, EncodeOptions(fps=30))
    return path


def _missing(directory: Path) -> Path:
    return directory / "never-written.mp4"


def _not_media(directory: Path) -> Path:
    path = directory / "garbage.mp4"
    path.write_bytes(b"\x00not a video\x00" * 100)
    return path


@pytest.mark.parametrize(
    ("make_bad", "match"),
    [
        (_other_size, "segments differ in codec parameters.*expected width 128, got 144"),
        (_other_preset, "segments differ in codec parameters"),  # baseline vs high profile
        (_other_fps, "expected 25 fps, got 30"),
        (_missing, "expected an existing media file"),
        (_not_media, "cannot open as media"),
    ],
)
def test_segments_that_cannot_be_joined(tmp_path: Path, make_bad, match: str) -> None:
    seg_dir = tmp_path / "segments"
    seg_dir.mkdir()
    good = write_segments(seg_dir, EncodeOptions(), sizes=(3, 4))
    bad = make_bad(seg_dir)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(EncodeError, match=match):
        concat_segments(
            [good[0], bad, good[1]],
            None,
            SR,
            out_dir / "out.mp4",
            EncodeOptions(),
            expected_frames=9,
        )
    assert list(out_dir.iterdir()) == []


def test_directory_at_output_path(tmp_path: Path) -> None:
    (tmp_path / "out.mp4").mkdir()
    with pytest.raises(EncodeError, match=r"out\.mp4"):
        encode_segment([make_frame(0)], tmp_path / "out.mp4", EncodeOptions())
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]


def test_concat_needs_segments(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="expected at least one segment, got 0"):
        concat_segments([], None, SR, tmp_path / "out.mp4", EncodeOptions(), expected_frames=1)


@pytest.mark.parametrize("content", [None, b"", b"\x00garbage\x00" * 64])
def test_probe_rejects_unreadable_files(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "in.mp4"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InputError):
        probe(path)


def test_probe_rejects_audio_only_file(tmp_path: Path) -> None:
    path = tmp_path / "audio.m4a"
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=SR, layout="mono")
        frame = av.AudioFrame.from_ndarray(tone(0.1)[None, :], format="fltp", layout="mono")
        frame.sample_rate, frame.pts = SR, 0
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    with pytest.raises(InputError, match="expected a video stream, got none"):
        probe(path)


@pytest.mark.parametrize("size_wh", [(1280, 720), (322, 182), (64, 2)])
def test_bgr_to_yuv420p_matches_swscale(size_wh) -> None:
    """The OpenCV conversion agrees with FFmpeg's swscale (BT.709, limited range) to within
    rounding: Y within 1 level, Cb/Cr within 2 (swscale's fixed-point chroma filter)."""
    from av.video.reformatter import ColorRange, Colorspace

    from lipsync_ray.encode import bgr_to_yuv420p

    w, h = size_wh
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:h, 0:w]
    smooth = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) % 256], -1)
    for frame in (smooth.astype(np.uint8), rng.integers(0, 256, (h, w, 3), dtype=np.uint8)):
        want = (
            av.VideoFrame.from_ndarray(frame, format="bgr24")
            .reformat(format="yuv420p", dst_colorspace=Colorspace.ITU709,
                      dst_color_range=ColorRange.MPEG)
            .to_ndarray()
        )  # fmt: skip
        got = bgr_to_yuv420p(frame)
        assert got.shape == want.shape == (h * 3 // 2, w) and got.dtype == np.uint8
        diff = np.abs(got.astype(int) - want)
        assert diff[:h].max() <= 1 and diff[h:].max() <= 2
        assert diff.mean() < 0.7
    # black and white are exact: Y 16 / 235, Cb = Cr = 128
    for value, luma in ((0, 16), (255, 235)):
        got = bgr_to_yuv420p(np.full((h, w, 3), value, np.uint8))
        assert set(np.unique(got[:h])) == {luma} and set(np.unique(got[h:])) == {128}


def test_remove_partials_takes_only_this_outputs_leftovers(tmp_path: Path) -> None:
    names = [".out.1a2b3c4d.partial.mp4", ".out.ffff0000.partial.mp4", "out.mp4",
             ".other.1a2b3c4d.partial.mp4", ".out.1a2b3c4d.partial.mkv"]  # fmt: skip
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    removed = remove_partials(tmp_path / "out.mp4")
    assert [p.name for p in removed] == names[:2]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[2:])


# The AAC track encoded ahead (encode_audio, in a thread while the last chunks render) is
# muxed as it is: the file must be the one encoding while muxing writes, byte for byte.
@pytest.mark.parametrize("join", ["segments", "single"])
@pytest.mark.parametrize("audio_s", [0.2, 1.0, 3.0])  # shorter, about, longer than the video
def test_audio_encoded_ahead_writes_the_same_file(tmp_path: Path, join: str, audio_s: float):
    options = EncodeOptions()
    audio = tone(audio_s, start_s=0.1)
    segments = write_segments(tmp_path, options)

    def write(out: Path, track) -> bytes:
        if join == "segments":
            concat_segments(segments, track, SR, out, options, expected_frames=N)
        else:
            frames = (make_frame(i) for i in range(N))
            encode_video(frames, track, SR, out, options, expected_frames=N)
        return out.read_bytes()

    inline = write(tmp_path / "inline.mp4", audio)
    ahead = write(tmp_path / "ahead.mp4", encode_audio(audio, SR, N, options))
    assert ahead == inline
    assert len(decode(tmp_path / "ahead.mp4").audio) > 0


@pytest.mark.parametrize(
    ("made_for", "match"),
    [
        ({"video_frames": N + 1}, r"encoded audio for \(frames, fps, bit rate\) \(34, 25, "),
        ({"fps": 30}, r"\(33, 30, "),
        ({"bit_rate": 64_000}, r"\(33, 25, 64000\)"),
    ],
)
def test_audio_encoded_for_other_frames_or_settings_is_refused(tmp_path: Path, made_for, match):
    options = EncodeOptions()
    segments = write_segments(tmp_path, options)
    encoded = dataclasses.replace(encode_audio(tone(1.0), SR, N, options), **made_for)
    out = tmp_path / "out.mp4"
    with pytest.raises(InputError, match=match):
        concat_segments(segments, encoded, SR, out, options, expected_frames=N)
    assert not out.exists()
