"""PoolConfig.resolved: the automatic CPU and GPU shares fit the cluster."""

from __future__ import annotations

import pytest

from lipsync_ray.config import PoolConfig


@pytest.mark.parametrize(
    ("pool", "cpus", "gpus", "expected_cpus", "expected_gpus"),
    [
        (PoolConfig(), 2, 0, 1.5, 0.0),  # one actor takes what the compositor leaves
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
