"""Benchmarks as programs: bare ONNX Runtime inference, the denominator of every speed claim."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lipsync_ray.inference import GeneratorSession, Provider, SessionOptions

__all__ = ["InferenceBench", "bench_inference"]


@dataclass(frozen=True)
class InferenceBench:
    """Bare generator throughput at one batch size."""

    batch: int
    iterations: int
    ms_per_frame: float
    fps: float
    threads: int
    provider: str


def _inputs(batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    visual = rng.integers(0, 256, size=(batch, 320, 320, 6), dtype=np.uint8)
    audio = rng.standard_normal((batch, 32, 16, 16)).astype(np.float32)
    return visual, audio


def bench_inference(
    model: str | Path,
    batches: Sequence[int] = (1, 4, 8),
    *,
    threads: int = 0,
    min_seconds: float = 3.0,
    min_iterations: int = 3,
    options: SessionOptions | None = None,
) -> list[InferenceBench]:
    """Time ``GeneratorSession.run`` (uint8 → float conversion included) per batch size.

    Each batch size gets one warm-up call, then runs until both ``min_seconds`` and
    ``min_iterations`` are reached. ``threads`` 0 means one per CPU of this machine.
    """
    import os

    cpus = threads or os.cpu_count() or 1
    options = options or SessionOptions(providers=(Provider.CPU,))
    session = GeneratorSession(model, options, cpus=cpus)
    results = []
    for batch in batches:
        visual, audio = _inputs(batch)
        session.run(visual, audio)  # warm-up: allocations, kernel selection
        iterations, elapsed = 0, 0.0
        while elapsed < min_seconds or iterations < min_iterations:
            t0 = time.perf_counter()
            session.run(visual, audio)
            elapsed += time.perf_counter() - t0
            iterations += 1
        frames = iterations * batch
        results.append(
            InferenceBench(
                batch=batch,
                iterations=iterations,
                ms_per_frame=1000.0 * elapsed / frames,
                fps=frames / elapsed,
                threads=session.threads,
                provider=session.providers[0],
            )
        )
    return results
