"""Making the reduced-precision generators: static INT8 through ONNX Runtime's quantiser, FP16
through its float16 converter.

Both write a new model file next to nothing else and leave the user's model untouched;
:mod:`lipsync_ray.precision` decides which one a render runs, calibrates on the avatar, gates
the result against FP32 and caches it. Needs ``onnx`` and ``onnxruntime`` (imported on use).
"""

from __future__ import annotations

import enum
import functools
import logging
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from lipsync_ray.contract import AUDIO_CHANNELS, AUDIO_SIZE, FRAME_SIZE, VISUAL_CHANNELS
from lipsync_ray.errors import InputError, ModelError
from lipsync_ray.inference import check_model_file
from lipsync_ray.onnx_io import save_model

__all__ = [
    "Int8Options",
    "QuantFormat",
    "convert_fp16",
    "integer_products_saturate",
    "quantize_int8",
]

log = logging.getLogger(__name__)


class QuantFormat(enum.Enum):
    """How INT8 is written into the ONNX graph."""

    QDQ = "qdq"  # QuantizeLinear/DequantizeLinear pairs; ORT fuses them into integer kernels
    QOPERATOR = "qoperator"  # QLinearConv & co. written out


@dataclass(frozen=True)
class Int8Options:
    """Static INT8 quantisation settings (all part of the cache key)."""

    # QDQ: ONNX Runtime's recommended format since 1.11; its CPU kernels are tuned for it.
    format: QuantFormat = QuantFormat.QDQ
    # uint8 activations: x86 integer kernels multiply u8 activations by s8 weights (VNNI
    # vpdpbusd), and after the ReLUs most activations are >= 0, so uint8 keeps all 8 bits.
    signed_activations: bool = False
    # One weight scale per output channel: BN-folded and depthwise weights differ widely
    # between channels, one scale per tensor crushes the small ones.
    per_channel: bool = True
    # 7-bit weights ([-64, 64]) where ONNX Runtime's CPU integer kernels saturate: x86 without
    # VNNI (AVX2, AVX-512 without VNNI) multiplies u8 by s8 with vpmaddubsw, which adds each
    # pair of products into an int16 and clamps it (255 * 127 * 2 > 32767); per-channel scales
    # put every channel's largest weight at +-127, so bright pixels clamp. 7-bit weights keep
    # every pair sum in range (255 * 64 * 2 = 32640). None (the default): decided on the
    # machine that quantises and gates, by running that kernel once
    # (integer_products_saturate); 8-bit weights where it is exact (VNNI: vpdpbusd sums into
    # int32). Set it explicitly when the INT8 model runs on other CPUs than that machine's.
    reduce_range: bool | None = None
    # The node making the graph output (the final sigmoid) stays float: the compositor rounds
    # to 1/255 steps, an 8-bit sigmoid output would round a second time. The conv before it
    # gets INT8 weights and an 8-bit output: keeping it float too cost the full-size stand-in
    # 3.6 % of its INT8 speed (42.6 against 44.2 FPS, runs interleaved in one process) for
    # 0.04 dB of the gate's worst frame (38.24 against 38.20).
    float_output: bool = True
    # ONNX Runtime's quant_pre_process (shape inference + graph optimisation) first.
    preprocess: bool = True
    # Frames per calibration run (MinMax keeps per-tensor min/max only: memory stays small).
    calibration_batch: int = 4

    def resolved(self) -> Int8Options:
        """These options with ``reduce_range`` decided for this machine (the cache keys on it)."""
        if self.reduce_range is not None:
            return self
        return replace(self, reduce_range=integer_products_saturate())


