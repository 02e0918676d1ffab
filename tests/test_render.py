"""The Ray render end to end on a local cluster (2 CPUs, one simulated GPU), small models."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from dataclasses import replace
from pathlib import Path

import av
import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import demo_inputs, psnr_db

from lipsync_ray.actors import CompositorActor, session_options_here
from lipsync_ray.avatar import Avatar, pingpong_indices
from lipsync_ray.chunks import ChunkSpec, JobContext, Predictions
from lipsync_ray.composite import Blend, BlendOptions
from lipsync_ray.config import EncodeMode, PoolConfig, RenderConfig
from lipsync_ray.dev.speech import synth_speech, write_audio
from lipsync_ray.encode import EncodeOptions, probe
from lipsync_ray.inference import CUDA_ARENA_SHARE, SessionOptions
from lipsync_ray.pipeline import render
from lipsync_ray.shards import SHARD_SCHEMA, ShardCodec, iter_shard_frames
from lipsync_ray.vad import SilenceOptions, passthrough_weights
from lipsync_ray.workdir.layout import spare_dir

pytestmark = pytest.mark.ray

SECONDS = 2.4  # audio: 2.4 s → about 62 output frames, longer than the 1 s avatar (ping-pong)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("render-inputs")
    inputs = demo_inputs(
        root, avatar_seconds=1.0, size_wh=(320, 240), avatar_seed=1, audio_seconds=SECONDS,
        audio_seed=3,
    )  # fmt: skip
    return {**inputs, "root": root}


def _config(models, model: str = "identity", **kw) -> RenderConfig:
    pool = kw.pop("pool", PoolConfig(chunk_frames=16, gpus_per_actor=0.0, compositors=1))
    return RenderConfig(
        model=str(models[model]), audio_encoder=str(models["encoder"]), pool=pool, **kw
    )


def _decode(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="bgr24") for f in container.decode(video=0)]


def _shard_table(work_dir: Path):
    files = sorted((work_dir / "shards").glob("chunk-*.parquet"))
    return files, [pq.read_table(f) for f in files]


def test_a_clip_of_one_chunk_starts_no_actor_it_cannot_use(
    ray_cluster, small_models, inputs, tmp_path
):
    # ~62 frames, one 64-frame chunk: one inference actor with the CPUs the compositor leaves
    # (2 CPUs would otherwise get two 1-thread actors and two compositors).
    config = _config(small_models, pool=PoolConfig(chunk_frames=64, gpus_per_actor=0.0))
    report = render(inputs["avatar"], inputs["audio"], tmp_path / "one.mp4", config)
    assert report.chunks == 1
    assert sorted(a.role for a in report.actors) == ["compositor", "inference"]
    assert "capped at the render's 1 chunk" in report.settings["pool_sizing"]
    assert report.settings["pool_resolved"]["cpus_per_inference_actor"] == 1.5
    assert [a.threads for a in report.actors if a.role == "inference"] == [2]


def test_identity_render_reproduces_the_avatar(ray_cluster, small_models, inputs, tmp_path):
    out = tmp_path / "out.mp4"
    config = _config(
        small_models, shard_codec=ShardCodec.PNG, keep_shards=True, blend=BlendOptions(Blend.HARD)
    )
    report = render(inputs["avatar"], inputs["audio"], out, config)

    avatar = Avatar.open(inputs["avatar"])
    frames = _decode(out)
    assert len(frames) == report.frames
    assert report.chunks == -(-report.frames // 16)
    expected = avatar.read_frames(pingpong_indices(report.frames, avatar.frame_count))
    psnrs = [psnr_db(f, e) for f, e in zip(frames, expected, strict=True)]
    # measured 38.1 dB worst frame: H.264 CRF 20 + two bicubic resizes in the box
    assert min(psnrs) > 32.0, min(psnrs)

    media = probe(out)
    assert media.video_frames == report.frames and media.fps == 25
    assert abs(media.audio_duration_s - media.video_duration_s) <= 1 / 25

    # shards: plain pyarrow, schema, rows in frame order, lossless against the decoded MP4 source
    files, tables = _shard_table(Path(report.work_dir))
    assert len(files) == report.chunks
    rows = [i for t in tables for i in t.column("frame_index").to_pylist()]
    assert rows == list(range(report.frames))
    for t in tables:
        assert t.schema.remove_metadata().equals(SHARD_SCHEMA)
        assert set(t.column("codec").to_pylist()) == {"png"}

    manifest = json.loads((Path(report.work_dir) / "manifest.json").read_text())
    assert manifest["frames"] == report.frames
    assert len(manifest["chunks"]) == report.chunks
    first = manifest["chunks"]["000000"]
    assert (first["start"], first["stop"], first["rows"]) == (0, 16, 16)
    assert len(first["sha256"]) == 64 and manifest["fingerprint"]

    saved = json.loads((Path(report.work_dir) / "report.json").read_text())
    assert saved["frames"] == report.frames and saved["providers"] == ["CPUExecutionProvider"]
    assert set(saved["stages"]["ms_per_frame"]) >= {
        "inference",
        "composite",
        "shard_write",
        "encode",
        "encode_join",
        "encode_audio",  # the AAC track, encoded ahead once the last chunk was submitted
    }


def test_resume_reuses_verified_chunks(ray_cluster, small_models, inputs, tmp_path):
    out = tmp_path / "out.mp4"
    config = _config(small_models, model="unet", shard_codec=ShardCodec.RAW, keep_shards=True)
    first = render(inputs["avatar"], inputs["audio"], out, config)
    out.unlink()
    # damage one shard: only that chunk renders again
    victim = Path(first.work_dir) / "shards" / "chunk-000001.parquet"
    victim.write_bytes(victim.read_bytes()[:-10])
    second = render(inputs["avatar"], inputs["audio"], out, config)
    assert second.chunks_reused == first.chunks - 1 and second.chunks_rendered == 1
    _, tables = _shard_table(Path(second.work_dir))
    assert len(tables) == first.chunks
    assert "encode_audio" in second.stages.ms_per_frame

    # nothing left to render: no chunk is submitted, so the join encodes the AAC track itself
    out.unlink()
    third = render(inputs["avatar"], inputs["audio"], out, config)
    assert third.chunks_rendered == 0 and "encode_audio" not in third.stages.ms_per_frame
    media = probe(out)
    assert abs(media.audio_duration_s - media.video_duration_s) <= 1 / 25

    other = replace(config, start_frame=5, overwrite=False)
    out.unlink()
    from lipsync_ray.errors import InputError

    with pytest.raises(InputError, match="other inputs or settings"):
        render(inputs["avatar"], inputs["audio"], out, other)


def test_compositor_count_does_not_change_lossless_shards(
    ray_cluster, small_models, inputs, tmp_path
):
    images = []
    for compositors in (1, 3):
        pool = PoolConfig(
            chunk_frames=16,
            compositors=compositors,
            cpus_per_compositor=0.25,
            gpus_per_actor=0.0,
            cpus_per_inference_actor=1.0,
        )
        config = _config(
            small_models,
            model="unet",
            pool=pool,
            shard_codec=ShardCodec.RAW,
            keep_shards=True,
            encode_mode=EncodeMode.SINGLE,
        )
        report = render(inputs["avatar"], inputs["audio"], tmp_path / f"c{compositors}.mp4", config)
        _, tables = _shard_table(Path(report.work_dir))
        images.append([cell for t in tables for cell in t.column("image").to_pylist()])
    assert len(images[0]) == len(images[1]) > 0
    assert all(a == b for a, b in zip(*images, strict=True))


def test_the_last_chunks_split_between_inference_actors_give_the_same_frames(
    ray_cluster, small_models, inputs, tmp_path, caplog
):
    """59 frames in chunks of 20 on two inference actors: the last two chunks are split by
    what each actor still has to infer (chunk 1 stays whole on the actor that has nothing,
    chunk 2 is split about evenly). Every frame is the one an unsplit render makes, bit for
    bit (lossless shards)."""
    images, logs = [], []
    for split in (True, False):
        pool = PoolConfig(
            chunk_frames=20, inference_actors=2, cpus_per_inference_actor=0.5, compositors=1,
            cpus_per_compositor=0.5, gpus_per_actor=0.0, split_tail=split,
        )  # fmt: skip
        config = _config(small_models, model="unet", pool=pool, shard_codec=ShardCodec.RAW,
                         keep_shards=True)  # fmt: skip
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="lipsync_ray.scheduler"):
            report = render(inputs["avatar"], inputs["audio"], tmp_path / f"{split}.mp4", config)
        logs.append([r.getMessage() for r in caplog.records if " split " in r.getMessage()])
        assert report.chunks == 3 and report.frames == 59
        _, tables = _shard_table(Path(report.work_dir))
        images.append([cell for t in tables for cell in t.column("image").to_pylist()])
    chunk_2 = r"chunk 2 \(frames 40-58\) split \[(9|10|11), (8|9|10)\] by"
    assert [m for m in logs[0] if re.match(chunk_2, m)], logs[0]
    assert logs[1] == []
    assert len(images[0]) == len(images[1]) == 59
    assert all(a == b for a, b in zip(*images, strict=True))


def test_four_actors_share_a_simulated_gpu(ray_cluster, small_models, inputs, tmp_path):
    pool = PoolConfig(
        chunk_frames=8,
        inference_actors=4,
        gpus_per_actor=0.25,
        cpus_per_inference_actor=0.25,
        cpus_per_compositor=0.5,
        compositors=1,
        batch_size=4,
    )
    report = render(
        inputs["avatar"],
        inputs["audio"],
        tmp_path / "gpu.mp4",
        # the simulated GPU has no CUDA behind it: accept the CPU, as a user would have to
        _config(small_models, model="unet", pool=pool, allow_cpu_fallback=True),
    )
    inference = [a for a in report.actors if a.role == "inference"]
    assert len(inference) == 4
    assert all(a.gpu_ids for a in inference)  # Ray placed each on the GPU
    assert {a.providers[0] for a in inference} == {"CPUExecutionProvider"}  # and they fell back
    assert all(a.cpu_fallback for a in inference)  # with ONNX Runtime's reason recorded
    assert report.providers == ("CPUExecutionProvider",)
    assert report.settings["pool_resolved"]["gpus_per_actor"] == 0.25


def test_a_quarter_gpu_worker_limits_its_cuda_arena(ray_cluster, tmp_path):
    """What an inference actor does first, in a Ray worker holding 0.25 of the simulated GPU,
    with an nvidia-smi that reports a 24 GiB card (MiB, as the real one prints)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text('#!/bin/sh\necho "24576"\n')
    (fake / "nvidia-smi").chmod(0o755)
    env = {"PATH": f"{fake}:{os.environ['PATH']}"}

    @ray_cluster.remote(num_gpus=0.25, num_cpus=0, runtime_env={"env_vars": env})
    def fitted(options):
        return session_options_here(options), ray_cluster.get_gpu_ids()

    options, gpu_ids = ray_cluster.get(fitted.remote(SessionOptions()), timeout=120)
    assert gpu_ids
    assert options.gpu_mem_limit_bytes == int(24 * 2**30 * 0.25 * CUDA_ARENA_SHARE)
    assert options.providers == SessionOptions().providers  # CUDA is still tried first
    explicit = SessionOptions(gpu_mem_limit_bytes=2**30)
    assert ray_cluster.get(fitted.remote(explicit), timeout=120)[0] == explicit


