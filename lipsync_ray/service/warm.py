"""Warm Renderers: one per (avatar, models, settings), at most ``max_warm`` of them, the least
recently used idle one closed (its actors killed) to make room for another.

A Renderer in use is never evicted: a job that needs a Renderer that is not warm while every
warm one is busy waits (its cancel event stops the wait) until one goes idle. Several jobs
with the same key share one Renderer at the same time (its pools are shared fairly between
concurrent renders).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from lipsync_ray.config import RenderConfig
from lipsync_ray.errors import Cancelled

__all__ = ["WarmKey", "WarmRenderers"]

log = logging.getLogger(__name__)

WAIT_POLL_S = 0.2  # how often a waiting job looks at its cancel event


class RendererLike(Protocol):
    def close(self) -> None: ...


@dataclass(frozen=True)
class WarmKey:
    """What makes two jobs able to share a Renderer: the avatar and every setting."""

    avatar: str
    settings: str  # the RenderConfig as sorted JSON
    config: RenderConfig | None = field(default=None, compare=False, repr=False)  # its value

    @classmethod
    def of(cls, avatar: str, config: RenderConfig) -> WarmKey:
        return cls(avatar, json.dumps(config.to_dict(), sort_keys=True), config)


@dataclass
class _Entry:
    renderer: Any = None  # None while it is being made
    users: int = 0
    ready: threading.Event = field(default_factory=threading.Event)
    failed: BaseException | None = None
    last_used: float = 0.0


class WarmRenderers:
    """At most ``max_warm`` Renderers, made by ``make(key)``, kept while idle, the least
    recently used evicted first (``close()`` called: it kills the Renderer's actors)."""

    def __init__(self, make: Callable[[WarmKey], RendererLike], max_warm: int = 1) -> None:
        if max_warm < 1:
            raise ValueError(f"max_warm must be >= 1, got {max_warm}")
        self._make = make
        self.max_warm = max_warm
        self._entries: OrderedDict[WarmKey, _Entry] = OrderedDict()  # least recent first
        self._cond = threading.Condition()
        self._closed = False

    def warm_keys(self) -> list[WarmKey]:
        """The warm keys, least recently used first."""
        with self._cond:
            return list(self._entries)

    @contextlib.contextmanager
    def lease(self, key: WarmKey, cancel: threading.Event | None = None) -> Iterator[Any]:
        """The Renderer for ``key``, held (never evicted) inside the ``with``.

        Raises Cancelled when ``cancel`` is set while waiting for room (or the pool is
        closed), and whatever ``make`` raised when making the Renderer failed."""
        entry, make = self._claim(key, cancel)
        if make:
            try:
                renderer = self._make(key)
            except BaseException as exc:
                with self._cond:
                    entry.failed = exc
                    self._entries.pop(key, None)
                    entry.ready.set()
                    self._cond.notify_all()
                raise
            with self._cond:
                entry.renderer = renderer
                entry.ready.set()
                self._cond.notify_all()
        else:
            while not entry.ready.wait(WAIT_POLL_S):
                if cancel is not None and cancel.is_set():
                    self._release(key, entry)
                    raise _cancelled()
            if entry.failed is not None:
                self._release(key, entry)
                raise entry.failed
        try:
            yield entry.renderer
        finally:
            self._release(key, entry)

    def _claim(self, key: WarmKey, cancel: threading.Event | None) -> tuple[_Entry, bool]:
        """Take a user's share of ``key``'s entry, making room for it if needed; True when the
        caller must make the Renderer."""
        while True:
            evicted = None
            with self._cond:
                if self._closed:
                    raise _cancelled()
                entry = self._entries.get(key)
                if entry is not None:
                    entry.users += 1
                    self._entries.move_to_end(key)
                    return entry, False
                if len(self._entries) < self.max_warm:
                    entry = _Entry(users=1)
                    self._entries[key] = entry
                    return entry, True
                idle = next((k for k, e in self._entries.items() if e.users == 0), None)
                if idle is not None:
                    evicted = self._entries.pop(idle)
                else:
                    self._cond.wait(WAIT_POLL_S)
            if evicted is not None:
                log.info("evicting the warm renderer of avatar %r (least recently used)",
                         idle.avatar)  # fmt: skip
                _close(evicted.renderer)
            elif cancel is not None and cancel.is_set():
                raise _cancelled()

    def _release(self, key: WarmKey, entry: _Entry) -> None:
        with self._cond:
            entry.users -= 1
            entry.last_used = time.monotonic()
            self._cond.notify_all()

    def close(self) -> None:
        """Close every Renderer (running renders on them fail); later leases are refused."""
        with self._cond:
            self._closed = True
            entries = list(self._entries.values())
            self._entries.clear()
            self._cond.notify_all()
        for entry in entries:
            _close(entry.renderer)


def _close(renderer: RendererLike | None) -> None:
    if renderer is None:
        return
    try:
        renderer.close()
    except Exception:  # a renderer that cannot close must not stop the others
        log.exception("closing a warm renderer failed")


def _cancelled() -> Cancelled:
    return Cancelled("the job was cancelled while it waited for a warm renderer")
