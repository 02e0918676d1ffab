"""Encode stage: BGR frames and mono audio to an H.264 + AAC file, with PyAV only.

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

This module holds the three entry points and the join; the parts they share live beside
it, each importing neither this module nor the other:

* :mod:`lipsync_ray.encoders`: which H.264 encoders open here, the NVENC session slots,
  one encoder stream, the BGR -> yuv420p conversion and the frame checks;
* :mod:`lipsync_ray.media`: probe and verification, the atomic output file, the container
  formats, and the AAC track.

The names other modules use are re-exported here, so ``lipsync_ray.encode`` stays the stage's
one import. Pictures are yuv420p, BT.709 limited range; odd sizes are rejected (see
:mod:`lipsync_ray.encoders`). Call :func:`check_size_wh` when the size is first known to fail
early.

Errors: bad options or arguments raise :class:`InputError` before any file is created;
anything that goes wrong while frames flow or media is written (a bad frame mid-stream,
segments that do not match, a verification mismatch, an FFmpeg error) raises
:class:`EncodeError`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from lipsync_ray.encoders import (
    KEYINT_S,  # noqa: F401  (still importable from here)
    NVENC_SLOT_TIMEOUT_S,  # noqa: F401
    VideoEncoder,
    available_video_codecs,
    bgr_to_yuv420p,
    check_codec_available,
    check_frame,
    check_size_wh,
    check_video_encoder,
    encoder_session,
)
from lipsync_ray.errors import EncodeError, InputError
from lipsync_ray.media import (
    AAC_FRAME_SAMPLES,  # noqa: F401  (still importable from here)
    AAC_SAMPLE_RATE,  # noqa: F401
    AudioTrack,
    EncodedAudio,
    MediaInfo,
    atomic_output,
    check_audio,
    container_format,
    encode_audio,
    mux_options,
    open_input,
    probe,
    remove_partials,
    verify,
)
from lipsync_ray.options import (
    NVENC_SESSIONS_GEFORCE,  # noqa: F401  (still importable from here)
    X264_PRESETS,  # noqa: F401
    EncodeOptions,
    VideoCodec,
)

__all__ = [
    "EncodeOptions",
    "EncodedAudio",
    "MediaInfo",
    "VideoCodec",
    "available_video_codecs",
    "bgr_to_yuv420p",
    "check_size_wh",
    "check_video_encoder",
    "concat_segments",
    "encode_audio",
    "encode_segment",
    "encode_video",
    "probe",
    "remove_partials",
]

logger = logging.getLogger(__name__)

_PTS_TOLERANCE_FRAMES = 0.1  # a packet time must sit this close to a whole frame


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
    fmt = container_format(path)
    check_codec_available(options.codec)
    if size_wh is not None:
        check_size_wh(size_wh)
    with (
        encoder_session(options),
        atomic_output(path) as tmp,
        av.open(str(tmp), "w", format=fmt) as container,
    ):
        encoder = VideoEncoder(container, options)
        count = 0
        for count, frame in enumerate(frames, start=1):
            if count == 1:
                encoder.open(size_wh or check_frame(frame, 0, None))
            container.mux(encoder.encode(frame))
        if count == 0:
            raise EncodeError("expected at least one frame, got 0", path=path)
        container.mux(encoder.flush())
    logger.debug("encoded segment of %d frames to %s", count, path)
    return count


def concat_segments(
    segments: Sequence[Path],
    audio: np.ndarray | EncodedAudio | None,
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
        audio: float32 mono (n,) samples at ``sample_rate``; or the track encoded ahead by
            :func:`encode_audio` for the same frames and settings (muxed as it is, the same
            file); or None for no audio stream.
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
    fmt = container_format(output)
    _check_expected_frames(expected_frames)
    audio = check_audio(audio, sample_rate)
    if not segments:
        raise InputError("expected at least one segment, got 0", path=output)
    with atomic_output(output) as tmp:
        with av.open(str(tmp), "w", format=fmt, options=mux_options(fmt)) as out:
            joiner = _SegmentJoiner(out, options.fps, output)
            track = None
            for seg_path in segments:
                with open_input(Path(seg_path), EncodeError) as seg:
                    if joiner.out_stream is None:
                        joiner.start(seg)
                        if audio is not None:
                            track = AudioTrack(out, audio, sample_rate, expected_frames, options)
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
        info = verify(tmp, output, expected_frames, options.fps, has_audio=audio is not None)
    logger.info("joined %d segments (%d frames) into %s", len(segments), expected_frames, output)
    return dataclasses.replace(info, path=output)


def encode_video(
    frames: Iterable[np.ndarray],
    audio: np.ndarray | EncodedAudio | None,
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
    fmt = container_format(output)
    check_codec_available(options.codec)
    _check_expected_frames(expected_frames)
    audio = check_audio(audio, sample_rate)
    with encoder_session(options), atomic_output(output) as tmp:
        with av.open(str(tmp), "w", format=fmt, options=mux_options(fmt)) as out:
            encoder = VideoEncoder(out, options)
            track = None
            count = 0
            for count, frame in enumerate(frames, start=1):
                if count == 1:
                    encoder.open(check_frame(frame, 0, None))
                    if audio is not None:  # every stream must exist before the first mux
                        track = AudioTrack(out, audio, sample_rate, expected_frames, options)
                out.mux(encoder.encode(frame))
                if track is not None:
                    out.mux(track.packets_until(count))
            if count != expected_frames:
                raise EncodeError(f"expected {expected_frames} frames, got {count}", path=output)
            out.mux(encoder.flush())
            if track is not None:
                out.mux(track.finish())
        info = verify(tmp, output, expected_frames, options.fps, has_audio=audio is not None)
    logger.info("encoded %d frames into %s", expected_frames, output)
    return dataclasses.replace(info, path=output)


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


def _check_expected_frames(expected_frames: int) -> None:
    if not (isinstance(expected_frames, int) and expected_frames > 0):
        raise InputError(f"expected_frames must be an int > 0, got {expected_frames!r}")
