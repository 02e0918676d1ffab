"""What writing one shard costs (docs/shard-schema.md §5): CPU ms per frame (process time,
median of repeats) of a 64-frame chunk of 1280x720 BGR frames written with ``write_shard`` as
a compositor writes it (raw codec, no checksum: a new file, and over a spare file the
manifest kept), with today's Parquet write options and with the ones before 2026-12-05
(Parquet's default batch of 1,024 values: the whole chunk in one page), next to a memory
copy of the same frames.

    python scripts/shard_write_cost.py [--repeats 9]
"""

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from lipsync_ray import shards
from lipsync_ray.shards import ShardCodec, write_shard
from lipsync_ray.workdir.layout import shard_path
from lipsync_ray.workdir.manifest import keep_spare

FRAMES, HEIGHT, WIDTH = 64, 720, 1280
SPARES = 3  # a compositor's render keeps compositors + 1 released shard files
TODAY = shards.parquet_write_options


def before_options(rows: int) -> dict[str, object]:
    """The write options up to 2026-12-05: today's minus the one-page-per-frame settings."""
    options = TODAY(rows)
    for key in ("write_batch_size", "data_page_size", "write_page_checksum", "write_page_index"):
        options.pop(key)
    return options


def write_ms(root: Path, frames: np.ndarray, *, spare: bool, chunk: int) -> float:
    """CPU ms per frame of one shard write, then the file released as a render releases it."""
    path = shard_path(root, chunk)
    start = time.process_time()
    write_shard(
        path,
        chunk,
        np.arange(len(frames)),
        np.arange(len(frames)),
        frames,
        ShardCodec.RAW,
        "cost",
        root,
        checksum=False,
        reuse_spare=spare,
    )
    ms = (time.process_time() - start) * 1e3 / len(frames)
    if not (spare and keep_spare(path, root, SPARES)):
        path.unlink(missing_ok=True)
    return ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    frames = np.random.default_rng(0).integers(0, 256, (FRAMES, HEIGHT, WIDTH, 3), np.uint8)
    copy = np.empty_like(frames)
    np.copyto(copy, frames)  # faulted in once: the floor is a copy into warm memory
    copies = []
    for _ in range(args.repeats):
        start = time.process_time()
        np.copyto(copy, frames)
        copies.append((time.process_time() - start) * 1e3 / FRAMES)
    print(
        f"{FRAMES} frames of {WIDTH}x{HEIGHT} BGR ({frames.nbytes / 1e6:.0f} MB), "
        f"median of {args.repeats}, CPU ms per frame"
    )
    print(f"memory copy (warm buffer): {statistics.median(copies):.2f}")

    root = Path(tempfile.mkdtemp(prefix="lipsync-shard-cost-"))
    try:
        for spare in (False, True):
            ms: dict[str, list[float]] = {"before": [], "after": []}
            for options in (before_options, TODAY):  # untimed: the spares exist, code is warm
                shards.parquet_write_options = options
                for chunk in range(SPARES):
                    write_ms(root, frames, spare=spare, chunk=chunk)
            for i in range(args.repeats):  # interleaved: the machine's drift hits both sides
                for label, options in (("before", before_options), ("after", TODAY)):
                    shards.parquet_write_options = options
                    ms[label].append(write_ms(root, frames, spare=spare, chunk=i % SPARES))
            before, after = (statistics.median(ms[k]) for k in ("before", "after"))
            where = "over a spare file" if spare else "new file"
            print(f"write_shard, {where}: {before:.2f} before -> {after:.2f} after")
    finally:
        shards.parquet_write_options = TODAY
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
