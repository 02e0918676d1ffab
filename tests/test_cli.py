"""The console command: --help everywhere, models build, and one-line errors for bad input."""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

import onnx
import pytest
from helpers import cli_command

from lipsync_ray.cli import build_parser, config_from_args, main, render_argv
from lipsync_ray.flags import RENDER_FLAGS, SECTIONS


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """Every command path of ``parser``, the top level included, read from its sub-parsers."""
    yield list(path)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*path, name))


COMMANDS = list(_commands(build_parser()))


def test_the_command_list_is_discovered():
    assert ["render"] in COMMANDS and ["bench", "render"] in COMMANDS and len(COMMANDS) > 10


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "top")
def test_help_on_every_subcommand(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(" ".join(["usage: lipsync-ray", *command])), out[:200]


def test_help_of_the_console_command():
    """The installed entry point (or ``python -m``) starts and prints its usage."""
    result = subprocess.run([*cli_command(), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "usage: lipsync-ray" in result.stdout


def test_models_build_and_info(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    rc = main(
        [
            "models",
            "build",
            "--arch",
            "unet328",
            "--size",
            "small",
            "--seed",
            "3",
            "-o",
            str(out),
            "--input-names",
            "visual_input,audio_input",
            "--fixed-batch",
        ]
    )
    assert rc == 0
    model = onnx.load(out)
    assert [i.name for i in model.graph.input] == ["visual_input", "audio_input"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    assert "parameters" in capsys.readouterr().out
    assert main(["models", "info", str(out)]) == 0
    assert '"macs"' in capsys.readouterr().out


def _render_args(tmp_path: Path, **over) -> list[str]:
    args = {
        "avatar": str(tmp_path / "no-avatar"),
        "audio": str(tmp_path / "no.wav"),
        "-o": str(tmp_path / "out.mp4"),
        "--model": str(tmp_path / "no.onnx"),
        "--audio-encoder": str(tmp_path / "no-enc.onnx"),
    }
    args.update(over)
    argv = ["render", args.pop("avatar"), args.pop("audio")]
    for k, v in args.items():
        argv += [k, v]
    return argv


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({}, "audio file not found"),
        ({"-o": "/nonexistent-dir/out.mp4"}, "output's directory does not exist"),
        ({"-o": "OUT.avi"}, "must be an .mp4"),
    ],
    ids=["missing-audio", "missing-output-dir", "not-mp4"],
)
def test_render_bad_input_is_one_line_exit_2(tmp_path, capsys, over, message):
    if over.get("-o") == "OUT.avi":
        over = {"-o": str(tmp_path / "out.avi")}
    if over:  # an output problem: the inputs are there (they are checked first)
        (tmp_path / "no-avatar").mkdir()
        for name in ("no.wav", "no.onnx", "no-enc.onnx"):
            (tmp_path / name).write_bytes(b"present")
    rc = main(_render_args(tmp_path, **over))
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out.mp4").exists()


def test_bad_option_value_is_exit_2(tmp_path, capsys):
    (tmp_path / "a.wav").write_bytes(b"x")
    rc = main(_render_args(tmp_path, audio=str(tmp_path / "a.wav"), **{"--batch-size": "257"}))
    assert rc == 2
    assert "batch size must be in [1, 256], got 257" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ([], {"io_binding": True, "trt_fp16": False, "gpu_mem_limit_bytes": None}),
        (["--no-io-binding"], {"io_binding": False}),
        ([], {"graph_io": True}),
        (["--no-graph-io"], {"graph_io": False, "io_binding": True}),
        (
            ["--fp16", "--gpu-mem-limit", "5.5"],
            {"trt_fp16": True, "gpu_mem_limit_bytes": 5905580032},
        ),
    ],
)
def test_session_options_from_the_command_line(tmp_path, extra, expected):
    out = str(tmp_path / "o.mp4")
    argv = ["render", "avatar", "a.wav", "-o", out, "--model", "m.onnx", "--audio-encoder", "e"]
    args = build_parser().parse_args([*argv, *extra])
    session = config_from_args(args).session
    assert {k: getattr(session, k) for k in expected} == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "expected integers >= 1"),
        ("-2", "expected integers >= 1"),
        ("four", "expected comma-separated integers"),
        ("4,8", "expected one integer >= 1"),
    ],
)
def test_bench_render_batch_size_is_checked_before_anything_runs(value, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["bench", "render", "--batch-size", value])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


# ------------------------------------------------ render_argv: a config back to its flags


def _round_trip(config):
    from lipsync_ray.cli import build_parser, config_from_args, render_argv

    argv = ["render", "avatar", "speech.wav", "-o", "out.mp4", *render_argv(config)]
    return config_from_args(build_parser().parse_args(argv))


