"""Faults during a render, injected for real, and determinism of the lossless output.

Every fault test renders the same inputs as a clean reference run (the small UNet, 4 s of
speech, chunks of 8 frames, RAW shards kept) and compares the frames in the shards, frame by
frame, with the reference: a fault may cost time, never pixels.

- a worker process (``ray::InferenceActor`` / ``ray::CompositorActor``) is SIGKILLed once the
  first shard exists; only processes descended from this test process are candidates, so
  another Ray on the machine is never touched;
- a node is killed mid-render in a multi-node ``ray.cluster_utils.Cluster`` (in a child
  process: it needs its own Ray, and the session cluster of ``conftest`` stays up);
- the driver (a ``lipsync-ray render`` subprocess) is SIGKILLed after a few shards, and the
  same command is run again: it must resume and produce the same frames;
- a chunk that fails every time (a model that outputs NaN for some audio only) stops the
  render with an error that names the chunk and its frames.

Run this file as ``python tests/test_faults.py multinode SPEC.json`` to run the multi-node
scenario by hand.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest
from helpers import cli_command, demo_inputs
from onnx import helper, numpy_helper
from roi_models import save_roi_generator

from lipsync_ray.config import PoolConfig, RenderConfig
from lipsync_ray.errors import LipsyncError
from lipsync_ray.pipeline import render
from lipsync_ray.shards import ShardCodec
from lipsync_ray.workdir.layout import shard_path, spare_dir
from lipsync_ray.workdir.manifest import Manifest

pytestmark = pytest.mark.ray

SECONDS = 4.0  # ~100 output frames: 13 chunks of 8, time enough to strike mid-render
CHUNK = 8
MB = 1024 * 1024


def _pool(**over) -> PoolConfig:
    # One ONNX Runtime thread everywhere (1 CPU per inference actor): the comparisons below
    # are between runs with the same kernels.
    base = {
        "chunk_frames": CHUNK,
        "gpus_per_actor": 0.0,
        "compositors": 1,
        "cpus_per_inference_actor": 1.0,
        "cpus_per_compositor": 0.5,
        "chunk_timeout_s": 120.0,
    }
    return PoolConfig(**{**base, **over})


def _config(models: dict[str, Path], **over) -> RenderConfig:
    return RenderConfig(
        model=str(models["unet"]),
        audio_encoder=str(models["encoder"]),
        pool=over.pop("pool", _pool()),
        shard_codec=ShardCodec.RAW,
        keep_shards=True,
        **over,
    )


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fault-inputs")
    return demo_inputs(
        root, avatar_seconds=1.0, size_wh=(320, 240), avatar_seed=1, audio_seconds=SECONDS,
        audio_seed=3,
    )  # fmt: skip


def _shard_frames(work_dir: Path) -> dict[int, tuple[int, str]]:
    """frame_index -> (avatar_index, sha256 of the raw BGR bytes), read with plain pyarrow."""
    frames: dict[int, tuple[int, str]] = {}
    for path in sorted((Path(work_dir) / "shards").glob("chunk-*.parquet")):
        table = pq.read_table(path, columns=["frame_index", "avatar_index", "codec", "image"])
        assert set(table.column("codec").to_pylist()) == {"raw"}, path
        rows = zip(
            table.column("frame_index").to_pylist(),
            table.column("avatar_index").to_pylist(),
            table.column("image").to_pylist(),
            strict=True,
        )
        for frame, avatar_index, image in rows:
            assert frame not in frames, f"frame {frame} is in two shards"
            frames[frame] = (avatar_index, hashlib.sha256(image).hexdigest())
    return frames


def _assert_same_frames(got: dict, want: dict) -> None:
    """Equal frame sets; on failure, say which frames differ (not 100 hashes)."""
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    differ = sorted(f for f in set(got) & set(want) if got[f] != want[f])
    assert not (missing or extra or differ), (
        f"{len(missing)} frames missing {missing[:10]}, {len(extra)} extra {extra[:10]}, "
        f"{len(differ)} differ {differ[:20]}"
    )


def _video_frames(path: Path) -> int:
    import av

    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def _report(work_dir: Path) -> dict:
    return json.loads((Path(work_dir) / "report.json").read_text())


@pytest.fixture(scope="module")
def reference(ray_cluster, small_models, inputs, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("reference") / "clean.mp4"
    report = render(inputs["avatar"], inputs["audio"], out, _config(small_models))
    frames = _shard_frames(Path(report.work_dir))
    assert sorted(frames) == list(range(report.frames)) and report.frames > 6 * CHUNK
    assert report.retries == 0
    return {"frames": frames, "count": report.frames}


# ------------------------------------------------------------------- killing worker processes


def _our_processes(marker: str) -> list[psutil.Process]:
    """Descendants of this process whose command line names ``marker`` (Ray sets the title of
    a worker to ``ray::<Actor>`` or ``ray::<Actor>.<method>``)."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if marker in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


