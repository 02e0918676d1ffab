"""The embedded cluster's start: ``ray.init`` waits for the raylet's registration by asking
the GCS every 20 ms (``embedded._await_node``) instead of sleeping whole seconds in Ray's C++
loop; the patch on Ray's internals lives only while the cluster starts."""

from __future__ import annotations

import pytest

from lipsync_ray import embedded

pytestmark = pytest.mark.ray


def _node(ray) -> tuple[str, str]:
    context = ray.get_runtime_context()
    return context.gcs_address, context.get_node_id()


def test_the_node_of_a_running_cluster_is_found(ray_cluster):
    gcs, node_id = _node(ray_cluster)
    assert embedded._await_node(gcs, node_id, timeout_s=10) is True


@pytest.mark.parametrize(
    ("node_id", "why"),
    [
        ("ab" * 28, "a node this GCS never had: asked until the timeout"),
        ("not-hex", "an id Ray cannot parse: Ray's own wait follows at once"),
    ],
)
def test_a_node_that_is_not_there_gives_way_to_rays_own_wait(ray_cluster, node_id, why):
    gcs, _ = _node(ray_cluster)
    assert embedded._await_node(gcs, node_id, timeout_s=0.2) is False, why


def test_rays_get_node_waits_through_the_poll_only_while_the_cluster_starts(
    ray_cluster, monkeypatch
):
    from ray._private import services

    gcs, node_id = _node(ray_cluster)
    original = services.get_node
    asked: list[tuple[str, str]] = []
    monkeypatch.setattr(embedded, "_await_node", lambda *a, **k: asked.append(a) or True)
    with embedded._embedded_node(loopback=False):
        assert services.get_node is not original
        info = services.get_node(gcs, node_id)
    assert asked == [(gcs, node_id)]
    assert info["node_id"] == node_id  # Ray's own answer, passed through
    assert services.get_node is original
