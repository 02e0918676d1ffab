"""The render service's parts without Ray or HTTP: the job database, option checks, the token,
warm renderers and their eviction, the avatar catalog and the job runner (with fake
renderers)."""

from __future__ import annotations

import json
import re
import stat
import threading
import time
from pathlib import Path

import pytest

from lipsync_ray.config import RenderConfig
from lipsync_ray.errors import Cancelled, InputError, ServiceError
from lipsync_ray.options import Blend, EncodeOptions
from lipsync_ray.service.avatars import AvatarCatalog, UnknownAvatarError
from lipsync_ray.service.jobs import (
    JobOptions,
    JobRecord,
    JobState,
    check_job_id,
    options_from_request,
)
from lipsync_ray.service.manager import JobManager, UnknownJobError
from lipsync_ray.service.settings import ServiceSettings, resolve_token
from lipsync_ray.service.store import JobStore
from lipsync_ray.service.warm import WarmKey, WarmRenderers
from lipsync_ray.vad import SilenceOptions

TOKEN = "t" * 32
CONFIG = RenderConfig(model="unet.onnx", audio_encoder="encoder.onnx")

# ------------------------------------------------------------------------------- store


def test_store_round_trip_and_restart(tmp_path):
    store = JobStore(tmp_path)
    a = JobRecord.new("alice", JobOptions(crf=23, blend="paste"))
    time.sleep(0.01)
    b = JobRecord.new("bob", JobOptions(start_frame=3, silence_passthrough=True))
    store.put(a)
    store.put(b)
    b = store.update(b, state=JobState.RUNNING, started_at=1.5, frames_done=7, frames_total=25,
                     frames_reused=5)  # fmt: skip
    a = store.update(a, state=JobState.DONE, finished_at=2.5, frames_done=25, frames_total=25)
    assert store.get(a.id) == a and store.get(b.id) == b
    store.close()

    again = JobStore(tmp_path)  # a restarted service
    assert again.get(a.id) == a
    assert again.get(b.id) == b
    assert [r.id for r in again.list()] == [b.id, a.id]  # newest first
    assert [r.id for r in again.list(limit=1)] == [b.id]
    assert [r.id for r in again.unfinished()] == [b.id]
    assert again.get("0" * 32) is None
    assert (tmp_path / "jobs.sqlite3").is_file()


# ----------------------------------------------------------------------------- options

DEFAULTS = JobOptions()


