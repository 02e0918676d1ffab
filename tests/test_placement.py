"""--placement split on a two-node cluster (ray.cluster_utils.Cluster on this machine): the
inference actors land on the GPU node, the compositors on the CPU-only head."""

from __future__ import annotations

from pathlib import Path

import pytest

from lipsync_ray.config import Placement, PoolConfig, RenderConfig
from lipsync_ray.dev.speech import synth_speech, write_audio
from lipsync_ray.dev.synthetic import make_demo_avatar
from lipsync_ray.encode import probe
from lipsync_ray.pipeline import render

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def two_nodes(own_ray_cluster):
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "num_gpus": 0, "include_dashboard": False},
    )
    gpu_node = cluster.add_node(num_cpus=2, num_gpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    yield cluster, gpu_node
    ray.shutdown()
    cluster.shutdown()


def test_split_placement(two_nodes, small_models, tmp_path):
    _, gpu_node = two_nodes
    avatar = make_demo_avatar(tmp_path / "avatar", seconds=0.4, size_wh=(192, 160), seed=3)
    audio = write_audio(tmp_path / "a.wav", synth_speech(1.0, seed=1))
    pool = PoolConfig(inference_actors=2, gpus_per_actor=0.25, cpus_per_inference_actor=0.5,
                      compositors=2, placement=Placement.SPLIT, chunk_frames=8)  # fmt: skip
    config = RenderConfig(
        model=str(small_models["unet"]),
        audio_encoder=str(small_models["encoder"]),
        pool=pool,
        allow_cpu_fallback=True,  # the GPU node's GPU is simulated: no CUDA behind it
    )
    report = render(Path(avatar.path), audio, tmp_path / "out.mp4", config)
    assert probe(tmp_path / "out.mp4").video_frames == report.frames
    nodes = {a.role: set() for a in report.actors}
    for a in report.actors:
        nodes[a.role].add(a.node_id)
    assert nodes["inference"] == {gpu_node.node_id}
    assert gpu_node.node_id not in nodes["compositor"]
