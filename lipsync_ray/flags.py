"""The render's command-line flags, said once: the argument groups that ``render``,
``render-batch`` and ``bench render`` share, flags -> config (only the flags given; every
default is read from its dataclass field) and config -> flags (:func:`render_argv`, which the
benchmark uses to run ``lipsync-ray render`` as a user would).
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
from pathlib import Path

from lipsync_ray.errors import InputError


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


# ----------------------------------------------------------------------------------- render
#
# Every option flag defaults to None, "not given": the config is built from the flags that were
# given only, so each default is stated once, on its dataclass field, and the help texts read
# it from there (_default). A switch (store_true) is None when absent as well.


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


def _shown(value) -> str:
    """A default as a user types it: enum values, providers by name, floats without '.0'."""
    if isinstance(value, enum.Enum):
        return value.name.lower() if value.name in _PROVIDER_FLAGS else str(value.value)
    if isinstance(value, tuple):
        return ",".join(_shown(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def with_default(text: str, cls, name: str) -> str:
    """``text`` followed by the default of ``cls.name``, read from the dataclass."""
    return f"{text} (default {_shown(_default(cls, name))})"


def given_fields(args: argparse.Namespace, **fields: str) -> dict:
    """``{field: args.<dest>}`` for each ``field=dest`` whose flag was given (not None)."""
    return {f: getattr(args, d) for f, d in fields.items() if getattr(args, d, None) is not None}


def flag_value(args: argparse.Namespace, dest: str, cls, name: str):
    """The flag's value, or the default of ``cls.name`` when it was not given."""
    value = getattr(args, dest, None)
    return _default(cls, name) if value is None else value


_PROVIDER_FLAGS = {"TENSORRT": "tensorrt", "CUDA": "cuda", "CPU": "cpu"}


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
    p.add_argument("--model", required=True, help="UNet-328 generator (ONNX)")
    src = p.add_mutually_exclusive_group(required=not batch)
    src.add_argument("--audio-encoder", help="audio encoder (ONNX)")
    src.add_argument("--features", help="precomputed audio features [N, 512] float32 (.npy)")
    output = add_render_options(p)
    output.add_argument(
        "--work-dir",
        default=None,
        help="shards, manifest, report: a path or URI (default OUT.mp4.work/)",
    )
    output.add_argument(
        "--keep-shards",
        action="store_true",
        default=None,
        help="keep shards after a successful encode",
    )
    output.add_argument(
        "--overwrite",
        action="store_true",
        default=None,
        help="replace the output / restart the work dir",
    )


def add_render_options(p: argparse.ArgumentParser):
    """The render's settings, shared by `render`, `render-batch` and `bench render`: the Ray
    address, the actor pool, the session, the encode and the picture flags (everything but the
    inputs, the output and its work directory). Returns the "output" group."""
    from lipsync_ray.composite import BlendOptions
    from lipsync_ray.config import RenderConfig
    from lipsync_ray.vad import SilenceOptions

    p.add_argument(
        "--address", help="Ray address: none starts a local cluster; 'auto' joins `ray start`"
    )
    add_pool_args(p)
    add_session_args(p)
    g = p.add_argument_group("output")
    add_encode_args(g)
    g.add_argument(
        "--start-frame",
        type=int,
        default=None,
        help=with_default("first avatar frame", RenderConfig, "start_frame"),
    )
    g.add_argument(
        "--blend",
        choices=["feather", "hard"],
        default=None,
        help=with_default(
            "paste: feathered edge or the reference hard paste", BlendOptions, "mode"
        ),
    )
    g.add_argument(
        "--feather",
        type=float,
        default=None,
        help=with_default("feather ramp as a fraction of the box side", BlendOptions, "feather"),
    )
    g.add_argument(
        "--silence-passthrough",
        action="store_true",
        default=None,
        help="silent stretches keep the original avatar frame (no inference)",
    )
    g.add_argument(
        "--silence-threshold-db",
        type=float,
        default=None,
        help=with_default(
            "RMS level per frame below which audio counts as silent", SilenceOptions, "threshold_db"
        ),
    )
    g.add_argument(
        "--silence-min-s",
        type=float,
        default=None,
        help=with_default(
            "shortest silence that passes through, seconds", SilenceOptions, "min_silence_s"
        ),
    )
    g.add_argument(
        "--silence-fade-frames",
        type=int,
        default=None,
        help=with_default(
            "cross-fade frames inside a silent stretch", SilenceOptions, "fade_frames"
        ),
    )
    return g


