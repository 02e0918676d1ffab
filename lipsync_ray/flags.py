"""The render's command-line flags, declared once: :data:`RENDER_FLAGS` is a table of
:class:`Flag` records (the option, the config field it sets, how its text becomes the field's
value and back). The parsers of ``render``, ``render-batch``, ``bench render`` and ``bench
inference`` (:func:`add_render_args`, :func:`add_render_options`, :func:`add_session_args`),
flags -> config (:func:`config_from_args`: only the flags given; every default is the
dataclass field's) and config -> flags (:func:`render_argv`, which the benchmark uses to run
``lipsync-ray render`` as a user would) all walk that table.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lipsync_ray.config import EncodeMode, Placement, PoolConfig, RenderConfig
from lipsync_ray.errors import InputError
from lipsync_ray.options import (
    DEFAULT_X264_PARAMS,
    X264_PARAM_KEYS,
    Blend,
    BlendOptions,
    EncodeOptions,
    Precision,
    Provider,
    SessionOptions,
    ShardCodec,
    VideoCodec,
)
from lipsync_ray.vad import SilenceOptions


def positive_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from exc
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def positive_int(text: str) -> int:
    values = positive_ints(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"expected one integer >= 1, got {text!r}")
    return values[0]


def name_pair(text: str) -> tuple[str, str]:
    parts = tuple(p.strip() for p in text.split(","))
    if len(parts) != 2 or not all(parts):
        raise argparse.ArgumentTypeError(f"expected two names 'visual,audio', got {text!r}")
    return parts  # type: ignore[return-value]


# ------------------------------------------------------------------------ defaults in help


def _default(cls, name: str):
    """The default of dataclass ``cls``'s field ``name`` (its default_factory called)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            break
    raise KeyError(f"{cls.__name__} has no field {name!r} with a default")


def _text(value) -> str:
    """A field's value as a flag's text: an enum's value, a float exactly (repr)."""
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _shown(value, to_text: Callable[[Any], str] = _text) -> str:
    """A default as the help shows it: as the flag's text, but floats without '.0'."""
    return f"{value:g}" if isinstance(value, float) else to_text(value)


def with_default(text: str, cls, name: str) -> str:
    """``text`` followed by the default of ``cls.name``, read from the dataclass."""
    return f"{text} (default {_shown(_default(cls, name))})"


def given_fields(args: argparse.Namespace, **fields: str) -> dict:
    """``{field: args.<dest>}`` for each ``field=dest`` whose flag was given (not None)."""
    return {f: getattr(args, d) for f, d in fields.items() if getattr(args, d, None) is not None}


# The clusters whose automatic pool sizes the help of a pool flag left to the cluster shows,
# as PoolConfig.resolved chooses them (the rules are stated there, and in the README's "Defaults
# sized from the cluster"): (CPUs, GPUs).
_EXAMPLE_CLUSTERS = ((16, 1), (8, 0))


def _sized_from_the_cluster(name: str) -> str:
    """``(default: sized from the cluster: ...)`` for PoolConfig field ``name``."""
    examples = []
    for cpus, gpus in _EXAMPLE_CLUSTERS:
        value = getattr(PoolConfig().resolved(cpus, gpus), name)
        examples.append(f"{_shown(value)} on {cpus} CPUs" + (f" + {gpus} GPU" if gpus else ""))
    return f"(default: sized from the cluster: {', '.join(examples)})"


# ---------------------------------------------------------------------------- the table

# RenderConfig's nested settings a flag can set: the path ("pool", "batch_size") is
# RenderConfig.pool.batch_size. A section whose RenderConfig default is None (silence) is off
# unless the switch whose path is the section itself (--silence-passthrough) is given; its
# other flags are ignored then.
SECTIONS: dict[str, type] = {
    "pool": PoolConfig,
    "session": SessionOptions,
    "encode": EncodeOptions,
    "blend": BlendOptions,
    "silence": SilenceOptions,
}


def _same(value):
    return value


