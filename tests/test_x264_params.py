"""``EncodeOptions.x264_params`` / ``--x264-params``: the allow-list refuses what it must, the
options reach libx264 in every place it is opened, and they are part of a render's identity.

What x264 was actually opened with is read from the stream itself: x264 writes its settings
into the first frame as a user-data SEI, ``x264 - core N ... options: key=value key=value ...``,
so an option that did not reach the encoder cannot pass.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import av
import numpy as np
import pytest
from helpers import one_error_line, psnr_db, ray_tripwire

from lipsync_ray.cli import build_parser, main
from lipsync_ray.config import RenderConfig
from lipsync_ray.encode import (
    EncodeOptions,
    VideoCodec,
    bgr_to_yuv420p,
    encode_segment,
    encode_video,
)
from lipsync_ray.errors import InputError
from lipsync_ray.flags import encode_from_args, render_argv
from lipsync_ray.options import DEFAULT_X264_PARAMS, X264_PARAM_KEYS
from lipsync_ray.workdir.fingerprint import render_fingerprint

W, H = 128, 96


def _frames(n: int = 6, seed: int = 0) -> list[np.ndarray]:
    """uint8 (H, W, 3) BGR: a smooth moving picture with a little noise (a photo's texture)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:H, 0:W].astype(np.float32)
    frames = []
    for i in range(n):
        base = 128 + 60 * np.sin((x + 3 * i) / 9.0) * np.cos((y - 2 * i) / 7.0)
        rgb = np.stack([base, 255 - base, 0.5 * base + 60], axis=-1)
        frames.append(np.clip(rgb + rng.normal(0, 3, rgb.shape), 0, 255).astype(np.uint8))
    return frames


def _x264_settings(path: Path) -> dict[str, str]:
    """The ``options:`` of the x264 SEI in ``path``'s bytes, as ``{name: value}``."""
    data = path.read_bytes()
    at = data.find(b"x264 - core ")
    assert at >= 0, f"no x264 SEI in {path}"
    start = data.index(b"options: ", at) + len(b"options: ")
    text = data[start : data.index(b"\x00", start)].decode("ascii")
    return dict(item.split("=", 1) for item in text.split())


# ------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("keyint=1", "expected one of me, subme, .*, got 'keyint'"),
        ("scenecut=40", "got 'scenecut'"),
        ("open-gop=1", "got 'open-gop'"),
        ("crf=10", "got 'crf'"),
        ("preset=slow", "got 'preset'"),
        ("threads=8", "got 'threads'"),
        ("no-mbtree=1", "got 'no-mbtree'"),
        ("me=dia:me=hex", "expected each key once, got 'me' twice"),
        ("me", r"expected key=value, got 'me'"),
        ("me=", r"expected key=value, got 'me='"),
        ("=dia", r"expected key=value, got '=dia'"),
        ("me=dia:", r"expected key=value, got ''"),
        ("me=dia::subme=1", r"expected key=value, got ''"),
        ("me=esa", r"me expected one of dia\|hex\|umh, got 'esa'"),
        ("subme=12", r"subme expected an integer in 0..11, got '12'"),
        ("subme=-1", r"subme expected an integer in 0..11, got '-1'"),
        ("subme=1.5", r"subme expected an integer in 0..11, got '1.5'"),
        ("ref=0", r"ref expected an integer in 1..16, got '0'"),
        ("mbtree=2", r"mbtree expected 0 or 1, got '2'"),
        ("aq-strength=4", r"aq-strength expected a number in 0..3, got '4'"),
        ("aq-strength=.", r"aq-strength expected a number in 0..3, got '.'"),
        ("partitions=i8x8,p16x16", "partitions expected a comma list of"),
        ("Me=dia", "expected lower-case letters, digits and '=:,.-' only, got 'M'"),
        ("me=dia x264opts=1", r"only, got ' '"),
        ("me='dia'", r"only, got \"'\""),
        (r"me=dia\:keyint=1", r"only, got '\\\\'"),
        ("me=dia;keyint=1", "only, got ';'"),
        ("me=dia\nkeyint=1", r"only, got '\\n'"),
        ("mé=dia", "only, got 'é'"),
        (["me=dia"], "must be text 'key=value:key=value', got"),
    ],
)
def test_bad_x264_params_are_refused(text, match) -> None:
    with pytest.raises(InputError, match=match):
        EncodeOptions(x264_params=text)


