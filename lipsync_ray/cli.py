"""The ``lipsync-ray`` command: a thin layer that parses flags into typed values and calls the
library. A known error prints one line and exits 2 (bad input) or 1 (anything else); the
traceback only shows with ``--debug``.
"""

from __future__ import annotations

import argparse
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
    p.add_argument(
        "--address", help="Ray address: none starts a local cluster; 'auto' joins `ray start`"
    )
    add_pool_args(p)
    add_session_args(p)
    g = p.add_argument_group("output")
    add_encode_args(g)
    g.add_argument(
        "--work-dir",
        default=None,
        help="shards, manifest, report: a path or URI (default OUT.mp4.work/)",
    )
    g.add_argument(
        "--keep-shards", action="store_true", help="keep shards after a successful encode"
    )
    g.add_argument("--start-frame", type=int, default=0, help="first avatar frame (default 0)")
    g.add_argument(
        "--blend",
        choices=["feather", "hard"],
        default="feather",
        help="paste: feathered edge (default) or the reference hard paste",
    )
    g.add_argument(
        "--feather",
        type=float,
        default=0.1,
        help="feather ramp as a fraction of the box side (default 0.1)",
    )
    g.add_argument(
        "--silence-passthrough",
        action="store_true",
        help="silent stretches keep the original avatar frame (no inference)",
    )
    g.add_argument(
        "--silence-threshold-db",
        type=float,
        default=-45.0,
        help="RMS level per frame below which audio counts as silent (default -45)",
    )
    g.add_argument(
        "--silence-min-s",
        type=float,
        default=0.4,
        help="shortest silence that passes through, seconds (default 0.4)",
    )
    g.add_argument(
        "--silence-fade-frames",
        type=int,
        default=4,
        help="cross-fade frames inside a silent stretch (default 4)",
    )
    g.add_argument(
        "--overwrite", action="store_true", help="replace the output / restart the work dir"
    )


def add_pool_args(p: argparse.ArgumentParser) -> None:
    """The actor-pool flags of `render`, `render-batch` and both benchmarks. Sizes left out
    are chosen from the cluster on the driver (``PoolConfig.resolved``)."""
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
        "GPUs; max(1, CPUs // 4) without)",
    )
    g.add_argument(
        "--compositor-niceness",
        type=int,
        default=None,
        help="scheduling niceness of compositors, 0-19: above 0 they use the CPU inference "
        "leaves idle (default: PoolConfig's)",
    )
    g.add_argument(
        "--chunk-frames", type=int, default=64, help="output frames per chunk/shard (default 64)"
    )
    g.add_argument(
        "--max-retries", type=int, default=3, help="retries per failing chunk (default 3)"
    )
    g.add_argument(
        "--chunk-timeout", type=float, default=900.0, help="seconds before a chunk counts as hung"
    )
    g.add_argument(
        "--placement",
        choices=["auto", "split"],
        default="auto",
        help="auto: Ray decides (one machine); split: compositors on CPU-only nodes",
    )


def add_session_args(p: argparse.ArgumentParser) -> None:
    """The ONNX Runtime session flags of `render`, `render-batch` and both benchmarks."""
    g = p.add_argument_group("session")
    g.add_argument(
        "--providers",
        default="tensorrt,cuda,cpu",
        help="ONNX Runtime providers in order of preference (default tensorrt,cuda,cpu)",
    )
    g.add_argument(
        "--gpu-mem-limit",
        type=float,
        default=None,
        help="CUDA arena limit per actor, GiB (default: 85%% of a fractional actor's share of "
        "the card, from nvidia-smi)",
    )
    g.add_argument("--trt-cache", default=None, help="TensorRT engine cache directory")
    g.add_argument("--fp16", action="store_true", help="TensorRT FP16 kernels")
    g.add_argument(
        "--no-io-binding",
        action="store_true",
        help="run the generator with plain session.run instead of an IO binding",
    )
    g.add_argument(
        "--no-graph-io",
        action="store_true",
        help="run the generator as given, converting uint8 <-> float in NumPy around each call, "
        "instead of wrapped for uint8 in and out (same output, more CPU per frame)",
    )
    g.add_argument(
        "--precision",
        choices=["fp32", "int8", "fp16", "auto"],
        default="fp32",
        help="generator precision; int8/fp16/auto are checked by a quality gate (default fp32)",
    )
    g.add_argument(
        "--precision-threshold",
        type=float,
        default=35.0,
        help="gate: face-region PSNR against FP32 on held-out frames, dB (default 35)",
    )
    g.add_argument("--precision-cache", help="where reduced models are cached (default: avatar)")
    g.add_argument(
        "--allow-cpu-fallback",
        action="store_true",
        help="render on the CPU when a GPU was asked for (--providers cuda, or the actor "
        "holds a GPU) but its session cannot use it (default: stop with ONNX Runtime's reason)",
    )


