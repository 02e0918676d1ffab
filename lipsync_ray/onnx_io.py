"""Writing ONNX models: the one piece of model I/O the runtime needs besides loading.

``precision`` saves the reduced models it makes (INT8, FP16) with :func:`save_model`; the
stand-in builder (``lipsync_ray.dev.models``) re-exports it. No ``onnx`` import: a
``ModelProto`` serialises itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from lipsync_ray.errors import InputError
from lipsync_ray.fileio import write_bytes

if TYPE_CHECKING:
    import onnx

__all__ = ["save_model"]


def save_model(model: onnx.ModelProto, path: str | Path) -> Path:
    """Write ``model`` to ``path`` atomically and durably (:func:`lipsync_ray.fileio.write_bytes`
    with ``fsync``: a model is costly to make again); returns the path.

    Raises:
        InputError: the parent directory does not exist (it is not created).
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise InputError(
            "expected an existing directory for the model file, got a missing one", path=path.parent
        )
    return write_bytes(path, model.SerializeToString(), fsync=True)
