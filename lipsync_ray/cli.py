"""The ``lipsync-ray`` command: a thin layer that parses flags into typed values and calls the
library. A known error prints one line and exits 2 (bad input) or 1 (anything else); the
traceback only shows with ``--debug``.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from lipsync_ray.errors import InputError, LipsyncError

log = logging.getLogger("lipsync_ray")


def _positive_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from exc
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def _positive_int(text: str) -> int:
    values = _positive_ints(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"expected one integer >= 1, got {text!r}")
    return values[0]


def _names(text: str) -> tuple[str, str]:
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


def _help(text: str, cls, name: str) -> str:
    """``text`` followed by the default of ``cls.name``, read from the dataclass."""
    return f"{text} (default {_shown(_default(cls, name))})"


def _given(args: argparse.Namespace, **fields: str) -> dict:
    """``{field: args.<dest>}`` for each ``field=dest`` whose flag was given (not None)."""
    return {f: getattr(args, d) for f, d in fields.items() if getattr(args, d, None) is not None}


def _value(args: argparse.Namespace, dest: str, cls, name: str):
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
        help=_help("first avatar frame", RenderConfig, "start_frame"),
    )
    g.add_argument(
        "--blend",
        choices=["feather", "hard"],
        default=None,
        help=_help("paste: feathered edge or the reference hard paste", BlendOptions, "mode"),
    )
    g.add_argument(
        "--feather",
        type=float,
        default=None,
        help=_help("feather ramp as a fraction of the box side", BlendOptions, "feather"),
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
        help=_help(
            "RMS level per frame below which audio counts as silent", SilenceOptions, "threshold_db"
        ),
    )
    g.add_argument(
        "--silence-min-s",
        type=float,
        default=None,
        help=_help(
            "shortest silence that passes through, seconds", SilenceOptions, "min_silence_s"
        ),
    )
    g.add_argument(
        "--silence-fade-frames",
        type=int,
        default=None,
        help=_help("cross-fade frames inside a silent stretch", SilenceOptions, "fade_frames"),
    )
    return g


def add_pool_args(p: argparse.ArgumentParser) -> None:
    """The actor-pool flags of `render`, `render-batch` and both benchmarks. Sizes left out
    are chosen from the cluster on the driver (``PoolConfig.resolved``)."""
    from lipsync_ray.config import PoolConfig

    g = p.add_argument_group("actors and chunks")
    g.add_argument(
        "--batch-size",
        type=_positive_int,
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
        help=_help(
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
        help=_help("output frames per chunk/shard", PoolConfig, "chunk_frames"),
    )
    g.add_argument(
        "--max-retries",
        type=int,
        default=None,
        help=_help("retries per failing chunk", PoolConfig, "max_retries"),
    )
    g.add_argument(
        "--chunk-timeout",
        type=float,
        default=None,
        help=_help("seconds before a chunk counts as hung", PoolConfig, "chunk_timeout_s"),
    )
    g.add_argument(
        "--placement",
        choices=["auto", "split"],
        default=None,
        help=_help(
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
        help=_help("ONNX Runtime providers in order of preference", SessionOptions, "providers"),
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
        help=_help(
            "generator precision; int8/fp16/auto are checked by a quality gate",
            RenderConfig,
            "precision",
        ),
    )
    g.add_argument(
        "--precision-threshold",
        type=float,
        default=None,
        help=_help(
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
        help=_help(
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
        help=_help(
            "segments: per-chunk H.264 in parallel, joined by stream copy; single: one encoder",
            RenderConfig,
            "encode_mode",
        ),
    )
    g.add_argument(
        "--video-codec",
        choices=[c.value for c in VideoCodec],
        default=None,
        help=_help("H.264 encoder", EncodeOptions, "codec"),
    )
    add_x264_args(g)


def add_x264_args(g) -> None:
    """``--crf`` and ``--preset``: of the render, `bench encode` (CRF) and `reference`."""
    from lipsync_ray.encode import EncodeOptions

    add_crf_arg(g)
    g.add_argument("--preset", default=None, help=_help("x264 preset", EncodeOptions, "preset"))


def add_crf_arg(g) -> None:
    from lipsync_ray.encode import EncodeOptions

    g.add_argument(
        "--crf",
        type=int,
        default=None,
        help=_help("x264 constant rate factor", EncodeOptions, "crf"),
    )


def encode_from_args(args: argparse.Namespace):
    """The EncodeOptions of the flags :func:`add_encode_args` / :func:`add_x264_args` add."""
    from lipsync_ray.encode import EncodeOptions, VideoCodec

    given = _given(args, crf="crf", preset="preset")
    if getattr(args, "video_codec", None) is not None:
        given["codec"] = VideoCodec(args.video_codec)
    return EncodeOptions(**given)


def pool_from_args(args: argparse.Namespace):
    """The PoolConfig of the flags :func:`add_pool_args` adds (None: sized from the cluster)."""
    from lipsync_ray.config import Placement, PoolConfig

    given = _given(
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

    given = _given(args, trt_fp16="fp16", trt_cache_dir="trt_cache")
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

    return Precision.parse(_value(args, "precision", RenderConfig, "precision"))


def render_options_from_args(args: argparse.Namespace) -> dict:
    """RenderConfig keywords of the flags :func:`add_render_options` adds (and, where the
    parser has them, `render`'s work-dir flags): only those given, as typed values."""
    from lipsync_ray.composite import Blend, BlendOptions
    from lipsync_ray.config import EncodeMode
    from lipsync_ray.shards import ShardCodec
    from lipsync_ray.vad import SilenceOptions

    options = _given(
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
    blend = _given(args, feather="feather")
    if args.blend is not None:
        blend["mode"] = Blend(args.blend)
    options["blend"] = BlendOptions(**blend)
    if args.silence_passthrough:
        options["silence"] = SilenceOptions(
            **_given(
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


def _cmd_render(args: argparse.Namespace) -> int:
    from lipsync_ray.pipeline import render

    report = render(args.avatar, args.audio, args.output, config_from_args(args))
    print(report.summary())
    return 0


def _cmd_render_batch(args: argparse.Namespace) -> int:
    from lipsync_ray.batch import load_jobs, render_batch

    jobs = load_jobs(args.jobs)
    summary = args.summary or args.jobs.with_name(f"{args.jobs.stem}.summary.json")
    report = render_batch(args.avatar, jobs, config_from_args(args), summary_path=summary)
    print(report.summary())
    print(f"summary: {summary}")
    return report.exit_code


# ---------------------------------------------------------------------------------- prepare


def _cmd_prepare(args: argparse.Namespace) -> int:
    from lipsync_ray.progress import FrameProgress

    if args.video is None and not args.synctalk_dataset:
        raise InputError("give a VIDEO, or --synctalk-dataset DIR")
    # A bar on a terminal only, as before: prepare logs no progress lines to files.
    with FrameProgress(None, label="prepare", log_every=None) as bar:
        summary = _prepare(args, bar.callback())
    print(
        f"prepared {summary.frames} frames at {summary.fps:g} fps, "
        f"{summary.size_wh[0]}x{summary.size_wh[1]}, detector {summary.detector}, "
        f"in {summary.seconds:.1f} s -> {summary.path}"
    )
    return 0


def _prepare(args: argparse.Namespace, progress):
    from lipsync_ray.prepare import PrepareOptions, import_synctalk_dataset, prepare_avatar

    if args.synctalk_dataset:
        summary = import_synctalk_dataset(
            args.synctalk_dataset,
            args.output,
            **_given(args, fps="fps"),
            overwrite=bool(args.overwrite),
            progress=progress,
        )
    else:
        options = PrepareOptions(**_given(args, fps="fps", smoothing_window="smoothing"))
        summary = prepare_avatar(
            args.video,
            args.output,
            options,
            boxes_file=args.boxes,
            overwrite=bool(args.overwrite),
            progress=progress,
        )
    return summary


# ----------------------------------------------------------------------------------- models


def _cmd_models_build(args: argparse.Namespace) -> int:
    from lipsync_ray.dev.models import Arch, Size, build_model, model_stats, save_model

    model = build_model(
        Arch(args.arch),
        Size(args.size),
        seed=args.seed,
        input_names=args.input_names,
        fixed_batch=args.fixed_batch,
        weights=args.weights,
    )
    path = save_model(model, args.output)
    stats = model_stats(model)
    print(
        f"{path}: {args.arch} {args.size}, {stats.params / 1e6:.2f} M parameters, "
        f"{stats.macs / 1e9:.3f} GMAC/frame"
    )
    return 0


def _cmd_models_info(args: argparse.Namespace) -> int:
    import onnx

    from lipsync_ray.dev.models import model_stats
    from lipsync_ray.inference import check_model_file

    path = check_model_file(args.model)
    model = onnx.load(str(path))
    stats = model_stats(model)
    inputs = [
        (i.name, [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim])
        for i in model.graph.input
    ]
    print(
        json.dumps(
            {
                "path": str(path),
                "params": stats.params,
                "macs": stats.macs,
                "inputs": inputs,
                "opset": model.opset_import[0].version,
            },
            indent=1,
        )
    )
    return 0


# ------------------------------------------------------------------------------------ bench
# The tables these commands print are in lipsync_ray.dev.bench_print.


def _cmd_bench_inference(args: argparse.Namespace) -> int:
    from lipsync_ray.dev.bench import bench_inference
    from lipsync_ray.pipeline import check_gpu_request
    from lipsync_ray.precision import Precision

    precision = precision_from_args(args)
    if precision not in (Precision.FP32, Precision.FP16):
        raise InputError(
            f"bench inference runs fp32 or fp16 (converted, not gated), got {precision.value}: "
            "INT8 calibrates on an avatar, use `bench render --precision int8`"
        )
    session = session_from_args(args)
    from lipsync_ray.config import RenderConfig

    fallback = _value(args, "allow_cpu_fallback", RenderConfig, "allow_cpu_fallback")
    check_gpu_request(
        RenderConfig(model=str(args.model), session=session, allow_cpu_fallback=fallback)
    )
    results = bench_inference(
        args.model, args.batch, threads=args.threads, min_seconds=args.seconds,
        options=session, fp16=precision is Precision.FP16, allow_cpu_fallback=fallback,
    )  # fmt: skip
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=1))
        return 0
    from lipsync_ray.dev.bench_print import print_inference_bench

    print_inference_bench(results)
    return 0


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, got {text!r}") from exc
    return w, h


def _cmd_bench_render(args: argparse.Namespace) -> int:
    from lipsync_ray.config import RenderConfig
    from lipsync_ray.dev.bench import bench_render

    # The render's own flags (add_render_options): the pool is sized from the cluster, as a
    # flag-less `render` would be, and bare inference runs on the render's provider.
    config = RenderConfig(model="-", audio_encoder="-", **render_options_from_args(args))
    if not args.address:  # an embedded cluster: this machine runs the actors
        from lipsync_ray.pipeline import check_gpu_request

        check_gpu_request(config)
    runs, batch = [], args.batch_size
    for i, seconds in enumerate(args.seconds):
        result = bench_render(
            args.model, seconds, config=config, avatar=args.avatar,
            avatar_seconds=args.avatar_seconds, size_wh=args.size, batches=args.batch,
            bare=i == 0 and not args.no_bare, batch_size=batch, pause_every_s=args.pause_every,
            reference=args.reference and i == len(args.seconds) - 1,
        )  # fmt: skip
        batch = result.render_batch
        runs.append(result)
        from lipsync_ray.dev.bench_print import print_render_bench

        print_render_bench(result, runs[0])
    out: dict = {"runs": [r.to_dict() for r in runs]}
    if len(runs) > 1:
        out["memory_ratio"] = runs[-1].peak_pss_mb / runs[0].peak_pss_mb
        print(f"peak memory {runs[-1].seconds:g} s vs {runs[0].seconds:g} s: "
              f"{out['memory_ratio']:.2f}x (PSS of the whole process tree)")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=str))
        print(f"results: {args.json}")
    return 0


