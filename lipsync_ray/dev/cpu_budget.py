"""Where a render's CPU goes: the whole process tree's CPU per frame, by process and stage.

``bench render`` samples the CPU time of every process of ``lipsync-ray render`` (driver,
actors, Ray's daemons) while it runs (:class:`lipsync_ray.dev.bench.ProcessTreeMonitor`); the
run report says what each stage of the driver and the actors cost (measured inside them) and
when the chunks phase ran. :func:`cpu_table` puts the two together:

- every kind of process is split in time at the chunks phase: **start-up** (the process's
  start to the first chunk: imports, Ray's start, sessions, audio features), **steady**
  (the chunks phase: what each frame costs) and **after** (join, shutdown), the boundaries
  interpolated between the monitor's samples around the phase's start and end;
- the driver's and the actors' CPU is split by stage in the period the stage runs in,
  and "other/transport" is the process's CPU minus its stages (Ray's task and object
  transport, scheduling, idle polling, start-up work outside any stage).

A sampled process's CPU is a lower bound (an exiting process loses the CPU since its last
sample, and a boundary interpolates over a sampling interval), while a stage's is
measured exactly inside the process. Where a process's period comes out below its stages,
it is raised to them and the difference reported as ``sampling_shortfall_s``, so that the
parts always sum to the whole and no "other" is negative.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from lipsync_ray.errors import InputError

__all__ = [
    "PERIODS",
    "STAGE_PLACE",
    "CpuRow",
    "CpuTable",
    "chunks_window",
    "cpu_table",
    "split_periods",
]

DRIVER = "driver"
INFERENCE = "ray::InferenceActor"
COMPOSITOR = "ray::CompositorActor"
OTHER = "other/transport"

# start-up: before the chunks phase; steady: in it; after: the join and the shutdown.
PERIODS = ("startup", "steady", "after")

# Where each stage of the run report (lipsync_ray.report.STAGES) runs: the kind of process,
# and the period of the render.
STAGE_PLACE: dict[str, tuple[str, str]] = {
    "features": (DRIVER, "startup"),
    "model_input": (INFERENCE, "steady"),
    "inference": (INFERENCE, "steady"),
    "decode": (COMPOSITOR, "steady"),
    "composite": (COMPOSITOR, "steady"),
    "shard_write": (COMPOSITOR, "steady"),
    "shard_read": (COMPOSITOR, "steady"),
    "encode": (COMPOSITOR, "steady"),
    "upload": (COMPOSITOR, "steady"),
    "download": (DRIVER, "after"),
    "encode_join": (DRIVER, "after"),
    # started once the last chunk is submitted: it runs beside the last chunks
    "encode_audio": (DRIVER, "steady"),
}


@dataclass(frozen=True)
class CpuRow:
    """One line of the table: a kind of process (``stage`` empty), or one of its stages, or
    its "other/transport". Seconds of CPU per period, and per frame."""

    process: str
    stage: str
    startup_s: float
    steady_s: float
    after_s: float
    frames: int

    @property
    def total_s(self) -> float:
        return self.startup_s + self.steady_s + self.after_s

    @property
    def steady_ms_per_frame(self) -> float:
        return 1000.0 * self.steady_s / max(self.frames, 1)

    @property
    def total_ms_per_frame(self) -> float:
        return 1000.0 * self.total_s / max(self.frames, 1)

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "total_s": self.total_s,
            "steady_ms_per_frame": self.steady_ms_per_frame,
            "total_ms_per_frame": self.total_ms_per_frame,
        }


@dataclass(frozen=True)
class CpuTable:
    """The whole tree's CPU: ``rows`` are each process kind (most CPU first) followed by its
    stages and "other/transport" where it has stages; ``tree`` is their sum."""

    frames: int
    rows: tuple[CpuRow, ...]
    tree: CpuRow
    sampling_shortfall_s: float  # added to sampled processes to cover their measured stages

    def processes(self) -> tuple[CpuRow, ...]:
        return tuple(r for r in self.rows if not r.stage)

    def parts(self, process: str) -> tuple[CpuRow, ...]:
        return tuple(r for r in self.rows if r.process == process and r.stage)

    def to_dict(self) -> dict:
        return {
            "frames": self.frames,
            "rows": [r.to_dict() for r in self.rows],
            "tree": self.tree.to_dict(),
            "sampling_shortfall_s": self.sampling_shortfall_s,
        }


def chunks_window(phases_s: Mapping[str, float]) -> tuple[float, float]:
    """(start, end) of the chunks phase in epoch seconds, from a run report's ``phases_s``:
    the phases follow each other from ``started_at`` in the order recorded, but for
    ``ray_init``, which runs inside ``start``."""
    if "chunks" not in phases_s or "started_at" not in phases_s:
        raise InputError(f"expected the chunks phase and started_at, got {sorted(phases_s)}")
    start = float(phases_s["started_at"])
    for name, seconds in phases_s.items():
        if name == "chunks":
            return start, start + float(seconds)
        if name != "ray_init" and not name.endswith("_at"):
            start += float(seconds)
    raise AssertionError("unreachable")


def _at(samples: Sequence[tuple[float, Mapping[str, float]]], at: float) -> dict[str, float]:
    """Each process's cumulative CPU at ``at``, interpolated between the two samples around
    it (the first or last sample outside them; a process not yet seen has 0)."""
    if not samples:
        return {}
    ordered = sorted(samples, key=lambda s: s[0])
    if at <= ordered[0][0]:
        return dict(ordered[0][1])
    for (t0, before), (t1, after) in itertools.pairwise(ordered):
        if t0 <= at <= t1:
            w = (at - t0) / (t1 - t0) if t1 > t0 else 1.0
            names = {**before, **after}
            return {n: (1 - w) * before.get(n, 0.0) + w * after.get(n, 0.0) for n in names}
    return dict(ordered[-1][1])


def split_periods(
    samples: Sequence[tuple[float, Mapping[str, float]]],
    total: Mapping[str, float],
    chunks_start: float,
    chunks_end: float,
) -> dict[str, dict[str, float]]:
    """CPU seconds per kind of process and period, from cumulative samples ``(epoch
    seconds, {process: CPU seconds since the start})`` and the final ``total``: start-up up to
    ``chunks_start``, steady up to ``chunks_end``, after to the end, each boundary
    interpolated between the samples around it. Cumulative CPU never falls, so a period below
    zero (a sample above the final figure) counts as zero, the later period absorbing it."""
    if chunks_end < chunks_start:
        raise InputError(f"chunks phase ends at {chunks_end} before it starts at {chunks_start}")
    at_start, at_end = _at(samples, chunks_start), _at(samples, chunks_end)
    out = {}
    for process, cpu in total.items():
        whole = max(cpu, 0.0)
        first = min(max(at_start.get(process, 0.0), 0.0), whole)
        second = min(max(at_end.get(process, 0.0), first), whole)
        out[process] = {"startup": first, "steady": second - first, "after": whole - second}
    return out


def cpu_table(
    periods: Mapping[str, Mapping[str, float]],
    stage_cpu_ms_per_frame: Mapping[str, float],
    frames: int,
) -> CpuTable:
    """The table from :func:`split_periods`' CPU seconds per process and period, and the run
    report's stage CPU (ms per frame over ``frames``; a stage not in :data:`STAGE_PLACE`
    counts in the driver's steady state)."""
    if frames <= 0:
        raise InputError(f"expected a positive frame count, got {frames}")
    stages: dict[str, dict[str, dict[str, float]]] = {}
    for stage, ms in stage_cpu_ms_per_frame.items():
        process, period = STAGE_PLACE.get(stage, (DRIVER, "steady"))
        seconds = {p: 0.0 for p in PERIODS}
        seconds[period] = max(ms, 0.0) * frames / 1000.0
        stages.setdefault(process, {})[stage] = seconds
    shortfall = 0.0
    blocks: list[tuple[CpuRow, list[CpuRow]]] = []
    for process in {**periods, **stages}:
        sampled = periods.get(process, {})
        own = stages.get(process, {})
        if not own and not any(v > 0 for v in sampled.values()):
            continue  # nothing to show (the monitor's own thread, outside the tree)
        whole, other = {}, {}
        for p in PERIODS:
            staged = sum(s[p] for s in own.values())
            have = max(sampled.get(p, 0.0), 0.0)
            shortfall += max(staged - have, 0.0)
            whole[p] = max(have, staged)
            other[p] = whole[p] - staged
        row = CpuRow(process, "", whole["startup"], whole["steady"], whole["after"], frames)
        parts = [
            CpuRow(process, stage, s["startup"], s["steady"], s["after"], frames)
            for stage, s in own.items()
        ]
        if parts:
            parts.append(CpuRow(process, OTHER, *(other[p] for p in PERIODS), frames))
        blocks.append((row, parts))
    blocks.sort(key=lambda b: -b[0].total_s)
    rows = tuple(r for row, parts in blocks for r in (row, *parts))
    tree = CpuRow(
        "whole tree",
        "",
        *(sum(getattr(row, f"{p}_s") for row, _ in blocks) for p in PERIODS),
        frames,
    )
    return CpuTable(frames=frames, rows=rows, tree=tree, sampling_shortfall_s=shortfall)