def test_silence_passthrough_keeps_avatar_frames(ray_cluster, small_models, inputs, tmp_path):
    speech = synth_speech(3.2, seed=5)
    speech[16000 * 1 : 16000 * 2] = 0.0  # one second of digital silence in the middle
    audio = write_audio(tmp_path / "pause.wav", speech)
    silence = SilenceOptions(fade_frames=3)
    config = _config(small_models, model="unet", shard_codec=ShardCodec.RAW, keep_shards=True,
                     silence=silence)  # fmt: skip
    report = render(inputs["avatar"], audio, tmp_path / "pause.mp4", config)

    from lipsync_ray.audio import load_audio

    weights = passthrough_weights(load_audio(audio), 16000, report.frames, 25.0, silence)
    assert (weights == 0).sum() > 10 and (weights == 1).sum() > 10
    assert report.frames_generated == int((weights > 0).sum()) < report.frames

    avatar = Avatar.open(inputs["avatar"])
    expected = avatar.read_frames(pingpong_indices(report.frames, avatar.frame_count))
    _, tables = _shard_table(Path(report.work_dir))
    got = [np.frombuffer(c, np.uint8).reshape(240, 320, 3)
           for t in tables for c in t.column("image").to_pylist()]  # fmt: skip
    for i, w in enumerate(weights):
        same = np.array_equal(got[i], expected[i])
        assert same == (w == 0), (i, w)  # silent frames are the avatar frame, exactly


