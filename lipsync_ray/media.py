"""Media files: what a file holds (probe), how an output file is made whole (written beside
its path, verified, renamed), and the AAC audio track that both encode paths mux.

::

    MediaInfo, probe(path)     the first video and audio stream, frames counted by demuxing
    verify(tmp, output, ...)   read a just-written file back: frames, streams, durations
    atomic_output(path)        fileio's atomic write, plus the encode stage's error rules
    remove_partials(path)      the temp files a killed encoder left beside ``path``
    open_input, container_format, mux_options
                               opening a file, the muxer for a suffix, and its options
    AudioTrack, check_audio    AAC over the whole timeline, fed as the video is muxed
    encode_audio               the same AAC packets encoded ahead, apart from any container
                               (a thread does it while the last chunks render)

:mod:`lipsync_ray.encode` writes through these; the video encoders are
:mod:`lipsync_ray.encoders`. This module imports neither.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Iterator
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from lipsync_ray.errors import EncodeError, InputError, LipsyncError
from lipsync_ray.fileio import atomic_path, partials
from lipsync_ray.options import EncodeOptions

__all__ = [
    "AAC_FRAME_SAMPLES",
    "AAC_SAMPLE_RATE",
    "AudioTrack",
    "EncodedAudio",
    "MediaInfo",
    "atomic_output",
    "check_audio",
    "container_format",
    "encode_audio",
    "mux_options",
    "open_input",
    "probe",
    "remove_partials",
    "verify",
]

AAC_SAMPLE_RATE = 48_000  # Hz; 48000 / 25 = 1920 samples per video frame, exact
AAC_FRAME_SAMPLES = 1024  # samples per AAC frame (AAC-LC)
_AUDIO_CHUNK_S = 1  # seconds of input audio pushed through the resampler at a time

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


def probe(path: str | Path) -> MediaInfo:
    """Describe a media file by demuxing all of its packets.

    Raises:
        InputError: the file is missing, unreadable, or has no video stream.
    """
    info, _, _ = _probe_streams(Path(path))
    return info


# --------------------------------------------------------------------------- files


def _probe_streams(path: Path) -> tuple[MediaInfo, int, int]:
    """Probe; also return the number of video and audio streams."""
    with open_input(path, InputError) as container:
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


def verify(tmp: Path, output: Path, frames: int, fps: int, *, has_audio: bool) -> MediaInfo:
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


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """:func:`lipsync_ray.fileio.atomic_path` with the encode stage's error rules: yield a temp
    path beside ``path``, renamed onto it on success and removed on any failure
    (KeyboardInterrupt included), so a previous output is never lost to a render that did not
    finish.

    What it adds: a missing output directory is an InputError before anything is written, and
    any failure that is not already a LipsyncError (an FFmpeg error, a rename refused because
    a directory sits at ``path``) comes out as an EncodeError naming ``path``.
    """
    if not path.parent.is_dir():
        raise InputError("expected an existing output directory", path=path.parent)
    try:
        with atomic_path(path) as tmp:
            yield tmp
    except LipsyncError:
        raise
    except Exception as exc:
        raise EncodeError(f"encoding failed: {exc}", path=path) from exc


def open_input(path: Path, error: type[LipsyncError]) -> av.container.InputContainer:
    if not path.is_file():
        raise error("expected an existing media file, got nothing there", path=path)
    try:
        return av.open(str(path), "r")
    except (av.FFmpegError, UnicodeDecodeError) as exc:
        raise error(f"cannot open as media: {exc}", path=path) from exc


def container_format(path: Path) -> str:
    fmt = _CONTAINER_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise InputError(
            f"expected an output suffix in {sorted(_CONTAINER_FORMATS)}, got {path.suffix!r}",
            path=path,
        )
    return fmt


def mux_options(fmt: str) -> dict[str, str]:
    # The index (moov) goes to the front so players can start before the whole file is read.
    return {"movflags": "+faststart"} if fmt in ("mp4", "mov") else {}


# --------------------------------------------------------------------------- audio


@dataclasses.dataclass(frozen=True)
class EncodedAudio:
    """A whole AAC track encoded ahead by :func:`encode_audio`, for :class:`AudioTrack` to mux.

    ``packets`` pairs every packet with the samples the encoder had been given before the
    block that produced it: the track hands them out in the order and at the points in the
    video at which encoding there would have produced them, so the file is byte for byte the
    one that encoding while muxing writes."""

    packets: tuple[tuple[int, av.Packet], ...]
    video_frames: int
    fps: int
    bit_rate: int


def encode_audio(
    audio: np.ndarray, sample_rate: int, video_frames: int, options: EncodeOptions
) -> EncodedAudio:
    """Encode the AAC track of ``video_frames`` frames from float32 mono ``audio``, as
    :class:`AudioTrack` would while muxing, with an encoder of its own (no container)."""
    audio = check_audio(audio, sample_rate)
    encoder = _aac_encoder(av.CodecContext.create("aac", "w"), options)
    packets: list[tuple[int, av.Packet]] = []
    blocks = _Blocks(audio, sample_rate, video_frames, options.fps)
    for before, frame in blocks:
        packets += [(before, p) for p in encoder.encode(frame)]
    packets += [(blocks.total, p) for p in encoder.encode(None)]
    return EncodedAudio(tuple(packets), video_frames, options.fps, options.audio_bitrate)


class AudioTrack:
    """AAC encoding of the whole timeline, fed lazily so the muxer can interleave.

    The input is resampled to 48 kHz fltp and trimmed or zero-padded to exactly
    ``video_frames / fps`` seconds; AAC frames of 1024 samples carry pts in samples. Given
    :class:`EncodedAudio` (made for the same frames and settings) instead of samples, the
    track muxes those packets and encodes nothing.
    """

    def __init__(
        self,
        out: av.container.OutputContainer,
        audio: np.ndarray | EncodedAudio,
        sample_rate: int,
        video_frames: int,
        options: EncodeOptions,
    ) -> None:
        self._stream = _aac_encoder(out.add_stream("aac", rate=AAC_SAMPLE_RATE, layout="mono"),
                                    options)  # fmt: skip
        self._fps = options.fps
        self._total = video_frames * AAC_SAMPLE_RATE // options.fps
        self._encoded: Iterator[tuple[int, av.Packet]] | None = None
        self._next: tuple[int, av.Packet] | None = None
        if isinstance(audio, EncodedAudio):
            made_for = (audio.video_frames, audio.fps, audio.bit_rate)
            if made_for != (video_frames, options.fps, options.audio_bitrate):
                raise InputError(
                    f"encoded audio for (frames, fps, bit rate) {made_for}, expected "
                    f"{(video_frames, options.fps, options.audio_bitrate)}"
                )
            self._encoded = iter(audio.packets)
            self._next = next(self._encoded, None)
        else:
            self._blocks = _Blocks(audio, sample_rate, video_frames, options.fps)

    def packets_until(self, video_frames: int) -> list[av.Packet]:
        """Encode the audio that plays before ``video_frames`` frames of video end."""
        limit = min(self._total, video_frames * AAC_SAMPLE_RATE // self._fps)
        if self._encoded is not None:
            return self._stored(limit)
        packets: list[av.Packet] = []
        for _, frame in self._blocks.until(limit):
            packets += self._stream.encode(frame)
        return packets

    def finish(self) -> list[av.Packet]:
        if self._encoded is not None:
            return self._stored(None)
        packets: list[av.Packet] = []
        for _, frame in self._blocks:
            packets += self._stream.encode(frame)
        assert self._blocks.sent == self._total, (self._blocks.sent, self._total)
        return packets + self._stream.encode(None)  # the one flush of the AAC encoder

    def _stored(self, limit: int | None) -> list[av.Packet]:
        """The encoded packets of the blocks that start before ``limit`` samples (all: None)."""
        packets = []
        while self._next is not None and (limit is None or self._next[0] < limit):
            packet = self._next[1]
            packet.stream = self._stream
            packets.append(packet)
            self._next = next(self._encoded, None)
        return packets


def _aac_encoder(target, options: EncodeOptions):
    """``target`` (a stream or a codec context) set up as the track's AAC-LC encoder."""
    context = getattr(target, "codec_context", target)
    if context is target:  # a bare context; a stream takes these from add_stream
        context.sample_rate, context.layout, context.format = AAC_SAMPLE_RATE, "mono", "fltp"
    target.bit_rate = options.audio_bitrate
    context.time_base = Fraction(1, AAC_SAMPLE_RATE)
    return target