def add_pool_args(p: argparse.ArgumentParser) -> None:
    """The actor-pool flags of `render`, `render-batch` and both benchmarks. Sizes left out
    are chosen from the cluster on the driver (``PoolConfig.resolved``)."""
    from lipsync_ray.config import PoolConfig

    g = p.add_argument_group("actors and chunks")
    g.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="frames per generator call (default: 16 with GPUs, 1 without)",
    )
    g.add_argument(
        "--inference-actors",
        type=int,
        default=None,
        help="generator actors (default: 4 per GPU at 0.25 each, 1 per CPU without GPUs)",
    )
    g.add_argument(
        "--gpus-per-actor",
        type=float,
        default=None,
        help="GPU fraction per generator actor (default 0.25 with GPUs, else 0)",
    )
    g.add_argument(
        "--cpus-per-actor",
        type=float,
        default=None,
        help="CPUs per generator actor; sizes its threads (default: what is left)",
    )
    g.add_argument(
        "--compositors",
        type=int,
        default=None,
        help="compositing actors (default: the CPUs left after the driver and inference with "
        "GPUs; max(2, CPUs // 4) without)",
    )
    g.add_argument(
        "--compositor-niceness",
        type=int,
        default=None,
        help=with_default(
            "scheduling niceness of compositors, 0-19: above 0 they use the CPU inference "
            "leaves idle",
            PoolConfig,
            "compositor_niceness",
        ),
    )
    g.add_argument(
        "--chunk-frames",
        type=int,
        default=None,
        help=with_default("output frames per chunk/shard", PoolConfig, "chunk_frames"),
    )
    g.add_argument(
        "--max-retries",
        type=int,
        default=None,
        help=with_default("retries per failing chunk", PoolConfig, "max_retries"),
    )
    g.add_argument(
        "--chunk-timeout",
        type=float,
        default=None,
        help=with_default("seconds before a chunk counts as hung", PoolConfig, "chunk_timeout_s"),
    )
    g.add_argument(
        "--placement",
        choices=["auto", "split"],
        default=None,
        help=with_default(
            "auto: Ray decides (one machine); split: compositors on CPU-only nodes",
            PoolConfig,
            "placement",
        ),
    )


def add_session_args(p: argparse.ArgumentParser) -> None:
    """The ONNX Runtime session flags of `render`, `render-batch` and both benchmarks."""
    from lipsync_ray.config import RenderConfig
    from lipsync_ray.inference import SessionOptions

    g = p.add_argument_group("session")
    g.add_argument(
        "--providers",
        default=None,
        help=with_default(
            "ONNX Runtime providers in order of preference", SessionOptions, "providers"
        ),
    )
    g.add_argument(
        "--gpu-mem-limit",
        type=float,
        default=None,
        help="CUDA arena limit per actor, GiB (default: 85%% of a fractional actor's share of "
        "the card, from nvidia-smi)",
    )
    g.add_argument("--trt-cache", default=None, help="TensorRT engine cache directory")
    g.add_argument("--fp16", action="store_true", default=None, help="TensorRT FP16 kernels")
    g.add_argument(
        "--no-io-binding",
        action="store_true",
        default=None,
        help="run the generator with plain session.run instead of an IO binding",
    )
    g.add_argument(
        "--no-graph-io",
        action="store_true",
        default=None,
        help="run the generator as given, converting uint8 <-> float in NumPy around each call, "
        "instead of wrapped for uint8 in and out (same output, more CPU per frame)",
    )
    g.add_argument(
        "--precision",
        choices=["fp32", "int8", "fp16", "auto"],
        default=None,
        help=with_default(
            "generator precision; int8/fp16/auto are checked by a quality gate",
            RenderConfig,
            "precision",
        ),
    )
    g.add_argument(
        "--precision-threshold",
        type=float,
        default=None,
        help=with_default(
            "gate: face-region PSNR against FP32 on held-out frames, dB",
            RenderConfig,
            "precision_threshold_db",
        ),
    )
    g.add_argument("--precision-cache", help="where reduced models are cached (default: avatar)")
    g.add_argument(
        "--allow-cpu-fallback",
        action="store_true",
        default=None,
        help="render on the CPU when a GPU was asked for (--providers cuda, or the actor "
        "holds a GPU) but its session cannot use it (default: stop with ONNX Runtime's reason)",
    )


