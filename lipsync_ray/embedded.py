"""The Ray cluster a render runs on: joined by address, or started for the process alone.

::

    init_ray(ray, address)      join ``address`` (or RAY_ADDRESS), or start an embedded
                                cluster: loopback only, token authentication, no dashboard,
                                only the head processes a render uses
    _embedded_node()            the patches on Ray's start-up that make it so (while
                                ``ray.init`` runs only)
    _await_node(gcs, node_id)   the raylet's registration, asked for every 20 ms

The driver (:class:`lipsync_ray.pipeline.Renderer`) and the service call :func:`init_ray`; the
tests' shared cluster starts through :func:`_embedded_node` too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time

from lipsync_ray.errors import RenderError

__all__ = ["LOOPBACK", "init_ray"]

log = logging.getLogger(__name__)


# The embedded cluster's address: every Ray process of it listens here and nowhere else.
LOOPBACK = "127.0.0.1"


def init_ray(ray, address: str | None) -> None:
    """Join a cluster (``address``, or RAY_ADDRESS as set inside `ray job submit`), or start an
    embedded one for this process: every listener of it (GCS, raylet, agents, workers) on the
    loopback interface, token authentication on whatever RAY_AUTH_MODE says, no dashboard.

    Ray's own log messages from ``ray.init`` go to this package's log at DEBUG level (the
    CLI's ``--debug``), not to the terminal. Raises RenderError, with the embedded cluster
    stopped, where this Ray would listen beyond the loopback interface.
    """
    address = address or os.environ.get("RAY_ADDRESS") or None
    with _ray_messages_at_debug():
        if address:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
            return
        _token_authentication_on()
        with _embedded_node():
            ray.init(
                # "local": always a new cluster, even when a `ray start` cluster runs on this
                # machine (ray.init() would otherwise join it); --address auto joins one.
                address="local",
                include_dashboard=False,
                dashboard_host=LOOPBACK,
                log_to_driver=False,
                configure_logging=False,
            )
    node_ip = ray.util.get_node_ip_address()
    if node_ip != LOOPBACK:
        ray.shutdown()
        raise RenderError(
            f"the embedded Ray cluster would listen on {node_ip}, not only on {LOOPBACK} "
            f"(Ray {ray.__version__}): start one with `ray start` and pass --address"
        )


def _token_authentication_on() -> None:
    """RAY_AUTH_MODE=token for this process and the cluster it starts, also where the user's
    environment says ``disabled``. Ray reads the mode into its config when it loads: the
    config is refreshed here, whatever the variable said before. The token comes from where
    Ray looks (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token); ``ray.init`` writes
    ~/.ray/auth_token when there is none."""
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None and mode.lower() != "token":
        log.info("RAY_AUTH_MODE=%s ignored: an embedded Ray cluster uses a token", mode)
    try:  # Ray's own switch (a private one): it also refreshes the config Ray read at import
        from ray._private.authentication.authentication_token_setup import _enable_token_auth
    except ImportError:  # a Ray that moved it reads the variable when its config loads
        log.warning("this Ray has no _enable_token_auth: setting RAY_AUTH_MODE=token only")
        os.environ["RAY_AUTH_MODE"] = "token"
        return
    _enable_token_auth()  # sets RAY_AUTH_MODE=token and refreshes Ray's config


class _ToDebugLog(logging.Handler):
    """Re-logs a record of Ray's logger on this package's logger at DEBUG level."""

    def emit(self, record: logging.LogRecord) -> None:
        log.debug("ray %s: %s", record.levelname.lower(), record.getMessage())


@contextlib.contextmanager
def _ray_messages_at_debug():
    """Ray's Python logger ("ray") writes to stderr through its own handler, so a plain
    ``ray.init`` prints lines such as "Token authentication is enabled ..." on the terminal of
    a render that went well. Meanwhile its records go to this package's log at DEBUG instead.
    A failure still reaches the caller as the exception ``ray.init`` raises."""
    ray_logger = logging.getLogger("ray")
    saved = ray_logger.handlers[:], ray_logger.propagate
    ray_logger.handlers, ray_logger.propagate = [_ToDebugLog()], False
    try:
        yield
    finally:
        ray_logger.handlers, ray_logger.propagate = saved


@contextlib.contextmanager
def _embedded_node(*, loopback: bool = True):
    """While ``ray.init`` starts an embedded cluster, set its head node's address to the
    loopback one (``loopback``), give its dashboard agent a free port, and leave off the head
    processes that a render on its own cluster never uses: the autoscaler's monitor (the
    cluster is this machine, fixed), the log monitor (logs are not sent to the driver) and the
    API server (with the dashboard off it serves only usage statistics; no job to submit).

    The node's address decides where every Ray process binds: given as ``_node_ip_address``,
    ``ray.init`` replaces 127.0.0.1 with the machine's network address, so it is set here on
    the node's parameters instead (``init_ray`` checks that it held). Ray rewrites 127.0.0.1
    in an address to join the same way: no other driver can join a loopback cluster, so a
    cluster meant to be joined by address (the tests' shared one) passes ``loopback=False``.
    Leaving off the three processes took the embedded start on the 2-vCPU benchmark machine
    from about 3-6 s to 2-2.5 s and ``ray.shutdown`` from 1.4 s to 0.2-0.4 s.

    The dashboard agent runs as in a minimal Ray install (``--minimal``): no HTTP server, no
    metrics exporter, no job agent, none of which a render on its own cluster uses. Ray decides
    that by importing the dashboard's optional dependencies (aiohttp and more) in the driver
    while it starts the raylet; answering for it skips that import, 0.3 s of the driver's CPU
    on the critical path, and the embedded start went from 2.0 s to 1.75 s.

    Once the raylet is started, ``ray.init`` asks the GCS for its node, and Ray's C++ side asks
    again every whole second until the raylet has registered (after its two agents start: 1.3 s
    alone, 2.4 s beside the audio encoder in a render), so the driver slept up to a second
    after the registration (0.9 s in the run that found it, the CPUs idle). Here the node is
    asked for every 20 ms first (:func:`_await_node`), and Ray's own request then finds it at
    once.

    These are Ray internals (``ray._private.node``, ``ray._private.utils``,
    ``ray._private.services``): where they are not as expected Ray starts as it always does
    (and ``init_ray`` then refuses the cluster, its address not being the loopback one).
    """
    try:
        from ray._private import node as node_mod
        from ray._private import services as services_mod
        from ray._private import utils as utils_mod

        original = node_mod.Node.__init__
        node_mod.Node.start_api_server  # noqa: B018 - only checks that it exists
        dependency_error = utils_mod.get_dashboard_dependency_error
        get_node = services_mod.get_node
    except (ImportError, AttributeError):
        yield
        return

    def get_node_once_registered(gcs_address, node_id, *args, **kwargs):
        _await_node(gcs_address, node_id)
        return get_node(gcs_address, node_id, *args, **kwargs)

    def embedded_init(self, ray_params, *args, **kwargs):
        if kwargs.get("ray_init_cluster") and hasattr(ray_params, "no_monitor"):
            if loopback:
                ray_params.node_ip_address = LOOPBACK
            # a free port, not 52365: a `ray start` head on this machine needs that one
            ray_params.dashboard_agent_listen_port = 0
            ray_params.no_monitor = True
            ray_params.include_log_monitor = False
            self.start_api_server = lambda **_: None
        original(self, ray_params, *args, **kwargs)

    node_mod.Node.__init__ = embedded_init
    # start_raylet passes --minimal to the dashboard agent when this returns a reason
    utils_mod.get_dashboard_dependency_error = lambda: "an embedded cluster (lipsync-ray)"
    services_mod.get_node = get_node_once_registered
    try:
        yield
    finally:
        node_mod.Node.__init__ = original
        utils_mod.get_dashboard_dependency_error = dependency_error
        services_mod.get_node = get_node


NODE_POLL_S = 0.02
NODE_WAIT_S = 30.0  # Ray's own wait for a raylet to register (raylet_start_wait_time_s)


def _await_node(gcs_address: str, node_id: str, *, timeout_s: float = NODE_WAIT_S) -> bool:
    """Wait until the GCS at ``gcs_address`` lists node ``node_id`` (hex) as alive, asking
    every NODE_POLL_S; True once it does. False after ``timeout_s``, or at once where this
    Ray's client differs from the one expected: the caller then asks Ray as before."""
    try:
        from ray._raylet import GcsClient, NodeID
        from ray.core.generated.gcs_pb2 import GcsNodeInfo
        from ray.core.generated.gcs_service_pb2 import GetAllNodeInfoRequest

        client = GcsClient(address=gcs_address)
        selector = GetAllNodeInfoRequest.NodeSelector(node_id=NodeID.from_hex(node_id).binary())
        alive = GcsNodeInfo.GcsNodeState.ALIVE
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            if client.get_all_node_info(timeout=5, node_selectors=[selector], state_filter=alive):
                log.debug("the raylet registered %.2f s after its start", time.monotonic() - start)
                return True
            time.sleep(NODE_POLL_S)
    except Exception as exc:  # Ray's own wait follows, and reports what is wrong
        log.debug("asking the GCS for the node failed (%r): Ray's own wait follows", exc)
    return False
