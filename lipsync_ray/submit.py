"""``lipsync-ray submit URL AVATAR AUDIO -o OUT.mp4``: render on a running service
(``lipsync-ray serve``) through :class:`lipsync_ray.client.ServiceClient`: upload, progress,
download.

A client, so it starts fast: this module and everything it imports are the standard library,
the client, the errors and the options' constants (no Ray, OpenCV, numpy, ONNX Runtime, PyAV
or pyarrow; tests/test_client.py checks). The CLI dispatches ``submit`` to this parser before it
builds the render's.

Exit codes (the CLI's): 0 done; 2 a 4xx answer or a bad argument (one line); 1 a failed job, a
5xx answer or a service that cannot be reached; 130 Ctrl-C, which cancels the job on the service.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

from lipsync_ray.client import JobState, JobStatus, ServiceClient
from lipsync_ray.errors import Cancelled, InputError
from lipsync_ray.options import X264_PRESETS

__all__ = ["add_submit_args", "run_submit"]

log = logging.getLogger(__name__)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected seconds > 0, got {text!r}")
    return value


def _crf(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 51:
        raise argparse.ArgumentTypeError(f"expected an integer 0-51, got {text!r}")
    return value


def _frame(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def add_submit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", metavar="URL", help="the service's base URL, e.g. http://127.0.0.1:8000")
    p.add_argument(
        "avatar", metavar="AVATAR", help="an avatar name the service knows (GET /v1/avatars)"
    )
    p.add_argument("audio", metavar="AUDIO", type=Path, help="speech audio to upload")
    p.add_argument(
        "-o", "--output", metavar="OUT.mp4", type=Path, required=True, help="the MP4 to write"
    )
    p.add_argument(
        "--token-file",
        metavar="F",
        type=Path,
        help="a file holding the bearer token (read when LIPSYNC_RAY_TOKEN is not set)",
    )
    g = p.add_argument_group("render options (default: the service's)")
    g.add_argument("--start-frame", metavar="N", type=_frame, help="first avatar frame")
    g.add_argument("--blend", choices=["feather", "paste"], help="how the mouth is pasted")
    g.add_argument(
        "--silence-passthrough",
        action="store_true",
        default=None,
        help="show the original frames where the audio is silent",
    )
    g.add_argument("--crf", metavar="N", type=_crf, help="x264 quality, 0-51 (lower: better)")
    g.add_argument(
        "--preset",
        metavar="P",
        choices=X264_PRESETS,
        help=f"x264 preset: {', '.join(X264_PRESETS)}",
    )
    p.add_argument(
        "--timeout",
        metavar="S",
        type=_seconds,
        help="give up (and cancel the job) after this many seconds (default: wait)",
    )
    p.add_argument(
        "--poll", metavar="S", type=_seconds, default=0.5, help="seconds between polls (0.5)"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace OUT.mp4 if it exists (once complete)"
    )


def _check_paths(audio: Path, output: Path, overwrite: bool) -> None:
    """Refused before the upload, as `render` refuses them: a missing audio, an output that
    is the audio, exists (without --overwrite) or cannot be written."""
    if not audio.is_file():
        raise InputError("audio file not found", path=audio)
    if output.exists():
        if output.is_dir():
            raise InputError("the output is a directory", path=output)
        if output.samefile(audio):
            raise InputError("the output is the audio: it would be replaced", path=output)
        if not overwrite:
            raise InputError("the output exists: use --overwrite to replace it", path=output)
    parent = output.parent
    if not parent.is_dir():
        raise InputError("the output's directory does not exist", path=parent)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError("the output's directory is not writable", path=parent)


class _Progress:
    """Shows a job's statuses: a tqdm bar on a terminal, log lines otherwise."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.job_id: str | None = None
        self._state: JobState | None = None
        self._bar = None

    def __call__(self, status: JobStatus) -> None:
        self.job_id = status.id
        if status.state is JobState.RUNNING and self._bar is None and status.frames_total:
            from lipsync_ray.progress import FrameProgress  # tqdm, on a terminal only

            self._bar = FrameProgress(status.frames_total, done=status.frames_done, label="render")
        if self._bar is not None:
            self._bar.callback()(status.frames_done, status.frames_total)
            if status.finished:  # the bar's last line, then the state's
                self.close()
        if status.state is not self._state:
            self._state = status.state
            log.info("job %s %s (%s on %s)", status.id, status.state.value, status.avatar, self.url)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def run_submit(args: argparse.Namespace) -> int:
    """``lipsync-ray submit``: returns 0, or raises the tree's errors (the CLI maps them)."""
    _check_paths(args.audio, args.output, args.overwrite)
    client = ServiceClient(args.url, token_file=args.token_file)
    progress = _Progress(client.url)
    started = time.monotonic()
    try:
        done = client.render(
            args.avatar, args.audio, args.output, on_status=progress, poll_s=args.poll,
            timeout_s=args.timeout, start_frame=args.start_frame, blend=args.blend,
            silence_passthrough=args.silence_passthrough, crf=args.crf, preset=args.preset,
        )  # fmt: skip
    except KeyboardInterrupt:
        if progress.job_id is None:
            raise Cancelled("interrupted before the job was submitted") from None
        raise Cancelled(
            f"interrupted: asked the service to cancel job {progress.job_id}", path=client.url
        ) from None
    finally:
        progress.close()
    fps = f", {done.fps:.1f} FPS on the service" if done.fps else ""
    print(
        f"{args.output}: {done.frames_total} frames (job {done.id}) in "
        f"{time.monotonic() - started:.1f} s{fps}"
    )
    return 0