class _Blocks:
    """The track's AAC frames: ``(samples before it, AudioFrame)``, exactly ``total`` samples
    (``video_frames / fps`` seconds at 48 kHz) of ``audio`` resampled, cut in 1024s."""

    def __init__(self, audio: np.ndarray, sample_rate: int, video_frames: int, fps: int):
        self.total = video_frames * AAC_SAMPLE_RATE // fps
        self._blocks = _aac_blocks(_resampled(audio, sample_rate, self.total))
        self.sent = 0

    def __iter__(self) -> Iterator[tuple[int, av.AudioFrame]]:
        return self.until(None)

    def until(self, limit: int | None) -> Iterator[tuple[int, av.AudioFrame]]:
        """The frames that start before ``limit`` samples (all: None)."""
        while limit is None or self.sent < limit:
            block = next(self._blocks, None)
            if block is None:
                return
            frame = av.AudioFrame.from_ndarray(block[None, :], format="fltp", layout="mono")
            frame.sample_rate = AAC_SAMPLE_RATE
            frame.pts = before = self.sent
            frame.time_base = Fraction(1, AAC_SAMPLE_RATE)
            self.sent += block.shape[0]
            yield before, frame


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


def check_audio(
    audio: np.ndarray | EncodedAudio | None, sample_rate: int
) -> np.ndarray | EncodedAudio | None:
    if audio is None or isinstance(audio, EncodedAudio):  # EncodedAudio: checked when made
        return audio
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
