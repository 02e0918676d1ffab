"""Tests of the stand-in ONNX model builder (lipsync_ray.dev.models)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import psnr_db
from onnx import TensorProto, helper, numpy_helper

from lipsync_ray.dev.models import (
    Arch,
    ModelStats,
    Size,
    Weights,
    build_model,
    model_stats,
    save_model,
)
from lipsync_ray.errors import InputError


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


@pytest.fixture(scope="module")
def full_unet() -> onnx.ModelProto:
    return build_model(Arch.UNET328, Size.FULL)


@pytest.fixture(scope="module")
def small_unet() -> onnx.ModelProto:
    return build_model(Arch.UNET328, Size.SMALL)


@pytest.fixture(scope="module")
def small_random_unet() -> onnx.ModelProto:
    return build_model(Arch.UNET328, Size.SMALL, weights=Weights.RANDOM)


@pytest.fixture(scope="module")
def full_encoder() -> onnx.ModelProto:
    return build_model(Arch.AUDIO_ENCODER, Size.FULL)


@pytest.fixture(scope="module")
def small_encoder() -> onnx.ModelProto:
    return build_model(Arch.AUDIO_ENCODER, Size.SMALL)


class _Models(dict):
    """The models by fixture name, each built the first time a test asks for it (the full
    UNet takes half a minute on 2 cores: only the tests that use it, ``slow``, pay for it)."""

    def __init__(self, request: pytest.FixtureRequest) -> None:
        super().__init__()
        self._request = request

    def __missing__(self, name: str) -> onnx.ModelProto:
        model = (
            build_model(Arch.IDENTITY)
            if name == "identity"
            else self._request.getfixturevalue(name)
        )
        self[name] = model
        return model


@pytest.fixture(scope="module")
def models(request) -> dict[str, onnx.ModelProto]:
    return _Models(request)


FULL_UNET = pytest.param("full_unet", marks=pytest.mark.slow)


# ---------------------------------------------------------------------------- test inputs


def _smooth_images(seed: int, n: int) -> np.ndarray:
    """float32 [n, 3, 320, 320] in [0, 1]: sums of random low-frequency plane waves."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:320, 0:320] / 320.0
    out = np.zeros((n, 3, 320, 320))
    for i in range(n):
        for c in range(3):
            for _ in range(4):
                fy, fx = rng.uniform(-8, 8, size=2)
                out[i, c] += np.sin(2 * np.pi * (fy * yy + fx * xx) + rng.uniform(0, 2 * np.pi))
    return (0.5 + out / 8.0).clip(0, 1).astype(np.float32)


def _visual(seed: int, n: int = 1) -> np.ndarray:
    """float32 [n, 6, 320, 320]: ROI, then the ROI with the mouth rectangle blacked out."""
    roi = _smooth_images(seed, n)
    masked = roi.copy()
    masked[:, :, 5:310, 5:315] = 0.0
    return np.concatenate([roi, masked], axis=1)


def _audio(seed: int, n: int = 1) -> np.ndarray:
    """float32 [n, 32, 16, 16]: non-negative like the encoder's ReLU features."""
    rng = np.random.default_rng(seed)
    return np.maximum(rng.standard_normal((n, 32, 16, 16)), 0).astype(np.float32)


def _mel(seed: int, n: int = 1) -> np.ndarray:
    """float32 [n, 1, 80, 16] in [-4, 4], smooth along time."""
    rng = np.random.default_rng(seed)
    steps = rng.normal(0, 0.5, size=(n, 1, 80, 16)).cumsum(axis=3)
    return (np.tanh(rng.normal(0, 1, size=(n, 1, 80, 1)) + steps) * 4).astype(np.float32)


# ---------------------------------------------------------------------------- cost


def _encoder_params(widths: tuple[int, ...], feature_dim: int = 512) -> int:
    """Folded parameters of the Wav2Lip encoder, counted from its layer list."""
    w0, w1, w2, w3, w4 = widths
    layers = [(1, w0, 3), (w0, w0, 3), (w0, w0, 3), (w0, w1, 3), (w1, w1, 3), (w1, w1, 3)]
    layers += [(w1, w2, 3), (w2, w2, 3), (w2, w2, 3), (w2, w3, 3), (w3, w3, 3)]
    layers += [(w3, w4, 3), (w4, feature_dim, 1)]
    return sum(cin * cout * k * k + cout for cin, cout, k in layers)


