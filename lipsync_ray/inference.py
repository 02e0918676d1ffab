"""ONNX Runtime sessions: the one factory every actor, benchmark and test uses.

(Over 700 lines on purpose: provider selection, the CPU-fallback diagnosis and the I/O binding
of :class:`GeneratorSession` act on the same session and options; one module keeps the one
factory in one place.)

A session is opened from a model *path* (never at import time), with:

- providers tried in order TensorRT → CUDA → CPU (configurable). A provider that is asked for
  but cannot be used is reported once, loudly, and the provider that really runs is recorded
  (``GeneratorSession.providers``) so that the run report can say so;
- ONNX Runtime and OpenCV thread counts sized to the CPUs the caller was given (a Ray actor's
  ``num_cpus``), because oversubscription is the usual reason a CPU pipeline is slow;
- inputs found by shape, not by name: exports call them ``input``/``audio`` or
  ``visual_input``/``audio_input`` and others; the visual input has 6 channels, the audio 32;
- models whose batch axis is fixed to 1 run batch by batch, transparently;
- checks at the door: external data must stay inside the model's directory, dtypes and shapes
  are compared against what the generator needs, and NaN or Inf in an output raises.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import math
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from lipsync_ray.contract import (
    AUDIO_CHANNELS,
    FEATURE_DIM,
    FRAME_SIZE,
    MEL_SHAPE,
    VISUAL_CHANNELS,
)
from lipsync_ray.errors import ModelError
from lipsync_ray.trt import (
    TENSORRT_LIBRARIES,
    default_trt_root,
    engine_build_lock,
    file_key,
    tensorrt_loads,
    tensorrt_options,
)

__all__ = [
    "DeviceBuffers",
    "EncoderSession",
    "GeneratorSession",
    "Provider",
    "SessionOptions",
    "check_encoder_model",
    "check_generator_model",
    "check_model_file",
]

log = logging.getLogger(__name__)

# VISUAL_CHANNELS, AUDIO_CHANNELS, FRAME_SIZE, MEL_SHAPE, FEATURE_DIM: lipsync_ray.contract


class Provider(enum.Enum):
    """ONNX Runtime execution providers lipsync-ray knows how to configure."""

    TENSORRT = "TensorrtExecutionProvider"
    CUDA = "CUDAExecutionProvider"
    CPU = "CPUExecutionProvider"


DEFAULT_PROVIDERS = (Provider.TENSORRT, Provider.CUDA, Provider.CPU)


@dataclass(frozen=True)
class SessionOptions:
    """How to open an ONNX Runtime session. Built once on the driver, passed to actors."""

    # Providers to try, best first. CPU is always appended last if missing.
    providers: tuple[Provider, ...] = DEFAULT_PROVIDERS
    # CUDA device ordinal, relative to the devices visible to this process (Ray sets
    # CUDA_VISIBLE_DEVICES for an actor, so 0 is "the GPU Ray gave me").
    device_id: int = 0
    # Upper bound of the CUDA memory arena in bytes. None: an actor with a fractional GPU
    # limits it to CUDA_ARENA_SHARE of its share of the card (see with_gpu_share), so
    # co-located actors cannot starve each other; a whole GPU is not limited.
    gpu_mem_limit_bytes: int | None = None
    # Intra-op threads for the CPU provider (0: one per CPU given to the caller).
    intra_op_threads: int = 0
    # TensorRT: FP16 kernels and the directory where built engines are cached (building one
    # takes minutes; the cache makes every later start fast).
    trt_fp16: bool = False
    # Engines and the timing cache go to ``<trt_cache_dir>/<model hash>/`` (None:
    # ``<model's directory>/.cache/tensorrt``); one actor builds behind a file lock, the others
    # wait and load what it built.
    trt_cache_dir: str | None = None
    # The largest batch a session runs (the actor's batch size): TensorRT gets one optimisation
    # profile with batch 1..trt_max_batch, so a partial last batch or an odd-sized
    # silence-passthrough batch reuses the engine. 0: TensorRT's implicit profile.
    trt_max_batch: int = 0
    # (input name, per-sample dims) of the model being opened, for the profile shapes; filled
    # in by GeneratorSession (the wrapper's inputs), not a user setting.
    trt_inputs: tuple[tuple[str, tuple[int, ...]], ...] = ()
    graph_optimization: bool = True
    # Run the generator through an IO binding: ONNX Runtime writes its output straight into a
    # NumPy array allocated here (copied from the device once, on CUDA/TensorRT) instead of
    # allocating its own and handing it back through Python.
    io_binding: bool = True
    # Run the generator wrapped for uint8 I/O (``lipsync_ray.wrapper``): the uint8 -> float,
    # x255, clip and transposes run inside the graph (on the device), a quarter of the bytes
    # cross PCIe and no NumPy pass runs per call. Off: the model as given, with the same
    # conversions in NumPy around it (the output is bit-identical on the CPU provider).
    graph_io: bool = True
    # Where the wrapped models are kept (None: ``wrapper.default_wrapper_dir``, next to the
    # model).
    graph_cache_dir: str | None = None
    # CUDA/TensorRT: inputs go through device buffers kept from call to call (one allocation
    # per batch size, not one per call). Ignored on the CPU provider, which reads the arrays
    # where they are.
    device_buffers: bool = True
    # CUDA: copies on their own streams (``do_copy_in_default_stream=0``). ONNX Runtime warns
    # this may race for some models, so it is off unless asked for.
    cuda_copy_stream: bool = False
    # CUDA: capture the graph once and replay it (``enable_cuda_graph``). Needs one fixed input
    # shape (every batch full, and no silence passthrough) and device-bound outputs.
    cuda_graph: bool = False


_warned: set[str] = set()
_warn_lock = threading.Lock()


def _warn_once(message: str) -> None:
    with _warn_lock:
        if message in _warned:
            return
        _warned.add(message)
    log.warning(message)


def check_model_file(path: str | Path) -> Path:
    """Check that a model file exists and that its external data stays inside its directory.

    Raises:
        ModelError: missing or unreadable file, not an ONNX model, or an external-data location
            that is absolute, climbs out with ``..`` or is a symlink pointing outside.
    """
    return _load_checked(path)[0]


def check_generator_model(path: str | Path) -> Path:
    """:func:`check_model_file`, then the generator's inputs and output as the graph declares
    them: the same rules :class:`GeneratorSession` applies, without opening a session (cheap
    enough to validate a render before any actor starts).

    Raises:
        ModelError: as :func:`check_model_file`, or inputs/outputs the generator cannot have.
    """
    path, model = _load_checked(path)
    _generator_io(*_graph_ports(model), path)
    return path


def check_encoder_model(path: str | Path) -> Path:
    """:func:`check_model_file`, then the audio encoder's input (and output, when declared)."""
    path, model = _load_checked(path)
    _encoder_io(*_graph_ports(model), path)
    return path


