"""What the avatar's content digest costs (docs/workdir.md §7): prepare's hashing of the rows
as they are written, the stamp check every render pays, and a rehash, cold and warm, measured
on a 10 s 1280x720 bundle and scaled to 5 minutes (hashing is linear in bytes).

    python scripts/digest_cost.py
"""

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from lipsync_ray import avatar_digest
from lipsync_ray.dev.synthetic import make_demo_avatar

root = Path(tempfile.mkdtemp(prefix="lipsync-digest-")) / "avatar"
t = time.perf_counter()
av = make_demo_avatar(root, seconds=10.0, size_wh=(1280, 720), seed=0)
print(f"prepare (make_demo_avatar) 250 frames: {time.perf_counter() - t:.1f} s")
meta = json.loads((root / "avatar.json").read_text())
nbytes = sum((root / f).stat().st_size for f in meta["files"].values())
print(f"arrays: {nbytes / 1e9:.3f} GB for {av.frame_count} frames")

# the stamp check (what every render pays)
n = 200
t = time.perf_counter()
for _ in range(n):
    avatar_digest.content_digests(root, meta, root / "avatar.json")
print(f"stamp check: {(time.perf_counter() - t) / n * 1e3:.3f} ms")


def drop_cache():
    for f in meta["files"].values():
        fd = os.open(root / f, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


for label, cold in (("cold", True), ("warm", False), ("warm", False)):
    if cold:
        drop_cache()
    t, c = time.perf_counter(), time.process_time()
    for f in meta["files"].values():
        avatar_digest.array_sha256(root / f)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    print(
        f"rehash {label}: {wall:.2f} s wall, {cpu:.2f} s CPU, {nbytes / wall / 1e9:.2f} GB/s; "
        f"x{7500 / av.frame_count:.0f} -> {wall * 7500 / av.frame_count:.0f} s for 7500 frames"
    )

# prepare's added cost: SHA-256 of the rows as they are written, in memory
buf = np.random.default_rng(0).integers(0, 256, 256 << 20, np.uint8)
t = time.process_time()
hashlib.sha256(buf.data).hexdigest()
rate = buf.nbytes / (time.process_time() - t)
print(f"sha256 in memory: {rate / 1e9:.2f} GB/s -> {27.76e9 / rate:.0f} s CPU for 7500 frames")

shutil.rmtree(root.parent)  # the 0.9 GB bundle
