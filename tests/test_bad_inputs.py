"""Bad inputs through the ``lipsync-ray`` command: one readable line, the right exit code.

Every case builds one broken input next to otherwise good ones and runs the CLI in-process
(``cli.main``), asserting: exit code 2 (bad input), exactly one ``lipsync-ray: error:`` line
on stderr that names the culprit file and says what is wrong, no traceback, nothing at the
output path (and no work directory). Every case except the NaN model must fail *before Ray
starts*: ``ray.init`` is replaced by a tripwire for the duration of the table.

A few cases also run as a real ``lipsync-ray`` subprocess, where the logging configuration
and Ray's own output are real too, so "one line on stderr" is checked exactly.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import wave
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import (
    GOOD_AVATAR_FRAMES,
    GOOD_SIZE_WH,
    cli_command,
    ray_tripwire,
)
from onnx import TensorProto, helper, numpy_helper

from lipsync_ray.cli import main
from lipsync_ray.dev.speech import synth_speech, write_audio
from lipsync_ray.dev.synthetic import draw_face_frames, write_video
from lipsync_ray.errors import ModelError
from lipsync_ray.inference import (
    GeneratorSession,
    Provider,
    SessionOptions,
    check_encoder_model,
    check_generator_model,
)

_CPU = SessionOptions(providers=(Provider.CPU,))
AVATAR_FRAMES = GOOD_AVATAR_FRAMES  # the `good` fixture's (conftest.py)
AVATAR_SIZE_WH = GOOD_SIZE_WH


# ------------------------------------------------------------------------------ good inputs


@pytest.fixture
def no_ray(monkeypatch):
    """Any attempt to start or join Ray fails loudly (validation must come first)."""
    ray_tripwire(monkeypatch)


def _render_argv(good: dict[str, Path], out: Path, **over) -> list[str]:
    """``render`` arguments with the good inputs, some replaced (``extra``: more flags)."""
    args = {
        "avatar": good["avatar"],
        "audio": good["audio"],
        "model": good["model"],
        "encoder": good["encoder"],
        "out": out,
    }
    extra = over.pop("extra", [])
    args.update(over)
    return [
        "render",
        str(args["avatar"]),
        str(args["audio"]),
        "-o",
        str(args["out"]),
        "--model",
        str(args["model"]),
        "--audio-encoder",
        str(args["encoder"]),
        "--gpus-per-actor",
        "0",
        *extra,
    ]


def _one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("lipsync-ray: error: "), lines[0]
    assert "Traceback" not in err and "unexpected" not in lines[0], lines[0]
    return lines[0]


# -------------------------------------------------------------------------- broken avatars


def _copy_avatar(good, tmp: Path) -> Path:
    return Path(shutil.copytree(good["avatar"], tmp / "avatar"))


def _edit_meta(good, tmp: Path, edit: Callable[[dict], None]) -> Path:
    root = _copy_avatar(good, tmp)
    meta = json.loads((root / "avatar.json").read_text())
    edit(meta)
    (root / "avatar.json").write_text(json.dumps(meta))
    return root


def _avatar_without(name: str):
    def make(good, tmp):
        root = _copy_avatar(good, tmp)
        (root / name).unlink()
        return {"avatar": root}

    return make


def _avatar_bad_json(good, tmp):
    root = _copy_avatar(good, tmp)
    (root / "avatar.json").write_text("{oops")
    return {"avatar": root}


def _avatar_box_count(good, tmp):
    return {"avatar": _edit_meta(good, tmp, lambda m: m.update(boxes=m["boxes"][:-1]))}


def _avatar_box_outside(good, tmp):
    def edit(meta):
        meta["boxes"][2][2] = AVATAR_SIZE_WH[0] + 10

    return {"avatar": _edit_meta(good, tmp, edit)}


def _avatar_fewer_frames(good, tmp):
    """frames.npy holds 4 frames where avatar.json says 5."""
    root = _copy_avatar(good, tmp)
    frames = np.load(root / "frames.npy")
    np.save(root / "frames.npy", np.ascontiguousarray(frames[:-1]))
    return {"avatar": root}


def _avatar_truncated_crops(good, tmp):
    root = _copy_avatar(good, tmp)
    data = (root / "crops.npy").read_bytes()
    (root / "crops.npy").write_bytes(data[: len(data) // 2])
    return {"avatar": root}


def _avatar_is_a_file(good, tmp):
    (tmp / "avatar.mp4").write_bytes(b"not a bundle")
    return {"avatar": tmp / "avatar.mp4"}


# --------------------------------------------------------------------------- broken audio


def _speech(path: Path, seconds: float = 2.0) -> Path:
    return write_audio(path, synth_speech(seconds, seed=5))


def _audio_truncated_wav(good, tmp):
    path = _speech(tmp / "cut.wav")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return {"audio": path}


def _audio_corrupt_mp3(good, tmp):
    path = _speech(tmp / "garbled.mp3")
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 2000] = np.random.default_rng(0).integers(0, 256, 2000, np.uint8).tobytes()
    path.write_bytes(bytes(data))
    return {"audio": path}


def _audio_damaged_flac(good, tmp):
    """64 random bytes inside a FLAC: full length, CRC errors in the log, nothing raised by
    FFmpeg (it drops the frame and decodes on)."""
    path = _speech(tmp / "damaged.flac", 3.0)
    data = bytearray(path.read_bytes())
    at = int(0.4 * len(data))
    data[at : at + 64] = np.random.default_rng(1).integers(0, 256, 64, np.uint8).tobytes()
    path.write_bytes(bytes(data))
    return {"audio": path}


def _audio_zero_length_wav(good, tmp):
    path = tmp / "silence.wav"
    with wave.open(str(path), "wb") as w:  # a valid header and no samples
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
    return {"audio": path}


def _audio_bytes(name: str, data: bytes):
    def make(good, tmp):
        (tmp / name).write_bytes(data)
        return {"audio": tmp / name}

    return make


def _audio_too_short(good, tmp):
    return {"audio": write_audio(tmp / "blip.wav", np.zeros(2000, np.float32))}  # 0.125 s


def _audio_directory(good, tmp):
    (tmp / "speech.d").mkdir()
    return {"audio": tmp / "speech.d"}


def _audio_unreadable(good, tmp):
    """A file whose bytes cannot be read, as root too (CI runs as root, which chmod 000 does
    not stop): a link to /proc/self/mem, a regular file whose first byte (address 0, never
    mapped) fails with EIO in whichever process reads it."""
    path = tmp / "locked.wav"
    path.symlink_to("/proc/self/mem")
    return {"audio": path}


# --------------------------------------------------------------------------- broken models


def _tiny_generator(
    path: Path,
    *,
    visual=("input", TensorProto.FLOAT, ["batch", 6, 320, 320]),
    audio=("audio", TensorProto.FLOAT, ["batch", 32, 16, 16]),
    more_inputs=(),
    nan: bool = False,
) -> Path:
    """out = visual[:, :3] + 0 * mean(audio) (or NaN * mean(audio)): a generator with a known
    function, declared with whatever inputs the case needs."""
    inputs = [helper.make_tensor_value_info(*spec) for spec in (visual, audio, *more_inputs)]
    out = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 3, 320, 320])
    inits = [
        numpy_helper.from_array(np.array([0], np.int64), "starts"),
        numpy_helper.from_array(np.array([3], np.int64), "ends"),
        numpy_helper.from_array(np.array([1], np.int64), "axes"),
        numpy_helper.from_array(np.array([np.nan if nan else 0.0], np.float32), "k"),
    ]
    nodes = [
        helper.make_node("Slice", [visual[0], "starts", "ends", "axes"], ["roi"]),
        helper.make_node("Cast", ["roi"], ["roi_f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", [audio[0]], ["a"], keepdims=1),
        helper.make_node("Cast", ["a"], ["a_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["a_f", "k"], ["a0"]),
        helper.make_node("Add", ["roi_f", "a0"], ["output"]),
    ]
    graph = helper.make_graph(nodes, "g", inputs, [out], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.save(model, path)
    return path


def _model(**kw):
    def make(good, tmp):
        return {"model": _tiny_generator(tmp / "generator.onnx", **kw)}

    return make


def _model_junk(good, tmp):
    (tmp / "generator.onnx").write_bytes(b"\x00\xffnot a model" * 10)
    return {"model": tmp / "generator.onnx"}


def _model_external_outside(good, tmp):
    (tmp / "models").mkdir()
    path = _tiny_generator(tmp / "models" / "generator.onnx")
    model = onnx.load(path)
    k = next(t for t in model.graph.initializer if t.name == "k")
    k.data_location = TensorProto.EXTERNAL
    k.ClearField("float_data")
    k.ClearField("raw_data")
    k.external_data.add(key="location", value="../weights.bin")
    (tmp / "weights.bin").write_bytes(np.zeros(1, np.float32).tobytes())
    onnx.save(model, path)
    return {"model": path}


def _encoder_as_generator(good, tmp):
    return {"model": good["encoder"]}


def _generator_as_encoder(good, tmp):
    return {"encoder": good["model"]}


# --------------------------------------------------------------------------- output paths


def _output_missing_dir(good, tmp):
    return {"out": tmp / "no-such-dir" / "out.mp4"}


def _output_exists(good, tmp):
    (tmp / "out.mp4").write_bytes(b"an earlier render")
    return {}


def _output_is_a_directory(good, tmp):
    (tmp / "out.mp4").mkdir()
    return {"extra": ["--overwrite"]}


def _start_frame_out_of_range(good, tmp):
    return {"extra": ["--start-frame", "99"]}


@dataclass(frozen=True)
class Case:
    id: str
    make: Callable[[dict, Path], dict]  # returns replacements for _render_argv
    culprit: str  # a path fragment the error line must name
    message: str  # a regex the error line must match
    needs_lead: str | None = None  # the driver fix that makes the case pass


RENDER_CASES = [
    Case("avatar-missing", lambda g, t: {"avatar": t / "no-avatar"}, "no-avatar", "not found"),
    Case("avatar-is-a-file", _avatar_is_a_file, "avatar.mp4", "not found"),
    Case("avatar-no-json", _avatar_without("avatar.json"), "avatar.json", "no avatar.json"),
    Case("avatar-json-corrupt", _avatar_bad_json, "avatar.json", "JSON"),
    Case("avatar-frames-missing", _avatar_without("frames.npy"), "frames.npy", "missing"),
    Case("avatar-box-count", _avatar_box_count, "avatar.json", "expected 5 boxes"),
    Case("avatar-box-outside-frame", _avatar_box_outside, "avatar.json", r"box 2 .*x2 <= 320"),
    Case("avatar-frame-count", _avatar_fewer_frames, "frames.npy", r"shape \(5, 240, 320, 3\)"),
    Case("avatar-truncated-npy", _avatar_truncated_crops, "crops.npy", "truncated"),
    Case("audio-missing", lambda g, t: {"audio": t / "nope.wav"}, "nope.wav", "not found"),
    Case("audio-directory", _audio_directory, "speech.d", "not found|directory"),
    Case("audio-unreadable", _audio_unreadable, "locked.wav", "ermission|readable"),
    Case("audio-empty-file", _audio_bytes("empty.wav", b""), "empty.wav", "readable audio"),
    Case(
        "audio-not-media",
        _audio_bytes("notes.txt", b"hello world\n" * 100),
        "notes.txt",
        "audio stream|readable audio",
    ),
    Case("audio-truncated-wav", _audio_truncated_wav, "cut.wav", "truncated"),
    Case("audio-corrupt-mp3", _audio_corrupt_mp3, "garbled.mp3", "corrupt"),
    Case("audio-damaged-flac", _audio_damaged_flac, "damaged.flac", "corrupt"),
    Case("audio-zero-length", _audio_zero_length_wav, "silence.wav", "got none"),
    Case("audio-too-short", _audio_too_short, "blip.wav", "too short"),
    Case("model-missing", lambda g, t: {"model": t / "nope.onnx"}, "nope.onnx", "not found"),
    Case("model-not-onnx", _model_junk, "generator.onnx", "not a readable ONNX"),
    Case(
        "model-external-data-outside",
        _model_external_outside,
        "generator.onnx",
        "inside the model's directory",
    ),
    Case(
        "model-visual-3-channels",
        _model(visual=("input", TensorProto.FLOAT, ["batch", 3, 320, 320])),
        "generator.onnx",
        "6 channels",
    ),
    Case(
        "model-visual-256px",
        _model(visual=("input", TensorProto.FLOAT, ["batch", 6, 256, 256])),
        "generator.onnx",
        r"\[B,6,320,320\]",
    ),
    Case(
        "model-double-input",
        _model(visual=("input", TensorProto.DOUBLE, ["batch", 6, 320, 320])),
        "generator.onnx",
        r"tensor\(float\)",
    ),
    Case(
        "model-extra-input",  # names do not matter (found by shape), but a third input does
        _model(more_inputs=[("speaker_id", TensorProto.INT64, ["batch", 1])]),
        "generator.onnx",
        "two rank-4 float inputs",
    ),
    Case(
        "model-fixed-batch-2",
        _model(
            visual=("input", TensorProto.FLOAT, [2, 6, 320, 320]),
            audio=("audio", TensorProto.FLOAT, [2, 32, 16, 16]),
        ),
        "generator.onnx",
        "fixed batch axis must be 1",
    ),
    Case(
        "model-is-the-audio-encoder",
        _encoder_as_generator,
        "encoder-small.onnx",
        "two rank-4 float inputs",
    ),
    Case(
        "encoder-is-the-generator",
        _generator_as_encoder,
        "unet-small.onnx",
        r"audio encoder must have one input \[B,1,80,16\]",
    ),
    Case("output-dir-missing", _output_missing_dir, "no-such-dir", "directory does not exist"),
    Case("output-exists", _output_exists, "out.mp4", "--overwrite"),
    Case("output-is-a-directory", _output_is_a_directory, "out.mp4", "is a directory"),
    Case("start-frame-out-of-range", _start_frame_out_of_range, "avatar", r"start frame.*99"),
]


def _params(cases: list[Case]):
    return [
        pytest.param(
            c,
            id=c.id,
            marks=[pytest.mark.xfail(strict=True, reason=c.needs_lead)] if c.needs_lead else [],
        )
        for c in cases
    ]


@pytest.mark.parametrize("case", _params(RENDER_CASES))
def test_render_rejects_bad_input_before_ray(case: Case, good, tmp_path, capsys, no_ray):
    over = case.make(good, tmp_path)
    out = over.pop("out", tmp_path / "out.mp4")
    before = out.read_bytes() if out.is_file() else None
    rc = main(_render_argv(good, out, **over))
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2, line
    assert case.culprit in line
    assert re.search(case.message, line), line
    if before is not None:  # an existing output is left exactly as it was
        assert out.read_bytes() == before
    elif not over.get("extra") or "--overwrite" not in over["extra"]:
        assert not out.exists()
    assert not Path(f"{out}.work").exists()  # nothing created before the input was rejected


# --------------------------------------------------------------------- a few as subprocesses


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    [
        c
        for c in RENDER_CASES
        if c.id in ("avatar-box-count", "audio-truncated-wav", "output-exists")
    ],
    ids=lambda c: c.id,
)
def test_render_bad_input_subprocess(case: Case, good, tmp_path):
    out = tmp_path / "out.mp4"
    over = case.make(good, tmp_path)
    before = out.read_bytes() if out.is_file() else None
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    result = subprocess.run(
        [*cli_command(), *_render_argv(good, out, **over)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    line = _one_error_line(result.stderr)  # the real stderr: logging and Ray included
    assert result.returncode == 2, result.stderr
    assert case.culprit in line
    assert result.stdout == ""
    assert (out.read_bytes() if out.is_file() else None) == before


# ------------------------------------------------------------------- a NaN-producing model


def _nan_argv(good, tmp_path: Path) -> tuple[list[str], Path, Path]:
    model = _tiny_generator(tmp_path / "nan-generator.onnx", nan=True)
    out = tmp_path / "out.mp4"
    argv = _render_argv(good, out, model=model, extra=["--chunk-frames", "8", "--max-retries", "1"])
    return argv, out, model


@pytest.mark.ray
def test_nan_model_fails_with_one_line_naming_the_model(ray_cluster, good, tmp_path, capsys):
    """It passes validation (only running it shows the NaN), so it fails inside an actor."""
    argv, out, model = _nan_argv(good, tmp_path)
    rc = main(argv)
    line = _one_error_line(capsys.readouterr().err)
    assert rc in (1, 2), line
    assert str(model) in line and "NaN" in line
    assert not out.exists()


@pytest.mark.ray
def test_nan_model_is_a_bad_input_exit_2(ray_cluster, good, tmp_path, capsys):
    argv, _, model = _nan_argv(good, tmp_path)
    rc = main(argv)
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2, line
    # Every chunk fails the same way; the first failure the driver sees names its chunk (with
    # out-of-order actor execution that need not be chunk 0).
    assert str(model) in line and re.search(r"chunk \d+ \(frames \d+-\d+\)", line), line


# ------------------------------------------------- the static model check matches the session


@pytest.mark.parametrize(
    "make",
    [
        _model(),
        _model(visual=("visual_input", TensorProto.FLOAT, ["batch", 6, 320, 320])),
        _model(
            visual=("input", TensorProto.FLOAT, [1, 6, 320, 320]),
            audio=("audio", TensorProto.FLOAT, [1, 32, 16, 16]),
        ),
        _model(visual=("input", TensorProto.FLOAT, ["batch", 3, 320, 320])),
        _model(visual=("input", TensorProto.DOUBLE, ["batch", 6, 320, 320])),
        _model(more_inputs=[("speaker_id", TensorProto.INT64, ["batch", 1])]),
        _model(
            visual=("input", TensorProto.FLOAT, [2, 6, 320, 320]),
            audio=("audio", TensorProto.FLOAT, [2, 32, 16, 16]),
        ),
        _encoder_as_generator,
        lambda g, t: {"model": g["model"]},
    ],
    ids=[
        "ok",
        "ok-renamed",
        "ok-fixed-batch",
        "3-channels",
        "double",
        "extra-input",
        "batch-2",
        "encoder",
        "small-unet",
    ],
)
def test_static_generator_check_agrees_with_the_session(make, good, tmp_path):
    path = make(good, tmp_path)["model"]
    try:
        GeneratorSession(path, _CPU)
        session_error = None
    except ModelError as exc:
        session_error = exc.message
    try:
        check_generator_model(path)
        static_error = None
    except ModelError as exc:
        static_error = exc.message
    assert static_error == session_error


def test_static_encoder_check(good):
    assert check_encoder_model(good["encoder"]) == good["encoder"]
    with pytest.raises(ModelError, match=r"one input \[B,1,80,16\]"):
        check_encoder_model(good["model"])


# ------------------------------------------------------------------------------- prepare


def _video(path: Path, n: int = 20) -> Path:
    write_video(path, draw_face_frames(n, (160, 120), seed=1), codec="ffv1")
    return path


def _boxes_file(tmp: Path, boxes) -> Path:
    (tmp / "boxes.json").write_text(json.dumps({"boxes": boxes}))
    return tmp / "boxes.json"


def _prep_truncated(tmp: Path) -> list[str]:
    full = _video(tmp / "full.mkv")
    data = full.read_bytes()
    (tmp / "cut.mkv").write_bytes(data[: len(data) // 2])
    return [str(tmp / "cut.mkv"), "--boxes", str(_boxes_file(tmp, [[40, 30, 120, 110]] * 20))]


def _prep_corrupt(codec: str, ext: str) -> Callable[[Path], list[str]]:
    """64 random bytes at 30 % of the file: FFmpeg conceals the damage and decodes on, so
    only its error log shows it (an undetected corrupt source would garble the avatar)."""

    def make(tmp: Path) -> list[str]:
        path = tmp / f"damaged.{ext}"
        write_video(path, draw_face_frames(40, (320, 240), seed=1), codec=codec)
        data = bytearray(path.read_bytes())
        at = int(0.3 * len(data))
        data[at : at + 64] = np.random.default_rng(1).integers(0, 256, 64, np.uint8).tobytes()
        path.write_bytes(bytes(data))
        boxes = _boxes_file(tmp, [[40, 30, 200, 190]] * 40)
        return [str(path), "--boxes", str(boxes)]

    return make


def _prep_not_media(tmp: Path) -> list[str]:
    (tmp / "clip.mp4").write_text("this is not a video\n" * 50)
    return [str(tmp / "clip.mp4")]


def _prep_boxes(boxes) -> Callable[[Path], list[str]]:
    def make(tmp: Path) -> list[str]:
        return [str(_video(tmp / "clip.mkv")), "--boxes", str(_boxes_file(tmp, boxes))]

    return make


def _prep_output_exists(tmp: Path) -> list[str]:
    (tmp / "av").mkdir()
    (tmp / "av" / "keep.txt").write_text("mine")
    return [str(_video(tmp / "clip.mkv", 2))]


PREPARE_CASES = [
    ("video-missing", lambda t: [str(t / "nope.mp4")], "nope.mp4", "not found"),
    ("video-not-media", _prep_not_media, "clip.mp4", "video"),
    ("video-truncated", _prep_truncated, "cut.mkv", "truncated"),
    ("video-corrupt-h264", _prep_corrupt("libx264", "mp4"), "damaged.mp4", "corrupt"),
    ("video-corrupt-ffv1", _prep_corrupt("ffv1", "mkv"), "damaged.mkv", "corrupt"),
    ("boxes-outside-frame", _prep_boxes([[40, 30, 170, 110]] * 20), "boxes.json", "box 0"),
    ("boxes-count", _prep_boxes([[40, 30, 120, 110]] * 7), "boxes.json", "expected 20 boxes"),
    ("output-exists", _prep_output_exists, "av", "exists"),
    (
        "synctalk-dataset-missing",
        lambda t: ["--synctalk-dataset", str(t / "no-dataset")],
        "no-dataset",
        "missing",
    ),
]


@pytest.mark.parametrize(
    ("make", "culprit", "message"),
    [c[1:] for c in PREPARE_CASES],
    ids=[c[0] for c in PREPARE_CASES],
)
def test_prepare_rejects_bad_input(make, culprit, message, tmp_path, capsys):
    existed = (tmp_path / "av").exists()
    argv = ["prepare", *make(tmp_path), "-o", str(tmp_path / "av")]
    existed = existed or (tmp_path / "av").exists()
    rc = main(argv)
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2, line
    assert culprit in line and re.search(message, line), line
    if existed:
        assert [p.name for p in (tmp_path / "av").iterdir()] == ["keep.txt"]
    else:
        assert not (tmp_path / "av").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".av.")]  # no temp bundle
