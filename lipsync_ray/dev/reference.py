"""The single-process scripts that lipsync-ray replaces, as people write them today: the
rivals in ``lipsync-ray bench render --reference``, in two styles.

``ReferenceStyle.JPEG`` (the common script) does everything that script does, and no less:

1. every avatar frame and its crop box preloaded into RAM (the script reads the whole video);
2. the audio features: the same decode, mel spectrogram and audio encoder as a render;
3. one ONNX Runtime session (the CPU provider, or the first usable of ``providers``) with all
   the machine's threads; for each batch of ``batch_size`` output frames: crop, resize and mask
   each frame's face (the script does this per output frame), run the generator;
4. a pool of ``composite_threads`` threads pastes each prediction (the reference hard paste)
   and writes the frame as a JPEG file of quality 95, while the next batch runs;
5. one H.264 + AAC encode of those JPEGs with the audio (what ``ffmpeg -i %08d.jpg -i audio``
   does), with the same x264 settings as the render it is compared with (preset, CRF and
   ``EncodeOptions.x264_params``, so both pay for the same encode), and the encoder's own
   threads.

``ReferenceStyle.THREADED`` is the same script built well, as the fastest single-process
scripts are: the same preloading, features and one session, but ``workers`` threads each take
``batch_size`` frames at a time through crop, generator and paste (ONNX Runtime runs a session
from several threads at once), and the main thread encodes the pasted frames in order straight
from RAM while the workers go on (no temporary JPEGs, no second pass). At most ``4 x workers``
batches are in flight, so its memory is bounded by the preloaded avatar.

Neither has resume, retries or a memory bound in the audio's length: that is what the
comparison is about. ``lipsync-ray reference [--style jpeg|threaded]`` runs one from the
command line and prints its phases as JSON.
"""

from __future__ import annotations

import itertools
import logging
import os
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from enum import Enum
from pathlib import Path

import numpy as np

__all__ = ["ReferenceResult", "ReferenceStyle", "run_reference"]

log = logging.getLogger(__name__)

JPEG_QUALITY = 95


class ReferenceStyle(str, Enum):
    """How the single-process script is built (see the module docstring)."""

    JPEG = "jpeg"  # a paste pool writes JPEG q95 files; one encode of them afterwards
    THREADED = "threaded"  # workers crop, infer and paste; frames encoded from RAM meanwhile


@dataclass(frozen=True)
class ReferenceResult:
    """What the reference did and where its wall time went (seconds per phase)."""

    output: str
    frames: int
    style: str  # ReferenceStyle's value
    provider: str
    threads: int
    # load, features, session, then jpeg: generate (with compositing) and encode; threaded:
    # generate_encode (inference, compositing and encoding overlapped)
    phases_s: dict[str, float]
    wall_s: float  # load to encoded, inside the process (imports not included)
    peak_rss_mb: float

    def to_dict(self) -> dict:
        return asdict(self)


