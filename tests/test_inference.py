"""The session factory: input detection by shape, fixed batches, providers, bad models.

The models here are tiny graphs with known functions written in the test, so every assertion
compares against an exact expectation.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lipsync_ray.dev.models import Arch, Size, build_model, save_model
from lipsync_ray.errors import ModelError
from lipsync_ray.inference import (
    DEFAULT_PROVIDERS,
    EncoderSession,
    GeneratorSession,
    Provider,
    SessionOptions,
    check_model_file,
    device_memory_bytes,
    with_gpu_share,
)

CPU = SessionOptions(providers=(Provider.CPU,))


def _generator(
    path: Path,
    names=("input", "audio"),
    *,
    batch="batch",
    visual_shape=(6, 320, 320),
    audio_shape=(32, 16, 16),
    dtype=TensorProto.FLOAT,
    op="identity",
    order="visual-first",
) -> Path:
    """out = visual[:, :3] + mean(audio) * 0 (identity), or a NaN-producing variant."""
    visual = helper.make_tensor_value_info(names[0], dtype, [batch, *visual_shape])
    audio = helper.make_tensor_value_info(names[1], TensorProto.FLOAT, [batch, *audio_shape])
    out = helper.make_tensor_value_info("output", TensorProto.FLOAT, [batch, 3, 320, 320])
    inits = [
        numpy_helper.from_array(np.array([0], np.int64), "starts"),
        numpy_helper.from_array(np.array([3], np.int64), "ends"),
        numpy_helper.from_array(np.array([1], np.int64), "axes"),
        numpy_helper.from_array(np.array([0.0 if op == "identity" else np.nan], np.float32), "k"),
    ]
    nodes = [
        helper.make_node("Slice", [names[0], "starts", "ends", "axes"], ["roi"]),
        helper.make_node("ReduceMean", [names[1]], ["a"], keepdims=1),
        helper.make_node("Mul", ["a", "k"], ["a0"]),
        helper.make_node("Add", ["roi", "a0"], ["output"]),
    ]
    inputs = [visual, audio] if order == "visual-first" else [audio, visual]
    graph = helper.make_graph(nodes, "g", inputs, [out], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.save(model, path)
    return path


def _batch(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    visual = rng.integers(0, 256, (n, 320, 320, 6), dtype=np.uint8)
    audio = rng.standard_normal((n, 32, 16, 16)).astype(np.float32)
    return visual, audio


@pytest.mark.parametrize(
    ("names", "order"),
    [
        (("input", "audio"), "visual-first"),
        (("visual_input", "audio_input"), "visual-first"),
        (("x", "y"), "audio-first"),  # names mean nothing: shapes decide
    ],
)
def test_inputs_found_by_shape(tmp_path, names, order):
    session = GeneratorSession(_generator(tmp_path / "m.onnx", names, order=order), CPU)
    assert session.input_names == names
    visual, audio = _batch(3)
    out = session.run(visual, audio)
    np.testing.assert_allclose(out, visual[..., :3].transpose(0, 3, 1, 2) / 255.0, atol=1e-7)
    assert session.providers == ["CPUExecutionProvider"]


def test_fixed_batch_model_runs_frame_by_frame(tmp_path):
    session = GeneratorSession(_generator(tmp_path / "m.onnx", batch=1), CPU)
    assert session.fixed_batch
    visual, audio = _batch(5)
    out = session.run(visual, audio)
    assert out.shape == (5, 3, 320, 320)
    np.testing.assert_allclose(out, visual[..., :3].transpose(0, 3, 1, 2) / 255.0, atol=1e-7)


def test_float_visual_input_accepted(tmp_path):
    session = GeneratorSession(_generator(tmp_path / "m.onnx"), CPU)
    visual, audio = _batch(2)
    x = visual.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    np.testing.assert_array_equal(session.run(x, audio), session.run(visual, audio))


def test_thread_count_follows_cpus(tmp_path):
    session = GeneratorSession(_generator(tmp_path / "m.onnx"), CPU, cpus=2)
    assert session.threads == 2
    session = GeneratorSession(
        _generator(tmp_path / "m.onnx"),
        SessionOptions(providers=(Provider.CPU,), intra_op_threads=1),
        cpus=2,
    )
    assert session.threads == 1


def test_missing_gpu_provider_falls_back_loudly(tmp_path, caplog):
    """CUDA and TensorRT are asked for on a machine without them: CPU runs, and we say so."""
    import lipsync_ray.inference.providers as providers

    providers._warned.clear()
    with caplog.at_level(logging.WARNING, logger="lipsync_ray.inference"):
        session = GeneratorSession(
            _generator(tmp_path / "m.onnx"),
            SessionOptions(providers=(Provider.TENSORRT, Provider.CUDA, Provider.CPU)),
        )
    assert session.providers[0] == "CPUExecutionProvider"
    assert any(
        "CPUExecutionProvider" in r.message or "not have" in r.message for r in caplog.records
    )


def _junk(path: Path) -> Path:
    path.write_bytes(b"\x00\xffnot a model" * 10)
    return path


def _external_data_model(tmp_path: Path, location: str) -> Path:
    path = _generator(tmp_path / "m.onnx")
    model = onnx.load(path)
    tensor = next(t for t in model.graph.initializer if t.name == "k")
    tensor.data_location = TensorProto.EXTERNAL
    del tensor.external_data[:]
    tensor.external_data.add(key="location", value=location)
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    onnx.save(model, path)
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "missing.onnx", "not found"),
        (lambda p: _junk(p / "junk.onnx"), "ONNX"),
        (lambda p: _generator(p / "m.onnx", visual_shape=(3, 320, 320)), "6 channels"),
        (lambda p: _generator(p / "m.onnx", audio_shape=(16, 16, 16)), "32 channels"),
        (lambda p: _generator(p / "m.onnx", visual_shape=(6, 256, 256)), r"\[B,6,320,320\]"),
        (lambda p: _generator(p / "m.onnx", dtype=TensorProto.DOUBLE), "tensor\\(float\\)"),
        (lambda p: _external_data_model(p, "../secret.bin"), "inside the model's directory"),
        (lambda p: _external_data_model(p, "/etc/passwd"), "inside the model's directory"),
        (lambda p: _external_data_model(p, "weights.bin"), "missing"),
    ],
    ids=[
        "missing",
        "not-onnx",
        "visual-3-channels",
        "audio-16-channels",
        "visual-256",
        "double-input",
        "external-dotdot",
        "external-absolute",
        "external-missing",
    ],
)
def test_bad_models(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(ModelError, match=message):
        GeneratorSession(path, CPU)


def test_nan_output_raises(tmp_path):
    session = GeneratorSession(_generator(tmp_path / "m.onnx", op="nan"), CPU)
    with pytest.raises(ModelError, match="NaN"):
        session.run(*_batch(1))


@pytest.mark.parametrize(
    ("visual", "audio", "message"),
    [
        (
            np.zeros((1, 320, 320, 3), np.uint8),
            np.zeros((1, 32, 16, 16), np.float32),
            "visual batch",
        ),
        (
            np.zeros((1, 320, 320, 6), np.float64),
            np.zeros((1, 32, 16, 16), np.float32),
            "visual batch",
        ),
        (
            np.zeros((1, 320, 320, 6), np.uint8),
            np.zeros((1, 16, 32, 16), np.float32),
            "audio batch",
        ),
        (np.zeros((2, 320, 320, 6), np.uint8), np.zeros((1, 32, 16, 16), np.float32), "differ"),
    ],
)
def test_bad_batches(tmp_path, visual, audio, message):
    session = GeneratorSession(_generator(tmp_path / "m.onnx"), CPU)
    with pytest.raises(ModelError, match=message):
        session.run(visual, audio)


def test_encoder_session(tmp_path):
    """A linear encoder: features = flatten(window) @ W, checked against NumPy."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((80 * 16, 512)).astype(np.float32) * 0.01
    x = helper.make_tensor_value_info("mel", TensorProto.FLOAT, ["b", 1, 80, 16])
    y = helper.make_tensor_value_info("features", TensorProto.FLOAT, ["b", 512])
    nodes = [
        helper.make_node("Flatten", ["mel"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "W"], ["features"]),
    ]
    graph = helper.make_graph(nodes, "enc", [x], [y], [numpy_helper.from_array(weight, "W")])
    path = tmp_path / "enc.onnx"
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), path
    )
    encoder = EncoderSession(path, CPU)
    windows = rng.standard_normal((7, 1, 80, 16)).astype(np.float32)
    np.testing.assert_allclose(
        encoder(windows), windows.reshape(7, -1) @ weight, rtol=1e-4, atol=1e-4
    )


