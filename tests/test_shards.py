"""Shards and the manifest, read back with plain pyarrow."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lipsync_ray.errors import InputError, ShardError
from lipsync_ray.shards import (
    Manifest,
    ShardCodec,
    iter_shard_frames,
    shard_metadata,
    shard_path,
    write_shard,
)


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
    assert not list(path.parent.glob("*.tmp-*"))

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
    assert loaded.verified(0, 0, 4)
    assert not loaded.verified(0, 0, 5)  # another plan
    assert not loaded.verified(1, 4, 8)  # never written

    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes
    path.write_bytes(bytes(data))
    assert not loaded.verified(0, 0, 4)
    path.unlink()
    assert not loaded.verified(0, 0, 4)


def test_orphan_adoption_and_forget(tmp_path):
    path = shard_path(tmp_path, 2)
    write_shard(path, 2, np.arange(8, 12), np.arange(4), _frames(4), ShardCodec.RAW, "fp", tmp_path)
    manifest = Manifest(tmp_path, "fp", {}, frames=12, chunk_frames=4)
    manifest.adopt(path, 2, 8, 12)
    assert Manifest.load(tmp_path).verified(2, 8, 12)
    manifest.forget(2)
    assert 2 not in Manifest.load(tmp_path).chunks


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
    assert not manifest.verified(0, 0, 2)  # an unchecksummed shard is never taken as verified
