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
from lipsync_ray.workdir.layout import shard_path, spare_dir
from lipsync_ray.workdir.manifest import Manifest, keep_spare


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


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _thrift_value(data: bytes, pos: int, kind: int):
    """One value of Thrift's compact protocol (how Parquet writes its page headers)."""
    if kind in (1, 2):  # a bool inside a struct: the type is the value
        return kind == 1, pos
    if kind == 3:
        return data[pos], pos + 1
    if kind in (4, 5, 6):  # zigzag varints
        raw, pos = _varint(data, pos)
        return (raw >> 1) ^ -(raw & 1), pos
    if kind == 7:
        return data[pos : pos + 8], pos + 8
    if kind == 8:
        size, pos = _varint(data, pos)
        return data[pos : pos + size], pos + size
    if kind in (9, 10):
        size, element = data[pos] >> 4, data[pos] & 0x0F
        pos += 1
        if size == 15:
            size, pos = _varint(data, pos)
        items = []
        for _ in range(size):
            if element in (1, 2):  # a bool in a list is one byte
                items.append(data[pos] == 1)
                pos += 1
            else:
                item, pos = _thrift_value(data, pos, element)
                items.append(item)
        return items, pos
    if kind == 11:
        size, pos = _varint(data, pos)
        if size:
            key_kind, value_kind = data[pos] >> 4, data[pos] & 0x0F
            pos += 1
            for _ in range(2 * size):
                _, pos = _thrift_value(data, pos, key_kind if _ % 2 == 0 else value_kind)
        return None, pos
    if kind == 12:
        fields, field_id = {}, 0
        while True:
            header = data[pos]
            pos += 1
            if header == 0:
                return fields, pos
            delta, field_kind = header >> 4, header & 0x0F
            if delta:
                field_id += delta
            else:
                raw, pos = _varint(data, pos)
                field_id = (raw >> 1) ^ -(raw & 1)
            fields[field_id], pos = _thrift_value(data, pos, field_kind)
    raise AssertionError(f"unknown thrift type {kind}")


def _pages(path, column: str) -> list[tuple[int, int]]:
    """(page type, rows) of every page of ``column``, read from the file's page headers
    (PageHeader: 1 type, 3 compressed size, 5 data page header whose 1 is num_values)."""
    chunk = pq.read_metadata(path).row_group(0)
    meta = next(
        chunk.column(i)
        for i in range(chunk.num_columns)
        if chunk.column(i).path_in_schema == column
    )
    start = meta.dictionary_page_offset if meta.has_dictionary_page else meta.data_page_offset
    data = path.read_bytes()
    pos, end, pages = start, start + meta.total_compressed_size, []
    while pos < end:
        header, pos = _thrift_value(data, pos, 12)
        rows = header[5][1] if 5 in header else header.get(8, {}).get(1, 0)
        pages.append((header[1], rows))
        pos += header[3]
    assert pos == end
    return pages


DATA_PAGE, DICTIONARY_PAGE = 0, 2


@pytest.mark.parametrize("spare", [False, True], ids=["new-file", "over-a-spare"])
def test_each_frame_over_a_page_size_is_one_page(tmp_path, spare):
    """Frames of 1 MiB or more (a 720p frame is 2.76 MB) are written one page each, so the
    writer's page buffer holds one frame, not the chunk; the small columns stay one page."""
    frames = np.random.default_rng(1).integers(0, 256, (3, 512, 720, 3), np.uint8)  # 1.1 MB
    if spare:
        spare_dir(tmp_path).mkdir(parents=True)
        (spare_dir(tmp_path) / "chunk-000009.parquet").write_bytes(b"\x00" * 100)
    info = _write_raw(tmp_path, 0, frames, reuse_spare=spare)
    path = tmp_path / info.file
    assert _pages(path, "image") == [(DATA_PAGE, 1)] * 3
    assert _pages(path, "frame_index") == [(DICTIONARY_PAGE, 0), (DATA_PAGE, 3)]
    np.testing.assert_array_equal(np.stack(list(iter_shard_frames(path, range(3)))), frames)


def test_shards_written_before_one_page_per_frame_still_read(tmp_path):
    """A shard from before 2026-12-05 (Parquet's default batches: every image in one page)
    reads back the same with plain pyarrow and with iter_shard_frames."""
    frames = np.random.default_rng(2).integers(0, 256, (3, 512, 720, 3), np.uint8)
    new = _write_raw(tmp_path / "new", 0, frames)
    table = pq.read_table(tmp_path / "new" / new.file)
    small = [name for name in table.column_names if name != "image"]
    old = tmp_path / "old" / new.file
    old.parent.mkdir(parents=True)
    pq.write_table(
        table, old, compression="none", row_group_size=3, use_dictionary=small,
        write_statistics=small,
    )  # fmt: skip
    assert _pages(old, "image") == [(DATA_PAGE, 3)]
    assert pq.read_table(old).equals(table)
    np.testing.assert_array_equal(np.stack(list(iter_shard_frames(old, range(3)))), frames)
    assert shard_metadata(old) == shard_metadata(tmp_path / "new" / new.file)