@functools.cache
def integer_products_saturate() -> bool:
    """Whether ONNX Runtime's CPU u8 x s8 integer GEMM on this machine clamps pair sums to int16.

    Runs one MatMulInteger whose exact result is 2 * 255 * 127 = 64770: x86 with AVX2 and no
    VNNI returns 32767 (vpmaddubsw saturates); VNNI sums into int32. Decided by the kernel
    itself rather than by CPU flags, so every platform and ONNX Runtime build answers for
    itself. Cached for the process.
    """
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b"], ["y"])],
        "saturation-probe",
        [
            helper.make_tensor_value_info("a", TensorProto.UINT8, [1, 2]),
            helper.make_tensor_value_info("b", TensorProto.INT8, [2, 1]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [1, 1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    a, b = np.full((1, 2), 255, np.uint8), np.full((2, 1), 127, np.int8)
    got = int(session.run(None, {"a": a, "b": b})[0][0, 0])
    saturates = got != 2 * 255 * 127
    if saturates:
        log.info(
            "this CPU's integer kernels clamp u8*s8 pair sums (255*127*2 gave %d): INT8 uses "
            "7-bit weights",
            got,
        )
    return saturates


def _generator_inputs(model) -> tuple[str, str, bool]:
    """(visual name, audio name, fixed batch) of an ONNX generator, found by channel count."""
    found: dict[int, tuple[str, bool]] = {}
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        if len(dims) == 4 and dims[1].HasField("dim_value"):
            found[dims[1].dim_value] = (value.name, dims[0].dim_value == 1)
    if VISUAL_CHANNELS not in found or AUDIO_CHANNELS not in found:
        raise ModelError(
            "expected a generator with inputs [B,6,320,320] and [B,32,16,16], got "
            f"{[v.name for v in model.graph.input]}"
        )
    visual, audio = found[VISUAL_CHANNELS], found[AUDIO_CHANNELS]
    return visual[0], audio[0], visual[1]


def _output_node(model) -> list[str]:
    """The name of the node producing the graph output (none if an input is the output)."""
    producers = {out: node for node in model.graph.node for out in node.output}
    node = producers.get(model.graph.output[0].name)
    return [] if node is None else [node.name]


class _Reader:
    """ONNX Runtime's CalibrationDataReader protocol over uint8 visual + float audio arrays."""

    def __init__(self, names: tuple[str, str], visual, audio, batch: int) -> None:
        self.names, self.visual, self.audio, self.batch, self.pos = names, visual, audio, batch, 0

    def get_next(self) -> dict | None:
        if self.pos >= len(self.visual):
            return None
        sl = slice(self.pos, self.pos + self.batch)
        self.pos += self.batch
        v = (self.visual[sl].transpose(0, 3, 1, 2) / np.float32(255.0)).astype(np.float32)
        return {self.names[0]: v, self.names[1]: np.ascontiguousarray(self.audio[sl])}

    def rewind(self) -> None:
        self.pos = 0


def quantize_int8(
    model: str | Path,
    out: str | Path,
    visual: np.ndarray,
    audio: np.ndarray,
    options: Int8Options = Int8Options(),
) -> Path:
    """Write a static INT8 version of ``model`` to ``out`` (atomically), calibrated on the inputs.
    ``options.reduce_range`` None is decided on this machine (:meth:`Int8Options.resolved`).

    Args:
        model: FP32 generator.
        out: the INT8 model to write; its directory must exist.
        visual: uint8 (k, 320, 320, 6) calibration visual inputs (avatar frames). Not mutated.
        audio: float32 (k, 32, 16, 16) calibration audio windows. Not mutated.

    Raises:
        InputError: bad calibration arrays. ModelError: not a generator, or the quantiser failed.
    """
    import onnx
    from onnxruntime import quantization as q
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model, out = check_model_file(model), Path(out)
    options = options.resolved()
    visual_shape = (FRAME_SIZE, FRAME_SIZE, VISUAL_CHANNELS)
    if visual.dtype != np.uint8 or visual.shape[1:] != visual_shape or len(visual) < 1:
        raise InputError(f"expected uint8 (k >= 1, 320, 320, 6) visual inputs, got {visual.shape}")
    if audio.dtype != np.float32 or audio.shape != (
        len(visual),
        AUDIO_CHANNELS,
        AUDIO_SIZE,
        AUDIO_SIZE,
    ):
        raise InputError(
            f"expected float32 ({len(visual)}, 32, 16, 16) audio windows, got "
            f"{audio.dtype} {audio.shape}"
        )
    proto = onnx.load(str(model))
    visual_name, audio_name, fixed = _generator_inputs(proto)
    batch = 1 if fixed else max(1, options.calibration_batch)
    for i, node in enumerate(proto.graph.node):  # nodes_to_exclude needs names
        node.name = node.name or f"node_{i}"
    with tempfile.TemporaryDirectory(prefix=".int8-", dir=out.parent) as tmp:
        src = Path(tmp) / "named.onnx"
        onnx.save(proto, str(src))
        try:
            if options.preprocess:  # symbolic shape inference (sympy) is for transformers
                quant_pre_process(str(src), str(Path(tmp) / "pre.onnx"), skip_symbolic_shape=True)
                src = Path(tmp) / "pre.onnx"
            qdq = options.format is QuantFormat.QDQ
            signed = options.signed_activations
            q.quantize_static(
                str(src),
                str(Path(tmp) / "int8.onnx"),
                _Reader((visual_name, audio_name), visual, audio, batch),
                quant_format=q.QuantFormat.QDQ if qdq else q.QuantFormat.QOperator,
                per_channel=options.per_channel,
                reduce_range=options.reduce_range,
                activation_type=q.QuantType.QInt8 if signed else q.QuantType.QUInt8,
                weight_type=q.QuantType.QInt8,
                nodes_to_exclude=_output_node(onnx.load(str(src))) if options.float_output else [],
                calibrate_method=q.CalibrationMethod.MinMax,
                calibration_providers=["CPUExecutionProvider"],
            )
        except Exception as exc:  # ORT's quantiser raises Fail, ValueError, KeyError, ...
            raise ModelError(f"INT8 quantisation failed: {exc}", path=model) from exc
        os.replace(Path(tmp) / "int8.onnx", out)
    return out


def _toposort(graph) -> None:
    """Reorder ``graph.node`` so every node comes after its inputs' producers (in place)."""
    known = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in known for i in n.input)]
        if not ready:
            raise ModelError("FP16 conversion produced a graph with a cycle or a dangling input")
        ordered += ready
        known.update(o for n in ready for o in n.output)
        pending = [n for n in pending if not any(n is r for r in ready)]
    del graph.node[:]
    graph.node.extend(ordered)


def convert_fp16(model: str | Path, out: str | Path) -> Path:
    """Write an FP16 version of ``model`` to ``out`` (atomically): fp16 weights and compute,
    float32 inputs and outputs (``keep_io_types``), so the session's checks are unchanged.

    Raises:
        ModelError: not a generator, or the converted graph fails ``onnx.checker``.
    """
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = check_model_file(model)
    proto = onnx.load(str(model))
    _generator_inputs(proto)
    try:
        half = convert_float_to_float16(proto, keep_io_types=True)
        _toposort(half.graph)  # the converter appends its input Casts after their consumers
        onnx.checker.check_model(half)
    except Exception as exc:  # the converter raises AssertionError, ValueError, ...
        raise ModelError(f"FP16 conversion failed: {exc}", path=model) from exc
    return save_model(half, out)
