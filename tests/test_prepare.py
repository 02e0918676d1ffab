"""prepare: video (several codecs, fps normalisation, boxes file) and SyncTalk dataset import."""

from __future__ import annotations

import json
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
from helpers import psnr_db

from lipsync_ray.avatar import Avatar
from lipsync_ray.dev.synthetic import draw_face_frames, face_poses, pose_box, write_video
from lipsync_ray.errors import InputError
from lipsync_ray.prepare import PrepareOptions, import_synctalk_dataset, prepare_avatar

SIZE = (320, 240)


def _frames(n: int, seed: int = 0) -> list[np.ndarray]:
    return list(draw_face_frames(n, SIZE, seed=seed))


def _numbered_frames(n: int) -> list[np.ndarray]:
    """Flat grey frames whose level encodes their index (survives lossless codecs exactly)."""
    return [np.full((48, 64, 3), 10 + 7 * i, np.uint8) for i in range(n)]


@pytest.mark.parametrize(
    ("codec", "ext", "crf", "lossless"),
    [
        ("libx264", "mp4", 18, False),
        ("libx264rgb", "mkv", 0, True),  # x264 lossless
        ("ffv1", "mkv", None, True),
        ("png", "mov", None, True),
    ],
)
def test_prepare_codecs(tmp_path, codec, ext, crf, lossless):
    src = _frames(12)
    video = tmp_path / f"clip.{ext}"
    write_video(video, src, codec=codec, crf=crf)
    seen = []
    summary = prepare_avatar(video, tmp_path / "av", progress=lambda d, t: seen.append((d, t)))
    assert (summary.frames, summary.fps, summary.size_wh) == (12, 25.0, SIZE)
    assert summary.detector == "mtcnn" and summary.seconds > 0
    assert seen[-1][0] == 12
    avatar = Avatar.open(summary.path)
    got = avatar.read_frames(np.arange(12))
    for k in range(12):
        if lossless:
            np.testing.assert_array_equal(got[k], src[k])
        else:
            assert psnr_db(got[k], src[k]) > 30
    # detector-derived boxes sit on the drawn face
    poses = face_poses(12, SIZE)
    boxes = avatar.boxes(np.arange(12))
    for box, pose in zip(boxes, poses, strict=True):
        x1, y1, x2, y2 = box.tolist()
        cx, cy = pose.centre_xy
        mouth_y = cy + 0.48 * pose.radius_xy[1]
        assert abs((x1 + x2) / 2 - cx) < 8
        assert y1 < mouth_y < y2 and x1 < cx < x2
    assert avatar.info.source["codec"] in (codec, "h264")
    assert avatar.info.preprocessing["smoothing"]["window"] == 5


def test_prepare_real_photograph_clip(tmp_path):
    skimage_data = pytest.importorskip("skimage.data")
    photo = cv2.cvtColor(skimage_data.astronaut(), cv2.COLOR_RGB2BGR)
    shifts = [(round(6 * np.sin(i / 3)), round(3 * np.cos(i / 4))) for i in range(10)]
    frames = []
    for dx, dy in shifts:  # the photo drifts a few pixels inside a 640x360 frame
        frame = np.full((360, 640, 3), 70, np.uint8)
        frame[0:360, 60 + dx : 572 + dx] = photo[20 + dy : 380 + dy]
        frames.append(frame)
    video = tmp_path / "astronaut.mkv"
    write_video(video, frames, codec="libx264rgb", crf=0)
    summary = prepare_avatar(video, tmp_path / "av", PrepareOptions(smoothing_window=3))
    avatar = Avatar.open(summary.path)
    assert summary.frames == 10 and summary.size_wh == (640, 360)
    for box, (dx, dy) in zip(avatar.boxes(np.arange(10)), shifts, strict=True):
        x1, y1, x2, y2 = box.tolist()
        # the mouth corners of the photo at (204, 142) and (247, 144), moved with the photo
        for mx, my in ((204, 142), (247, 144)):
            fx, fy = mx + 60 + dx, my - 20 - dy
            assert x1 + 8 < fx < x2 - 8 and y1 + 8 < fy < y2 - 8
        assert 0.95 <= (x2 - x1) / 90 <= 1.3


@pytest.mark.parametrize(
    ("source_fps", "n_source", "n_out"),
    [(30, 30, 25), (20, 10, 13), (25, 7, 7), (50, 9, 5)],
)
def test_fps_normalisation_picks_the_frame_on_screen(tmp_path, source_fps, n_source, n_out):
    src = _numbered_frames(n_source)
    video = tmp_path / "clip.mkv"
    write_video(video, src, fps=source_fps, codec="ffv1")
    boxes = {"boxes": [[0, 0, 32, 32]] * n_source}
    (tmp_path / "boxes.json").write_text(json.dumps(boxes))
    summary = prepare_avatar(video, tmp_path / "av", boxes_file=tmp_path / "boxes.json")
    assert summary.frames == n_out  # ceil(duration * 25)
    got = Avatar.open(summary.path).read_frames(np.arange(n_out))
    for k in range(n_out):
        expected = int(np.floor(k * source_fps / 25 + 1e-9))  # source frame shown at k / 25
        np.testing.assert_array_equal(got[k], src[expected], err_msg=f"output frame {k}")


