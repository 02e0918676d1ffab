"""Execution providers: which ones to ask ONNX Runtime for, and why one was not used.

Providers are tried in order TensorRT → CUDA → CPU (configurable, :class:`SessionOptions`).
A provider that is asked for but cannot be used is reported once, loudly
(:func:`warn_once`); :func:`provider_library_error`, :func:`probe_provider` and
:func:`gpu_fallback_reason` say why, in ONNX Runtime's own words, so that the driver can
refuse a render that asked for a GPU before Ray starts and an actor can explain a fallback.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from lipsync_ray.inference.trt import TENSORRT_LIBRARIES, tensorrt_loads, tensorrt_options
from lipsync_ray.options import DEFAULT_PROVIDERS, Provider, SessionOptions

__all__ = [
    "CUDA_ARENA_SHARE",
    "DEFAULT_PROVIDERS",
    "GPU_PROVIDERS",
    "Provider",
    "SessionOptions",
    "device_memory_bytes",
    "gpu_fallback_reason",
    "preload_gpu_libraries",
    "probe_provider",
    "provider_entries",
    "provider_library_error",
    "requires_gpu",
    "warn_once",
    "with_gpu_share",
]

log = logging.getLogger(__name__)


_warned: set[str] = set()
_warn_lock = threading.Lock()


def warn_once(message: str) -> None:
    with _warn_lock:
        if message in _warned:
            return
        _warned.add(message)
    log.warning(message)


# The part of an actor's share of the card its CUDA arena may take; the rest is headroom for
# what lives outside the arena (the CUDA context, cuDNN and TensorRT workspaces).
CUDA_ARENA_SHARE = 0.85


def device_memory_bytes(device: str | int) -> int | None:
    """Total memory of the GPU with this physical index (as Ray reports GPU ids), from
    ``nvidia-smi``; None when it cannot be found out."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    query = [exe, "--query-gpu=memory.total", "--format=csv,noheader,nounits", "-i", str(device)]
    try:
        result = subprocess.run(query, capture_output=True, text=True, timeout=30, check=True)
        return int(float(result.stdout.split()[0]) * 2**20)  # MiB
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def with_gpu_share(
    options: SessionOptions,
    gpu_ids: Sequence[str],
    share: float,
    *,
    memory_of=device_memory_bytes,
) -> SessionOptions:
    """The session options of an actor to which Ray gave ``share`` of the GPUs ``gpu_ids``.

    No GPU: the CPU provider only (asking ONNX Runtime for CUDA would take a device Ray gave
    someone else, or fail). A fraction of one GPU and no explicit arena limit: the limit is
    ``CUDA_ARENA_SHARE`` of that fraction of the card's memory (``memory_of(gpu id)``; when
    that is unknown, the arena stays unlimited and a warning says so).
    """
    if not gpu_ids:
        return replace(options, providers=(Provider.CPU,))
    if options.gpu_mem_limit_bytes is not None or share >= 1.0:
        return options
    device = gpu_ids[min(options.device_id, len(gpu_ids) - 1)]
    total = memory_of(device)
    if total is None:
        warn_once(
            f"GPU {device}: its memory size is unknown (no nvidia-smi), so the CUDA arena of "
            f"actors holding {share:g} of it is not limited; set --gpu-mem-limit"
        )
        return options
    return replace(options, gpu_mem_limit_bytes=int(total * share * CUDA_ARENA_SHARE))