def _load_checked(path: str | Path):
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
    for tensor in _all_tensors(model):
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


def _all_tensors(model):
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
        _warn_once(
            f"GPU {device}: its memory size is unknown (no nvidia-smi), so the CUDA arena of "
            f"actors holding {share:g} of it is not limited; set --gpu-mem-limit"
        )
        return options
    return replace(options, gpu_mem_limit_bytes=int(total * share * CUDA_ARENA_SHARE))


def _provider_entries(options: SessionOptions, available: Sequence[str]) -> list:
    entries: list = []
    for provider in (*options.providers, Provider.CPU):
        if provider.value in (e if isinstance(e, str) else e[0] for e in entries):
            continue
        if provider.value not in available:
            if provider is not Provider.CPU:
                _warn_once(
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
                _warn_once(
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

    (entry,) = _provider_entries(replace(options, providers=(provider,)), [provider.value])
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


def _open(path: Path, options: SessionOptions, cpus: int):
    import cv2
    import onnxruntime as ort

    if any(p in GPU_PROVIDERS for p in options.providers):
        preload_gpu_libraries()  # before the first CUDA or TensorRT session of this process
    threads = options.intra_op_threads or max(1, int(cpus))
    cv2.setNumThreads(threads)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Idle intra-op threads sleep instead of spinning: in a render they share the CPUs with the
    # compositors, and spinning threads burn what compositing needs.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if options.graph_optimization
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    # Providers that fail to load (no CUDA or TensorRT libraries on this machine) log errors
    # through ONNX Runtime's default logger; we report the fallback ourselves, once, below.
    so.log_severity_level = 3
    ort.set_default_logger_severity(3)
    entries = _provider_entries(options, ort.get_available_providers())
    wanted = [e if isinstance(e, str) else e[0] for e in entries]
    while True:
        try:
            session = ort.InferenceSession(str(path), sess_options=so, providers=entries)
            break
        except Exception as exc:
            if len(entries) > 1:
                # TensorRT raises instead of falling back when its libraries are missing.
                first = entries.pop(0)
                _warn_once(f"{first if isinstance(first, str) else first[0]} failed: {exc}")
                continue
            raise ModelError(f"ONNX Runtime cannot load the model: {exc}", path=path) from exc
    used = list(session.get_providers())
    if used and wanted and used[0] != wanted[0]:
        _warn_once(
            f"{wanted[0]} was requested but could not be used (no usable device or library); "
            f"running on {used[0]} instead"
        )
    return session, used, threads


@dataclass(frozen=True)
class _Port:
    """A model input or output: its name, ONNX Runtime type string (``tensor(float)``) and
    dims (int, symbolic name or None each; ``None`` for the whole when the rank is unknown)."""

    name: str
    type: str
    dims: tuple | None


def _session_ports(items) -> list[_Port]:
    return [_Port(i.name, i.type, tuple(i.shape) if i.shape is not None else None) for i in items]


def _graph_ports(model) -> tuple[list[_Port], list[_Port]]:
    """(inputs, outputs) as the graph declares them; initializers listed as inputs (IR < 4)
    are not inputs, as in ONNX Runtime."""
    import onnx

    def port(value_info) -> _Port:
        if not value_info.type.HasField("tensor_type"):
            return _Port(value_info.name, "non-tensor", None)
        tt = value_info.type.tensor_type
        type_ = f"tensor({onnx.TensorProto.DataType.Name(tt.elem_type).lower()})"
        if not tt.HasField("shape"):
            return _Port(value_info.name, type_, None)
        dims = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim
        )
        return _Port(value_info.name, type_, dims)

    initializers = {t.name for t in model.graph.initializer}
    inputs = [port(i) for i in model.graph.input if i.name not in initializers]
    return inputs, [port(o) for o in model.graph.output]


@dataclass
class _IOSpec:
    visual: str
    audio: str
    output: str
    fixed_batch: bool


def _describe(ports: Sequence[_Port]) -> str:
    return ", ".join(
        f"{p.name} {p.type} {list(p.dims) if p.dims is not None else '[?]'}" for p in ports
    )


def _generator_io(inputs: Sequence[_Port], outputs: Sequence[_Port], path: Path) -> _IOSpec:
    """Find the visual and audio inputs by shape and check the generator's I/O contract."""
    by_channels: dict[object, list[_Port]] = {}
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
    for item, expected in ((visual[0], FRAME_SIZE), (audio[0], 16)):
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
        isinstance(d, int) and d != e for d, e in zip(out_dims[1:], (3, 320, 320), strict=False)
    ):
        raise ModelError(f"generator output must be [B,3,320,320], got {out_dims}", path=path)
    batch_dims = {visual[0].dims[0], audio[0].dims[0]}
    fixed = any(isinstance(d, int) for d in batch_dims)
    if fixed and batch_dims != {1}:
        raise ModelError(
            f"a fixed batch axis must be 1 on both inputs, got {sorted(map(str, batch_dims))}",
            path=path,
        )
    return _IOSpec(visual[0].name, audio[0].name, outputs[0].name, fixed)