class _Killer(threading.Thread):
    """SIGKILL one ``marker`` worker once ``shards`` shards exist in ``work_dir``."""

    def __init__(self, work_dir: Path, marker: str, shards: int = 1, timeout_s: float = 180):
        super().__init__(daemon=True)
        self.shard_dir = Path(work_dir) / "shards"
        self.marker, self.shards, self.timeout_s = marker, shards, timeout_s
        self.stale = {p.pid for p in _our_processes(marker)}  # left from earlier renders
        self.killed: dict | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        while not self.stop.is_set() and time.monotonic() < deadline:
            if len(list(self.shard_dir.glob("chunk-*.parquet"))) >= self.shards:
                for proc in _our_processes(self.marker):
                    if proc.pid in self.stale:
                        continue
                    try:
                        title = " ".join(proc.cmdline())
                        proc.send_signal(signal.SIGKILL)
                    except psutil.Error:
                        continue
                    done = len(list(self.shard_dir.glob("chunk-*.parquet")))
                    self.killed = {"pid": proc.pid, "title": title, "shards_before": done}
                    return
            time.sleep(0.02)


@pytest.mark.parametrize("marker", ["ray::InferenceActor", "ray::CompositorActor"])
def test_sigkill_of_a_worker_mid_render(
    marker, ray_cluster, small_models, inputs, reference, tmp_path
):
    out = tmp_path / "out.mp4"
    killer = _Killer(Path(f"{out}.work"), marker)
    killer.start()
    try:
        report = render(inputs["avatar"], inputs["audio"], out, _config(small_models))
    finally:
        killer.stop.set()
        killer.join()
    assert killer.killed is not None, f"no {marker} process was found to kill"
    assert killer.killed["shards_before"] < reference["count"] // CHUNK, "killed too late"
    _assert_same_frames(_shard_frames(Path(report.work_dir)), reference["frames"])
    assert _report(Path(report.work_dir))["retries"] >= 1  # the kill cost at least one chunk
    assert _video_frames(out) == reference["count"]


def test_worker_death_does_not_use_up_chunk_retries(
    ray_cluster, small_models, inputs, reference, tmp_path
):
    out = tmp_path / "out.mp4"
    killer = _Killer(Path(f"{out}.work"), "ray::InferenceActor")
    killer.start()
    config = _config(small_models, pool=_pool(max_retries=0))
    try:
        render(inputs["avatar"], inputs["audio"], out, config)
    finally:
        killer.stop.set()
        killer.join()
    assert killer.killed is not None
    _assert_same_frames(_shard_frames(Path(f"{out}.work")), reference["frames"])


# --------------------------------------------------------------------------- multi-node