@pytest.mark.parametrize(
    "given, message",
    [
        ({"start_frame": -1}, "start_frame must be >= 0, got -1"),
        ({"start_frame": 8}, "start_frame must be < 8"),  # 5 frames: period 8
        ({"blend": "soft"}, "blend must be feather or paste, got 'soft'"),
        ({"crf": 52}, "crf must be in 0..51, got 52"),
        ({"crf": -1}, "crf must be in 0..51, got -1"),
        ({"preset": "warp"}, "preset must be one of ultrafast"),
    ],
)
def test_bad_options_are_refused(given, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        options_from_request(DEFAULTS, avatar_frames=5, **given)


@pytest.mark.parametrize(
    "given, expected",
    [
        ({}, DEFAULTS),
        ({"start_frame": 7}, JobOptions(start_frame=7)),
        ({"blend": "paste"}, JobOptions(blend="paste")),
        ({"blend": "hard"}, JobOptions(blend="paste")),
        ({"blend": "Feather"}, JobOptions(blend="feather")),
        ({"silence_passthrough": True}, JobOptions(silence_passthrough=True)),
        ({"crf": 0, "preset": "slow"}, JobOptions(crf=0, preset="slow")),
    ],
)
def test_good_options(given, expected):
    assert options_from_request(DEFAULTS, avatar_frames=5, **given) == expected


def test_options_map_onto_the_render_config():
    base = RenderConfig(
        model="m.onnx", audio_encoder="e.onnx", encode=EncodeOptions(crf=30, preset="fast")
    )
    defaults = JobOptions.defaults(base)
    assert defaults == JobOptions(crf=30, preset="fast")
    assert defaults.renderer_config(base) == base  # the defaults change nothing
    config = JobOptions(blend="paste", silence_passthrough=True, crf=12, preset="slow",
                        start_frame=3).renderer_config(base)  # fmt: skip
    assert config.blend.mode is Blend.HARD and config.blend.feather == base.blend.feather
    assert config.silence == SilenceOptions()
    assert (config.encode.crf, config.encode.preset) == (12, "slow")
    assert config.start_frame == 0  # a Renderer takes it per render
    assert config.model == "m.onnx" and config.pool == base.pool


def test_job_ids_and_status():
    record = JobRecord.new("alice", JobOptions())
    assert check_job_id(record.id)
    for bad in ("../x", "0" * 31, "0" * 33, "G" * 32, "A" * 32, ""):
        assert not check_job_id(bad)
    status = record.status()
    assert status["state"] == "queued" and status["fps"] is None and status["error"] is None
    assert set(status) == {
        "id", "avatar", "state", "frames_done", "frames_total", "fps", "error", "created_at",
        "started_at", "finished_at", "options",
    }  # fmt: skip
    run = JobRecord(**{**record.__dict__, "started_at": 10.0, "finished_at": 12.0,
                       "frames_done": 50})  # fmt: skip
    assert run.fps() == pytest.approx(25.0)
    resumed = JobRecord(**{**run.__dict__, "frames_reused": 20})
    assert resumed.fps() == pytest.approx(15.0)  # frames found done are not rendered


# ------------------------------------------------------------------------------- token


def test_token_from_the_environment_first(tmp_path):
    file = tmp_path / "tok"
    file.write_text("f" * 20 + "\n")
    token, where = resolve_token(tmp_path, file, env={"LIPSYNC_RAY_TOKEN": "e" * 20})
    assert (token, where) == ("e" * 20, "$LIPSYNC_RAY_TOKEN")
    token, where = resolve_token(tmp_path, file, env={})
    assert (token, where) == ("f" * 20, str(file))
    assert not (tmp_path / "token").exists()


def test_token_file_created_0600_then_reused(tmp_path):
    token, where = resolve_token(tmp_path, None, env={})
    path = tmp_path / "token"
    assert where == str(path) and path.read_text().strip() == token and len(token) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert resolve_token(tmp_path, None, env={}) == (token, str(path))


@pytest.mark.parametrize(
    "content, error, message",
    [
        ("", ServiceError, "the token file is empty"),
        ("short", InputError, "the token must be >= 16 characters"),
        ("has a space in it here", InputError, "without spaces"),
    ],
)
def test_bad_token_files(tmp_path, content, error, message):
    file = tmp_path / "tok"
    file.write_text(content)
    with pytest.raises(error, match=message):
        resolve_token(tmp_path, file, env={})


def test_missing_token_file(tmp_path):
    with pytest.raises(ServiceError, match="cannot read the token file"):
        resolve_token(tmp_path, tmp_path / "nope", env={})


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"max_warm": 0}, "--max-warm must be >= 1, got 0"),
        ({"max_running": 0}, "--max-running must be >= 1, got 0"),
        ({"max_upload_bytes": 0}, "--max-upload-mb must be > 0"),
        ({"drain_timeout_s": -1.0}, "--drain-timeout must be >= 0 s, got -1"),
        ({"port": 70000}, "--port must be in 0..65535, got 70000"),
    ],
)
def test_bad_settings(tmp_path, changes, message):
    with pytest.raises(InputError, match=message):
        ServiceSettings(avatars=str(tmp_path), config=CONFIG, state_dir=tmp_path, token=TOKEN,
                        **changes)  # fmt: skip


def test_settings_hide_the_token(tmp_path):
    settings = ServiceSettings(avatars="a", config=CONFIG, state_dir=tmp_path, token=TOKEN)
    assert TOKEN not in repr(settings)
    assert settings.url == "http://127.0.0.1:8000"


# --------------------------------------------------------------------------- warm pool