def test_boxes_file_bypasses_detection(tmp_path):
    # a faceless clip: detection would fail, the boxes file must be used instead
    src = _numbered_frames(6)
    video = tmp_path / "noface.mkv"
    write_video(video, src, fps=30, codec="ffv1")
    boxes = [[i, 2, i + 20, 22] for i in range(6)]
    (tmp_path / "b.json").write_text(json.dumps({"boxes": boxes}))
    summary = prepare_avatar(video, tmp_path / "av", boxes_file=tmp_path / "b.json")
    assert summary.detector == "boxes-file" and summary.frames == 5
    avatar = Avatar.open(summary.path)
    src_idx = [int(np.floor(k * 30 / 25 + 1e-9)) for k in range(5)]
    np.testing.assert_array_equal(avatar.boxes(np.arange(5)), np.array(boxes)[src_idx])
    assert avatar.info.preprocessing["detector"] == "boxes-file"


def test_overwrite_and_existing_output(tmp_path):
    video = tmp_path / "c.mkv"
    write_video(video, _numbered_frames(3), codec="ffv1")
    (tmp_path / "b.json").write_text(json.dumps({"boxes": [[0, 0, 10, 10]] * 3}))
    prepare_avatar(video, tmp_path / "av", boxes_file=tmp_path / "b.json")
    with pytest.raises(InputError, match="already exists"):
        prepare_avatar(video, tmp_path / "av", boxes_file=tmp_path / "b.json")
    prepare_avatar(video, tmp_path / "av", boxes_file=tmp_path / "b.json", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["av", "b.json", "c.mkv"]


# --- bad inputs -------------------------------------------------------------------------------


def _good_video(tmp: Path, name: str = "ok.mkv", n: int = 4) -> Path:
    write_video(tmp / name, _numbered_frames(n), codec="ffv1")
    return tmp / name


def _truncated(tmp: Path, codec: str, ext: str) -> Path:
    full = tmp / f"full.{ext}"
    write_video(full, _frames(20), codec=codec)
    data = full.read_bytes()
    (tmp / f"cut.{ext}").write_bytes(data[: len(data) // 2])
    return tmp / f"cut.{ext}"


def _audio_only(tmp: Path) -> Path:
    with av.open(str(tmp / "speech.wav"), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=16000)
        frame = av.AudioFrame.from_ndarray(
            np.zeros((1, 1600), np.int16), format="s16", layout="mono"
        )
        frame.sample_rate = 16000
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return tmp / "speech.wav"


def _no_frames(tmp: Path) -> Path:
    with av.open(str(tmp / "empty.mp4"), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        container.start_encoding()
    return tmp / "empty.mp4"


def _boxes(tmp: Path, payload) -> Path:
    path = tmp / "boxes.json"
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload))
    return path


BAD_VIDEOS = [
    # (case, make video, make boxes file or None, file named in the error, message fragment)
    ("missing", lambda t: t / "nope.mp4", None, "nope.mp4", "not found"),
    ("text", lambda t: (t / "a.mp4").write_text("hi") and t / "a.mp4", None, "a.mp4", "video"),
    ("empty file", lambda t: (t / "e.mp4").write_bytes(b"") or t / "e.mp4", None, "e.mp4", "video"),
    ("audio only", _audio_only, None, "speech.wav", "video stream"),
    ("no frames", _no_frames, None, "empty.mp4", "video"),
    ("truncated mkv", lambda t: _truncated(t, "ffv1", "mkv"), None, "cut.mkv", "truncated"),
    ("truncated mp4", lambda t: _truncated(t, "libx264", "mp4"), None, "cut.mp4", "video"),
    ("no face", _good_video, None, "ok.mkv", "no face found"),
    (
        "boxes count",
        _good_video,
        lambda t: _boxes(t, {"boxes": [[0, 0, 9, 9]] * 3}),
        "boxes.json",
        "expected 4 boxes",
    ),
    (
        "boxes outside",
        _good_video,
        lambda t: _boxes(t, {"boxes": [[0, 0, 65, 9]] * 4}),
        "boxes.json",
        "box 0",
    ),
    (
        "boxes float",
        _good_video,
        lambda t: _boxes(t, {"boxes": [[0, 0, 9.5, 9]] * 4}),
        "boxes.json",
        "4 integers",
    ),
    (
        "boxes shape",
        _good_video,
        lambda t: _boxes(t, {"boxes": [[0, 0, 9]] * 4}),
        "boxes.json",
        "4 integers",
    ),
    ("boxes key", _good_video, lambda t: _boxes(t, [[0, 0, 9, 9]] * 4), "boxes.json", "boxes"),
    ("boxes json", _good_video, lambda t: _boxes(t, "{oops"), "boxes.json", "JSON"),
    ("boxes missing", _good_video, lambda t: t / "nope.json", "nope.json", "not found"),
]


@pytest.mark.parametrize(
    ("case", "make_video", "make_boxes", "culprit", "match"),
    BAD_VIDEOS,
    ids=[c[0] for c in BAD_VIDEOS],
)
def test_prepare_bad_inputs(tmp_path, case, make_video, make_boxes, culprit, match):
    video = make_video(tmp_path)
    boxes_file = make_boxes(tmp_path) if make_boxes else None
    with pytest.raises(InputError, match=match) as info:
        prepare_avatar(video, tmp_path / "av", boxes_file=boxes_file)
    assert culprit in str(info.value)
    assert not (tmp_path / "av").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".av.tmp")]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"fps": 0}, "fps"), ({"detector": "haar"}, "detector"), ({"smoothing_window": 2}, "odd")],
)
def test_prepare_options_validation(kwargs, match):
    with pytest.raises(InputError, match=match):
        PrepareOptions(**kwargs)


