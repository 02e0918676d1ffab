"""``lipsync-ray demo``: the whole path on generated inputs, with no arguments and no downloads.

Builds the stand-in models (the full-width generator and the small audio encoder, whose
designed weights open the mouth with the speech's loudness and pass the face through exactly
elsewhere), a drawn avatar that moves a little with its mouth closed, and a few seconds of
speech-like audio, then renders them on an embedded Ray cluster. ``measure_mouth`` checks the
result against the avatar and the speech, and ``describe`` says what to look at, with those
figures.

What ``out_dir`` holds afterwards: ``demo.mp4``; ``demo.mp4.work/`` (the render's work
directory: after a successful render only ``manifest.json``, which a re-run resumes from, and
``report.json``); ``models/`` (with ONNX Runtime's graph cache under ``models/.cache/``),
``avatar/`` and ``speech.wav``, which the next demo in the same directory reuses.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import av
import cv2
import numpy as np
import onnx

from lipsync_ray.audio import SAMPLE_RATE, VIDEO_FPS, load_audio
from lipsync_ray.avatar import Avatar, pingpong_indices
from lipsync_ray.composite import CROP_SIZE, ROI_OFFSET
from lipsync_ray.config import PoolConfig, RenderConfig
from lipsync_ray.dev._face_weights import DESIGN_VERSION, OPEN_RECT_ROI_XYXY
from lipsync_ray.dev.models import Arch, Size, build_model, save_model
from lipsync_ray.dev.speech import synth_speech, write_audio
from lipsync_ray.dev.synthetic import AVATAR_VERSION, make_demo_avatar
from lipsync_ray.pipeline import render
from lipsync_ray.report import RunReport
from lipsync_ray.seams import measure_seam
from lipsync_ray.workdir.layout import REPORT

__all__ = ["MouthMeasure", "describe", "measure_mouth", "run_demo"]

log = logging.getLogger(__name__)

AVATAR_SECONDS = 4.0  # the drawn avatar's length; longer audio ping-pongs over it
# The SMALL generator (up5 has 2 output channels) keeps only luma and red-minus-blue, which
# tints the pasted box; FULL keeps every colour, at ~5 GMAC per frame (about 0.1-0.2 s on one
# CPU core) and ~15 s to build once.
GENERATOR_SIZE = Size.FULL
SEAM_SAMPLES = 10  # avatar frames measured for the untouched frames' own seam score


def _current_model(path: Path) -> bool:
    """Whether ``path`` holds a stand-in built by this version's designed weights."""
    if not path.exists():
        return False
    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return meta.get("lipsync_ray.design") == str(DESIGN_VERSION)


def _current_avatar(path: Path) -> bool:
    """Whether ``path`` holds this version's drawn avatar (an older one moves its own mouth)."""
    if not (path / "avatar.json").exists():
        return False
    return Avatar.open(path).info.source.get("version") == AVATAR_VERSION


def run_demo(out_dir: str | Path = "lipsync-demo", *, seconds: float = 4.0) -> RunReport:
    """Generate inputs under ``out_dir`` and render ``out_dir/demo.mp4``; returns the report.

    Models and avatar already in ``out_dir`` are reused when this version made them (the
    speech is rewritten with the requested length)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    models = out / "models"
    models.mkdir(exist_ok=True)
    unet = models / f"unet328-{GENERATOR_SIZE.value}.onnx"
    encoder = models / "audio-encoder-small.onnx"
    if not _current_model(unet):
        log.info("building the stand-in generator (once, ~15 s): %s", unet)
        save_model(build_model(Arch.UNET328, GENERATOR_SIZE, seed=0), unet)
    if not _current_model(encoder):
        save_model(build_model(Arch.AUDIO_ENCODER, Size.SMALL, seed=0), encoder)
    log.info("models: %s, %s", unet, encoder)
    avatar = out / "avatar"
    if not _current_avatar(avatar):
        make_demo_avatar(avatar, seconds=AVATAR_SECONDS, seed=0, overwrite=True)
    speech = out / "speech.wav"
    write_audio(speech, synth_speech(seconds, seed=0))
    config = RenderConfig(
        model=str(unet),
        audio_encoder=str(encoder),
        pool=PoolConfig(chunk_frames=25, compositors=1),
        overwrite=True,
    )
    return render(avatar, speech, out / "demo.mp4", config)


@dataclass(frozen=True)
class MouthMeasure:
    """The demo's output against its avatar frames and its speech, frame by frame.

    Darkening: the mean over the mouth rectangle (where the stand-in can open the mouth) of
    the avatar frame's luma minus the output's, in levels (0-255); H.264 alone moves it by
    well under a level.
    """

    frames: int
    correlation: float  # Pearson r of the darkening and each frame's RMS loudness (40 ms)
    loud_darkening: float  # mean darkening of the loudest quarter of the frames
    # Frames inside pauses: their 40 ms and their neighbours' are digital silence. (The models
    # hear about 100 ms around a frame, as trained ones do, so a silent frame next to speech
    # may open a little.)
    pause_frames: int
    pause_darkening: float  # the largest darkening of a frame inside a pause
    outside_diff: float  # mean |output - avatar| in the boxes outside the mouth rectangle
    frame_diff: float  # mean |output - avatar| outside the boxes: H.264's error alone


def _frame_rms(samples: np.ndarray, frames: int) -> np.ndarray:
    """float64 (frames,): the RMS of each output frame's 40 ms of samples (0 past the end)."""
    step = SAMPLE_RATE // VIDEO_FPS
    padded = np.zeros(frames * step, np.float64)
    n = min(len(samples), padded.size)
    padded[:n] = samples[:n]
    return np.sqrt((padded.reshape(frames, step) ** 2).mean(axis=1))