def test_check_model_file_accepts_inside_external_data(tmp_path):
    path = _external_data_model(tmp_path, "weights.bin")
    (tmp_path / "weights.bin").write_bytes(np.array([0.0], np.float32).tobytes())
    assert check_model_file(path) == path
    session = GeneratorSession(path, CPU)
    visual, audio = _batch(1)
    np.testing.assert_allclose(
        session.run(visual, audio)[0, 0], visual[0, ..., 0] / 255.0, atol=1e-7
    )


def _reshaped(path: Path, source: str) -> Path:
    """out = reshape(source, [B, -1, 320, 320]) with the shape computed at run time, so the
    output's channel count is unknown until then; ``source`` is "roi" (right) or "input"
    (6 channels: wrong)."""
    visual = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["b", 6, 320, 320])
    audio = helper.make_tensor_value_info("audio", TensorProto.FLOAT, ["b", 32, 16, 16])
    out = helper.make_tensor_value_info("output", TensorProto.FLOAT, None)
    inits = [
        numpy_helper.from_array(np.array([0], np.int64), "zero"),
        numpy_helper.from_array(np.array([1], np.int64), "one"),
        numpy_helper.from_array(np.array([3], np.int64), "three"),
        numpy_helper.from_array(np.array([-1, 320, 320], np.int64), "rest"),
    ]
    nodes = [
        helper.make_node("Slice", ["input", "zero", "three", "one"], ["roi"]),
        helper.make_node("Shape", [source], ["s"]),
        helper.make_node("Slice", ["s", "zero", "one"], ["b"]),
        helper.make_node("Concat", ["b", "rest"], ["shape"], axis=0),
        helper.make_node("Reshape", [source, "shape"], ["output"]),
    ]
    graph = helper.make_graph(nodes, "g", [visual, audio], [out], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.save(model, path)
    return path


@pytest.mark.slow
def test_io_binding_gives_the_plain_run_bit_for_bit(tmp_path):
    path = save_model(build_model(Arch.UNET328, Size.SMALL, seed=1), tmp_path / "unet.onnx")
    bound = GeneratorSession(path, CPU)
    plain = GeneratorSession(path, replace(CPU, io_binding=False))
    visual, audio = _batch(3, seed=2)
    out = bound.run(visual, audio)
    assert out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, plain.run(visual, audio))
    assert np.ptp(out) > 0.01  # a real output, not an untouched buffer


