"""A chunk that hangs, for real, inside the inference actor's ONNX Runtime call.

The generator is the identity on the ROI (``visual[:, :3]``) plus an ONNX ``Loop`` whose trip
count is ``max(audio window) * 1e9``: no iterations for silent (zero) features, minutes of
iterations where a feature row is positive. The features are zero except four rows that only
the frames of chunk 1 (frames 32-63) see, so exactly that chunk hangs, inside the real
``InferenceActor.infer`` of a real Ray actor.

- a chunk that hangs every time: after ``chunk_timeout_s`` with no progress its actor is
  restarted and the chunk retried; after ``max_retries`` the render stops with an error naming
  the chunk, its frames and the hang, keeping the healthy chunks for a resume;
- a chunk that hangs once: the model file is replaced by the loop-free one when the driver
  announces the restart (so the restarted actor loads a model that does not hang); the render
  completes, counts the retry, and its frames equal those of a clean render.

Regression: the driver used to block for ``ACTOR_START_TIMEOUT_S`` (600 s) in
``wait_for_actors`` after a restart, because the compositor's ``describe`` probe was queued
behind a ``composite`` whose predictions came from the hung ``infer`` (in-order actor tasks).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from onnx import TensorProto, helper, numpy_helper
from roi_models import save_roi_generator

from lipsync_ray.config import PoolConfig, RenderConfig
from lipsync_ray.dev.speech import synth_speech, write_audio
from lipsync_ray.dev.synthetic import make_demo_avatar
from lipsync_ray.errors import RenderError
from lipsync_ray.pipeline import render
from lipsync_ray.shards import ShardCodec
from lipsync_ray.workdir.manifest import Manifest

pytestmark = pytest.mark.ray

CHUNK = 32
FRAMES = 3 * 25 + 2  # 77 feature rows: chunks 0 (0-31), 1 (32-63), 2 (64-76)
TIMEOUT_S = 4.0
HANG = re.compile(r"chunk 1 \(frames 32-63\) made no progress")


def _generator(path: Path, *, spin: bool) -> Path:
    """out = visual[:, :3] (B, 3, 320, 320); with ``spin``, after a Loop of
    ``int64(max(audio) * 1e9)`` scalar additions whose result is multiplied by 0."""
    inits = [
        numpy_helper.from_array(np.array(1e9, np.float32), "big"),
        numpy_helper.from_array(np.array(True), "true"),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
    ]
    if spin:
        body = helper.make_graph(
            [
                helper.make_node("Identity", ["cond_in"], ["cond_out"]),
                helper.make_node("Add", ["acc_in", "one"], ["acc_out"]),
            ],
            "spin",
            [
                helper.make_tensor_value_info("i", TensorProto.INT64, []),
                helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, []),
            ],
            [
                helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
                helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, []),
            ],
            [numpy_helper.from_array(np.array(1.0, np.float32), "one")],
        )
        nodes = [
            helper.make_node("ReduceMax", ["audio"], ["peak"], keepdims=0),
            helper.make_node("Mul", ["peak", "big"], ["trips_f"]),
            helper.make_node("Cast", ["trips_f"], ["trips"], to=TensorProto.INT64),
            helper.make_node("Loop", ["trips", "true", "zero"], ["spun"], body=body),
            helper.make_node("Mul", ["spun", "zero"], ["nothing"]),
            helper.make_node("Add", ["roi", "nothing"], ["output"]),
        ]
    else:
        nodes = [helper.make_node("Identity", ["roi"], ["output"])]
    return save_roi_generator(path, "hang" if spin else "roi", nodes, inits)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hang-inputs")
    avatar = make_demo_avatar(root / "avatar", seconds=0.4, size_wh=(160, 128), seed=6)
    features = np.zeros((FRAMES, 512), np.float32)
    # Frame i sees rows [i-8, i+8): rows 40..43 are seen by frames 33..51, all in chunk 1.
    features[40:44] = 1.0
    np.save(root / "features.npy", features)
    return {
        "avatar": Path(avatar.info.path),
        "audio": write_audio(root / "speech.wav", synth_speech(3.0, seed=2)),
        "features": root / "features.npy",
    }


def _config(model: Path, features: Path, max_retries: int) -> RenderConfig:
    return RenderConfig(
        model=str(model),
        features=str(features),
        pool=PoolConfig(
            chunk_frames=CHUNK,
            gpus_per_actor=0.0,
            # one generator: the chunk is retried on the actor whose session hung, after its
            # restart (a second actor would take the retry with the hanging model still loaded)
            inference_actors=1,
            compositors=1,
            batch_size=8,
            max_retries=max_retries,
            chunk_timeout_s=TIMEOUT_S,
        ),
        shard_codec=ShardCodec.RAW,
        keep_shards=True,
    )


def _shard_frames(work_dir: Path) -> dict[int, str]:
    """frame_index -> sha256 of its raw BGR bytes, read with plain pyarrow."""
    frames: dict[int, str] = {}
    for path in sorted((work_dir / "shards").glob("chunk-*.parquet")):
        table = pq.read_table(path, columns=["frame_index", "image"])
        for frame, image in zip(
            table.column("frame_index").to_pylist(), table.column("image").to_pylist(), strict=True
        ):
            assert frame not in frames, f"frame {frame} is in two shards"
            frames[frame] = hashlib.sha256(image).hexdigest()
    return frames


def _restarts(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "restarting its actor" in r.getMessage()]


def test_a_chunk_that_keeps_hanging_stops_the_render(ray_cluster, inputs, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="lipsync_ray.scheduler")
    config = _config(_generator(tmp_path / "hang.onnx", spin=True), inputs["features"], 1)
    out = tmp_path / "out.mp4"
    with pytest.raises(RenderError) as info:
        render(inputs["avatar"], inputs["audio"], out, config)
    message = str(info.value)
    assert re.search(r"chunk 1 \(frames 32-63\) failed 2 times", message), message
    assert f"no result within {TIMEOUT_S:g} s (hung)" in message, message
    # One restart per attempt, always of chunk 1: the hang was detected, not waited out.
    restarts = _restarts(caplog)
    assert len(restarts) == 2 and all(HANG.search(m) for m in restarts), restarts
    assert not out.exists()
    manifest = Manifest.load(Path(f"{out}.work"))
    assert manifest is not None and 0 in manifest.chunks and 1 not in manifest.chunks


def test_the_inference_actor_names_the_chunk_that_holds_its_session(ray_cluster, inputs, tmp_path):
    """The driver charges a hang to the chunk the actor names (by Ray task id), not to the
    oldest chunk in flight: chunk 2, sent first, only waits behind chunk 1, whose lower index
    takes the session at the next batch boundary and then spins."""
    import ray

    from lipsync_ray.actors import INFERENCE_CONCURRENCY_GROUPS, InferenceActor
    from lipsync_ray.chunks import ChunkSpec
    from lipsync_ray.options import SessionOptions

    features = np.load(inputs["features"])
    cls = ray.remote(concurrency_groups=INFERENCE_CONCURRENCY_GROUPS)(InferenceActor)
    actor = cls.options(num_cpus=1, max_restarts=0).remote(
        str(_generator(tmp_path / "hang.onnx", spin=True)), str(inputs["avatar"]),
        SessionOptions(), 1.0, 1,
    )  # fmt: skip
    try:
        assert ray.get(actor.session_holder.remote(), timeout=60) is None  # idle
        assert ray.get(actor.backlog.remote(), timeout=10) == {}

        def spec(chunk: int, start: int, stop: int) -> ChunkSpec:
            rows = np.zeros((stop - start + 16, 512), np.float32)
            lo, hi = max(start - 8, 0), min(stop + 8, FRAMES)
            rows[lo - (start - 8) : hi - (start - 8)] = features[lo:hi]
            return ChunkSpec(chunk, start, stop, np.arange(stop - start) % 10, rows)

        waiting = actor.infer.remote(spec(2, 64, 77))
        hung = actor.infer.remote(spec(1, 32, 64))
        deadline = time.monotonic() + 30
        holder = None
        while holder != hung.task_id().hex() and time.monotonic() < deadline:
            holder = ray.get(actor.session_holder.remote(), timeout=10)
            time.sleep(0.05)
        assert holder == hung.task_id().hex() != waiting.task_id().hex()
        assert not ray.wait([hung], timeout=0)[0]
        # what each call still has to infer, by task id (the driver splits a render's last
        # chunks by it): the spinning one is stuck in one of its frames, the other waits
        backlog = ray.get(actor.backlog.remote(), timeout=10)
        assert set(backlog) == {hung.task_id().hex(), waiting.task_id().hex()}
        assert backlog[waiting.task_id().hex()] == 13 and 0 < backlog[hung.task_id().hex()] <= 32
    finally:
        ray.kill(actor)


class _ReplaceModelOnRestart(logging.Handler):
    """When the driver announces the restart of the hung actor, put the loop-free model at the
    generator's path: the restarted actor loads it, so the chunk hangs once only."""

    def __init__(self, model: Path, fixed: Path) -> None:
        super().__init__(logging.WARNING)
        self.model, self.fixed, self.replaced = model, fixed, 0

    def emit(self, record: logging.LogRecord) -> None:
        if HANG.search(record.getMessage()) and not self.replaced:
            os.replace(self.fixed, self.model)
            self.replaced += 1


