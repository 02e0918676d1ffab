"""The fingerprint of a render: a hash of everything that decides the pixels of its shards and
segments. A work directory holds the chunks of one fingerprint (its manifest says which), so a
resume never mixes two renders.

The avatar's part is :func:`avatar_identity`: its ``avatar.json`` and the names and sizes of
its files, cheap enough for every render. (The precision cache keys the avatar by the pixels
of the frames its gate uses instead, :mod:`lipsync_ray.precision`: a reduced model is only
reused for the frames it was measured on. The two are kept apart on purpose: making one of
them the other would rename every existing cache entry or invalidate every work directory.)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from lipsync_ray.avatar import META_NAME
from lipsync_ray.config import PoolConfig, RenderConfig
from lipsync_ray.fileio import file_sha256

__all__ = ["avatar_identity", "render_fingerprint"]


def avatar_identity(bundle: str | Path) -> str:
    """Hex SHA-256 of the avatar bundle's metadata file and the names and sizes of its files."""
    root = Path(bundle)
    parts = [file_sha256(root / META_NAME)]
    parts += [f"{p.name}:{p.stat().st_size}" for p in sorted(root.iterdir()) if p.is_file()]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def render_fingerprint(
    config: RenderConfig,
    pool: PoolConfig,
    *,
    avatar: str,
    model: str,
    features: np.ndarray,
    start_frame: int,
) -> str:
    """Hex SHA-256 of the render's inputs and settings.

    Args:
        config: the render's settings (chunking, codecs, encoder, blend, silence).
        pool: the pool as resolved for the cluster (its batch size is the one that runs).
        avatar: :func:`avatar_identity` of the bundle.
        model: SHA-256 of the generator file the actors load (FP32, INT8 or FP16).
        features: float32 (N, 512) audio features; not mutated.
        start_frame: the avatar frame of output frame 0.
    """
    parts = {
        "avatar": avatar,
        "features": hashlib.sha256(np.ascontiguousarray(features).tobytes()).hexdigest(),
        "model": model,
        "chunk_frames": config.pool.chunk_frames,
        "batch_size": pool.batch_size,
        "start_frame": start_frame,
        "shard_codec": config.shard_codec.value,
        "encode_mode": config.encode_mode.value,
        "encode": [config.encode.crf, config.encode.preset, config.encode.codec.value],
        "blend": [config.blend.mode.value, config.blend.feather],
        "silence": None if config.silence is None else asdict(config.silence),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
