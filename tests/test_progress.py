"""The frame progress (lipsync_ray.progress): a tqdm bar on a terminal, a log line every 10 %
into a log file."""

from __future__ import annotations

import io
import itertools
import logging

from lipsync_ray.progress import FrameProgress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_a_terminal_a_log_line_every_10_percent(caplog):
    log = logging.getLogger("lipsync_ray.test_progress")
    with caplog.at_level(logging.INFO, logger=log.name):
        progress = FrameProgress(200, done=40, logger=log, stream=io.StringIO())
        for _ in range(80):
            progress.update(2)
        progress.close()
    lines = [r.getMessage() for r in caplog.records]
    done = [int(line.split("/")[0]) for line in lines]
    # the first update already passed 10 % (40 of 200 were done before): then every 10 % more
    assert done[0] == 42 and done[-1] == 200 and len(done) == 9
    assert all(b - a >= 20 for a, b in itertools.pairwise(done[:-1]))  # the end: always
    assert all("FPS  ETA" in line for line in lines) and lines[-1].endswith("ETA 0 s")


def test_on_a_terminal_a_tqdm_bar_and_no_log_lines(caplog):
    stream = _Terminal()
    with caplog.at_level(logging.INFO), FrameProgress(100, done=10, stream=stream) as progress:
        progress.update(40)
        progress.update(50)
    out = stream.getvalue()
    assert "100/100 frames" in out and "ETA" in out and "\r" in out
    assert not caplog.records


def test_prepare_callback_takes_absolute_counts_and_learns_the_total():
    stream = _Terminal()
    with FrameProgress(None, label="prepare", log_every=None, stream=stream) as progress:
        callback = progress.callback()
        callback(3, None)
        callback(7, 20)
        callback(20, 20)
        assert (progress.done, progress.total) == (20, 20)
    assert "prepare: " in stream.getvalue() and "20/20 frames" in stream.getvalue()


def test_prepare_off_a_terminal_stays_silent(caplog):
    with caplog.at_level(logging.INFO):
        progress = FrameProgress(None, log_every=None, stream=io.StringIO())
        progress.callback()(5, 10)
        progress.callback()(10, 10)
    assert not caplog.records
