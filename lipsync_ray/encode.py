"""Encode stage: BGR frames and mono audio to an H.264 + AAC file, with PyAV only.

(Over 700 lines on purpose: one stage whose three paths, segments, their stream-copy join and
the single encoder, share the muxer set-up, the verification and the NVENC session cap; split,
each part would import the others' private helpers.)

Two ways to make the output:

* **segment mode** (the Ray pipeline): every chunk of frames is encoded on its own by
  :func:`encode_segment` into a video-only MP4 that starts with an IDR frame and has a
  closed GOP; :func:`concat_segments` then joins the segments with a *stream copy*
  (packets are remuxed, only their timestamps are rewritten) and encodes the audio once
  over the whole timeline. Segments must come from identical encoder settings: the join
  checks the codec parameters (SPS/PPS in the extradata) and refuses segments that differ.
* **single mode** (:func:`encode_video`): one encoder over all frames, for comparison.

Both write to a temporary file next to the output, verify it with :func:`probe` (frame
count by demuxing, one video and one audio stream, audio duration within one frame of
the video), and only then rename it onto the output path. A failed or interrupted call
leaves the output path as it was: a previous file there stays until the new one is whole
and verified (the call's error, not the file, says that this render failed).

Pictures are encoded as yuv420p, converted from BGR with the BT.709 matrix in limited
("TV") range and tagged as such, which is what players assume for HD video. yuv420p
needs an even width and height: odd sizes are rejected, never padded or cropped (an odd
``size_wh`` argument is an InputError, an odd first frame an EncodeError). Call
:func:`check_size_wh` when the size is first known to fail early.

Errors: bad options or arguments raise :class:`InputError` before any file is created;
anything that goes wrong while frames flow or media is written (a bad frame mid-stream,
segments that do not match, a verification mismatch, an FFmpeg error) raises
:class:`EncodeError`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import io
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Iterable, Iterator, Sequence
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
from av.video.reformatter import ColorPrimaries, ColorRange, Colorspace, ColorTrc

from lipsync_ray.errors import EncodeError, InputError, LipsyncError
from lipsync_ray.fileio import partial_path, partials, private_temp_dir
from lipsync_ray.options import (
    _NVENC_PRESETS,
    NVENC_SESSIONS_GEFORCE,
    X264_PRESETS,  # noqa: F401  (still importable from here)
    EncodeOptions,
    VideoCodec,
    _require,
)

__all__ = [
    "EncodeOptions",
    "MediaInfo",
    "VideoCodec",
    "available_video_codecs",
    "bgr_to_yuv420p",
    "check_size_wh",
    "check_video_encoder",
    "concat_segments",
    "encode_segment",
    "encode_video",
    "probe",
]

logger = logging.getLogger(__name__)

AAC_SAMPLE_RATE = 48_000  # Hz; 48000 / 25 = 1920 samples per video frame, exact
AAC_FRAME_SAMPLES = 1024  # samples per AAC frame (AAC-LC)
KEYINT_S = 10  # seconds between IDR frames inside one encode (x264's default 250 at 25 fps)
_AUDIO_CHUNK_S = 1  # seconds of input audio pushed through the resampler at a time
_PTS_TOLERANCE_FRAMES = 0.1  # a packet time must sit this close to a whole frame
NVENC_SLOT_TIMEOUT_S = 600.0  # waiting longer for a free session means something hangs
# GPUs made without an NVENC engine: compute parts, whose video blocks only decode.
_NO_NVENC_GPUS = ("A100", "A800", "A30", "H100", "H800", "H200")

_CONTAINER_FORMATS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska"}


@dataclasses.dataclass(frozen=True)
class MediaInfo:
    """What :func:`probe` found in a media file (first video and first audio stream)."""

    path: Path
    video_frames: int  # counted by demuxing packets, not read from metadata
    fps: float
    size_wh: tuple[int, int]
    video_duration_s: float
    audio_duration_s: float | None  # None when there is no audio stream
    video_codec: str
    audio_codec: str | None


@functools.cache
def available_video_codecs() -> list[VideoCodec]:
    """The encoders that can actually be opened here (NVENC needs a GPU and driver).

    Tries to open a small encoder context for each; the answer is cached per process.
    """
    usable = []
    for codec in VideoCodec:
        try:
            ctx = av.CodecContext.create(codec.value, "w")
            ctx.width, ctx.height = 256, 256
            ctx.pix_fmt = "yuv420p"
            ctx.time_base = Fraction(1, 25)
            ctx.framerate = Fraction(25, 1)
            ctx.open()
        except Exception as exc:  # any failure means "not usable here"
            logger.debug("video encoder %s is not usable: %s", codec.value, exc)
            continue
        usable.append(codec)
    return usable


def check_video_encoder(options: EncodeOptions, size_wh: tuple[int, int] = (256, 256)) -> None:
    """Open the requested video encoder once and encode one black frame, in memory.

    Run on the driver before any actor starts, so an encoder that cannot work here fails the
    render at once rather than at the first chunk. ``size_wh`` is the output size (odd sizes
    are tried at 256x256: they are rejected later, with their own message). libx264 is only
    looked up: a software encoder that FFmpeg lists always opens.

    Raises:
        InputError: one line naming the encoder and the likely reason (for NVENC: no NVIDIA
            GPU or driver, a GPU without an NVENC engine, FFmpeg without NVENC, or no free
            session).
    """
    width, height = size_wh
    if width % 2 or height % 2 or width < 2 or height < 2:
        width, height = 256, 256
    codec = options.codec.value
    if codec not in av.codecs_available:
        raise InputError(f"video encoder {codec} cannot be used: this FFmpeg build lacks it")
    if options.codec is VideoCodec.LIBX264:
        return  # software: present means usable (a trial would cost ~0.3 s at 720p)
    try:
        with (
            _encoder_session(options),
            av.open(io.BytesIO(), "w", format="mp4") as container,
        ):
            encoder = _VideoEncoder(container, options)
            encoder.open((width, height))
            container.mux(encoder.encode(np.zeros((height, width, 3), np.uint8)))
            container.mux(encoder.flush())
    except EncodeError as exc:
        raise InputError(f"video encoder {codec} cannot be used: {exc}") from None
    except Exception as exc:  # FFmpeg errors come as av.error.* or OSError
        detail = getattr(exc, "strerror", None) or str(exc).strip() or type(exc).__name__
        raise InputError(
            f"video encoder {codec} cannot be used: {_encoder_failure_reason(options.codec)} "
            f"(FFmpeg: {detail})"
        ) from None


def _nvidia_gpu_names() -> list[str] | None:
    """GPU names from ``nvidia-smi``; None when there is no NVIDIA driver to ask."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        result = subprocess.run(
            [exe, "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=15, check=True,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return [line.strip() for line in result.stdout.splitlines() if line.strip()]


def _encoder_failure_reason(codec: VideoCodec, gpu_names=_nvidia_gpu_names) -> str:
    """The likely reason why ``codec`` would not open, in words."""
    if codec is not VideoCodec.H264_NVENC:
        return "the encoder would not open"
    names = gpu_names()
    if not names:
        return "no NVIDIA GPU or driver found (nvidia-smi is missing or lists none)"
    bare = [n for n in names if any(model in n.upper() for model in _NO_NVENC_GPUS)]
    if len(bare) == len(names):
        return (
            f"{', '.join(sorted(set(bare)))} has no NVENC engine (A100, H100, H200 and other "
            "compute GPUs cannot encode video); use --video-codec libx264"
        )
    return (
        f"the driver refused a session on {', '.join(names)}: a driver too old for this FFmpeg, "
        f"or every NVENC session taken (GeForce drivers allow {NVENC_SESSIONS_GEFORCE})"
    )


def _nvenc_slot_dir() -> Path:
    return private_temp_dir("nvenc-slots")  # this user's: nobody else may hold our slots


@contextlib.contextmanager
def _encoder_session(options: EncodeOptions, slot_dir: Path | None = None):
    """Hold one of ``options.nvenc_sessions`` machine-wide NVENC slots while encoding.

    The slots are ``flock``-ed files: the kernel releases a lock when its holder dies, so a
    killed compositor never leaks one. Other codecs (and a cap of 0) take no slot.
    """
    if options.codec is not VideoCodec.H264_NVENC or options.nvenc_sessions == 0:
        yield None
        return
    root = slot_dir or _nvenc_slot_dir()
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    deadline = time.monotonic() + NVENC_SLOT_TIMEOUT_S
    while True:
        for slot in range(options.nvenc_sessions):
            fd = os.open(root / f"slot-{slot}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            try:
                yield slot
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
            return
        if time.monotonic() > deadline:
            raise EncodeError(
                f"no free NVENC session in {NVENC_SLOT_TIMEOUT_S:.0f} s "
                f"({options.nvenc_sessions} allowed at once)"
            )
        time.sleep(0.05)


def probe(path: str | Path) -> MediaInfo:
    """Describe a media file by demuxing all of its packets.

    Raises:
        InputError: the file is missing, unreadable, or has no video stream.
    """
    info, _, _ = _probe_streams(Path(path))
    return info


def encode_segment(
    frames: Iterable[np.ndarray],
    path: str | Path,
    options: EncodeOptions,
    *,
    size_wh: tuple[int, int] | None = None,
) -> int:
    """Encode frames into a video-only H.264 segment that :func:`concat_segments` can join.

    Args:
        frames: uint8 (H, W, 3) BGR arrays, all of one even size; not mutated.
        path: output file; ``.mp4`` is the intended container (``.mov``/``.mkv`` work).
        options: encoder settings; every segment of one output must use the same ones.
        size_wh: the expected (width, height); taken from the first frame when None.

    Returns:
        The number of frames written (the first is an IDR frame; the GOP is closed).

    Raises:
        InputError: bad options, size_wh or path suffix (nothing is written).
        EncodeError: a bad frame, no frames, or an encoder/muxer failure; nothing is left
            at ``path``.
    """
    path = Path(path)
    fmt = _container_format(path)
    _check_codec_available(options.codec)
    if size_wh is not None:
        check_size_wh(size_wh)
    with (
        _encoder_session(options),
        _atomic_output(path) as tmp,
        av.open(str(tmp), "w", format=fmt) as container,
    ):
        encoder = _VideoEncoder(container, options)
        count = 0
        for count, frame in enumerate(frames, start=1):
            if count == 1:
                encoder.open(size_wh or _check_frame(frame, 0, None))
            container.mux(encoder.encode(frame))
        if count == 0:
            raise EncodeError("expected at least one frame, got 0", path=path)
        container.mux(encoder.flush())
    logger.debug("encoded segment of %d frames to %s", count, path)
    return count


def concat_segments(
    segments: Sequence[Path],
    audio: np.ndarray | None,
    sample_rate: int,
    output: str | Path,
    options: EncodeOptions,
    *,
    expected_frames: int,
) -> MediaInfo:
    """Join video-only segments by stream copy and add AAC audio encoded once.

    Packet timestamps are rewritten so they run on continuously at 1/fps; the audio
    is trimmed or zero-padded to exactly the video's duration.

    Args:
        segments: segment files from :func:`encode_segment`, in frame order.
        audio: float32 mono (n,) samples at ``sample_rate``, or None for no audio stream.
        sample_rate: audio sample rate in Hz.
        output: the final file; written atomically.
        options: the settings the segments were encoded with (fps, audio bit rate).
        expected_frames: the number of frames the output must have.

    Raises:
        InputError: bad arguments (nothing is written).
        EncodeError: segments that cannot be joined (different codec parameters, size or
            frame rate, no IDR at the start), a missing segment, a frame count or
            duration mismatch; nothing is left at ``output``.
    """
    output = Path(output)
    fmt = _container_format(output)
    _check_expected_frames(expected_frames)
    audio = _check_audio(audio, sample_rate)
    if not segments:
        raise InputError("expected at least one segment, got 0", path=output)
    with _atomic_output(output) as tmp:
        with av.open(str(tmp), "w", format=fmt, options=_mux_options(fmt)) as out:
            joiner = _SegmentJoiner(out, options.fps, output)
            track = None
            for seg_path in segments:
                with _open_input(Path(seg_path), EncodeError) as seg:
                    if joiner.out_stream is None:
                        joiner.start(seg)
                        if audio is not None:
                            track = _AudioTrack(out, audio, sample_rate, expected_frames, options)
                    joiner.append(seg, Path(seg_path))
                if track is not None:
                    out.mux(track.packets_until(joiner.frames))
            if joiner.frames != expected_frames:
                raise EncodeError(
                    f"expected {expected_frames} frames from {len(segments)} segments, "
                    f"got {joiner.frames}",
                    path=output,
                )
            if track is not None:
                out.mux(track.finish())
        info = _verify(tmp, output, expected_frames, options.fps, has_audio=audio is not None)
    logger.info("joined %d segments (%d frames) into %s", len(segments), expected_frames, output)
    return dataclasses.replace(info, path=output)


def encode_video(
    frames: Iterable[np.ndarray],
    audio: np.ndarray | None,
    sample_rate: int,
    output: str | Path,
    options: EncodeOptions,
    *,
    expected_frames: int,
) -> MediaInfo:
    """Encode all frames with one H.264 encoder, plus AAC audio (single mode).

    Same arguments, verification and atomicity as :func:`concat_segments`, with the
    frames given as uint8 (H, W, 3) BGR arrays (not mutated) instead of segment files.
    """
    output = Path(output)
    fmt = _container_format(output)
    _check_codec_available(options.codec)
    _check_expected_frames(expected_frames)
    audio = _check_audio(audio, sample_rate)
    with _encoder_session(options), _atomic_output(output) as tmp:
        with av.open(str(tmp), "w", format=fmt, options=_mux_options(fmt)) as out:
            encoder = _VideoEncoder(out, options)
            track = None
            count = 0
            for count, frame in enumerate(frames, start=1):
                if count == 1:
                    encoder.open(_check_frame(frame, 0, None))
                    if audio is not None:  # every stream must exist before the first mux
                        track = _AudioTrack(out, audio, sample_rate, expected_frames, options)
                out.mux(encoder.encode(frame))
                if track is not None:
                    out.mux(track.packets_until(count))
            if count != expected_frames:
                raise EncodeError(f"expected {expected_frames} frames, got {count}", path=output)
            out.mux(encoder.flush())
            if track is not None:
                out.mux(track.finish())
        info = _verify(tmp, output, expected_frames, options.fps, has_audio=audio is not None)
    logger.info("encoded %d frames into %s", expected_frames, output)
    return dataclasses.replace(info, path=output)


# --------------------------------------------------------------------------- video


class _VideoEncoder:
    """One H.264 encoder stream in an output container; flushed exactly once."""

    def __init__(self, container: av.container.OutputContainer, options: EncodeOptions) -> None:
        self._container = container
        self._options = options
        self._stream: av.VideoStream | None = None
        self._size_wh: tuple[int, int] = (0, 0)
        self._index = 0
        self._flushed = False

    def open(self, size_wh: tuple[int, int]) -> None:
        opts = self._options
        stream = self._container.add_stream(opts.codec.value, rate=opts.fps)
        stream.width, stream.height = size_wh
        stream.pix_fmt = "yuv420p"
        ctx = stream.codec_context
        ctx.time_base = Fraction(1, opts.fps)
        ctx.gop_size = KEYINT_S * opts.fps
        ctx.colorspace = Colorspace.ITU709
        ctx.color_range = ColorRange.MPEG
        ctx.color_primaries = ColorPrimaries.BT709
        ctx.color_trc = ColorTrc.BT709
        if opts.codec is VideoCodec.LIBX264:
            # Frame threads, as the ffmpeg CLI uses (PyAV defaults to slice threads).
            ctx.thread_type = "FRAME"
            ctx.thread_count = opts.threads
            # A closed GOP and no scene-cut key frames: every encode starts with an IDR
            # frame, and identical settings give identical SPS/PPS, so segments join.
            stream.options = {
                "crf": str(opts.crf),
                "preset": opts.preset,
                "x264-params": "scenecut=0:open-gop=0",
            }
        else:
            stream.options = {
                "preset": _NVENC_PRESETS[opts.preset],
                "rc": "vbr",
                "cq": str(opts.crf),
                "b": "0",
                "forced-idr": "1",
                "strict_gop": "1",
            }
        self._stream = stream
        self._size_wh = size_wh

    def encode(self, frame: np.ndarray) -> list[av.Packet]:
        assert self._stream is not None, "open() first"
        _check_frame(frame, self._index, self._size_wh)
        picture = av.VideoFrame.from_ndarray(bgr_to_yuv420p(frame), format="yuv420p")
        picture.colorspace = Colorspace.ITU709
        picture.color_range = ColorRange.MPEG
        picture.pts = self._index
        picture.time_base = Fraction(1, self._options.fps)
        self._index += 1
        return self._stream.encode(picture)

    def flush(self) -> list[av.Packet]:
        # Hazard: the encoder must be drained exactly once; a second drain raises EOF.
        assert self._stream is not None and not self._flushed
        self._flushed = True
        return self._stream.encode(None)


# BGR -> Y'CbCr, BT.709, limited ("MPEG") range: rows Y, Cb, Cr of [B, G, R, offset].
_KR, _KB = 0.2126, 0.0722
_KG = 1.0 - _KR - _KB
_BGR_TO_YCBCR709 = np.array(
    [
        [_KB * 219 / 255, _KG * 219 / 255, _KR * 219 / 255, 16.0],
        [112 / 255, -_KG / (1 - _KB) * 112 / 255, -_KR / (1 - _KB) * 112 / 255, 128.0],
        [-_KB / (1 - _KR) * 112 / 255, -_KG / (1 - _KR) * 112 / 255, 112 / 255, 128.0],
    ],
    np.float32,
)


def bgr_to_yuv420p(frame: np.ndarray) -> np.ndarray:
    """Convert a uint8 (H, W, 3) BGR frame (H, W even) to planar yuv420p, BT.709 limited range.

    Returns a new uint8 (H * 3 // 2, W) array: the Y plane, then Cb and Cr at half size each
    (2x2 box-averaged), the layout ``av.VideoFrame.from_ndarray(..., format="yuv420p")``
    takes. Within one level of FFmpeg's swscale conversion on Y and Cb/Cr, at a fraction of
    its cost: OpenCV's 3x4 colour transform and area resize are vectorised (1280x720:
    ~1.3 ms against ~3.4 ms for swscale, both on one thread).
    """
    h, w = frame.shape[:2]
    ycbcr = cv2.transform(np.ascontiguousarray(frame), _BGR_TO_YCBCR709)  # rounds, saturates
    out = np.empty((h * 3 // 2, w), np.uint8)
    flat = out.reshape(-1)
    flat[: h * w] = cv2.extractChannel(ycbcr, 0).reshape(-1)
    # The transform is affine, so averaging after it equals converting the averaged BGR.
    half = cv2.resize(ycbcr, (w // 2, h // 2), interpolation=cv2.INTER_AREA)
    q = (h // 2) * (w // 2)
    flat[h * w : h * w + q] = half[..., 1].reshape(-1)
    flat[h * w + q :] = half[..., 2].reshape(-1)
    return out


def _check_frame(frame: object, index: int, size_wh: tuple[int, int] | None) -> tuple[int, int]:
    """Check one uint8 (H, W, 3) frame; ``size_wh`` None means "any even size". Returns (W, H)."""
    if not isinstance(frame, np.ndarray):
        raise EncodeError(f"frame {index}: expected a numpy array, got {type(frame).__name__}")
    if frame.dtype != np.uint8:
        raise EncodeError(f"frame {index}: expected dtype uint8, got {frame.dtype}")
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise EncodeError(f"frame {index}: expected shape (H, W, 3) BGR, got {frame.shape}")
    w, h = frame.shape[1], frame.shape[0]
    if size_wh is None and (w % 2 or h % 2):
        raise EncodeError(
            f"frame {index}: expected an even width and height for yuv420p, got {w}x{h}"
        )
    if size_wh is not None and (w, h) != size_wh:
        raise EncodeError(f"frame {index}: expected size {size_wh[0]}x{size_wh[1]}, got {w}x{h}")
    return w, h


def check_size_wh(size_wh: tuple[int, int]) -> None:
    """Raise InputError unless (width, height) can be encoded as yuv420p (positive, even)."""
    w, h = size_wh
    if w <= 0 or h <= 0 or w % 2 or h % 2:
        raise InputError(f"expected a positive even width and height for yuv420p, got {w}x{h}")


def _check_codec_available(codec: VideoCodec) -> None:
    usable = available_video_codecs()
    if codec not in usable:
        names = ", ".join(c.value for c in usable) or "none"
        raise InputError(f"video encoder {codec.value} is not usable here (usable: {names})")


# --------------------------------------------------------------------------- join


class _SegmentJoiner:
    """Remuxes segment packets into one output stream on a continuous 1/fps timeline."""

    def __init__(self, out: av.container.OutputContainer, fps: int, output: Path) -> None:
        self._out = out
        self._fps = fps
        self._output = output
        self._tb = Fraction(1, fps)
        self.out_stream: av.VideoStream | None = None
        self._ref: tuple | None = None
        self._reorder_depth = 0
        self.frames = 0

    def start(self, first: av.container.InputContainer) -> None:
        template = first.streams.video[0]
        self.out_stream = self._out.add_stream_from_template(template)
        self.out_stream.time_base = self._tb
        self._ref = _stream_signature(template)
        self._reorder_depth = template.codec_context.reorder_depth

    def append(self, seg: av.container.InputContainer, seg_path: Path) -> None:
        if len(seg.streams.video) != 1:
            raise EncodeError(
                f"expected one video stream in a segment, got {len(seg.streams.video)}",
                path=seg_path,
            )
        stream = seg.streams.video[0]
        if stream.average_rate is not None and stream.average_rate != self._fps:
            raise EncodeError(f"expected {self._fps} fps, got {stream.average_rate}", path=seg_path)
        signature = _stream_signature(stream)
        if signature != self._ref:
            raise EncodeError(
                "segments differ in codec parameters (different encoder settings) and cannot be "
                f"joined by stream copy: {_difference(self._ref, signature)}",
                path=seg_path,
            )
        # Decode times are renumbered as one running sequence: decode index minus the
        # reorder depth from the (identical) SPS. Encoders report a different initial
        # delay for a segment too short to hold B-frames, so the segments' own dts would
        # not line up; pts only shift by the frames already written.
        delay = self._reorder_depth
        origin = None
        seen: set[int] = set()
        for k, packet in enumerate(p for p in seg.demux(stream) if p.size):
            if origin is None:
                if not packet.is_keyframe:
                    raise EncodeError(
                        "expected the segment to start with a key frame", path=seg_path
                    )
                origin = packet.pts
            local = self._to_frames(packet.pts - origin, packet.time_base, seg_path)
            if local < k - delay or local in seen:
                raise EncodeError(
                    f"packet {k} shows at frame {local}: a repeated frame, or B-frames deeper "
                    f"than the stream's reorder depth {delay}",
                    path=seg_path,
                )
            seen.add(local)
            packet.stream = self.out_stream
            packet.time_base = self._tb
            packet.pts = self.frames + local
            packet.dts = self.frames + k - delay
            packet.duration = 1
            self._out.mux(packet)
        if seen != set(range(len(seen))) or not seen:
            raise EncodeError(
                f"expected frames 0..{len(seen) - 1} each once, got {len(seen)} frames with gaps",
                path=seg_path,
            )
        self.frames += len(seen)

    def _to_frames(self, ticks: int, time_base: Fraction, seg_path: Path) -> int:
        exact = ticks * time_base * self._fps
        frames = round(exact)
        if abs(exact - frames) > _PTS_TOLERANCE_FRAMES:
            raise EncodeError(
                f"expected packet times on a 1/{self._fps} s grid, got {float(exact):.3f} frames",
                path=seg_path,
            )
        return frames


def _stream_signature(stream: av.VideoStream) -> tuple:
    ctx = stream.codec_context
    return (ctx.name, ctx.width, ctx.height, ctx.pix_fmt, bytes(ctx.extradata or b""))


def _difference(want: tuple | None, got: tuple) -> str:
    assert want is not None
    names = ("codec", "width", "height", "pixel format")
    for name, w, g in zip(names, want[:4], got[:4], strict=True):
        if w != g:
            return f"expected {name} {w}, got {g}"
    at = next((i for i, (x, y) in enumerate(zip(want[4], got[4], strict=False)) if x != y), None)
    at = min(len(want[4]), len(got[4])) if at is None else at
    return f"expected the first segment's SPS/PPS (extradata), got bytes that differ from byte {at}"


# --------------------------------------------------------------------------- audio


class _AudioTrack:
    """AAC encoding of the whole timeline, fed lazily so the muxer can interleave.

    The input is resampled to 48 kHz fltp and trimmed or zero-padded to exactly
    ``video_frames / fps`` seconds; AAC frames of 1024 samples carry pts in samples.
    """

    def __init__(
        self,
        out: av.container.OutputContainer,
        audio: np.ndarray,
        sample_rate: int,
        video_frames: int,
        options: EncodeOptions,
    ) -> None:
        self._stream = out.add_stream("aac", rate=AAC_SAMPLE_RATE, layout="mono")
        self._stream.bit_rate = options.audio_bitrate
        self._stream.codec_context.time_base = Fraction(1, AAC_SAMPLE_RATE)
        self._fps = options.fps
        self._total = video_frames * AAC_SAMPLE_RATE // options.fps
        self._blocks = _aac_blocks(_resampled(audio, sample_rate, self._total))
        self._sent = 0

    def packets_until(self, video_frames: int) -> list[av.Packet]:
        """Encode the audio that plays before ``video_frames`` frames of video end."""
        packets: list[av.Packet] = []
        limit = min(self._total, video_frames * AAC_SAMPLE_RATE // self._fps)
        while self._sent < limit:
            packets += self._encode(next(self._blocks))
        return packets

    def finish(self) -> list[av.Packet]:
        packets: list[av.Packet] = []
        for block in self._blocks:
            packets += self._encode(block)
        assert self._sent == self._total, (self._sent, self._total)
        return packets + self._stream.encode(None)  # the one flush of the AAC encoder

    def _encode(self, block: np.ndarray) -> list[av.Packet]:
        frame = av.AudioFrame.from_ndarray(block[None, :], format="fltp", layout="mono")
        frame.sample_rate = AAC_SAMPLE_RATE
        frame.pts = self._sent
        frame.time_base = Fraction(1, AAC_SAMPLE_RATE)
        self._sent += block.shape[0]
        return self._stream.encode(frame)


def _resampled(audio: np.ndarray, sample_rate: int, total: int) -> Iterator[np.ndarray]:
    """Yield float32 blocks at 48 kHz adding up to exactly ``total`` samples."""
    need_in = -(-total * sample_rate // AAC_SAMPLE_RATE) + 256  # + resampler look-ahead
    audio = audio[:need_in]
    produced = 0
    chunks = _resample_chunks(audio, sample_rate)
    for chunk in chunks:
        chunk = chunk[: total - produced]
        if chunk.size:
            produced += chunk.size
            yield chunk
    if produced < total:
        yield np.zeros(total - produced, np.float32)


def _resample_chunks(audio: np.ndarray, sample_rate: int) -> Iterator[np.ndarray]:
    resampler = av.AudioResampler(format="fltp", layout="mono", rate=AAC_SAMPLE_RATE)
    step = _AUDIO_CHUNK_S * sample_rate
    for start in range(0, len(audio), step):
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(audio[None, start : start + step]), format="flt", layout="mono"
        )
        frame.sample_rate = sample_rate
        frame.pts = start
        frame.time_base = Fraction(1, sample_rate)
        for out in resampler.resample(frame):
            yield out.to_ndarray()[0]
    for out in resampler.resample(None):
        yield out.to_ndarray()[0]


def _aac_blocks(chunks: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    """Re-cut a stream of sample blocks into AAC frames of 1024 (the last may be shorter)."""
    pending = np.zeros(0, np.float32)
    for chunk in chunks:
        pending = np.concatenate([pending, chunk.astype(np.float32, copy=False)])
        while pending.size >= AAC_FRAME_SAMPLES:
            yield pending[:AAC_FRAME_SAMPLES]
            pending = pending[AAC_FRAME_SAMPLES:]
    if pending.size:
        yield pending


def _check_audio(audio: np.ndarray | None, sample_rate: int) -> np.ndarray | None:
    if audio is None:
        return None
    if not isinstance(sample_rate, int) or sample_rate <= 0:
        raise InputError(f"audio sample rate must be an int > 0, got {sample_rate!r}")
    if not isinstance(audio, np.ndarray) or audio.ndim != 1:
        got = getattr(audio, "shape", type(audio).__name__)
        raise InputError(f"expected mono audio of shape (n,), got {got}")
    if not np.issubdtype(audio.dtype, np.floating):
        raise InputError(f"expected float32 audio samples, got {audio.dtype}")
    audio = audio.astype(np.float32, copy=False)
    if not np.isfinite(audio).all():
        raise InputError("expected finite audio samples, got NaN or inf")
    return audio


# --------------------------------------------------------------------------- files


def _probe_streams(path: Path) -> tuple[MediaInfo, int, int]:
    """Probe; also return the number of video and audio streams."""
    with _open_input(path, InputError) as container:
        if not container.streams.video:
            raise InputError("expected a video stream, got none", path=path)
        video = container.streams.video[0]
        audio = container.streams.audio[0] if container.streams.audio else None
        spans: dict[int, list] = {video.index: [None, None, 0]}
        if audio is not None:
            spans[audio.index] = [None, None, 0]
        try:
            for packet in container.demux(*(s for s in (video, audio) if s is not None)):
                if packet.size == 0 or packet.pts is None:
                    continue
                span = spans[packet.stream.index]
                end = packet.pts + (packet.duration or 0)
                span[0] = packet.pts if span[0] is None else min(span[0], packet.pts)
                span[1] = end if span[1] is None else max(span[1], end)
                span[2] += 1
        except av.FFmpegError as exc:
            raise InputError(f"cannot demux: {exc}", path=path) from exc

        def duration(stream) -> float:
            start, end, _ = spans[stream.index]
            # Negative times are AAC priming samples the decoder drops.
            return 0.0 if start is None else float((end - max(start, 0)) * stream.time_base)

        rate = video.average_rate or video.guessed_rate
        info = MediaInfo(
            path=path,
            video_frames=spans[video.index][2],
            fps=float(rate) if rate else 0.0,
            size_wh=(video.codec_context.width, video.codec_context.height),
            video_duration_s=duration(video),
            audio_duration_s=None if audio is None else duration(audio),
            video_codec=video.codec_context.name,
            audio_codec=None if audio is None else audio.codec_context.name,
        )
        return info, len(container.streams.video), len(container.streams.audio)


def _verify(tmp: Path, output: Path, frames: int, fps: int, *, has_audio: bool) -> MediaInfo:
    try:
        info, n_video, n_audio = _probe_streams(tmp)
    except InputError as exc:
        raise EncodeError(
            f"cannot read back the file just written: {exc.message}", path=output
        ) from exc
    problems = []
    if info.video_frames != frames:
        problems.append(f"expected {frames} video frames, got {info.video_frames}")
    if (n_video, n_audio) != (1, int(has_audio)):
        problems.append(
            f"expected 1 video and {int(has_audio)} audio streams, got {n_video} and {n_audio}"
        )
    if abs(info.video_duration_s - frames / fps) > 0.5 / fps:
        problems.append(
            f"expected {frames / fps:.3f} s of video, got {info.video_duration_s:.3f} s"
        )
    if has_audio and (
        info.audio_duration_s is None
        or abs(info.audio_duration_s - info.video_duration_s) > 1 / fps
    ):
        problems.append(
            f"expected audio within 1/{fps} s of the video's {info.video_duration_s:.3f} s, "
            f"got {info.audio_duration_s} s"
        )
    if problems:
        raise EncodeError("verification failed: " + "; ".join(problems), path=output)
    return info


def remove_partials(path: str | Path) -> list[Path]:
    """Delete the temporary files an encoder killed while writing ``path`` left beside it
    (a SIGKILL runs no clean-up); returns what was removed. Only for a path that nothing else
    is writing."""
    stale = partials(path)
    for leftover in stale:
        leftover.unlink(missing_ok=True)
    return stale


class _atomic_output:  # noqa: N801 - used like a function: `with _atomic_output(path) as tmp`
    """Yield a temp path next to ``path``; rename onto it on success, clean up otherwise.

    On failure (KeyboardInterrupt included) the temp file is removed and ``path`` is left as
    it was: a previous output is never lost to a render that did not finish. Any exception
    that is not already a LipsyncError is re-raised as EncodeError.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._tmp = partial_path(path)

    def __enter__(self) -> Path:
        if not self._path.parent.is_dir():
            raise InputError("expected an existing output directory", path=self._path.parent)
        return self._tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            try:
                os.replace(self._tmp, self._path)
                return False
            except OSError as replace_exc:  # e.g. a directory sits at the output path
                exc = replace_exc
        self._tmp.unlink(missing_ok=True)
        if isinstance(exc, LipsyncError) or not isinstance(exc, Exception):
            return False  # re-raised as is (KeyboardInterrupt included)
        raise EncodeError(f"encoding failed: {exc}", path=self._path) from exc


def _open_input(path: Path, error: type[LipsyncError]) -> av.container.InputContainer:
    if not path.is_file():
        raise error("expected an existing media file, got nothing there", path=path)
    try:
        return av.open(str(path), "r")
    except (av.FFmpegError, UnicodeDecodeError) as exc:
        raise error(f"cannot open as media: {exc}", path=path) from exc


def _container_format(path: Path) -> str:
    fmt = _CONTAINER_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise InputError(
            f"expected an output suffix in {sorted(_CONTAINER_FORMATS)}, got {path.suffix!r}",
            path=path,
        )
    return fmt


def _mux_options(fmt: str) -> dict[str, str]:
    # The index (moov) goes to the front so players can start before the whole file is read.
    return {"movflags": "+faststart"} if fmt in ("mp4", "mov") else {}


def _check_expected_frames(expected_frames: int) -> None:
    ok = isinstance(expected_frames, int) and expected_frames > 0
    _require(ok, "expected_frames must be an int > 0", expected_frames)
