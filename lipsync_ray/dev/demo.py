"""``lipsync-ray demo``: the whole path on generated inputs, with no arguments and no downloads.

Builds the small stand-in models, a drawn avatar that moves a little, and a few seconds of
speech-like audio, then renders them on an embedded Ray cluster.
"""

from __future__ import annotations

import logging
from pathlib import Path

from lipsync_ray.config import PoolConfig, RenderConfig
from lipsync_ray.dev.models import Arch, Size, build_model, save_model
from lipsync_ray.dev.speech import synth_speech, write_audio
from lipsync_ray.dev.synthetic import make_demo_avatar
from lipsync_ray.pipeline import render
from lipsync_ray.report import RunReport

__all__ = ["run_demo"]

log = logging.getLogger(__name__)


def run_demo(out_dir: str | Path = "lipsync-demo", *, seconds: float = 4.0) -> RunReport:
    """Generate inputs under ``out_dir`` and render ``out_dir/demo.mp4``; returns the report."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    models = out / "models"
    models.mkdir(exist_ok=True)
    unet = models / "unet328-small.onnx"
    encoder = models / "audio-encoder-small.onnx"
    if not unet.exists():
        save_model(build_model(Arch.UNET328, Size.SMALL, seed=0), unet)
    if not encoder.exists():
        save_model(build_model(Arch.AUDIO_ENCODER, Size.SMALL, seed=0), encoder)
    log.info("models: %s, %s", unet, encoder)
    avatar = out / "avatar"
    if not (avatar / "avatar.json").exists():
        make_demo_avatar(avatar, seconds=4.0, seed=0)
    speech = out / "speech.wav"
    write_audio(speech, synth_speech(seconds, seed=0))
    config = RenderConfig(
        model=str(unet),
        audio_encoder=str(encoder),
        pool=PoolConfig(chunk_frames=25, compositors=1),
        overwrite=True,
    )
    return render(avatar, speech, out / "demo.mp4", config)
