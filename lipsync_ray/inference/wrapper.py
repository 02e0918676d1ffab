"""The generator wrapped for uint8 I/O: the NumPy conversions around a call, moved into the graph.

Without it, every generator call converts the prepared uint8 (B, 320, 320, 6) inputs to float32
(B, 6, 320, 320) in single-threaded NumPy, sends 4x the bytes to the device, gets float32 back
and makes four more passes over it (x255, clip, transpose, astype) plus a finite-values check.
:func:`wrap_generator` writes a model that does all of it inside ONNX Runtime, on the device:

    visual_u8  uint8 (B, 320, 320, 6) --Cast float--Div 255--Transpose (0, 3, 1, 2)--+
    audio      float32 (B, 32, 16, 16) ------------------------------------------+    |
                                                                     the user's generator
    image_u8   uint8 (B, 320, 320, 3) <--Transpose (0, 2, 3, 1)--Cast uint8--Clip 0..255--Mul 255
    finite     bool ()                <--Not IsNaN ReduceSum (output x 0)

Each step is the float32 operation NumPy does today (``np.divide(x, np.float32(255))`` in
``inference.session._visual_tensor``; ``clip(y * 255, 0, 255).astype(uint8)`` in
``composite.prediction_to_uint8``: Cast to uint8 truncates toward zero like ``astype``), so
the output is bit-identical to the NumPy path on the CPU provider. ``finite`` is False when
the generator's output holds a NaN or an Inf: ``y * 0`` is 0 for every finite value and NaN
otherwise, so one multiply and one sum stand for ``np.isfinite(y).all()``.

The audio input keeps its name and type; the visual input is replaced by ``visual_u8`` with
the same batch axis (symbolic, or fixed to 1). The user's model file is never written.

**Cache.** ``<cache_dir>/graph-io-<key>.onnx``, the key hashing the model file, its external
data, this recipe's version and the onnx version; by default ``cache_dir`` is
``<model's directory>/.cache/graph-io`` (so the INT8 and FP16 models of
:mod:`lipsync_ray.precision` get their wrappers inside their own cache entries), or a private
per-user directory in the system temp directory when the model's directory is read-only.
A wrapper is written to a temporary file and renamed into place, so N actors that start at
once each see either no file or a complete one; when two build it, both write the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lipsync_ray.contract import FRAME_SIZE, VISUAL_CHANNELS
from lipsync_ray.errors import ModelError
from lipsync_ray.inference.graph import all_tensors, generator_io, graph_ports, load_checked
from lipsync_ray.inference.trt import private_temp_dir

__all__ = [
    "WRAPPER_VERSION",
    "WrappedGenerator",
    "default_wrapper_dir",
    "wrap_generator",
    "wrapped_graph",
]

log = logging.getLogger(__name__)

WRAPPER_VERSION = 1  # bump when the wrapping graph changes: it is part of the cache key
VISUAL_U8 = "visual_u8"
IMAGE_U8 = "image_u8"
FINITE = "finite"
MIN_OPSET = 9  # IsNaN
# Above this a wrapper's initializers go to an external-data file (protobuf's 2 GiB limit).
_INLINE_LIMIT_BYTES = 1 << 30


@dataclass(frozen=True)
class WrappedGenerator:
    """A wrapped generator on disk and the names of its ports."""

    path: Path  # the wrapper model (in the cache)
    source: Path  # the user's model it wraps
    visual: str  # uint8 (B, 320, 320, 6) input
    audio: str  # float32 (B, 32, 16, 16) input, the user's name
    image: str  # uint8 (B, 320, 320, 3) output
    finite: str  # bool () output: every value of the generator's output is finite
    fixed_batch: bool  # the batch axis is fixed to 1
    cached: bool  # found in the cache (not built this time)


def default_wrapper_dir(model: str | Path) -> Path:
    """``<model's directory>/.cache/graph-io``, or ``<tmp>/lipsync-ray-<uid>/graph-io`` when
    the model's directory cannot be written."""
    model_dir = Path(model).resolve().parent
    if os.access(model_dir, os.W_OK | os.X_OK):
        return model_dir / ".cache" / "graph-io"
    return private_temp_dir("graph-io")