def add_encode_args(g) -> None:
    """The shard and H.264 flags of `render`, `render-batch` and `bench render`."""
    from lipsync_ray.config import EncodeMode, RenderConfig
    from lipsync_ray.encode import EncodeOptions, VideoCodec
    from lipsync_ray.shards import ShardCodec

    g.add_argument(
        "--shard-codec",
        choices=[c.value for c in ShardCodec],
        default=None,
        help=with_default(
            "frame storage in shards: raw (lossless BGR, no CPU cost), png (lossless, small, "
            "slow) or jpeg (quality 95)",
            RenderConfig,
            "shard_codec",
        ),
    )
    g.add_argument(
        "--encode-mode",
        choices=[m.value for m in EncodeMode],
        default=None,
        help=with_default(
            "segments: per-chunk H.264 in parallel, joined by stream copy; single: one encoder",
            RenderConfig,
            "encode_mode",
        ),
    )
    g.add_argument(
        "--video-codec",
        choices=[c.value for c in VideoCodec],
        default=None,
        help=with_default("H.264 encoder", EncodeOptions, "codec"),
    )
    add_x264_args(g)


def add_x264_args(g) -> None:
    """``--crf`` and ``--preset``: of the render, `bench encode` (CRF) and `reference`."""
    from lipsync_ray.encode import EncodeOptions

    add_crf_arg(g)
    g.add_argument(
        "--preset", default=None, help=with_default("x264 preset", EncodeOptions, "preset")
    )


def add_crf_arg(g) -> None:
    from lipsync_ray.encode import EncodeOptions

    g.add_argument(
        "--crf",
        type=int,
        default=None,
        help=with_default("x264 constant rate factor", EncodeOptions, "crf"),
    )


def encode_from_args(args: argparse.Namespace):
    """The EncodeOptions of the flags :func:`add_encode_args` / :func:`add_x264_args` add."""
    from lipsync_ray.encode import EncodeOptions, VideoCodec

    given = given_fields(args, crf="crf", preset="preset")
    if getattr(args, "video_codec", None) is not None:
        given["codec"] = VideoCodec(args.video_codec)
    return EncodeOptions(**given)


def pool_from_args(args: argparse.Namespace):
    """The PoolConfig of the flags :func:`add_pool_args` adds (None: sized from the cluster)."""
    from lipsync_ray.config import Placement, PoolConfig

    given = given_fields(
        args,
        inference_actors="inference_actors",
        gpus_per_actor="gpus_per_actor",
        cpus_per_inference_actor="cpus_per_actor",
        compositors="compositors",
        compositor_niceness="compositor_niceness",
        batch_size="batch_size",
        chunk_frames="chunk_frames",
        max_retries="max_retries",
        chunk_timeout_s="chunk_timeout",
    )
    if args.placement is not None:
        given["placement"] = Placement(args.placement)
    return PoolConfig(**given)


def session_from_args(args: argparse.Namespace):
    """The SessionOptions of the flags :func:`add_session_args` adds."""
    from lipsync_ray.inference import SessionOptions

    given = given_fields(args, trt_fp16="fp16", trt_cache_dir="trt_cache")
    if args.providers is not None:
        given["providers"] = _providers(args.providers)
    if args.gpu_mem_limit is not None:
        given["gpu_mem_limit_bytes"] = int(args.gpu_mem_limit * 2**30)
    if args.no_io_binding:
        given["io_binding"] = False
    if args.no_graph_io:
        given["graph_io"] = False
    return SessionOptions(**given)


def _providers(text: str) -> tuple:
    from lipsync_ray.inference import Provider

    names = {flag: Provider[name] for name, flag in _PROVIDER_FLAGS.items()}
    try:
        providers = tuple(names[n.strip().lower()] for n in text.split(",") if n.strip())
    except KeyError as exc:
        raise InputError(
            f"unknown provider {exc.args[0]!r}, expected tensorrt, cuda or cpu"
        ) from None
    if not providers:
        raise InputError(f"expected providers such as cuda,cpu, got {text!r}")
    return providers


def precision_from_args(args: argparse.Namespace):
    """``--precision`` as a Precision (RenderConfig's default when not given)."""
    from lipsync_ray.config import RenderConfig
    from lipsync_ray.precision import Precision

    return Precision.parse(flag_value(args, "precision", RenderConfig, "precision"))


