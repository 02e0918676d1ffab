"""Nothing lost: what is refused before anything starts, and what a failure leaves in place.

Each table runs the ``lipsync-ray`` command in-process (``cli.main``) with ``ray.init``
replaced by a tripwire (``helpers.ray_tripwire``), so a case proves it was rejected
before Ray started; it asserts exit code 2, exactly one ``lipsync-ray: error:`` line that
names the culprit, and which files survive byte for byte. A few cases also run as a real
subprocess. The rest are unit tests of the public pieces (encode, storage).

- an output that is one of the inputs, through links and hard links (``--overwrite`` given);
- a failed or interrupted encode keeps the previous output;
- jobs files: wrong types, shared outputs and work directories, an output that is an input;
- the staging cache: this user's own, mode 0700, and a copy reused only while intact;
- an output or work directory that cannot be written; input problems before "use
  --overwrite".
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from helpers import cli_command, one_error_line, ray_tripwire
from test_bad_inputs import _render_argv
from test_encode import SR, N, make_frame, tone, write_segments
from test_storage import remote_fs

from lipsync_ray.cli import main
from lipsync_ray.encode import EncodeOptions, concat_segments, encode_video
from lipsync_ray.errors import EncodeError, InputError
from lipsync_ray.storage import local_cache, resolve, stage_in

# ------------------------------------------------------------------------------- helpers


@pytest.fixture
def no_ray(monkeypatch):
    """Starting or joining Ray fails: every case here must be decided before it."""
    ray_tripwire(monkeypatch)


def _digest(path: Path) -> str:
    """SHA-256 of a file, or of every file under a directory (names included)."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        digest.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        digest.update(f.read_bytes())
    return digest.hexdigest()


@pytest.fixture
def mine(good, tmp_path) -> dict[str, Path]:
    """Private copies of every input (avatar, audio, models, features) that a case may point
    the output at: a bug could then only destroy these."""
    root = tmp_path / "in"
    root.mkdir()
    feats = root / "feats.npy"
    np.save(feats, np.random.default_rng(0).standard_normal((30, 512)).astype(np.float32))
    return {
        "avatar": Path(shutil.copytree(good["avatar"], root / "avatar")),
        "audio": Path(shutil.copy(good["audio"], root / "speech.wav")),
        "model": Path(shutil.copy(good["model"], root / "unet.onnx")),
        "encoder": Path(shutil.copy(good["encoder"], root / "encoder.onnx")),
        "features": feats,
    }


def _digests(files: dict[str, Path]) -> dict[str, str]:
    return {k: _digest(p) for k, p in files.items()}


