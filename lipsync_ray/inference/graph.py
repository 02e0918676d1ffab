"""Model files and their ports, checked without opening a session.

- :func:`check_model_file`: the file exists, is ONNX, and its external data stays inside the
  model's directory;
- :func:`generator_io` / :func:`encoder_io`: inputs found by shape, not by name (exports call
  them ``input``/``audio`` or ``visual_input``/``audio_input`` and others; the visual input has
  6 channels, the audio 32), dtypes and shapes compared with what the models need, and whether
  the batch axis is fixed to 1. Both take :class:`Port` lists, from the graph
  (:func:`graph_ports`) or from an open session (:func:`session_ports`), so a render is checked
  before any actor starts with the same rules a session applies.

Needs ``onnx`` (imported on use), never ``onnxruntime``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lipsync_ray.contract import (
    AUDIO_CHANNELS,
    AUDIO_SIZE,
    FEATURE_DIM,
    FRAME_SIZE,
    MEL_SHAPE,
    VISUAL_CHANNELS,
)
from lipsync_ray.errors import ModelError

__all__ = [
    "IOSpec",
    "Port",
    "all_tensors",
    "check_encoder_model",
    "check_generator_model",
    "check_model_file",
    "encoder_io",
    "generator_io",
    "graph_ports",
    "load_checked",
    "session_ports",
]


def check_model_file(path: str | Path) -> Path:
    """Check that a model file exists and that its external data stays inside its directory.

    Raises:
        ModelError: missing or unreadable file, not an ONNX model, or an external-data location
            that is absolute, climbs out with ``..`` or is a symlink pointing outside.
    """
    return load_checked(path)[0]


def check_generator_model(path: str | Path) -> Path:
    """:func:`check_model_file`, then the generator's inputs and output as the graph declares
    them: the same rules :class:`GeneratorSession` applies, without opening a session (cheap
    enough to validate a render before any actor starts).

    Raises:
        ModelError: as :func:`check_model_file`, or inputs/outputs the generator cannot have.
    """
    path, model = load_checked(path)
    generator_io(*graph_ports(model), path)
    return path


def check_encoder_model(path: str | Path) -> Path:
    """:func:`check_model_file`, then the audio encoder's input (and output, when declared)."""
    path, model = load_checked(path)
    encoder_io(*graph_ports(model), path)
    return path


