"""The uint8 graph-I/O wrapper: bit-identical to the NumPy path, cached, and safe to share.

The reference of every comparison is computed here, independently of the wrapper: the user's
model in a plain ONNX Runtime session fed ``np.divide(visual.transpose(0, 3, 1, 2), 255)``,
then ``prediction_to_uint8`` (clip(y * 255, 0, 255), channels last, truncating cast).
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from lipsync_ray.composite import prediction_to_uint8
from lipsync_ray.dev.models import Arch, Size, build_model, save_model
from lipsync_ray.errors import ModelError
from lipsync_ray.inference import DeviceBuffers, GeneratorSession, Provider, SessionOptions
from lipsync_ray.inference.wrapper import default_wrapper_dir, wrap_generator

CPU = SessionOptions(providers=(Provider.CPU,))


def _inputs(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    visual = rng.integers(0, 256, (n, 320, 320, 6), dtype=np.uint8)
    audio = rng.standard_normal((n, 32, 16, 16)).astype(np.float32)
    return visual, audio


def _reference(path: Path, visual: np.ndarray, audio: np.ndarray) -> np.ndarray:
    """Today's path, spelled out: float input, the model as given, prediction_to_uint8."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (v, a), (o,) = session.get_inputs(), session.get_outputs()
    if v.shape[1] != 6:
        v, a = a, v
    x = np.divide(visual.transpose(0, 3, 1, 2), np.float32(255.0)).astype(np.float32)
    fixed = v.shape[0] == 1
    rows = [slice(i, i + 1) for i in range(len(x))] if fixed else [slice(None)]
    y = np.concatenate([session.run([o.name], {v.name: x[r], a.name: audio[r]})[0] for r in rows])
    return prediction_to_uint8(y)


def _affine(path: Path, scale: float, shift: float, *, fill: float | None = None) -> Path:
    """out = visual[:, :3] * scale + shift (+ mean(audio) * 0, or a NaN/Inf ``fill``)."""
    visual = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["b", 6, 320, 320])
    audio = helper.make_tensor_value_info("audio", TensorProto.FLOAT, ["b", 32, 16, 16])
    out = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["b", 3, 320, 320])
    k = 0.0 if fill is None else fill
    inits = [
        numpy_helper.from_array(np.array(v, dtype), name)
        for name, v, dtype in [
            ("starts", [0], np.int64),
            ("ends", [3], np.int64),
            ("axes", [1], np.int64),
            ("scale", scale, np.float32),
            ("shift", shift, np.float32),
            ("k", k, np.float32),
        ]
    ]
    nodes = [
        helper.make_node("Slice", ["input", "starts", "ends", "axes"], ["roi"]),
        helper.make_node("Mul", ["roi", "scale"], ["scaled"]),
        helper.make_node("Add", ["scaled", "shift"], ["shifted"]),
        helper.make_node("ReduceMean", ["audio"], ["a"], keepdims=1),
        helper.make_node("Mul", ["a", "k"], ["a0"]),
        helper.make_node("Add", ["shifted", "a0"], ["output"]),
    ]
    graph = helper.make_graph(nodes, "g", [visual, audio], [out], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.save(model, path)
    return path


STANDINS = {
    "unet-full": dict(arch=Arch.UNET328, size=Size.FULL),  # slow: built here, ~8 s
    "unet-small": dict(arch=Arch.UNET328, size=Size.SMALL, weights="random"),
    "identity": dict(arch=Arch.IDENTITY),
    "other-names": dict(arch=Arch.UNET328, size=Size.SMALL, input_names=("x", "visual_audio")),
    "fixed-batch": dict(
        arch=Arch.UNET328,
        size=Size.SMALL,
        input_names=("visual_input", "audio_input"),
        fixed_batch=True,
    ),
}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n == "unet-full" else n for n in STANDINS]
)
def test_predict_is_bit_identical_to_the_numpy_path(tmp_path, name):
    path = save_model(build_model(**STANDINS[name]), tmp_path / f"{name}.onnx")
    visual, audio = _inputs(2 if name == "unet-full" else 3)
    session = GeneratorSession(path, CPU, cpus=2)
    assert session.graph_io
    got = session.predict(visual, audio)
    expected = _reference(path, visual, audio)
    assert got.dtype == np.uint8 and got.shape == expected.shape and got.flags.c_contiguous
    np.testing.assert_array_equal(got, expected)
    assert np.ptp(got) > 10  # a real picture, not an untouched buffer
    # The NumPy path (graph I/O off) gives the same bytes.
    plain = GeneratorSession(path, replace(CPU, graph_io=False), cpus=2)
    assert not plain.graph_io
    np.testing.assert_array_equal(plain.predict(visual, audio), got)