def _encoder_io(
    inputs: Sequence[_Port], outputs: Sequence[_Port], path: Path
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


class GeneratorSession:
    """An open UNet-328 generator.

    With ``SessionOptions.graph_io`` (the default) the session runs the model wrapped for uint8
    I/O (:mod:`lipsync_ray.wrapper`): :meth:`predict` hands it the prepared uint8 inputs and
    gets uint8 predictions back. :meth:`run` (float32 out) then opens the model as given on
    first use. Without it, :meth:`predict` is :meth:`run` followed by ``prediction_to_uint8``.

    Attributes:
        path: the model file.
        providers: providers ONNX Runtime actually uses, best first.
        threads: intra-op threads.
        fixed_batch: True when the model's batch axis is fixed to 1 (run frame by frame).
        graph_io: True when :meth:`predict` runs the uint8 wrapper.
    """

    def __init__(
        self, path: str | Path, options: SessionOptions = SessionOptions(), *, cpus: int = 1
    ) -> None:
        self.path = check_model_file(path)
        self._options, self._cpus = options, cpus
        self._wrapped = None
        if options.graph_io:
            check_generator_model(self.path)  # a bad model fails as it does without the wrapper
            from lipsync_ray.wrapper import wrap_generator

            try:
                self._wrapped = wrap_generator(self.path, options.graph_cache_dir)
            except ModelError as exc:
                _warn_once(f"uint8 graph I/O is off for {self.path.name}, NumPy converts: {exc}")
        self.graph_io = self._wrapped is not None
        self._plain = None  # (session, io spec, output declared) of the model as given
        self._io_binding = options.io_binding
        self._buffers = None
        model = self.path if self._wrapped is None else self._wrapped.path
        open_options, engine_dir = self._tensorrt_options(options, model)
        started = time.perf_counter()
        with engine_build_lock(engine_dir) if engine_dir else contextlib.nullcontext():
            self._session, self.providers, self.threads = _open(model, open_options, cpus)
            if self._wrapped is None:
                self._plain = self._plain_spec(self._session)
                self.fixed_batch, self._out_declared = self._plain[1].fixed_batch, self._plain[2]
            else:
                self.fixed_batch = self._wrapped.fixed_batch
                dims = self._session.get_outputs()[0].shape
                self._out_declared = len(dims) == 4 and list(dims[1:]) == [
                    FRAME_SIZE,
                    FRAME_SIZE,
                    3,
                ]
            gpu = bool(self.providers) and self.providers[0] != Provider.CPU.value
            if gpu and options.device_buffers:
                self._buffers = DeviceBuffers("cuda", options.device_id, outputs=options.cuda_graph)
            if engine_dir and self.providers[0] == Provider.TENSORRT.value:
                # The engine is built on the first run: do it now, inside the lock, at the
                # profile's largest batch, so the actors waiting for the lock load it.
                self._warm_up(max(1, open_options.trt_max_batch))
        # Seconds to open the session: a TensorRT engine build (or its cache load) included.
        self.session_open_s = time.perf_counter() - started

    def _tensorrt_options(
        self, options: SessionOptions, model: Path
    ) -> tuple[SessionOptions, Path | None]:
        """``options`` with the TensorRT engine directory (``<cache>/<model hash>``) and batch
        profile filled in, and that directory; unchanged and None when TensorRT is not tried."""
        if Provider.TENSORRT not in options.providers or not tensorrt_loads():
            return options, None
        import onnxruntime as ort

        if Provider.TENSORRT.value not in ort.get_available_providers():
            return options, None
        if self._wrapped is not None:
            w = self._wrapped
            inputs = ((w.visual, (FRAME_SIZE, FRAME_SIZE, 6)), (w.audio, (AUDIO_CHANNELS, 16, 16)))
            fixed = w.fixed_batch
        else:
            io = _generator_io(*_graph_ports(_load_checked(model)[1]), model)
            inputs = (
                (io.visual, (6, FRAME_SIZE, FRAME_SIZE)),
                (io.audio, (AUDIO_CHANNELS, 16, 16)),
            )
            fixed = io.fixed_batch
        root = Path(options.trt_cache_dir) if options.trt_cache_dir else default_trt_root(self.path)
        engine_dir = root / file_key(model)
        max_batch = 1 if fixed else options.trt_max_batch
        opened = replace(
            options, trt_cache_dir=str(engine_dir), trt_inputs=inputs, trt_max_batch=max_batch
        )
        return opened, engine_dir

    def _warm_up(self, batch: int) -> None:
        visual = np.zeros((batch, FRAME_SIZE, FRAME_SIZE, 6), np.uint8)
        audio = np.zeros((batch, AUDIO_CHANNELS, 16, 16), np.float32)
        with contextlib.suppress(ModelError):  # a non-finite warm-up output still built it
            if self._wrapped is not None:
                self.predict(visual, audio)
            else:
                self.run(visual, audio)

    def _plain_spec(self, session):
        io = _generator_io(
            _session_ports(session.get_inputs()), _session_ports(session.get_outputs()), self.path
        )
        # The output buffer can be made in advance only when the graph declares its shape.
        dims = session.get_outputs()[0].shape
        declared = len(dims) == 4 and list(dims[1:]) == [3, FRAME_SIZE, FRAME_SIZE]
        return session, io, declared

    def _plain_session(self):
        if self._plain is None:
            session, _, _ = _open(self.path, self._options, self._cpus)
            self._plain = self._plain_spec(session)
        return self._plain

    @property
    def input_names(self) -> tuple[str, str]:
        """(visual, audio) input names as found in the model."""
        _, io, _ = self._plain_session()
        return io.visual, io.audio

    def run(self, visual: np.ndarray, audio: np.ndarray) -> np.ndarray:
        """Run the generator on a batch.

        Args:
            visual: uint8 (B, 320, 320, 6) BGR ROI + masked ROI (channels last, as stored in
                the avatar bundle), or float32 (B, 6, 320, 320) already in [0, 1].
            audio: float32 (B, 32, 16, 16) audio windows.

        Returns:
            float32 (B, 3, 320, 320) in [0, 1], BGR.

        Raises:
            ModelError: shapes or dtypes other than the above, or a non-finite output.
        """
        x = _visual_tensor(visual)
        self._check_audio(audio, x.shape[0])
        if self.fixed_batch and x.shape[0] != 1:
            out = np.concatenate([self._run(x[i : i + 1], audio[i : i + 1]) for i in range(len(x))])
        else:
            out = self._run(x, audio)
        if out.shape != (x.shape[0], 3, FRAME_SIZE, FRAME_SIZE):
            raise ModelError(
                f"generator output must be (B, 3, 320, 320), got {out.shape}", path=self.path
            )
        if not np.isfinite(out).all():
            raise ModelError("generator produced NaN or Inf values", path=self.path)
        return out

    def predict(
        self, visual: np.ndarray, audio: np.ndarray, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Run the generator on a batch, uint8 in and out: exactly
        ``prediction_to_uint8(self.run(visual, audio))``.

        Args:
            visual: uint8 (B, 320, 320, 6) BGR ROI + masked ROI (not modified).
            audio: float32 (B, 32, 16, 16) audio windows (not modified).
            out: where to write, uint8 (B, 320, 320, 3) C-contiguous; None: a new array.

        Returns:
            ``out`` (or a new array): uint8 (B, 320, 320, 3) BGR predictions.

        Raises:
            ModelError: shapes or dtypes other than the above, or a non-finite output.
        """
        n = visual.shape[0] if visual.ndim == 4 else -1
        shape = (n, FRAME_SIZE, FRAME_SIZE, 3)
        if out is not None and (
            out.dtype != np.uint8 or out.shape != shape or not out.flags.c_contiguous
        ):
            raise ModelError(
                f"prediction buffer must be C-contiguous uint8 {shape}, got {out.dtype} {out.shape}"
            )
        if self._wrapped is None:
            from lipsync_ray.composite import prediction_to_uint8

            pred = prediction_to_uint8(self.run(visual, audio))
            if out is None:
                return pred
            out[...] = pred
            return out
        if visual.dtype != np.uint8 or visual.shape[1:] != (FRAME_SIZE, FRAME_SIZE, 6):
            raise ModelError(
                f"visual batch must be uint8 (B, 320, 320, 6), got {visual.dtype} {visual.shape}"
            )
        self._check_audio(audio, n)
        visual, audio = np.ascontiguousarray(visual), np.ascontiguousarray(audio)
        out = np.empty(shape, np.uint8) if out is None else out
        if self.fixed_batch and n != 1:
            for i in range(n):
                self._run_u8(visual[i : i + 1], audio[i : i + 1], out[i : i + 1])
        else:
            self._run_u8(visual, audio, out)
        return out

    def _check_audio(self, audio: np.ndarray, batch: int) -> None:
        if audio.dtype != np.float32 or audio.shape[1:] != (AUDIO_CHANNELS, 16, 16):
            raise ModelError(
                f"audio batch must be float32 (B, 32, 16, 16), got {audio.dtype} {audio.shape}",
                path=self.path,
            )
        if audio.shape[0] != batch:
            raise ModelError(
                f"visual and audio batches differ: {batch} vs {audio.shape[0]}", path=self.path
            )

    def _run_u8(self, visual: np.ndarray, audio: np.ndarray, out: np.ndarray) -> None:
        """One call of the wrapper; writes ``out`` and checks the in-graph finite flag."""
        w = self._wrapped
        if not self._io_binding:
            image, finite = self._session.run(
                [w.image, w.finite], {w.visual: visual, w.audio: audio}
            )
        else:
            binding = self._session.io_binding()
            if self._buffers is not None:
                self._buffers.bind_input(binding, w.visual, visual)
                self._buffers.bind_input(binding, w.audio, audio)
            else:
                # Host memory, read in place by the CPU provider.
                binding.bind_cpu_input(w.visual, visual)
                binding.bind_cpu_input(w.audio, audio)
            direct = self._out_declared and (self._buffers is None or not self._buffers.outputs)
            if direct:
                binding.bind_output(w.image, "cpu", 0, np.uint8, out.shape, out.ctypes.data)
            elif self._buffers is not None and self._buffers.outputs:
                self._buffers.bind_output(binding, w.image, out.shape, np.uint8)
            else:
                binding.bind_output(w.image, "cpu")
            if self._buffers is not None and self._buffers.outputs:
                self._buffers.bind_output(binding, w.finite, (), np.bool_)
            else:
                binding.bind_output(w.finite, "cpu")
            self._session.run_with_iobinding(binding)
            values = binding.get_outputs()
            image = None if direct else values[0].numpy()
            finite = values[1].numpy()
        if image is not None:
            if image.shape != out.shape:
                got = (image.shape[0], image.shape[3], *image.shape[1:3]) if image.ndim == 4 else ()
                raise ModelError(
                    f"generator output must be (B, 3, 320, 320), got {got or image.shape}",
                    path=self.path,
                )
            out[...] = image
        if not bool(finite):
            raise ModelError("generator produced NaN or Inf values", path=self.path)

    def _run(self, x: np.ndarray, audio: np.ndarray) -> np.ndarray:
        session, io, declared = self._plain_session()
        audio = np.ascontiguousarray(audio)
        if not self._io_binding:
            feeds = {io.visual: x, io.audio: audio}
            return session.run([io.output], feeds)[0]
        # Inputs are bound where they are (host memory; the provider copies them to its device
        # once) and the output is written into ``out`` directly.
        binding = session.io_binding()
        binding.bind_cpu_input(io.visual, x)
        binding.bind_cpu_input(io.audio, audio)
        if not declared:
            binding.bind_output(io.output, "cpu")
            session.run_with_iobinding(binding)
            return binding.copy_outputs_to_cpu()[0]
        out = np.empty((x.shape[0], 3, FRAME_SIZE, FRAME_SIZE), np.float32)
        binding.bind_output(io.output, "cpu", 0, np.float32, out.shape, out.ctypes.data)
        session.run_with_iobinding(binding)
        return out


class DeviceBuffers:
    """Input (and, for CUDA graphs, output) tensors on one device, kept from call to call.

    ``bind_input`` copies a host array into the buffer of that name and shape (made on first
    use, or when the batch size changes) and binds it; ONNX Runtime then reads device memory
    instead of copying from pageable host memory inside the run. With ``outputs`` the outputs
    are bound to device buffers too (CUDA graphs replay fixed addresses) and read back after
    the run. ``device`` is ``"cuda"`` in a session, ``"cpu"`` in the unit tests.
    """

    def __init__(self, device: str, device_id: int = 0, *, outputs: bool = False) -> None:
        self.device, self.device_id, self.outputs = device, device_id, outputs
        self._values: dict[str, object] = {}
        self.allocations = 0  # buffers made so far (tests: reuse across calls)

    def _buffer(self, name: str, shape: tuple, dtype) -> object:
        import onnxruntime as ort

        value = self._values.get(name)
        if value is None or tuple(value.shape()) != tuple(shape):
            value = ort.OrtValue.ortvalue_from_shape_and_type(
                list(shape), dtype, self.device, self.device_id
            )
            self._values[name] = value
            self.allocations += 1
        return value

    def bind_input(self, binding, name: str, array: np.ndarray) -> None:
        value = self._buffer(name, array.shape, array.dtype)
        value.update_inplace(np.ascontiguousarray(array))
        binding.bind_ortvalue_input(name, value)

    def bind_output(self, binding, name: str, shape: tuple, dtype) -> None:
        binding.bind_ortvalue_output(name, self._buffer(name, shape, dtype))


def _visual_tensor(visual: np.ndarray) -> np.ndarray:
    if visual.dtype == np.uint8 and visual.ndim == 4 and visual.shape[1:] == (320, 320, 6):
        # Same arithmetic as the reference (float division by 255), channels first.
        out = np.empty((visual.shape[0], 6, FRAME_SIZE, FRAME_SIZE), dtype=np.float32)
        np.divide(visual.transpose(0, 3, 1, 2), np.float32(255.0), out=out)
        return out
    if visual.dtype == np.float32 and visual.ndim == 4 and visual.shape[1:] == (6, 320, 320):
        return np.ascontiguousarray(visual)
    raise ModelError(
        "visual batch must be uint8 (B, 320, 320, 6) or float32 (B, 6, 320, 320), "
        f"got {visual.dtype} {visual.shape}"
    )


@dataclass
class EncoderSession:
    """An open audio encoder: float32 (B, 1, 80, 16) mel windows → float32 (B, 512)."""

    path: Path
    options: SessionOptions = field(default_factory=SessionOptions)
    cpus: int = 1

    def __post_init__(self) -> None:
        self.path = check_model_file(self.path)
        self._session, self.providers, self.threads = _open(self.path, self.options, self.cpus)
        self._input, self._output, self.fixed_batch = _encoder_io(
            _session_ports(self._session.get_inputs()),
            _session_ports(self._session.get_outputs()),
            self.path,
        )

    def __call__(self, windows: np.ndarray) -> np.ndarray:
        """Encode mel windows float32 (B, 1, 80, 16) into features float32 (B, 512)."""
        windows = np.ascontiguousarray(windows, dtype=np.float32)
        if self.fixed_batch:
            parts = [self._session.run([self._output], {self._input: w[None]})[0] for w in windows]
            out = np.concatenate(parts) if parts else np.zeros((0, FEATURE_DIM), np.float32)
        else:
            out = self._session.run([self._output], {self._input: windows})[0]
        out = out.reshape(len(windows), -1)
        if out.shape[1] != FEATURE_DIM:
            raise ModelError(
                f"audio encoder output must be [B,512], got {list(out.shape)}", path=self.path
            )
        if not np.isfinite(out).all():
            raise ModelError("audio encoder produced NaN or Inf values", path=self.path)
        return out.astype(np.float32, copy=False)
