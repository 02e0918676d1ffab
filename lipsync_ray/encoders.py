"""The H.264 encoders: which ones open here, the machine-wide NVENC sessions, and one encoder
stream that turns BGR frames into packets.

::

    available_video_codecs()     the encoders FFmpeg can open here (cached per process)
    check_video_encoder(options) open the chosen encoder once on the driver, before any actor
    encoder_session(options)     hold one of the machine's NVENC slots while encoding
    VideoEncoder                 one H.264 stream in an output container, flushed once
    x264_params(options)         the x264 options libx264 opens with (fixed GOP + the user's)
    bgr_to_yuv420p(frame)        BGR -> planar yuv420p, BT.709 limited range
    check_frame, check_size_wh   the frame and size checks both encode paths run

:mod:`lipsync_ray.encode` drives these to write segments and whole files; what a container
holds and how a file is made and verified is :mod:`lipsync_ray.media`. This module knows
neither: it writes packets into a container it is handed.

Pictures are encoded as yuv420p, converted from BGR with the BT.709 matrix in limited
("TV") range and tagged as such, which is what players assume for HD video. yuv420p
needs an even width and height: odd sizes are rejected, never padded or cropped (an odd
``size_wh`` argument is an InputError, an odd first frame an EncodeError).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import io
import logging
import os
import shutil
import subprocess
import time
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
from av.video.reformatter import ColorPrimaries, ColorRange, Colorspace, ColorTrc

from lipsync_ray.errors import EncodeError, InputError
from lipsync_ray.fileio import private_temp_dir
from lipsync_ray.options import (
    NVENC_PRESETS,
    NVENC_SESSIONS_GEFORCE,
    EncodeOptions,
    VideoCodec,
)

__all__ = [
    "KEYINT_S",
    "NVENC_SLOT_TIMEOUT_S",
    "VideoEncoder",
    "available_video_codecs",
    "bgr_to_yuv420p",
    "check_codec_available",
    "check_frame",
    "check_size_wh",
    "check_video_encoder",
    "encoder_session",
    "x264_params",
]

logger = logging.getLogger(__name__)

KEYINT_S = 10  # seconds between IDR frames inside one encode (x264's default 250 at 25 fps)
NVENC_SLOT_TIMEOUT_S = 600.0  # waiting longer for a free session means something hangs
# GPUs made without an NVENC engine: compute parts, whose video blocks only decode.
_NO_NVENC_GPUS = ("A100", "A800", "A30", "H100", "H800", "H200")


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
            encoder_session(options),
            av.open(io.BytesIO(), "w", format="mp4") as container,
        ):
            encoder = VideoEncoder(container, options)
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
def encoder_session(options: EncodeOptions, slot_dir: Path | None = None):
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


# --------------------------------------------------------------------------- video


# A closed GOP and no scene-cut key frames: every encode starts with an IDR frame, and identical
# settings give identical SPS/PPS, so segments join. The user's options cannot touch these
# (``options.X264_PARAM_KEYS`` leaves them out).
_X264_FIXED_PARAMS = "scenecut=0:open-gop=0"


def x264_params(options: EncodeOptions) -> str:
    """The ``x264-params`` text libx264 is opened with: the fixed GOP settings, then
    ``options.resolved_x264_params`` (already checked when ``options`` was built)."""
    return ":".join(p for p in (_X264_FIXED_PARAMS, options.resolved_x264_params) if p)


class VideoEncoder:
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
            stream.options = {
                "crf": str(opts.crf),
                "preset": opts.preset,
                "x264-params": x264_params(opts),
            }
        else:
            stream.options = {
                "preset": NVENC_PRESETS[opts.preset],
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
        check_frame(frame, self._index, self._size_wh)
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


def check_frame(frame: object, index: int, size_wh: tuple[int, int] | None) -> tuple[int, int]:
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


def check_codec_available(codec: VideoCodec) -> None:
    usable = available_video_codecs()
    if codec not in usable:
        names = ", ".join(c.value for c in usable) or "none"
        raise InputError(f"video encoder {codec.value} is not usable here (usable: {names})")
