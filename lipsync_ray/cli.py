"""The ``lipsync-ray`` command: a thin layer that parses flags into typed values and calls the
library. A known error prints one line and exits 2 (bad input) or 1 (anything else); the
traceback only shows with ``--debug``.

Each command imports the stages it runs inside its ``_cmd_*`` function: they load Ray, ONNX
Runtime, OpenCV, PyAV or pyarrow (heavy), which ``--help``, a bad flag or another command
should not pay for; the dev tooling (``lipsync_ray.dev``) is imported only by its commands.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

from lipsync_ray.config import RenderConfig
from lipsync_ray.errors import InputError, LipsyncError
from lipsync_ray.flags import (
    add_crf_arg,
    add_flag,
    add_render_args,
    add_render_options,
    add_session_args,
    add_x264_args,
    config_from_args,
    encode_from_args,
    given_fields,
    name_pair,
    pool_from_args,
    positive_int,
    positive_ints,
    render_argv,
    render_options_from_args,
    session_from_args,
    value_from_args,
    with_default,
)

__all__ = [
    "build_parser",
    "config_from_args",
    "main",
    "pool_from_args",
    "render_argv",
    "render_options_from_args",
    "session_from_args",
]

log = logging.getLogger("lipsync_ray")


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


# ------------------------------------------------------------------------------------ serve


def service_settings_from_args(args: argparse.Namespace):
    """The ServiceSettings of `serve`'s parsed flags, checked before Ray starts: the models,
    AVATARS_DIR, the state directory (made when missing) and the token (logged: where)."""
    from lipsync_ray.inference import check_encoder_model, check_generator_model
    from lipsync_ray.service.avatars import AvatarCatalog
    from lipsync_ray.service.settings import (
        ServiceSettings,
        default_state_dir,
        prepare_state_dir,
        resolve_token,
    )

    config = _absolute_paths(config_from_args(args))
    check_generator_model(config.model)
    check_encoder_model(config.audio_encoder)
    avatars = _absolute(args.avatars)
    names = AvatarCatalog(avatars).names()
    log.info("%d avatar(s) in %s: %s", len(names), avatars, ", ".join(names) or "none yet")
    state_dir = prepare_state_dir(args.state_dir or default_state_dir())
    token, where = resolve_token(state_dir, args.token_file)
    log.info("state directory %s; the bearer token is in %s", state_dir, where)
    return ServiceSettings(
        avatars=avatars, config=config, state_dir=state_dir, token=token,
        host=args.host, port=args.port, max_warm=args.max_warm, max_running=args.max_running,
        max_upload_bytes=int(args.max_upload_mb * 2**20), drain_timeout_s=args.drain_timeout,
    )  # fmt: skip


def _absolute(path: str | None) -> str | None:
    """A local path made absolute (the service's replica may run in another directory); a
    URI as it is."""
    return path if path is None or "://" in path else os.path.abspath(path)


def _absolute_paths(config: RenderConfig) -> RenderConfig:
    session = config.session
    return replace(
        config,
        model=_absolute(config.model),
        audio_encoder=_absolute(config.audio_encoder),
        precision_cache=_absolute(config.precision_cache),
        session=replace(session, trt_cache_dir=_absolute(session.trt_cache_dir)),
    )


def _cmd_serve(args: argparse.Namespace) -> int:
    from lipsync_ray.service.server import serve_forever

    settings = service_settings_from_args(args)
    return serve_forever(settings, ready=lambda line: print(line, flush=True))


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
            **given_fields(args, fps="fps"),
            overwrite=bool(args.overwrite),
            progress=progress,
        )
    else:
        options = PrepareOptions(**given_fields(args, fps="fps", smoothing_window="smoothing"))
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

    precision = value_from_args(args, "--precision")
    if precision not in (Precision.FP32, Precision.FP16):
        raise InputError(
            f"bench inference runs fp32 or fp16 (converted, not gated), got {precision.value}: "
            "INT8 calibrates on an avatar, use `bench render --precision int8`"
        )
    session = session_from_args(args)
    fallback = value_from_args(args, "--allow-cpu-fallback")
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
    from lipsync_ray.dev.bench_encode import (
        BASELINE,
        TABLE,
        EncodeSetting,
        bench_encode,
        cheapest_equivalent,
    )
    from lipsync_ray.dev.bench_print import print_encode_bench
    from lipsync_ray.options import EncodeOptions

    crf = value_from_args(args, "--crf")
    settings = TABLE if args.table else [EncodeSetting(p) for p in args.presets]
    results = bench_encode(
        settings, crf=crf, seconds=args.seconds, frames=args.frames, repeats=args.repeats,
        size_wh=args.size, avatar=args.avatar,
    )  # fmt: skip
    baseline = next((r for r in results if r.label == BASELINE.label), None)
    chosen = cheapest_equivalent(results) if baseline is not None else None
    default = EncodeOptions()
    if args.json:
        out = {
            "results": [asdict(r) for r in results],
            "baseline": BASELINE.label,
            "cheapest_equivalent": None if chosen is None else chosen.label,
            "render_default": EncodeSetting(default.preset, default.resolved_x264_params).label,
        }
        args.json.write_text(json.dumps(out, indent=1))
    print_encode_bench(
        results, avatar=args.avatar, crf=crf, baseline=baseline, chosen=chosen,
        default=EncodeSetting(default.preset, default.resolved_x264_params),
    )  # fmt: skip
    return 0


def _cmd_bench_serve(args: argparse.Namespace) -> int:
    from lipsync_ray.dev.bench_serve import bench_serve, check_settings, format_serve_bench

    check_settings(
        clips=args.clips,
        concurrent=args.concurrent,
        concurrent_seconds=args.concurrent_seconds,
        long_seconds=args.long_seconds,
    )
    config = RenderConfig(model="-", audio_encoder="-", **render_options_from_args(args))
    result = bench_serve(
        args.model, config=config, avatar=args.avatar, avatar_seconds=args.avatar_seconds,
        size_wh=args.size, clips=args.clips, concurrent=args.concurrent,
        concurrent_seconds=args.concurrent_seconds, long_seconds=args.long_seconds,
    )  # fmt: skip
    print(format_serve_bench(result))
    if args.json:
        args.json.write_text(json.dumps(result.to_dict(), indent=1, default=str))
        print(f"results: {args.json}")
    return 0


# ------------------------------------------------------------------------------------- demo


def _cmd_demo(args: argparse.Namespace) -> int:
    from lipsync_ray.dev.demo import describe, run_demo

    report = run_demo(args.out_dir, seconds=args.seconds)
    print(report.summary())
    print(describe(report, args.out_dir))
    return 0


def _cmd_reference(args: argparse.Namespace) -> int:
    from lipsync_ray.dev.reference import ReferenceStyle, run_reference

    result = run_reference(
        args.avatar, args.audio, args.output, model=args.model,
        audio_encoder=args.audio_encoder, batch_size=args.batch_size,
        composite_threads=args.threads, encode=encode_from_args(args),
        style=ReferenceStyle(args.style),
    )  # fmt: skip
    print(json.dumps(result.to_dict()))
    return 0


# ----------------------------------------------------------------------------------- submit
# A client of `lipsync-ray serve`: main() gives it a parser of its own, built without the
# render's (whose defaults import PyAV, OpenCV and numpy), so that it starts fast.

_GLOBAL_FLAGS = ("--debug", "-q", "--quiet")  # _top_parser's


def _add_submit(sub: argparse._SubParsersAction) -> None:
    from lipsync_ray.submit import add_submit_args, run_submit  # the standard library only

    p = sub.add_parser(
        "submit", help="render on a running service (`serve`): upload, show progress, download"
    )
    add_submit_args(p)
    p.set_defaults(func=run_submit)


def _command_of(argv: Sequence[str]) -> str | None:
    """The command word of ``argv``: its first argument after the global flags."""
    return next((a for a in argv if a not in _GLOBAL_FLAGS), None)


def _submit_parser() -> argparse.ArgumentParser:
    parser, sub = _top_parser()
    _add_submit(sub)
    return parser


# ------------------------------------------------------------------------------------- main


def _top_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    parser = argparse.ArgumentParser(
        prog="lipsync-ray",
        description="Re-render a talking-head video so the lips follow a new speech track, on Ray.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    return parser, parser.add_subparsers(dest="command", required=True, metavar="COMMAND")


def build_parser() -> argparse.ArgumentParser:
    from lipsync_ray.prepare import PrepareOptions

    parser, sub = _top_parser()

    p = sub.add_parser("render", help="render an MP4 from an avatar and an audio file")
    add_render_args(p)
    p.set_defaults(func=_cmd_render)

    p = sub.add_parser("render-batch", help="render many audios onto one avatar, actors kept warm")
    add_render_args(p, batch=True)
    p.set_defaults(func=_cmd_render_batch)

    p = sub.add_parser(
        "serve",
        help="an HTTP render service on Ray Serve: warm actors, concurrent jobs",
        description="Serve renders over HTTP (API v1, OpenAPI at /docs): jobs are queued, run "
        "concurrently on warm actor pools, kept in a database in --state-dir and resumed after "
        "a restart. SIGINT/SIGTERM drain and stop.",
    )
    p.add_argument("avatars", help="a folder (path or URI) whose sub-folders are avatar bundles")
    add_flag(p, "--model", required=True)
    add_flag(p, "--audio-encoder", required=True)
    add_render_options(p)
    g = p.add_argument_group("service")
    g.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    g.add_argument("--port", type=int, default=8000, help="listen port (default 8000)")
    g.add_argument(
        "--state-dir", type=Path, help="job database and job files (default ~/.lipsync-ray/serve)"
    )
    g.add_argument(
        "--token-file", type=Path,
        help="file holding the bearer token (default: $LIPSYNC_RAY_TOKEN, else STATE_DIR/token, "
        "created with mode 0600 when missing)",
    )  # fmt: skip
    g.add_argument(
        "--max-warm", type=positive_int, default=1,
        help="warm renderers (avatar + settings) kept; least recently used evicted (default 1)",
    )  # fmt: skip
    g.add_argument(
        "--max-running", type=positive_int, default=4, help="jobs rendering at once (default 4)"
    )
    g.add_argument(
        "--max-upload-mb", type=float, default=50.0, help="request body limit, MB (default 50)"
    )
    g.add_argument(
        "--drain-timeout", type=float, default=30.0,
        help="on SIGINT/SIGTERM, seconds running jobs may finish; then they are left to resume "
        "(default 30)",
    )  # fmt: skip
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("prepare", help="build an avatar bundle from a video of one person")
    p.add_argument(
        "video", type=Path, nargs="?", help="the source video (any container PyAV reads)"
    )
    p.add_argument("-o", "--output", type=Path, required=True, help="avatar directory to create")
    p.add_argument(
        "--boxes", type=Path, help='JSON {"boxes": [[x1,y1,x2,y2], ...]} per source frame'
    )
    p.add_argument("--synctalk-dataset", type=Path, help="import a SyncTalk_2D dataset directory")
    p.add_argument(
        "--fps", type=float, help=with_default("output frame rate", PrepareOptions, "fps")
    )
    p.add_argument(
        "--smoothing",
        type=int,
        help=with_default("temporal box smoothing window, frames (1 = none)", PrepareOptions,
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
        type=name_pair,
        default=None,
        help="unet328/identity: visual,audio input names (default input,audio)",
    )
    b.add_argument("--fixed-batch", action="store_true", help="fix the batch axis to 1")
    b.add_argument(
        "--weights",
        choices=["face", "random"],
        default=None,
        help="unet328 and audio-encoder: face (default; the mouth opens with the speech's "
        "loudness, the rest of the face passes through; INT8 fails the 35 dB gate once the "
        "mouth opens, ~20 dB) or random (calibrated random weights)",
    )
    b.set_defaults(func=_cmd_models_build)
    i = msub.add_parser("info", help="parameters, MACs and inputs of a model")
    i.add_argument("model", type=Path)
    i.set_defaults(func=_cmd_models_info)

    p = sub.add_parser("bench", help="benchmarks (programs that print measured ratios)")
    bsub = p.add_subparsers(dest="bench_command", required=True, metavar="WHAT")
    b = bsub.add_parser("inference", help="bare ONNX Runtime generator FPS per batch size")
    b.add_argument("--model", type=Path, required=True)
    b.add_argument("--batch", type=positive_ints, default=[1, 4, 8], help="e.g. 1,4,8,16,32")
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
    b.add_argument("--batch", type=positive_ints, default=[1, 4, 8], help="bare batches to try")
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

    b = bsub.add_parser(
        "encode", help="x264 settings on the benchmark footage: CPU, bit rate, PSNR, SSIM"
    )
    b.add_argument(
        "--presets",
        type=lambda t: [v.strip() for v in t.split(",") if v.strip()],
        default=["ultrafast", "superfast", "veryfast", "faster"],
        help="comma-separated x264 presets, each alone (default "
        "ultrafast,superfast,veryfast,faster)",
    )
    b.add_argument(
        "--table",
        action="store_true",
        help="measure the candidate settings (presets and x264 options on top of them) instead, "
        "and name the cheapest with veryfast's bit rate and quality",
    )
    add_crf_arg(b)  # the render's
    b.add_argument("--seconds", type=float, default=10.0, help="footage length (default 10)")
    b.add_argument("--frames", type=positive_int, help="footage length in frames (over --seconds)")
    b.add_argument(
        "--repeats", type=positive_int, default=1,
        help="encodes per setting, round-robin; the CPU reported is their median (default 1)",
    )  # fmt: skip
    b.add_argument("--size", type=_size, default=(1280, 720), help="frame size WxH")
    b.add_argument("--avatar", choices=["photo", "drawn"], default="photo")
    b.add_argument("--json", type=Path, help="write the results as JSON")
    b.set_defaults(func=_cmd_bench_encode)

    b = bsub.add_parser(
        "serve",
        help="the render service: warm latency, concurrent FPS, a short clip during a long one",
    )
    b.add_argument("--model", default="full", help="full, small, identity or an ONNX path")
    b.add_argument("--avatar", choices=["photo", "drawn"], default="photo")
    b.add_argument("--avatar-seconds", type=float, default=4.0)
    b.add_argument("--size", type=_size, default=(1280, 720), help="avatar frame size WxH")
    b.add_argument("--clips", type=positive_int, default=10, help="warm 1-s clips timed (10)")
    b.add_argument("--concurrent", type=positive_int, default=6, help="clips sent at once (6)")
    b.add_argument("--concurrent-seconds", type=float, default=3.0, help="their length (3)")
    b.add_argument(
        "--long-seconds", type=float, default=60.0, help="the long render a 1-s clip joins (60)"
    )
    add_render_options(b)  # given to both the service and the `render` it is compared with
    b.add_argument("--json", type=Path, help="write the results as JSON")
    b.set_defaults(func=_cmd_bench_serve)

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
        "preloaded, batch inference, then either (jpeg) a thread pool pasting and writing JPEG "
        "q95 frames and one H.264 + AAC encode of them, or (threaded) worker threads that crop, "
        "infer and paste batches while the frames are encoded from RAM in order. Prints its "
        "phases as JSON.",
    )
    p.add_argument("avatar", help="avatar bundle directory")
    p.add_argument("audio", help="speech audio")
    p.add_argument("-o", "--output", type=Path, required=True, help="the MP4 to write")
    p.add_argument("--model", required=True, help="UNet-328 generator (ONNX)")
    p.add_argument("--audio-encoder", required=True, help="audio encoder (ONNX)")
    p.add_argument("--batch-size", type=positive_int, default=4, help="default 4")
    p.add_argument(
        "--threads",
        type=positive_int,
        default=4,
        help="jpeg: compositing threads; threaded: worker threads (default 4)",
    )
    p.add_argument(
        "--style", choices=["jpeg", "threaded"], default="jpeg", help="which script (default jpeg)"
    )
    add_x264_args(p)
    p.set_defaults(func=_cmd_reference)
    _add_submit(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _submit_parser() if _command_of(argv) == "submit" else build_parser()
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