def _argv(files: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return _render_argv(files, out, extra=list(extra))


def _run(argv: list[str], capsys) -> tuple[int, str]:
    rc = main(argv)
    return rc, one_error_line(capsys.readouterr().err)


# ------------------------------------------------------------ 4. an output that is an input


def _symlink(target_key: str, rel: str = "") -> Callable[[dict, Path], Path]:
    def make(files: dict, tmp: Path) -> Path:
        out = tmp / "out.mp4"
        out.symlink_to(files[target_key] / rel if rel else files[target_key])
        return out

    return make


def _hardlink(target_key: str) -> Callable[[dict, Path], Path]:
    def make(files: dict, tmp: Path) -> Path:
        out = tmp / "out.mp4"
        os.link(files[target_key], out)
        return out

    return make


def _audio_named_mp4(files: dict, tmp: Path) -> Path:
    """An audio track in an .mp4 (AAC speech often is one), given as the output too."""
    moved = files["audio"].with_suffix(".mp4")
    files["audio"].rename(moved)
    files["audio"] = moved
    return moved


def _inside_avatar(files: dict, tmp: Path) -> Path:
    return files["avatar"] / "render.mp4"


@dataclass(frozen=True)
class OutputCase:
    id: str
    make: Callable[[dict, Path], Path]  # returns the output path (may edit the inputs)
    culprit: str  # what the line must name besides the output
    message: str  # regex the line must match
    extra: tuple[str, ...] = ()


OUTPUT_IS_AN_INPUT = [
    OutputCase("the-audio", _audio_named_mp4, "speech.mp4", "is an input of this render"),
    OutputCase("link-to-the-audio", _symlink("audio"), "speech.wav", "is an input"),
    OutputCase("hard-link-to-the-audio", _hardlink("audio"), "speech.wav", "is an input"),
    OutputCase("link-to-the-generator", _symlink("model"), "unet.onnx", "is an input"),
    OutputCase("hard-link-to-the-encoder", _hardlink("encoder"), "encoder.onnx", "is an input"),
    OutputCase(
        "hard-link-to-the-features",
        _hardlink("features"),
        "feats.npy",
        "is an input",
        ("--features", "{features}"),
    ),
    OutputCase("link-to-an-avatar-file", _symlink("avatar", "frames.npy"), "avatar", "avatar"),
    OutputCase("new-file-in-the-avatar", _inside_avatar, "avatar", "inside the avatar bundle"),
]


@pytest.mark.parametrize("case", OUTPUT_IS_AN_INPUT, ids=lambda c: c.id)
def test_an_output_that_is_an_input_is_refused(case, mine, tmp_path, capsys, no_ray):
    out = case.make(mine, tmp_path)
    before = _digests(mine)
    extra = [a.format(**mine) for a in case.extra]
    if case.extra:  # --features replaces the audio encoder
        argv = _argv(mine, out, "--overwrite", *extra)
        argv.remove("--audio-encoder")
        argv.remove(str(mine["encoder"]))
    else:
        argv = _argv(mine, out, "--overwrite")
    rc, line = _run(argv, capsys)
    assert rc == 2, line
    assert str(out) in line and case.culprit in line, line
    assert re.search(case.message, line), line
    assert _digests(mine) == before  # every input byte for byte
    assert not Path(f"{out}.work").exists()


def test_an_output_that_is_an_input_subprocess(mine, tmp_path):
    out = _hardlink("audio")(mine, tmp_path)
    before = _digests(mine)
    result = subprocess.run(
        [*cli_command(), *_argv(mine, out, "--overwrite")],
        capture_output=True, text=True, timeout=120,
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
    )  # fmt: skip
    line = one_error_line(result.stderr)
    assert result.returncode == 2 and "is an input of this render" in line, result.stderr
    assert _digests(mine) == before


# ------------------------------------------------- 4. a failed encode keeps the old output


def _interrupted_frames():
    yield from (make_frame(i) for i in range(5))
    raise KeyboardInterrupt


def _bad_frame_midway():
    yield from (make_frame(i) for i in range(5))
    yield np.zeros((10, 10), np.uint8)


@pytest.mark.parametrize(
    ("case", "error"),
    [
        ("single-interrupted", KeyboardInterrupt),  # Ctrl-C during the final encode
        ("single-bad-frame", EncodeError),
        ("join-missing-segment", EncodeError),
        ("join-wrong-frame-count", EncodeError),
    ],
)
def test_a_failed_encode_keeps_the_previous_output(tmp_path, case, error):
    out = tmp_path / "out" / "out.mp4"
    out.parent.mkdir()
    previous = b"the previous render, whole"
    out.write_bytes(previous)
    options = EncodeOptions()
    with pytest.raises(error):
        if case.startswith("single"):
            frames = _interrupted_frames() if case.endswith("interrupted") else _bad_frame_midway()
            encode_video(frames, tone(1.0), SR, out, options, expected_frames=N)
        else:
            (tmp_path / "segments").mkdir()
            segments = write_segments(tmp_path / "segments", options)
            if case == "join-missing-segment":
                segments[1].unlink()
            expected = N + 1 if case.endswith("count") else N
            concat_segments(segments, tone(1.0), SR, out, options, expected_frames=expected)
    assert out.read_bytes() == previous
    assert list(out.parent.iterdir()) == [out]  # and no temp file beside it


# ---------------------------------------------------------------------- 5. jobs files


def _job(audio="a.wav", output="a.mp4", **more) -> dict:
    return {"audio": audio, "output": output, **more}


# (id, lines (dicts, or raw strings), the line number named, expected message)
JOBS = [
    ("audio-a-number", [_job(audio=3)], 1, '"audio" must be a non-empty string'),
    ("output-empty", [_job(output="")], 1, '"output" must be a non-empty string'),
    ("output-null", [_job(output=None)], 1, '"output" must be a non-empty string'),
    ("start-frame-a-string", [_job(start_frame="40")], 1, '"start_frame" must be an integer'),
    ("start-frame-a-float", [_job(start_frame=2.5)], 1, '"start_frame" must be an integer'),
    ("start-frame-true", [_job(start_frame=True)], 1, '"start_frame" must be an integer'),
    ("start-frame-negative", [_job(start_frame=-1)], 1, r'"start_frame" .*>= 0, got -1'),
    ("work-dir-a-list", [_job(work_dir=["w"])], 1, '"work_dir" must be a non-empty string'),
    ("features-an-object", [_job(features={})], 1, '"features" must be a non-empty string'),
    (
        "numbered-past-comments",
        ["# two clips", "", _job(), _job("b.wav", "b.mp4", start_frame="x")],
        4,
        '"start_frame"',
    ),
    ("same-output", [_job(), _job("b.wav", "a.mp4")], 2, "also the output of line 1"),
    (
        "same-output-spelled-apart",
        [_job(), _job("b.wav", "sub/../a.mp4")],
        2,
        "also the output of line 1",
    ),
    ("same-output-through-a-link", [_job(), _job("b.wav", "link.mp4")], 2, "also the output"),
    (
        "same-work-dir",
        [_job(work_dir="w"), _job("b.wav", "b.mp4", work_dir="w")],
        2,
        "work directory .* overlaps that of line 1",
    ),
    (
        "work-dir-inside-another",
        [_job(), _job("b.wav", "b.mp4", work_dir="a.mp4.work/b")],
        2,
        "overlaps that of line 1",
    ),
    ("output-is-a-later-jobs-audio", [_job(), _job("a.mp4", "b.mp4")], 1,
     "is the audio file of line 2"),
    ("output-is-its-own-features", [_job(features="a.mp4")], 1, "is the feature file of line 1"),
    ("output-inside-the-avatar", [_job(output="avatar/x.mp4")], 1, "inside the avatar bundle"),
    # a relative path stays in the jobs file's folder (absolute paths and URIs say elsewhere)
    ("output-leaves-the-folder", [_job(output="../x.mp4")], 1,
     '"output" leaves the jobs file\'s folder'),
    ("audio-leaves-the-folder", [_job(), _job("sub/../../a.wav", "b.mp4")], 2,
     '"audio" leaves the jobs file\'s folder'),
    ("work-dir-leaves-the-folder", [_job(work_dir="../../w")], 1, '"work_dir" leaves'),
    ("features-leave-the-folder", [_job(features="../f.npy")], 1, '"features" leaves'),
]  # fmt: skip


@pytest.mark.parametrize(
    ("lines", "number", "message"), [c[1:] for c in JOBS], ids=[c[0] for c in JOBS]
)
def test_jobs_files_are_checked_whole_before_ray(
    lines, number, message, mine, tmp_path, capsys, no_ray
):
    shutil.copy(mine["audio"], tmp_path / "a.wav")
    shutil.copy(mine["audio"], tmp_path / "b.wav")
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.mp4").symlink_to(tmp_path / "a.mp4")  # dangling until a.mp4 is written
    (tmp_path / "avatar").symlink_to(mine["avatar"])
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    before = sorted(p.name for p in tmp_path.iterdir())
    argv = ["render-batch", str(tmp_path / "avatar"), str(jobs), "--model", str(mine["model"]),
            "--audio-encoder", str(mine["encoder"]), "--gpus-per-actor", "0"]  # fmt: skip
    rc, line = _run(argv, capsys)
    assert rc == 2, line
    assert f"line {number}: " in line and str(jobs) in line, line
    assert re.search(message, line), line
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, summary, work dir


def test_a_bad_jobs_file_subprocess(mine, tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps(_job(str(mine["audio"]), start_frame="7")) + "\n")
    argv = ["render-batch", str(mine["avatar"]), str(jobs), "--model", str(mine["model"]),
            "--audio-encoder", str(mine["encoder"])]  # fmt: skip
    result = subprocess.run(
        [*cli_command(), *argv], capture_output=True, text=True, timeout=120,
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
    )  # fmt: skip
    line = one_error_line(result.stderr)
    assert result.returncode == 2 and 'line 1: "start_frame" must be an integer' in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "jobs.jsonl"]


