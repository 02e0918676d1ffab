"""Helpers shared by the test modules (imported as ``from helpers import ...``, like
``roi_models``): picture quality, the console command, and small generated inputs."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np


def psnr_db(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    """PSNR of ``a`` against ``b`` (same shape; any dtype, compared as float64) in dB, for
    values in ``[0, peak]``; ``inf`` when they are equal."""
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(peak**2 / mse))


def cli_command() -> list[str]:
    """The ``lipsync-ray`` command for a subprocess: the installed entry point, else
    ``python -m lipsync_ray.cli``."""
    exe = shutil.which("lipsync-ray")
    return [exe] if exe else [sys.executable, "-m", "lipsync_ray.cli"]


def demo_inputs(
    root: Path,
    *,
    avatar_seconds: float,
    size_wh: tuple[int, int],
    avatar_seed: int,
    audio_seconds: float,
    audio_seed: int,
) -> dict[str, Path]:
    """A drawn avatar bundle (``root/avatar``, 25 fps) and synthesised speech
    (``root/speech.wav``), seeded: ``{"avatar": bundle directory, "audio": WAV}``."""
    from lipsync_ray.dev.speech import synth_speech, write_audio
    from lipsync_ray.dev.synthetic import make_demo_avatar

    avatar = make_demo_avatar(
        root / "avatar", seconds=avatar_seconds, size_wh=size_wh, seed=avatar_seed
    )
    audio = write_audio(root / "speech.wav", synth_speech(audio_seconds, seed=audio_seed))
    return {"avatar": Path(avatar.info.path), "audio": audio}


# The valid inputs the refusal tables start from (the `good` fixture in conftest.py).
GOOD_AVATAR_FRAMES = 5
GOOD_SIZE_WH = (320, 240)


class RayStartedError(RuntimeError):
    """Ray was started by a case that had to be rejected first."""


def ray_tripwire(monkeypatch) -> None:
    """Make any attempt to start or join Ray raise :class:`RayStartedError` (for checks that
    must come before Ray): use from a fixture that takes ``monkeypatch``."""
    import ray

    def tripwire(*args, **kwargs):
        raise RayStartedError("ray.init was called before the input was rejected")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", tripwire)
    monkeypatch.setattr(ray, "shutdown", lambda *a, **k: None)


def one_error_line(err: str) -> str:
    """The CLI's one ``lipsync-ray: error:`` line on ``err`` (asserted: one line, no
    traceback, not an unexpected error)."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("lipsync-ray: error: "), lines[0]
    assert "Traceback" not in err and "unexpected" not in lines[0], lines[0]
    return lines[0]