def _configs():
    from lipsync_ray.composite import BlendOptions
    from lipsync_ray.config import EncodeMode, Placement, PoolConfig, RenderConfig
    from lipsync_ray.encode import EncodeOptions, VideoCodec
    from lipsync_ray.inference import Provider, SessionOptions
    from lipsync_ray.precision import Precision
    from lipsync_ray.shards import ShardCodec
    from lipsync_ray.vad import SilenceOptions

    yield RenderConfig(model="m.onnx", audio_encoder="e.onnx")
    yield RenderConfig(
        model="m.onnx",
        features="f.npy",
        address="auto",
        pool=PoolConfig(
            inference_actors=3,
            gpus_per_actor=0.5,
            cpus_per_inference_actor=1.5,
            compositors=5,
            compositor_niceness=7,
            batch_size=16,
            chunk_frames=32,
            max_retries=0,
            chunk_timeout_s=12.5,
            placement=Placement.SPLIT,
        ),
        session=SessionOptions(
            providers=(Provider.CUDA, Provider.CPU),
            gpu_mem_limit_bytes=3 << 30,
            trt_fp16=True,
            trt_cache_dir="/tmp/trt",
            io_binding=False,
            graph_io=False,
        ),
        allow_cpu_fallback=True,
        encode=EncodeOptions(crf=28, preset="superfast", codec=VideoCodec.H264_NVENC),
        encode_mode=EncodeMode.SINGLE,
        shard_codec=ShardCodec.JPEG,
        blend=BlendOptions("hard", 0.2),
        silence=SilenceOptions(-40.0, 0.6, 2),
        precision=Precision.INT8,
        precision_threshold_db=30.0,
        precision_cache="/tmp/pc",
        work_dir="/tmp/wd",
        keep_shards=True,
        start_frame=9,
        overwrite=True,
    )


@pytest.mark.parametrize("index", [0, 1])
def test_render_argv_rebuilds_the_config(index):
    """Configs written out by hand, every field a flag sets in one of them: an independent
    check of the table's paths (the per-flag round trip below reads them from the table)."""
    config = list(_configs())[index]
    assert _round_trip(config) == config


def _non_default_values() -> dict:
    """A value other than the field's default for every flag of the table, by option."""
    from lipsync_ray.config import EncodeMode, Placement
    from lipsync_ray.inference import Provider
    from lipsync_ray.options import Blend, Precision, ShardCodec, VideoCodec
    from lipsync_ray.vad import SilenceOptions

    return {
        "--model": "other.onnx",
        "--audio-encoder": "other-enc.onnx",
        "--features": "f.npy",
        "--address": "auto",
        "--batch-size": 8,
        "--inference-actors": 3,
        "--gpus-per-actor": 0.5,
        "--cpus-per-actor": 1.5,
        "--compositors": 5,
        "--compositor-niceness": 7,
        "--chunk-frames": 32,
        "--max-retries": 0,
        "--chunk-timeout": 12.5,
        "--no-split-tail": False,
        "--placement": Placement.SPLIT,
        "--providers": (Provider.CUDA, Provider.CPU),
        "--gpu-mem-limit": 11 << 29,  # 5.5 GiB
        "--trt-cache": "/tmp/trt",
        "--fp16": True,
        "--no-io-binding": False,
        "--no-graph-io": False,
        "--precision": Precision.INT8,
        "--precision-threshold": 30.5,
        "--precision-cache": "/tmp/pc",
        "--allow-cpu-fallback": True,
        "--shard-codec": ShardCodec.JPEG,
        "--encode-mode": EncodeMode.SINGLE,
        "--video-codec": VideoCodec.H264_NVENC,
        "--crf": 28,
        "--preset": "superfast",
        "--x264-params": "me=umh:subme=4",
        "--start-frame": 9,
        "--blend": Blend.HARD,
        "--feather": 0.2,
        "--silence-passthrough": SilenceOptions(),
        "--silence-threshold-db": -40.0,
        "--silence-min-s": 0.6,
        "--silence-fade-frames": 2,
        "--work-dir": "/tmp/wd",
        "--keep-shards": True,
        "--overwrite": True,
    }


def _with(obj, path, value):
    """``obj`` with the field at ``path`` set to ``value`` (a section that is off turned on)."""
    from dataclasses import replace

    name, *rest = path
    if rest:
        value = _with(getattr(obj, name) or SECTIONS[name](), rest, value)
    return replace(obj, **{name: value})


def test_every_flag_of_the_table_has_a_value_to_try():
    assert [f.option for f in RENDER_FLAGS] == list(_non_default_values())


def _get(obj, path):
    for name in path:
        obj = None if obj is None else getattr(obj, name)
    return obj


@pytest.mark.parametrize("flag", RENDER_FLAGS, ids=lambda f: f.option)
def test_each_flag_round_trips(flag):
    """config -> render_argv -> parse -> config_from_args gives the same config, for a value
    of that one flag other than its default, which the flag carries."""
    from lipsync_ray.config import RenderConfig

    # The two audio sources exclude each other: --features replaces the encoder.
    base = RenderConfig(model="m.onnx", audio_encoder=None if flag.dest == "features" else "e")
    value = _non_default_values()[flag.option]
    config = _with(base, flag.path, value)
    assert _get(config, flag.path) == value != _get(base, flag.path)
    assert flag.option in render_argv(config)
    assert _round_trip(config) == config