def test_x264_params_are_refused_with_nvenc() -> None:
    with pytest.raises(
        InputError, match="x264 params apply to libx264 only, got 'me=dia' with h264"
    ):
        EncodeOptions(codec=VideoCodec.H264_NVENC, x264_params="me=dia")
    # the default is libx264's and left alone: `--video-codec h264_nvenc` alone works
    assert EncodeOptions(codec=VideoCodec.H264_NVENC).resolved_x264_params == ""


@pytest.mark.parametrize(
    ("preset", "given", "expected"),
    [
        ("veryfast", None, DEFAULT_X264_PARAMS),  # the default: measured for veryfast
        ("slow", None, ""),  # any other preset runs alone
        ("ultrafast", None, ""),
        ("veryfast", "", ""),  # veryfast alone
        ("slow", "me=dia", "me=dia"),  # given: on top of any preset
    ],
)
def test_the_default_options_belong_to_veryfast(preset, given, expected) -> None:
    opts = EncodeOptions(preset=preset, x264_params=given)
    assert opts.resolved_x264_params == expected
    # a request that changes the preset of a default config (the service's per-job preset)
    # gets that preset's own default, not veryfast's options
    assert replace(EncodeOptions(), preset=preset, x264_params=given).resolved_x264_params == (
        expected
    )