def test_a_chunk_that_hangs_once_is_retried_and_the_render_completes(ray_cluster, inputs, tmp_path):
    fixed = _generator(tmp_path / "roi.onnx", spin=False)
    reference = render(
        inputs["avatar"],
        inputs["audio"],
        tmp_path / "clean.mp4",
        _config(fixed, inputs["features"], 0),
    )
    assert reference.retries == 0
    model = _generator(tmp_path / "hang.onnx", spin=True)
    hook = _ReplaceModelOnRestart(model, _generator(tmp_path / "roi-copy.onnx", spin=False))
    logger = logging.getLogger("lipsync_ray.scheduler")
    logger.addHandler(hook)
    try:
        report = render(
            inputs["avatar"],
            inputs["audio"],
            tmp_path / "out.mp4",
            _config(model, inputs["features"], 1),
        )
    finally:
        logger.removeHandler(hook)
    assert hook.replaced == 1  # chunk 1 hung, and its actor was restarted once
    assert report.frames == FRAMES and (tmp_path / "out.mp4").exists()
    # chunk 1's retry (and chunk 2, if it was queued behind chunk 1 on the killed actor)
    assert report.retries >= 1
    frames = _shard_frames(Path(report.work_dir))
    assert sorted(frames) == list(range(FRAMES))
    assert frames == _shard_frames(Path(reference.work_dir))  # the retry cost no pixels
