"""Storage locations: paths, file:// URIs, SubTreeFileSystems, and a filesystem that is not the
local disk (so staging really runs), unit by unit and through whole renders."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import av
import numpy as np
import pyarrow.fs as pafs
import pytest
from helpers import demo_inputs

from lipsync_ray.batch import load_jobs
from lipsync_ray.cli import main
from lipsync_ray.config import PoolConfig, RenderConfig
from lipsync_ray.dev.speech import synth_speech, write_audio
from lipsync_ray.errors import InputError
from lipsync_ray.pipeline import check_job_paths, render
from lipsync_ray.storage import resolve, stage_in, stage_out

SECONDS = 2.0  # about 52 output frames: four chunks of 16


class RebasedHandler(pafs.FileSystemHandler):
    """A ``pyarrow.fs.PyFileSystem`` handler over a local directory: the same files, but a
    filesystem that :class:`~lipsync_ray.storage.Location` cannot see as local, like a bucket."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.fs = pafs.SubTreeFileSystem(root, pafs.LocalFileSystem())

    def __eq__(self, other) -> bool:
        return isinstance(other, RebasedHandler) and other.root == self.root

    def __ne__(self, other) -> bool:
        return not self == other

    def __repr__(self) -> str:
        return f"RebasedHandler({self.root!r})"

    def get_type_name(self) -> str:
        return "rebased"

    def normalize_path(self, path):
        return self.fs.normalize_path(path)

    def get_file_info(self, paths):
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.fs.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        self.fs.delete_dir_contents("", accept_root_dir=True)

    def delete_file(self, path):
        self.fs.delete_file(path)

    def move(self, src, dest):
        self.fs.move(src, dest)

    def copy_file(self, src, dest):
        self.fs.copy_file(src, dest)

    def open_input_stream(self, path):
        return self.fs.open_input_stream(path)

    def open_input_file(self, path):
        return self.fs.open_input_file(path)

    def open_output_stream(self, path, metadata):
        return self.fs.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path, metadata):
        return self.fs.open_append_stream(path, metadata=metadata)


def remote_fs(root: Path) -> pafs.FileSystem:
    """A SubTreeFileSystem over the non-local-looking filesystem, rooted at ``store/``."""
    (root / "store").mkdir(parents=True, exist_ok=True)
    return pafs.SubTreeFileSystem("store", pafs.PyFileSystem(RebasedHandler(str(root))))


# ---------------------------------------------------------------------------- resolution


def test_plain_paths_and_file_uris_are_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plain = resolve("clips/a.wav")
    assert isinstance(plain.filesystem, pafs.LocalFileSystem)
    assert plain.local_path() == tmp_path / "clips" / "a.wav" and str(plain) == "clips/a.wav"
    uri = resolve(f"file://{tmp_path}/clips/a.wav")
    assert uri.local_path() == tmp_path / "clips" / "a.wav"
    assert str(uri) == f"file://{tmp_path}/clips/a.wav"
    assert resolve(uri) is uri
    assert str(uri.parent()) == f"file://{tmp_path}/clips"
    manifest = uri.sibling(".work").join("manifest.json")
    assert str(manifest) == f"file://{tmp_path}/clips/a.wav.work/manifest.json"


def test_subtrees_are_local_and_wrapped_filesystems_are_not(tmp_path):
    sub = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    nested = pafs.SubTreeFileSystem("inner", sub)
    assert resolve("a/b.wav", sub).local_path() == tmp_path / "a" / "b.wav"
    assert resolve("/a/b.wav", sub).local_path() == tmp_path / "a" / "b.wav"  # root-relative
    assert resolve("x/../b.wav", nested).local_path() == tmp_path / "inner" / "b.wav"
    wrapped = remote_fs(tmp_path)
    location = resolve("a/b.wav", wrapped)
    assert location.local_path() is None and location.path == "a/b.wav"


@pytest.mark.parametrize(
    ("spec", "filesystem", "message"),
    [
        ("foo://bucket/a.wav", None, "Unrecognized filesystem type"),
        ("hdfs-nope://x/a.wav", None, "a URI pyarrow.fs understands"),
        ("file:///tmp/a.wav", "subtree", "expected a path inside the given filesystem"),
        ("../outside.wav", "subtree", "leaves it"),
        ("a/../../outside.wav", "subtree", "leaves it"),
        ("..", "subtree", "leaves it"),
    ],
)
def test_bad_locations(tmp_path, spec, filesystem, message):
    fs = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem()) if filesystem else None
    with pytest.raises(InputError, match=message) as info:
        resolve(spec, fs)
    assert info.value.path == spec  # the error names what the user wrote


# ------------------------------------------------------------------------------- staging


