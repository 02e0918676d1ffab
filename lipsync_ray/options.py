"""Option values of the stages whose modules load heavy libraries, importable without them.

``RenderConfig`` (``config.py``) is built from these, so ``from lipsync_ray import
RenderConfig`` loads neither OpenCV, PyAV, pyarrow nor ONNX. Each stage re-exports its own
(``composite.BlendOptions``, ``encode.EncodeOptions``, ``shards.ShardCodec``,
``precision.Precision``, ``inference.SessionOptions``); ``vad``, a light module (NumPy only),
keeps its ``SilenceOptions``. ``BlendOptions`` and ``EncodeOptions`` are validated on
construction (``InputError``).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from lipsync_ray.errors import InputError

__all__ = [
    "DEFAULT_FEATHER",
    "DEFAULT_PROVIDERS",
    "DEFAULT_X264_PARAMS",
    "NVENC_PRESETS",
    "NVENC_SESSIONS_GEFORCE",
    "X264_PARAM_KEYS",
    "X264_PRESETS",
    "Blend",
    "BlendOptions",
    "EncodeOptions",
    "Precision",
    "Provider",
    "SessionOptions",
    "ShardCodec",
    "VideoCodec",
    "parse_x264_params",
]

# --------------------------------------------------------------------------- composite

# Feather ramp width as a fraction of the box's shorter side: 0.1 is 22 px on a 220 px box, wide
# enough that an imperfect generator's colour or texture difference fades over many pixels, and
# narrow enough to leave the central 80 % (mouth, jaw) fully generated. Chosen by looking at
# docs/blend.png (scripts/blend_figure.py) and at seams.measure_seam on its "nearly right"
# patch: 1.81 hard, 1.53 / 1.24 / 1.13 / 1.12 at 0.03 / 0.05 / 0.1 / 0.2, untouched photo 1.11;
# at 0.05 the box edge is still faintly visible, from 0.1 on it is not.
DEFAULT_FEATHER = 0.1


class Blend(enum.Enum):
    """How a prediction is pasted back into its frame."""

    HARD = "hard"  # the reference paste: the whole box replaced (composite_frame)
    FEATHER = "feather"  # the hard paste mixed into the frame with feather_mask


@dataclass(frozen=True)
class BlendOptions:
    """Paste settings, built once on the driver and passed to compositors."""

    mode: Blend = Blend.FEATHER
    # feather ramp width / shorter box side, in (0, 0.5]; unused by Blend.HARD
    feather: float = DEFAULT_FEATHER

    def __post_init__(self) -> None:
        if not isinstance(self.mode, Blend):
            try:
                object.__setattr__(self, "mode", Blend(self.mode))
            except ValueError:
                raise InputError(
                    f"blend mode must be one of {[b.value for b in Blend]}, got {self.mode!r}"
                ) from None
        f = self.feather
        if isinstance(f, bool) or not isinstance(f, int | float) or not 0 < f <= 0.5:
            raise InputError(f"feather must be a number in (0, 0.5], got {f!r}")


# --------------------------------------------------------------------------- encode

# Concurrent NVENC sessions per machine. GeForce drivers cap them for the whole system, all
# cards together (2, then 3, 5 from March 2023, 8 from the January 2024 drivers); data-centre
# and RTX professional cards have no such cap, so 8 is safe everywhere NVENC exists.
NVENC_SESSIONS_GEFORCE = 8

# x264 preset names, each with the step of NVENC's ladder p1 (fastest) .. p7 (best) it maps to.
NVENC_PRESETS = {
    "ultrafast": "p1",
    "superfast": "p1",
    "veryfast": "p2",
    "faster": "p3",
    "fast": "p4",
    "medium": "p4",
    "slow": "p5",
    "slower": "p6",
    "veryslow": "p7",
}
X264_PRESETS = tuple(NVENC_PRESETS)


# x264 options (``key=value:key=value``, FFmpeg's ``x264-params``) a render may set on top of
# its preset: the motion search, partitions, references, lookahead, adaptive quantisation and
# B-frame choices that trade CPU against size and quality. Each key has its kind of value:
# a range of ints, a set of words, 0/1 or a range of numbers. What is left out is left out on
# purpose: rate control (``--crf`` sets it), the preset and threads (their own flags or the
# pipeline's choice), key frames and GOP (``keyint``, ``scenecut``, ``open-gop``: segments must
# start with an IDR frame and share their SPS/PPS to be joined), and anything that changes the
# stream's format (profile, colour, interlacing, output files).
_ME_METHODS = ("dia", "hex", "umh")
_PARTITIONS = ("none", "all", "i4x4", "i8x8", "p8x8", "p4x4", "b8x8")
X264_PARAM_KEYS: dict[str, tuple] = {
    "me": ("word", _ME_METHODS),
    "subme": ("int", 0, 11),
    "partitions": ("words", _PARTITIONS),
    "ref": ("int", 1, 16),
    "trellis": ("int", 0, 2),
    "mbtree": ("bool",),
    "rc-lookahead": ("int", 0, 250),
    "aq-mode": ("int", 0, 3),
    "aq-strength": ("number", 0.0, 3.0),
    "bframes": ("int", 0, 16),
    "b-adapt": ("int", 0, 2),
    "weightp": ("int", 0, 2),
    "weightb": ("bool",),
    "mixed-refs": ("bool",),
    "8x8dct": ("bool",),
    "fast-pskip": ("bool",),
    "dct-decimate": ("bool",),
    "merange": ("int", 4, 64),
}
# Letters, digits, '-', ',' and '.' in keys and values, ':' and '=' between them: no quotes,
# backslashes or spaces that FFmpeg's option parser would read as escapes, so the text cannot
# carry an option outside the allow-list.
_X264_PARAMS_CHARS = re.compile(r"[a-z0-9=:,.\-]*")

# The render's x264 options on top of its preset, chosen by `lipsync-ray bench encode --table`
# on the photographed footage (README, "Benchmarks"; 2026-12-05, 128 frames of 1280x720, CRF
# 20, one thread): the cheapest setting whose bit rate is within 5 % and whose PSNR and SSIM
# are within 0.1 dB and 0.001 of veryfast alone. The diamond motion search and no inter
# partitions below 16x16 cost 0.88x veryfast's CPU (15.9 against 18.0 ms per frame) for the
# same bit rate (-0.1 %), PSNR (-0.03 dB) and SSIM (-0.0001). Measured for veryfast, they are
# its default only: any other preset runs alone unless --x264-params is given.
DEFAULT_X264_PARAMS = "me=dia:partitions=i8x8,i4x4"
# the preset whose default options DEFAULT_X264_PARAMS are
DEFAULT_X264_PARAMS_PRESET = "veryfast"


def parse_x264_params(text: str) -> dict[str, str]:
    """``key=value:key=value`` -> ``{key: value}``, checked against :data:`X264_PARAM_KEYS`.

    Raises:
        InputError: anything but known keys with values of their kind, each key once.
    """
    if not isinstance(text, str):
        raise InputError(f"x264 params must be text 'key=value:key=value', got {text!r}")
    if not _X264_PARAMS_CHARS.fullmatch(text):
        bad = sorted({c for c in text if not _X264_PARAMS_CHARS.fullmatch(c)})
        raise InputError(
            "x264 params: expected lower-case letters, digits and '=:,.-' only, got "
            f"{''.join(bad)!r} in {text!r}"
        )
    params: dict[str, str] = {}
    for item in text.split(":") if text else []:
        key, eq, value = item.partition("=")
        if not eq or not key or not value:
            raise InputError(f"x264 params: expected key=value, got {item!r} in {text!r}")
        if key not in X264_PARAM_KEYS:
            raise InputError(
                f"x264 params: expected one of {', '.join(X264_PARAM_KEYS)}, got {key!r}"
            )
        if key in params:
            raise InputError(f"x264 params: expected each key once, got {key!r} twice")
        _check_x264_value(key, value)
        params[key] = value
    return params


def _check_x264_value(key: str, value: str) -> None:
    kind, *spec = X264_PARAM_KEYS[key]
    if kind == "word":
        ok, expected = value in spec[0], f"one of {'|'.join(spec[0])}"
    elif kind == "words":
        words = value.split(",")
        ok, expected = all(w in spec[0] for w in words), f"a comma list of {'|'.join(spec[0])}"
    elif kind == "bool":
        ok, expected = value in ("0", "1"), "0 or 1"
    elif kind == "int":
        ok = value.isdigit() and spec[0] <= int(value) <= spec[1]
        expected = f"an integer in {spec[0]}..{spec[1]}"
    else:
        try:
            ok = spec[0] <= float(value) <= spec[1]
        except ValueError:
            ok = False
        expected = f"a number in {spec[0]:g}..{spec[1]:g}"
    if not ok:
        raise InputError(f"x264 params: {key} expected {expected}, got {value!r}")


class VideoCodec(enum.Enum):
    """H.264 encoders this stage can drive (names are FFmpeg encoder names)."""

    LIBX264 = "libx264"
    H264_NVENC = "h264_nvenc"


@dataclass(frozen=True)
class EncodeOptions:
    """Encoder settings; validated on construction (raises InputError)."""

    fps: int = 25  # output frame rate; constant, one picture per output frame
    crf: int = 20  # x264 constant rate factor (0-51, lower is better); NVENC: its cq value
    preset: str = "veryfast"  # an x264 preset name; mapped to p1..p7 for NVENC
    codec: VideoCodec = VideoCodec.LIBX264
    threads: int = 0  # 0 = let the encoder choose; the pipeline passes the CPUs it was given
    audio_bitrate: int = 128_000  # AAC bit rate in bit/s
    # NVENC: sessions this machine's encoders may hold at once (every process of this user
    # takes a slot, waiting when all are held); 0: no cap. See NVENC_SESSIONS_GEFORCE.
    nvenc_sessions: int = NVENC_SESSIONS_GEFORCE
    # libx264 options on top of the preset, ``key=value:key=value`` from the keys of
    # X264_PARAM_KEYS; "" for the preset alone; None: the preset's default, DEFAULT_X264_PARAMS
    # for veryfast (how it was chosen is written there), none for any other preset (see
    # ``resolved_x264_params``). NVENC has no such options: there, any value but None is refused.
    x264_params: str | None = None

    def __post_init__(self) -> None:
        _require(isinstance(self.fps, int) and self.fps > 0, "fps must be an int > 0", self.fps)
        _require(
            isinstance(self.crf, int) and 0 <= self.crf <= 51, "crf must be in 0..51", self.crf
        )
        _require(self.preset in X264_PRESETS, f"preset must be one of {X264_PRESETS}", self.preset)
        _require(isinstance(self.codec, VideoCodec), "codec must be a VideoCodec", self.codec)
        _require(
            isinstance(self.threads, int) and self.threads >= 0,
            "threads must be >= 0",
            self.threads,
        )
        ok = isinstance(self.audio_bitrate, int) and self.audio_bitrate > 0
        _require(ok, "audio_bitrate must be > 0", self.audio_bitrate)
        ok = isinstance(self.nvenc_sessions, int) and self.nvenc_sessions >= 0
        _require(ok, "nvenc_sessions must be >= 0", self.nvenc_sessions)
        if self.x264_params is None:
            return
        parse_x264_params(self.x264_params)
        if self.codec is not VideoCodec.LIBX264:
            raise InputError(
                f"x264 params apply to libx264 only, got {self.x264_params!r} with "
                f"{self.codec.value} (leave --x264-params out)"
            )

    @property
    def resolved_x264_params(self) -> str:
        """The options libx264 gets on top of the preset: ``x264_params``, or when None the
        preset's default (DEFAULT_X264_PARAMS for veryfast, none for the others; none for NVENC)."""
        if self.x264_params is not None:
            return self.x264_params
        libx264 = self.codec is VideoCodec.LIBX264
        if libx264 and self.preset == DEFAULT_X264_PARAMS_PRESET:
            return DEFAULT_X264_PARAMS
        return ""


