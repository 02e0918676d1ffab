"""Tiny generators for fault tests: the ROI (``visual[:, :3]``) through a few extra nodes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def save_roi_generator(path: Path, name: str, nodes: list, inits: list) -> Path:
    """Save a generator with the real input and output names and shapes whose graph slices
    ``input`` (B, 6, 320, 320) to ``roi`` (its first three channels), then runs ``nodes``,
    which read ``roi`` and ``audio`` (B, 32, 16, 16) and must write ``output``."""
    visual = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["b", 6, 320, 320])
    audio = helper.make_tensor_value_info("audio", TensorProto.FLOAT, ["b", 32, 16, 16])
    out = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["b", 3, 320, 320])
    inits = [
        numpy_helper.from_array(np.array([0], np.int64), "starts"),
        numpy_helper.from_array(np.array([3], np.int64), "ends"),
        numpy_helper.from_array(np.array([1], np.int64), "axes"),
        *inits,
    ]
    nodes = [helper.make_node("Slice", ["input", "starts", "ends", "axes"], ["roi"]), *nodes]
    graph = helper.make_graph(nodes, name, [visual, audio], [out], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path
