"""Shards and the manifest, read back with plain pyarrow."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lipsync_ray.chunks import ChunkRange
from lipsync_ray.errors import InputError, ShardError
from lipsync_ray.fileio import file_sha256
from lipsync_ray.shards import (
    ShardCodec,
    ShardInfo,
    iter_shard_frames,
    shard_metadata,
    write_shard,
)
from lipsync_ray.workdir import Manifest, keep_spare, shard_path, spare_dir


def _frames(n: int, h: int = 72, w: int = 128, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    out = []
    for i in range(n):
        base = ((xx + 3 * i) % 256).astype(np.uint8)
        frame = np.stack(
            [base, (yy * 2 % 256).astype(np.uint8), np.full_like(base, 40 * i % 256)], -1
        )
        frame = np.clip(frame.astype(int) + rng.integers(-3, 4, frame.shape), 0, 255).astype(
            np.uint8
        )
        out.append(frame)
    return out


@pytest.mark.parametrize("codec", list(ShardCodec))
def test_round_trip_with_plain_pyarrow(tmp_path, codec):
    frames = _frames(5)
    path = shard_path(tmp_path, 3)
    info = write_shard(
        path, 3, np.arange(10, 15), np.array([7, 8, 9, 8, 7]), frames, codec, "fp-1", tmp_path
    )
    assert path.name == "chunk-000003.parquet"
    assert (info.chunk, info.start, info.stop, info.rows) == (3, 10, 15, 5)
    assert not list(path.parent.glob("*.tmp-*")) and not list(path.parent.glob(".*.partial*"))

    table = pq.read_table(path)
    assert table.schema.field("frame_index").type == pa.int64()
    assert table.schema.field("avatar_index").type == pa.int64()
    assert table.schema.field("height").type == pa.int32()
    assert table.schema.field("width").type == pa.int32()
    assert table.schema.field("codec").type == pa.string()
    assert table.schema.field("image").type == pa.binary()
    assert table.column("frame_index").to_pylist() == [10, 11, 12, 13, 14]
    assert table.column("avatar_index").to_pylist() == [7, 8, 9, 8, 7]
    assert set(table.column("height").to_pylist()) == {72}
    assert set(table.column("width").to_pylist()) == {128}
    assert set(table.column("codec").to_pylist()) == {codec.value}
    assert shard_metadata(path) == ("fp-1", 3, 5)

    decoded = list(iter_shard_frames(path, range(10, 15)))
    for got, want in zip(decoded, frames, strict=True):
        if codec is ShardCodec.JPEG:
            mse = np.mean((got.astype(float) - want) ** 2)
            assert 10 * np.log10(255**2 / mse) > 35
        else:
            np.testing.assert_array_equal(got, want)


def test_raw_bytes_are_bgr_row_major(tmp_path):
    frames = _frames(1)
    path = shard_path(tmp_path, 0)
    write_shard(path, 0, np.arange(1), np.arange(1), frames, ShardCodec.RAW, "fp", tmp_path)
    cell = pq.read_table(path).column("image")[0].as_py()
    np.testing.assert_array_equal(np.frombuffer(cell, np.uint8).reshape(72, 128, 3), frames[0])


def test_frame_range_is_checked(tmp_path):
    path = shard_path(tmp_path, 0)
    write_shard(path, 0, np.arange(4), np.arange(4), _frames(4), ShardCodec.RAW, "fp", tmp_path)
    with pytest.raises(ShardError, match=r"expected 0\.\.4"):
        list(iter_shard_frames(path, range(0, 5)))


def test_manifest_verifies_checksums(tmp_path):
    path = shard_path(tmp_path, 0)
    info = write_shard(
        path, 0, np.arange(4), np.arange(4), _frames(4), ShardCodec.PNG, "fp", tmp_path
    )
    manifest = Manifest(tmp_path, "fp", {"a": 1}, frames=4, chunk_frames=4)
    manifest.record(info)
    loaded = Manifest.load(tmp_path)
    assert loaded is not None and loaded.chunks[0] == info and loaded.fingerprint == "fp"
    assert loaded.verified(ChunkRange(0, 0, 4))
    assert not loaded.verified(ChunkRange(0, 0, 5))  # another plan
    assert not loaded.verified(ChunkRange(1, 4, 8))  # never written

    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes
    path.write_bytes(bytes(data))
    assert not loaded.verified(ChunkRange(0, 0, 4))
    path.unlink()
    assert not loaded.verified(ChunkRange(0, 0, 4))


def test_orphan_adoption_and_forget(tmp_path):
    path = shard_path(tmp_path, 2)
    write_shard(path, 2, np.arange(8, 12), np.arange(4), _frames(4), ShardCodec.RAW, "fp", tmp_path)
    manifest = Manifest(tmp_path, "fp", {}, frames=12, chunk_frames=4)
    manifest.adopt(path, ChunkRange(2, 8, 12))
    assert Manifest.load(tmp_path).verified(ChunkRange(2, 8, 12))
    manifest.forget(2)
    assert 2 not in Manifest.load(tmp_path).chunks


@pytest.mark.parametrize("checksum", [True, False])
def test_shard_info_of_a_file(tmp_path, checksum):
    """The one constructor of a record (shards, segments, adopted files): the file's size and
    name in the work directory, its hash unless skipped, the chunk's range as given."""
    path = tmp_path / "segments" / "chunk-000004.mp4"
    path.parent.mkdir()
    path.write_bytes(bytes(range(256)) * 3)
    info = ShardInfo.of_file(path, tmp_path, chunk=4, start=32, stop=40, rows=8, checksum=checksum)
    assert info == ShardInfo(4, 32, 40, 8, file_sha256(path) if checksum else "", 768,
                             "segments/chunk-000004.mp4")  # fmt: skip


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "unreadable"),
        ('{"version": 99}', "version 99"),
        ('{"version": 1, "fingerprint": "x"}', "unreadable"),
    ],
)
def test_bad_manifest(tmp_path, content, message):
    (tmp_path / "manifest.json").write_text(content)
    with pytest.raises(InputError, match=message):
        Manifest.load(tmp_path)


