"""Reduced precision: INT8 quantisation, FP16 conversion, the quality gate and its cache."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from lipsync_ray import precision as prec
from lipsync_ray.avatar import Avatar
from lipsync_ray.dev.models import Arch, Size, build_model, save_model
from lipsync_ray.dev.synthetic import make_demo_avatar
from lipsync_ray.errors import InputError, ModelError
from lipsync_ray.inference import GeneratorSession, Provider, SessionOptions
from lipsync_ray.precision import Int8Options, Precision
from lipsync_ray.quantize import integer_products_saturate

CPU = SessionOptions(providers=(Provider.CPU,))
FAST = {"calibration_frames": 8, "holdout_frames": 4, "threads": 2}


def smooth_generator(seed: int = 0) -> onnx.ModelProto:
    """A well-conditioned generator with the UNet's I/O: small errors stay small.

    output = sigmoid(conv1x1(relu(conv3x3(visual))) + conv1x1(global_mean(audio))). The
    stand-in UNet-328 has random weights and is chaotic (an input change of 1e-4 moves its
    output by ~35 dB PSNR), so no 8-bit model of it can pass a 35 dB gate; a trained model
    behaves like this one, which lets the "passes" paths be tested with the default threshold.
    """
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((8, 6, 3, 3)) * 0.15 + 1.0 / 54).astype(np.float32)
    w2 = (rng.standard_normal((3, 8, 1, 1)) * 0.5).astype(np.float32)
    wa = (rng.standard_normal((3, 32, 1, 1)) * 0.1).astype(np.float32)
    inits = [
        numpy_helper.from_array(w1, "w1"),
        numpy_helper.from_array(np.zeros(8, np.float32), "b1"),
        numpy_helper.from_array(w2, "w2"),
        numpy_helper.from_array(np.full(3, -0.5, np.float32), "b2"),
        numpy_helper.from_array(wa, "wa"),
        numpy_helper.from_array(np.zeros(3, np.float32), "ba"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="c1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="r1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="c2"),
        helper.make_node("GlobalAveragePool", ["audio"], ["ga"], name="ga"),
        helper.make_node("Conv", ["ga", "wa", "ba"], ["ca"], name="ca"),
        helper.make_node("Add", ["c2", "ca"], ["logits"], name="add"),
        helper.make_node("Sigmoid", ["logits"], ["output"], name="sigmoid"),
    ]
    graph = helper.make_graph(
        nodes,
        "smooth",
        [
            helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 6, 320, 320]),
            helper.make_tensor_value_info("audio", TensorProto.FLOAT, ["batch", 32, 16, 16]),
        ],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 3, 320, 320])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def mean_generator() -> onnx.ModelProto:
    """output = sigmoid(4 * mean of the 6 visual channels - 2 + conv1x1(global_mean(audio))).

    The visual conv's weights are all equal, so per-channel INT8 puts every one at +127 and a
    white pixel's u8 x s8 products pair up to 2 * 255 * 127 = 64770, past an int16."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(np.full((3, 6, 1, 1), 4 / 6, np.float32), "w"),
        numpy_helper.from_array(np.full(3, -2.0, np.float32), "b"),
        numpy_helper.from_array(
            (rng.standard_normal((3, 32, 1, 1)) * 0.1).astype(np.float32), "wa"
        ),
        numpy_helper.from_array(np.zeros(3, np.float32), "ba"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "w", "b"], ["c"], name="c"),
        helper.make_node("GlobalAveragePool", ["audio"], ["ga"], name="ga"),
        helper.make_node("Conv", ["ga", "wa", "ba"], ["ca"], name="ca"),
        helper.make_node("Add", ["c", "ca"], ["logits"], name="add"),
        helper.make_node("Sigmoid", ["logits"], ["output"], name="sigmoid"),
    ]
    graph = helper.make_graph(
        nodes,
        "mean",
        [
            helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 6, 320, 320]),
            helper.make_tensor_value_info("audio", TensorProto.FLOAT, ["batch", 32, 16, 16]),
        ],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 3, 320, 320])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("precision-models")
    return {
        "unet": save_model(build_model(Arch.UNET328, Size.SMALL, seed=0), root / "unet.onnx"),
        "other": save_model(
            build_model(Arch.UNET328, Size.SMALL, seed=1, weights="random"), root / "other.onnx"
        ),
        # Random weights: the FACE encoder's features spread wider on speech (its random
        # features read its loudness channel), which costs the smooth model's INT8 ~5 dB.
        "encoder": save_model(
            build_model(Arch.AUDIO_ENCODER, Size.SMALL, seed=0, weights="random"),
            root / "encoder.onnx",
        ),
        "smooth": save_model(smooth_generator(0), root / "smooth.onnx"),
    }