def test_stage_in_copies_once_and_again_when_the_source_changes(tmp_path):
    fs = remote_fs(tmp_path)
    store = tmp_path / "store"
    (store / "avatar" / "sub").mkdir(parents=True)
    (store / "avatar" / "frames.npy").write_bytes(b"0123456789")
    (store / "avatar" / "sub" / "x.json").write_text("{}")
    (store / "avatar" / ".cache").mkdir()
    (store / "avatar" / ".cache" / "big.onnx").write_bytes(b"not copied")
    cache = tmp_path / "cache"

    staged = stage_in(resolve("avatar", fs), cache)
    assert staged.name == "avatar" and staged.is_dir()
    assert (staged / "frames.npy").read_bytes() == b"0123456789"
    assert (staged / "sub" / "x.json").read_text() == "{}"
    assert not (staged / ".cache").exists()
    assert stage_in(resolve("avatar", fs), cache) == staged  # cached: the same copy

    (store / "avatar" / "frames.npy").write_bytes(b"changed, longer")
    again = stage_in(resolve("avatar", fs), cache)
    assert again != staged and (again / "frames.npy").read_bytes() == b"changed, longer"

    one = stage_in(resolve("avatar/frames.npy", fs), cache)  # a single file
    assert one.name == "frames.npy" and one.read_bytes() == b"changed, longer"
    leftovers = [p for p in cache.rglob("*") if ".tmp-" in p.name or "partial" in p.name]
    assert leftovers == []


def test_stage_in_of_local_locations_is_in_place(tmp_path):
    sub = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    assert stage_in(resolve("a.wav", sub), tmp_path / "cache") == tmp_path / "a.wav"
    assert not (tmp_path / "cache").exists()


def test_stage_in_of_nothing_names_the_source(tmp_path):
    with pytest.raises(InputError, match="not found") as info:
        stage_in(resolve("missing/avatar", remote_fs(tmp_path)), tmp_path / "cache")
    assert info.value.path == "missing/avatar"


@pytest.mark.parametrize("kind", ["file-uri", "subtree", "remote"])
def test_stage_out_writes_whole_files_only(tmp_path, kind):
    src = tmp_path / "local.mp4"
    src.write_bytes(b"x" * 1000)
    (tmp_path / "store" / "out").mkdir(parents=True)
    if kind == "file-uri":
        dest = resolve(f"file://{tmp_path}/store/out/final.mp4")
    elif kind == "subtree":
        dest = resolve("out/final.mp4", pafs.SubTreeFileSystem(str(tmp_path / "store"),
                                                               pafs.LocalFileSystem()))  # fmt: skip
    else:
        dest = resolve("out/final.mp4", remote_fs(tmp_path))
    stage_out(src, dest)
    assert (tmp_path / "store" / "out" / "final.mp4").read_bytes() == b"x" * 1000
    with pytest.raises(FileNotFoundError):
        stage_out(tmp_path / "missing.mp4", dest.parent().join("other.mp4"))
    assert sorted(p.name for p in (tmp_path / "store" / "out").iterdir()) == ["final.mp4"]


def test_job_paths_are_checked_through_the_filesystem(tmp_path):
    fs = remote_fs(tmp_path)
    store = tmp_path / "store"
    write_audio(store / "a.wav", synth_speech(0.2, seed=1))
    (store / "out").mkdir()
    (store / "out" / "taken.mp4").write_bytes(b"old")
    output, audio = check_job_paths("a.wav", "out/new.mp4", False, filesystem=fs)
    assert (output.path, audio.path) == ("out/new.mp4", "a.wav")
    cases = [
        (("missing.wav", "out/new.mp4", False), "audio file not found", "missing.wav"),
        (("out", "out/new.mp4", False), "is a directory", "out"),
        (("a.wav", "nowhere/new.mp4", False), "directory does not exist", "nowhere"),
        (("a.wav", "out/taken.mp4", False), "use --overwrite", "out/taken.mp4"),
        (("a.wav", "out", True), "is a directory", "out"),
        (("a.wav", "out/new.avi", False), "must be an .mp4", "out/new.avi"),
    ]
    for args, message, path in cases:
        with pytest.raises(InputError, match=message) as info:
            check_job_paths(*args, filesystem=fs)
        assert info.value.path == path
    check_job_paths("a.wav", "out/taken.mp4", True, filesystem=fs)
    uri = f"file://{store}/missing.wav"
    with pytest.raises(InputError, match="audio file not found") as info:
        check_job_paths(uri, f"file://{store}/out/new.mp4", False)
    assert info.value.path == uri


