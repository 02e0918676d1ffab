"""``lipsync-ray demo``: the whole path on generated inputs, with no arguments and no downloads.

Builds the stand-in models (the full-width generator, whose designed weights pass the face
through exactly outside the mouth, and the small audio encoder), a drawn avatar that moves a
little, and a few seconds of speech-like audio, then renders them on an embedded Ray cluster.
``describe`` says what to look at in the result.

What ``out_dir`` holds afterwards: ``demo.mp4``; ``demo.mp4.work/`` (the render's work
directory: after a successful render only ``manifest.json``, which a re-run resumes from, and
``report.json``); ``models/`` (with ONNX Runtime's graph cache under ``models/.cache/``),
``avatar/`` and ``speech.wav``, which the next demo in the same directory reuses.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from lipsync_ray.avatar import Avatar
from lipsync_ray.config import PoolConfig, RenderConfig
from lipsync_ray.dev.models import Arch, Size, build_model, save_model
from lipsync_ray.dev.speech import synth_speech, write_audio
from lipsync_ray.dev.synthetic import make_demo_avatar
from lipsync_ray.pipeline import render
from lipsync_ray.report import RunReport
from lipsync_ray.seams import measure_seam
from lipsync_ray.workdir.layout import REPORT

__all__ = ["describe", "run_demo"]

log = logging.getLogger(__name__)

AVATAR_SECONDS = 4.0  # the drawn avatar's length; longer audio ping-pongs over it
# The SMALL generator (up5 has 2 output channels) keeps only luma and red-minus-blue, which
# tints the pasted box; FULL keeps every colour, at ~5 GMAC per frame (about 0.1-0.2 s on one
# CPU core) and ~15 s to build once.
GENERATOR_SIZE = Size.FULL
SEAM_SAMPLES = 10  # avatar frames measured for the untouched frames' own seam score


def run_demo(out_dir: str | Path = "lipsync-demo", *, seconds: float = 4.0) -> RunReport:
    """Generate inputs under ``out_dir`` and render ``out_dir/demo.mp4``; returns the report.

    Models, avatar and audio already in ``out_dir`` are reused (the speech is rewritten with
    the requested length)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    models = out / "models"
    models.mkdir(exist_ok=True)
    unet = models / f"unet328-{GENERATOR_SIZE.value}.onnx"
    encoder = models / "audio-encoder-small.onnx"
    if not unet.exists():
        log.info("building the stand-in generator (once, ~15 s): %s", unet)
        save_model(build_model(Arch.UNET328, GENERATOR_SIZE, seed=0), unet)
    if not encoder.exists():
        save_model(build_model(Arch.AUDIO_ENCODER, Size.SMALL, seed=0), encoder)
    log.info("models: %s, %s", unet, encoder)
    avatar = out / "avatar"
    if not (avatar / "avatar.json").exists():
        make_demo_avatar(avatar, seconds=AVATAR_SECONDS, seed=0)
    speech = out / "speech.wav"
    write_audio(speech, synth_speech(seconds, seed=0))
    config = RenderConfig(
        model=str(unet),
        audio_encoder=str(encoder),
        pool=PoolConfig(chunk_frames=25, compositors=1),
        overwrite=True,
    )
    return render(avatar, speech, out / "demo.mp4", config)


def _untouched_seam(avatar: Avatar) -> float:
    """Mean seam score of the avatar's own frames along their boxes (nothing pasted)."""
    indices = np.linspace(0, avatar.frame_count - 1, SEAM_SAMPLES).round().astype(np.int64)
    frames, boxes = avatar.read_frames(indices), avatar.boxes(indices)
    return float(np.mean([measure_seam(f, b).score for f, b in zip(frames, boxes, strict=True)]))


def describe(report: RunReport, out_dir: str | Path = "lipsync-demo") -> str:
    """What to look at in a demo render: a few lines for the console (no trailing newline)."""
    out = Path(out_dir)
    avatar = Avatar.open(out / "avatar")
    w, h = avatar.size_wh
    x1, y1, x2, y2 = (int(v) for v in np.median(avatar.boxes(range(avatar.frame_count)), 0))
    work = Path(report.work_dir)
    left = sorted(p.name for p in work.iterdir()) if work.is_dir() else []
    seam = "-" if report.seam_score is None else f"{report.seam_score:.2f}"
    avatar_seconds = avatar.frame_count / avatar.fps
    return "\n".join(
        [
            f"Open {report.output} ({report.frames} frames, {w}x{h}, "
            f"{report.video_duration_s:.1f} s; the drawn face is {avatar_seconds:.0f} s long and "
            "plays forwards then backwards under longer audio). Look at:",
            "- the mouth: it follows the audio. The stand-in models are untrained, so the speech "
            "lightens and darkens the mouth and chin instead of drawing lips; point "
            "`lipsync-ray render --model/--audio-encoder` at real exports for lips.",
            f"- the pasted box: each frame's lower face, nose to below the chin (about "
            f"{x2 - x1}x{y2 - y1} px at x {x1}-{x2}, y {y1}-{y2}; it follows the face), is "
            "generated and pasted back with a feathered edge. Outside the mouth it passes "
            "through the face unchanged, so neither its edge nor its colour should show.",
            f"- the seam score, {seam}: the gradient across the box's border over the gradient "
            "just inside and outside it. Near 1, and near the score of this avatar's own "
            f"frames with nothing pasted ({_untouched_seam(avatar):.2f}), the border cannot be "
            "told from the picture around it; a hard seam scores well above 1, and a blurred "
            "or tinted face behind the feathered edge below the frames' own score.",
            f"Report (every figure of the run): {work / REPORT}. Work directory: {work}/, "
            f"holding {', '.join(left) or 'nothing'} (shards and segments are removed after a "
            "successful render; the manifest lets a re-run resume). Models, avatar and "
            f"speech.wav stay in {out}/ and are reused by the next demo there.",
        ]
    )