def test_render_batch_api_checks_jobs_built_in_code(mine, tmp_path, no_ray):
    from lipsync_ray.batch import BatchJob, render_batch
    from lipsync_ray.config import RenderConfig

    config = RenderConfig(model=str(mine["model"]), audio_encoder=str(mine["encoder"]))
    audio = str(mine["audio"])
    jobs = [BatchJob(audio, str(tmp_path / "x.mp4")), BatchJob(audio, str(tmp_path / "x.mp4"))]
    with pytest.raises(InputError, match=r"job 1: the output .* is also the output of job 0"):
        render_batch(mine["avatar"], jobs, config)


# ----------------------------------------------------------------- 8. the staging cache


@pytest.fixture
def private_tmp(tmp_path, monkeypatch) -> Path:
    """``tempfile.gettempdir()`` pointed at a fresh directory; returns the cache it implies."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    return tmp_path / "tmp" / f"lipsync-ray-{os.getuid()}" / "storage"


def _store_avatar(tmp_path: Path):
    fs = remote_fs(tmp_path)
    avatar = tmp_path / "store" / "avatar"
    (avatar / "sub").mkdir(parents=True)
    (avatar / "frames.npy").write_bytes(b"0123456789" * 100)
    (avatar / "sub" / "meta.json").write_text('{"frames": 5}')
    return resolve("avatar", fs), avatar


def test_the_staging_cache_is_this_users_own(private_tmp, tmp_path):
    location, _ = _store_avatar(tmp_path)
    staged = stage_in(location)  # the default cache
    assert staged.is_relative_to(private_tmp) and local_cache() == private_tmp
    for directory in (private_tmp.parent, private_tmp):
        info = directory.lstat()
        assert (info.st_mode & 0o777, info.st_uid) == (0o700, os.getuid())


def _writable_by_others(cache: Path) -> None:
    cache.parent.mkdir(mode=0o700)
    cache.mkdir()
    cache.chmod(0o775)


def _a_link(cache: Path) -> None:
    cache.parent.mkdir(mode=0o700)
    elsewhere = cache.parent.parent / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    cache.symlink_to(elsewhere)


def _someone_elses(cache: Path) -> None:
    if os.getuid() != 0:
        pytest.skip("making a directory another user's own needs root")
    cache.parent.mkdir(mode=0o700)
    cache.parent.chmod(0o700)
    os.chown(cache.parent, 65534, 65534)


@pytest.mark.parametrize(
    ("make", "got"),
    [
        (_writable_by_others, "mode 775"),
        (_a_link, "a link"),
        (_someone_elses, "mode 700 owned by uid 65534"),
    ],
    ids=["writable-by-others", "a-link", "someone-elses"],
)
def test_a_cache_that_is_not_private_is_refused(make, got, private_tmp, tmp_path):
    make(private_tmp)
    location, _ = _store_avatar(tmp_path)
    with pytest.raises(InputError, match=f"expected a private directory.*got {got}") as info:
        stage_in(location)
    assert info.value.path in (str(private_tmp), str(private_tmp.parent))
    assert info.value.exit_code == 2 and "\n" not in str(info.value)  # the CLI's one line
    assert not list(tmp_path.glob("tmp/**/frames.npy"))  # nothing staged into it


def test_a_cache_of_ours_readable_by_others_is_closed(private_tmp, tmp_path):
    """``mkdir -p`` made the parent 0755 (an older version did): ours, so it is tightened."""
    private_tmp.mkdir(parents=True, mode=0o700)
    private_tmp.parent.chmod(0o755)
    location, _ = _store_avatar(tmp_path)
    assert stage_in(location).is_relative_to(private_tmp)
    assert private_tmp.parent.stat().st_mode & 0o777 == 0o700


def _delete_a_file(staged: Path) -> None:
    (staged / "sub" / "meta.json").unlink()


def _rewrite_same_size(staged: Path) -> None:
    data = (staged / "frames.npy").read_bytes()
    (staged / "frames.npy").write_bytes(data[::-1])
    os.utime(staged / "frames.npy", ns=(1, 1))


def _swap_for_a_link(staged: Path) -> None:
    (staged / "frames.npy").unlink()
    (staged / "frames.npy").symlink_to("/etc/hostname")


def _plant_a_file(staged: Path) -> None:
    (staged / "sub" / "extra.onnx").write_bytes(b"not from the source")


def _forget_the_record(staged: Path) -> None:
    (staged.parent / ".staged.json").unlink()


@pytest.mark.parametrize(
    "tamper",
    [_delete_a_file, _rewrite_same_size, _swap_for_a_link, _plant_a_file, _forget_the_record],
    ids=["a-file-deleted", "rewritten-same-size", "swapped-for-a-link", "a-file-planted",
         "record-gone"],
)  # fmt: skip
def test_a_staged_copy_is_reused_only_while_intact(tamper, private_tmp, tmp_path):
    location, source = _store_avatar(tmp_path)
    staged = stage_in(location)
    assert stage_in(location) == staged  # intact: reused as it is
    tamper(staged)
    again = stage_in(location)
    assert again == staged  # staged again, in the same place
    assert (again / "frames.npy").read_bytes() == (source / "frames.npy").read_bytes()
    assert not (again / "frames.npy").is_symlink()
    assert (again / "sub" / "meta.json").read_text() == '{"frames": 5}'
    assert sorted(p.name for p in again.rglob("*")) == ["frames.npy", "meta.json", "sub"]


# ------------------------------------------- 9. late failures; inputs before "use --overwrite"


@dataclass(frozen=True)
class LateCase:
    id: str
    make: Callable[[dict, Path], tuple[Path, list[str]]]  # (output, extra flags)
    culprit: str
    message: str


def _output_in(directory: str) -> Callable[[dict, Path], tuple[Path, list[str]]]:
    return lambda files, tmp: (Path(directory) / "out.mp4", [])


def _work_dir_in(directory: str) -> Callable[[dict, Path], tuple[Path, list[str]]]:
    return lambda files, tmp: (tmp / "out.mp4", ["--work-dir", f"{directory}/lipsync-work"])


def _existing_output_and(key: str, broken: Callable[[Path], Path] | None = None):
    """The output exists (no --overwrite) and one input is missing or broken."""

    def make(files: dict, tmp: Path) -> tuple[Path, list[str]]:
        out = tmp / "out.mp4"
        out.write_bytes(b"an earlier render")
        files[key] = broken(tmp) if broken else tmp / f"missing-{key}"
        return out, []

    return make


def _unreadable(tmp: Path) -> Path:
    (tmp / "locked.wav").symlink_to("/proc/self/mem")  # EIO on the first byte, root or not
    return tmp / "locked.wav"


LATE = [
    LateCase("output-under-proc", _output_in("/proc"), "/proc", "cannot write there"),
    LateCase("output-under-proc-self", _output_in("/proc/self"), "/proc/self", "cannot write"),
    LateCase("work-dir-under-proc", _work_dir_in("/proc"), "/proc/lipsync-work", "cannot write"),
    LateCase("work-dir-under-sys", _work_dir_in("/sys"), "/sys/lipsync-work", "cannot write"),
    LateCase("exists-and-avatar-missing", _existing_output_and("avatar"), "missing-avatar",
             "avatar bundle directory not found"),
    LateCase("exists-and-audio-missing", _existing_output_and("audio"), "missing-audio",
             "audio file not found"),
    LateCase("exists-and-audio-unreadable", _existing_output_and("audio", _unreadable),
             "locked.wav", "audio file not readable"),
    LateCase("exists-and-model-missing", _existing_output_and("model"), "missing-model",
             "model file not found"),
    LateCase("exists-and-encoder-missing", _existing_output_and("encoder"), "missing-encoder",
             "model file not found"),
]  # fmt: skip


@pytest.mark.parametrize("case", LATE, ids=lambda c: c.id)
def test_late_failures_are_caught_before_ray(case, mine, tmp_path, capsys, no_ray):
    out, extra = case.make(mine, tmp_path)
    before = out.read_bytes() if out.is_file() else None
    rc, line = _run(_argv(mine, out, *extra), capsys)
    assert rc == 2, line
    assert case.culprit in line and re.search(case.message, line), line
    assert "--overwrite" not in line
    assert (out.read_bytes() if out.is_file() else None) == before
    assert not Path(f"{out}.work").exists()


def test_an_output_under_proc_subprocess(mine, tmp_path):
    result = subprocess.run(
        [*cli_command(), *_argv(mine, Path("/proc/out.mp4"))],
        capture_output=True, text=True, timeout=120,
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
    )  # fmt: skip
    line = one_error_line(result.stderr)
    assert result.returncode == 2 and "cannot write there" in line and "/proc" in line, line
