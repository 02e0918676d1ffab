"""ONNX Runtime inference: the audio encoder and the UNet-328 generator, opened from a model path.

::

    providers   Provider, SessionOptions: which execution providers to ask for, GPU shares,
                and why a GPU provider was not used (in ONNX Runtime's own words)
    graph       a model file and its ports, checked without a session: external data inside
                the model's directory, inputs found by shape, the generator's I/O contract
    trt         TensorRT: whether its libraries load, its provider options, the engine cache
    wrapper     the generator wrapped for uint8 I/O (the NumPy conversions moved into the graph)
    session     GeneratorSession, EncoderSession: the one factory every actor, benchmark and
                test uses

The names below are the ones the rest of the package uses; each module's own names are in its
``__all__``. Nothing here opens a session or loads ONNX Runtime at import time.
"""

from __future__ import annotations

from lipsync_ray.inference.graph import (
    check_encoder_model,
    check_generator_model,
    check_model_file,
)
from lipsync_ray.inference.providers import (
    CUDA_ARENA_SHARE,
    DEFAULT_PROVIDERS,
    GPU_PROVIDERS,
    Provider,
    SessionOptions,
    device_memory_bytes,
    gpu_fallback_reason,
    preload_gpu_libraries,
    probe_provider,
    provider_library_error,
    requires_gpu,
    with_gpu_share,
)
from lipsync_ray.inference.session import DeviceBuffers, EncoderSession, GeneratorSession

__all__ = [
    "CUDA_ARENA_SHARE",
    "DEFAULT_PROVIDERS",
    "GPU_PROVIDERS",
    "DeviceBuffers",
    "EncoderSession",
    "GeneratorSession",
    "Provider",
    "SessionOptions",
    "check_encoder_model",
    "check_generator_model",
    "check_model_file",
    "device_memory_bytes",
    "gpu_fallback_reason",
    "preload_gpu_libraries",
    "probe_provider",
    "provider_library_error",
    "requires_gpu",
    "with_gpu_share",
]
