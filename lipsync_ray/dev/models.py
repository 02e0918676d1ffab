"""Stand-in ONNX models with the real architectures, built without PyTorch.

Three models (docs/model-and-audio.md §2, §3):

- ``Arch.UNET328``: the SyncTalk_2D UNet-328 generator ("ave" audio mode).
  Inputs ``visual`` float32 ``[B, 6, 320, 320]`` in [0, 1] (BGR ROI, then the
  masked ROI) and ``audio`` float32 ``[B, 32, 16, 16]``; output ``"output"``
  float32 ``[B, 3, 320, 320]`` in [0, 1] (BGR).
- ``Arch.AUDIO_ENCODER``: the Wav2Lip-style audio encoder. Input ``"mel"``
  float32 ``[B, 1, 80, 16]`` (80 mel bands x 16 frames, values in [-4, 4]);
  output ``"features"`` float32 ``[B, 512]``.
- ``Arch.IDENTITY``: the UNet's inputs and output, returning the visual
  input's channels 0-2 (the ROI) exactly, so a whole render can be checked
  against its input frames. The audio input is declared but unused.

Weights are seeded and made input-sensitive by data-driven BatchNorm folding:
a *calibration graph* follows every convolution with training-mode batch
normalisation (gamma 1, beta 0) and also outputs each convolution's
per-channel mean and variance. One ONNX Runtime pass over a small seeded
calibration batch yields every layer's statistics at once (each layer sees an
already-normalised input), and the statistics fold into the convolution
weights and biases of the inference graph, which has no normalisation ops.
Random weights without this give a constant grey output.

``Weights.FACE`` (the default of the UNet and the audio encoder) replaces some channels of
some convolutions with designed rows (``_face_weights``): the encoder measures each frame's
loudness into some of its features, and in the UNet a linear path carries the ROI from ``inc``
through the skip connection to the output while the loudness opens a dark mouth inside a mouth
mask only. So the mouth opens with the speech, silence returns the input face (FULL: every
level, so a paste does not show), and nothing outside the mouth ever changes. INT8 keeps the
face but not the opened mouth's edge: the quality gate refuses it. ``Weights.RANDOM`` keeps the
all-random networks (chaotic: INT8 ~15 dB).
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lipsync_ray.dev import _face_weights as face
from lipsync_ray.errors import InputError, ModelError
from lipsync_ray.onnx_io import save_model

__all__ = ["Arch", "ModelStats", "Size", "Weights", "build_model", "model_stats", "save_model"]

logger = logging.getLogger(__name__)

OPSET = 17
IR_VERSION = 8  # the IR version of the opset-17 era: loadable by every ONNX Runtime >= 1.14
BATCH_AXIS = "batch"
BN_EPS = 1e-5
# Std of the sigmoid's input on calibration data: wide enough to use the range,
# narrow enough that < 1 % of outputs land outside [0.02, 0.98] (|logit| > 3.9).
OUTPUT_LOGIT_STD = 1.5
CALIBRATION_BATCH = 6  # smooth, fine-textured, blocky, noisy, sharp-edged, full-range

VISUAL_CHW = (6, 320, 320)  # ROI (BGR) + masked ROI, both / 255
AUDIO_CHW = (32, 16, 16)  # 16 feature rows x 512 = 8192 = 32 * 16 * 16
MEL_CHW = (1, 80, 16)  # 80 mel bands x 16 mel frames
OUTPUT_CHW = (3, 320, 320)
FEATURE_DIM = 512

# SMALL divides the UNet ladder by 8, not 4: its cost is dominated by the 320x320
# layers, and /4 ran at ~2x the < 10 ms/frame CPU budget of the test tier.
UNET_LADDER = {"full": (32, 64, 128, 256, 512), "small": (4, 8, 16, 32, 64)}
ENCODER_WIDTHS = {"full": (32, 64, 128, 256, 512), "small": (8, 16, 32, 64, 128)}
# Masked copy of the ROI (docs/compositing.md §3.2): cv2.rectangle with Rect(5, 5, 310, 305).
MASK_ROWS = slice(5, 5 + 305)
MASK_COLS = slice(5, 5 + 310)


class Arch(enum.Enum):
    """Which network to build."""

    UNET328 = "unet328"
    AUDIO_ENCODER = "audio-encoder"
    IDENTITY = "identity"


class Size(enum.Enum):
    """FULL: the real channel widths (real cost).

    SMALL: the same topology and I/O shapes for fast CPU tests, with the UNet
    ladder / 8 (``[4, 8, 16, 32, 64]``, audio branch likewise) and the audio
    encoder's widths / 4 (``[8, 16, 32, 64, 128]``, still 512 features).
    """

    FULL = "full"
    SMALL = "small"


class Weights(enum.Enum):
    """How the UNet's and the audio encoder's weights are made (the identity has none).

    RANDOM: He-normal, BatchNorm folded from one calibration pass. Input-sensitive but chaotic
    (tiny input changes, e.g. INT8 rounding, change the output a lot); the UNet's output looks
    like coloured noise.
    FACE: like a trained pair: the encoder measures each frame's loudness, and the UNet
    reproduces the ROI and opens a dark mouth in it as far as the loudness goes, closed in
    silence; the rest of both networks is random as above and does not reach the UNet's
    output (``_face_weights``). FULL passes the ROI through exactly; SMALL keeps luma and
    red-minus-blue only. INT8 keeps the face (38-42 dB in silence) but not the opened mouth's
    edge (20-26 dB: the 35 dB gate refuses it).
    """

    RANDOM = "random"
    FACE = "face"


@dataclass(frozen=True)
class ModelStats:
    """Cost of a model.

    params: number of values in the graph's initializers.
    macs: multiply-accumulates of the Conv nodes for one sample (batch 1).
    """

    params: int
    macs: int


WeightBias = tuple[np.ndarray, np.ndarray]  # folded conv weight [Cout, Cin/g, k, k], bias [Cout]
# A conv as the calibration pass saw it: weight, output std of its random rows, designed rows.
ConvRecord = tuple[np.ndarray, float, face.Rows]


class _Builder:
    """Emits the nodes of one network in one of two modes.

    Calibration mode (``folded is None``): convolutions get He-normal weights
    drawn from ``rng`` and no bias, and are followed by batch-statistics
    normalisation whose mean and variance become extra graph outputs.
    Inference mode: convolutions take the folded ``(weight, bias)`` pairs in
    the order they are emitted, so both modes must run the same topology code.

    ``plan`` (calibration mode, ``Weights.FACE``) supplies designed rows per conv; ``sig``
    tracks which channel of each tensor carries which designed signal.
    """

    def __init__(
        self,
        rng: np.random.Generator | None,
        folded: Sequence[WeightBias] | None = None,
        plan: face.FacePlan | None = None,
        random_std: float = 1.0,
    ):
        self.rng = rng
        self.folded = folded
        self.plan = plan
        self.random_std = random_std
        self.sig: dict[str, face.Sig] = {}
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.channels: dict[str, int] = {}
        self.stat_names: list[str] = []
        self.convs: list[ConvRecord] = []
        self._count = 0

    def input(self, name: str, chw: tuple[int, int, int], batch: int | str) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [batch, *chw]))
        self.channels[name] = chw[0]
        return name

    def op(self, op_type: str, inputs: list[str], *, out: str | None = None, **attrs) -> str:
        self._count += 1
        out = out or f"{op_type.lower()}_{self._count}"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        if inputs and inputs[0] in self.channels:
            self.channels[out] = self.channels[inputs[0]]
        if inputs and inputs[0] in self.sig:
            self.sig[out] = self.sig[inputs[0]]
        return out

    def const(self, values: Sequence[float] | Sequence[int], dtype: type) -> str:
        """A non-weight constant, as a Constant node so it never counts as a parameter."""
        tensor = numpy_helper.from_array(np.asarray(values, dtype=dtype))
        return self.op("Constant", [], value=tensor)

    def conv(
        self,
        x: str,
        cout: int,
        *,
        name: str,
        kernel: int = 1,
        stride: int | tuple[int, int] = 1,
        pad: int = 0,
        groups: int = 1,
        out_std: float = 1.0,
        design: face.Design | None = None,
    ) -> str:
        """Conv (+ folded BN). Without ReLU: callers add it, residuals may come first.

        ``design`` rows replace the random, normalised ones of those output channels.
        """
        cin = self.channels[x]
        strides = [stride, stride] if isinstance(stride, int) else list(stride)
        attrs = {
            "kernel_shape": [kernel, kernel],
            "strides": strides,
            "pads": [pad] * 4,
            "group": groups,
        }
        if self.folded is None:
            assert self.rng is not None
            shape = (cout, cin // groups, kernel, kernel)
            he_std = np.float32(np.sqrt(2.0 / (shape[1] * kernel * kernel)))
            weight = self.rng.standard_normal(shape, dtype=np.float32) * he_std
            rows = design.rows if design is not None else {}
            for c, (row, _) in rows.items():
                weight[c] = row
            out_std *= self.random_std
            self.convs.append((weight, out_std, rows))
            self.initializers.append(numpy_helper.from_array(weight, f"{name}.weight"))
            y = self.op("Conv", [x, f"{name}.weight"], out=name, **attrs)
            out = self._batch_norm(y, name, out_std)
            if rows:
                out = self._keep_designed(y, out, cout, rows)
        else:
            weight, bias = self.folded[len(self.convs)]
            self.convs.append((weight, out_std, {}))
            self.initializers.append(numpy_helper.from_array(weight, f"{name}.weight"))
            self.initializers.append(numpy_helper.from_array(bias, f"{name}.bias"))
            out = self.op("Conv", [x, f"{name}.weight", f"{name}.bias"], out=name, **attrs)
        self.channels[out] = cout
        self.sig[out] = design.sig if design is not None else {}  # not the input's labels
        return out

    def _keep_designed(self, y: str, normed: str, cout: int, rows: face.Rows) -> str:
        """Calibration: designed channels skip the normalisation and get their own bias."""
        random = np.ones((1, cout, 1, 1), np.float32)
        bias = np.zeros((1, cout, 1, 1), np.float32)
        for c, (_, b) in rows.items():
            random[0, c], bias[0, c] = 0.0, b
        kept = self.op("Mul", [normed, self.const(random, np.float32)])
        designed = self.op("Mul", [y, self.const(1.0 - random, np.float32)])
        designed = self.op("Add", [designed, self.const(bias, np.float32)])
        return self.op("Add", [kept, designed])

    def _batch_norm(self, y: str, name: str, out_std: float) -> str:
        mean = self.op("ReduceMean", [y], out=f"{name}.mean", axes=[0, 2, 3], keepdims=1)
        centred = self.op("Sub", [y, mean])
        square = self.op("Mul", [centred, centred])
        var = self.op("ReduceMean", [square], out=f"{name}.var", axes=[0, 2, 3], keepdims=1)
        std = self.op("Sqrt", [self.op("Add", [var, self.const([BN_EPS], np.float32)])])
        out = self.op("Div", [centred, std])
        if out_std != 1.0:
            out = self.op("Mul", [out, self.const([out_std], np.float32)])
        self.stat_names += [mean, var]
        self.channels[out] = self.channels[y]
        return out

    def relu(self, x: str) -> str:
        return self.op("Relu", [x])

    def add(self, a: str, b: str) -> str:
        return self.op("Add", [a, b])

    def concat(self, xs: list[str]) -> str:
        out = self.op("Concat", xs, axis=1)
        self.channels[out] = sum(self.channels[x] for x in xs)
        sig, offset = {}, 0
        for x in xs:
            sig.update({label: offset + c for label, c in self.sig.get(x, {}).items()})
            offset += self.channels[x]
        self.sig[out] = sig
        return out

    def upsample2x(self, x: str) -> str:
        """Bilinear x2, align_corners=True (PyTorch ``nn.Upsample`` as in unet_328)."""
        scales = self.const([1.0, 1.0, 2.0, 2.0], np.float32)
        mode = {"mode": "linear", "coordinate_transformation_mode": "align_corners"}
        return self.op("Resize", [x, "", scales], **mode)

    def model(self, outputs: list[onnx.ValueInfoProto], name: str) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, self.inputs, outputs, self.initializers)
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="lipsync-ray"
        )
        model.ir_version = IR_VERSION
        return model


# ---------------------------------------------------------------------------- topologies


def _ir(b: _Builder, x: str, cout: int, stride: int, res: bool, name: str) -> str:
    """MobileNetV2 inverted residual, expand ratio 2."""
    cin = b.channels[x]
    hidden = cin * 2
    d = b.plan.ir(name, b.sig.get(x, {}), cin, hidden, cout, res) if b.plan else None
    h = b.relu(b.conv(x, hidden, name=f"{name}.expand", design=d and d.expand))
    h = b.conv(
        h, hidden, name=f"{name}.dw", kernel=3, stride=stride, pad=1, groups=hidden,
        design=d and d.dw,
    )  # fmt: skip
    h = b.conv(b.relu(h), cout, name=f"{name}.project", design=d and d.project)
    return b.add(h, x) if res else h


def _plain(b: _Builder, x: str, cout: int, name: str, **attrs) -> str:
    """Conv + ReLU (the audio branch's full 3x3 convolutions)."""
    kernel = attrs.get("kernel", 1)
    d = b.plan.conv(name, b.sig.get(x, {}), b.channels[x], kernel) if b.plan else None
    return b.relu(b.conv(x, cout, name=name, design=d, **attrs))


def _double_ir(b: _Builder, x: str, cout: int, stride: int, name: str) -> str:
    return _ir(b, _ir(b, x, cout, stride, False, f"{name}.0"), cout, 1, True, f"{name}.1")


def _unet(b: _Builder, visual: str, audio: str, ladder: tuple[int, ...]) -> str:
    c0, c1, c2, c3, c4 = ladder
    x1 = _ir(b, visual, c0, 1, False, "inc")
    x2 = _double_ir(b, x1, c0, 2, "down1")  # 160
    x3 = _double_ir(b, x2, c1, 2, "down2")  # 80
    x4 = _double_ir(b, x3, c2, 2, "down3")  # 40
    x5 = _double_ir(b, x4, c3, 2, "down4")  # 20
    x6 = _double_ir(b, x5, c4, 2, "down5")  # 10

    a = _ir(b, audio, c1, 1, False, "audio.0")  # 16x16
    a = _ir(b, a, c2, 1, False, "audio.1")
    a = _plain(b, a, c3, "audio.2", kernel=3, pad=1)
    a = _ir(b, a, c3, 1, True, "audio.3")
    a = _plain(b, a, c4, "audio.4", kernel=3, stride=2, pad=3)  # (16 + 6 - 3) // 2 + 1 = 10
    a = _ir(b, a, c4, 1, True, "audio.5")
    a = _ir(b, a, c4, 1, True, "audio.6")

    x = _double_ir(b, b.concat([x6, a]), c4, 1, "fuse.0")
    x = _double_ir(b, x, c3, 1, "fuse.1")
    ups = [(x5, c2), (x4, c1), (x3, c0), (x2, c0), (x1, c0 // 2)]
    for i, (skip, cout) in enumerate(ups, start=1):
        x = _double_ir(b, b.concat([b.upsample2x(x), skip]), cout, 1, f"up{i}")
    d = b.plan.outc(b.sig.get(x, {}), b.channels[x], OUTPUT_CHW[0]) if b.plan else None
    logits = b.conv(x, OUTPUT_CHW[0], name="outc", out_std=OUTPUT_LOGIT_STD, design=d)
    return b.op("Sigmoid", [logits], out="output")


def _encoder(b: _Builder, mel: str, widths: tuple[int, ...]) -> str:
    """Wav2Lip audio encoder: 3x3 conv + BN (+ residual) + ReLU blocks; 80x16 -> 1x1."""
    w0, w1, w2, w3, w4 = widths
    plan: list[tuple[int, int | tuple[int, int], bool]] = [
        (w0, 1, False), (w0, 1, True), (w0, 1, True),
        (w1, (3, 1), False), (w1, 1, True), (w1, 1, True),  # 27 x 16
        (w2, 3, False), (w2, 1, True), (w2, 1, True),  # 9 x 6
        (w3, (3, 2), False), (w3, 1, True),  # 3 x 3
    ]  # fmt: skip
    x = mel

    def design(i: int, cout: int, res: bool) -> face.Design | None:
        return b.plan.encoder(i, b.channels[x], cout, res) if b.plan else None

    for i, (cout, stride, res) in enumerate(plan):
        d = design(i, cout, res)
        y = b.conv(x, cout, name=f"enc.{i}", kernel=3, stride=stride, pad=1, design=d)
        x = b.relu(b.add(y, x) if res else y)  # residual before the ReLU, as in Wav2Lip
    n = len(plan)
    x = b.relu(b.conv(x, w4, name=f"enc.{n}", kernel=3, design=design(n, w4, False)))  # 1x1
    d = design(n + 1, FEATURE_DIM, False)
    x = b.relu(b.conv(x, FEATURE_DIM, name=f"enc.{n + 1}", design=d))
    return b.op("Flatten", [x], out="features", axis=1)


def _network(b: _Builder, arch: Arch, size: Size, names: tuple[str, ...], batch: int | str) -> str:
    if arch is Arch.AUDIO_ENCODER:
        return _encoder(b, b.input(names[0], MEL_CHW, batch), ENCODER_WIDTHS[size.value])
    visual = b.input(names[0], VISUAL_CHW, batch)
    audio = b.input(names[1], AUDIO_CHW, batch)
    return _unet(b, visual, audio, UNET_LADDER[size.value])


# ---------------------------------------------------------------------------- calibration


def _smooth_noise(
    rng: np.random.Generator, shape: tuple[int, ...], grid: tuple[int, int]
) -> np.ndarray:
    """Random values on a coarse grid, bilinearly upsampled: float32 ``shape`` in [0, 1]."""
    *lead, h, w = shape
    coarse = rng.random((*lead, *grid))

    def interp(n_out: int, n_in: int) -> np.ndarray:
        pos = np.linspace(0.0, n_in - 1, n_out)
        lo = np.minimum(pos.astype(int), n_in - 2)
        m = np.zeros((n_out, n_in))
        m[np.arange(n_out), lo] = 1.0 - (pos - lo)
        m[np.arange(n_out), lo + 1] = pos - lo
        return m

    out = interp(h, grid[0]) @ coarse @ interp(w, grid[1]).T  # broadcast over leading axes
    return out.astype(np.float32)


def _speech_like_features(rng: np.random.Generator, n: int) -> np.ndarray:
    """float32 ``[n, 32, 16, 16]`` windows of encoder-like features (16 rows x 512, reshaped).

    Like the stand-in encoder's output (mean ~1.0-1.3, std ~1.4-1.9, smooth over time, a
    level per feature): normalising on these keeps real features from blowing up the audio
    branch, which would cost the designed signals their INT8 resolution.
    """
    steps = rng.standard_normal((n, 16 + 3, 512))
    smooth = (steps[:, :-3] + steps[:, 1:-2] + steps[:, 2:-1] + steps[:, 3:]) / 2.0  # std 1
    level = rng.standard_normal((n, 1, 512))
    return np.maximum(1.5 * (smooth + level), 0.0).reshape(n, *AUDIO_CHW).astype(np.float32)


def _calibration_feeds(
    arch: Arch, rng: np.random.Generator, weights: Weights = Weights.RANDOM
) -> list[np.ndarray]:
    n = CALIBRATION_BATCH
    if arch is Arch.AUDIO_ENCODER:
        # Smooth in time and frequency, speech-like range with silence clipped at -4.
        mel = _smooth_noise(rng, (n, *MEL_CHW), (12, 6)) * 9.0 - 5.0
        return [np.clip(mel, -4.0, 4.0).astype(np.float32)]
    hw = OUTPUT_CHW[1:]
    roi = 0.6 * _smooth_noise(rng, (n, 3, *hw), (8, 8))
    roi += 0.4 * _smooth_noise(rng, (n, 3, *hw), (40, 40))
    # Varied textures keep the statistics honest for inputs that are not smooth:
    # calibrated on smooth images alone, pixel noise saturated 95 % of the outputs,
    # and the SMALL UNet saturated up to 9 % of them on other smooth images.
    roi[1] = 0.7 * roi[1] + 0.3 * _smooth_noise(rng, (3, *hw), (160, 160))
    blocks = rng.random((3, 10, 10), dtype=np.float32)
    roi[2] = 0.5 * roi[2] + 0.5 * np.kron(blocks, np.ones((32, 32), np.float32))
    roi[3] = 0.5 * roi[3] + 0.5 * rng.random((3, *hw), dtype=np.float32)
    edges = _smooth_noise(rng, (3, *hw), (6, 6)) - 0.5
    roi[4] = 1.0 / (1.0 + np.exp(-12.0 * edges))  # flat areas and sharp edges
    wide = _smooth_noise(rng, (3, *hw), (12, 12))
    roi[5] = (wide - wide.min()) / (wide.max() - wide.min())  # the full [0, 1] range
    masked = roi.copy()
    masked[:, :, MASK_ROWS, MASK_COLS] = 0.0
    # Real features come out of the encoder's final ReLU: non-negative, about half zeros.
    if weights is Weights.FACE:
        audio = _speech_like_features(rng, n)
    else:
        audio = np.maximum(rng.standard_normal((n, *AUDIO_CHW), dtype=np.float32), 0.0)
    return [np.concatenate([roi, masked], axis=1), audio]


def _fold(convs: list[ConvRecord], stats: list[np.ndarray]) -> list[WeightBias]:
    """BN(conv(x)) * out_std == conv'(x) with w' = w * s, b' = -mean * s, s = out_std / std.

    Designed rows keep their weights and take their own bias.
    """
    folded = []
    for i, (weight, out_std, rows) in enumerate(convs):
        mean = stats[2 * i].reshape(-1).astype(np.float64)
        scale = out_std / np.sqrt(stats[2 * i + 1].reshape(-1).astype(np.float64) + BN_EPS)
        w = (weight * scale[:, None, None, None]).astype(np.float32)
        bias = (-mean * scale).astype(np.float32)
        for c, (row, b) in rows.items():
            w[c], bias[c] = row, b
        folded.append((w, bias))
    return folded


def _run_calibration(
    model: onnx.ModelProto, names: list[str], feeds: list[np.ndarray], fetch: list[str]
) -> list[np.ndarray]:
    """Run the calibration graph once on the CPU; returns the ``fetch`` outputs in order."""
    import onnxruntime as ort  # heavy; only needed while building

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # one thread: reduction order, hence bytes, are reproducible
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(fetch, dict(zip(names, feeds, strict=True)))


# ---------------------------------------------------------------------------- public API


def _outputs(arch: Arch, batch: int | str) -> list[onnx.ValueInfoProto]:
    name, shape = (
        ("features", (FEATURE_DIM,)) if arch is Arch.AUDIO_ENCODER else ("output", OUTPUT_CHW)
    )
    return [helper.make_tensor_value_info(name, TensorProto.FLOAT, [batch, *shape])]


def _check_names(arch: Arch, input_names: Sequence[str] | None) -> tuple[str, ...]:
    expected = 1 if arch is Arch.AUDIO_ENCODER else 2
    if input_names is None:
        return ("mel",) if expected == 1 else ("input", "audio")
    if isinstance(input_names, str) or not isinstance(input_names, Sequence):
        raise InputError(f"input_names must be a tuple of names, got {input_names!r}")
    names = tuple(input_names)
    output = "features" if arch is Arch.AUDIO_ENCODER else "output"
    if (
        len(names) != expected
        or not all(isinstance(n, str) and n.strip() for n in names)
        or len(set(names)) != len(names)
        or output in names
    ):
        what = "one name" if expected == 1 else "two distinct names (visual, audio)"
        raise InputError(
            f"{arch.value} input_names must be {what}, non-empty and not {output!r}, got {names!r}"
        )
    return names


def _check_weights(arch: Arch, weights: Weights | str | None) -> Weights:
    default = Weights.RANDOM if arch is Arch.IDENTITY else Weights.FACE
    try:
        chosen = default if weights is None else Weights(weights)
    except ValueError:
        choices = "|".join(w.value for w in Weights)
        raise InputError(f"weights must be one of {choices}, got {weights!r}") from None
    if chosen is not default and arch is Arch.IDENTITY:
        raise InputError(f"{arch.value} has no weights to choose, got weights={chosen.value!r}")
    return chosen


def build_model(
    arch: Arch | str,
    size: Size | str = Size.FULL,
    *,
    seed: int = 0,
    input_names: Sequence[str] | None = None,
    fixed_batch: bool = False,
    weights: Weights | str | None = None,
) -> onnx.ModelProto:
    """Build a stand-in model with the real architecture and seeded, input-sensitive weights.

    Args:
        arch: which network (an ``Arch`` or its value, e.g. ``"unet328"``).
        size: ``Size.FULL`` (real cost) or ``Size.SMALL`` (narrower, same I/O shapes).
        seed: seeds the weights and the calibration data; the same seed gives the same bytes.
        input_names: UNet and identity: ``(visual, audio)``, default ``("input", "audio")``
            (some exports use ``("visual_input", "audio_input")``). Audio encoder: one
            name, default ``("mel",)``.
        fixed_batch: batch axis fixed to 1 instead of the dynamic axis ``"batch"``.
        weights: UNet and audio encoder: ``Weights.FACE`` (the default: they behave like a
            trained pair) or ``Weights.RANDOM``. None: the arch's default (identity: RANDOM,
            its only choice).

    Returns:
        An opset-17 model that passes ``onnx.checker``, with no BatchNormalization nodes.

    Raises:
        InputError: unknown arch, size or weights, a negative seed, bad ``input_names``, or
            ``Weights.FACE`` for the identity.
    """
    try:
        arch, size = Arch(arch), Size(size)
    except ValueError as exc:
        raise InputError(f"expected an Arch and a Size, got {arch!r}, {size!r}: {exc}") from exc
    weights = _check_weights(arch, weights)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"seed must be an integer >= 0, got {seed!r}")
    names = _check_names(arch, input_names)
    batch: int | str = 1 if fixed_batch else BATCH_AXIS
    started = time.perf_counter()

    if arch is Arch.IDENTITY:
        b = _Builder(rng=None)
        visual = b.input(names[0], VISUAL_CHW, batch)
        b.input(names[1], AUDIO_CHW, batch)  # declared so the I/O matches the UNet; unused
        starts, ends, axes = (b.const([v], np.int64) for v in (0, OUTPUT_CHW[0], 1))
        b.op("Slice", [visual, starts, ends, axes], out="output")
        model = b.model(_outputs(arch, batch), "identity")
    else:
        rng = np.random.default_rng(seed)
        plan = face.FacePlan() if weights is Weights.FACE else None
        # The UNet's random rows stay small next to its designed signals (INT8 resolution);
        # the encoder's keep the spread a real encoder's features have.
        random_std = face.RANDOM_STD if plan and arch is Arch.UNET328 else 1.0
        calib = _Builder(rng, plan=plan, random_std=random_std)
        _network(calib, arch, size, names, BATCH_AXIS)
        stat_outputs = [
            helper.make_tensor_value_info(s, TensorProto.FLOAT, None) for s in calib.stat_names
        ]
        calib_model = calib.model(_outputs(arch, BATCH_AXIS) + stat_outputs, "calibration")
        feeds = _calibration_feeds(arch, rng, weights)
        stats = _run_calibration(calib_model, list(names), feeds, calib.stat_names)
        infer = _Builder(rng=None, folded=_fold(calib.convs, stats))
        _network(infer, arch, size, names, batch)
        model = infer.model(_outputs(arch, batch), arch.value.replace("-", "_"))

    meta = {"arch": arch.value, "size": size.value, "seed": str(seed), "weights": weights.value}
    if weights is Weights.FACE:
        meta["design"] = str(face.DESIGN_VERSION)
    for key, value in meta.items():
        model.metadata_props.add(key=f"lipsync_ray.{key}", value=value)
    onnx.checker.check_model(model)
    elapsed_s = time.perf_counter() - started
    logger.debug("built %s/%s seed %d in %.2f s", arch.value, size.value, seed, elapsed_s)
    return model


def model_stats(model: onnx.ModelProto) -> ModelStats:
    """Parameters (initializer values) and Conv MACs for one sample.

    MACs per Conv = output elements at batch 1 * (Cin / groups) * kh * kw; shapes
    come from ONNX shape inference, with symbolic dims counted as 1.

    Raises:
        ModelError: a Conv whose output or weight shape cannot be inferred.
    """
    params = sum(int(np.prod(init.dims, dtype=np.int64)) for init in model.graph.initializer)
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes: dict[str, list[int]] = {}
    for info in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]:
        if info.type.tensor_type.HasField("shape"):
            dims = info.type.tensor_type.shape.dim
            shapes[info.name] = [d.dim_value if d.HasField("dim_value") else 1 for d in dims]
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)
    macs = 0
    for node in inferred.graph.node:
        if node.op_type != "Conv":
            continue
        out, weight = shapes.get(node.output[0]), shapes.get(node.input[1])
        if out is None or weight is None:
            raise ModelError(f"expected inferable shapes for Conv {node.name!r}, got none")
        macs += int(np.prod(out[1:], dtype=np.int64)) * int(np.prod(weight[1:], dtype=np.int64))
    return ModelStats(params=params, macs=macs)