def render_options_from_args(args: argparse.Namespace) -> dict:
    """RenderConfig keywords of the flags :func:`add_render_options` adds (and, where the
    parser has them, `render`'s work-dir flags): only those given, as typed values."""
    from lipsync_ray.composite import Blend, BlendOptions
    from lipsync_ray.config import EncodeMode
    from lipsync_ray.shards import ShardCodec
    from lipsync_ray.vad import SilenceOptions

    options = given_fields(
        args,
        address="address",
        allow_cpu_fallback="allow_cpu_fallback",
        precision_threshold_db="precision_threshold",
        precision_cache="precision_cache",
        start_frame="start_frame",
        work_dir="work_dir",
        keep_shards="keep_shards",
        overwrite="overwrite",
    )
    options.update(pool=pool_from_args(args), session=session_from_args(args))
    options["encode"] = encode_from_args(args)
    if args.precision is not None:
        options["precision"] = precision_from_args(args)
    if args.encode_mode is not None:
        options["encode_mode"] = EncodeMode(args.encode_mode)
    if args.shard_codec is not None:
        options["shard_codec"] = ShardCodec(args.shard_codec)
    blend = given_fields(args, feather="feather")
    if args.blend is not None:
        blend["mode"] = Blend(args.blend)
    options["blend"] = BlendOptions(**blend)
    if args.silence_passthrough:
        options["silence"] = SilenceOptions(
            **given_fields(
                args,
                threshold_db="silence_threshold_db",
                min_silence_s="silence_min_s",
                fade_frames="silence_fade_frames",
            )
        )
    return options


def config_from_args(args: argparse.Namespace):
    """Build the one RenderConfig from parsed CLI flags (also used by jobs/render_job.py)."""
    from lipsync_ray.config import RenderConfig

    return RenderConfig(
        model=args.model,
        audio_encoder=args.audio_encoder,
        features=args.features,
        **render_options_from_args(args),
    )


def render_argv(config) -> list[str]:
    """The ``render`` flags that rebuild ``config`` (:func:`config_from_args` of them equals
    it; tested): every setting is written out, defaults included. Used by ``bench render`` to
    run the real command line as a user does."""
    pool, session, encode = config.pool, config.session, config.encode
    argv = ["--model", str(config.model)]
    if config.audio_encoder:
        argv += ["--audio-encoder", str(config.audio_encoder)]
    if config.features:
        argv += ["--features", str(config.features)]
    if config.address:
        argv += ["--address", config.address]
    argv += [
        "--compositor-niceness", str(pool.compositor_niceness),
        "--chunk-frames", str(pool.chunk_frames),
        "--max-retries", str(pool.max_retries),
        "--chunk-timeout", repr(pool.chunk_timeout_s),
        "--placement", pool.placement.value,
        "--providers", ",".join(_PROVIDER_FLAGS[p.name] for p in session.providers),
        "--precision", config.precision.value,
        "--precision-threshold", repr(config.precision_threshold_db),
        "--shard-codec", config.shard_codec.value,
        "--encode-mode", config.encode_mode.value,
        "--video-codec", encode.codec.value,
        "--crf", str(encode.crf),
        "--preset", encode.preset,
        "--start-frame", str(config.start_frame),
        "--blend", config.blend.mode.value,
        "--feather", repr(config.blend.feather),
    ]  # fmt: skip
    optional = [  # None: sized from the cluster, or the library's default
        ("--inference-actors", pool.inference_actors),
        ("--compositors", pool.compositors),
        ("--batch-size", pool.batch_size),
        ("--gpus-per-actor", pool.gpus_per_actor),
        ("--cpus-per-actor", pool.cpus_per_inference_actor),
        ("--gpu-mem-limit", None if session.gpu_mem_limit_bytes is None
                            else session.gpu_mem_limit_bytes / 2**30),
        ("--trt-cache", session.trt_cache_dir),
        ("--precision-cache", config.precision_cache),
        ("--work-dir", config.work_dir),
    ]  # fmt: skip
    for flag, value in optional:
        if value is not None:
            argv += [flag, value if isinstance(value, str) else repr(value)]
    switches = [
        ("--fp16", session.trt_fp16),
        ("--no-io-binding", not session.io_binding),
        ("--no-graph-io", not session.graph_io),
        ("--allow-cpu-fallback", config.allow_cpu_fallback),
        ("--keep-shards", config.keep_shards),
        ("--overwrite", config.overwrite),
    ]
    argv += [flag for flag, on in switches if on]
    if config.silence is not None:
        argv += [
            "--silence-passthrough",
            "--silence-threshold-db", repr(config.silence.threshold_db),
            "--silence-min-s", repr(config.silence.min_silence_s),
            "--silence-fade-frames", str(config.silence.fade_frames),
        ]  # fmt: skip
    return argv