def load_checked(path: str | Path):
    """Load a model's graph (not its external data) and check its external-data locations."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ModelError("model file not found", path=path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, OSError, ...
        raise ModelError(f"not a readable ONNX model: {exc}", path=path) from exc
    base = path.parent.resolve()
    for tensor in all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        name = tensor.name or "(unnamed attribute tensor)"
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (base / location).resolve()  # resolves symlinks too
        if os.path.isabs(location) or not target.is_relative_to(base):
            raise ModelError(
                f"external data of tensor {name!r} must stay inside the model's "
                f"directory, got location {location!r}",
                path=path,
            )
        if not target.is_file():
            raise ModelError(
                f"external data file {location!r} of tensor {name!r} is missing", path=path
            )
    return path, model


def all_tensors(model):
    """Every TensorProto that can hold data: initializers, sparse initializers, and the tensor
    attributes of every node (unnamed ``Constant`` values included), in subgraphs and local
    functions too. ONNX Runtime loads external data for all of them."""
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        yield from _node_tensors(function.node)


def _graph_tensors(graph):
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    yield from _node_tensors(graph.node)


def _node_tensors(nodes):
    for node in nodes:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            sparse = [attr.sparse_tensor] if attr.HasField("sparse_tensor") else []
            for s in [*sparse, *attr.sparse_tensors]:
                yield from (s.values, s.indices)
            if attr.HasField("g"):
                yield from _graph_tensors(attr.g)
            for sub in attr.graphs:
                yield from _graph_tensors(sub)


@dataclass(frozen=True)
class Port:
    """A model input or output: its name, ONNX Runtime type string (``tensor(float)``) and
    dims (int, symbolic name or None each; ``None`` for the whole when the rank is unknown)."""

    name: str
    type: str
    dims: tuple | None


def session_ports(items) -> list[Port]:
    return [Port(i.name, i.type, tuple(i.shape) if i.shape is not None else None) for i in items]


def graph_ports(model) -> tuple[list[Port], list[Port]]:
    """(inputs, outputs) as the graph declares them; initializers listed as inputs (IR < 4)
    are not inputs, as in ONNX Runtime."""
    import onnx

    def port(value_info) -> Port:
        if not value_info.type.HasField("tensor_type"):
            return Port(value_info.name, "non-tensor", None)
        tt = value_info.type.tensor_type
        type_ = f"tensor({onnx.TensorProto.DataType.Name(tt.elem_type).lower()})"
        if not tt.HasField("shape"):
            return Port(value_info.name, type_, None)
        dims = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim
        )
        return Port(value_info.name, type_, dims)

    initializers = {t.name for t in model.graph.initializer}
    inputs = [port(i) for i in model.graph.input if i.name not in initializers]
    return inputs, [port(o) for o in model.graph.output]


@dataclass
class IOSpec:
    visual: str
    audio: str
    output: str
    fixed_batch: bool


def _describe(ports: Sequence[Port]) -> str:
    return ", ".join(
        f"{p.name} {p.type} {list(p.dims) if p.dims is not None else '[?]'}" for p in ports
    )


def generator_io(inputs: Sequence[Port], outputs: Sequence[Port], path: Path) -> IOSpec:
    """Find the visual and audio inputs by shape and check the generator's I/O contract."""
    by_channels: dict[object, list[Port]] = {}
    for item in inputs:
        channels = item.dims[1] if item.dims is not None and len(item.dims) == 4 else None
        by_channels.setdefault(channels, []).append(item)
    visual = by_channels.get(VISUAL_CHANNELS, [])
    audio = by_channels.get(AUDIO_CHANNELS, [])
    if len(inputs) != 2 or len(visual) != 1 or len(audio) != 1:
        raise ModelError(
            "generator must have two rank-4 float inputs, one with 6 channels "
            "[B,6,320,320] (visual) and one with 32 channels [B,32,16,16] (audio); "
            f"got {_describe(inputs)}",
            path=path,
        )
    for item, expected in ((visual[0], FRAME_SIZE), (audio[0], AUDIO_SIZE)):
        dims = list(item.dims or ())
        if item.type != "tensor(float)":
            raise ModelError(
                f"input {item.name!r} must be tensor(float), got {item.type}", path=path
            )
        if any(isinstance(d, int) and d != expected for d in dims[2:]):
            raise ModelError(
                f"input {item.name!r} must be [B,{dims[1]},{expected},{expected}], got {dims}",
                path=path,
            )
    # An output whose rank the graph does not declare is checked on the first batch instead.
    if len(outputs) != 1 or (outputs[0].dims is not None and len(outputs[0].dims) != 4):
        raise ModelError(
            f"generator must have one output [B,3,320,320], got {_describe(outputs)}",
            path=path,
        )
    out_dims = list(outputs[0].dims or ())
    if any(
        isinstance(d, int) and d != e
        for d, e in zip(out_dims[1:], (3, FRAME_SIZE, FRAME_SIZE), strict=False)
    ):
        raise ModelError(f"generator output must be [B,3,320,320], got {out_dims}", path=path)
    batch_dims = {visual[0].dims[0], audio[0].dims[0]}
    fixed = any(isinstance(d, int) for d in batch_dims)
    if fixed and batch_dims != {1}:
        raise ModelError(
            f"a fixed batch axis must be 1 on both inputs, got {sorted(map(str, batch_dims))}",
            path=path,
        )
    return IOSpec(visual[0].name, audio[0].name, outputs[0].name, fixed)


def encoder_io(
    inputs: Sequence[Port], outputs: Sequence[Port], path: Path
) -> tuple[str, str, bool]:
    """(input name, output name, fixed batch) of an audio encoder, after checking its I/O."""
    if len(inputs) != 1 or inputs[0].dims is None or list(inputs[0].dims[1:]) != list(MEL_SHAPE):
        raise ModelError(
            f"audio encoder must have one input [B,1,80,16], got {_describe(inputs)}", path=path
        )
    if inputs[0].type != "tensor(float)":
        raise ModelError(
            f"audio encoder input must be tensor(float), got {inputs[0].type}", path=path
        )
    if len(outputs) != 1:
        raise ModelError(
            f"audio encoder must have one output [B,512], got {_describe(outputs)}", path=path
        )
    rest = list(outputs[0].dims[1:]) if outputs[0].dims is not None else []
    if rest and all(isinstance(d, int) for d in rest) and math.prod(rest) != FEATURE_DIM:
        raise ModelError(
            f"audio encoder output must be [B,512], got {list(outputs[0].dims)}", path=path
        )
    return inputs[0].name, outputs[0].name, isinstance(inputs[0].dims[0], int)