def _cmd_bench_encode(args: argparse.Namespace) -> int:
    from lipsync_ray.dev.bench import bench_encode
    from lipsync_ray.encode import EncodeOptions

    crf = _value(args, "crf", EncodeOptions, "crf")
    results = bench_encode(
        args.presets, crf=crf, seconds=args.seconds, size_wh=args.size, avatar=args.avatar
    )
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1))
    from lipsync_ray.dev.bench_print import print_encode_bench

    print_encode_bench(results, avatar=args.avatar, crf=crf)
    return 0


# ------------------------------------------------------------------------------------- demo


def _cmd_demo(args: argparse.Namespace) -> int:
    from lipsync_ray.dev.demo import describe, run_demo

    report = run_demo(args.out_dir, seconds=args.seconds)
    print(report.summary())
    print(describe(report, args.out_dir))
    return 0


def _cmd_reference(args: argparse.Namespace) -> int:
    from lipsync_ray.dev.reference import run_reference

    result = run_reference(
        args.avatar, args.audio, args.output, model=args.model,
        audio_encoder=args.audio_encoder, batch_size=args.batch_size,
        composite_threads=args.threads, encode=encode_from_args(args),
    )  # fmt: skip
    print(json.dumps(result.to_dict()))
    return 0


# ------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    from lipsync_ray.prepare import PrepareOptions

    parser = argparse.ArgumentParser(
        prog="lipsync-ray",
        description="Re-render a talking-head video so the lips follow a new speech track, on Ray.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("render", help="render an MP4 from an avatar and an audio file")
    add_render_args(p)
    p.set_defaults(func=_cmd_render)

    p = sub.add_parser("render-batch", help="render many audios onto one avatar, actors kept warm")
    add_render_args(p, batch=True)
    p.set_defaults(func=_cmd_render_batch)

    p = sub.add_parser("prepare", help="build an avatar bundle from a video of one person")
    p.add_argument(
        "video", type=Path, nargs="?", help="the source video (any container PyAV reads)"
    )
    p.add_argument("-o", "--output", type=Path, required=True, help="avatar directory to create")
    p.add_argument(
        "--boxes", type=Path, help='JSON {"boxes": [[x1,y1,x2,y2], ...]} per source frame'
    )
    p.add_argument("--synctalk-dataset", type=Path, help="import a SyncTalk_2D dataset directory")
    p.add_argument("--fps", type=float, help=_help("output frame rate", PrepareOptions, "fps"))
    p.add_argument(
        "--smoothing",
        type=int,
        help=_help("temporal box smoothing window, frames (1 = none)", PrepareOptions,
                   "smoothing_window"),
    )  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace an existing avatar directory")
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser("models", help="build or inspect ONNX models")
    msub = p.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    b = msub.add_parser("build", help="write a stand-in model with the real architecture")
    b.add_argument("--arch", choices=["unet328", "audio-encoder", "identity"], required=True)
    b.add_argument("--size", choices=["full", "small"], default="full")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("-o", "--output", type=Path, required=True)
    b.add_argument(
        "--input-names",
        type=_names,
        default=None,
        help="unet328/identity: visual,audio input names (default input,audio)",
    )
    b.add_argument("--fixed-batch", action="store_true", help="fix the batch axis to 1")
    b.add_argument(
        "--weights",
        choices=["face", "random"],
        default=None,
        help="unet328: face (default; reproduces the face, audio-driven changes, "
        "INT8-friendly) or random (calibrated random weights)",
    )
    b.set_defaults(func=_cmd_models_build)
    i = msub.add_parser("info", help="parameters, MACs and inputs of a model")
    i.add_argument("model", type=Path)
    i.set_defaults(func=_cmd_models_info)

    p = sub.add_parser("bench", help="benchmarks (programs that print measured ratios)")
    bsub = p.add_subparsers(dest="bench_command", required=True, metavar="WHAT")
    b = bsub.add_parser("inference", help="bare ONNX Runtime generator FPS per batch size")
    b.add_argument("--model", type=Path, required=True)
    b.add_argument("--batch", type=_positive_ints, default=[1, 4, 8], help="e.g. 1,4,8,16,32")
    add_session_args(b)  # the same provider, FP16, TensorRT and precision flags as `render`
    b.add_argument("--threads", type=int, default=0, help="intra-op threads (default: all CPUs)")
    b.add_argument(
        "--seconds", type=float, default=3.0, help="minimum timed seconds per batch size"
    )
    b.add_argument("--json", action="store_true", help="print JSON")
    b.set_defaults(func=_cmd_bench_inference)

    b = bsub.add_parser("render", help="a whole render against bare inference, in one run")
    b.add_argument("--model", default="full", help="full, small, identity or an ONNX path")
    b.add_argument(
        "--seconds",
        type=lambda t: [float(v) for v in t.split(",")],
        default=[60.0],
        help="audio length; several (30,600) also print the memory ratio",
    )
    b.add_argument(
        "--avatar",
        choices=["photo", "drawn"],
        default="photo",
        help="photo: a photographed face, moving, with sensor noise (real footage's cost; "
        "default); drawn: the demo's drawn face",
    )
    b.add_argument("--avatar-seconds", type=float, default=4.0)
    b.add_argument("--size", type=_size, default=(1280, 720), help="avatar frame size WxH")
    b.add_argument("--batch", type=_positive_ints, default=[1, 4, 8], help="bare batches to try")
    b.add_argument("--no-bare", action="store_true", help="skip bare inference")
    # The render's flags, defined once (the bare figure stays FP32, on the render's provider
    # and batch).
    add_render_options(b)
    b.add_argument(
        "--pause-every",
        type=float,
        default=None,
        help="insert 1 s of silence every this many seconds of speech",
    )
    b.add_argument(
        "--reference",
        action="store_true",
        help="also run `lipsync-ray reference`, the single-process script it replaces, on the "
        "same footage and model (both timed from start to exit)",
    )
    b.add_argument("--json", type=Path, help="write the results as JSON")
    b.set_defaults(func=_cmd_bench_render)

    b = bsub.add_parser("encode", help="x264 presets on the benchmark footage: CPU, bit rate, PSNR")
    b.add_argument(
        "--presets",
        type=lambda t: [v.strip() for v in t.split(",") if v.strip()],
        default=["ultrafast", "superfast", "veryfast", "faster"],
        help="comma-separated x264 presets (default ultrafast,superfast,veryfast,faster)",
    )
    add_crf_arg(b)  # the render's
    b.add_argument("--seconds", type=float, default=10.0, help="footage length (default 10)")
    b.add_argument("--size", type=_size, default=(1280, 720), help="frame size WxH")
    b.add_argument("--avatar", choices=["photo", "drawn"], default="photo")
    b.add_argument("--json", type=Path, help="write the results as JSON")
    b.set_defaults(func=_cmd_bench_encode)

    p = sub.add_parser("demo", help="render a generated avatar and audio end to end (no downloads)")
    p.add_argument(
        "--out-dir",
        type=Path,
        default=Path("lipsync-demo"),
        help="where to write (default ./lipsync-demo)",
    )
    p.add_argument("--seconds", type=float, default=4.0, help="audio length (default 4)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser(
        "reference",
        help="the single-process script lipsync-ray replaces (the benchmark's rival)",
        description="Render like the single-process scripts in use today: every frame "
        "preloaded, batch inference, a thread pool pasting and writing JPEG q95 frames, then "
        "one H.264 + AAC encode of them. Prints its phases as JSON.",
    )
    p.add_argument("avatar", help="avatar bundle directory")
    p.add_argument("audio", help="speech audio")
    p.add_argument("-o", "--output", type=Path, required=True, help="the MP4 to write")
    p.add_argument("--model", required=True, help="UNet-328 generator (ONNX)")
    p.add_argument("--audio-encoder", required=True, help="audio encoder (ONNX)")
    p.add_argument("--batch-size", type=_positive_int, default=4, help="default 4")
    p.add_argument("--threads", type=_positive_int, default=4, help="compositing threads (4)")
    add_x264_args(p)
    p.set_defaults(func=_cmd_reference)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.debug else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("lipsync_ray").setLevel(level)
    try:
        return int(args.func(args) or 0)
    except LipsyncError as exc:
        if args.debug:
            raise
        print(f"lipsync-ray: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("lipsync-ray: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # an unexpected failure: one line, traceback with --debug
        if args.debug:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(
            f"lipsync-ray: error: unexpected {type(exc).__name__}: {first} "
            "(run with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