# --- SyncTalk datasets --------------------------------------------------------------------


def _synctalk_dataset(root: Path, n: int = 4) -> tuple[list[np.ndarray], np.ndarray]:
    (root / "full_body_img").mkdir(parents=True)
    (root / "landmarks").mkdir()
    rng = np.random.default_rng(0)
    images, boxes = [], []
    for k in range(n):
        image = np.ascontiguousarray(_frames(1, seed=k)[0])
        cv2.imwrite(str(root / "full_body_img" / f"{k}.jpg"), image)
        images.append(cv2.imread(str(root / "full_body_img" / f"{k}.jpg")))  # JPEG is lossy
        lms = rng.uniform(0, 200, size=(68, 2))
        lms[1] = (100.7 + k, 50.2)  # x1 = 100 + k (truncated)
        lms[52] = (150.0, 90.9 + k)  # y1 = 90 + k
        lms[31] = (180.3 + 2 * k, 60.0)  # x2 = 180 + 2k
        np.savetxt(root / "landmarks" / f"{k}.lms", lms, fmt="%.2f")
        boxes.append([100 + k, 90 + k, 180 + 2 * k, 90 + k + 80 + k])
    return images, np.array(boxes)


def test_import_synctalk_dataset(tmp_path):
    images, boxes = _synctalk_dataset(tmp_path / "ds")
    summary = import_synctalk_dataset(tmp_path / "ds", tmp_path / "av")
    assert (summary.frames, summary.size_wh, summary.detector) == (4, SIZE, "synctalk-landmarks")
    avatar = Avatar.open(tmp_path / "av")
    np.testing.assert_array_equal(avatar.boxes(np.arange(4)), boxes)
    np.testing.assert_array_equal(avatar.read_frames(np.arange(4)), np.stack(images))
    assert avatar.info.source["kind"] == "synctalk_dataset"


def _break_dataset(root: Path, how: str) -> str:
    if how == "no landmarks dir":
        for p in (root / "landmarks").iterdir():
            p.unlink()
        (root / "landmarks").rmdir()
        return "landmarks"
    if how == "gap":
        (root / "full_body_img" / "1.jpg").unlink()
        return "1.jpg"
    if how == "missing lms":
        (root / "landmarks" / "2.lms").unlink()
        return "2.lms"
    if how == "short lms":
        np.savetxt(root / "landmarks" / "2.lms", np.ones((40, 2)))
        return "2.lms"
    if how == "garbage lms":
        (root / "landmarks" / "2.lms").write_text("a b\n")
        return "2.lms"
    if how == "box outside":
        lms = np.full((68, 2), 10.0)
        lms[31, 0] = 400  # x2 beyond the 320-wide frame
        np.savetxt(root / "landmarks" / "3.lms", lms)
        return "3.lms"
    if how == "bad jpeg":
        (root / "full_body_img" / "0.jpg").write_bytes(b"not a jpeg")
        return "0.jpg"
    raise AssertionError(how)


@pytest.mark.parametrize(
    "how",
    [
        "no landmarks dir",
        "gap",
        "missing lms",
        "short lms",
        "garbage lms",
        "box outside",
        "bad jpeg",
    ],
)
def test_import_synctalk_bad_dataset(tmp_path, how):
    _synctalk_dataset(tmp_path / "ds")
    culprit = _break_dataset(tmp_path / "ds", how)
    with pytest.raises(InputError) as info:
        import_synctalk_dataset(tmp_path / "ds", tmp_path / "av")
    assert culprit in str(info.value)
    assert not (tmp_path / "av").exists()


def test_synthetic_pose_box_is_inside_and_square():
    for pose in face_poses(50, (1280, 720), seed=2):
        x1, y1, x2, y2 = pose_box(pose, (1280, 720))
        assert x2 - x1 == y2 - y1 and x1 >= 0 and y1 >= 0 and x2 <= 1280 and y2 <= 720
