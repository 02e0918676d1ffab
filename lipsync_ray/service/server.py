"""``lipsync-ray serve``: start (or join) Ray, run the Serve application, wait for a signal,
drain, stop.

The embedded cluster is started as a render starts one (loopback only, token authentication;
:func:`lipsync_ray.embedded.init_ray`); with ``--address`` the service joins a running
cluster, and on exit removes its own application and leaves that cluster's Serve and Ray up.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request

from lipsync_ray.errors import ServiceError
from lipsync_ray.service.settings import ServiceSettings

__all__ = ["serve_forever"]

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 120.0  # from serve.run to /healthz answering
DRAIN_EXTRA_S = 30.0  # beyond --drain-timeout: the cancelled renders' stop and the closing


def serve_forever(settings: ServiceSettings, *, ready=print) -> int:
    """Run the service until SIGINT or SIGTERM; returns the exit code (0 after a drain).

    ``ready(line)`` is called with ``serving on URL`` once ``/healthz`` answers."""
    import ray
    from ray import serve

    from lipsync_ray.embedded import init_ray
    from lipsync_ray.service.app import DEPLOYMENT_NAME, RenderService

    lock = _lock_state_dir(settings.state_dir)
    _check_port_free(settings.host, settings.port)
    if not logging.getLogger("lipsync_ray").isEnabledFor(logging.DEBUG):
        logging.getLogger("ray.serve").setLevel(logging.WARNING)  # Serve's progress lines
    stop = threading.Event()
    owns_ray = not ray.is_initialized()
    if owns_ray:
        init_ray(ray, settings.config.address)
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    started_serve = False
    try:
        started_serve = _start_serve(serve, settings, owns_ray)
        node = ray.util.get_node_ip_address()
        # The replica keeps its state on this machine: pinned to this node.
        deployment = RenderService.options(
            ray_actor_options={"num_cpus": 0, "resources": {f"node:{node}": 0.001}}
        )
        handle = serve.run(deployment.bind(settings), name=DEPLOYMENT_NAME, route_prefix="/")
        _wait_ready(settings.url, stop)
        if not stop.is_set():
            ready(f"serving on {settings.url}")
        stop.wait()
        log.info("stopping: draining (up to %g s for running jobs)", settings.drain_timeout_s)
        handle.drain.remote(settings.drain_timeout_s).result(
            timeout_s=settings.drain_timeout_s + DRAIN_EXTRA_S
        )
        log.info("drained")
        return 0
    finally:
        with contextlib.suppress(Exception):
            if started_serve:
                serve.shutdown()
            else:
                serve.delete(DEPLOYMENT_NAME)
        if owns_ray:
            ray.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        os.close(lock)


def _start_serve(serve, settings: ServiceSettings, owns_ray: bool) -> bool:
    """Start Serve's controller and proxy on this cluster; False when it ran already (a
    joined cluster's Serve keeps its own HTTP options)."""
    if not owns_ray:
        with contextlib.suppress(Exception):
            if serve.status().proxies:
                log.info("Serve runs on this cluster already: its proxy's host and port apply")
                return False
    serve.start(
        proxy_location="HeadOnly",
        http_options={"host": settings.host, "port": settings.port},
    )
    return True


def _lock_state_dir(state_dir) -> int:
    """An exclusive lock on ``<state_dir>/lock`` for this process's life (the kernel drops it
    when the process dies, also by SIGKILL): one service per state directory. Returns the
    file descriptor that holds it."""
    path = os.path.join(state_dir, "lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise ServiceError("another service uses this state directory", path=state_dir) from None
    return fd


def _check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ServiceError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def _wait_ready(url: str, stop: threading.Event) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not stop.is_set():
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=5) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise ServiceError(f"the service did not answer on {url}/healthz within "
                               f"{READY_TIMEOUT_S:g} s")  # fmt: skip
        stop.wait(0.2)