@pytest.mark.parametrize(
    ("name", "params", "params_tol", "macs", "macs_tol"),
    [
        pytest.param("full_unet", 12.15e6, 0.02, 4.89e9, 0.05, marks=pytest.mark.slow),
        ("full_encoder", 2.81e6, 0.02, 0.093e9, 0.05),
    ],
)
def test_full_models_have_the_real_cost(models, name, params, params_tol, macs, macs_tol):
    stats = model_stats(models[name])
    assert abs(stats.params - params) / params < params_tol, stats
    assert abs(stats.macs - macs) / macs < macs_tol, stats


def test_encoder_params_match_the_layer_list(full_encoder, small_encoder):
    assert model_stats(full_encoder).params == _encoder_params((32, 64, 128, 256, 512))
    assert model_stats(small_encoder).params == _encoder_params((8, 16, 32, 64, 128))


@pytest.mark.parametrize(
    ("small", "full"),
    [
        pytest.param("small_unet", "full_unet", marks=pytest.mark.slow),
        ("small_encoder", "full_encoder"),
    ],
)
def test_small_models_are_much_cheaper(models, small, full):
    s, f = model_stats(models[small]), model_stats(models[full])
    assert s.params * 8 < f.params
    assert s.macs * 8 < f.macs


def test_model_stats_counts_conv_macs_by_hand():
    weight = numpy_helper.from_array(np.ones((8, 2, 3, 3), np.float32), "w")  # groups 2: Cin 4
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], strides=[2, 2], group=2)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 10, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert model_stats(model) == ModelStats(params=8 * 2 * 9, macs=(8 * 5 * 6) * (2 * 3 * 3))


# ---------------------------------------------------------------------------- structure


@pytest.mark.parametrize(
    "name",
    [FULL_UNET, "small_unet", "small_random_unet", "full_encoder", "small_encoder", "identity"],
)
def test_models_are_clean_inference_graphs(models, name):
    model = models[name]
    onnx.checker.check_model(model, full_check=True)
    assert {o.domain: o.version for o in model.opset_import}[""] >= 17
    ops = {node.op_type for node in model.graph.node}
    assert not ops & {"BatchNormalization", "ReduceMean", "Div", "Sqrt"}, ops
    for tensor in model.graph.input:
        assert tensor.type.tensor_type.shape.dim[0].dim_param == "batch"


@pytest.mark.parametrize(
    ("name", "feeds", "outputs"),
    [
        ("small_unet", {"input": _visual, "audio": _audio}, {"output": (3, 320, 320)}),
        ("identity", {"input": _visual, "audio": _audio}, {"output": (3, 320, 320)}),
        ("small_encoder", {"mel": _mel}, {"features": (512,)}),
        ("full_encoder", {"mel": _mel}, {"features": (512,)}),
    ],
)
@pytest.mark.parametrize("batch", [1, 3])
def test_dynamic_batch_runs(models, name, feeds, outputs, batch):
    session = _session(models[name])
    assert [i.name for i in session.get_inputs()] == list(feeds)
    results = session.run(list(outputs), {k: make(0, batch) for k, make in feeds.items()})
    for result, shape in zip(results, outputs.values(), strict=True):
        assert result.shape == (batch, *shape)
        assert result.dtype == np.float32


@pytest.mark.slow
def test_full_unet_runs_at_batch_3(full_unet):
    out = _session(full_unet).run(["output"], {"input": _visual(1, 3), "audio": _audio(1, 3)})[0]
    assert out.shape == (3, 3, 320, 320)


@pytest.fixture(scope="module")
def renamed_fixed_unet() -> onnx.ModelProto:
    return build_model(
        Arch.UNET328, Size.SMALL, input_names=("visual_input", "audio_input"), fixed_batch=True
    )


def test_fixed_batch_and_input_names(renamed_fixed_unet):
    session = _session(renamed_fixed_unet)
    assert [(i.name, i.shape) for i in session.get_inputs()] == [
        ("visual_input", [1, 6, 320, 320]),
        ("audio_input", [1, 32, 16, 16]),
    ]
    assert [(o.name, o.shape) for o in session.get_outputs()] == [("output", [1, 3, 320, 320])]
    with pytest.raises(Exception, match="dimension"):
        session.run(None, {"visual_input": _visual(0, 2), "audio_input": _audio(0, 2)})


@pytest.mark.parametrize("arch", [Arch.AUDIO_ENCODER, Arch.IDENTITY])
def test_fixed_batch_other_archs(arch):
    model = build_model(arch, Size.SMALL, fixed_batch=True)
    for tensor in [*model.graph.input, *model.graph.output]:
        assert tensor.type.tensor_type.shape.dim[0].dim_value == 1


# ---------------------------------------------------------------------------- weights


