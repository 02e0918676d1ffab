"""The benchmark's footage and its rival: the photographed avatar, and the single-process
reference script (``lipsync-ray reference``) that lipsync-ray is measured against."""

from __future__ import annotations

import json
import subprocess

import av
import numpy as np
import pytest
from helpers import cli_command, psnr_db

from lipsync_ray.avatar import Avatar, pingpong_indices
from lipsync_ray.dev.synthetic import PHOTO_NOISE_STD, make_photo_avatar, photo_frames
from lipsync_ray.face import MtcnnDetector

pytest.importorskip("skimage.data")


def test_photo_frames_are_a_real_face_moving_with_noise():
    frames, boxes = photo_frames(40, (640, 360), seed=3)
    frames = list(frames)
    assert len(frames) == len(boxes) == 40
    assert all(f.shape == (360, 640, 3) and f.dtype == np.uint8 for f in frames)
    # Every box is a square inside the frame, and it follows the camera.
    side = boxes[:, 2] - boxes[:, 0]
    assert np.array_equal(side, boxes[:, 3] - boxes[:, 1])
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 640).all() and (boxes[:, 3] <= 360).all()
    assert np.ptp(boxes[:, 0]) >= 2 and np.ptp(boxes[:, 1]) >= 2
    # The face a detector finds (eyes, nose, mouth) lies inside the frame's box.
    detector = MtcnnDetector()
    for k in (0, 39):
        face = detector.detect_main(frames[k])
        assert face is not None
        x1, y1, x2, y2 = boxes[k]
        nose, mouth_l, mouth_r = face.landmarks_xy[2], face.landmarks_xy[3], face.landmarks_xy[4]
        for x, y in (nose, mouth_l, mouth_r):
            assert x1 < x < x2 and y1 < y < y2, (k, face.landmarks_xy, boxes[k])
    # Sensor noise: the same frame twice differs by about the noise, fresh in each frame.
    again, _ = photo_frames(1, (640, 360), seed=3)
    clean, _ = photo_frames(1, (640, 360), seed=3, noise_std=0.0)
    first, clean = next(again), next(clean)
    assert np.array_equal(first, frames[0])  # seeded: reproducible
    noise = first.astype(np.float64) - clean
    assert abs(noise.std() - PHOTO_NOISE_STD) < 0.3


def test_photo_avatar_bundle_matches_its_frames(tmp_path):
    avatar = make_photo_avatar(tmp_path / "a", seconds=0.4, size_wh=(320, 180))
    frames, boxes = photo_frames(10, (320, 180))
    assert avatar.frame_count == 10
    assert np.array_equal(avatar.read_frames(np.arange(10)), np.stack(list(frames)))
    assert np.array_equal(avatar.boxes(np.arange(10)), boxes)


@pytest.fixture(scope="module")
def reference_inputs(tmp_path_factory, small_models):
    from lipsync_ray.dev.speech import synth_speech, write_audio

    root = tmp_path_factory.mktemp("reference")
    avatar = make_photo_avatar(root / "avatar", seconds=0.6, size_wh=(320, 180))
    audio = write_audio(root / "speech.wav", synth_speech(1.2, seed=1))
    return avatar, audio, root


@pytest.mark.parametrize(
    ("style", "phases"),
    [
        ("jpeg", {"load", "features", "session", "generate", "encode"}),
        # inference, pasting and encoding overlap: one phase
        ("threaded", {"load", "features", "session", "generate_encode"}),
    ],
)
def test_reference_with_the_identity_model_reproduces_the_avatar(
    reference_inputs, small_models, style, phases
):
    """The identity generator returns its ROI, so the reference's MP4 must show the avatar's
    frames in ping-pong order, up to the paste's resampling, JPEG and H.264."""
    avatar, audio, root = reference_inputs
    out = root / f"ref-{style}.mp4"
    argv = [
        *cli_command(), "reference", str(avatar.path), str(audio),
        "-o", str(out), "--model", str(small_models["identity"]),
        "--audio-encoder", str(small_models["encoder"]), "--crf", "18", "--style", style,
        "--batch-size", "3",  # batches that do not divide the frames
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    with av.open(str(out)) as container:
        assert container.streams.audio  # AAC of the input audio
        video = [f.to_ndarray(format="bgr24") for f in container.decode(video=0)]
    assert len(video) == result["frames"] and abs(len(video) - 1.2 * 25) <= 2
    bundle = Avatar.open(avatar.path)
    expected = bundle.read_frames(pingpong_indices(len(video), bundle.frame_count))
    worst = min(psnr_db(v, e) for v, e in zip(video, expected, strict=True))
    assert worst > 30, worst
    assert result["style"] == style and set(result["phases_s"]) == phases