@pytest.mark.parametrize("command", ["render", "reference"])
def test_the_cli_refuses_bad_params_before_anything_starts(command, tmp_path, monkeypatch, capsys):
    ray_tripwire(monkeypatch)
    out = tmp_path / "o.mp4"
    argv = [command, str(tmp_path / "avatar"), str(tmp_path / "a.wav"), "-o", str(out)]
    argv += ["--model", "m.onnx", "--audio-encoder", "e.onnx", "--x264-params", "me=dia:keyint=1"]
    assert main(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "x264 params: expected one of me, subme" in line and "got 'keyint'" in line
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------- the options reach libx264

# Every key of the allow-list, with the setting x264 reports once it took it (SEI names).
REACHES_X264 = [
    ("me=dia", {"me": "dia"}),
    ("me=umh:merange=24", {"me": "umh", "me_range": "24"}),  # hex and dia fix the range at 16
    ("subme=1", {"subme": "1"}),
    ("partitions=none", {"analyse": "0x3:0"}),
    ("partitions=i8x8,i4x4", {"analyse": "0x3:0x3"}),
    ("ref=2:mixed-refs=1", {"ref": "2", "mixed_ref": "1"}),
    ("trellis=1", {"trellis": "1"}),
    ("mbtree=0", {"mbtree": "0"}),
    ("rc-lookahead=5", {"rc_lookahead": "5"}),
    ("aq-mode=0", {"aq": "1:0.00"}),  # with mb-tree on, x264 keeps AQ's machinery at strength 0
    ("aq-strength=0.5", {"aq": "1:0.50"}),
    ("bframes=0", {"bframes": "0"}),
    ("b-adapt=0", {"b_adapt": "0"}),
    ("weightp=0", {"weightp": "0"}),
    ("weightb=0", {"weightb": "0"}),
    ("8x8dct=0", {"8x8dct": "0"}),
    ("fast-pskip=0", {"fast_pskip": "0"}),
    ("dct-decimate=0", {"decimate": "0"}),
]


def test_every_allowed_key_is_tried_below() -> None:
    tried = {item.split("=")[0] for text, _ in REACHES_X264 for item in text.split(":")}
    assert tried == set(X264_PARAM_KEYS)


@pytest.mark.parametrize(("text", "reported"), REACHES_X264, ids=[t for t, _ in REACHES_X264])
def test_params_reach_the_segment_encoder(text, reported, tmp_path) -> None:
    plain, tuned = tmp_path / "plain.mp4", tmp_path / "tuned.mp4"
    encode_segment(_frames(3), plain, EncodeOptions(x264_params="", threads=1))
    encode_segment(_frames(3), tuned, EncodeOptions(x264_params=text, threads=1))
    before, after = _x264_settings(plain), _x264_settings(tuned)
    assert {k: after[k] for k in reported} == reported
    assert {k: before[k] for k in reported} != reported  # veryfast alone differs: a real change
    # the segments' fixed GOP settings stay, whatever the user's options
    assert after["scenecut"] == before["scenecut"] == "0"
    assert after.get("open_gop", "no B-frames") in ("0", "no B-frames")


def _without_threads(settings: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in settings.items() if "threads" not in k}  # the machine's choice


def test_the_default_reaches_both_encode_modes(tmp_path) -> None:
    """EncodeOptions() opens x264 with the default options in segment and single mode
    alike: the settings x264 reports are those of the default given explicitly, and (the
    default being options) not those of veryfast alone."""
    seg, single = tmp_path / "seg.mp4", tmp_path / "single.mp4"
    encode_segment(_frames(), seg, EncodeOptions())
    encode_video(_frames(), None, 16_000, single, EncodeOptions(), expected_frames=6)
    explicit = _without_threads(_x264_settings_of(DEFAULT_X264_PARAMS))
    assert _without_threads(_x264_settings(seg)) == explicit
    assert _without_threads(_x264_settings(single)) == explicit
    if DEFAULT_X264_PARAMS:  # options on top of the preset: x264 reports other settings
        assert explicit != _without_threads(_x264_settings_of(""))


def _x264_settings_of(text: str) -> dict[str, str]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s.mp4"
        encode_segment(_frames(3), path, EncodeOptions(x264_params=text))
        return _x264_settings(path)


def test_the_reference_script_takes_the_renders_params() -> None:
    """`bench render --reference` runs `reference` with the render's x264 options, which
    `reference` turns into its EncodeOptions."""
    config = RenderConfig(model="m", encode=EncodeOptions(x264_params="me=dia:subme=1"))
    flags = render_argv(config, ["--crf", "--preset", "--x264-params"])
    args = build_parser().parse_args(["reference", "av", "a.wav", "-o", "o.mp4", "--model", "m",
                                      "--audio-encoder", "e", *flags])  # fmt: skip
    assert encode_from_args(args) == replace(EncodeOptions(), x264_params="me=dia:subme=1")


# ------------------------------------------------------------------------- quality, identity


def test_round_trip_with_the_default_keeps_plain_veryfasts_quality(tmp_path) -> None:
    """frames -> H.264 -> decode, compared with the encoder's input (the frames' yuv420p
    planes, so the conversion's own loss does not hide the encoder's): the default is as close
    to the frames as veryfast alone, in about as many bytes."""
    frames = _frames(12)
    psnrs, sizes = {}, {}
    for name, text in (("default", DEFAULT_X264_PARAMS), ("plain", "")):
        path = tmp_path / f"{name}.mp4"
        encode_segment(frames, path, EncodeOptions(x264_params=text, threads=1))
        with av.open(str(path)) as container:
            got = [f.to_ndarray(format="yuv420p") for f in container.decode(video=0)]
        assert len(got) == len(frames)
        psnrs[name] = [psnr_db(g, bgr_to_yuv420p(f)) for g, f in zip(got, frames, strict=True)]
        sizes[name] = path.stat().st_size
    # Measured at 128x96, CRF 20 (PyAV 18.1, x264 core 165): veryfast alone 40.58 dB worst
    # frame, 41.11 mean, 4330 bytes; the default 40.61, 41.10, 4335 bytes.
    assert min(psnrs["default"]) > 39.5
    assert np.mean(psnrs["default"]) > np.mean(psnrs["plain"]) - 0.3
    assert sizes["default"] < 1.1 * sizes["plain"]


def test_the_params_are_part_of_the_render_fingerprint() -> None:
    def fingerprint(text: str) -> str:
        config = RenderConfig(model="m", encode=EncodeOptions(x264_params=text))
        return render_fingerprint(
            config, config.pool, avatar="a" * 64, model="m" * 64,
            features=np.zeros((4, 512), np.float32), start_frame=0, audio="s" * 64,
        )  # fmt: skip

    assert fingerprint("me=dia") == fingerprint("me=dia")
    assert len({fingerprint(t) for t in ("", "me=dia", "me=dia:subme=1", "subme=1")}) == 4


def test_the_params_are_in_the_report_settings() -> None:
    settings = RenderConfig(model="m", encode=EncodeOptions(x264_params="me=dia")).to_dict()
    assert settings["encode"]["x264_params"] == "me=dia"
