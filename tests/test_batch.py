"""Batch renders: one set of actors for many audios; a broken job does not stop the others."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lipsync_ray.batch import BatchJob, load_jobs, render_batch
from lipsync_ray.cli import main
from lipsync_ray.config import PoolConfig, RenderConfig
from lipsync_ray.dev.speech import synth_speech, write_audio
from lipsync_ray.dev.synthetic import make_demo_avatar
from lipsync_ray.encode import probe
from lipsync_ray.errors import InputError

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def avatar(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("batch-avatar")
    return Path(make_demo_avatar(root / "avatar", seconds=0.6, size_wh=(256, 192), seed=2).path)


def test_batch_shares_actors_and_reports_failures(ray_cluster, small_models, avatar, tmp_path):
    jobs_file = tmp_path / "jobs.jsonl"
    lines = []
    for i in range(5):
        write_audio(tmp_path / f"a{i}.wav", synth_speech(0.6 + 0.2 * i, seed=i))
        lines.append({"audio": f"a{i}.wav", "output": f"out/{i}.mp4", "start_frame": i})
    (tmp_path / "broken.wav").write_bytes(b"RIFF not really a wav file at all")
    lines.insert(2, {"audio": "broken.wav", "output": "out/broken.mp4"})
    (tmp_path / "out").mkdir()
    jobs_file.write_text("\n".join(json.dumps(x) for x in lines) + "\n")

    argv = ["render-batch", str(avatar), str(jobs_file), "--model", str(small_models["unet"]),
            "--audio-encoder", str(small_models["encoder"]), "--chunk-frames", "16",
            "--gpus-per-actor", "0"]  # fmt: skip
    assert main(argv) == 2  # one bad input among the jobs

    summary = json.loads((tmp_path / "jobs.summary.json").read_text())
    outcomes = summary["jobs"]
    assert [j["ok"] for j in outcomes] == [True, True, False, True, True, True]
    broken = outcomes[2]
    assert broken["exit_code"] == 2 and "broken.wav" in broken["error"]
    assert not (tmp_path / "out" / "broken.mp4").exists()
    for job in (j for j in outcomes if j["ok"]):
        assert job["fps"] > 0
        assert probe(job["output"]).video_frames == job["frames"]
        report = json.loads(Path(job["report"]).read_text())
        # every job ran on the actors started for the first one
        assert [a["pid"] for a in report["actors"]] == [a["pid"] for a in summary["actors"]]
    counts = [json.loads(Path(j["report"]).read_text())["settings"]["renders_on_these_actors"]
              for j in outcomes if j["ok"]]  # fmt: skip
    assert counts == [1, 2, 3, 4, 5]


def test_render_batch_api(ray_cluster, small_models, avatar, tmp_path):
    write_audio(tmp_path / "a.wav", synth_speech(0.8, seed=9))
    config = RenderConfig(
        model=str(small_models["unet"]),
        audio_encoder=str(small_models["encoder"]),
        pool=PoolConfig(gpus_per_actor=0.0, inference_actors=1, compositors=1),
    )
    jobs = [BatchJob(str(tmp_path / "a.wav"), str(tmp_path / f"{k}.mp4")) for k in "xy"]
    report = render_batch(avatar, jobs, config)
    assert report.exit_code == 0 and not report.failed
    assert len(report.actors) == 2  # one inference actor, one compositor, for both jobs


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "empty jobs file"),
        ("not json\n", "line 1: not JSON"),
        ('{"audio": "a.wav"}\n', 'line 1: expected an object with "audio" and "output"'),
        ('{"audio": "a.wav", "output": "o.mp4", "speed": 2}\n', "unknown keys"),
    ],
)
def test_bad_jobs_files(tmp_path, content, message):
    path = tmp_path / "jobs.jsonl"
    path.write_text(content)
    with pytest.raises(InputError, match=message):
        load_jobs(path)
