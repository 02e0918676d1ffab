"""NVENC without a GPU: the up-front trial, its one-line reasons, session slots, GPU visibility.

What needs a real NVENC engine (the encode itself) is covered in test_encode.py when one is
present; everything here runs on a CPU-only machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from lipsync_ray.actors import see_gpus_for_nvenc
from lipsync_ray.cli import main
from lipsync_ray.encode import (
    NVENC_SESSIONS_GEFORCE,
    EncodeOptions,
    VideoCodec,
    available_video_codecs,
    check_video_encoder,
)
from lipsync_ray.encoders import _encoder_failure_reason, encoder_session
from lipsync_ray.errors import InputError

NVENC = EncodeOptions(codec=VideoCodec.H264_NVENC)
needs_no_nvenc = pytest.mark.skipif(
    VideoCodec.H264_NVENC in available_video_codecs(), reason="NVENC works on this machine"
)


@pytest.fixture(scope="module")
def render_inputs(tmp_path_factory, small_models):
    from lipsync_ray.dev.speech import synth_speech, write_audio
    from lipsync_ray.dev.synthetic import make_demo_avatar

    root = tmp_path_factory.mktemp("nvenc-inputs")
    avatar = make_demo_avatar(root / "avatar", seconds=1.0, size_wh=(320, 240), seed=1)
    speech = write_audio(root / "speech.wav", synth_speech(1.0, seed=3))
    return {"avatar": str(avatar.info.path), "audio": str(speech), **small_models}


@needs_no_nvenc
def test_cli_render_with_nvenc_exits_2_before_ray_starts(render_inputs, tmp_path, capsys):
    import ray

    out = tmp_path / "out.mp4"
    argv = [
        "render", render_inputs["avatar"], render_inputs["audio"], "-o", str(out),
        "--model", str(render_inputs["identity"]),
        "--audio-encoder", str(render_inputs["encoder"]),
        "--video-codec", "h264_nvenc",
    ]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "video encoder h264_nvenc cannot be used" in err
    assert "no NVIDIA GPU" in err or "no NVENC engine" in err or "driver refused" in err
    assert not ray.is_initialized()  # failed before any actor, or Ray, started
    assert not out.exists()


@needs_no_nvenc
def test_trial_raises_one_line_input_error():
    with pytest.raises(InputError, match="h264_nvenc cannot be used") as info:
        check_video_encoder(NVENC, (320, 240))
    assert "\n" not in str(info.value)


def test_libx264_passes_the_check_without_a_trial():
    check_video_encoder(EncodeOptions(), (320, 240))
    check_video_encoder(EncodeOptions(), (321, 240))  # odd sizes are rejected later, not here


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (None, "no NVIDIA GPU or driver found"),
        ([], "no NVIDIA GPU or driver found"),
        (["NVIDIA H100 80GB HBM3"], "NVIDIA H100 80GB HBM3 has no NVENC engine"),
        (["NVIDIA H200", "NVIDIA H200"], "NVIDIA H200 has no NVENC engine"),
        (["NVIDIA A100-SXM4-40GB"], "has no NVENC engine"),
        (["NVIDIA GeForce RTX 4090"], f"GeForce drivers allow {NVENC_SESSIONS_GEFORCE}"),
        (["NVIDIA H100 PCIe", "NVIDIA L4"], "the driver refused a session"),
    ],
)
def test_the_likely_reason_names_the_gpu(names, expected):
    reason = _encoder_failure_reason(VideoCodec.H264_NVENC, gpu_names=lambda: names)
    assert expected in reason


@pytest.mark.parametrize(
    ("value", "error"),
    [(-1, "nvenc_sessions must be >= 0"), (1.5, "nvenc_sessions must be >= 0")],
)
def test_bad_session_cap(value, error):
    with pytest.raises(InputError, match=error):
        EncodeOptions(codec=VideoCodec.H264_NVENC, nvenc_sessions=value)


def test_sessions_are_capped_across_threads(tmp_path):
    options = EncodeOptions(codec=VideoCodec.H264_NVENC, nvenc_sessions=2)
    lock = threading.Lock()
    held, peak, slots = [0], [0], []

    def encode():
        with encoder_session(options, tmp_path) as slot:
            with lock:
                held[0] += 1
                peak[0] = max(peak[0], held[0])
                slots.append(slot)
            time.sleep(0.1)
            with lock:
                held[0] -= 1

    threads = [threading.Thread(target=encode) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert peak[0] == 2 and sorted(set(slots)) == [0, 1] and len(slots) == 6


def test_a_killed_holder_frees_its_slot(tmp_path):
    code = (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(tmp_path / 'slot-0.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('held', flush=True)\ntime.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        one = EncodeOptions(codec=VideoCodec.H264_NVENC, nvenc_sessions=2)
        with encoder_session(one, tmp_path) as slot:
            assert slot == 1  # slot 0 is taken
        holder.kill()
        holder.wait(timeout=30)
        with encoder_session(one, tmp_path) as slot:
            assert slot == 0  # the kernel released the dead holder's lock
    finally:
        holder.kill()
        holder.wait(timeout=30)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (EncodeOptions(), None),  # libx264 takes no slot
        (EncodeOptions(codec=VideoCodec.H264_NVENC, nvenc_sessions=0), None),  # no cap
        (EncodeOptions(codec=VideoCodec.H264_NVENC, nvenc_sessions=1), 0),
    ],
)
def test_which_encoders_take_a_slot(tmp_path, options, expected):
    with encoder_session(options, tmp_path) as slot:
        assert slot == expected


@pytest.mark.parametrize(
    ("codec", "environ", "changed", "after"),
    [
        (VideoCodec.H264_NVENC, {"CUDA_VISIBLE_DEVICES": ""}, True, None),
        (VideoCodec.H264_NVENC, {"CUDA_VISIBLE_DEVICES": "1"}, False, "1"),
        (VideoCodec.H264_NVENC, {}, False, None),
        (VideoCodec.LIBX264, {"CUDA_VISIBLE_DEVICES": ""}, False, ""),
    ],
)
def test_gpu_visibility_for_nvenc(codec, environ, changed, after):
    assert see_gpus_for_nvenc(codec, environ) is changed
    assert environ.get("CUDA_VISIBLE_DEVICES") == after


@pytest.mark.ray
def test_a_zero_gpu_actor_sees_the_gpus_after_the_fix(ray_cluster):
    """On this Ray version: what a num_gpus=0 actor gets, and what it has after the fix."""
    ray = ray_cluster

    @ray.remote(num_gpus=0, num_cpus=0)
    class Probe:
        def check(self, codec: VideoCodec) -> tuple[str | None, str | None]:
            before = os.environ.get("CUDA_VISIBLE_DEVICES")
            see_gpus_for_nvenc(codec)
            return before, os.environ.get("CUDA_VISIBLE_DEVICES")

    before, after = ray.get(Probe.remote().check.remote(VideoCodec.H264_NVENC), timeout=120)
    assert before in (None, "", os.environ.get("CUDA_VISIBLE_DEVICES"))
    assert after != ""  # never hidden from NVENC