@pytest.fixture(scope="module")
def avatar(tmp_path_factory) -> Avatar:
    return make_demo_avatar(
        tmp_path_factory.mktemp("precision-avatar") / "a", seconds=2.0, size_wh=(320, 240)
    )


@pytest.fixture(scope="module")
def features(models) -> np.ndarray:
    return prec.calibration_features(models["encoder"], seconds=2.0)


def held_out(avatar: Avatar, features: np.ndarray, k: int = 4):
    idx = np.linspace(0, avatar.frame_count - 1, k).astype(np.int64)
    rows = np.linspace(0, len(features) - 1, k).astype(np.int64)
    from lipsync_ray.audio import audio_windows

    return avatar.read_visual_inputs(idx), audio_windows(features, rows)


def reference_psnr(reference: Path, candidate: Path, visual, audio) -> tuple[np.ndarray, float]:
    """Independent of lipsync_ray: raw ONNX Runtime, the reference's uint8 cast, NumPy PSNR."""

    def predict(path: Path) -> np.ndarray:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        x = visual.astype(np.float32).transpose(0, 3, 1, 2) / 255.0
        out = session.run(None, {"input": x.astype(np.float32), "audio": audio})[0]
        return (np.clip(out, 0, 1) * 255).astype(np.uint8).transpose(0, 2, 3, 1)

    a = predict(reference)[:, 5:310, 5:315].astype(np.float64)  # rows 5..309, cols 5..314
    b = predict(candidate)[:, 5:310, 5:315].astype(np.float64)
    per_frame = np.array(
        [10 * math.log10(255**2 / np.mean((x - y) ** 2)) for x, y in zip(a, b, strict=True)]
    )
    pooled = 10 * math.log10(255**2 / np.mean((a - b) ** 2))
    return per_frame, pooled


# ---------------------------------------------------------------------------- pure helpers


@pytest.mark.parametrize(
    ("frames", "calib", "hold", "n_calib", "n_hold"),
    [(100, 64, 16, 52, 16), (50, 8, 4, 8, 4), (25, 64, 16, 7, 6), (2, 4, 4, 1, 1), (5, 1, 1, 1, 1)],
)
def test_split_frames_are_disjoint_and_guarded(frames, calib, hold, n_calib, n_hold):
    calibration, holdout = prec.split_frames(frames, calib, hold)
    assert (len(calibration), len(holdout)) == (n_calib, n_hold)
    assert not set(calibration) & set(holdout)
    assert calibration.min() >= 0 and max(calibration.max(), holdout.max()) < frames
    if frames >= 25:
        gaps = np.abs(calibration[:, None] - holdout[None, :]).min(axis=1)
        assert gaps.min() > prec.GUARD_FRAMES


@pytest.mark.parametrize(
    ("frames", "calib", "hold", "match"),
    [(1, 8, 4, "at least 2 frames"), (10, 0, 4, ">= 1"), (10, 8, 0, ">= 1")],
)
def test_split_frames_rejects(frames, calib, hold, match):
    with pytest.raises(InputError, match=match):
        prec.split_frames(frames, calib, hold)


def test_face_psnr_matches_opencv_on_the_face_region():
    rng = np.random.default_rng(3)
    ref = rng.integers(0, 256, (3, 320, 320, 3), dtype=np.uint8)
    noisy = np.clip(ref + rng.normal(0, [[[[2.0]]], [[[6.0]]], [[[20.0]]]]), 0, 255).astype(
        np.uint8
    )
    noisy[:, :5] = 0  # outside the face region (rows 0-4): must not count
    ref.setflags(write=False)
    got = prec.face_psnr(ref, noisy)
    expected = [
        cv2.PSNR(r[5:310, 5:315], n[5:310, 5:315], 255.0) for r, n in zip(ref, noisy, strict=True)
    ]
    np.testing.assert_allclose(got, expected, rtol=1e-9)
    assert prec.face_psnr(ref, ref.copy()).tolist() == [prec.PSNR_CAP_DB] * 3