class FakeRenderer:
    def __init__(self, key: WarmKey, log: list) -> None:
        self.key, self.log, self.closed = key, log, False
        log.append(("make", key.avatar))

    def close(self) -> None:
        self.closed = True
        self.log.append(("close", self.key.avatar))


def _key(name: str) -> WarmKey:
    return WarmKey.of(name, CONFIG)


def test_same_key_same_renderer_and_settings_matter():
    log: list = []
    warm = WarmRenderers(lambda key: FakeRenderer(key, log), max_warm=2)
    with warm.lease(_key("a")) as r1, warm.lease(_key("a")) as r2:
        assert r1 is r2
    other = WarmKey.of("a", RenderConfig(model="unet.onnx", audio_encoder="encoder.onnx",
                                         encode=EncodeOptions(crf=30)))  # fmt: skip
    assert other != _key("a")
    with warm.lease(other) as r3:
        assert r3 is not r1
    assert log == [("make", "a"), ("make", "a")]


def test_least_recently_used_idle_renderer_is_evicted():
    log: list = []
    warm = WarmRenderers(lambda key: FakeRenderer(key, log), max_warm=2)
    for name in ("a", "b", "a"):  # a is now the most recently used
        with warm.lease(_key(name)):
            pass
    with warm.lease(_key("c")):
        pass
    assert log == [("make", "a"), ("make", "b"), ("close", "b"), ("make", "c")]
    assert [k.avatar for k in warm.warm_keys()] == ["a", "c"]
    warm.close()
    assert sorted(log[4:]) == [("close", "a"), ("close", "c")]


def test_a_renderer_in_use_is_never_evicted():
    log: list = []
    warm = WarmRenderers(lambda key: FakeRenderer(key, log), max_warm=1)
    got: dict = {}
    with warm.lease(_key("a")) as a:

        def other():
            with warm.lease(_key("b")) as b:
                got["b"] = b

        t = threading.Thread(target=other)
        t.start()
        time.sleep(0.5)
        assert "b" not in got and not a.closed  # b waits for a to go idle
    t.join(5)
    assert got["b"].key.avatar == "b" and a.closed
    assert log == [("make", "a"), ("close", "a"), ("make", "b")]


def test_a_wait_for_room_stops_on_cancel():
    warm = WarmRenderers(lambda key: FakeRenderer(key, []), max_warm=1)
    cancel = threading.Event()
    with warm.lease(_key("a")):
        threading.Timer(0.3, cancel.set).start()
        with pytest.raises(Cancelled), warm.lease(_key("b"), cancel):
            pass
    assert [k.avatar for k in warm.warm_keys()] == ["a"]


def test_a_failed_make_leaves_no_entry():
    def make(key):
        raise InputError("bad model")

    warm = WarmRenderers(make, max_warm=1)
    for _ in range(2):
        with pytest.raises(InputError, match="bad model"), warm.lease(_key("a")):
            pass
    assert warm.warm_keys() == []


# ------------------------------------------------------------------------------ avatars


def _bundle(root: Path, name: str, frames: int = 5) -> Path:
    path = root / name
    path.mkdir(parents=True)
    (path / "avatar.json").write_text(json.dumps({"frame_count": frames}))
    return path


@pytest.fixture
def avatars_dir(tmp_path) -> Path:
    root = tmp_path / "avatars"
    _bundle(root, "alice", frames=5)
    _bundle(root, "bob", frames=9)
    (root / "not-a-bundle").mkdir()
    (root / "file.txt").write_text("x")
    _bundle(tmp_path, "outside")  # a bundle next to AVATARS_DIR, not in it
    return root


def test_avatar_catalog_lists_bundles(avatars_dir):
    catalog = AvatarCatalog(str(avatars_dir))
    assert catalog.names() == ["alice", "bob"]
    assert catalog.location("bob").path == str(avatars_dir / "bob")
    assert catalog.frame_count("bob") == 9