def test_io_binding_with_an_output_shape_known_only_at_run_time(tmp_path):
    session = GeneratorSession(_reshaped(tmp_path / "m.onnx", "roi"), CPU)
    assert not session._out_declared
    visual, audio = _batch(2)
    np.testing.assert_allclose(
        session.run(visual, audio), visual[..., :3].transpose(0, 3, 1, 2) / 255.0, atol=1e-7
    )
    wrong = GeneratorSession(_reshaped(tmp_path / "w.onnx", "input"), CPU)
    with pytest.raises(ModelError, match=r"output must be \(B, 3, 320, 320\), got \(2, 6, 320"):
        wrong.run(visual, audio)


GIB = 2**30


@pytest.mark.parametrize(
    ("options", "gpu_ids", "share", "expected"),
    [
        (SessionOptions(), [], 0.0, {"providers": (Provider.CPU,), "limit": None}),
        (SessionOptions(), ["3"], 0.25, {"providers": DEFAULT_PROVIDERS, "limit": 5.1 * GIB}),
        (SessionOptions(), ["0"], 0.5, {"providers": DEFAULT_PROVIDERS, "limit": 10.2 * GIB}),
        (SessionOptions(), ["0"], 1.0, {"providers": DEFAULT_PROVIDERS, "limit": None}),
        (SessionOptions(gpu_mem_limit_bytes=GIB), ["0"], 0.25, {"limit": GIB}),
        (SessionOptions(), ["7"], 0.25, {"limit": None}),  # memory unknown: no limit, a warning
    ],
    ids=["no-gpu", "quarter", "half", "whole", "explicit", "unknown"],
)
def test_with_gpu_share(options, gpu_ids, share, expected, caplog):
    cards = {"0": 24 * GIB, "3": 24 * GIB}  # what nvidia-smi would say, by physical id
    got = with_gpu_share(options, gpu_ids, share, memory_of=cards.get)
    assert got.providers == expected.get("providers", options.providers)
    if expected["limit"] is None:
        assert got.gpu_mem_limit_bytes is None
    else:
        assert got.gpu_mem_limit_bytes == pytest.approx(expected["limit"], rel=1e-6)
    if gpu_ids == ["7"]:
        assert "GPU 7: its memory size is unknown" in caplog.text


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ('echo "24564"', 24564 * 2**20),  # an RTX 4090, in MiB
        ("echo 'NVIDIA-SMI has failed' >&2; exit 9", None),
        ("echo '[N/A]'", None),
        (None, None),  # no nvidia-smi at all
    ],
    ids=["4090", "fails", "not-a-number", "absent"],
)
def test_device_memory_bytes(tmp_path, monkeypatch, script, expected):
    if script is not None:
        exe = tmp_path / "nvidia-smi"
        exe.write_text(f'#!/bin/sh\n[ "$3" = "-i" ] && [ "$4" = "2" ] || exit 3\n{script}\n')
        exe.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert device_memory_bytes("2") == expected