def add_encode_args(g) -> None:
    """The shard and H.264 flags of `render`, `render-batch` and `bench render`."""
    from lipsync_ray.config import EncodeMode
    from lipsync_ray.encode import VideoCodec
    from lipsync_ray.shards import ShardCodec

    g.add_argument(
        "--shard-codec",
        choices=[c.value for c in ShardCodec],
        default="raw",
        help="frame storage in shards: raw (default, lossless BGR, no CPU cost), png "
        "(lossless, small, slow) or jpeg (quality 95)",
    )
    g.add_argument(
        "--encode-mode",
        choices=[m.value for m in EncodeMode],
        default="segments",
        help="segments: per-chunk H.264 in parallel, joined by stream copy (default)",
    )
    g.add_argument("--video-codec", choices=[c.value for c in VideoCodec], default="libx264")
    g.add_argument("--crf", type=int, default=20, help="x264 constant rate factor (default 20)")
    g.add_argument("--preset", default="veryfast", help="x264 preset (default veryfast)")


def pool_from_args(args: argparse.Namespace):
    """The PoolConfig of the flags :func:`add_pool_args` adds (None: sized from the cluster)."""
    from lipsync_ray.config import Placement, PoolConfig

    return PoolConfig(
        inference_actors=args.inference_actors,
        gpus_per_actor=args.gpus_per_actor,
        cpus_per_inference_actor=args.cpus_per_actor,
        compositors=args.compositors,
        **_niceness(args),
        batch_size=args.batch_size,
        chunk_frames=args.chunk_frames,
        max_retries=args.max_retries,
        chunk_timeout_s=args.chunk_timeout,
        placement=Placement(args.placement),
    )


def session_from_args(args: argparse.Namespace):
    """The SessionOptions of the flags :func:`add_session_args` adds."""
    from lipsync_ray.inference import Provider, SessionOptions

    names = {"tensorrt": Provider.TENSORRT, "cuda": Provider.CUDA, "cpu": Provider.CPU}
    try:
        providers = tuple(names[n.strip().lower()] for n in args.providers.split(",") if n.strip())
    except KeyError as exc:
        raise InputError(
            f"unknown provider {exc.args[0]!r}, expected tensorrt, cuda or cpu"
        ) from None
    if not providers:
        raise InputError(f"expected providers such as cuda,cpu, got {args.providers!r}")
    return SessionOptions(
        providers=providers,
        gpu_mem_limit_bytes=None if args.gpu_mem_limit is None else int(args.gpu_mem_limit * 2**30),
        trt_fp16=args.fp16,
        trt_cache_dir=args.trt_cache,
        io_binding=not args.no_io_binding,
        graph_io=not args.no_graph_io,
    )