def test_identity_gives_back_every_uint8_value(tmp_path):
    """u / 255 * 255 is exactly u in float32 for every u, so the identity model reproduces the
    ROI byte for byte through the wrapper."""
    path = save_model(build_model(Arch.IDENTITY), tmp_path / "identity.onnx")
    visual = (np.arange(320 * 320 * 6) % 256).astype(np.uint8).reshape(1, 320, 320, 6)
    audio = np.zeros((1, 32, 16, 16), np.float32)
    got = GeneratorSession(path, CPU).predict(visual, audio)
    np.testing.assert_array_equal(got, _reference(path, visual, audio))
    np.testing.assert_array_equal(got, visual[..., :3])


@pytest.mark.parametrize(("scale", "shift"), [(3.0, -1.0), (1.0, 0.0), (0.5, 0.25)])
def test_clip_and_truncation_of_an_overshooting_model(tmp_path, scale, shift):
    path = _affine(tmp_path / "affine.onnx", scale, shift)
    visual, audio = _inputs(2, seed=3)
    got = GeneratorSession(path, CPU).predict(visual, audio)
    np.testing.assert_array_equal(got, _reference(path, visual, audio))
    if scale == 3.0:  # both clip bounds reached
        assert got.min() == 0 and got.max() == 255
    if shift == 0.25:  # fractional values: the cast truncates where rounding would not
        rounded = np.rint(np.clip(visual[..., :3] / 255.0 * scale + shift, 0, 1) * 255)
        assert (got < rounded).any()


@pytest.mark.parametrize("fill", [np.nan, np.inf, -np.inf])
def test_a_non_finite_output_raises_through_the_in_graph_check(tmp_path, fill):
    session = GeneratorSession(_affine(tmp_path / "bad.onnx", 1.0, 0.0, fill=fill), CPU)
    assert session.graph_io
    with pytest.raises(ModelError, match="NaN or Inf"):
        session.predict(*_inputs(1))


@pytest.mark.parametrize("io_binding", [True, False])
def test_writes_into_the_given_buffer(tmp_path, io_binding):
    path = _affine(tmp_path / "m.onnx", 0.9, 0.05)
    session = GeneratorSession(path, replace(CPU, io_binding=io_binding))
    visual, audio = _inputs(4, seed=1)
    buffer = np.zeros((6, 320, 320, 3), np.uint8)
    returned = session.predict(visual[1:3], audio[1:3], out=buffer[2:4])
    assert np.shares_memory(returned, buffer)
    np.testing.assert_array_equal(buffer[2:4], _reference(path, visual[1:3], audio[1:3]))
    assert not buffer[:2].any() and not buffer[4:].any()


@pytest.mark.parametrize(
    ("visual", "audio", "out", "error"),
    [
        (np.zeros((1, 6, 320, 320), np.float32), (1,), None, "visual batch must be uint8"),
        (np.zeros((1, 320, 320, 3), np.uint8), (1,), None, "visual batch must be uint8"),
        (np.zeros((2, 320, 320, 6), np.uint8), (1,), None, "batches differ: 2 vs 1"),
        (np.zeros((1, 320, 320, 6), np.uint8), (1,), (1, 320, 320, 4), "buffer must be"),
        (np.zeros((1, 320, 320, 6), np.uint8), (1,), (2, 320, 320, 3), "buffer must be"),
    ],
)
def test_bad_predict_arguments(tmp_path, visual, audio, out, error):
    session = GeneratorSession(_affine(tmp_path / "m.onnx", 1.0, 0.0), CPU)
    buffer = None if out is None else np.zeros(out, np.uint8)
    with pytest.raises(ModelError, match=error):
        session.predict(visual, np.zeros((*audio, 32, 16, 16), np.float32), out=buffer)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_cache_keyed_by_the_model_and_the_model_untouched(tmp_path):
    path = _affine(tmp_path / "m.onnx", 1.0, 0.0)
    before = _sha(path)
    first = wrap_generator(path)
    second = wrap_generator(path)
    assert not first.cached and second.cached and first.path == second.path
    assert first.path.parent == default_wrapper_dir(path) == tmp_path / ".cache" / "graph-io"
    assert _sha(path) == before
    other = wrap_generator(_affine(tmp_path / "n.onnx", 0.5, 0.0))
    assert other.path != first.path
    elsewhere = wrap_generator(path, tmp_path / "cache")
    assert elsewhere.path.parent == tmp_path / "cache" and _sha(elsewhere.path) == _sha(first.path)