def test_feather_reduces_the_seam(ray_cluster, small_models, inputs, tmp_path):
    scores = {}
    for mode in (Blend.HARD, Blend.FEATHER):
        config = _config(small_models, model="unet", blend=BlendOptions(mode))
        report = render(inputs["avatar"], inputs["audio"], tmp_path / f"{mode.value}.mp4", config)
        scores[mode] = report.seam_score
    assert scores[Blend.FEATHER] < 0.8 * scores[Blend.HARD], scores


def _composite_chunk(actor, avatar_path: Path, work_dir: Path, chunk: int, reuse: bool):
    avatar = Avatar.open(avatar_path)
    n = 8
    spec = ChunkSpec(chunk, chunk * n, chunk * n + n, np.arange(n), np.zeros((n + 16, 512), "f4"))
    preds = Predictions(chunk, avatar.read_visual_inputs(np.arange(n))[..., :3].copy(), {}, {}, "t")
    job = JobContext(str(work_dir), "fp", ShardCodec.RAW, segments=True, reuse_spares=reuse)
    return actor.composite(spec, preds, job)


def test_compositor_writes_its_shard_over_a_spare(ray_cluster, inputs, tmp_path):
    """With ``reuse_spares`` a compositor overwrites a spare file left by the driver (same
    inode, so the same cached pages) and the shard holds the same frames."""
    actor = CompositorActor(str(inputs["avatar"]), EncodeOptions(), cpus=1)
    plain = _composite_chunk(actor, inputs["avatar"], tmp_path / "plain", 1, reuse=False)
    spares = spare_dir(tmp_path / "reused")
    spares.mkdir(parents=True)
    spare = spares / "chunk-000000.parquet"
    spare.write_bytes(bytes(plain.shard.bytes + 4096))
    inode = spare.stat().st_ino
    reused = _composite_chunk(actor, inputs["avatar"], tmp_path / "reused", 1, reuse=True)
    shard = tmp_path / "reused" / reused.shard.file
    assert not spare.exists() and shard.stat().st_ino == inode
    assert reused.shard.bytes == plain.shard.bytes
    got = np.stack(list(iter_shard_frames(shard, range(8, 16))))
    want = np.stack(list(iter_shard_frames(tmp_path / "plain" / plain.shard.file, range(8, 16))))
    np.testing.assert_array_equal(got, want)


_FAULTS_PER_ROUND = """
import ctypes, resource, sys
from lipsync_ray.actors import retain_freed_memory
if sys.argv[1] == "1":
    assert retain_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
size = 40 << 20  # above glibc's largest automatic mmap threshold (32 MB)
counts = []
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(ctypes.c_void_p(block))
    counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(max(counts[1:]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_retained_memory_is_not_faulted_in_again(tmp_path):
    """After ``retain_freed_memory`` a freed 40 MB block is reused without page faults; by
    default glibc maps it afresh every time (10,240 faults of 4 KiB)."""
    import subprocess

    def faults(retain: bool) -> int:
        run = subprocess.run(
            [sys.executable, "-c", _FAULTS_PER_ROUND, "1" if retain else "0"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        return int(run.stdout)

    assert faults(retain=False) > 5000
    assert faults(retain=True) < 100
