"""``lipsync-ray bench serve`` without a real service: its percentiles, settings checks, figures,
table and JSON; its measuring against the fake service of ``tests/fake_service.py``; and the
service process it starts and stops (the fake, run as a process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
from fake_service import TOKEN, FakeService, write_wav

from lipsync_ray.cli import main
from lipsync_ray.client import ServiceClient
from lipsync_ray.dev import bench_serve as bs
from lipsync_ray.errors import InputError

FAKE = Path(__file__).with_name("fake_service.py")


@pytest.mark.parametrize("n", [1, 2, 5, 10, 11])
@pytest.mark.parametrize("q", [0, 25, 50, 95, 100])
def test_percentile_is_numpys_linear(n, q):
    values = list(np.random.default_rng(n).exponential(1.0, n))
    assert bs.percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12)


@pytest.mark.parametrize(("values", "q", "message"), [([], 50, "no values"), ([1.0], 101, "0-100")])
def test_percentile_refuses(values, q, message):
    with pytest.raises(InputError, match=message):
        bs.percentile(values, q)


GOOD = dict(clips=10, concurrent=6, concurrent_seconds=3.0, long_seconds=60.0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"clips": 0}, "--clips must be an integer >= 1, got 0"),
        ({"clips": 2.5}, "--clips must be an integer >= 1, got 2.5"),
        ({"concurrent": 0}, "--concurrent must be an integer >= 1, got 0"),
        ({"concurrent_seconds": 0.0}, "--concurrent-seconds must be > 0, got 0.0"),
        ({"concurrent_seconds": float("nan")}, "--concurrent-seconds must be > 0, got nan"),
        ({"long_seconds": 6.0}, "--long-seconds must be > 6 (the 1-s clip is sent 5 s into it"),
    ],
)
def test_settings_are_checked(change, message):
    bs.check_settings(**GOOD)  # the defaults pass
    with pytest.raises(InputError) as info:
        bs.check_settings(**{**GOOD, **change})
    assert str(info.value).startswith(message)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--clips", "0"], "expected integers >= 1"),
        (["--concurrent", "x"], "expected comma-separated integers"),
        (["--long-seconds", "4"], "--long-seconds must be > 6"),
        (["--concurrent-seconds", "-1"], "--concurrent-seconds must be > 0"),
    ],
)
def test_the_command_checks_before_anything_runs(argv, message, capsys, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("bench_serve ran")

    monkeypatch.setattr(bs, "bench_serve", never)
    try:
        rc = main(["bench", "serve", *argv])
    except SystemExit as exc:  # argparse's own
        rc = exc.code
    assert rc == 2 and message in capsys.readouterr().err


MEASURED = bs.ServiceMeasurements(
    warmup_s=3.0, latencies_s=(1.0, 1.2, 1.1, 2.0), single_job_frames=450, single_job_fps=30.0,
    single_job_fps_source="report.json chunks phase", concurrent_frames=450,
    concurrent_wall_s=18.0, short_latency_s=2.5, long_total_s=70.0, short_finished_first=True,
    single_job_wall_s=20.0,
)  # fmt: skip


def _summary() -> bs.ServeBench:
    return bs.summarize(
        MEASURED, model="identity", avatar="photo", size_wh=(640, 360), service_start_s=12.0,
        concurrent=6, concurrent_seconds=3.0, long_seconds=60.0, short_after_s=5.0,
        cli_render_frames=450, cli_render_wall_s=30.0, settings={"cpus": 2},
    )  # fmt: skip


def test_the_figures_and_ratios():
    r = _summary()
    assert r.p50_s == pytest.approx(np.percentile([1.0, 1.2, 1.1, 2.0], 50))
    assert r.p95_s == pytest.approx(np.percentile([1.0, 1.2, 1.1, 2.0], 95))
    assert r.concurrent_fps == pytest.approx(25.0)  # 450 frames / 18 s
    assert r.cli_render_fps == pytest.approx(15.0)  # 450 / 30 s
    assert r.ratio_vs_single_job == pytest.approx(25.0 / 30.0)
    assert r.ratio_vs_cli_render == pytest.approx(25.0 / 15.0)
    # the one job as a client lives it: 450 frames from submit to download in 20 s
    assert r.single_job_wall_fps == pytest.approx(22.5)
    assert r.ratio_vs_single_job_wall == pytest.approx(25.0 / 22.5)
    assert r.clips == 4


def test_the_json_shape():
    data = json.loads(json.dumps(_summary().to_dict()))
    assert set(data) == {f.name for f in fields(bs.ServeBench)}
    assert data["latencies_s"] == [1.0, 1.2, 1.1, 2.0] and data["size_wh"] == [640, 360]
    assert all(isinstance(data[k], float) for k in ("p50_s", "p95_s", "ratio_vs_single_job",
                                                       "ratio_vs_cli_render"))  # fmt: skip
    assert data["short_finished_first"] is True and data["settings"] == {"cpus": 2}


def test_the_table():
    lines = bs.format_serve_bench(_summary()).splitlines()
    assert lines[0] == "== bench serve: identity model, photo avatar 640x360 =="
    text = "\n".join(lines)
    for figure in ("1.15 s / 1.88 s", "25.00 FPS (450 frames in 18.0 s)", "0.83x", "1.67x",
                   "15.00 FPS (30.0 s)", "2.50 s (before the long one)", "70.0 s", "12.0 s",
                   "report.json chunks phase"):  # fmt: skip
        assert figure in text, figure


# ---------------------------------------------------------------- against the fake service


def test_measure_service_against_the_fake(tmp_path):
    audio = tmp_path / "audio"
    audio.mkdir()
    inputs = bs.ServeInputs(
        avatar="alice",
        warmup=write_wav(audio / "w.wav", 1.0),
        clips=tuple(write_wav(audio / f"c{i}.wav", 1.0) for i in range(3)),
        single=write_wav(audio / "single.wav", 3.0),
        concurrent=tuple(write_wav(audio / f"k{i}.wav", 1.0) for i in range(3)),
        long=write_wav(audio / "long.wav", 4.0),
        short=write_wav(audio / "short.wav", 1.0),
    )
    out = tmp_path / "out"
    out.mkdir()
    with FakeService(max_upload_bytes=1 << 20) as fake:
        fake.step = 25
        client = ServiceClient(fake.url, token=TOKEN)
        m = bs.measure_service(client, inputs, out, short_after_s=0.2)
        jobs = sorted(fake.jobs.values(), key=lambda j: j.created_at)
    assert len(m.latencies_s) == 3 and all(s > 0 for s in m.latencies_s)
    assert m.single_job_frames == 75 and m.single_job_fps_source == "JobStatus.fps"
    assert m.concurrent_frames == 75 and m.concurrent_wall_s > 0
    # the long job (only polled after the short clip is done) finishes after it
    assert m.short_finished_first and m.long_total_s >= m.short_latency_s + 0.2
    assert [j.frames_total for j in jobs] == [25, 25, 25, 25, 75, 25, 25, 25, 100, 25]
    assert all(j.state == "done" for j in jobs)
    assert len(list(out.glob("*.mp4"))) == 10


def test_report_fps_reads_the_jobs_chunks_phase(tmp_path):
    from lipsync_ray.client import JobOptions, JobState, JobStatus

    def status(job_id: str) -> JobStatus:
        return JobStatus(job_id, "a", JobState.DONE, 50, 50, 12.5, None, 0.0, 1.0, 5.0,
                         JobOptions())  # fmt: skip

    work = tmp_path / "jobs" / ("a" * 32) / "work"
    work.mkdir(parents=True)
    (work / "report.json").write_text(json.dumps({"frames": 50, "phases_s": {"chunks": 2.0}}))
    fps = bs.report_fps(tmp_path)
    assert fps(status("a" * 32)) == (25.0, "report.json chunks phase")
    assert fps(status("b" * 32)) == (12.5, "JobStatus.fps")


# ------------------------------------------------------------------- the service process


def test_the_service_process_is_started_and_stopped(tmp_path):
    with bs.ServiceProcess([sys.executable, str(FAKE)], log_path=tmp_path / "s.log") as service:
        assert ServiceClient(service.url, token=TOKEN).health() == "ok"
        pid = service.pid
        assert os.getpgid(pid) == pid  # a group of its own
    assert service.stop() == 0  # drained on SIGINT and exited; stopping again is harmless
    assert "serving on" in (tmp_path / "s.log").read_text()


def _ended(pid: int, timeout_s: float = 10.0) -> bool:
    """The process is gone, or a zombie that only waits for its reaper."""
    import psutil

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def test_a_service_that_ignores_sigint_is_terminated_with_its_group(tmp_path):
    script = (
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
        "signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(120)'])\n"
        "print('child', child.pid, flush=True)\n"
        "print('serving on http://127.0.0.1:9', flush=True)\n"
        "time.sleep(120)\n"
    )
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        service = bs.ServiceProcess([sys.executable, "-c", script], log_path=tmp_path / "s.log",
                                    stop_timeout_s=0.5)  # fmt: skip
        with service:
            assert service.url == "http://127.0.0.1:9"
        assert service.stop() == -15  # SIGINT ignored, SIGTERM ended it
        child = int((tmp_path / "s.log").read_text().split()[1])
        assert _ended(child), f"the service's child {child} survived"  # its group went too
        assert bystander.poll() is None  # nothing else was signalled
    finally:
        bystander.kill()
        bystander.wait()


def test_a_service_that_dies_before_ready_is_reported(tmp_path):
    script = "import sys; print('no models here', flush=True); sys.exit(3)"
    service = bs.ServiceProcess([sys.executable, "-c", script], log_path=tmp_path / "s.log")
    with pytest.raises(RuntimeError, match=r"exited 3 before it was ready: no models here"):
        service.__enter__()
