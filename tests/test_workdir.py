"""The work directory object, without Ray: resume, verification, records and clean-up."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from lipsync_ray.chunks import ChunkRange, ChunkResult, plan_chunks
from lipsync_ray.config import EncodeMode, PoolConfig, RenderConfig
from lipsync_ray.errors import InputError
from lipsync_ray.report import RunReport, StageTimes
from lipsync_ray.shards import ShardCodec, write_shard
from lipsync_ray.workdir import Job, Manifest, WorkDir, layout

FRAMES, CHUNK = 10, 4  # chunks of 4, 4 and 2 frames


def _config(**kwargs) -> RenderConfig:
    base = RenderConfig(
        model="unet.onnx",
        encode_mode=EncodeMode.SINGLE,  # shards alone complete a chunk: no H.264 needed here
        pool=PoolConfig(chunk_frames=CHUNK),
    )
    return replace(base, **kwargs)


def _job(tmp_path) -> Job:
    return Job(
        audio=tmp_path / "a.wav",
        output=tmp_path / "out.mp4",
        work_dir=tmp_path / "out.mp4.work",
        start_frame=0,
        features=None,
    )


def _open(tmp_path, config: RenderConfig, fingerprint: str = "fp") -> WorkDir:
    work = WorkDir.open(_job(tmp_path), config)
    work.begin(fingerprint, FRAMES, spares=2)
    return work


def _render(work: WorkDir, chunk: ChunkRange) -> ChunkResult:
    """What a compositor returns for ``chunk``: its shard, written into the work directory."""
    rng = np.random.default_rng(chunk.chunk)
    frames = rng.integers(0, 256, (chunk.frames, 8, 12, 3), dtype=np.uint8)
    context = work.context()
    shard = write_shard(
        layout.shard_path(work.path, chunk.chunk), chunk.chunk, np.arange(chunk.start, chunk.stop),
        np.arange(chunk.frames), frames, ShardCodec.RAW, context.fingerprint, work.path,
        checksum=context.shard_checksums,
    )  # fmt: skip
    return ChunkResult(shard=shard, segment=None)


def _report(work: WorkDir) -> RunReport:
    return RunReport(
        output=str(work.job.output), work_dir=str(work.path), frames=FRAMES, chunks=3,
        chunks_rendered=3, chunks_reused=0, wall_s=1.0, fps=10.0, stages=StageTimes(),
        retries=0, frames_generated=FRAMES, seam_score=None, precision={}, actors=(),
        providers=(), audio_duration_s=0.4, video_duration_s=0.4, settings={},
    )  # fmt: skip


def test_a_fresh_work_directory_has_every_chunk_pending(tmp_path):
    plan = plan_chunks(FRAMES, CHUNK)
    assert [(r.chunk, r.start, r.stop, r.frames) for r in plan] == [
        (0, 0, 4, 4), (1, 4, 8, 4), (2, 8, 10, 2)
    ]  # fmt: skip
    work = _open(tmp_path, _config())
    assert work.pending(plan) == plan
    assert layout.manifest_path(work.path).is_file()


def test_pending_skips_verified_chunks_and_renders_a_corrupted_one_again(tmp_path):
    plan = plan_chunks(FRAMES, CHUNK)
    work = _open(tmp_path, _config())
    for chunk in plan:
        work.record(_render(work, chunk))
    again = _open(tmp_path, _config())
    assert again.pending(plan) == []
    shard = layout.shard_path(work.path, 1)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes: only the checksum sees it
    shard.write_bytes(bytes(data))
    third = _open(tmp_path, _config())
    assert third.pending(plan) == [plan[1]]
    assert 1 not in Manifest.load(work.path).chunks  # forgotten until rendered again


def test_record_then_reopen_resumes(tmp_path):
    plan = plan_chunks(FRAMES, CHUNK)
    work = _open(tmp_path, _config())
    work.record(_render(work, plan[0]))
    work.record(_render(work, plan[2]))
    resumed = _open(tmp_path, _config())
    assert resumed.pending(plan) == [plan[1]]
    resumed.record(_render(resumed, plan[1]))
    assert _open(tmp_path, _config()).pending(plan) == []


def test_an_orphan_shard_is_adopted(tmp_path):
    """A shard renamed into place whose record never made it (the driver died) is reused."""
    plan = plan_chunks(FRAMES, CHUNK)
    work = _open(tmp_path, _config())
    _render(work, plan[0])  # written, not recorded
    assert _open(tmp_path, _config()).pending(plan) == plan[1:]


def test_another_fingerprint_is_refused_or_wiped_with_overwrite(tmp_path):
    plan = plan_chunks(FRAMES, CHUNK)
    work = _open(tmp_path, _config())
    work.record(_render(work, plan[0]))
    with pytest.raises(InputError, match="other inputs or settings"):
        _open(tmp_path, _config(), fingerprint="other")
    wiped = _open(tmp_path, _config(overwrite=True), fingerprint="other")
    assert wiped.pending(plan) == plan
    assert not layout.shard_path(work.path, 0).exists()


@pytest.mark.parametrize("keep", [False, True])
def test_finish_removes_the_chunk_files_unless_kept(tmp_path, keep):
    plan = plan_chunks(FRAMES, CHUNK)
    work = _open(tmp_path, _config(keep_shards=keep))
    for chunk in plan:
        work.record(_render(work, chunk))
    report = work.finish(_report(work))
    assert report.work_dir == str(work.path)  # a local work directory: nothing relocated
    assert layout.report_path(work.path).is_file()
    assert layout.manifest_path(work.path).is_file()
    assert (work.path / layout.SHARDS).exists() is keep
    assert all(layout.shard_path(work.path, r.chunk).exists() is keep for r in plan)


def test_segments_mode_releases_shards_into_bounded_spares(tmp_path):
    """In segments mode without --keep-shards a recorded shard's file goes (its segment
    carries the chunk): kept as a spare while there are fewer than ``spares``."""
    work = _open(tmp_path, _config(encode_mode=EncodeMode.SEGMENTS))
    assert work.reuses_spares and work.context().reuse_spares
    assert not work.context().shard_checksums
    plan = plan_chunks(FRAMES, CHUNK)
    for chunk in plan:
        result = _render(work, chunk)
        segment = replace(result.shard, file=layout.chunk_file(chunk.chunk, segment=True))
        work.record(replace(result, segment=segment))
    manifest = Manifest.load(work.path)
    assert manifest.released == {0, 1, 2}
    assert not any(layout.shard_path(work.path, r.chunk).exists() for r in plan)
    assert len(list(layout.spare_dir(work.path).glob("*.parquet"))) == 2