@pytest.mark.parametrize("name", ["small_unet", FULL_UNET, "small_random_unet"])
def test_unet_output_follows_its_inputs(models, name):
    session = _session(models[name])
    v1, v2, a1, a2 = _visual(10, 2), _visual(11, 2), _audio(20, 2), _audio(21, 2)
    base = session.run(["output"], {"input": v1, "audio": a1})[0]
    other_image = session.run(["output"], {"input": v2, "audio": a1})[0]
    other_audio = session.run(["output"], {"input": v1, "audio": a2})[0]
    assert base.min() >= 0.0 and base.max() <= 1.0
    assert (base.reshape(2, -1).std(axis=1) > 0.05).all()  # not a constant grey
    assert np.mean((base < 0.02) | (base > 0.98)) < 0.05  # not saturated
    assert np.abs(base - other_image).mean() > 0.02
    # FACE weights confine the audio to the mouth (the middle of the ROI; its border passes
    # through untouched, tests/test_standin.py), random weights spread it everywhere.
    mouth = np.s_[..., 90:170, 120:200]
    assert np.abs(base - other_audio)[mouth].mean() > 0.01


@pytest.mark.parametrize(
    ("name", "roi_db", "border_db"),
    # Measured (seed 0), in silence: full ~54 / ~54 dB (every level comes back), small ~19.7 /
    # ~19.8 dB. SMALL's up5 has 2 output channels, so it keeps luma and red-minus-blue only,
    # and these test images vary each colour independently. Random weights: about 12 dB.
    [
        pytest.param("full_unet", 50.0, 50.0, marks=pytest.mark.slow),
        ("small_unet", 17.0, 19.0),
        ("small_random_unet", None, None),
    ],
)
def test_face_weights_reproduce_the_roi(models, name, roi_db, border_db):
    visual, audio = _visual(30, 2), np.zeros((2, 32, 16, 16), np.float32)  # silence
    out = _session(models[name]).run(["output"], {"input": visual, "audio": audio})[0]
    roi = visual[:, :3]
    border = np.ones((320, 320), bool)
    border[5:310, 5:315] = False  # what the masked copy still shows
    whole = psnr_db(out, roi, peak=1.0)
    outside = psnr_db(out[..., border], roi[..., border], peak=1.0)
    if roi_db is None:
        assert whole < 15.0 and outside < 15.0
    else:
        assert whole > roi_db and outside > border_db


@pytest.mark.slow
def test_face_weights_under_int8(tmp_path, small_unet, small_random_unet):
    """INT8 keeps the FACE weights' face (>= 35 dB in silence) but not the opened mouth, whose
    edge is steep: the gate refuses it (models build --help and the README say so). Random
    weights are too chaotic for INT8 either way."""
    from lipsync_ray.precision import Precision, quality_gate
    from lipsync_ray.quantize import quantize_int8

    rng = np.random.default_rng(40)
    visual = (_visual(40, 10).transpose(0, 2, 3, 1) * 255).round().astype(np.uint8)
    rows = np.maximum(rng.standard_normal((12, 18, 512)), 0)
    windows = (rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:]) / 3  # 16 smoothed feature rows
    audio = windows.reshape(12, 32, 16, 16).astype(np.float32)  # the windows' layout
    silence = np.zeros_like(audio)
    psnr = {}
    for name, model in (("face", small_unet), ("random", small_random_unet)):
        fp32 = save_model(model, tmp_path / f"{name}.onnx")
        int8 = quantize_int8(fp32, tmp_path / f"{name}-int8.onnx", visual[:6], audio[:6])
        for sound, windows in (("silence", silence), ("features", audio)):
            gate = quality_gate(fp32, int8, visual[6:], windows[6:10], precision=Precision.INT8)
            psnr[name, sound] = gate.psnr_db
    # Measured: face 38.5 dB in silence, 26-29 dB with the mouth opened; random ~15 dB.
    assert psnr["face", "silence"] >= 35.0 and psnr["face", "features"] < 35.0, psnr
    assert max(psnr["random", "silence"], psnr["random", "features"]) < 30.0, psnr


@pytest.mark.slow
def test_weights_default_and_metadata(full_encoder, small_unet, small_random_unet):
    def meta(model):
        return {p.key: p.value for p in model.metadata_props}["lipsync_ray.weights"]

    assert meta(small_unet) == "face" and meta(small_random_unet) == "random"
    assert meta(full_encoder) == "face"
    random_encoder = build_model(Arch.AUDIO_ENCODER, Size.SMALL, weights="random")
    assert meta(random_encoder) == "random"
    same = build_model(Arch.UNET328, Size.SMALL, weights="face")
    assert same.SerializeToString() == small_unet.SerializeToString()
    other = build_model(Arch.UNET328, Size.SMALL, seed=1)
    a, b = (numpy_helper.to_array(m.graph.initializer[0]) for m in (small_unet, other))
    assert not np.array_equal(a, b)


