"""Avatar bundle: write -> open -> read round trips, ping-pong indices, bad bundles."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from lipsync_ray.avatar import Avatar, pingpong_indices, write_avatar
from lipsync_ray.composite import crop_face, model_visual_input
from lipsync_ray.dev.synthetic import face_poses, make_demo_avatar, pose_box
from lipsync_ray.errors import InputError

W, H, N = 96, 80, 12


def _source(n: int = N, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, size=(n, H, W, 3), dtype=np.uint8)
    x1 = rng.integers(0, 30, size=n)
    y1 = rng.integers(0, 20, size=n)
    side = rng.integers(30, 50, size=n)
    boxes = np.column_stack([x1, y1, x1 + side, y1 + side]).astype(np.int32)
    return frames, boxes


@pytest.fixture
def bundle(tmp_path) -> tuple[Avatar, np.ndarray, np.ndarray]:
    frames, boxes = _source()
    avatar = write_avatar(tmp_path / "av", (f for f in frames), boxes, source={"kind": "test"})
    return avatar, frames, boxes


def test_round_trip_reads_exact_frames_crops_and_inputs(bundle):
    avatar, frames, boxes = bundle
    assert (avatar.frame_count, avatar.size_wh, avatar.fps) == (N, (W, H), 25.0)
    np.testing.assert_array_equal(avatar.boxes(np.arange(N)), boxes)
    np.testing.assert_array_equal(avatar.read_frames(np.arange(N)), frames)
    crops = np.stack([crop_face(f, b) for f, b in zip(frames, boxes, strict=True)])
    np.testing.assert_array_equal(avatar.read_crops(np.arange(N)), crops)
    np.testing.assert_array_equal(
        avatar.read_visual_inputs(np.arange(N)), model_visual_input(crops)
    )
    # the data files are plain .npy arrays
    np.testing.assert_array_equal(np.load(avatar.path / "frames.npy"), frames)
    meta = json.loads((avatar.path / "avatar.json").read_text())
    assert meta["version"] == 1 and meta["boxes"] == boxes.tolist()
    assert meta["source"] == {"kind": "test"}
    assert meta["preprocessing"]["crop_size"] == 328


@pytest.mark.parametrize(
    "indices",
    [
        [3, 4, 5, 6],  # contiguous
        [5, 5, 5],  # repeated
        [9, 10, 11, 10, 9, 8],  # a ping-pong turn
        [0, 7, 2, 11, 2],  # jumps
        [11],
        [],
    ],
)
def test_range_reads_match_source(bundle, indices):
    avatar, frames, boxes = bundle
    idx = np.asarray(indices, dtype=np.int64)
    got = avatar.read_frames(idx)
    assert got.shape == (len(idx), H, W, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, frames[idx])
    np.testing.assert_array_equal(avatar.boxes(idx), boxes[idx])
    crops = avatar.read_crops(np.arange(N))
    np.testing.assert_array_equal(avatar.read_crops(idx), crops[idx])
    np.testing.assert_array_equal(avatar.read_visual_inputs(idx), model_visual_input(crops[idx]))
    # the same reads into caller buffers (compositors reuse one per chunk); stale content gone
    buf = np.full((len(idx), H, W, 3), 7, np.uint8)
    assert avatar.read_frames(idx, out=buf) is buf
    np.testing.assert_array_equal(buf, frames[idx])
    vis = np.full((len(idx), 320, 320, 6), 7, np.uint8)
    avatar.read_visual_inputs(idx, out=vis)
    np.testing.assert_array_equal(vis, model_visual_input(crops[idx]))


@pytest.mark.parametrize(
    "buffer",
    [
        np.empty((2, H, W, 3), np.uint8),  # wrong length
        np.empty((3, H, W, 3), np.float32),  # wrong dtype
        np.empty((3, H, 2 * W, 3), np.uint8)[:, :, ::2],  # not contiguous
    ],
    ids=["length", "dtype", "strided"],
)
def test_read_into_a_wrong_buffer_is_refused(bundle, buffer):
    avatar, _, _ = bundle
    with pytest.raises(InputError, match="C-contiguous uint8"):
        avatar.read_frames([0, 1, 2], out=buffer)


def test_reads_return_writable_copies_and_boxes_are_read_only(bundle):
    avatar, frames, _ = bundle
    got = avatar.read_frames([1, 2])
    got[:] = 0  # a copy: must not write through to the bundle
    np.testing.assert_array_equal(avatar.read_frames([1, 2]), frames[1:3])
    with pytest.raises(ValueError):
        avatar.info.boxes[0, 0] = 5


def test_pickle_carries_only_path_and_metadata(bundle):
    avatar, frames, _ = bundle
    avatar.read_frames([0])  # open the maps first: they must not travel
    blob = pickle.dumps(avatar)
    assert len(blob) < 10_000
    clone = pickle.loads(blob)
    np.testing.assert_array_equal(clone.read_frames([4, 3]), frames[[4, 3]])
    with pytest.raises(ValueError):
        clone.info.boxes[0, 0] = 5


@pytest.mark.parametrize("indices", [[-1], [N], [[1, 2]], [0.5]])
def test_bad_indices(bundle, indices):
    with pytest.raises(InputError, match="indices"):
        bundle[0].read_frames(np.asarray(indices))


def test_failed_write_leaves_nothing(tmp_path):
    frames, boxes = _source()

    def broken():
        yield frames[0]
        raise RuntimeError("camera unplugged")

    with pytest.raises(RuntimeError):
        write_avatar(tmp_path / "av", broken(), boxes)
    assert list(tmp_path.iterdir()) == []


def test_overwrite(tmp_path):
    frames, boxes = _source()
    write_avatar(tmp_path / "av", frames, boxes)
    with pytest.raises(InputError, match="already exists"):
        write_avatar(tmp_path / "av", frames, boxes)
    frames2, boxes2 = _source(5, seed=1)
    avatar = write_avatar(tmp_path / "av", frames2, boxes2, overwrite=True)
    np.testing.assert_array_equal(avatar.read_frames(np.arange(5)), frames2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["av"]


def _bad_frames():
    frames, boxes = _source(3)
    return {
        "count": (frames, boxes[:2], "expected 2 frames"),
        "too few frames": (frames[:2], boxes, "expected 2 boxes"),
        "list": ([frames[0].tolist()], boxes[:1], "arrays"),
        "2-D": ([frames[0][..., 0]], boxes[:1], "arrays"),
        "outside": (frames, np.array([[0, 0, 10, 10], [90, 0, 100, 10], [0, 0, 5, 5]]), "box 1"),
        "empty box": (frames, np.array([[0, 0, 10, 10], [5, 5, 5, 9], [0, 0, 5, 5]]), "box 1"),
        "sizes": ([frames[0], frames[1][:40], frames[2]], boxes, "all frames must be"),
        "dtype": ([f.astype(np.float32) for f in frames], boxes, "uint8"),
        "none": ([], boxes[:0], "at least one frame"),
        "shape": (frames, boxes[:, :3], r"\(N, 4\)"),
    }


@pytest.mark.parametrize("case", list(_bad_frames()))
def test_write_avatar_bad_input(tmp_path, case):
    frames, boxes, match = _bad_frames()[case]
    with pytest.raises(InputError, match=match):
        write_avatar(tmp_path / "av", frames, boxes)
    assert list(tmp_path.iterdir()) == []


def _edit_json(root: Path, **changes) -> None:
    meta = json.loads((root / "avatar.json").read_text())
    meta.update(changes)
    (root / "avatar.json").write_text(json.dumps(meta))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:-100])


BAD_BUNDLES = [
    # (case id, how to break the bundle, file named in the error, message fragment)
    ("no json", lambda r: (r / "avatar.json").unlink(), "avatar.json", "no avatar.json"),
    ("bad json", lambda r: (r / "avatar.json").write_text("{"), "avatar.json", "JSON"),
    ("version", lambda r: _edit_json(r, version=2), "avatar.json", "version must be 1"),
    ("fps", lambda r: _edit_json(r, fps=0), "avatar.json", "fps"),
    ("count", lambda r: _edit_json(r, frame_count=N + 1), "avatar.json", "boxes"),
    ("size", lambda r: _edit_json(r, size_wh=[W]), "avatar.json", "size_wh"),
    ("box outside", lambda r: _edit_json(r, boxes=[[0, 0, W + 1, 10]] * N), "avatar.json", "box"),
    ("box float", lambda r: _edit_json(r, boxes=[[0, 0, 9.5, 10]] * N), "avatar.json", "integer"),
    ("mask", lambda r: _edit_json(r, preprocessing={"crop_size": 256}), "avatar.json", "crop"),
    (
        "escape",
        lambda r: _edit_json(
            r, files={"frames": "../frames.npy", "crops": "crops.npy", "visual_inputs": "x"}
        ),
        "avatar.json",
        "inside the bundle",
    ),
    (
        "absolute",
        lambda r: _edit_json(
            r, files={"frames": str(r / "frames.npy"), "crops": "c", "visual_inputs": "v"}
        ),
        "avatar.json",
        "inside the bundle",
    ),
    ("missing file", lambda r: (r / "crops.npy").unlink(), "crops.npy", "missing"),
    ("truncated", lambda r: _truncate(r / "frames.npy"), "frames.npy", "truncated"),
    (
        "wrong shape",
        lambda r: np.save(r / "visual_inputs.npy", np.zeros((N, 320, 320, 3), np.uint8)),
        "visual_inputs.npy",
        "shape",
    ),
    ("not npy", lambda r: (r / "crops.npy").write_bytes(b"hello"), "crops.npy", ".npy"),
]


@pytest.mark.parametrize(("case", "breaker", "culprit", "match"), BAD_BUNDLES, ids=lambda v: v)
def test_open_rejects_bad_bundles(bundle, case, breaker, culprit, match):
    root = bundle[0].path
    breaker(root)
    with pytest.raises(InputError, match=match) as info:
        Avatar.open(root)
    assert culprit in str(info.value)


def test_open_missing_directory(tmp_path):
    with pytest.raises(InputError, match="not found"):
        Avatar.open(tmp_path / "nope")


def _pingpong_reference(n_out: int, n: int, start: int) -> list[int]:
    """Walk the avatar step by step, bouncing at the ends (independent of the formula)."""
    if n == 1:
        return [0] * n_out
    pos, step = 0, 1
    for _ in range(start):  # advance the walk by `start` steps
        if not 0 <= pos + step < n:
            step = -step
        pos += step
    out = []
    for _ in range(n_out):
        out.append(pos)
        if not 0 <= pos + step < n:
            step = -step
        pos += step
    return out


@pytest.mark.parametrize(
    ("n_avatar", "start", "expected"),
    [
        (1, 0, [0, 0, 0, 0, 0]),
        (2, 0, [0, 1, 0, 1, 0]),
        (2, 1, [1, 0, 1, 0, 1]),
        (3, 0, [0, 1, 2, 1, 0, 1, 2, 1]),
        (4, 0, [0, 1, 2, 3, 2, 1, 0, 1, 2, 3]),
        (4, 2, [2, 3, 2, 1, 0, 1, 2, 3, 2, 1]),
        (4, 3, [3, 2, 1, 0, 1, 2, 3, 2, 1, 0]),
        (4, 4, [2, 1, 0, 1, 2, 3, 2, 1, 0, 1]),  # phase 4: frame 2 walking backwards
        (4, 5, [1, 0, 1, 2, 3, 2, 1, 0, 1, 2]),
    ],
)
def test_pingpong_table(n_avatar, start, expected):
    got = pingpong_indices(len(expected), n_avatar, start)
    assert got.dtype == np.int64
    assert got.tolist() == expected


@pytest.mark.parametrize("n_avatar", [1, 2, 5, 17])
def test_pingpong_matches_step_walk(n_avatar):
    for start in range(max(2 * n_avatar - 2, 1)):
        got = pingpong_indices(100, n_avatar, start)
        assert got.tolist() == _pingpong_reference(100, n_avatar, start)
        # no frame repeats at the turns, neighbours always differ by one step
        if n_avatar > 1:
            assert set(np.abs(np.diff(got)).tolist()) == {1}


def test_pingpong_accepts_output_indices():
    idx = np.array([250, 3, 3, 0])
    full = pingpong_indices(251, 7, start=3)
    np.testing.assert_array_equal(pingpong_indices(idx, 7, start=3), full[idx])


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((10, 0), "avatar frame count"),
        ((10, 4, 6), "start"),
        ((10, 4, -1), "start"),
        ((10, 1, 1), "start"),
        ((-1, 4), "output frame count"),
        ((np.array([-1]), 4), "output frame indices"),
    ],
)
def test_pingpong_bad_args(args, match):
    with pytest.raises(InputError, match=match):
        pingpong_indices(*args)


def test_demo_avatar_boxes_follow_drawing(tmp_path):
    avatar = make_demo_avatar(tmp_path / "demo", seconds=0.4, size_wh=(320, 240), seed=3)
    assert avatar.frame_count == 10 and avatar.size_wh == (320, 240)
    expected = [pose_box(p, (320, 240)) for p in face_poses(10, (320, 240), seed=3)]
    np.testing.assert_array_equal(avatar.boxes(np.arange(10)), np.array(expected))
    assert avatar.info.preprocessing["detector"] == "synthetic-drawing"
    shutil.rmtree(tmp_path / "demo")
