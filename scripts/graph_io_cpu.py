"""CPU milliseconds per frame that the inference actor spends around the model, with and
without the uint8 graph-I/O wrapper.

The identity model (a Slice) makes the model itself nearly free, so what is timed is the work
``InferenceActor.infer`` does per chunk besides it: without the wrapper, uint8 -> float32 with a
transpose, then x255, clip, transpose, astype and the finite check in NumPy; with it, one
bound call per batch that returns uint8. A 64-frame chunk in batches of ``--batch-size``,
``--repeats`` times, each mode in turn; CPU seconds of the whole process (all threads).

    PYTHONPATH=. python scripts/graph_io_cpu.py --repeats 5 --threads 1
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from lipsync_ray.dev.models import Arch, build_model, save_model
from lipsync_ray.inference import GeneratorSession, Provider, SessionOptions


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    visual = rng.integers(0, 256, (args.frames, 320, 320, 6), dtype=np.uint8)
    audio = rng.standard_normal((args.frames, 32, 16, 16)).astype(np.float32)
    out = np.empty((args.frames, 320, 320, 3), np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        model = save_model(build_model(Arch.IDENTITY), Path(tmp) / "identity.onnx")
        base = SessionOptions(providers=(Provider.CPU,), intra_op_threads=args.threads)
        sessions = {
            "numpy (--no-graph-io)": GeneratorSession(model, replace(base, graph_io=False)),
            "graph io": GeneratorSession(model, base),
        }
        results: dict[str, list[float]] = {name: [] for name in sessions}
        for _ in range(args.repeats + 1):  # the first round warms up, not counted
            for name, session in sessions.items():
                cpu, wall = time.process_time(), time.perf_counter()
                for lo in range(0, args.frames, args.batch_size):
                    hi = min(lo + args.batch_size, args.frames)
                    session.predict(visual[lo:hi], audio[lo:hi], out=out[lo:hi])
                cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
                results[name].append(cpu * 1e3 / args.frames)
        for name, values in results.items():
            ms = np.array(values[1:])
            print(f"{name:24s} CPU {np.median(ms):.3f} ms/frame (min {ms.min():.3f}, "
                  f"max {ms.max():.3f}; {args.repeats} x {args.frames} frames)")  # fmt: skip


if __name__ == "__main__":
    main()