@pytest.mark.parametrize(
    "name",
    ["../outside", "..", ".", "", "alice/..", "alice/", "/etc", "not-a-bundle", "file.txt",
     "carol", "ALICE", "alice\x00"],
)  # fmt: skip
def test_avatar_names_never_become_paths(avatars_dir, name):
    catalog = AvatarCatalog(str(avatars_dir))
    with pytest.raises(UnknownAvatarError, match="unknown avatar"):
        catalog.location(name)


def test_a_new_bundle_is_seen(avatars_dir):
    catalog = AvatarCatalog(str(avatars_dir))
    assert "carol" not in catalog.names()
    _bundle(avatars_dir, "carol")
    assert catalog.location("carol").name == "carol"  # an unknown name refreshes the listing


def test_avatars_dir_must_be_a_directory(tmp_path):
    with pytest.raises(InputError, match="AVATARS_DIR is not a directory"):
        AvatarCatalog(str(tmp_path / "missing"))


# --------------------------------------------------------------------------- job runner


class FakeJobRenderer:
    """Writes the output after ``frames`` steps of ``step_s``; honours cancel."""

    def __init__(self, location, config, *, frames=4, step_s=0.0, fail=None, gate=None):
        self.location, self.config = location, config
        self.frames, self.step_s, self.fail, self.gate = frames, step_s, fail, gate
        self.renders: list[dict] = []
        self.closed = False

    def render(self, audio, output, *, start_frame=None, work_dir=None, features=None,
               on_frames=None, cancel=None):  # fmt: skip
        self.renders.append({"audio": Path(audio), "start_frame": start_frame,
                             "work_dir": Path(work_dir)})  # fmt: skip
        if self.gate is not None:
            self.gate.wait(10)
        if self.fail:
            raise InputError(self.fail + "\nsecond line")
        for done in range(self.frames + 1):
            if cancel is not None and cancel.is_set():
                raise Cancelled("cancelled")
            if on_frames:
                on_frames(done, self.frames)
            time.sleep(self.step_s)
        Path(output).write_bytes(b"mp4")
        return type("Report", (), {"frames": self.frames})()

    def close(self):
        self.closed = True


def _manager(tmp_path, avatars_dir, made: list, **kw) -> JobManager:
    settings = ServiceSettings(avatars=str(avatars_dir), config=CONFIG,
                               state_dir=tmp_path / "state", token=TOKEN,
                               max_running=kw.pop("max_running", 2))  # fmt: skip
    (tmp_path / "state").mkdir(exist_ok=True)

    def make(location, config):
        renderer = FakeJobRenderer(location, config, **kw)
        made.append(renderer)
        return renderer

    return JobManager(settings, make_renderer=make)


def _upload(manager: JobManager) -> Path:
    path = manager.new_upload()
    path.write_bytes(b"RIFF....")
    return path


def _wait(manager: JobManager, job_id: str, states=("done", "failed", "cancelled")) -> JobRecord:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        record = manager.get(job_id)
        if record.state.value in states:
            return record
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} still {manager.get(job_id).state}")


def test_a_job_runs_through_the_warm_renderer(tmp_path, avatars_dir):
    made: list = []
    manager = _manager(tmp_path, avatars_dir, made)
    a = manager.submit("alice", JobOptions(start_frame=2), _upload(manager))
    b = manager.submit("alice", JobOptions(), _upload(manager))
    for job in (a, b):
        record = _wait(manager, job.id)
        assert record.state is JobState.DONE and (record.frames_done, record.frames_total) == (4, 4)
        assert record.started_at is not None and record.finished_at >= record.started_at
        assert (manager.video(job.id)).read_bytes() == b"mp4"
    assert len(made) == 1  # one warm renderer for both
    renders = {r["audio"].parent.name: r for r in made[0].renders}
    assert renders[a.id]["start_frame"] == 2 and renders[a.id]["work_dir"].name == "work"
    assert renders[a.id]["audio"].read_bytes() == b"RIFF...."
    assert made[0].location.name == "alice"
    assert not list(manager.uploads_dir.iterdir())  # the upload moved into the job's dir
    manager.close()
    assert made[0].closed