def test_encoder_features_follow_the_mel(full_encoder):
    session = _session(full_encoder)
    f1 = session.run(["features"], {"mel": _mel(1, 4)})[0]
    f2 = session.run(["features"], {"mel": _mel(2, 4)})[0]
    assert (f1 >= 0).all()  # ends in a ReLU
    assert f1.std(axis=0).mean() > 0.1  # the rows differ from each other
    assert np.abs(f1 - f2).mean() > 0.1


def test_same_seed_gives_same_bytes_different_seed_different_weights(small_encoder):
    again = build_model(Arch.AUDIO_ENCODER, Size.SMALL, seed=0)
    assert again.SerializeToString() == small_encoder.SerializeToString()
    other = build_model(Arch.AUDIO_ENCODER, Size.SMALL, seed=1)
    w0 = numpy_helper.to_array(small_encoder.graph.initializer[0])
    w1 = numpy_helper.to_array(other.graph.initializer[0])
    assert w0.shape == w1.shape and not np.array_equal(w0, w1)


def test_unet_weights_do_not_depend_on_names_or_batch(small_unet, renamed_fixed_unet):
    a = [numpy_helper.to_array(t) for t in small_unet.graph.initializer]
    b = [numpy_helper.to_array(t) for t in renamed_fixed_unet.graph.initializer]
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


# ---------------------------------------------------------------------------- identity


@pytest.mark.parametrize("names", [("input", "audio"), ("visual_input", "audio_input")])
def test_identity_returns_the_roi_exactly(names):
    session = _session(build_model(Arch.IDENTITY, input_names=names))
    assert [i.name for i in session.get_inputs()] == list(names)  # audio still listed
    rng = np.random.default_rng(5)
    visual = rng.random((2, 6, 320, 320), dtype=np.float32)
    visual.setflags(write=False)
    out = session.run(["output"], {names[0]: visual, names[1]: _audio(0, 2)})[0]
    np.testing.assert_array_equal(out, visual[:, :3])
    assert model_stats(build_model(Arch.IDENTITY)) == ModelStats(params=0, macs=0)


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"arch": Arch.UNET328, "input_names": ("input",)}, "two distinct names"),
        ({"arch": Arch.UNET328, "input_names": ("a", "b", "c")}, "two distinct names"),
        ({"arch": Arch.UNET328, "input_names": ("", "audio")}, "non-empty"),
        ({"arch": Arch.UNET328, "input_names": ("x", "x")}, "distinct"),
        ({"arch": Arch.UNET328, "input_names": ("input", "output")}, "'output'"),
        ({"arch": Arch.IDENTITY, "input_names": "input"}, "tuple of names"),
        ({"arch": Arch.AUDIO_ENCODER, "input_names": ("mel", "audio")}, "one name"),
        ({"arch": "vae"}, "expected an Arch"),
        ({"arch": Arch.UNET328, "size": "huge"}, "expected an Arch and a Size"),
        ({"arch": Arch.UNET328, "seed": -1}, "seed must be an integer >= 0, got -1"),
        ({"arch": Arch.UNET328, "weights": "pretty"}, "weights must be one of random|face"),
        ({"arch": Arch.IDENTITY, "weights": "face"}, "identity has no weights to choose"),
    ],
)
def test_bad_options_raise_input_error(kwargs, match):
    with pytest.raises(InputError, match=match):
        build_model(**kwargs)


def test_string_arch_and_size_are_accepted():
    model = build_model("audio-encoder", "small", input_names=("spectrogram",))
    assert [i.name for i in model.graph.input] == ["spectrogram"]


def test_save_model_round_trips_atomically(tmp_path, small_encoder):
    path = save_model(small_encoder, tmp_path / "enc.onnx")
    assert path == tmp_path / "enc.onnx"
    assert onnx.load(str(path)).SerializeToString() == small_encoder.SerializeToString()
    assert [p.name for p in tmp_path.iterdir()] == ["enc.onnx"]  # no temporary left behind


def test_save_model_to_missing_directory_is_an_input_error(tmp_path, small_encoder):
    missing = tmp_path / "nope" / "enc.onnx"
    with pytest.raises(InputError, match="existing directory") as info:
        save_model(small_encoder, missing)
    assert info.value.path == str(missing.parent)
    assert not missing.parent.exists()
