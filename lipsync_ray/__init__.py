"""lipsync-ray: re-render a talking-head video so the lips follow a new speech track, on Ray.

The names a notebook needs::

    from lipsync_ray import render, RenderConfig, PoolConfig, Avatar
    report = render("avatar/", "speech.wav", "out.mp4", RenderConfig(model=..., audio_encoder=...))

Heavy modules (OpenCV, PyAV, pyarrow) load on first use, so ``lipsync-ray --help`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from lipsync_ray.errors import (
    EncodeError,
    InputError,
    LipsyncError,
    ModelError,
    RenderError,
    ShardError,
)

if TYPE_CHECKING:
    from lipsync_ray.audio import load_audio, mel_spectrogram
    from lipsync_ray.avatar import Avatar
    from lipsync_ray.config import PoolConfig, RenderConfig
    from lipsync_ray.pipeline import render
    from lipsync_ray.report import RunReport

__all__ = [
    "Avatar",
    "EncodeError",
    "InputError",
    "LipsyncError",
    "ModelError",
    "PoolConfig",
    "RenderConfig",
    "RenderError",
    "RunReport",
    "ShardError",
    "load_audio",
    "mel_spectrogram",
    "render",
]
__version__ = "0.1.0"

_LAZY = {
    "Avatar": "lipsync_ray.avatar",
    "PoolConfig": "lipsync_ray.config",
    "RenderConfig": "lipsync_ray.config",
    "RunReport": "lipsync_ray.report",
    "load_audio": "lipsync_ray.audio",
    "mel_spectrogram": "lipsync_ray.audio",
    "render": "lipsync_ray.pipeline",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lipsync_ray' has no attribute {name!r}")