def test_render_argv_writes_only_the_flags_asked_for():
    from lipsync_ray.config import RenderConfig
    from lipsync_ray.encode import EncodeOptions

    config = RenderConfig(model="m", audio_encoder="e", encode=EncodeOptions(crf=31))
    assert render_argv(config, ["--crf", "--preset"]) == ["--crf", "31", "--preset", "veryfast"]


# ------------------------------------------- flag defaults: the dataclasses' own, said once


def test_no_flags_give_the_dataclass_defaults():
    from lipsync_ray.config import RenderConfig

    args = build_parser().parse_args(
        ["render", "avatar", "a.wav", "-o", "o.mp4", "--model", "m", "--audio-encoder", "e"]
    )
    assert config_from_args(args) == RenderConfig(model="m", audio_encoder="e")


def test_bench_render_builds_its_config_with_the_render_flags():
    from dataclasses import replace

    from lipsync_ray.cli import render_options_from_args
    from lipsync_ray.config import RenderConfig

    config = replace(list(_configs())[1], features=None, work_dir=None, address=None)
    config = replace(config, keep_shards=False, overwrite=False)
    flags = render_argv(config)[2:]  # without --model; bench render makes its own models
    flags = [f for f in flags if f not in ("--features", "f.npy")]
    args = build_parser().parse_args(["bench", "render", *flags])
    built = RenderConfig(model="-", audio_encoder="-", **render_options_from_args(args))
    assert built == replace(config, model="-", audio_encoder="-")


@pytest.mark.parametrize(
    ("command", "flag", "cls_field"),
    [
        (["render"], "--chunk-frames", ("config.PoolConfig", "chunk_frames")),
        (["render"], "--crf", ("encode.EncodeOptions", "crf")),
        (["render-batch"], "--silence-min-s", ("vad.SilenceOptions", "min_silence_s")),
        (
            ["bench", "render"],
            "--precision-threshold",
            ("config.RenderConfig", "precision_threshold_db"),
        ),
        (["bench", "encode"], "--crf", ("encode.EncodeOptions", "crf")),
        (["reference"], "--preset", ("encode.EncodeOptions", "preset")),
        (["render"], "--x264-params", ("encode.EncodeOptions", "x264_params")),
        (["reference"], "--x264-params", ("encode.EncodeOptions", "x264_params")),
        (["prepare"], "--smoothing", ("prepare.PrepareOptions", "smoothing_window")),
    ],
)
def test_help_shows_the_dataclass_default(command, flag, cls_field, monkeypatch):
    """The help text reads the default from the field: change the field, the help follows."""
    import dataclasses
    import importlib

    from lipsync_ray import cli

    module, name = cls_field[0].split(".")
    cls = getattr(importlib.import_module(f"lipsync_ray.{module}"), name)
    (field,) = [f for f in dataclasses.fields(cls) if f.name == cls_field[1]]
    monkeypatch.setattr(field, "default", 77)
    action = _action(cli.build_parser(), [*command, flag])
    assert action.default is None
    assert action.help.endswith("(default 77)"), action.help


@pytest.mark.parametrize(
    ("flag", "field"),
    [
        ("--batch-size", "batch_size"),
        ("--inference-actors", "inference_actors"),
        ("--gpus-per-actor", "gpus_per_actor"),
        ("--cpus-per-actor", "cpus_per_inference_actor"),
        ("--compositors", "compositors"),
    ],
)
def test_help_of_a_pool_size_left_to_the_cluster_comes_from_the_sizing(flag, field, monkeypatch):
    """The help shows what PoolConfig.resolved picks (no second statement of its rules):
    change its constants, the help follows."""
    from lipsync_ray import config

    monkeypatch.setattr(config, "GPU_SHARE", 0.5)
    monkeypatch.setattr(config, "GPU_BATCH", 32)
    monkeypatch.setattr(config, "CPU_BATCH", 3)
    on_gpu, on_cpu = config.PoolConfig().resolved(16, 1), config.PoolConfig().resolved(8, 0)
    help = _action(build_parser(), ["render", flag]).help
    assert help.endswith(
        f"(default: sized from the cluster: {getattr(on_gpu, field):g} on 16 CPUs + 1 GPU, "
        f"{getattr(on_cpu, field):g} on 8 CPUs)"
    ), help
    if field == "batch_size":
        assert "32 on 16 CPUs + 1 GPU, 3 on 8 CPUs" in help


def _action(parser, path):
    *commands, flag = path
    for name in commands:
        (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        parser = sub.choices[name]
    (action,) = [a for a in parser._actions if flag in a.option_strings]
    return action


# ------------------------------------------------- the unit tier's tripwire (tests/conftest.py)


def test_the_unit_tier_cannot_start_ray():
    import ray

    with pytest.raises(RuntimeError, match=r"not marked `ray`.*mark the test @pytest\.mark\.ray"):
        ray.init(address="local", num_cpus=1)
    assert not ray.is_initialized()