def _multinode_main(spec_path: str) -> None:
    """Child process: head (no CPUs) + node A (2 CPUs) run the render; once the first shard
    exists node A is killed abruptly and node B (2 CPUs) joins. The actors must restart on B
    and the render complete. Writes what happened to ``spec["result"]``.

    The render runs in a thread: ``Cluster.add_node`` installs signal handlers, which only
    the main thread may do."""
    import ray
    from ray.cluster_utils import Cluster

    spec = json.loads(Path(spec_path).read_text())
    fast_failure_detection = {
        "health_check_initial_delay_ms": 0,
        "health_check_period_ms": 500,
        "health_check_failure_threshold": 4,
    }
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "object_store_memory": 100 * MB,
            "include_dashboard": False,
            "_system_config": fast_failure_detection,
        },
    )
    node_a = cluster.add_node(num_cpus=2, object_store_memory=100 * MB)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    events: dict = {"node_a": node_a.node_id}
    config = RenderConfig(
        model=spec["model"],
        audio_encoder=spec["encoder"],
        # Lost workers do not count against max_retries: the driver waits for the actors to
        # come back on node B (test_worker_death_does_not_use_up_chunk_retries).
        pool=_pool(),
        shard_codec=ShardCodec.RAW,
        keep_shards=True,
        work_dir=spec["work_dir"],
    )

    def run() -> None:
        try:
            report = render(spec["avatar"], spec["audio"], spec["out"], config)
            events.update(
                frames=report.frames,
                retries=report.retries,
                actor_nodes=sorted({a.node_id for a in report.actors}),
            )
        except LipsyncError as exc:
            events["error"] = str(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        shards = Path(spec["work_dir"]) / "shards"
        deadline = time.monotonic() + 180
        while thread.is_alive() and time.monotonic() < deadline:
            if any(shards.glob("chunk-*.parquet")):
                events["shards_before"] = len(list(shards.glob("chunk-*.parquet")))
                cluster.remove_node(node_a, allow_graceful=False)
                events["removed_at"] = time.monotonic()
                node_b = cluster.add_node(num_cpus=2, object_store_memory=100 * MB)
                events["node_b"] = node_b.node_id
                break
            time.sleep(0.02)
        thread.join(timeout=240)
    finally:
        Path(spec["result"]).write_text(json.dumps(events))
        ray.shutdown()
        cluster.shutdown()


def _child_env() -> dict[str, str]:
    """Children start their own Ray: never the session cluster's address."""
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def _reap(procs: list[psutil.Process]) -> list[int]:
    """Wait for ``procs`` to exit; SIGKILL the ones that do not (all are our descendants)."""
    _, alive = psutil.wait_procs(procs, timeout=20)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    return [p.pid for p in alive]


def test_node_killed_mid_render(small_models, inputs, reference, tmp_path):
    spec = {
        "avatar": str(inputs["avatar"]),
        "audio": str(inputs["audio"]),
        "model": str(small_models["unet"]),
        "encoder": str(small_models["encoder"]),
        "out": str(tmp_path / "out.mp4"),
        "work_dir": str(tmp_path / "work"),
        "result": str(tmp_path / "result.json"),
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.Popen(
        [sys.executable, __file__, "multinode", str(tmp_path / "spec.json")],
        env=_child_env(),
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "stderr.txt").open("w"),
    )
    try:
        rc = proc.wait(timeout=300)
    except subprocess.TimeoutExpired:
        tree = psutil.Process(proc.pid).children(recursive=True)
        proc.kill()
        _reap(tree)
        raise
    log = (tmp_path / "stderr.txt").read_text()
    assert rc == 0, log[-3000:]
    events = json.loads((tmp_path / "result.json").read_text())
    assert "error" not in events, events
    assert "removed_at" in events, f"the render ended before the node could be removed: {events}"
    assert events["actor_nodes"] == [events["node_a"]]  # every actor started on the lost node
    assert events["shards_before"] < reference["count"] // CHUNK
    assert events["retries"] >= 1
    _assert_same_frames(_shard_frames(tmp_path / "work"), reference["frames"])
    assert _video_frames(tmp_path / "out.mp4") == reference["count"]


# ------------------------------------------------------------------ killing the driver


def _kill_driver_when(
    command: list[str], log_path: Path, ready, what: str, *, poll_s: float
) -> None:
    """Run the CLI ``command`` and SIGKILL it as soon as ``ready()``; fails with ``what`` when
    that takes 240 s, or with the log's tail when the driver exits first."""
    with log_path.open("w") as log:
        driver = subprocess.Popen(command, env=_child_env(), stdout=log, stderr=log)
        descendants: list[psutil.Process] = []
        try:
            deadline = time.monotonic() + 240
            while not ready():
                assert driver.poll() is None, log_path.read_text()[-3000:]
                assert time.monotonic() < deadline, what
                time.sleep(poll_s)
            descendants = psutil.Process(driver.pid).children(recursive=True)
            driver.send_signal(signal.SIGKILL)
            driver.wait(timeout=30)
        finally:
            if driver.poll() is None:
                driver.kill()
            _reap(descendants)  # anything the driver started, should it outlive the driver


def test_driver_killed_then_resumed(ray_cluster, small_models, inputs, reference, tmp_path):
    """The CLI joins this module's cluster (``--address``): the same driver code as with an
    embedded Ray, without paying a Ray start-up twice; Ray ends a dead driver's actors."""
    out = tmp_path / "out.mp4"
    shards = Path(f"{out}.work") / "shards"
    command = [
        *cli_command(),
        "render",
        str(inputs["avatar"]),
        str(inputs["audio"]),
        "-o",
        str(out),
        "--model",
        str(small_models["unet"]),
        "--audio-encoder",
        str(small_models["encoder"]),
        "--chunk-frames",
        str(CHUNK),
        "--shard-codec",
        "raw",
        "--keep-shards",
        "--gpus-per-actor",
        "0",
        "--cpus-per-actor",
        "1",
        "--address",
        ray_cluster.get_runtime_context().gcs_address,
    ]
    _kill_driver_when(
        command, tmp_path / "first.txt", lambda: len(list(shards.glob("chunk-*.parquet"))) >= 3,
        "no shards appeared", poll_s=0.02,
    )  # fmt: skip
    killed_with = len(list(shards.glob("chunk-*.parquet")))
    assert killed_with < reference["count"] // CHUNK, "the first run finished before the kill"
    assert not out.exists()

    second = subprocess.run(command, env=_child_env(), capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    report = _report(Path(f"{out}.work"))
    # A shard on disk is not always a finished chunk (its segment may be missing): >= 1, not 3.
    assert report["chunks_reused"] >= 1, report
    assert report["chunks_reused"] + report["chunks_rendered"] == report["chunks"], report
    _assert_same_frames(_shard_frames(Path(f"{out}.work")), reference["frames"])
    assert _video_frames(out) == reference["count"] == report["frames"]


def test_driver_killed_mid_encode_then_resumed(
    ray_cluster, small_models, inputs, reference, tmp_path
):
    """SIGKILL while the final encode writes the MP4 (one encoder, veryslow: a wide window):
    no file at the output path, and the same command reuses every chunk and finishes."""
    out = tmp_path / "out.mp4"
    command = [
        *cli_command(), "render", str(inputs["avatar"]), str(inputs["audio"]), "-o", str(out),
        "--model", str(small_models["unet"]), "--audio-encoder", str(small_models["encoder"]),
        "--chunk-frames", str(CHUNK), "--shard-codec", "raw", "--keep-shards",
        "--encode-mode", "single", "--preset", "veryslow", "--gpus-per-actor", "0",
        "--cpus-per-actor", "1", "--address", ray_cluster.get_runtime_context().gcs_address,
    ]  # fmt: skip
    _kill_driver_when(
        command, tmp_path / "first.txt", lambda: any(tmp_path.glob(".out.*.partial.mp4")),
        "the final encode never started", poll_s=0.002,  # the encoder's temp file
    )  # fmt: skip
    assert not out.exists()

    second = subprocess.run(command, env=_child_env(), capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    report = _report(Path(f"{out}.work"))
    assert report["chunks_reused"] == report["chunks"], report  # nothing rendered twice
    _assert_same_frames(_shard_frames(Path(f"{out}.work")), reference["frames"])
    assert _video_frames(out) == reference["count"] == report["frames"]
    assert not list(tmp_path.glob(".out.*.partial.mp4"))  # the killed encoder's file is gone


# ------------------------------------------------------------------------- determinism


@pytest.mark.parametrize(
    "pool",
    [
        _pool(chunk_frames=20),
        _pool(inference_actors=2, cpus_per_inference_actor=0.5),  # 0.5 CPU still = 1 thread
    ],
    ids=["chunks-of-20", "two-inference-actors"],
)
def test_lossless_frames_do_not_depend_on_chunking_or_actors(
    pool, ray_cluster, small_models, inputs, reference, tmp_path
):
    config = _config(small_models, pool=pool)
    report = render(inputs["avatar"], inputs["audio"], tmp_path / "out.mp4", config)
    assert report.chunks == -(-reference["count"] // pool.chunk_frames)
    _assert_same_frames(_shard_frames(Path(report.work_dir)), reference["frames"])


# ------------------------------------------------------- a chunk that fails every time


def _nan_for_negative_audio(path: Path) -> Path:
    """out = visual[:, :3] + 0 * sqrt(min(audio window)): the ROI where every audio value of
    the frame's window is >= 0, NaN where one is negative. Per frame, not per batch."""
    nodes = [
        helper.make_node("ReduceMin", ["audio"], ["low"], axes=[1, 2, 3], keepdims=1),
        helper.make_node("Sqrt", ["low"], ["root"]),
        helper.make_node("Mul", ["root", "zero"], ["nan_or_zero"]),
        helper.make_node("Add", ["roi", "nan_or_zero"], ["output"]),
    ]
    zero = numpy_helper.from_array(np.array([0.0], np.float32), "zero")
    return save_roi_generator(path, "nan", nodes, [zero])


def _poisoned_render(
    tmp_path: Path, frames: int, row: int, **config
) -> tuple[np.ndarray, RenderConfig]:
    """Features for ``frames`` frames (chunks of 16) where only the frames that see feature
    ``row`` (frame i sees rows [i-8, i+8)) make the picky model output NaN."""
    features = np.zeros((frames, 512), np.float32)
    features[row, 100] = -1.0
    np.save(tmp_path / "features.npy", features)
    return features, RenderConfig(
        model=str(_nan_for_negative_audio(tmp_path / "picky.onnx")),
        features=str(tmp_path / "features.npy"),
        shard_codec=ShardCodec.RAW,
        **config,
    )


def test_a_chunk_that_keeps_failing_stops_the_render(ray_cluster, inputs, tmp_path):
    # Row 39 poisons exactly frames 32..47: chunk 2 and nothing else.
    pool = _pool(chunk_frames=16, max_retries=1)
    features, config = _poisoned_render(tmp_path, 64, 39, pool=pool, keep_shards=True)
    out = tmp_path / "out.mp4"
    with pytest.raises(LipsyncError) as info:
        render(inputs["avatar"], inputs["audio"], out, config)
    message = str(info.value)
    assert re.search(r"chunk 2\b.*\b32\D{1,3}47\b", message), message
    assert "picky.onnx" in message and "NaN" in message
    assert not out.exists()
    assert not (Path(f"{out}.work") / "shards" / "chunk-000002.parquet").exists()
    # the same model renders the clean chunks: the failure really is chunk 2's input
    clean = replace(config, pool=_pool(chunk_frames=16, max_retries=0))
    np.save(tmp_path / "features.npy", np.abs(features))
    report = render(inputs["avatar"], inputs["audio"], tmp_path / "ok.mp4", clean)
    assert report.frames == 64 and (tmp_path / "ok.mp4").exists()


def test_released_shards_are_kept_as_bounded_spares(ray_cluster, inputs, tmp_path):
    """Segments mode without --keep-shards: a recorded chunk's shard is released (its segment
    carries the chunk) and becomes a spare file for a later shard to overwrite; never more
    spares than one per compositor and one more, whenever the render stops."""
    # Row 87 poisons frames 80..95: the last of 6 chunks only.
    _, config = _poisoned_render(tmp_path, 96, 87, pool=_pool(chunk_frames=16, max_retries=0))
    out = tmp_path / "out.mp4"
    with pytest.raises(LipsyncError, match="chunk 5"):
        render(inputs["avatar"], inputs["audio"], out, config)
    work = Path(f"{out}.work")
    manifest = Manifest.load(work)
    assert {0, 1, 2} <= manifest.released  # chunk 5 went in after chunk 2 was recorded
    for chunk in manifest.released:
        assert not shard_path(work, chunk).exists()
    spares = list(spare_dir(work).glob("*.parquet"))
    assert len(spares) <= config.pool.compositors + 1, spares
    for spare in spares:  # each a whole shard of 16 frames, kept only for its pages
        assert pq.read_metadata(spare).num_rows == 16


if __name__ == "__main__":
    if sys.argv[1:2] == ["multinode"]:
        _multinode_main(sys.argv[2])
    else:
        sys.exit(f"usage: {sys.argv[0]} multinode SPEC.json")