def test_write_shard_rejects_mismatched_lengths(tmp_path):
    with pytest.raises(ShardError, match="must be equal"):
        write_shard(
            shard_path(tmp_path, 0),
            0,
            np.arange(3),
            np.arange(2),
            _frames(3),
            ShardCodec.RAW,
            "fp",
            tmp_path,
        )


def test_raw_array_is_written_like_a_list_of_frames(tmp_path):
    """A (C, H, W, 3) array goes into the image column without a copy; the file reads back
    exactly like one written from a list of frames."""
    frames = _frames(6)
    stacked = np.stack(frames)
    a = write_shard(
        tmp_path / "a" / "x.parquet", 0, np.arange(6), np.arange(6), frames, ShardCodec.RAW,
        "fp", tmp_path,
    )  # fmt: skip
    b = write_shard(
        tmp_path / "b" / "x.parquet", 0, np.arange(6), np.arange(6), stacked, ShardCodec.RAW,
        "fp", tmp_path,
    )  # fmt: skip
    assert a.sha256 == b.sha256 and a.bytes == b.bytes
    got = list(iter_shard_frames(tmp_path / b.file, range(6)))
    np.testing.assert_array_equal(np.stack(got), stacked)
    meta = pq.read_metadata(tmp_path / b.file).row_group(0)
    columns = [meta.column(i) for i in range(meta.num_columns)]
    image = next(c for c in columns if c.path_in_schema == "image")
    assert image.compression == "UNCOMPRESSED" and not image.is_stats_set
    assert "PLAIN_DICTIONARY" not in image.encodings and "RLE_DICTIONARY" not in image.encodings