@dataclass(frozen=True)
class Flag:
    """One render flag: the config field it sets and how its text maps to that field's value.

    Every flag defaults to None, "not given": the config is built from the flags given only,
    so each default is stated once, on its dataclass field, and the help reads it from there
    (a default of None in PoolConfig: the sizes ``PoolConfig.resolved`` chooses).
    """

    option: str  # "--batch-size"
    path: tuple[str, ...]  # the field it sets: ("pool", "batch_size"), or ("start_frame",)
    help: str  # without the default: it is appended, read from the field
    group: str | None = None  # argument group title; None: the parser's own options
    parse: Callable[[str], Any] | None = str  # the argparse type; None: a switch (no value)
    choices: tuple[str, ...] | None = None
    to_field: Callable[[Any], Any] = _same  # parsed value -> the field's value
    to_text: Callable[[Any], str] = _text  # the field's value -> the flag's text
    on: Any = True  # a switch: the field's value when it is given

    @property
    def dest(self) -> str:
        return self.option.removeprefix("--").replace("-", "_")

    @property
    def switch(self) -> bool:
        return self.parse is None

    @property
    def turns_on_section(self) -> bool:
        """A switch whose path is a section: given, the section is built (--silence-passthrough)."""
        return self.switch and len(self.path) == 1 and self.path[0] in SECTIONS

    def default(self):
        """The field's default (None for a field without one, such as the model)."""
        owner = SECTIONS[self.path[0]] if len(self.path) == 2 else RenderConfig
        try:
            return _default(owner, self.path[-1])
        except KeyError:
            return None

    def help_text(self) -> str:
        """The help, with the default read from the dataclass at the time the parser is built."""
        if self.switch:
            return self.help
        default = self.default()
        if default == "":
            return f"{self.help} (default '')"
        if default is not None:
            return f"{self.help} (default {_shown(default, self.to_text)})"
        if self.path[0] == "pool":
            return f"{self.help} {_sized_from_the_cluster(self.path[1])}"
        return self.help  # None: what it means is said in the help


def _choice(option: str, path: tuple[str, ...], cls: type[enum.Enum], help: str, group: str):
    """A flag whose choices are the values of the field's Enum ``cls``."""
    return Flag(option, path, help, group, choices=tuple(m.value for m in cls), to_field=cls)


def _switch(option: str, path: tuple[str, ...], help: str, group: str | None, on: Any = True):
    return Flag(option, path, help, group, parse=None, on=on)


def _providers(text: str) -> tuple[Provider, ...]:
    """``tensorrt,cuda,cpu`` -> Providers. Raises InputError (one line, exit 2) when the
    config is built, rather than argparse's usage message."""
    try:
        providers = tuple(Provider[n.strip().upper()] for n in text.split(",") if n.strip())
    except KeyError as exc:
        raise InputError(
            f"unknown provider {exc.args[0].lower()!r}, expected tensorrt, cuda or cpu"
        ) from None
    if not providers:
        raise InputError(f"expected providers such as cuda,cpu, got {text!r}")
    return providers


def _providers_text(providers: Iterable[Provider]) -> str:
    return ",".join(p.name.lower() for p in providers)


_GIB = 2**30

POOL, SESSION, OUTPUT = "actors and chunks", "session", "output"

# The models: `render` and `render-batch` only (bench render builds its own).
INPUT_FLAGS: tuple[Flag, ...] = (
    Flag("--model", ("model",), "UNet-328 generator (ONNX)"),
    Flag("--audio-encoder", ("audio_encoder",), "audio encoder (ONNX)"),
    Flag("--features", ("features",), "precomputed audio features [N, 512] float32 (.npy)"),
)

