"""Progress of a long frame loop (a render's chunks, `prepare`'s frames) on stderr.

On a terminal a live tqdm bar (frames, FPS, ETA); otherwise, where batch jobs log to files, an
INFO log line every 10 % instead of a bar, so the log gets a few lines and no carriage returns.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import TextIO

__all__ = ["FrameProgress"]

_BAR = "{desc}{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} frames  {rate_fmt}  ETA {remaining}"
_COUNT = "{desc}{n_fmt} frames  {rate_fmt}"  # the total is not known (yet)


def _columns(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return 0


class FrameProgress:
    """Frames done of ``total``, with FPS and ETA.

    Args:
        total: frames the loop will do (None: not known yet; :meth:`callback` may learn it).
        done: frames already done before this run (a resumed render): they count towards the
            total, not towards the FPS.
        label: shown before the bar (e.g. "prepare").
        logger: where the off-terminal lines go.
        log_every: off a terminal, a log line each time this fraction more is done (and at the
            end); None: nothing off a terminal.
        stream: the terminal or file (default ``sys.stderr``); a bar only if it is a TTY.
    """

    def __init__(
        self,
        total: int | None,
        *,
        done: int = 0,
        label: str = "",
        logger: logging.Logger | None = None,
        log_every: float | None = 0.1,
        stream: TextIO | None = None,
    ) -> None:
        self.total, self.done, self.rendered = total, done, 0
        self.start = time.monotonic()
        self._log = logger or logging.getLogger(__name__)
        self._log_every = log_every
        self._next_log = log_every
        stream = stream or sys.stderr
        self.tty = stream.isatty()
        self._bar = None
        if self.tty:
            from tqdm import tqdm

            sized = _columns(stream) > 0
            self._bar = tqdm(
                total=total,
                initial=done,
                desc=f"{label}: " if label else "",
                unit="frame",
                file=stream,
                # A terminal of unknown size (0 x 0: some ptys) would get no bar at all.
                dynamic_ncols=sized,
                ncols=None if sized else 80,
                nrows=None if sized else 24,
                smoothing=0,  # FPS over the whole run, as the report counts it
                bar_format=_BAR if total else _COUNT,
            )

    def update(self, frames: int) -> None:
        """``frames`` more are done."""
        self.done += frames
        self.rendered += frames
        if self._bar is not None:
            self._bar.update(frames)
            return
        if self._log_every is None or not self.total:
            return
        if self.done / self.total >= self._next_log or self.done == self.total:
            self._log.info(self.line())
            self._next_log = self.done / self.total + self._log_every

    def line(self) -> str:
        """``"DONE/TOTAL frames  FPS FPS  ETA S s"`` (FPS of the frames done in this run)."""
        elapsed = max(time.monotonic() - self.start, 1e-6)
        fps = self.rendered / elapsed
        eta = ((self.total or self.done) - self.done) / fps if fps > 0 else float("inf")
        return f"{self.done}/{self.total} frames  {fps:.1f} FPS  ETA {eta:.0f} s"

    def callback(self) -> Callable[[int, int | None], None]:
        """A ``progress(done, total_or_None)`` function (``prepare``'s), absolute counts."""

        def progress(done: int, total: int | None) -> None:
            if total and total != self.total:
                self.total = total
                if self._bar is not None:
                    self._bar.total = total
                    self._bar.bar_format = _BAR
            self.update(done - self.done)

        return progress

    def close(self) -> None:
        """End the bar (its line stays on the terminal)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> FrameProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