def test_a_failed_job_has_one_error_line(tmp_path, avatars_dir):
    manager = _manager(tmp_path, avatars_dir, [], fail="start frame out of range")
    job = manager.submit("alice", JobOptions(), _upload(manager))
    record = _wait(manager, job.id)
    assert record.state is JobState.FAILED and record.error == "start frame out of range"
    assert manager.video(job.id) is None
    manager.close()


def test_cancel_queued_and_running_jobs(tmp_path, avatars_dir):
    gate = threading.Event()
    manager = _manager(tmp_path, avatars_dir, [], max_running=1, gate=gate, step_s=0.05)
    running = manager.submit("alice", JobOptions(), _upload(manager))
    queued = manager.submit("alice", JobOptions(), _upload(manager))
    _wait(manager, running.id, ("running",))
    assert manager.cancel(queued.id).state is JobState.CANCELLED
    assert manager.cancel(running.id).state is JobState.CANCELLED
    gate.set()
    assert _wait(manager, running.id).state is JobState.CANCELLED
    assert _wait(manager, queued.id).state is JobState.CANCELLED
    time.sleep(0.2)
    assert manager.get(running.id).state is JobState.CANCELLED  # never overwritten
    assert manager.cancel(running.id).state is JobState.CANCELLED  # unchanged
    manager.close()


@pytest.mark.parametrize("job_id", ["0" * 32, "../../etc", "x", "0" * 31 + "/"])
def test_unknown_jobs(tmp_path, avatars_dir, job_id):
    manager = _manager(tmp_path, avatars_dir, [])
    for call in (manager.get, manager.cancel, manager.video, manager.job_dir):
        if call == manager.job_dir and job_id == "0" * 32:
            continue  # a well-formed id has a directory name, known or not
        with pytest.raises(UnknownJobError, match="unknown job"):
            call(job_id)
    manager.close()


def test_unknown_avatar_is_refused_at_submit(tmp_path, avatars_dir):
    manager = _manager(tmp_path, avatars_dir, [])
    with pytest.raises(UnknownAvatarError, match=re.escape("unknown avatar '../outside'")):
        manager.submit("../outside", JobOptions(), _upload(manager))
    assert manager.list() == []
    manager.close()


def test_unfinished_jobs_resume_after_a_restart(tmp_path, avatars_dir):
    gate = threading.Event()
    first = _manager(tmp_path, avatars_dir, [], max_running=1, gate=gate)
    running = first.submit("alice", JobOptions(), _upload(first))
    queued = first.submit("alice", JobOptions(crf=30), _upload(first))
    _wait(first, running.id, ("running",))
    # a crash: the records stay as they are (running, queued); `first` runs nothing more
    # (its render hangs on the gate until the end)
    first._executor.shutdown(wait=False, cancel_futures=True)

    made: list = []
    second = _manager(tmp_path, avatars_dir, made)
    assert {r.id: r.state for r in second.list()} == {
        running.id: JobState.RUNNING, queued.id: JobState.QUEUED,
    }  # fmt: skip
    assert sorted(second.resume()) == sorted([running.id, queued.id])
    for job in (running, queued):
        assert _wait(second, job.id).state is JobState.DONE
    # each render reused the job's own work directory
    dirs = sorted(r["work_dir"] for m in made for r in m.renders)
    assert dirs == sorted(second.job_dir(j.id) / "work" for j in (running, queued))
    second.close()
    gate.set()
    first.drain(0)  # its hung render stops (cleanup)


def test_a_drain_leaves_running_jobs_resumable(tmp_path, avatars_dir):
    manager = _manager(tmp_path, avatars_dir, [], max_running=1, frames=200, step_s=0.02)
    running = manager.submit("alice", JobOptions(), _upload(manager))
    queued = manager.submit("alice", JobOptions(), _upload(manager))
    _wait(manager, running.id, ("running",))
    manager.drain(0.2)
    assert manager.get(running.id).state is JobState.QUEUED
    assert manager.get(queued.id).state is JobState.QUEUED
    assert 0 < manager.get(running.id).frames_done < 200
    with pytest.raises(Exception, match="shutting down"):
        manager.submit("alice", JobOptions(), _upload(manager))
    manager.close()