def _unique(taken: set[str], base: str) -> str:
    name, n = base, 1
    while name in taken:
        name, n = f"{base}_{n}", n + 1
    taken.add(name)
    return name


def wrapped_graph(model, path: Path | str = "model.onnx"):
    """The wrapping of an in-memory generator (``onnx.ModelProto``, not modified).

    Returns:
        ``(wrapper ModelProto, visual, audio, image, finite, fixed_batch)``.

    Raises:
        ModelError: inputs or outputs a generator cannot have (the session's own checks), or an
            opset below 9.
    """
    import onnx
    from onnx import TensorProto, helper

    path = Path(path)
    io = generator_io(*graph_ports(model), path)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        raise ModelError(f"uint8 graph I/O needs opset >= {MIN_OPSET}, got {opset}", path=path)
    wrapped = onnx.ModelProto()
    wrapped.CopyFrom(model)
    graph = wrapped.graph
    taken = {v.name for v in (*graph.input, *graph.output, *graph.initializer, *graph.value_info)}
    taken |= {n for node in graph.node for n in (*node.input, *node.output)}
    visual_u8, image_u8, finite = (_unique(taken, n) for n in (VISUAL_U8, IMAGE_U8, FINITE))

    def name(base: str) -> str:
        return _unique(taken, f"graph_io/{base}")

    (visual_in,) = [v for v in graph.input if v.name == io.visual]
    output = next(o for o in graph.output if o.name == io.output)

    def dim(d):
        return d.dim_value if d.HasField("dim_value") else (d.dim_param or None)

    batch = dim(visual_in.type.tensor_type.shape.dim[0])
    # The output keeps what the generator declares, transposed (nothing when it declares no
    # shape: the session checks it on every call then).
    declared = output.type.tensor_type.HasField("shape")
    out_dims = [dim(d) for d in output.type.tensor_type.shape.dim] if declared else None
    image_dims = [out_dims[i] for i in (0, 2, 3, 1)] if out_dims else None

    index = list(graph.input).index(visual_in)
    new_input = helper.make_tensor_value_info(
        visual_u8, TensorProto.UINT8, [batch, FRAME_SIZE, FRAME_SIZE, VISUAL_CHANNELS]
    )
    graph.input.remove(visual_in)
    graph.input.insert(index, new_input)

    k255, k0, lo, hi = name("k255"), name("k0"), name("clip_min"), name("clip_max")
    consts = [
        helper.make_tensor(k255, TensorProto.FLOAT, [], [255.0]),
        helper.make_tensor(k0, TensorProto.FLOAT, [], [0.0]),
    ]
    f_visual, s_visual = name("visual_f32"), name("visual_01_nhwc")
    pre = [
        helper.make_node("Cast", [visual_u8], [f_visual], to=TensorProto.FLOAT),
        helper.make_node("Div", [f_visual, k255], [s_visual]),
        helper.make_node("Transpose", [s_visual], [io.visual], perm=[0, 3, 1, 2]),
    ]
    scaled, clipped, u8_nchw = name("scaled"), name("clipped"), name("image_u8_nchw")
    if opset >= 11:
        consts += [
            helper.make_tensor(lo, TensorProto.FLOAT, [], [0.0]),
            helper.make_tensor(hi, TensorProto.FLOAT, [], [255.0]),
        ]
        clip = helper.make_node("Clip", [scaled, lo, hi], [clipped])
    else:
        clip = helper.make_node("Clip", [scaled], [clipped], min=0.0, max=255.0)
    zeros, total, nonfinite = name("zeros"), name("sum_of_zeros"), name("nonfinite")
    post = [
        helper.make_node("Mul", [io.output, k255], [scaled]),
        clip,
        helper.make_node("Cast", [clipped], [u8_nchw], to=TensorProto.UINT8),
        helper.make_node("Transpose", [u8_nchw], [image_u8], perm=[0, 2, 3, 1]),
        helper.make_node("Mul", [io.output, k0], [zeros]),
        helper.make_node("ReduceSum", [zeros], [total], keepdims=0),
        helper.make_node("IsNaN", [total], [nonfinite]),
        helper.make_node("Not", [nonfinite], [finite]),
    ]
    graph.initializer.extend(consts)
    nodes = [*pre, *graph.node, *post]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.output[:]
    graph.output.extend(
        [
            helper.make_tensor_value_info(image_u8, TensorProto.UINT8, image_dims),
            helper.make_tensor_value_info(finite, TensorProto.BOOL, []),
        ]
    )
    return wrapped, visual_u8, io.audio, image_u8, finite, io.fixed_batch


