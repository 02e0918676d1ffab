"""The fingerprint of a render: a hash of everything that decides the pixels of its shards and
segments. A work directory holds the chunks of one fingerprint (its manifest says which), so a
resume never mixes two renders.

What it covers, and what each costs per render:

    avatar      avatar.json's bytes and the content SHA-256 of its three arrays
                (:func:`avatar_identity`; checked against a stamp by size, mtime, ctime and
                inode, microseconds, and hashed again only when they moved:
                :mod:`lipsync_ray.avatar_digest`)
    audio       the audio file's SHA-256 (a few MB), and the features it gave (or the
                precomputed features) as an array: so also the audio encoder's output
    model       the SHA-256 of the generator file the actors load (FP32, INT8 or FP16)
    settings    chunking, batch size, start frame, shard codec, encode mode and options
                (CRF, preset, codec, fps, x264 options), blend, silence passthrough

(The precision cache keys the avatar by the pixels of the frames its gate uses instead,
:mod:`lipsync_ray.precision`: a reduced model is only reused for the frames it was measured
on.)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from lipsync_ray.avatar import META_NAME
from lipsync_ray.avatar_digest import content_digests
from lipsync_ray.config import PoolConfig, RenderConfig

__all__ = ["avatar_identity", "render_fingerprint"]


def avatar_identity(bundle: str | Path) -> str:
    """Hex SHA-256 of the bundle's ``avatar.json`` and the content digests of its arrays (of
    a bundle ``Avatar.open`` accepted).

    Raises:
        InputError: an array no longer holds the rows ``avatar.json`` records.
    """
    root = Path(bundle)
    meta_path = root / META_NAME
    meta_bytes = meta_path.read_bytes()
    digests = content_digests(root, json.loads(meta_bytes), meta_path)
    parts = [hashlib.sha256(meta_bytes).hexdigest()]
    parts += [f"{name}:{digest}" for name, digest in sorted(digests.items())]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def render_fingerprint(
    config: RenderConfig,
    pool: PoolConfig,
    *,
    avatar: str,
    model: str,
    features: np.ndarray,
    start_frame: int,
    audio: str,
) -> str:
    """Hex SHA-256 of the render's inputs and settings.

    Args:
        config: the render's settings (chunking, codecs, encoder, blend, silence).
        pool: the pool as resolved for the cluster (its batch size is the one that runs).
        avatar: :func:`avatar_identity` of the bundle.
        model: SHA-256 of the generator file the actors load (FP32, INT8 or FP16).
        features: float32 (N, 512) audio features; not mutated.
        start_frame: the avatar frame of output frame 0.
        audio: SHA-256 of the audio file (silence passthrough reads its samples).
    """
    parts = {
        "avatar": avatar,
        "audio": audio,
        "features": hashlib.sha256(np.ascontiguousarray(features).tobytes()).hexdigest(),
        "model": model,
        "chunk_frames": config.pool.chunk_frames,
        "batch_size": pool.batch_size,
        "start_frame": start_frame,
        "shard_codec": config.shard_codec.value,
        "encode_mode": config.encode_mode.value,
        "encode": [
            config.encode.crf,
            config.encode.preset,
            config.encode.codec.value,
            config.encode.fps,
            config.encode.resolved_x264_params,
        ],
        "blend": [config.blend.mode.value, config.blend.feather],
        "silence": None if config.silence is None else asdict(config.silence),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