def run_reference(
    avatar: str | Path,
    audio: str | Path,
    output: str | Path,
    *,
    model: str | Path,
    audio_encoder: str | Path,
    batch_size: int = 4,
    composite_threads: int = 4,
    encode=None,
    providers=None,
    style: ReferenceStyle = ReferenceStyle.JPEG,
) -> ReferenceResult:
    """Render ``output`` from ``avatar`` and ``audio`` the way the single-process script does.

    Args:
        composite_threads: JPEG: the paste pool's threads; THREADED: the worker threads.
        style: which script (see the module docstring).
        encode: :class:`~lipsync_ray.encode.EncodeOptions` (preset, CRF, x264 options: the
            render's, default or given); threads are left to the encoder, as ffmpeg does.
        providers: ONNX Runtime providers to try (default: the CPU provider).
    """
    import cv2
    import psutil

    from lipsync_ray import audio as audio_mod
    from lipsync_ray.avatar import Avatar, pingpong_indices
    from lipsync_ray.composite import (
        composite_frame,
        crop_face,
        model_visual_input,
        prediction_to_uint8,
    )
    from lipsync_ray.encode import EncodeOptions, encode_video
    from lipsync_ray.inference import EncoderSession, GeneratorSession, Provider, SessionOptions

    encode = replace(encode or EncodeOptions(), threads=0)
    cpus = os.cpu_count() or 1
    phases: dict[str, float] = {}
    t_start = t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        phases[name] = now - t
        t = now

    bundle = Avatar.open(avatar)
    everything = np.arange(bundle.frame_count)
    frames = [f.copy() for f in bundle.read_frames(everything)]  # preloaded, as the script does
    boxes = bundle.boxes(everything)
    lap("load")

    cpu_only = SessionOptions(providers=(Provider.CPU,))
    encoder = EncoderSession(Path(audio_encoder), cpu_only, cpus=cpus)
    features = audio_mod.compute_features(audio_mod.mel_spectrogram(audio_mod.load_audio(audio)),
                                          encoder)  # fmt: skip
    track = audio_mod.load_audio(audio, sample_rate=48_000)
    n = len(features)
    order = pingpong_indices(n, bundle.frame_count)
    lap("features")

    options = SessionOptions(providers=tuple(providers)) if providers else cpu_only
    session = GeneratorSession(model, options, cpus=cpus)
    lap("session")

    proc = psutil.Process()
    peak_rss = proc.memory_info().rss

    def generate(rows: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        """The crops of output frames ``rows`` and the generator's uint8 predictions."""
        crops = [crop_face(frames[order[i]], boxes[order[i]]) for i in rows]
        visual = model_visual_input(np.stack(crops))
        return crops, prediction_to_uint8(
            session.run(visual, audio_mod.audio_windows(features, rows))
        )

    def paste(i: int, crop: np.ndarray, pred: np.ndarray) -> np.ndarray:
        j = order[i]
        return composite_frame(frames[j], boxes[j], crop, pred)

    batches = [np.arange(lo, min(lo + batch_size, n)) for lo in range(0, n, batch_size)]
    if style is ReferenceStyle.THREADED:

        def work(rows: np.ndarray) -> list[np.ndarray]:
            crops, preds = generate(rows)
            return [paste(int(i), c, p) for i, c, p in zip(rows, crops, preds, strict=True)]

        def in_order(pool: ThreadPoolExecutor) -> Iterator[np.ndarray]:
            nonlocal peak_rss
            window = 4 * composite_threads  # batches in flight: the script's bounded queue
            todo = iter(batches)
            pending = deque(pool.submit(work, rows) for rows in itertools.islice(todo, window))
            while pending:
                done = pending.popleft().result()
                for rows in itertools.islice(todo, 1):
                    pending.append(pool.submit(work, rows))
                peak_rss = max(peak_rss, proc.memory_info().rss)
                yield from done

        with ThreadPoolExecutor(composite_threads) as pool:
            encode_video(in_order(pool), track, 48_000, Path(output), encode, expected_frames=n)
        lap("generate_encode")
    else:
        with tempfile.TemporaryDirectory(prefix="lipsync-reference-") as tmp:

            def paste_jpeg(i: int, crop: np.ndarray, pred: np.ndarray) -> None:
                cv2.imwrite(f"{tmp}/{i:08d}.jpg", paste(i, crop, pred),
                            [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])  # fmt: skip

            with ThreadPoolExecutor(composite_threads) as pool:
                pending = []
                for rows in batches:
                    crops, preds = generate(rows)
                    pending += [
                        pool.submit(paste_jpeg, int(i), c, p)
                        for i, c, p in zip(rows, crops, preds, strict=True)
                    ]
                    if len(pending) > 8 * composite_threads:  # the script's queue is bounded
                        for f in pending:
                            f.result()
                        pending = []
                        peak_rss = max(peak_rss, proc.memory_info().rss)
                for f in pending:
                    f.result()
            lap("generate")
            jpegs = (cv2.imread(f"{tmp}/{i:08d}.jpg") for i in range(n))
            encode_video(jpegs, track, 48_000, Path(output), encode, expected_frames=n)
            lap("encode")
    peak_rss = max(peak_rss, proc.memory_info().rss)
    return ReferenceResult(
        output=str(output),
        frames=n,
        style=ReferenceStyle(style).value,
        provider=session.providers[0],
        threads=session.threads,
        phases_s=phases,
        wall_s=time.perf_counter() - t_start,
        peak_rss_mb=peak_rss / 2**20,
    )
