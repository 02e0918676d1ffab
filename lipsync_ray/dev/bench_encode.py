"""``lipsync-ray bench encode``: the CPU, bit rate and quality of x264 settings on the
benchmark's footage, encoded as a compositor encodes its chunks.

Plain, it measures the presets given; with ``--table`` (:data:`TABLE`) a set of candidate
settings, presets and x264 options on top of them, from which the render's default
(``options.DEFAULT_X264_PARAMS``) was chosen with :func:`cheapest_equivalent`.

Quality is measured against the encoder's own input, the yuv420p planes that
``encoders.bgr_to_yuv420p`` makes of the frames (the BGR -> YUV conversion and chroma
subsampling are the same for every setting, so leaving them out keeps small differences
visible): PSNR over all three planes (the mean squared error of every sample, as x264 and
FFmpeg average them) and SSIM of the luma plane (:func:`ssim_luma`).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "BASELINE",
    "TABLE",
    "EncodeBench",
    "EncodeSetting",
    "bench_encode",
    "cheapest_equivalent",
    "ssim_luma",
]


@dataclass(frozen=True)
class EncodeSetting:
    """An x264 preset and the options on top of it (``EncodeOptions.x264_params``)."""

    preset: str
    x264_params: str = ""

    @property
    def label(self) -> str:
        return f"{self.preset} {self.x264_params}" if self.x264_params else self.preset


# Today's setting before the table (the preset alone): what the candidates are measured against.
BASELINE = EncodeSetting("veryfast")

# The candidates of `bench encode --table`. veryfast is already x264's ref=1, trellis=0,
# subme=2, rc-lookahead=10 with mb-tree; superfast is veryfast with me=dia, partitions
# i8x8,i4x4, subme=1 and no lookahead (so no mb-tree), which on noisy footage costs many bits
# (superfast with its mb-tree and lookahead back is "veryfast me=dia:partitions=i8x8,i4x4:
# subme=1", measured here under that name). The variants take veryfast's search, lookahead and
# analysis apart one option at a time, then combine the ones that cost no bits.
TABLE: tuple[EncodeSetting, ...] = (
    EncodeSetting("ultrafast"),
    EncodeSetting("superfast"),
    BASELINE,
    EncodeSetting("veryfast", "me=dia"),
    EncodeSetting("veryfast", "partitions=i8x8,i4x4"),
    EncodeSetting("veryfast", "me=dia:partitions=i8x8,i4x4"),
    EncodeSetting("veryfast", "me=dia:partitions=i8x8,i4x4:subme=1"),
    EncodeSetting("veryfast", "subme=1"),
    EncodeSetting("veryfast", "rc-lookahead=5"),
    EncodeSetting("veryfast", "me=dia:partitions=i8x8,i4x4:rc-lookahead=5"),
    EncodeSetting("veryfast", "weightp=0"),
    EncodeSetting("veryfast", "me=dia:partitions=i8x8,i4x4:weightp=0"),
    EncodeSetting("veryfast", "b-adapt=0"),
    EncodeSetting("veryfast", "aq-mode=0"),
    EncodeSetting("veryfast", "bframes=0"),
    EncodeSetting("veryfast", "mbtree=0"),
    EncodeSetting("faster"),
)


@dataclass(frozen=True)
class EncodeBench:
    """One x264 setting on the benchmark's footage, encoded as a compositor does (one thread,
    64-frame segments from BGR frames)."""

    preset: str
    x264_params: str
    crf: int
    frames: int
    repeats: int
    cpu_ms_per_frame: float  # median over the repeats: the process's CPU, BGR->YUV included
    cpu_ms_runs: tuple[float, ...]  # every repeat's, in order
    mbit_per_s: float  # at 25 fps
    psnr_db: float  # mean over frames, yuv420p planes against the encoder's input
    worst_psnr_db: float
    ssim: float  # mean over frames, luma plane against the encoder's input
    worst_ssim: float

    @property
    def label(self) -> str:
        return EncodeSetting(self.preset, self.x264_params).label


def bench_encode(
    settings: Sequence[EncodeSetting | str] = ("ultrafast", "superfast", "veryfast", "faster"),
    *,
    crf: int = 20,
    seconds: float = 10.0,
    frames: int | None = None,
    repeats: int = 1,
    size_wh: tuple[int, int] = (1280, 720),
    avatar: str = "photo",
    segment_frames: int = 64,
    work_root: str | Path | None = None,
) -> list[EncodeBench]:
    """CPU, bit rate and quality of each x264 setting (a preset name or an
    :class:`EncodeSetting`) at ``crf`` on generated footage.

    The frames (``frames``, or ``seconds`` at 25 fps) are made first and kept in memory;
    each setting then encodes them in segments of ``segment_frames`` (as compositors encode
    chunks) with one thread, timed by this process's CPU as a compositor times its encode
    stage. The repeats run round-robin over the settings, so a load that comes and goes on
    the machine falls on all of them alike; the CPU reported is the median. The first
    repeat's segments are decoded and compared with the encoder's input (module docstring);
    the others must come out byte-identical (one thread: x264 is deterministic).
    """
    from lipsync_ray.dev.synthetic import draw_face_frames, photo_frames
    from lipsync_ray.encode import EncodeOptions, bgr_to_yuv420p, encode_segment

    chosen = [s if isinstance(s, EncodeSetting) else EncodeSetting(s) for s in settings]
    options = [
        EncodeOptions(crf=crf, preset=s.preset, threads=1, x264_params=s.x264_params)
        for s in chosen
    ]  # checked before the footage is made
    n = frames if frames is not None else max(1, round(seconds * 25))
    if avatar == "photo":
        footage = list(photo_frames(n, size_wh)[0])
    else:
        footage = list(draw_face_frames(n, size_wh))
    cpu: list[list[float]] = [[] for _ in chosen]
    sizes: list[list[int]] = [[] for _ in chosen]
    quality: list[tuple[list[float], list[float]]] = []
    with tempfile.TemporaryDirectory(prefix="lipsync-bench-encode-", dir=work_root) as tmp:
        for repeat in range(repeats):
            for i, opts in enumerate(options):
                paths, c0 = [], time.process_time()
                for k, lo in enumerate(range(0, n, segment_frames)):
                    path = Path(tmp) / f"{i:02d}-{k:04d}.mp4"
                    encode_segment(footage[lo : lo + segment_frames], path, opts)
                    paths.append(path)
                cpu[i].append(time.process_time() - c0)
                sizes[i].append(sum(p.stat().st_size for p in paths))
                if repeat == 0:
                    quality.append(_quality(paths, footage, bgr_to_yuv420p))
                for path in paths:
                    path.unlink()
    results = []
    for s, runs, size, (psnrs, ssims) in zip(chosen, cpu, sizes, quality, strict=True):
        if len(set(size)) != 1:
            raise RuntimeError(f"{s.label}: repeats differ in size {size}: not deterministic")
        results.append(
            EncodeBench(
                preset=s.preset,
                x264_params=s.x264_params,
                crf=crf,
                frames=n,
                repeats=repeats,
                cpu_ms_per_frame=1000.0 * statistics.median(runs) / n,
                cpu_ms_runs=tuple(1000.0 * c / n for c in runs),
                mbit_per_s=size[0] * 8 / (n / 25) / 1e6,
                psnr_db=float(np.mean(psnrs)),
                worst_psnr_db=float(np.min(psnrs)),
                ssim=float(np.mean(ssims)),
                worst_ssim=float(np.min(ssims)),
            )
        )
    return results


def _quality(paths: Sequence[Path], footage: Sequence[np.ndarray], to_yuv) -> tuple[list, list]:
    """PSNR (yuv420p) and luma SSIM of each decoded frame of ``paths`` against ``footage``."""
    import av

    psnrs, ssims, i = [], [], 0
    h = footage[0].shape[0]
    for path in paths:
        with av.open(str(path)) as container:
            for decoded in container.decode(video=0):
                got = decoded.to_ndarray(format="yuv420p")
                want = to_yuv(footage[i])
                diff = got.astype(np.float32) - want
                mse = float(np.mean(diff * diff))
                psnrs.append(10 * np.log10(255.0**2 / max(mse, 1e-12)))
                ssims.append(ssim_luma(got[:h], want[:h]))
                i += 1
    if i != len(footage):
        raise RuntimeError(f"expected {len(footage)} decoded frames, got {i}")
    return psnrs, ssims


# SSIM's constants (Wang et al. 2004): an 11x11 Gaussian window of sigma 1.5, K1 0.01, K2 0.03.
_SSIM_SIGMA = 1.5
_SSIM_RADIUS = 5  # the window reaches 3.5 sigma, as scikit-image's gaussian_weights does
_C1 = (0.01 * 255) ** 2
_C2 = (0.03 * 255) ** 2


def ssim_luma(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM of two uint8 (H, W) planes, the Gaussian-window SSIM of Wang et al. (2004)
    with population statistics, averaged away from a 5-pixel border: what
    ``skimage.metrics.structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=255)`` computes, to 1e-4 (float32 sums), at a
    fraction of its cost (OpenCV's separable blur). Inputs are not mutated."""
    import cv2

    x, y = a.astype(np.float32), b.astype(np.float32)
    size = 2 * _SSIM_RADIUS + 1

    def blur(img: np.ndarray) -> np.ndarray:
        return cv2.GaussianBlur(img, (size, size), _SSIM_SIGMA)

    mx, my = blur(x), blur(y)
    vx = blur(x * x) - mx * mx
    vy = blur(y * y) - my * my
    cxy = blur(x * y) - mx * my
    num = (2 * mx * my + _C1) * (2 * cxy + _C2)
    den = (mx * mx + my * my + _C1) * (vx + vy + _C2)
    r = _SSIM_RADIUS
    return float(np.mean((num / den)[r:-r, r:-r], dtype=np.float64))