def test_calibration_features_are_cached_by_encoder_and_recipe(models, tmp_path, monkeypatch):
    fresh = prec.calibration_features(models["encoder"], seconds=2.0)
    first = prec.cached_calibration_features(models["encoder"], tmp_path, seconds=2.0)
    assert first.tobytes() == fresh.tobytes()
    [kept] = tmp_path.glob("calibration-*.npy")

    def no_encoder(*args, **kwargs):
        raise AssertionError("the encoder ran although the features were cached")

    monkeypatch.setattr(prec, "calibration_features", no_encoder)
    assert prec.cached_calibration_features(models["encoder"], tmp_path, seconds=2.0).tobytes() == (
        fresh.tobytes()
    )
    monkeypatch.undo()
    other = save_model(
        build_model(Arch.AUDIO_ENCODER, Size.SMALL, seed=1), tmp_path / "other-encoder.onnx"
    )
    prec.cached_calibration_features(other, tmp_path, seconds=2.0)  # another encoder
    prec.cached_calibration_features(models["encoder"], tmp_path, seconds=1.0)  # another recipe
    assert len(list(tmp_path.glob("calibration-*.npy"))) == 3
    kept.write_bytes(b"not an npy file")  # a damaged file is made again
    again = prec.cached_calibration_features(models["encoder"], tmp_path, seconds=2.0)
    assert again.tobytes() == fresh.tobytes() == np.load(kept).tobytes()


