"""PoolConfig.resolved shares fit the cluster; validate() rejects each bad option value."""

from __future__ import annotations

import pytest

from lipsync_ray.config import PoolConfig, RenderConfig, validate
from lipsync_ray.errors import InputError


@pytest.mark.parametrize(
    ("pool", "cpus", "gpus", "expected_cpus", "expected_gpus"),
    [
        (PoolConfig(), 2, 0, 0.5, 0.0),  # one actor per CPU splits what the compositors leave
        (PoolConfig(inference_actors=4), 2, 1, 0.25, 0.25),  # four actors fit two CPUs
        (PoolConfig(inference_actors=4, compositors=8), 16, 1, 3.0, 0.25),
        (PoolConfig(inference_actors=3, compositors=1), 2, 0, 0.5, 0.0),
        (PoolConfig(cpus_per_inference_actor=2.0, gpus_per_actor=0.5), 2, 0, 2.0, 0.5),
        (PoolConfig(inference_actors=2, compositors=4), 2, 0, 0.25, 0.0),  # at least a step
    ],
)
def test_resolved_shares(pool, cpus, gpus, expected_cpus, expected_gpus):
    resolved = pool.resolved(cpus, gpus)
    assert resolved.cpus_per_inference_actor == expected_cpus
    assert resolved.gpus_per_actor == expected_gpus


@pytest.mark.parametrize(
    ("pool", "settings", "message"),
    [
        ({"inference_actors": 0}, {}, "inference actors must be >= 1, got 0"),
        ({"compositors": 0}, {}, "compositors must be >= 1, got 0"),
        ({"gpus_per_actor": 1.5}, {}, "GPUs per actor must be a fraction in [0, 1]"),
        ({"cpus_per_inference_actor": 0.0}, {}, "CPUs per inference actor must be > 0"),
        ({"cpus_per_compositor": -1.0}, {}, "CPUs per compositor must be > 0, got -1.0"),
        ({"batch_size": 257}, {}, "batch size must be in [1, 256], got 257"),
        ({"compositor_niceness": 20}, {}, "compositor niceness must be in [0, 19], got 20"),
        ({"compositor_niceness": -1}, {}, "compositor niceness must be in [0, 19], got -1"),
        ({"compositor_niceness": 2.5}, {}, "compositor niceness must be in [0, 19], got 2.5"),
        ({"chunk_frames": 0}, {}, "chunk frames must be in [1, 4096], got 0"),
        ({"max_chunks_in_flight": -1}, {}, "chunks in flight must be >= 0, got -1"),
        ({"max_retries": -1}, {}, "retries must be >= 0, got -1"),
        ({"chunk_timeout_s": 0.0}, {}, "chunk timeout must be > 0 s, got 0.0"),
        ({}, {"model": ""}, "a generator model is required (--model)"),
        ({}, {"audio_encoder": "enc.onnx", "features": "f.npy"}, "not both"),
        ({}, {"start_frame": -3}, "start frame must be >= 0, got -3"),
        ({}, {"precision_threshold_db": 0.0}, "precision threshold must be in (0, 100) dB"),
    ],
)
def test_validate_rejects(pool, settings, message):
    with pytest.raises(InputError) as caught:  # RenderConfig validates itself when built
        RenderConfig(**{"model": "unet.onnx", **settings}, pool=PoolConfig(**pool))
    assert message in str(caught.value)


@pytest.mark.parametrize("niceness", [0, 19])
def test_validate_accepts_niceness_bounds(niceness):
    config = RenderConfig(model="unet.onnx", pool=PoolConfig(compositor_niceness=niceness))
    validate(config)
    assert config.pool.compositor_niceness == niceness