def config_from_args(args: argparse.Namespace):
    """Build the one RenderConfig from parsed CLI flags (also used by jobs/render_job.py)."""
    from lipsync_ray.composite import BlendOptions
    from lipsync_ray.config import EncodeMode, RenderConfig
    from lipsync_ray.encode import EncodeOptions, VideoCodec
    from lipsync_ray.precision import Precision
    from lipsync_ray.shards import ShardCodec
    from lipsync_ray.vad import SilenceOptions

    return RenderConfig(
        model=args.model,
        audio_encoder=args.audio_encoder,
        features=args.features,
        address=args.address,
        pool=pool_from_args(args),
        session=session_from_args(args),
        allow_cpu_fallback=args.allow_cpu_fallback,
        encode=EncodeOptions(crf=args.crf, preset=args.preset, codec=VideoCodec(args.video_codec)),
        encode_mode=EncodeMode(args.encode_mode),
        shard_codec=ShardCodec(args.shard_codec),
        work_dir=args.work_dir,
        keep_shards=args.keep_shards,
        start_frame=args.start_frame,
        overwrite=args.overwrite,
        precision=Precision.parse(args.precision),
        precision_threshold_db=args.precision_threshold,
        precision_cache=args.precision_cache,
        blend=BlendOptions(args.blend, args.feather),
        silence=SilenceOptions(
            args.silence_threshold_db, args.silence_min_s, args.silence_fade_frames
        )
        if args.silence_passthrough
        else None,
    )


def render_argv(config) -> list[str]:
    """The ``render`` flags that rebuild ``config`` (:func:`config_from_args` of them equals
    it; tested): every setting is written out, defaults included. Used by ``bench render`` to
    run the real command line as a user does."""
    pool, session, encode = config.pool, config.session, config.encode
    names = {"TENSORRT": "tensorrt", "CUDA": "cuda", "CPU": "cpu"}
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
        "--providers", ",".join(names[p.name] for p in session.providers),
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
    from lipsync_ray.prepare import PrepareOptions, import_synctalk_dataset, prepare_avatar

    progress = _progress_printer("prepare")
    if args.synctalk_dataset:
        summary = import_synctalk_dataset(
            args.synctalk_dataset,
            args.output,
            fps=args.fps,
            overwrite=args.overwrite,
            progress=progress,
        )
    else:
        if args.video is None:
            raise InputError("give a VIDEO, or --synctalk-dataset DIR")
        options = PrepareOptions(fps=args.fps, smoothing_window=args.smoothing)
        summary = prepare_avatar(
            args.video,
            args.output,
            options,
            boxes_file=args.boxes,
            overwrite=args.overwrite,
            progress=progress,
        )
    _end_progress()
    print(
        f"prepared {summary.frames} frames at {summary.fps:g} fps, "
        f"{summary.size_wh[0]}x{summary.size_wh[1]}, detector {summary.detector}, "
        f"in {summary.seconds:.1f} s -> {summary.path}"
    )
    return 0


_progress_open = False


def _progress_printer(label: str):
    def progress(done: int, total: int | None) -> None:
        global _progress_open
        if not sys.stderr.isatty():
            return
        _progress_open = True
        of = f"/{total}" if total else ""
        sys.stderr.write(f"\r{label}: {done}{of} frames   ")
        sys.stderr.flush()

    return progress


def _end_progress() -> None:
    if _progress_open:
        sys.stderr.write("\n")


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


def _cmd_bench_inference(args: argparse.Namespace) -> int:
    from lipsync_ray.dev.bench import bench_inference
    from lipsync_ray.pipeline import check_gpu_request
    from lipsync_ray.precision import Precision

    precision = Precision.parse(args.precision)
    if precision not in (Precision.FP32, Precision.FP16):
        raise InputError(
            f"bench inference runs fp32 or fp16 (converted, not gated), got {precision.value}: "
            "INT8 calibrates on an avatar, use `bench render --precision int8`"
        )
    session = session_from_args(args)
    from lipsync_ray.config import RenderConfig

    check_gpu_request(
        RenderConfig(model=str(args.model), session=session,
                     allow_cpu_fallback=args.allow_cpu_fallback)
    )  # fmt: skip
    results = bench_inference(
        args.model, args.batch, threads=args.threads, min_seconds=args.seconds,
        options=session, fp16=precision is Precision.FP16,
        allow_cpu_fallback=args.allow_cpu_fallback,
    )  # fmt: skip
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=1))
        return 0
    print(f"{'batch':>5} {'ms/frame':>9} {'FPS':>7}  provider, threads")
    for r in results:
        print(f"{r.batch:>5} {r.ms_per_frame:>9.1f} {r.fps:>7.2f}  {r.provider}, {r.threads}")
    return 0