# The render's settings, shared by `render`, `render-batch` and `bench render`, in help order.
OPTION_FLAGS: tuple[Flag, ...] = (
    Flag(
        "--address", ("address",),
        "Ray address: none starts a local cluster; 'auto' joins `ray start`",
    ),
    Flag("--batch-size", ("pool", "batch_size"), "frames per generator call", POOL, positive_int),
    Flag("--inference-actors", ("pool", "inference_actors"), "generator actors", POOL, int),
    Flag(
        "--gpus-per-actor", ("pool", "gpus_per_actor"), "GPU fraction per generator actor",
        POOL, float,
    ),
    Flag(
        "--cpus-per-actor", ("pool", "cpus_per_inference_actor"),
        "CPUs per generator actor; sizes its threads", POOL, float,
    ),
    Flag("--compositors", ("pool", "compositors"), "compositing actors", POOL, int),
    Flag(
        "--compositor-niceness", ("pool", "compositor_niceness"),
        "scheduling niceness of compositors, 0-19: above 0 they use the CPU inference leaves "
        "idle", POOL, int,
    ),
    Flag("--chunk-frames", ("pool", "chunk_frames"), "output frames per chunk/shard", POOL, int),
    Flag("--max-retries", ("pool", "max_retries"), "retries per failing chunk", POOL, int),
    Flag(
        "--chunk-timeout", ("pool", "chunk_timeout_s"), "seconds before a chunk counts as hung",
        POOL, float,
    ),
    _switch(
        "--no-split-tail", ("pool", "split_tail"),
        "keep a render's last chunks whole on one generator actor each, instead of splitting "
        "them between the actors so that they finish together", POOL, on=False,
    ),
    _choice(
        "--placement", ("pool", "placement"), Placement,
        "auto: Ray decides (one machine); split: compositors on CPU-only nodes", POOL,
    ),
    Flag(
        "--providers", ("session", "providers"),
        "ONNX Runtime providers in order of preference", SESSION,
        to_field=_providers, to_text=_providers_text,
    ),
    Flag(
        "--gpu-mem-limit", ("session", "gpu_mem_limit_bytes"),
        "CUDA arena limit per actor, GiB (default: 85%% of a fractional actor's share of the "
        "card, from nvidia-smi)", SESSION, float,
        to_field=lambda gib: int(gib * _GIB), to_text=lambda n: repr(n / _GIB),
    ),
    Flag("--trt-cache", ("session", "trt_cache_dir"), "TensorRT engine cache directory", SESSION),
    _switch("--fp16", ("session", "trt_fp16"), "TensorRT FP16 kernels", SESSION),
    _switch(
        "--no-io-binding", ("session", "io_binding"),
        "run the generator with plain session.run instead of an IO binding", SESSION, on=False,
    ),
    _switch(
        "--no-graph-io", ("session", "graph_io"),
        "run the generator as given, converting uint8 <-> float in NumPy around each call, "
        "instead of wrapped for uint8 in and out (same output, more CPU per frame)",
        SESSION, on=False,
    ),
    _choice(
        "--precision", ("precision",), Precision,
        "generator precision; int8/fp16/auto are checked by a quality gate", SESSION,
    ),
    Flag(
        "--precision-threshold", ("precision_threshold_db",),
        "gate: face-region PSNR against FP32 on held-out frames, dB", SESSION, float,
    ),
    Flag(
        "--precision-cache", ("precision_cache",),
        "where reduced models are cached (default: avatar)", SESSION,
    ),
    _switch(
        "--allow-cpu-fallback", ("allow_cpu_fallback",),
        "render on the CPU when a GPU was asked for (--providers cuda, or the actor holds a "
        "GPU) but its session cannot use it (default: stop with ONNX Runtime's reason)",
        SESSION,
    ),
    _choice(
        "--shard-codec", ("shard_codec",), ShardCodec,
        "frame storage in shards: raw (lossless BGR, no CPU cost), png (lossless, small, slow) "
        "or jpeg (quality 95)", OUTPUT,
    ),
    _choice(
        "--encode-mode", ("encode_mode",), EncodeMode,
        "segments: per-chunk H.264 in parallel, joined by stream copy; single: one encoder",
        OUTPUT,
    ),
    _choice("--video-codec", ("encode", "codec"), VideoCodec, "H.264 encoder", OUTPUT),
    Flag("--crf", ("encode", "crf"), "x264 constant rate factor", OUTPUT, int),
    Flag("--preset", ("encode", "preset"), "x264 preset", OUTPUT),
    Flag(
        "--x264-params", ("encode", "x264_params"),
        "x264 options on top of the preset, key=value:key=value with keys "
        f"{', '.join(X264_PARAM_KEYS)}; '' for the preset alone; libx264 only "
        f"(default: {DEFAULT_X264_PARAMS} with veryfast, none with other presets)", OUTPUT,
    ),
    Flag("--start-frame", ("start_frame",), "first avatar frame", OUTPUT, int),
    _choice(
        "--blend", ("blend", "mode"), Blend,
        "paste: feathered edge or the reference hard paste", OUTPUT,
    ),
    Flag(
        "--feather", ("blend", "feather"), "feather ramp as a fraction of the box side",
        OUTPUT, float,
    ),
    _switch(
        "--silence-passthrough", ("silence",),
        "silent stretches keep the original avatar frame (no inference)", OUTPUT,
    ),
    Flag(
        "--silence-threshold-db", ("silence", "threshold_db"),
        "RMS level per frame below which audio counts as silent", OUTPUT, float,
    ),
    Flag(
        "--silence-min-s", ("silence", "min_silence_s"),
        "shortest silence that passes through, seconds", OUTPUT, float,
    ),
    Flag(
        "--silence-fade-frames", ("silence", "fade_frames"),
        "cross-fade frames inside a silent stretch", OUTPUT, int,
    ),
)  # fmt: skip

