"""``lipsync-ray bench encode``: the CPU, bit rate and quality of each x264 preset on the
benchmark's footage, encoded as a compositor encodes its chunks."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["EncodeBench", "bench_encode"]


@dataclass(frozen=True)
class EncodeBench:
    """One x264 preset on the benchmark's footage, encoded as a compositor does (one thread,
    64-frame segments from BGR frames)."""

    preset: str
    crf: int
    frames: int
    cpu_ms_per_frame: float  # the encoding process's CPU (BGR→YUV conversion included)
    mbit_per_s: float  # at 25 fps
    psnr_db: float  # mean over frames, against the frames before encoding (Y, U and V)
    worst_psnr_db: float


def bench_encode(
    presets: Sequence[str] = ("ultrafast", "superfast", "veryfast", "faster"),
    *,
    crf: int = 20,
    seconds: float = 10.0,
    size_wh: tuple[int, int] = (1280, 720),
    avatar: str = "photo",
    segment_frames: int = 64,
    work_root: str | Path | None = None,
) -> list[EncodeBench]:
    """CPU, bit rate and quality of each x264 ``preset`` at ``crf`` on generated footage.

    The frames are made first and kept in memory; each preset then encodes them in segments of
    ``segment_frames`` (as compositors encode chunks) with one thread, timed by this process's
    CPU, and the segments are decoded and compared with the frames (PSNR over all planes of
    the BGR frames, so chroma subsampling counts against every preset alike).
    """
    import av

    from lipsync_ray.dev.synthetic import draw_face_frames, photo_frames
    from lipsync_ray.encode import EncodeOptions, encode_segment

    n = max(1, round(seconds * 25))
    if avatar == "photo":
        frames = list(photo_frames(n, size_wh)[0])
    else:
        frames = list(draw_face_frames(n, size_wh))
    results = []
    with tempfile.TemporaryDirectory(prefix="lipsync-bench-encode-", dir=work_root) as tmp:
        for preset in presets:
            options = EncodeOptions(crf=crf, preset=preset, threads=1)
            paths, c0 = [], time.process_time()
            for k, lo in enumerate(range(0, n, segment_frames)):
                path = Path(tmp) / f"{preset}-{k:04d}.mp4"
                encode_segment(frames[lo : lo + segment_frames], path, options)
                paths.append(path)
            cpu = time.process_time() - c0
            size = sum(p.stat().st_size for p in paths)
            psnrs, i = [], 0
            for path in paths:
                with av.open(str(path)) as container:
                    for decoded in container.decode(video=0):
                        got = decoded.to_ndarray(format="bgr24").astype(np.float64)
                        mse = np.mean((got - frames[i]) ** 2)
                        psnrs.append(10 * np.log10(255.0**2 / max(mse, 1e-12)))
                        i += 1
                path.unlink()
            results.append(
                EncodeBench(
                    preset=preset,
                    crf=crf,
                    frames=n,
                    cpu_ms_per_frame=1000.0 * cpu / n,
                    mbit_per_s=size * 8 / (n / 25) / 1e6,
                    psnr_db=float(np.mean(psnrs)),
                    worst_psnr_db=float(np.min(psnrs)),
                )
            )
    return results