# ------------------------------------------------------------------ the command's refusals


@pytest.mark.parametrize(
    "change, env, message",
    [
        ({"avatars": "missing"}, {}, "AVATARS_DIR is not a directory"),
        ({"--model": "missing.onnx"}, {}, "missing.onnx"),
        ({"--audio-encoder": "MODEL"}, {}, "audio encoder"),
        ({}, {"LIPSYNC_RAY_TOKEN": "short"}, "the token must be >= 16 characters"),
        ({"--token-file": "missing-token"}, {}, "cannot read the token file"),
    ],
)
def test_serve_refuses_before_ray(good, tmp_path, monkeypatch, capsys, change, env, message):
    """Bad models, AVATARS_DIR or token: one line, exit 2 or 1, before Ray starts (the unit
    tier's tripwire fails the test if it does)."""
    from lipsync_ray.cli import main

    avatars = tmp_path / "avatars"
    avatars.mkdir()
    args = {"avatars": str(avatars), "--model": str(good["model"]),
            "--audio-encoder": str(good["encoder"])}  # fmt: skip
    for key, value in change.items():
        value = str(good["model"]) if value == "MODEL" else str(tmp_path / value)
        args[key] = value
    monkeypatch.delenv("LIPSYNC_RAY_TOKEN", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    argv = ["serve", args.pop("avatars"), "--state-dir", str(tmp_path / "state")]
    for key, value in args.items():
        argv += [key, value]
    code = main(argv)
    err = capsys.readouterr().err
    assert code in (1, 2) and message in err, err
    assert len([line for line in err.splitlines() if "error" in line]) == 1, err


def test_serve_run_builder(good, tmp_path, monkeypatch):
    """`serve run lipsync_ray.service.deploy:app_builder argv=...` parses `serve`'s flags."""
    from lipsync_ray.service.deploy import app_builder

    avatars = tmp_path / "avatars"
    _bundle(avatars, "alice")
    monkeypatch.setenv("LIPSYNC_RAY_TOKEN", TOKEN)
    argv = (f"{avatars} --model {good['model']} --audio-encoder {good['encoder']} "
            f"--state-dir {tmp_path / 'state'} --crf 30 --max-running 2")  # fmt: skip
    app = app_builder({"argv": argv})
    deployment = app._bound_deployment
    (settings,) = deployment.init_args
    assert deployment.name == "lipsync-ray"
    assert deployment.ray_actor_options["num_cpus"] == 0
    assert settings.avatars == str(avatars) and settings.token == TOKEN
    assert settings.config.encode.crf == 30 and settings.max_running == 2
    assert settings.state_dir == tmp_path / "state"


def test_serve_makes_local_paths_absolute(good, tmp_path, monkeypatch):
    """The replica may run in another directory: AVATARS_DIR and the models are absolute."""
    import shutil

    from lipsync_ray.service.deploy import app_builder

    _bundle(tmp_path / "avatars", "alice")
    shutil.copy(good["model"], tmp_path / "unet.onnx")
    shutil.copy(good["encoder"], tmp_path / "enc.onnx")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LIPSYNC_RAY_TOKEN", TOKEN)
    app = app_builder({"argv": "avatars --model unet.onnx --audio-encoder enc.onnx "
                               "--state-dir state --trt-cache trt"})  # fmt: skip
    (settings,) = app._bound_deployment.init_args
    assert settings.avatars == str(tmp_path / "avatars")
    assert settings.config.model == str(tmp_path / "unet.onnx")
    assert settings.config.audio_encoder == str(tmp_path / "enc.onnx")
    assert settings.config.session.trt_cache_dir == str(tmp_path / "trt")
    assert settings.state_dir == tmp_path / "state"