def test_jobs_file_keeps_uris(tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(
        json.dumps({"audio": "s3://bucket/a.wav", "output": "o.mp4", "work_dir": "gs://b/w"}) + "\n"
    )
    (job,) = load_jobs(jobs)
    assert job.audio == "s3://bucket/a.wav" and job.work_dir == "gs://b/w"
    assert job.output == str(tmp_path / "o.mp4")


# -------------------------------------------------------------------------------- renders


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("storage-inputs")
    return demo_inputs(
        root, avatar_seconds=0.6, size_wh=(256, 192), avatar_seed=4, audio_seconds=SECONDS,
        audio_seed=6,
    )  # fmt: skip


def _config(models, **kw) -> RenderConfig:
    return RenderConfig(
        model=str(models["unet"]),
        audio_encoder=str(models["encoder"]),
        pool=PoolConfig(chunk_frames=16, gpus_per_actor=0.0, compositors=1),
        **kw,
    )


def _decode(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="bgr24") for f in container.decode(video=0)])


@pytest.fixture(scope="module")
def reference(ray_cluster, small_models, inputs, tmp_path_factory) -> np.ndarray:
    """The frames of a plain-path render of the same inputs."""
    out = tmp_path_factory.mktemp("storage-reference") / "plain.mp4"
    render(inputs["avatar"], inputs["audio"], out, _config(small_models))
    return _decode(out)


def _same_video(path: Path, reference: np.ndarray) -> None:
    frames = _decode(path)
    assert frames.shape == reference.shape
    # The same shards through the same deterministic encoder: measured identical.
    np.testing.assert_array_equal(frames, reference)


def _copy_inputs(inputs, root: Path) -> None:
    import shutil

    shutil.copytree(inputs["avatar"], root / "avatar")
    shutil.copy(inputs["audio"], root / "speech.wav")
    (root / "out").mkdir()


@pytest.mark.ray
def test_cli_render_with_file_uris(ray_cluster, small_models, inputs, reference, tmp_path):
    _copy_inputs(inputs, tmp_path)
    argv = ["render", f"file://{tmp_path}/avatar", f"file://{tmp_path}/speech.wav",
            "-o", f"file://{tmp_path}/out/uri.mp4", "--work-dir", f"file://{tmp_path}/work",
            "--model", str(small_models["unet"]), "--audio-encoder", str(small_models["encoder"]),
            "--chunk-frames", "16", "--gpus-per-actor", "0"]  # fmt: skip
    assert main(argv) == 0
    _same_video(tmp_path / "out" / "uri.mp4", reference)
    report = json.loads((tmp_path / "work" / "report.json").read_text())
    assert report["output"] == str(tmp_path / "out" / "uri.mp4")
    assert main(argv) == 2  # the output exists now: the same check as for a plain path


@pytest.mark.ray
def test_render_inside_a_local_subtree(ray_cluster, small_models, inputs, reference, tmp_path):
    _copy_inputs(inputs, tmp_path)
    fs = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    config = _config(small_models, work_dir="work")
    report = render("avatar", "speech.wav", "out/sub.mp4", config, filesystem=fs)
    _same_video(tmp_path / "out" / "sub.mp4", reference)
    assert Path(report.work_dir) == tmp_path / "work"  # used in place: local, no staging
    assert (tmp_path / "work" / "manifest.json").is_file()


@pytest.mark.ray
def test_render_on_a_filesystem_that_is_not_local(
    ray_cluster, small_models, inputs, reference, tmp_path
):
    # Actors unpickle the filesystem: they must get this module's handler class by value.
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    fs = remote_fs(tmp_path)
    _copy_inputs(inputs, tmp_path / "store")
    config = _config(small_models, keep_shards=True)
    report = render("avatar", "speech.wav", "out/remote.mp4", config, filesystem=fs)

    store = tmp_path / "store"
    _same_video(store / "out" / "remote.mp4", reference)
    assert report.output == "out/remote.mp4" and report.work_dir == "out/remote.mp4.work"
    work = store / "out" / "remote.mp4.work"
    manifest = json.loads((work / "manifest.json").read_text())
    assert len(manifest["chunks"]) == len(manifest["segments"]) == report.chunks == 4
    assert sorted(p.name for p in (work / "segments").iterdir()) == [
        f"chunk-{c:06d}.mp4" for c in range(4)
    ]
    assert json.loads((work / "report.json").read_text())["output"] == "out/remote.mp4"
    assert not [p for p in store.rglob("*") if "partial" in p.name or ".tmp-" in p.name]

    # Resume through the store: every chunk is verified there and reused.
    (store / "out" / "remote.mp4").unlink()
    again = render("avatar", "speech.wav", "out/remote.mp4", config, filesystem=fs)
    assert again.chunks_reused == 4 and again.chunks_rendered == 0
    _same_video(store / "out" / "remote.mp4", reference)

    # Without --keep-shards the store keeps only the manifest and the report.
    config = _config(small_models, overwrite=True)
    render("avatar", "speech.wav", "out/remote.mp4", config, filesystem=fs)
    assert sorted(p.name for p in work.iterdir()) == ["manifest.json", "report.json"]
