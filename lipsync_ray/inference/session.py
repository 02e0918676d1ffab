"""Open sessions: the one factory every actor, benchmark and test uses.

A session is opened from a model *path* (never at import time), with:

- the providers of :mod:`.providers`, the one really running recorded
  (``GeneratorSession.providers``) so that the run report can say so;
- ONNX Runtime and OpenCV thread counts sized to the CPUs the caller was given (a Ray actor's
  ``num_cpus``), because oversubscription is the usual reason a CPU pipeline is slow;
- the checks of :mod:`.graph` at the door, and NaN or Inf in an output raising;
- models whose batch axis is fixed to 1 run batch by batch, transparently;
- the generator wrapped for uint8 I/O (:mod:`.wrapper`) and run through an I/O binding,
  TensorRT engines built once behind a lock (:mod:`.trt`).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from lipsync_ray.contract import (
    AUDIO_CHANNELS,
    AUDIO_SIZE,
    FEATURE_DIM,
    FRAME_SIZE,
    VISUAL_CHANNELS,
)
from lipsync_ray.errors import ModelError
from lipsync_ray.inference.graph import (
    check_generator_model,
    check_model_file,
    encoder_io,
    generator_io,
    graph_ports,
    load_checked,
    session_ports,
)
from lipsync_ray.inference.providers import (
    GPU_PROVIDERS,
    Provider,
    preload_gpu_libraries,
    provider_entries,
    warn_once,
)
from lipsync_ray.inference.trt import (
    default_trt_root,
    engine_build_lock,
    file_key,
    tensorrt_loads,
)
from lipsync_ray.inference.wrapper import wrap_generator
from lipsync_ray.options import SessionOptions

__all__ = ["DeviceBuffers", "EncoderSession", "GeneratorSession"]

# Per-sample shapes of the generator's inputs: the prepared visual input as stored (channels
# last) and as the model takes it (channels first); the audio window.
_VISUAL_NHWC = (FRAME_SIZE, FRAME_SIZE, VISUAL_CHANNELS)
_VISUAL_NCHW = (VISUAL_CHANNELS, FRAME_SIZE, FRAME_SIZE)
_AUDIO_SHAPE = (AUDIO_CHANNELS, AUDIO_SIZE, AUDIO_SIZE)


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
    entries = provider_entries(options, ort.get_available_providers())
    wanted = [e if isinstance(e, str) else e[0] for e in entries]
    while True:
        try:
            session = ort.InferenceSession(str(path), sess_options=so, providers=entries)
            break
        except Exception as exc:
            if len(entries) > 1:
                # TensorRT raises instead of falling back when its libraries are missing.
                first = entries.pop(0)
                warn_once(f"{first if isinstance(first, str) else first[0]} failed: {exc}")
                continue
            raise ModelError(f"ONNX Runtime cannot load the model: {exc}", path=path) from exc
    used = list(session.get_providers())
    if used and wanted and used[0] != wanted[0]:
        warn_once(
            f"{wanted[0]} was requested but could not be used (no usable device or library); "
            f"running on {used[0]} instead"
        )
    return session, used, threads


class GeneratorSession:
    """An open UNet-328 generator.

    With ``SessionOptions.graph_io`` (the default) the session runs the model wrapped for uint8
    I/O (:mod:`.wrapper`): :meth:`predict` hands it the prepared uint8 inputs and
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
            try:
                self._wrapped = wrap_generator(self.path, options.graph_cache_dir)
            except ModelError as exc:
                warn_once(f"uint8 graph I/O is off for {self.path.name}, NumPy converts: {exc}")
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
            inputs = ((w.visual, _VISUAL_NHWC), (w.audio, _AUDIO_SHAPE))
            fixed = w.fixed_batch
        else:
            io = generator_io(*graph_ports(load_checked(model)[1]), model)
            inputs = (
                (io.visual, _VISUAL_NCHW),
                (io.audio, _AUDIO_SHAPE),
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
        visual = np.zeros((batch, *_VISUAL_NHWC), np.uint8)
        audio = np.zeros((batch, *_AUDIO_SHAPE), np.float32)
        with contextlib.suppress(ModelError):  # a non-finite warm-up output still built it
            if self._wrapped is not None:
                self.predict(visual, audio)
            else:
                self.run(visual, audio)

    def _plain_spec(self, session):
        io = generator_io(
            session_ports(session.get_inputs()), session_ports(session.get_outputs()), self.path
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
            # OpenCV (heavy) comes with composite: loaded only where a model runs unwrapped
            from lipsync_ray.composite import prediction_to_uint8

            pred = prediction_to_uint8(self.run(visual, audio))
            if out is None:
                return pred
            out[...] = pred
            return out
        if visual.dtype != np.uint8 or visual.shape[1:] != _VISUAL_NHWC:
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
        if audio.dtype != np.float32 or audio.shape[1:] != _AUDIO_SHAPE:
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
    if visual.dtype == np.uint8 and visual.ndim == 4 and visual.shape[1:] == _VISUAL_NHWC:
        # Same arithmetic as the reference (float division by 255), channels first.
        out = np.empty((visual.shape[0], *_VISUAL_NCHW), dtype=np.float32)
        np.divide(visual.transpose(0, 3, 1, 2), np.float32(255.0), out=out)
        return out
    if visual.dtype == np.float32 and visual.ndim == 4 and visual.shape[1:] == _VISUAL_NCHW:
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
        self._input, self._output, self.fixed_batch = encoder_io(
            session_ports(self._session.get_inputs()),
            session_ports(self._session.get_outputs()),
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