def provider_entries(options: SessionOptions, available: Sequence[str]) -> list:
    entries: list = []
    for provider in (*options.providers, Provider.CPU):
        if provider.value in (e if isinstance(e, str) else e[0] for e in entries):
            continue
        if provider.value not in available:
            if provider is not Provider.CPU:
                warn_once(
                    f"{provider.value} was requested but this onnxruntime build does not have it "
                    f"(available: {', '.join(available)})"
                )
            continue
        if provider is Provider.CUDA:
            cuda: dict[str, object] = {
                "device_id": options.device_id,
                "arena_extend_strategy": "kSameAsRequested",
            }
            if options.gpu_mem_limit_bytes:
                cuda["gpu_mem_limit"] = int(options.gpu_mem_limit_bytes)
            if options.cuda_copy_stream:
                cuda["do_copy_in_default_stream"] = 0
            if options.cuda_graph:
                cuda["enable_cuda_graph"] = 1
            entries.append((provider.value, cuda))
        elif provider is Provider.TENSORRT:
            if not tensorrt_loads():
                warn_once(
                    "TensorRT was requested but its libraries "
                    f"({', '.join(TENSORRT_LIBRARIES)}) cannot be loaded; skipping it"
                )
                continue
            entries.append((provider.value, tensorrt_options(options)))
        else:
            entries.append(provider.value)
    return entries


GPU_PROVIDERS = (Provider.TENSORRT, Provider.CUDA)
_PROVIDER_LIBRARIES = {
    Provider.CUDA: "libonnxruntime_providers_cuda.so",
    Provider.TENSORRT: "libonnxruntime_providers_tensorrt.so",
}
_preload_lock = threading.Lock()
_preloaded: list[str] = []  # what preload_dlls printed, once it ran in this process


def requires_gpu(options: SessionOptions) -> bool:
    """True when the providers name a GPU provider and not the CPU (``--providers cuda``):
    the caller asked for a GPU, and a CPU session is a failure, not a fallback."""
    return Provider.CPU not in options.providers and any(
        p in GPU_PROVIDERS for p in options.providers
    )


def preload_gpu_libraries() -> str:
    """Load the CUDA and cuDNN libraries that pip installed (``lipsync-ray[cuda]``: the
    ``nvidia-*`` wheels) into this process, once, before its first CUDA or TensorRT session.

    ONNX Runtime's provider libraries have no RUNPATH pointing into those wheels, so without
    this the dynamic loader finds no ``libcudart``/``libcublasLt`` and the session silently
    lands on the CPU. ``onnxruntime.preload_dlls`` (ONNX Runtime >= 1.21) does the loading;
    older builds rely on the system's libraries. Returns what it printed (the libraries it
    could not load), which is logged at debug level: the fallback check reports the reason.
    """
    import contextlib
    import io

    import onnxruntime as ort

    with _preload_lock:
        if _preloaded:
            return _preloaded[0]
        text = ""
        if hasattr(ort, "preload_dlls"):
            out = io.StringIO()
            try:
                with contextlib.redirect_stdout(out):
                    ort.preload_dlls()
            except Exception as exc:  # a bad directory or platform: the session decides
                out.write(f"preload_dlls failed: {exc}")
            text = out.getvalue().strip()
        if text:
            log.debug("onnxruntime.preload_dlls: %s", text.replace("\n", "; "))
        _preloaded.append(text)
        return text


def provider_library_error(provider: Provider) -> str | None:
    """Why this process cannot load ``provider``'s ONNX Runtime library, or None.

    Cheap and side-effect free on the device (no CUDA context is created): the driver can ask
    before any actor starts. Missing from this build, or a library its provider library needs
    that the dynamic loader cannot find (``libcublasLt.so.13: cannot open shared object
    file``), which is the usual reason a CUDA session lands on the CPU.
    """
    import ctypes

    import onnxruntime as ort

    available = ort.get_available_providers()
    if provider.value not in available:
        return (
            f"this onnxruntime build has no {provider.value} (available: "
            f"{', '.join(available)}; install onnxruntime-gpu, e.g. pip install "
            "'lipsync-ray[cuda]')"
        )
    preload_gpu_libraries()
    capi = Path(ort.__file__).parent / "capi"
    library = capi / _PROVIDER_LIBRARIES[provider]
    if not library.is_file():
        return None  # another layout (Windows, a custom build): let the session decide
    try:
        # ONNX Runtime loads this one first, globally: the provider library takes symbols
        # from it, so without it an unrelated "undefined symbol" would hide the real error.
        ctypes.CDLL(str(capi / "libonnxruntime_providers_shared.so"), mode=ctypes.RTLD_GLOBAL)
        ctypes.CDLL(str(library))
    except OSError as exc:
        if "cannot open shared object file" in str(exc):
            return f"{library.name} failed to load: {exc}"
    return None


