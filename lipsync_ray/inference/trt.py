"""TensorRT: whether it can run here, its provider options, and its engine cache.

ONNX Runtime lists its TensorRT provider whenever the wheel has it; a session then fails
without the TensorRT libraries, so :func:`tensorrt_loads` decides whether TensorRT stays in
the provider order. Engines and the timing cache live in a directory keyed by the model's
hash (:func:`default_trt_root`); :func:`engine_build_lock` makes the actors that start at once
take turns, so one builds and the others load its engine. The batch axis gets one explicit
optimisation profile, 1 up to the actor's batch, so a partial batch never rebuilds.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from lipsync_ray import fileio
from lipsync_ray.errors import ModelError
from lipsync_ray.fileio import file_sha256

if TYPE_CHECKING:
    from lipsync_ray.options import SessionOptions

__all__ = [
    "TENSORRT_LIBRARIES",
    "default_trt_root",
    "engine_build_lock",
    "file_key",
    "private_temp_dir",
    "tensorrt_loads",
    "tensorrt_options",
]

# What ONNX Runtime's TensorRT provider links against (TensorRT 10, the major version of
# every onnxruntime-gpu this project allows).
TENSORRT_LIBRARIES = ("libnvinfer.so.10", "libnvinfer_plugin.so.10", "libnvonnxparser.so.10")


@functools.cache
def tensorrt_loads() -> bool:
    """True when the TensorRT libraries load in this process: on the loader path, or in the
    ``tensorrt_libs`` directory of the ``tensorrt`` wheel. ONNX Runtime lists its TensorRT
    provider whenever the build has it, and a session then fails to start without them."""
    import ctypes
    import importlib.util

    spec = importlib.util.find_spec("tensorrt_libs")
    wheel_dir = Path(spec.origin).parent if spec is not None and spec.origin else None
    for name in TENSORRT_LIBRARIES:
        candidates = [name] + ([str(wheel_dir / name)] if wheel_dir else [])
        for candidate in candidates:
            try:
                ctypes.CDLL(candidate)
                break
            except OSError:
                continue
        else:
            return False
    return True


def _shape(batch: int, dims: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in (batch, *dims))


def tensorrt_options(options: SessionOptions) -> dict[str, object]:
    """The TensorRT provider options of ``options`` (strings and bools, as ONNX Runtime takes).

    Engines and the timing cache are always cached (in ``options.trt_cache_dir``, which
    GeneratorSession points at a directory of the model's hash), and with ``trt_inputs`` and
    ``trt_max_batch`` the batch axis gets an explicit profile: min 1, opt and max the batch.
    """
    trt: dict[str, object] = {"device_id": options.device_id}
    if options.trt_fp16:
        trt["trt_fp16_enable"] = True
    if options.trt_cache_dir:
        trt["trt_engine_cache_enable"] = True
        trt["trt_engine_cache_path"] = options.trt_cache_dir
        trt["trt_timing_cache_enable"] = True
        trt["trt_timing_cache_path"] = options.trt_cache_dir
    if options.trt_inputs and options.trt_max_batch > 0:
        for key, batch in (
            ("min", 1),
            ("opt", options.trt_max_batch),
            ("max", options.trt_max_batch),
        ):
            trt[f"trt_profile_{key}_shapes"] = ",".join(
                f"{name}:{_shape(batch, dims)}" for name, dims in options.trt_inputs
            )
    return trt


TRT_BUILD_TIMEOUT_S = 3600.0  # an engine build takes minutes; an hour means it is stuck


@contextlib.contextmanager
def engine_build_lock(directory: Path, timeout_s: float = TRT_BUILD_TIMEOUT_S):
    """Hold ``<directory>/.build.lock`` (``flock``): N actors that start at once open their
    TensorRT sessions one at a time, so the first builds the engine and the others load it
    from the cache. The kernel drops the lock of a process that dies. Yields the seconds
    spent waiting.

    Raises:
        ModelError: the lock was not free within ``timeout_s``.
    """
    import fcntl

    directory.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    fd = os.open(directory / ".build.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() - started > timeout_s:
                    raise ModelError(
                        f"another process has been building the TensorRT engine in {directory} "
                        f"for over {timeout_s:.0f} s"
                    ) from None
                time.sleep(0.2)
        try:
            yield time.monotonic() - started
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def file_key(path: Path) -> str:
    """The first 32 hex digits of the file's SHA-256."""
    return file_sha256(path)[:32]


def default_trt_root(model: Path) -> Path:
    """``<model's directory>/.cache/tensorrt``, or a private temp directory when the model's
    directory cannot be written."""
    model_dir = model.resolve().parent
    if os.access(model_dir, os.W_OK | os.X_OK):
        return model_dir / ".cache" / "tensorrt"
    return private_temp_dir("tensorrt")


def private_temp_dir(name: str) -> Path:
    """``<tmp>/lipsync-ray-<uid>/<name>``, this user's own with mode 0700 (see
    :func:`lipsync_ray.fileio.private_temp_dir`): a TensorRT plan can load plugins, so nobody
    else may plant one there.

    Raises:
        ModelError: the directory is not this user's private one.
    """
    return fileio.private_temp_dir(name, error=ModelError)