def _require(ok: bool, message: str, got: object) -> None:
    if not ok:
        raise InputError(f"{message}, got {got!r}")


# --------------------------------------------------------------------------- shards


class ShardCodec(enum.Enum):
    """How frames are stored in a shard's ``image`` column."""

    JPEG = "jpeg"  # lossy, quality 95: ~15x smaller than raw
    PNG = "png"  # lossless, slow to write
    RAW = "raw"  # lossless BGR uint8 bytes: no CPU cost, 2.76 MB per 1280x720 frame


# --------------------------------------------------------------------------- precision


class Precision(enum.Enum):
    """Numeric precision of the generator; ``AUTO`` picks the fastest that passes the gate."""

    FP32 = "fp32"
    INT8 = "int8"
    FP16 = "fp16"
    AUTO = "auto"

    @classmethod
    def parse(cls, value: Precision | str) -> Precision:
        try:
            return cls(value.lower() if isinstance(value, str) else value)
        except ValueError:
            choices = "|".join(p.value for p in cls)
            raise InputError(f"precision must be one of {choices}, got {value!r}") from None


# --------------------------------------------------------------------------- inference


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
    # limits it to CUDA_ARENA_SHARE of its share of the card (see
    # ``inference.providers.with_gpu_share``), so co-located actors cannot starve each other;
    # a whole GPU is not limited.
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
    # Run the generator wrapped for uint8 I/O (``lipsync_ray.inference.wrapper``): the
    # uint8 -> float, x255, clip and transposes run inside the graph (on the device), a quarter
    # of the bytes cross PCIe and no NumPy pass runs per call. Off: the model as given, with the
    # same conversions in NumPy around it (the output is bit-identical on the CPU provider).
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