def _model_key(path: Path, model) -> str:
    """Hash of the model file, the external-data files it names, and the recipe."""
    import onnx

    digest = hashlib.sha256(json.dumps([WRAPPER_VERSION, onnx.__version__]).encode())
    files = [path]
    files += sorted(
        {
            path.parent / next(e.value for e in t.external_data if e.key == "location")
            for t in all_tensors(model)
            if t.data_location == onnx.TensorProto.EXTERNAL
        }
    )
    for file in files:
        digest.update(file.name.encode() + b"\0")
        with open(file, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()[:32]


def wrap_generator(model: str | Path, cache_dir: str | Path | None = None) -> WrappedGenerator:
    """The uint8-I/O wrapper of the generator at ``model``, from the cache or built into it.

    Args:
        model: the generator file (FP32 as given, or a reduced one); not modified.
        cache_dir: where wrappers are kept; default :func:`default_wrapper_dir`.

    Raises:
        ModelError: the model cannot be read, is not a generator, or its opset is below 9;
            or the cache cannot be written.
    """
    import onnx

    path, graph_only = load_checked(model)
    path = path.resolve()
    key = _model_key(path, graph_only)
    root = Path(cache_dir) if cache_dir is not None else default_wrapper_dir(path)
    target = root / f"graph-io-{key}.onnx"
    if target.is_file():
        # Complete by construction (renamed into place); the ports come from the graph alone.
        _, visual, audio, image, finite, fixed = wrapped_graph(graph_only, path)
        return WrappedGenerator(target, path, visual, audio, image, finite, fixed, cached=True)
    wrapped, visual, audio, image, finite, fixed = wrapped_graph(
        onnx.load(str(path), load_external_data=True), path
    )
    try:
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write_atomically(wrapped, target)
    except OSError as exc:
        raise ModelError(
            f"cannot write the uint8 graph I/O wrapper to {root}: {exc} "
            "(set a writable cache directory, or turn graph I/O off)",
            path=path,
        ) from exc
    log.info("wrapped %s for uint8 graph I/O: %s", path.name, target)
    return WrappedGenerator(target, path, visual, audio, image, finite, fixed, cached=False)


def _write_atomically(model, target: Path) -> None:
    """Write ``model`` to ``target`` through a temporary file in the same directory.

    A model over ``_INLINE_LIMIT_BYTES`` keeps its initializers in ``<target>.data``, renamed
    into place before the model that names it (every writer writes the same bytes)."""
    import onnx

    tmp_dir = Path(tempfile.mkdtemp(prefix=".graph-io-", dir=target.parent))
    try:
        tmp = tmp_dir / target.name
        external = model.ByteSize() > _INLINE_LIMIT_BYTES
        onnx.save_model(
            model,
            str(tmp),
            save_as_external_data=external,
            all_tensors_to_one_file=True,
            location=f"{target.name}.data",
        )
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if external:
            os.replace(tmp_dir / f"{target.name}.data", target.parent / f"{target.name}.data")
        os.replace(tmp, target)
    finally:
        for leftover in tmp_dir.iterdir():
            leftover.unlink(missing_ok=True)
        tmp_dir.rmdir()