def _niceness(args: argparse.Namespace) -> dict:
    """``compositor_niceness`` for PoolConfig when given on the command line."""
    n = args.compositor_niceness
    return {} if n is None else {"compositor_niceness": n}


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, got {text!r}") from exc
    return w, h


def _cmd_bench_render(args: argparse.Namespace) -> int:
    from lipsync_ray.config import EncodeMode, RenderConfig
    from lipsync_ray.dev.bench import bench_render
    from lipsync_ray.encode import EncodeOptions, VideoCodec
    from lipsync_ray.precision import Precision
    from lipsync_ray.shards import ShardCodec
    from lipsync_ray.vad import SilenceOptions

    # The render's own pool and session flags: the pool is sized from the cluster, as a
    # flag-less `render` would be, and bare inference runs on the render's provider.
    config = RenderConfig(
        model="-",
        audio_encoder="-",
        address=args.address,
        pool=pool_from_args(args),
        session=session_from_args(args),
        allow_cpu_fallback=args.allow_cpu_fallback,
        encode=EncodeOptions(crf=args.crf, preset=args.preset, codec=VideoCodec(args.video_codec)),
        encode_mode=EncodeMode(args.encode_mode),
        shard_codec=ShardCodec(args.shard_codec),
        precision=Precision.parse(args.precision),
        precision_threshold_db=args.precision_threshold,
        precision_cache=args.precision_cache,
        silence=SilenceOptions() if args.silence_passthrough else None,
    )
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
        _print_render_bench(result, runs[0])
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

    results = bench_encode(
        args.presets, crf=args.crf, seconds=args.seconds, size_wh=args.size, avatar=args.avatar
    )
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1))
    print(f"{'preset':>10} {'CPU ms/frame':>13} {'Mbit/s':>7} {'PSNR dB':>8} {'worst':>6}"
          f"   ({args.avatar} footage, CRF {args.crf}, 1 thread, 64-frame segments)")  # fmt: skip
    for r in results:
        print(f"{r.preset:>10} {r.cpu_ms_per_frame:>13.1f} {r.mbit_per_s:>7.2f} "
              f"{r.psnr_db:>8.2f} {r.worst_psnr_db:>6.2f}")  # fmt: skip
    return 0