def _mouth_rect(box: np.ndarray) -> tuple[int, int, int, int]:
    """OPEN_RECT_ROI_XYXY in the frame, for a crop box ``x1, y1, x2, y2``."""
    x1, y1, x2, y2 = (int(v) for v in box)
    sx, sy = (x2 - x1) / CROP_SIZE, (y2 - y1) / CROP_SIZE
    rx1, ry1, rx2, ry2 = (v + ROI_OFFSET for v in OPEN_RECT_ROI_XYXY)
    return (round(x1 + rx1 * sx), round(y1 + ry1 * sy), round(x1 + rx2 * sx), round(y1 + ry2 * sy))


def measure_mouth(report: RunReport, out_dir: str | Path = "lipsync-demo") -> MouthMeasure:
    """Decode the demo's output and compare it with the avatar and the speech it was made from
    (``run_demo``'s ``out_dir``; output frame i shows avatar frame ``pingpong_indices``)."""
    out = Path(out_dir)
    avatar = Avatar.open(out / "avatar")
    with av.open(str(report.output)) as container:
        frames = [f.to_ndarray(format="bgr24") for f in container.decode(video=0)]
    n = len(frames)
    rms = _frame_rms(load_audio(out / "speech.wav"), n)
    indices = pingpong_indices(n, avatar.frame_count)
    originals, boxes = avatar.read_frames(indices), avatar.boxes(indices)
    darkening, outside, rest = np.empty(n), np.empty(n), np.empty(n)
    for i, (frame, original, box) in enumerate(zip(frames, originals, boxes, strict=True)):
        luma = [cv2.cvtColor(f, cv2.COLOR_BGR2GRAY).astype(np.float64) for f in (original, frame)]
        mx1, my1, mx2, my2 = _mouth_rect(box)
        darkening[i] = (luma[0] - luma[1])[my1:my2, mx1:mx2].mean()
        x1, y1, x2, y2 = (int(v) for v in box)
        keep = np.ones((y2 - y1, x2 - x1), bool)
        keep[my1 - y1 : my2 - y1, mx1 - x1 : mx2 - x1] = False
        diff = np.abs(frame.astype(np.int64) - original)
        outside[i] = diff[y1:y2, x1:x2][keep].mean()
        unpasted = np.ones(diff.shape[:2], bool)
        unpasted[y1:y2, x1:x2] = False
        rest[i] = diff[unpasted].mean()
    silent = np.r_[True, rms == 0.0, True]
    pause = silent[:-2] & silent[1:-1] & silent[2:]
    loud = rms >= np.quantile(rms, 0.75)
    return MouthMeasure(
        frames=n,
        correlation=float(np.corrcoef(darkening, rms)[0, 1]),
        loud_darkening=float(darkening[loud].mean()),
        pause_frames=int(pause.sum()),
        pause_darkening=float(np.abs(darkening[pause]).max()) if pause.any() else 0.0,
        outside_diff=float(outside.mean()),
        frame_diff=float(rest.mean()),
    )


def _untouched_seam(avatar: Avatar) -> float:
    """Mean seam score of the avatar's own frames along their boxes (nothing pasted)."""
    indices = np.linspace(0, avatar.frame_count - 1, SEAM_SAMPLES).round().astype(np.int64)
    frames, boxes = avatar.read_frames(indices), avatar.boxes(indices)
    return float(np.mean([measure_seam(f, b).score for f, b in zip(frames, boxes, strict=True)]))


def describe(report: RunReport, out_dir: str | Path = "lipsync-demo") -> str:
    """What to look at in a demo render, with the figures ``measure_mouth`` takes from it: a few
    lines for the console (no trailing newline)."""
    out = Path(out_dir)
    avatar = Avatar.open(out / "avatar")
    w, h = avatar.size_wh
    x1, y1, x2, y2 = (int(v) for v in np.median(avatar.boxes(range(avatar.frame_count)), 0))
    work = Path(report.work_dir)
    left = sorted(p.name for p in work.iterdir()) if work.is_dir() else []
    seam = "-" if report.seam_score is None else f"{report.seam_score:.2f}"
    avatar_seconds = avatar.frame_count / avatar.fps
    mouth = measure_mouth(report, out)
    return "\n".join(
        [
            f"Open {report.output} ({report.frames} frames, {w}x{h}, "
            f"{report.video_duration_s:.1f} s; the drawn face is {avatar_seconds:.0f} s long, "
            "keeps its mouth closed, and plays forwards then backwards under longer audio). "
            "Measured in it:",
            f"- the mouth opens with the speech: its darkening (the avatar's luma minus the "
            f"output's, over the mouth) follows each frame's loudness (RMS over 40 ms) with a "
            f"correlation of {mouth.correlation:.2f} over {mouth.frames} frames, and is "
            f"{mouth.loud_darkening:.0f} levels in the loudest quarter of them; in the "
            f"{mouth.pause_frames} frames inside pauses (digital silence from the frame before "
            f"to the frame after) it is at most {mouth.pause_darkening:.1f} levels: closed, "
            "within what the crop's resize and H.264 do to the face (below). The stand-in "
            "models are not "
            "trained: they open a dark hole by loudness; point `lipsync-ray render "
            "--model/--audio-encoder` at real exports for lips that form words.",
            f"- the pasted box: each frame's lower face, nose to below the chin (about "
            f"{x2 - x1}x{y2 - y1} px at x {x1}-{x2}, y {y1}-{y2}; it follows the face), is "
            "generated and pasted back with a feathered edge. Outside the mouth it differs "
            f"from the avatar's frame by {mouth.outside_diff:.1f} levels on average: the "
            "crop's resize there and back and H.264 (the rest of the frame, where nothing is "
            f"pasted, by {mouth.frame_diff:.1f}: H.264 alone).",
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