def cheapest_equivalent(
    results: Sequence[EncodeBench],
    baseline: EncodeSetting = BASELINE,
    *,
    rate_tolerance: float = 0.05,
    psnr_tolerance_db: float = 0.1,
    ssim_tolerance: float = 0.001,
    tie: float = 0.03,
) -> EncodeBench:
    """The cheapest result (median CPU) whose bit rate is within ``rate_tolerance`` of the
    baseline's (either way) and whose mean PSNR and SSIM are at most the tolerances below
    it; the baseline itself when nothing else qualifies.

    CPU figures closer than ``tie`` times the baseline's CPU count as equal (on a shared
    machine the repeats of one setting spread wider than that): among the qualifying results
    that close to the cheapest, the one with the fewest x264 options wins, so no option is
    taken for a saving the measurement cannot tell from noise.

    Raises:
        ValueError: the baseline is not among ``results``.
    """
    from lipsync_ray.options import parse_x264_params

    base = next((r for r in results if EncodeSetting(r.preset, r.x264_params) == baseline), None)
    if base is None:
        raise ValueError(f"expected the baseline {baseline.label!r} among the results")
    fits = [
        r
        for r in results
        if abs(r.mbit_per_s / base.mbit_per_s - 1) <= rate_tolerance
        and r.psnr_db >= base.psnr_db - psnr_tolerance_db
        and r.ssim >= base.ssim - ssim_tolerance
    ]
    cheapest = min(r.cpu_ms_per_frame for r in fits)
    tied = [r for r in fits if r.cpu_ms_per_frame <= cheapest + tie * base.cpu_ms_per_frame]
    return min(tied, key=lambda r: (len(parse_x264_params(r.x264_params)), r.cpu_ms_per_frame))