def _print_render_bench(r, first) -> None:
    print(f"== {r.model} model, {r.avatar} avatar, {r.seconds:g} s of audio, {r.frames} frames "
          f"at {r.size_wh[0]}x{r.size_wh[1]} ==")  # fmt: skip
    if r.bare:
        print(f"bare inference after {r.settings['bare_warmup_s']:g} s of untimed warm-up:")
    for b in r.bare:
        print(f"bare inference batch {b.batch}: {b.fps:.2f} FPS ({b.ms_per_frame:.1f} ms/frame, "
              f"{b.threads} threads)")  # fmt: skip
    if r.bare_after is not None:
        print(f"bare inference batch {r.bare_after.batch} after the render: "
              f"{r.bare_after.fps:.2f} FPS; bare figure used: {r.bare_fps:.2f} FPS (mean of "
              f"before and after)")  # fmt: skip
    reduced = r.precision.get("precision", "fp32")
    for b in r.bare_reduced:
        print(f"bare {reduced} inference batch {b.batch}: {b.fps:.2f} FPS "
              f"({b.ms_per_frame:.1f} ms/frame, {b.threads} threads)")  # fmt: skip
    bare = r.bare_fps or first.bare_fps
    ratio = r.e2e_fps / bare if bare else 0.0
    print(f"lipsync-ray render, whole process: {r.e2e_fps:.2f} FPS ({r.wall_s:.1f} s from start "
          f"to exit, batch {r.render_batch})")  # fmt: skip
    print("  phases (s): " + ", ".join(f"{k} {v:.2f}" for k, v in r.phases_s.items())
          + " (ray_init is inside start)")  # fmt: skip
    chunks_s = r.phases_s.get("chunks", 0.0)
    if chunks_s > 0:
        print(f"  steady state (chunks phase): {r.frames / chunks_s:.2f} FPS")
    if r.precision_prepare_s:
        print(f"{r.precision.get('precision')} generator quantised and gated before the render "
              f"(once per model, avatar and settings; the render loads it from the cache): "
              f"{r.precision_prepare_s:.1f} s")  # fmt: skip
    if bare:
        print(f"ratio end-to-end / bare inference: {ratio:.3f}")
    if r.bare_reduced:
        best = max(b.fps for b in r.bare_reduced)
        print(f"end to end / bare {reduced} inference: {r.e2e_fps / best:.3f}")
    stages = ", ".join(f"{k} {v:.1f}" for k, v in r.stage_cpu_ms_per_frame.items())
    print(f"CPU ms/frame by stage: {stages}")
    print(f"frames generated: {r.frames_generated} of {r.frames}; precision: "
          f"{r.precision.get('precision', 'fp32')} {r.precision.get('gate') or ''}")  # fmt: skip
    print(
        f"CPU ms/frame of the whole process tree: {r.tree_cpu_ms_per_frame:.1f} ("
        + ", ".join(f"{k} {v:.1f}" for k, v in r.process_cpu_ms_per_frame.items())
        + ")"
    )
    print(
        f"peak memory of the process tree: PSS {r.peak_pss_mb:.0f} MB, RSS {r.peak_rss_mb:.0f} MB"
    )
    if r.reference:
        ref = r.reference
        print(f"reference single-process script, whole process: {ref['fps']:.2f} FPS "
              f"({ref['wall_s']:.1f} s; {ref['cpu_ms_per_frame']:.1f} CPU ms/frame, peak RSS "
              f"{ref['peak_rss_mb']:.0f} MB)")  # fmt: skip
        print("  phases (s): " + ", ".join(f"{k} {v:.2f}" for k, v in ref["phases_s"].items()))
        print(f"lipsync-ray render vs the reference, same footage and model: {r.speedup:.2f}x "
              f"faster (wall of the reference / wall of the render)")  # fmt: skip


# ------------------------------------------------------------------------------------- demo


def _cmd_demo(args: argparse.Namespace) -> int:
    from lipsync_ray.dev.demo import describe, run_demo

    report = run_demo(args.out_dir, seconds=args.seconds)
    print(report.summary())
    print(describe(report, args.out_dir))
    return 0


def _cmd_reference(args: argparse.Namespace) -> int:
    from lipsync_ray.dev.reference import run_reference
    from lipsync_ray.encode import EncodeOptions

    result = run_reference(
        args.avatar, args.audio, args.output, model=args.model,
        audio_encoder=args.audio_encoder, batch_size=args.batch_size,
        composite_threads=args.threads, encode=EncodeOptions(crf=args.crf, preset=args.preset),
    )  # fmt: skip
    print(json.dumps(result.to_dict()))
    return 0


# ------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
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
    p.add_argument("--fps", type=float, default=25.0, help="output frame rate (default 25)")
    p.add_argument(
        "--smoothing",
        type=int,
        default=5,
        help="temporal box smoothing window, frames (default 5; 1 = none)",
    )
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
    b.add_argument(
        "--address", help="Ray address: none starts a local cluster; 'auto' joins `ray start`"
    )
    # The render's flags, defined once (the bare figure stays FP32, on the render's provider
    # and batch).
    add_pool_args(b)
    add_session_args(b)
    add_encode_args(b.add_argument_group("output"))
    b.add_argument("--silence-passthrough", action="store_true")
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
    b.add_argument("--crf", type=int, default=20, help="x264 CRF (default 20, the render's)")
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
    p.add_argument("--crf", type=int, default=20, help="x264 CRF (default 20)")
    p.add_argument("--preset", default="veryfast", help="x264 preset (default veryfast)")
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