def test_checksum_can_be_skipped_for_released_shards(tmp_path):
    info = write_shard(
        shard_path(tmp_path, 0), 0, np.arange(2), np.arange(2), _frames(2), ShardCodec.RAW,
        "fp", tmp_path, checksum=False,
    )  # fmt: skip
    assert info.sha256 == "" and info.bytes > 0
    manifest = Manifest(tmp_path, "fp", {}, 2, 2)
    manifest.record(info)
    # an unchecksummed shard is never taken as verified
    assert not manifest.verified(ChunkRange(0, 0, 2))


def _write_raw(work_dir, chunk: int, frames: np.ndarray, **kwargs):
    n = len(frames)
    return write_shard(
        shard_path(work_dir, chunk), chunk, np.arange(chunk * n, chunk * n + n), np.arange(n),
        frames, ShardCodec.RAW, "fp", work_dir, checksum=True, **kwargs,
    )  # fmt: skip


@pytest.mark.parametrize(
    "spare_bytes",
    [0, 100, 10_000_000],  # an empty file, one too small to hold the shard, a larger one
    ids=["empty", "too-small", "larger"],
)
def test_shard_written_over_a_spare_file_is_the_same_file(tmp_path, spare_bytes):
    frames = np.stack(_frames(5))
    fresh = _write_raw(tmp_path / "fresh", 3, frames)
    spares = spare_dir(tmp_path / "reuse")
    spares.mkdir(parents=True)
    (spares / "chunk-000001.parquet").write_bytes(b"\xab" * spare_bytes)
    reused = _write_raw(tmp_path / "reuse", 3, frames, reuse_spare=True)
    assert not any(spares.iterdir())  # the spare became the shard
    assert (reused.sha256, reused.bytes) == (fresh.sha256, fresh.bytes)
    got = list(iter_shard_frames(tmp_path / "reuse" / reused.file, range(15, 20)))
    np.testing.assert_array_equal(np.stack(got), frames)


def test_without_a_spare_the_shard_is_a_new_file(tmp_path):
    frames = np.stack(_frames(3))
    fresh = _write_raw(tmp_path / "a", 0, frames)
    reused = _write_raw(tmp_path / "b", 0, frames, reuse_spare=True)  # no spare directory
    assert reused.sha256 == fresh.sha256


def test_released_shards_become_spares_up_to_the_limit(tmp_path):
    frames = np.stack(_frames(2))
    manifest = Manifest(tmp_path, "fp", {}, frames=6, chunk_frames=2, spares=1)
    first, second = (_write_raw(tmp_path, c, frames) for c in (0, 1))
    first_sha = file_sha256(tmp_path / first.file)
    manifest.record(first, release=True)
    manifest.record(second, release=True)
    assert not (tmp_path / first.file).exists() and not (tmp_path / second.file).exists()
    kept = list(spare_dir(tmp_path).iterdir())
    assert len(kept) == 1 and file_sha256(kept[0]) == first_sha  # the second was deleted
    assert Manifest.load(tmp_path).released == {0, 1}
    third = _write_raw(tmp_path, 2, frames, reuse_spare=True)
    assert not any(spare_dir(tmp_path).iterdir())
    assert [f.shape for f in iter_shard_frames(tmp_path / third.file, range(4, 6))] == [
        frames[0].shape
    ] * 2


@pytest.mark.parametrize(
    ("limit", "exists", "kept"),
    [(0, True, False), (1, False, False), (1, True, True)],
    ids=["no-spares", "file-gone", "kept"],
)
def test_keep_spare(tmp_path, limit, exists, kept):
    path = shard_path(tmp_path, 0)
    path.parent.mkdir(parents=True)
    if exists:
        path.write_bytes(b"x")
    assert keep_spare(path, tmp_path, limit) is kept
    assert (spare_dir(tmp_path) / path.name).exists() is kept
    assert not spare_dir(tmp_path).exists() or limit > 0  # no directory when spares are off
