"""lipsync-ray: re-render a talking-head video so the lips follow a new speech track, on Ray.

The names a notebook or a job needs::

    from lipsync_ray import render, Renderer, render_batch, RenderConfig, PoolConfig
    report = render("avatar/", "speech.wav", "out.mp4", RenderConfig(model=..., audio_encoder=...))

``render`` makes one MP4, ``Renderer`` keeps the actors warm across many, ``render_batch`` runs
a jobs file; each returns :class:`RunReport` values. Errors derive from :class:`LipsyncError`
(``InputError``: bad input, before anything starts; ``ModelError``, ``RenderError``,
``EncodeError``, ``ShardError``; ``Cancelled``: a render whose ``cancel`` event was set).
Everything else lives in its stage's module (``lipsync_ray.avatar.Avatar``,
``lipsync_ray.audio.load_audio``, ...); the developer tooling is ``lipsync_ray.dev``, which
the runtime never imports.

Heavy modules (Ray, OpenCV, PyAV, pyarrow, ONNX) load on first use, so ``lipsync-ray --help``
and ``from lipsync_ray import RenderConfig`` stay fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from lipsync_ray.errors import (
    Cancelled,
    EncodeError,
    InputError,
    LipsyncError,
    ModelError,
    RenderError,
    ShardError,
)

if TYPE_CHECKING:
    from lipsync_ray.batch import render_batch
    from lipsync_ray.config import PoolConfig, RenderConfig
    from lipsync_ray.pipeline import Renderer, render
    from lipsync_ray.report import RunReport

__all__ = [
    "Cancelled",
    "EncodeError",
    "InputError",
    "LipsyncError",
    "ModelError",
    "PoolConfig",
    "RenderConfig",
    "RenderError",
    "Renderer",
    "RunReport",
    "ShardError",
    "render",
    "render_batch",
]
__version__ = "0.1.0"

_LAZY = {
    "PoolConfig": "lipsync_ray.config",
    "RenderConfig": "lipsync_ray.config",
    "Renderer": "lipsync_ray.pipeline",
    "RunReport": "lipsync_ray.report",
    "render": "lipsync_ray.pipeline",
    "render_batch": "lipsync_ray.batch",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lipsync_ray' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