# The output's work directory: `render` and `render-batch` only.
WORK_DIR_FLAGS: tuple[Flag, ...] = (
    Flag(
        "--work-dir", ("work_dir",),
        "shards, manifest, report: a path or URI (default OUT.mp4.work/)", OUTPUT,
    ),
    _switch("--keep-shards", ("keep_shards",), "keep shards after a successful encode", OUTPUT),
    _switch(
        "--overwrite", ("overwrite",), "replace the output / restart the work dir", OUTPUT,
    ),
)  # fmt: skip

RENDER_FLAGS: tuple[Flag, ...] = INPUT_FLAGS + OPTION_FLAGS + WORK_DIR_FLAGS
_BY_OPTION = {flag.option: flag for flag in RENDER_FLAGS}


# --------------------------------------------------------------------------- the parsers


def add_flag(container, option: str, **extra) -> None:
    """Add the table's flag ``option`` to a parser or argument group (``extra``: e.g.
    ``required=True``)."""
    flag = _BY_OPTION[option]
    kwargs: dict[str, Any] = {"default": None, "help": flag.help_text()}
    if flag.switch:
        kwargs["action"] = "store_true"
    else:
        kwargs.update(type=flag.parse, choices=flag.choices)
    container.add_argument(flag.option, **kwargs, **extra)


def _add_grouped(p: argparse.ArgumentParser, flags: Iterable[Flag], groups: dict) -> None:
    """Add ``flags`` to ``p``, each in its argument group (made once, kept in ``groups``)."""
    for flag in flags:
        if flag.group is not None and flag.group not in groups:
            groups[flag.group] = p.add_argument_group(flag.group)
        add_flag(p if flag.group is None else groups[flag.group], flag.option)


def add_render_args(p: argparse.ArgumentParser, *, batch: bool = False) -> None:
    """The `render` flags; with ``batch`` the audio and output come from a jobs file."""

    # str, not Path: a URI (s3://bucket/avatar) must keep its "//".
    p.add_argument("avatar", help="avatar bundle directory (from `prepare`), a path or a URI")
    if batch:
        p.add_argument("jobs", type=Path, help='JSON Lines: {"audio": ..., "output": ...} per line')
        p.add_argument(
            "--summary", type=Path, help="batch summary JSON (default JOBS.summary.json)"
        )
    else:
        p.add_argument("audio", help="speech audio (WAV, MP3, M4A, FLAC, OGG, ...), path or URI")
        p.add_argument("-o", "--output", required=True, help="the MP4 to write, path or URI")
    add_flag(p, "--model", required=True)
    src = p.add_mutually_exclusive_group(required=not batch)
    add_flag(src, "--audio-encoder")
    add_flag(src, "--features")
    output = add_render_options(p)
    for flag in WORK_DIR_FLAGS:
        add_flag(output, flag.option)


def add_render_options(p: argparse.ArgumentParser):
    """The render's settings, shared by `render`, `render-batch` and `bench render`: the Ray
    address, the actor pool, the session, the encode and the picture flags (everything but the
    inputs, the output and its work directory). Returns the "output" group."""
    groups: dict = {}
    _add_grouped(p, OPTION_FLAGS, groups)
    return groups[OUTPUT]