def test_many_actors_wrapping_at_once(tmp_path):
    path = save_model(build_model(Arch.UNET328, Size.SMALL), tmp_path / "unet.onnx")
    results, errors = [], []

    def wrap():
        try:
            results.append(wrap_generator(path, tmp_path / "cache").path)
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=wrap) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(set(results)) == 1
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [results[0].name]
    visual, audio = _inputs(1)
    session = GeneratorSession(path, replace(CPU, graph_cache_dir=str(tmp_path / "cache")))
    np.testing.assert_array_equal(session.predict(visual, audio), _reference(path, visual, audio))


@pytest.mark.slow
def test_reduced_precision_models_are_wrapped_too(tmp_path):
    from lipsync_ray import precision

    fp32 = save_model(build_model(Arch.UNET328, Size.SMALL), tmp_path / "unet.onnx")
    visual, audio = _inputs(4, seed=5)
    reduced = [
        precision.convert_fp16(fp32, tmp_path / "fp16.onnx"),
        precision.quantize_int8(fp32, tmp_path / "int8.onnx", visual, audio),
    ]
    for path in reduced:
        session = GeneratorSession(path, CPU)
        assert session.graph_io
        np.testing.assert_array_equal(
            session.predict(visual[:2], audio[:2]), _reference(path, visual[:2], audio[:2])
        )


def test_an_old_opset_runs_without_the_wrapper_and_says_so(tmp_path, caplog):
    visual_in = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["b", 6, 320, 320])
    audio_in = helper.make_tensor_value_info("audio", TensorProto.FLOAT, ["b", 32, 16, 16])
    out = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["b", 3, 320, 320])
    half = numpy_helper.from_array(np.array(0.5, np.float32), "half")
    nodes = [  # opset 8: Slice takes attributes
        helper.make_node("Slice", ["input"], ["roi"], starts=[0], ends=[3], axes=[1]),
        helper.make_node("Mul", ["roi", "half"], ["output"]),
    ]
    graph = helper.make_graph(nodes, "g", [visual_in, audio_in], [out], [half])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)], ir_version=9)
    path = tmp_path / "old.onnx"
    onnx.save(model, path)
    with caplog.at_level("WARNING"):
        session = GeneratorSession(path, CPU)
    assert not session.graph_io
    assert "uint8 graph I/O is off" in caplog.text and "opset >= 9" in caplog.text
    visual, audio = _inputs(1)
    np.testing.assert_array_equal(session.predict(visual, audio), _reference(path, visual, audio))


def test_device_buffers_bind_and_reuse(tmp_path):
    """The binding logic of the CUDA path, run with OrtValues on the CPU device."""
    path = save_model(build_model(Arch.UNET328, Size.SMALL), tmp_path / "unet.onnx")
    for outputs in (False, True):
        session = GeneratorSession(path, CPU)
        buffers = DeviceBuffers("cpu", 0, outputs=outputs)
        session._buffers = buffers
        for seed, n in [(0, 3), (1, 3), (2, 3), (3, 1)]:
            visual, audio = _inputs(n, seed)
            got = session.predict(visual, audio)
            np.testing.assert_array_equal(got, _reference(path, visual, audio))
        # Two inputs (and with ``outputs`` two outputs), made again only for the new batch size.
        assert buffers.allocations == (4 if outputs else 2) + (3 if outputs else 2)


@pytest.mark.ray
def test_actors_render_the_same_frames_with_and_without_graph_io(
    ray_cluster, small_models, tmp_path
):
    """Through the real actors: lossless shards are byte-identical either way."""
    import pyarrow.parquet as pq

    from lipsync_ray.config import EncodeMode, PoolConfig, RenderConfig
    from lipsync_ray.dev.speech import synth_speech, write_audio
    from lipsync_ray.dev.synthetic import make_demo_avatar
    from lipsync_ray.pipeline import render
    from lipsync_ray.shards import ShardCodec

    avatar = make_demo_avatar(tmp_path / "avatar", seconds=1.0, size_wh=(320, 240), seed=1)
    speech = write_audio(tmp_path / "speech.wav", synth_speech(1.0, seed=3))
    images = []
    for graph_io in (True, False):
        config = RenderConfig(
            model=str(small_models["unet"]),
            audio_encoder=str(small_models["encoder"]),
            pool=PoolConfig(chunk_frames=16, gpus_per_actor=0.0),
            session=replace(CPU, graph_io=graph_io),
            shard_codec=ShardCodec.RAW,
            keep_shards=True,
            encode_mode=EncodeMode.SINGLE,
        )
        out = tmp_path / f"graph-io-{graph_io}.mp4"
        report = render(avatar.info.path, speech, out, config)
        files = sorted((Path(report.work_dir) / "shards").glob("chunk-*.parquet"))
        images.append([c for f in files for c in pq.read_table(f).column("image").to_pylist()])
    assert len(images[0]) == len(images[1]) > 0
    assert all(a == b for a, b in zip(*images, strict=True))
