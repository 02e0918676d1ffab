"""Nothing lost, nothing stale, nothing exposed: the work directory is the renderer's alone.

Four tables, each case asserting the exit code, the one error line and which files survive:

- a ``--work-dir`` of the user's is refused, and only the renderer's own files are ever
  removed from one of its own (a folder of the user's loses nothing);
- every input that decides the frames changes the fingerprint, the avatar's arrays through a
  content digest checked by a stat stamp (a re-prepared avatar is never served from old
  chunks);
- an unreadable manifest is one line and exit 2, and ``--overwrite`` starts afresh;
- no path read from a manifest leaves the work directory, and no write follows a link.

The CLI cases run ``cli.main`` in-process with ``ray.init`` replaced by a tripwire: each is
decided before Ray starts. Two renders (on the module's small Ray cluster) check the whole
path: a re-prepared avatar and a truncated manifest.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import av
import numpy as np
import pytest
from helpers import (
    GOOD_AVATAR_FRAMES,
    GOOD_SIZE_WH,
    cli_command,
    one_error_line,
    psnr_db,
    ray_tripwire,
)

from lipsync_ray import avatar_digest
from lipsync_ray.avatar import Avatar, pingpong_indices, write_avatar
from lipsync_ray.cli import main
from lipsync_ray.config import EncodeMode, PoolConfig, RenderConfig
from lipsync_ray.errors import InputError
from lipsync_ray.options import Blend, BlendOptions, EncodeOptions
from lipsync_ray.report import RunReport, StageTimes
from lipsync_ray.shards import ShardCodec, iter_shard_frames, write_shard
from lipsync_ray.vad import SilenceOptions
from lipsync_ray.workdir.directory import WorkDir
from lipsync_ray.workdir.fingerprint import avatar_identity, render_fingerprint
from lipsync_ray.workdir.job import Job
from lipsync_ray.workdir.layout import shard_path, spare_dir
from lipsync_ray.workdir.manifest import Manifest, keep_spare

AVATAR_FRAMES = GOOD_AVATAR_FRAMES  # the `good` fixture's (conftest.py)
SIZE_WH = GOOD_SIZE_WH


@pytest.fixture
def no_ray(monkeypatch):
    ray_tripwire(monkeypatch)


def _argv(good, out: Path, *extra: str, avatar: Path | None = None) -> list[str]:
    return [
        "render", str(avatar or good["avatar"]), str(good["audio"]), "-o", str(out),
        "--model", str(good["model"]), "--audio-encoder", str(good["encoder"]),
        "--gpus-per-actor", "0", *extra,
    ]  # fmt: skip


def _snapshot(root: Path) -> dict[str, bytes | str]:
    """Every entry under ``root`` (links not followed): file bytes, link targets, dirs."""
    seen: dict[str, bytes | str] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            seen[rel] = f"-> {os.readlink(path)}"
        elif path.is_dir():
            seen[rel] = "dir"
        else:
            seen[rel] = path.read_bytes()
    return seen


def _run_cli(argv: list[str], capsys) -> tuple[int, str]:
    rc = main(argv)
    return rc, capsys.readouterr().err


def _passed_the_checks(rc: int, err: str) -> bool:
    """The render got as far as starting Ray (the tripwire): every check before it passed."""
    return rc == 1 and "ray.init was called before" in err


# ------------------------------------------------- 1. a --work-dir of the user's loses nothing


def _user_shards(work: Path) -> None:
    (work / "shards").mkdir(parents=True)
    (work / "shards" / "notes.txt").write_text("my notes")
    (work / "segments").mkdir()
    (work / "segments" / "holiday.mp4").write_bytes(b"\x00\x01 a video of mine")


def _user_chunk_names(work: Path) -> None:
    """Files of the user's that happen to carry the renderer's names, and no manifest."""
    (work / "shards").mkdir(parents=True)
    (work / "shards" / "chunk-000000.parquet").write_bytes(b"mine")
    (work / "segments").mkdir()
    (work / "segments" / "chunk-000000.mp4").write_bytes(b"mine too")


def _user_photo(work: Path) -> None:
    work.mkdir(parents=True)
    (work / "photo.jpg").write_bytes(b"\xff\xd8 jpeg")


def _only_a_report(work: Path) -> None:
    work.mkdir(parents=True)
    (work / "report.json").write_text("{}")


@dataclass(frozen=True)
class Folder:
    id: str
    make: Callable[[Path], None]
    default_work_dir: bool = False  # the folder is <out>.work, not given with --work-dir


USER_FOLDERS = [
    Folder("shards-and-segments", _user_shards),
    Folder("renderer-names-no-manifest", _user_chunk_names),
    Folder("a-photo", _user_photo),
    Folder("only-a-report", _only_a_report),
    Folder("default-work-dir", _user_shards, default_work_dir=True),
]


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
@pytest.mark.parametrize("folder", USER_FOLDERS, ids=lambda f: f.id)
def test_a_folder_of_the_users_is_refused(folder, overwrite, good, tmp_path, capsys, no_ray):
    out = tmp_path / "out.mp4"
    work = Path(f"{out}.work") if folder.default_work_dir else tmp_path / "mine"
    folder.make(work)
    before = _snapshot(work)
    extra = [] if folder.default_work_dir else ["--work-dir", str(work)]
    rc, err = _run_cli(_argv(good, out, *extra, *(["--overwrite"] if overwrite else [])), capsys)
    line = one_error_line(err)
    assert rc == 2, line
    assert str(work) in line and "holds no manifest of a render" in line, line
    assert _snapshot(work) == before  # nothing removed, nothing written
    assert not out.exists()


@pytest.mark.parametrize(
    "make",
    [
        lambda work: None,  # not there yet
        lambda work: work.mkdir(),  # empty
        lambda work: [(work / d).mkdir(parents=True) for d in ("shards", "segments")],
    ],
    ids=["missing", "empty", "empty-chunk-dirs"],
)
def test_an_empty_or_new_folder_is_taken(make, good, tmp_path, capsys, no_ray):
    work = tmp_path / "work"
    make(work)
    rc, err = _run_cli(_argv(good, tmp_path / "out.mp4", "--work-dir", str(work)), capsys)
    assert _passed_the_checks(rc, err), err


def _job(tmp_path: Path) -> Job:
    return Job(
        audio=tmp_path / "a.wav", output=tmp_path / "out.mp4", work_dir=tmp_path / "work",
        start_frame=0, features=None,
    )  # fmt: skip


def _config(**kw) -> RenderConfig:
    base = RenderConfig(
        model="unet.onnx", encode_mode=EncodeMode.SINGLE, pool=PoolConfig(chunk_frames=2)
    )
    return replace(base, **kw)


def _shard(work: Path, chunk: int, fingerprint: str = "old"):
    frames = np.full((2, 4, 6, 3), chunk, np.uint8)
    return write_shard(
        shard_path(work, chunk), chunk, np.arange(2 * chunk, 2 * chunk + 2), np.arange(2),
        frames, ShardCodec.RAW, fingerprint, work,
    )  # fmt: skip


# The renderer's files in a work directory of its own, and the user's files beside them.
RENDERERS = [
    "shards/chunk-000000.parquet",  # recorded
    "shards/chunk-000001.parquet",  # renamed into place, never recorded (an orphan)
    "shards/.spare/chunk-000007.parquet",
    "shards/.chunk-000002.0123abcd.partial.parquet",  # a killed writer's temp file
    "segments/.chunk-000003.89abcdef.partial.mp4",
]
USERS = ["shards/notes.txt", "shards/mine/chunk-000004.parquet", "segments/keep.mp4", "photo.jpg"]


def _own_work_dir(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    manifest = Manifest(work, "old", {}, frames=4, chunk_frames=2)
    manifest.record(_shard(work, 0))
    _shard(work, 1)
    for rel in [*RENDERERS[2:], *USERS]:
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).write_bytes(rel.encode())
    return work


def _start_another(work: WorkDir) -> None:
    work.begin("new", 4)


def _report(work: WorkDir) -> RunReport:
    return RunReport(
        output=str(work.job.output), work_dir=str(work.path), frames=4, chunks=2,
        chunks_rendered=2, chunks_reused=0, wall_s=1.0, fps=4.0, stages=StageTimes(),
        retries=0, frames_generated=4, seam_score=None, precision={}, actors=(),
        providers=(), audio_duration_s=0.16, video_duration_s=0.16, settings={},
    )  # fmt: skip


def _finish(work: WorkDir) -> None:
    work.begin("old", 4)
    work.finish(_report(work))


@pytest.mark.parametrize(
    ("step", "overwrite"),
    [(_start_another, True), (_finish, False)],
    ids=["overwrite-another-render", "finish"],
)
def test_only_the_renderers_files_are_removed(step, overwrite, tmp_path):
    work_path = _own_work_dir(tmp_path)
    users = {rel: (work_path / rel).read_bytes() for rel in USERS}
    work = WorkDir.open(_job(tmp_path), _config(overwrite=overwrite))
    step(work)
    assert [rel for rel in RENDERERS if (work_path / rel).exists()] == []
    assert {rel: (work_path / rel).read_bytes() for rel in USERS} == users
    assert (work_path / "manifest.json").is_file()


# ----------------------------------------------------- 2. nothing stale: what the digest covers


def _base_fingerprint(**change) -> str:
    config = change.pop("config", _config())
    args = dict(
        avatar="a" * 64, model="m" * 64, features=np.zeros((8, 512), np.float32),
        start_frame=0, audio="s" * 64,
    )  # fmt: skip
    args.update(change)
    return render_fingerprint(config, config.pool, **args)


@pytest.mark.parametrize(
    "change",
    [
        {"avatar": "b" * 64},
        {"audio": "t" * 64},
        {"features": np.ones((8, 512), np.float32)},
        {"model": "n" * 64},
        {"start_frame": 3},
        {"config": _config(encode=EncodeOptions(crf=23))},
        {"config": _config(encode=EncodeOptions(fps=30))},
        {"config": _config(encode=EncodeOptions(preset="medium"))},
        {"config": _config(encode=EncodeOptions(x264_params="me=umh"))},
        {"config": _config(blend=BlendOptions(Blend.HARD))},
        {"config": _config(shard_codec=ShardCodec.PNG)},
        {"config": _config(encode_mode=EncodeMode.SEGMENTS)},
        {"config": _config(silence=SilenceOptions())},
        {"config": _config(pool=PoolConfig(chunk_frames=4))},
    ],
    ids=[
        "avatar", "audio", "features", "model", "start-frame", "crf", "fps", "preset",
        "x264-params", "blend",
        "shard-codec", "encode-mode", "silence", "chunk-frames",
    ],
)  # fmt: skip
def test_every_input_that_decides_the_frames_changes_the_fingerprint(change):
    assert _base_fingerprint(**change) != _base_fingerprint()


@pytest.fixture
def bundle(tmp_path) -> Path:
    """A bundle as ``prepare`` leaves it (a copy would not match its stamp)."""
    from lipsync_ray.dev.synthetic import make_demo_avatar

    made = make_demo_avatar(tmp_path / "avatar", seconds=AVATAR_FRAMES / 25, size_wh=SIZE_WH)
    return Path(made.path)


@pytest.fixture
def hashes(monkeypatch) -> list[str]:
    """The arrays hashed (by file name) from here on."""
    seen: list[str] = []
    real = avatar_digest.array_sha256

    def counting(path):
        seen.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(avatar_digest, "array_sha256", counting)
    return seen


def _reprepared(root: Path) -> None:
    """The same boxes, other pixels: what re-running prepare on an edited video gives."""
    avatar = Avatar.open(root)
    frames = avatar.read_frames(np.arange(avatar.frame_count))
    write_avatar(root, list(255 - frames), avatar.boxes(np.arange(avatar.frame_count)),
                 overwrite=True)  # fmt: skip


def _flip_a_byte(root: Path, name: str = "visual_inputs.npy") -> None:
    """The same size, other bytes, written in place (stat moves, the digest no longer holds)."""
    with open(root / name, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0xFF]))


def _strip_digest(root: Path) -> None:
    """A bundle prepared before content digests: no content_sha256, no stamp."""
    meta = json.loads((root / "avatar.json").read_text())
    del meta[avatar_digest.CONTENT_KEY]
    (root / "avatar.json").write_text(json.dumps(meta))
    (root / avatar_digest.STAMP_NAME).unlink()


@dataclass(frozen=True)
class Edit:
    id: str
    edit: Callable[[Path], object]
    changed: bool  # the identity differs from the bundle's before the edit
    hashed: int  # arrays hashed by the first identity after the edit (the second: none)


EDITS = [
    Edit("untouched", lambda root: None, changed=False, hashed=0),
    Edit("re-prepared-other-pixels", _reprepared, changed=True, hashed=0),
    Edit("touched", lambda root: os.utime(root / "frames.npy"), changed=False, hashed=1),
    Edit("stamp-removed", lambda root: (root / avatar_digest.STAMP_NAME).unlink(),
         changed=False, hashed=3),
    Edit("prepared-before-digests", _strip_digest, changed=True, hashed=3),
]  # fmt: skip


@pytest.mark.parametrize("case", EDITS, ids=lambda e: e.id)
def test_the_avatar_identity_follows_its_content(case, bundle, hashes):
    before = avatar_identity(bundle)
    assert hashes == []  # prepare's stamp holds: nothing hashed
    case.edit(bundle)
    assert (avatar_identity(bundle) != before) == case.changed
    assert len(hashes) == case.hashed
    hashes.clear()
    assert avatar_identity(bundle) == avatar_identity(bundle) and hashes == []  # stamp renewed


def test_a_copied_bundle_is_hashed_once(bundle, hashes):
    copy = Path(shutil.copytree(bundle, bundle.with_name("copy")))
    assert avatar_identity(copy) == avatar_identity(bundle)
    assert sorted(hashes) == ["crops.npy", "frames.npy", "visual_inputs.npy"]
    hashes.clear()
    avatar_identity(copy)
    assert hashes == []


def test_an_old_bundle_that_cannot_be_written_is_hashed_on_every_render(
    bundle, hashes, caplog, monkeypatch
):
    _strip_digest(bundle)

    def read_only(path, *args, **kwargs):  # what a read-only mount answers (even to root)
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(avatar_digest, "write_json", read_only)
    with caplog.at_level(logging.WARNING, logger="lipsync_ray.avatar_digest"):
        first, second = avatar_identity(bundle), avatar_identity(bundle)
    assert first == second and len(hashes) == 6
    assert "hashed again on every render" in caplog.text
    assert not (bundle / avatar_digest.STAMP_NAME).exists()


def test_pixels_changed_after_prepare_are_refused(bundle, good, tmp_path, capsys, no_ray):
    _flip_a_byte(bundle)
    before = _snapshot(bundle)
    rc, err = _run_cli(_argv(good, tmp_path / "out.mp4", avatar=bundle), capsys)
    line = one_error_line(err)
    assert rc == 2, line
    assert "visual_inputs.npy" in line and "no longer holds what prepare wrote" in line, line
    assert _snapshot(bundle) == before


# ------------------------------------------------------------ 3. an unreadable manifest


def _valid_manifest() -> dict:
    return {
        "version": 1, "fingerprint": "f" * 64, "frames": 4, "chunk_frames": 2, "settings": {},
        "chunks": {"000000": {"chunk": 0, "start": 0, "stop": 2, "rows": 2, "sha256": "",
                              "bytes": 10, "file": "shards/chunk-000000.parquet"}},
        "segments": {}, "released": [],
    }  # fmt: skip


def _with(**changes) -> str:
    data = _valid_manifest()
    data.update(changes)
    return json.dumps(data)


def _with_record(**changes) -> str:
    data = _valid_manifest()
    data["chunks"]["000000"].update(changes)
    return json.dumps(data)


UNREADABLE = {
    "truncated": json.dumps(_valid_manifest())[:60],
    "empty": "",
    "not-utf8": b"\xff\xfe\x00garbage",
    "a-list": "[1, 2]",
    "null": "null",
    "version-true": _with(version=True),
    "version-2": _with(version=2),
    "fingerprint-number": _with(fingerprint=5),
    "frames-string": _with(frames="4"),
    "frames-negative": _with(frames=-1),
    "settings-list": _with(settings=[]),
    "chunks-list": _with(chunks=[]),
    "record-missing-field": _with(chunks={"000000": {"chunk": 0}}),
    "record-extra-field": _with_record(evil=1),
    "rows-float": _with_record(rows=2.0),
    "key-not-its-chunk": _with(chunks={"000009": _valid_manifest()["chunks"]["000000"]}),
    "released-strings": _with(released=["0"]),
}


def _write_manifest(work: Path, content: str | bytes) -> None:
    work.mkdir(parents=True, exist_ok=True)
    path = work / "manifest.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())


@pytest.mark.parametrize("content", list(UNREADABLE.values()), ids=list(UNREADABLE))
def test_an_unreadable_manifest_is_one_line_and_exit_2(content, good, tmp_path, capsys, no_ray):
    work = tmp_path / "work"
    _write_manifest(work, content)
    (work / "shards").mkdir()
    (work / "shards" / "chunk-000000.parquet").write_bytes(b"an old chunk")
    before = _snapshot(work)
    argv = _argv(good, tmp_path / "out.mp4", "--work-dir", str(work))
    rc, err = _run_cli(argv, capsys)
    line = one_error_line(err)
    assert rc == 2, line
    assert str(work / "manifest.json") in line, line
    assert "manifest is unreadable" in line and "--overwrite" in line, line
    assert _snapshot(work) == before
    # --overwrite gets past it (to Ray's start here; the next test starts afresh)
    assert _passed_the_checks(*_run_cli([*argv, "--overwrite"], capsys))


@pytest.mark.parametrize("content", list(UNREADABLE.values())[:4], ids=list(UNREADABLE)[:4])
def test_overwrite_starts_afresh_over_an_unreadable_manifest(content, tmp_path):
    work_path = tmp_path / "work"
    _write_manifest(work_path, content)
    _shard(work_path, 0)
    work = WorkDir.open(_job(tmp_path), _config(overwrite=True))
    work.begin("new", 4)
    assert Manifest.load(work_path).fingerprint == "new"
    assert not (work_path / "shards").exists()  # its chunk files went, then the empty dir


def test_an_unreadable_manifest_beside_other_files_is_not_overwritten(
    good, tmp_path, capsys, no_ray
):
    work = tmp_path / "work"
    _write_manifest(work, "[]")
    (work / "thesis.tex").write_text("mine")
    before = _snapshot(work)
    rc, err = _run_cli(
        _argv(good, tmp_path / "out.mp4", "--work-dir", str(work), "--overwrite"), capsys
    )
    line = one_error_line(err)
    assert rc == 2 and "holds other files" in line and str(work) in line, line
    assert _snapshot(work) == before


# ------------------------------------------- 7. nothing read leaves, nothing written follows


OUTSIDE_NAMES = {
    "parent": "../victim.parquet",
    "parent-of-shards": "shards/../../victim.parquet",
    "absolute": "{victim}",
    "another-chunks-name": "shards/chunk-000001.parquet",
    "a-segment-as-a-shard": "segments/chunk-000000.mp4",
    "a-file-of-the-users": "photo.jpg",
}


@pytest.mark.parametrize("name", list(OUTSIDE_NAMES.values()), ids=list(OUTSIDE_NAMES))
def test_a_manifest_naming_a_file_outside_its_layout(name, good, tmp_path, capsys, no_ray):
    victim = tmp_path / "victim.parquet"
    victim.write_bytes(b"precious")
    work = tmp_path / "work"
    _write_manifest(work, _with_record(file=name.format(victim=victim)))
    users = name == "photo.jpg"
    if users:
        (work / "photo.jpg").write_bytes(b"mine")
    rc, err = _run_cli(_argv(good, tmp_path / "out.mp4", "--work-dir", str(work)), capsys)
    line = one_error_line(err)
    assert rc == 2 and "manifest is unreadable" in line and "expected 'shards/" in line, line
    # --overwrite starts afresh, and clears nothing but the renderer's own files; beside a
    # file of the user's it is refused instead
    if users:
        with pytest.raises(InputError, match="holds other files"):
            WorkDir.open(_job(tmp_path), _config(overwrite=True))
    else:
        work_dir = WorkDir.open(_job(tmp_path), _config(overwrite=True))
        work_dir.begin("new", 4)
        work_dir.finish(_report(work_dir))
    assert victim.read_bytes() == b"precious"
    assert not users or (work / "photo.jpg").read_bytes() == b"mine"


def _link(at: str, to_dir: bool):
    def make(work: Path, outside: Path) -> None:
        target = outside if to_dir else outside / "victim.txt"
        (work / at).parent.mkdir(parents=True, exist_ok=True)
        (work / at).unlink(missing_ok=True)
        (work / at).symlink_to(target, target_is_directory=to_dir)

    return make


LINKS = {
    "shards-dir": _link("shards", to_dir=True),
    "segments-dir": _link("segments", to_dir=True),
    "spare-dir": _link("shards/.spare", to_dir=True),
    "a-spare": _link("shards/.spare/chunk-000003.parquet", to_dir=False),
    "a-chunk": _link("shards/chunk-000000.parquet", to_dir=False),
    "manifest": _link("manifest.json", to_dir=False),
    "report": _link("report.json", to_dir=False),
}


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
@pytest.mark.parametrize("make", list(LINKS.values()), ids=list(LINKS))
def test_a_link_where_the_renderer_writes_is_refused(
    make, overwrite, good, tmp_path, capsys, no_ray
):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.txt").write_text("precious")
    (outside / "chunk-000000.parquet").write_text("precious too")
    work = tmp_path / "work"
    work.mkdir()
    Manifest(work, "old", {}, frames=4, chunk_frames=2).save()
    make(work, outside)
    before, outside_before = _snapshot(work), _snapshot(outside)
    argv = _argv(good, tmp_path / "out.mp4", "--work-dir", str(work))
    rc, err = _run_cli([*argv, *(["--overwrite"] if overwrite else [])], capsys)
    line = one_error_line(err)
    assert rc == 2 and "symbolic link" in line, line
    assert _snapshot(work) == before and _snapshot(outside) == outside_before


@pytest.mark.parametrize(
    "plant",
    [
        lambda spares, victim: (spares / "chunk-000001.parquet").symlink_to(victim),
        lambda spares, victim: (spares / "chunk-000001.parquet").symlink_to(victim.parent),
    ],
    ids=["link-to-a-file", "link-to-a-directory"],
)
def test_a_compositor_never_writes_through_a_planted_spare(plant, tmp_path):
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"precious" * 100_000)
    work = tmp_path / "work"
    spares = spare_dir(work)
    spares.mkdir(parents=True)
    plant(spares, victim)
    frames = np.arange(2 * 4 * 6 * 3, dtype=np.uint8).reshape(2, 4, 6, 3)
    info = write_shard(
        shard_path(work, 0), 0, np.arange(2), np.arange(2), frames, ShardCodec.RAW, "fp", work,
        reuse_spare=True,
    )  # fmt: skip
    assert victim.read_bytes() == b"precious" * 100_000
    assert not (work / info.file).is_symlink()
    np.testing.assert_array_equal(np.stack(list(iter_shard_frames(work / info.file, range(2)))),
                                  frames)  # fmt: skip
    assert not any(spares.iterdir())  # the link was removed, not used


def test_a_released_shard_never_moves_into_a_linked_spare_dir(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    work = tmp_path / "work"
    info = _shard(work, 0)
    spare_dir(work).symlink_to(outside, target_is_directory=True)
    assert not keep_spare(work / info.file, work, limit=4)
    assert list(outside.iterdir()) == []


# ------------------------------------------------------------ through a real render (Ray)


def _decode(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="bgr24") for f in container.decode(video=0)])


@pytest.mark.ray
@pytest.mark.slow
def test_a_truncated_manifest_and_a_reprepared_avatar_render_afresh(
    ray_cluster, small_models, good, tmp_path
):
    """Render; truncate the manifest: the CLI refuses it (exit 2, one line), ``overwrite``
    renders afresh. Then re-prepare the avatar with the same boxes and other pixels and
    render again: no chunk is reused, the frames are the new avatar's, and a file of the
    user's in ``shards/`` survives the render and its clean-up."""
    from lipsync_ray.pipeline import render

    avatar = Path(shutil.copytree(good["avatar"], tmp_path / "avatar"))
    out = tmp_path / "out.mp4"
    config = RenderConfig(
        model=str(small_models["identity"]), audio_encoder=str(small_models["encoder"]),
        pool=PoolConfig(chunk_frames=16, gpus_per_actor=0.0, compositors=1),
        blend=BlendOptions(Blend.HARD), keep_shards=True, overwrite=True,
    )  # fmt: skip
    first = render(avatar, good["audio"], out, config)
    work = Path(first.work_dir)

    manifest = work / "manifest.json"
    manifest.write_text(manifest.read_text()[:50])
    out.unlink()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    argv = [*cli_command(), *_argv({**good, "model": small_models["identity"]}, out,
                                   "--chunk-frames", "16", avatar=avatar)]  # fmt: skip
    refused = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
    line = one_error_line(refused.stderr)
    assert refused.returncode == 2 and f"{manifest}" in line, refused.stderr
    assert "manifest is unreadable" in line and not out.exists()
    second = render(avatar, good["audio"], out, config)
    assert second.chunks_reused == 0 and second.chunks_rendered == first.chunks

    old_frames = Avatar.open(avatar).read_frames(np.arange(AVATAR_FRAMES))
    _reprepared(avatar)
    (work / "shards" / "notes.txt").write_text("mine")
    third = render(avatar, good["audio"], out, replace(config, keep_shards=False))
    assert third.chunks_reused == 0 and third.chunks_rendered == first.chunks
    new = Avatar.open(avatar)
    got = _decode(out)
    expected = new.read_frames(pingpong_indices(third.frames, new.frame_count))
    old = old_frames[pingpong_indices(third.frames, AVATAR_FRAMES)]
    assert min(psnr_db(g, e) for g, e in zip(got, expected, strict=True)) > 30.0
    assert max(psnr_db(g, o) for g, o in zip(got, old, strict=True)) < 15.0
    assert sorted(p.name for p in (work / "shards").iterdir()) == ["notes.txt"]
    assert (work / "shards" / "notes.txt").read_text() == "mine"