def test_calibration_features_are_reproducible(models):
    a = prec.calibration_features(models["encoder"], seconds=2.0)
    b = prec.calibration_features(models["encoder"], seconds=2.0)
    # docs/model-and-audio.md §3.3: W = int((T - 16) / 80 * 25) + 2 windows of
    # T = 1 + 32000 // 200 mel frames, N = W + 2 feature rows.
    assert a.shape == (int((1 + 32000 // 200 - 16) / 80 * 25) + 4, 512) and a.dtype == np.float32
    assert a.tobytes() == b.tobytes()  # the cache key depends on these bytes


# ---------------------------------------------------------------------------- INT8 and the gate


@pytest.mark.slow
def test_int8_small_unet_has_qdq_nodes_runs_and_keeps_the_output_float(
    models, avatar, features, tmp_path
):
    visual, audio = held_out(avatar, features, 6)
    out = prec.quantize_int8(models["unet"], tmp_path / "int8.onnx", visual, audio)
    model = onnx.load(str(out))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    int8_weights = [i for i in model.graph.initializer if i.data_type == TensorProto.INT8]
    assert len(int8_weights) > 20
    producers = {o: n for n in model.graph.node for o in n.output}
    # Float sigmoid <- DequantizeLinear <- QuantizeLinear <- Conv with INT8 weights: the
    # output conv is quantised, the sigmoid that makes the output is not.
    last = producers["output"]
    chain = [last]
    while len(chain) < 4:
        chain.append(producers[chain[-1].input[0]])
    assert [n.op_type for n in chain] == ["Sigmoid", "DequantizeLinear", "QuantizeLinear", "Conv"]
    assert producers[chain[-1].input[1]].op_type == "DequantizeLinear"  # INT8 weights
    session = GeneratorSession(out, CPU, cpus=2)
    pred = session.run(visual[:2], audio[:2])
    assert pred.shape == (2, 3, 320, 320) and pred.min() >= 0 and pred.max() <= 1


@pytest.mark.slow
def test_int8_qoperator_format_on_a_fixed_batch_export(avatar, features, tmp_path):
    # Exports with the batch axis fixed to 1 are calibrated frame by frame.
    model = save_model(
        build_model(Arch.UNET328, Size.SMALL, input_names=("visual_input", "audio_input"),
                    fixed_batch=True),
        tmp_path / "fixed.onnx",
    )  # fmt: skip
    visual, audio = held_out(avatar, features, 3)
    options = Int8Options(format=prec.QuantFormat.QOPERATOR, per_channel=False)
    out = prec.quantize_int8(model, tmp_path / "int8.onnx", visual, audio, options)
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert "QLinearConv" in ops and "DequantizeLinear" in ops
    pred = GeneratorSession(out, CPU).run(visual, audio)
    assert pred.shape == (3, 3, 320, 320)


@pytest.mark.parametrize(
    ("visual", "audio", "match"),
    [
        (np.zeros((2, 320, 320, 6), np.float32), np.zeros((2, 32, 16, 16), np.float32), "uint8"),
        (np.zeros((0, 320, 320, 6), np.uint8), np.zeros((0, 32, 16, 16), np.float32), "k >= 1"),
        (np.zeros((2, 320, 320, 6), np.uint8), np.zeros((3, 32, 16, 16), np.float32), "audio"),
    ],
)
def test_quantize_int8_rejects_bad_calibration_arrays(models, tmp_path, visual, audio, match):
    with pytest.raises(InputError, match=match):
        prec.quantize_int8(models["unet"], tmp_path / "int8.onnx", visual, audio)
    assert not (tmp_path / "int8.onnx").exists()


def test_gate_psnr_matches_an_independent_computation(models, avatar, features, tmp_path):
    visual, audio = held_out(avatar, features)
    calib_v, calib_a = held_out(avatar, features, 8)
    int8 = prec.quantize_int8(models["smooth"], tmp_path / "int8.onnx", calib_v, calib_a)
    gate = prec.quality_gate(
        models["smooth"], int8, visual, audio, precision=Precision.INT8, threshold_db=35.0
    )
    per_frame, pooled = reference_psnr(models["smooth"], int8, visual, audio)
    assert gate.frames == 4
    assert gate.psnr_db == pytest.approx(per_frame.min(), abs=1e-9)
    assert gate.mean_psnr_db == pytest.approx(pooled, abs=1e-9)
    assert gate.passed and gate.psnr_db > 35.0
    assert gate.provider == "CPUExecutionProvider"


def test_int8_defaults_match_fp32_where_integer_products_would_overflow_int16(tmp_path):
    # x86 without VNNI clamps each pair of u8 x s8 products to an int16 (vpmaddubsw): with
    # 8-bit weights at +127 the white square's conv output halved (about 15 dB here). The
    # default options must make a model that is exact enough on the CPU that made it.
    fp32 = save_model(mean_generator(), tmp_path / "mean.onnx")
    rng = np.random.default_rng(0)
    visual = rng.integers(0, 256, (4, 320, 320, 6), dtype=np.uint8)
    visual[:, 100:200, 100:200] = 255
    audio = rng.random((4, 32, 16, 16), dtype=np.float32)
    int8 = prec.quantize_int8(fp32, tmp_path / "int8.onnx", visual, audio)
    per_frame, _ = reference_psnr(fp32, int8, visual, audio)
    assert per_frame.min() > 40.0


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((x for x in text.splitlines() if x.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def test_the_saturation_probe_agrees_with_the_cpu_flags():
    # ONNX Runtime's x86 u8 x s8 kernels: vpdpbusd (int32 sums) with VNNI, else vpmaddubsw
    # (int16 pair sums, clamped) on AVX2 and AVX-512.
    flags = _cpu_flags()
    if {"avx512_vnni", "avx_vnni", "amx_int8"} & flags:
        expected = False
    elif "avx2" in flags:
        expected = True
    else:
        pytest.skip("not an x86 CPU with AVX2 (Linux flags): no independent answer here")
    assert integer_products_saturate() is expected
    resolved = Int8Options().resolved()
    assert resolved.reduce_range is expected
    assert Int8Options(reduce_range=not expected).resolved().reduce_range is (not expected)


def test_a_broken_model_fails_the_gate(models, avatar, features):
    visual, audio = held_out(avatar, features)
    gate = prec.quality_gate(
        models["unet"], models["other"], visual, audio, precision=Precision.INT8
    )
    per_frame, _ = reference_psnr(models["unet"], models["other"], visual, audio)
    assert not gate.passed and gate.psnr_db < 20.0
    assert gate.psnr_db == pytest.approx(per_frame.min(), abs=1e-9)


@pytest.fixture
def broken_quantizer(monkeypatch, models):
    """quantize_int8 replaced by one that writes a different network (a failing "INT8")."""
    calls = []

    def fake(model, out, visual, audio, options=None):
        calls.append(model)
        Path(out).write_bytes(Path(models["other"]).read_bytes())
        return Path(out)

    monkeypatch.setattr(prec, "quantize_int8", fake)
    return calls


def test_explicit_int8_that_fails_the_gate_is_refused(models, avatar, features, tmp_path,
                                                       broken_quantizer):  # fmt: skip
    with pytest.raises(ModelError, match=r"int8 failed the quality gate: .* expected >= 35\.0"):
        prec.prepare_model(
            models["unet"], avatar, "int8", provider_is_gpu=False, features=features,
            cache_dir=tmp_path, **FAST,
        )  # fmt: skip


def test_auto_falls_back_to_fp32_with_one_warning(models, avatar, features, tmp_path,
                                                   broken_quantizer, caplog):  # fmt: skip
    caplog.set_level(logging.WARNING, logger="lipsync_ray.precision")
    prepared = prec.prepare_model(
        models["unet"], avatar, Precision.AUTO, provider_is_gpu=False, features=features,
        cache_dir=tmp_path, **FAST,
    )  # fmt: skip
    assert prepared.precision is Precision.FP32 and prepared.requested is Precision.AUTO
    assert prepared.path == Path(models["unet"])
    assert prepared.gate is not None and not prepared.gate.passed
    assert "failed the quality gate" in prepared.note
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "running fp32" in warnings[0].getMessage()
    json.dumps(prepared.to_dict())


@pytest.mark.parametrize("requested", ["auto", "int8"])
def test_a_model_that_cannot_be_quantised(models, avatar, tmp_path, monkeypatch, requested):
    def failing(model, *args, **kwargs):
        raise ModelError("INT8 quantisation failed: unsupported op", path=model)

    monkeypatch.setattr(prec, "quantize_int8", failing)
    call = lambda: prec.prepare_model(  # noqa: E731
        models["unet"], avatar, requested, provider_is_gpu=False, cache_dir=tmp_path, **FAST
    )
    if requested == "int8":
        with pytest.raises(ModelError, match="unsupported op"):
            call()
    else:
        prepared = call()
        assert prepared.precision is Precision.FP32 and prepared.gate is None
        assert "unsupported op" in prepared.note
    assert not list(tmp_path.iterdir())  # no entry, no temporary directory left behind


def test_auto_picks_int8_on_cpu_when_it_passes(models, avatar, features):
    prepared = prec.prepare_model(
        models["smooth"], avatar, "auto", provider_is_gpu=False, features=features, **FAST
    )
    assert prepared.precision is Precision.INT8 and prepared.gate.passed
    assert prepared.gate.threshold_db == 35.0 and prepared.note == ""
    assert prepared.path.parent.parent == avatar.path / ".cache" / "precision"
    assert prepared.session_options(CPU) == CPU
    assert "QuantizeLinear" in {n.op_type for n in onnx.load(str(prepared.path)).graph.node}
    record = prepared.to_dict()
    assert record["precision"] == "int8" and record["gate"]["passed"] is True
    json.dumps(record)


# ---------------------------------------------------------------------------- the cache


def test_cache_hits_and_invalidation(models, avatar, features, tmp_path, monkeypatch):
    calls = []
    real = prec.quantize_int8

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(prec, "quantize_int8", counting)
    model = tmp_path / "model.onnx"
    model.write_bytes(Path(models["smooth"]).read_bytes())
    cache = tmp_path / "cache"

    def prepare(**overrides):
        kwargs = {"features": features, "cache_dir": cache, **FAST, **overrides}
        return prec.prepare_model(
            kwargs.pop("model", model), kwargs.pop("avatar", avatar), kwargs.pop("p", "int8"),
            provider_is_gpu=False, **kwargs,
        )  # fmt: skip

    first = prepare()
    mtime = first.path.stat().st_mtime_ns
    second = prepare()
    assert (first.cached, second.cached, len(calls)) == (False, True, 1)
    assert second.path == first.path and second.path.stat().st_mtime_ns == mtime
    assert second.gate == first.gate
    # The default reduce_range is keyed as this machine decides it: the same entry.
    resolved = Int8Options(reduce_range=integer_products_saturate())
    assert prepare(int8=resolved).cached and len(calls) == 1
    # The threshold is not part of the key: the cached PSNR is compared again.
    with pytest.raises(ModelError, match="quality gate"):
        prepare(threshold_db=99.0)
    assert len(calls) == 1
    # Settings, features, the model and the avatar are.
    prepare(int8=Int8Options(per_channel=False))
    prepare(calibration_frames=6)
    prepare(features=features[::-1].copy())
    assert len(calls) == 4
    model.write_bytes(save_model(smooth_generator(1), tmp_path / "m1.onnx").read_bytes())
    prepare()
    other = make_demo_avatar(tmp_path / "other-avatar", seconds=2.0, size_wh=(320, 240), seed=1)
    prepare(avatar=other)
    assert len(calls) == 6
    # A corrupt entry is rebuilt, not used.
    hit = prepare()
    assert hit.cached and len(calls) == 6
    hit.path.write_bytes(b"not a model")
    rebuilt = prepare()
    assert not rebuilt.cached and len(calls) == 7
    GeneratorSession(rebuilt.path, CPU).run(*held_out(avatar, features, 1))
    assert not list(cache.glob(".tmp-*")) and not list(cache.glob(".stale-*"))


# ---------------------------------------------------------------------------- FP16


def test_fp16_conversion(models, avatar, features, tmp_path):
    out = prec.convert_fp16(models["smooth"], tmp_path / "fp16.onnx")
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    types = {i.name: i.data_type for i in model.graph.initializer}
    assert types["w1"] == TensorProto.FLOAT16 and types["w2"] == TensorProto.FLOAT16
    io = [*model.graph.input, *model.graph.output]
    assert {v.type.tensor_type.elem_type for v in io} == {TensorProto.FLOAT}
    visual, audio = held_out(avatar, features)
    per_frame, _ = reference_psnr(models["smooth"], out, visual, audio)  # runs on the CPU
    assert per_frame.min() > 45.0


def test_fp16_conversion_of_the_unet_passes_the_checker(models, tmp_path):
    out = prec.convert_fp16(models["unet"], tmp_path / "fp16.onnx")
    model = onnx.load(str(out))
    onnx.checker.check_model(model)  # the converter's own output is not topologically sorted
    convs = [i for i in model.graph.initializer if len(i.dims) == 4]
    assert convs and all(i.data_type == TensorProto.FLOAT16 for i in convs)
    pred = GeneratorSession(out, CPU, cpus=2).run(
        np.zeros((1, 320, 320, 6), np.uint8), np.zeros((1, 32, 16, 16), np.float32)
    )
    assert pred.dtype == np.float32 and pred.shape == (1, 3, 320, 320)


def test_auto_on_a_gpu_provider_picks_fp16(models, avatar, features, tmp_path):
    # No GPU here: the gate runs the FP16 model on the CPU provider, as a GPU-less driver would.
    prepared = prec.prepare_model(
        models["smooth"], avatar, "auto", provider_is_gpu=True, features=features,
        cache_dir=tmp_path, session=CPU, **FAST,
    )  # fmt: skip
    assert prepared.precision is Precision.FP16 and prepared.gate.passed
    assert prepared.session_options(SessionOptions()).trt_fp16
    assert prepared.to_dict()["gate"]["precision"] == "fp16"


# ---------------------------------------------------------------------------- arguments


def test_fp32_is_a_no_op(models, avatar, tmp_path):
    prepared = prec.prepare_model(
        models["unet"], avatar, "FP32", provider_is_gpu=False, cache_dir=tmp_path / "c"
    )
    assert prepared.path == Path(models["unet"]) and prepared.precision is Precision.FP32
    assert prepared.gate is None and not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"precision": "bf16"}, InputError, "fp32|int8|fp16|auto"),
        ({"threshold_db": -1.0}, InputError, "threshold"),
        ({"threshold_db": float("nan")}, InputError, "threshold"),
        ({"threshold_db": 250.0}, InputError, "threshold"),
        ({"calibration_frames": 0}, InputError, "calibration frames"),
        ({"holdout_frames": 0}, InputError, "held-out frames"),
        ({"features": np.zeros((10, 3), np.float32)}, InputError, "features"),
        ({"model": "missing.onnx"}, ModelError, "not found"),
    ],
)
def test_bad_arguments(models, avatar, tmp_path, overrides, error, match):
    kwargs = {"model": models["unet"], "precision": "int8", "cache_dir": tmp_path, **overrides}
    with pytest.raises(error, match=match):
        prec.prepare_model(
            kwargs.pop("model"), avatar, kwargs.pop("precision"), provider_is_gpu=False, **kwargs
        )
