"""A render job as the service sees it: its state, its per-request options and its record.

::

    queued ──▶ running ──▶ done
       │          ├──────▶ failed
       └──────────┴──────▶ cancelled

A job interrupted by a drain or a crash keeps a non-final state (queued or running): a
restarted service queues it again and it resumes from its work directory.

Per-request options are few on purpose: what changes one output's look or size (start frame,
blend, silence passthrough, crf, preset). Everything else (models, pools, precision, codecs) is
the service's, so one warm set of actors serves every request that agrees on those.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass, replace

# one set of job states for the service and its client (a standard-library module)
from lipsync_ray.client import JobState
from lipsync_ray.config import RenderConfig
from lipsync_ray.errors import InputError
from lipsync_ray.options import X264_PRESETS, Blend, BlendOptions
from lipsync_ray.vad import SilenceOptions

__all__ = [
    "JobOptions",
    "JobRecord",
    "JobState",
    "check_job_id",
    "new_job_id",
    "options_from_request",
]

# A job id: uuid4 as 32 lowercase hex digits. Only such a string ever names a job's directory.
JOB_ID = re.compile(r"^[0-9a-f]{32}$")

# The request's names for the blend modes: "paste" is the renderer's hard paste.
BLEND_NAMES = {"feather": Blend.FEATHER, "paste": Blend.HARD, "hard": Blend.HARD}


def new_job_id() -> str:
    return uuid.uuid4().hex


def check_job_id(text: str) -> bool:
    """True when ``text`` has the form of a job id (32 hex digits)."""
    return bool(JOB_ID.match(text))


@dataclass(frozen=True)
class JobOptions:
    """The options one request may set; the rest of its RenderConfig is the service's."""

    start_frame: int = 0  # first avatar frame (ping-pong offset)
    blend: str = "feather"  # "feather" or "paste" (the reference hard paste)
    silence_passthrough: bool = False  # silent stretches keep the avatar frame
    crf: int = 20  # x264 constant rate factor, 0-51
    preset: str = "veryfast"  # x264 preset name

    @classmethod
    def defaults(cls, config: RenderConfig) -> JobOptions:
        """The options a request gets when it sets none: the service's own settings."""
        return cls(
            start_frame=config.start_frame,
            blend="paste" if config.blend.mode is Blend.HARD else "feather",
            silence_passthrough=config.silence is not None,
            crf=config.encode.crf,
            preset=config.encode.preset,
        )

    def renderer_config(self, config: RenderConfig) -> RenderConfig:
        """The RenderConfig of the warm Renderer that renders this job: the service's with
        this job's blend, silence passthrough, crf and preset (the compositors are made with
        the encode settings, so they are part of what a warm Renderer is). The start frame is
        left at the service's: a Renderer takes it per render."""
        silence = (config.silence or SilenceOptions()) if self.silence_passthrough else None
        return replace(
            config,
            blend=BlendOptions(mode=BLEND_NAMES[self.blend], feather=config.blend.feather),
            silence=silence,
            encode=replace(config.encode, crf=self.crf, preset=self.preset),
        )

    def to_dict(self) -> dict:
        return {
            "start_frame": self.start_frame,
            "blend": self.blend,
            "silence_passthrough": self.silence_passthrough,
            "crf": self.crf,
            "preset": self.preset,
        }

    @classmethod
    def from_dict(cls, data: dict) -> JobOptions:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def options_from_request(
    defaults: JobOptions,
    *,
    start_frame: int | None = None,
    blend: str | None = None,
    silence_passthrough: bool | None = None,
    crf: int | None = None,
    preset: str | None = None,
    avatar_frames: int | None = None,
) -> JobOptions:
    """The options of a request (each None: the service's default), checked.

    ``avatar_frames``: the avatar's frame count, which bounds the start frame (its ping-pong
    period, 2 * frames - 2). Raises InputError with "expected vs got" for a bad value."""
    if start_frame is not None:
        if start_frame < 0:
            raise InputError(f"start_frame must be >= 0, got {start_frame}")
        if avatar_frames is not None:
            period = max(1, 2 * avatar_frames - 2)
            if start_frame >= period:
                raise InputError(
                    f"start_frame must be < {period} (the avatar's {avatar_frames} frames "
                    f"played forward and back), got {start_frame}"
                )
    if blend is not None:
        blend = blend.strip().lower()
        if blend not in BLEND_NAMES:
            raise InputError(f"blend must be feather or paste, got {blend!r}")
        blend = "paste" if BLEND_NAMES[blend] is Blend.HARD else "feather"
    if crf is not None and not 0 <= crf <= 51:
        raise InputError(f"crf must be in 0..51, got {crf}")
    if preset is not None and preset not in X264_PRESETS:
        raise InputError(f"preset must be one of {', '.join(X264_PRESETS)}, got {preset!r}")
    given = {
        "start_frame": start_frame,
        "blend": blend,
        "silence_passthrough": silence_passthrough,
        "crf": crf,
        "preset": preset,
    }
    return replace(defaults, **{k: v for k, v in given.items() if v is not None})


@dataclass(frozen=True)
class JobRecord:
    """One job as stored in the database and answered as JobStatus."""

    id: str
    avatar: str
    options: JobOptions
    state: JobState = JobState.QUEUED
    created_at: float = 0.0  # UNIX seconds
    started_at: float | None = None  # when its (latest) run started
    finished_at: float | None = None
    frames_done: int = 0
    frames_total: int | None = None
    error: str | None = None  # one line
    frames_reused: int = 0  # frames its latest run found done in its work directory

    @classmethod
    def new(cls, avatar: str, options: JobOptions) -> JobRecord:
        return cls(id=new_job_id(), avatar=avatar, options=options, created_at=time.time())

    def fps(self, now: float | None = None) -> float | None:
        """Frames rendered per second since the run started, not counting the frames it
        found done in its work directory (None before it started)."""
        if self.started_at is None:
            return None
        end = (
            self.finished_at
            if self.finished_at is not None
            else time.time()
            if now is None
            else now
        )
        return max(self.frames_done - self.frames_reused, 0) / max(end - self.started_at, 1e-6)

    def status(self) -> dict:
        """The API's JobStatus."""
        fps = self.fps()
        return {
            "id": self.id,
            "avatar": self.avatar,
            "state": self.state.value,
            "frames_done": self.frames_done,
            "frames_total": self.frames_total,
            "fps": None if fps is None else round(fps, 3),
            "error": self.error,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "options": self.options.to_dict(),
        }