def gpu_fallback_reason(provider: Provider, options: SessionOptions) -> str:
    """Why a session asked for ``provider`` landed on the CPU, in ONNX Runtime's own words
    (one line). Called after the fact, by an actor whose session did.

    The provider library's load error when there is one; otherwise a one-node probe model is
    opened with ``provider`` alone while this process's stderr is captured, because ONNX
    Runtime writes why a provider failed (no device, a driver older than its CUDA, cuDNN
    missing) through its default logger to stderr, not to the exception or the session.
    """
    reason = probe_provider(provider, options)
    return reason or f"{provider.value} works in a probe session but not with this model"


def probe_provider(provider: Provider, options: SessionOptions = SessionOptions()) -> str | None:
    """None when a one-node session runs on ``provider`` in this process, else why not, in
    ONNX Runtime's words (see :func:`gpu_fallback_reason`). On a GPU this creates a CUDA
    context: for actors and benchmarks, not for the driver of a render."""
    reason = provider_library_error(provider)
    if reason:
        return reason
    import onnxruntime as ort

    (entry,) = provider_entries(replace(options, providers=(provider,)), [provider.value])
    text, used = _captured(lambda: _probe_session(ort, entry))
    if used and used[0] == provider.value:
        return None
    lines = [_clean(line) for line in text.splitlines()]
    for pick in (
        lambda x: "[E:onnxruntime" in x,  # the C++ logger's errors: the library, the device
        lambda x: x.startswith("EP Error "),  # the Python fallback's exception text
        lambda x: "Failed to create" in x,
    ):
        found = [x for x in lines if pick(x)]
        if found:
            return _short(found[0])
    return f"{provider.value} could not be used (ONNX Runtime gave no reason)"


def _probe_session(ort, entry):
    """Open a one-node model with ``entry`` alone; the providers it got (or the error)."""
    import onnx
    from onnx import TensorProto, helper

    value = helper.make_tensor_value_info
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "probe",
        [value("x", TensorProto.FLOAT, [1])],
        [value("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = min(model.ir_version, onnx.IR_VERSION, 9)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        session = ort.InferenceSession(model.SerializeToString(), so, providers=[entry])
    except Exception as exc:
        print(f"EP Error {exc}")  # captured with the rest
        return []
    return list(session.get_providers())


def _captured(fn):
    """(stdout + stderr text written while ``fn`` ran, at the file-descriptor level, so that
    ONNX Runtime's C++ logger is caught too; ``fn``'s result). What was captured is written
    back to stderr afterwards: nothing is lost from the actor's log."""
    import contextlib
    import io
    import sys
    import tempfile

    out = io.StringIO()
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            with contextlib.redirect_stdout(out):
                result = fn()
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        tmp.seek(0)
        text = tmp.read().decode(errors="replace")
    text = f"{out.getvalue()}{text}"
    if text:
        sys.stderr.write(text)
    return text, result


def _clean(line: str) -> str:
    import re

    return re.sub(r"\x1b\[[0-9;]*m", "", line).strip()


def _short(line: str) -> str:
    """ONNX Runtime's error line without its timestamp, source location and C++ signature."""
    if "Failed to load library " in line:
        return "failed to load " + line.split("Failed to load library ", 1)[1].strip()
    for marker in ("FAIL : ", "EP Error "):
        if marker in line:
            line = line.split(marker, 1)[1]
    if ") " in line and line.startswith("/"):  # "/src/x.cc:729 void f(...) Message"
        line = line.split(") ", 1)[1]
    return line.strip()[:400]