def add_session_args(p: argparse.ArgumentParser) -> None:
    """The ONNX Runtime session flags of `render`, `render-batch` and both benchmarks."""
    _add_grouped(p, [f for f in OPTION_FLAGS if f.group == SESSION], {})


def add_x264_args(g) -> None:
    """``--crf``, ``--preset`` and ``--x264-params``: of the render and `reference`."""
    add_flag(g, "--crf")
    add_flag(g, "--preset")
    add_flag(g, "--x264-params")


def add_crf_arg(g) -> None:
    add_flag(g, "--crf")


# ---------------------------------------------------------------- flags -> config -> flags


def _given(args: argparse.Namespace, flags: Iterable[Flag]) -> dict[tuple[str, ...], Any]:
    """``{path: field value}`` of the flags in ``flags`` that were given (a parser that lacks
    one leaves it out)."""
    given = {}
    for flag in flags:
        value = getattr(args, flag.dest, None)
        if value is not None:
            given[flag.path] = flag.on if flag.switch else flag.to_field(value)
    return given


def _section(name: str, given: dict[tuple[str, ...], Any]):
    """Section ``name`` (a PoolConfig, ...) of the given values; the rest its defaults."""
    fields = {path[1]: v for path, v in given.items() if len(path) == 2 and path[0] == name}
    return SECTIONS[name](**fields)


def value_from_args(args: argparse.Namespace, option: str):
    """The field value of flag ``option``, or the field's default when it was not given."""
    flag = _BY_OPTION[option]
    return _given(args, [flag]).get(flag.path, flag.default())


def pool_from_args(args: argparse.Namespace) -> PoolConfig:
    """The PoolConfig of the pool flags (None: sized from the cluster)."""
    return _section("pool", _given(args, OPTION_FLAGS))


def session_from_args(args: argparse.Namespace) -> SessionOptions:
    """The SessionOptions of the flags :func:`add_session_args` adds."""
    return _section("session", _given(args, OPTION_FLAGS))


def encode_from_args(args: argparse.Namespace) -> EncodeOptions:
    """The EncodeOptions of the encode flags the parser has (:func:`add_x264_args`...)."""
    return _section("encode", _given(args, OPTION_FLAGS))


def render_options_from_args(args: argparse.Namespace) -> dict:
    """RenderConfig keywords of the flags :func:`add_render_options` adds (and, where the
    parser has them, `render`'s work-dir flags): only those given, as typed values; every
    section but an optional one that is off."""
    given = _given(args, OPTION_FLAGS + WORK_DIR_FLAGS)
    options = {path[0]: v for path, v in given.items() if len(path) == 1}
    for name in SECTIONS:
        if _default(RenderConfig, name) is not None or options.get(name):
            options[name] = _section(name, given)
    return options


def config_from_args(args: argparse.Namespace) -> RenderConfig:
    """Build the one RenderConfig from parsed CLI flags (also used by jobs/render_job.py)."""
    inputs = {path[0]: v for path, v in _given(args, INPUT_FLAGS).items()}
    return RenderConfig(**inputs, **render_options_from_args(args))


def _field(config: RenderConfig, path: tuple[str, ...]):
    """The value at ``path`` in ``config``; None below a section that is off."""
    value: Any = config
    for name in path:
        if value is None:
            return None
        value = getattr(value, name)
    return value


def render_argv(config: RenderConfig, options: Iterable[str] | None = None) -> list[str]:
    """The ``render`` flags that rebuild ``config`` (:func:`config_from_args` of them equals
    it; tested): every setting is written out, defaults included, ``--model`` first; only
    ``options`` when given (``["--crf", "--preset"]``). Used by ``bench render`` to run the
    real command line as a user does."""
    flags = RENDER_FLAGS if options is None else [_BY_OPTION[o] for o in options]
    argv: list[str] = []
    for flag in flags:
        value = _field(config, flag.path)
        if flag.turns_on_section:
            argv += [flag.option] if value is not None else []
        elif flag.switch:
            argv += [flag.option] if value == flag.on else []
        elif value is not None:  # None: sized from the cluster, or the library's default
            argv += [flag.option, flag.to_text(value)]
    return argv
