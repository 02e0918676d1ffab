"""What lets several threads render on one :class:`~lipsync_ray.pipeline.Renderer` at once
(a service does), and the hooks a caller passes to one render.

::

    FairShare(limit, inference, compositors)   the pools' chunks in flight, shared fairly by
      └─ Share                                 the renders running on them (one each)
    split_frames(backlog, frames, min_part)    a render's last chunks, split between the
                                               inference actors so that they finish together
    RenderHooks(on_frames, cancel)             one render's progress callback and cancel event
    WorkDirsInUse                              one running render per work directory
    Counter                                    renders served, counted from several threads

Pure Python (no Ray): the scheduler (:mod:`lipsync_ray.scheduler`) takes a :class:`Share`,
the renderer holds the rest.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
from collections import Counter as _Tally
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from lipsync_ray.errors import Cancelled, InputError

__all__ = [
    "MIN_PART_FRAMES",
    "Counter",
    "FairShare",
    "OnFrames",
    "RenderHooks",
    "Share",
    "WorkDirsInUse",
    "split_frames",
]

log = logging.getLogger(__name__)

# A render's progress hook: (frames done, frames in the output).
OnFrames = Callable[[int, int], None]


class FairShare:
    """The chunks in flight on one set of pools, shared by the renders that run on them at
    the same time: one per :class:`~lipsync_ray.pipeline.Renderer`, made with its pools; each
    render holds a :class:`Share` (:meth:`share`) while its chunks run.

    Args:
        limit: chunks in flight on the pools, all renders together (``pool.in_flight()``).
        inference: InferenceActor count; compositors: CompositorActor count.

    Rules (under one lock: renders run in different threads):

    - the chunks in flight of all renders together never exceed ``limit``, but for each
      render's first: a render with nothing in flight may always submit one (a short clip
      that starts during a long render does not wait for one of its chunks to finish; the
      inference actors' turns run it first), so at most ``limit + active`` are in flight;
    - each of the ``active`` renders may have ``max(1, limit // active)`` in flight,
      recomputed as renders come and go (a render over its new share submits nothing until
      its chunks come back below it);
    - a chunk goes to the inference actor with the fewest frames still to infer (every
      render's chunks submitted to it whose predictions are not done: :meth:`Share.inferred`)
      and to the compositor with the fewest chunks in flight (ties: the lowest index). An
      actor's chunks count until their predictions are done, not until they are composited:
      counted to the end, an actor whose chunk is being composited looks busy while its
      session is free, the next chunks queue on the other one, and at the end of a render one
      actor still has two chunks to infer while the other has none (a 20-s render on two
      actors ended 5 chunks to 3, one session idle 18-20 % of the chunks phase);
    - free room goes to the waiting render with the fewest chunks in flight, the one waiting
      longest on a tie: a render cannot take back the slot its own chunk just freed while
      another render waits for one (with ``limit`` 1 two renders alternate).
    """

    def __init__(self, limit: int, inference: int, compositors: int) -> None:
        if limit < 1 or inference < 1 or compositors < 1:
            raise ValueError(
                f"expected limit, inference and compositors >= 1, got {limit}, {inference}, "
                f"{compositors}"
            )
        self.limit = limit
        self._lock = threading.Lock()
        self._load_inf = [0] * inference
        self._load_comp = [0] * compositors
        self._queued = [0] * inference  # frames submitted to each inference actor, not inferred
        self._shares: list[Share] = []
        self._tickets = itertools.count()  # the order in which renders started waiting

    @property
    def active(self) -> int:
        """Renders holding a share now."""
        with self._lock:
            return len(self._shares)

    @property
    def in_flight(self) -> int:
        """Chunks in flight, all renders together."""
        with self._lock:
            return sum(s.in_flight for s in self._shares)

    def loads(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Chunks in flight on each inference actor and on each compositor."""
        with self._lock:
            return tuple(self._load_inf), tuple(self._load_comp)

    def queued_frames(self) -> tuple[int, ...]:
        """Frames each inference actor still has to infer, all renders together."""
        with self._lock:
            return tuple(self._queued)

    def per_render(self) -> int:
        """The chunks each active render may have in flight now."""
        with self._lock:
            return self._per_render()

    def _per_render(self) -> int:
        return max(1, self.limit // max(len(self._shares), 1))

    def open(self) -> Share:
        """A share for one render; :meth:`Share.close` it when the render ends."""
        share = Share(self)
        with self._lock:
            self._shares.append(share)
        return share

    @contextlib.contextmanager
    def share(self) -> Iterator[Share]:
        """:meth:`open`, closed on the way out (an exception or a cancel included)."""
        share = self.open()
        try:
            yield share
        finally:
            share.close()

    def _may_take(self, share: Share) -> bool:
        if share.in_flight == 0:
            # A render's first chunk never waits for room: on the inference actors it takes
            # the session at the next batch boundary if its render is shorter (actors.Turns),
            # so holding it back here would only add a finished chunk's wait to its latency.
            return True
        per = self._per_render()
        if share.in_flight >= per or sum(s.in_flight for s in self._shares) >= self.limit:
            return False
        mine = (share.in_flight, _NOT_WAITING if share.waiting is None else share.waiting)
        return not any(
            other is not share
            and other.waiting is not None
            and other.in_flight < per
            and (other.in_flight, other.waiting) < mine
            for other in self._shares
        )


_NOT_WAITING = float("inf")


class Share:
    """One render's part of a :class:`FairShare`: :meth:`take` a slot (the actors to use)
    before submitting a chunk, :meth:`give` it back when the chunk's result is in, and
    :meth:`close` once the render ends (what it still holds is given back)."""

    def __init__(self, fair: FairShare) -> None:
        self.fair = fair
        self.in_flight = 0  # this render's chunks in flight
        self.waiting: int | None = None  # ticket of a take() refused for lack of room
        self._held: _Tally[tuple[int, int]] = _Tally()
        self._queued: _Tally[int] = _Tally()  # frames not inferred yet, per inference actor
        self.closed = False

    def take(self, frames: int = 1) -> tuple[int, int] | None:
        """The (inference, compositor) indices for one more chunk of ``frames`` frames,
        counted as in flight (and its frames as queued on that inference actor until
        :meth:`inferred`); None when this render has no room now (it is then waiting, ahead
        of later waiters)."""
        fair = self.fair
        with fair._lock:
            if self.closed:
                raise RuntimeError("take() on a closed share")
            if not fair._may_take(self):
                if self.in_flight >= fair._per_render():
                    self.waiting = None  # at its share: it waits for its own chunks, not room
                elif self.waiting is None:
                    self.waiting = next(fair._tickets)
                return None
            self.waiting = None
            i = min(range(len(fair._queued)), key=lambda k: (fair._queued[k], fair._load_inf[k]))
            c = min(range(len(fair._load_comp)), key=fair._load_comp.__getitem__)
            fair._load_inf[i] += 1
            fair._load_comp[c] += 1
            fair._queued[i] += frames
            self.in_flight += 1
            self._held[(i, c)] += 1
            self._queued[i] += frames
            return i, c

    def inferred(self, inference: int, frames: int) -> None:
        """``frames`` frames taken on inference actor ``inference`` have their predictions
        (or will not get them: a failed chunk); called once per chunk, before :meth:`give`."""
        with self.fair._lock:
            self._check_queued("inferred", frames, inference)
            self._queued[inference] -= frames
            self.fair._queued[inference] -= frames

    def move(self, frames: int, source: int, target: int) -> None:
        """``frames`` of a chunk taken on inference actor ``source`` go to ``target`` instead
        (a part of its inference split off); :meth:`inferred` then names ``target`` for them.
        The chunk stays in flight on ``source``'s slot."""
        with self.fair._lock:
            self._check_queued("move", frames, source)
            self._queued[source] -= frames
            self._queued[target] += frames
            self.fair._queued[source] -= frames
            self.fair._queued[target] += frames

    def _check_queued(self, call: str, frames: int, inference: int) -> None:
        if self._queued[inference] < frames:
            raise RuntimeError(
                f"{call}() of {frames} frames on inference actor {inference}, which has "
                f"{self._queued[inference]} of this render's queued"
            )

    def give(self, inference: int, compositor: int) -> None:
        """A chunk taken on these actors is no longer in flight."""
        with self.fair._lock:
            self._give(inference, compositor)

    def _give(self, inference: int, compositor: int) -> None:
        key = (inference, compositor)
        if self._held[key] <= 0:
            raise RuntimeError(f"give() of a slot not held: {key}")
        self._held[key] -= 1
        self.in_flight -= 1
        self.fair._load_inf[inference] -= 1
        self.fair._load_comp[compositor] -= 1

    def idle(self) -> None:
        """This render has nothing to submit now (or blocks elsewhere): it stops waiting."""
        with self.fair._lock:
            self.waiting = None

    def close(self) -> None:
        """Leave the pools: every slot still held is given back (chunks a failed or cancelled
        render leaves behind are no longer counted) and the others' shares grow. Idempotent."""
        fair = self.fair
        with fair._lock:
            if self.closed:
                return
            for key, count in list(self._held.items()):
                for _ in range(count):
                    self._give(*key)
            for inference, frames in self._queued.items():
                fair._queued[inference] -= frames
            self._queued.clear()
            self.waiting = None
            self.closed = True
            fair._shares.remove(self)

    def __enter__(self) -> Share:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Counter:
    """1, 2, 3, ... one number per :meth:`next` call, also from concurrent threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = itertools.count(1)

    def next(self) -> int:
        with self._lock:
            return next(self._count)


class WorkDirsInUse:
    """The work directories of the renders running now: one render per directory."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._paths: set[str] = set()

    @contextlib.contextmanager
    def hold(self, path: Path):
        """Holds ``path`` for one render; raises InputError while another render holds it."""
        key = str(path)
        with self._lock:
            if key in self._paths:
                raise InputError(
                    "another render of this renderer is using the work directory; give each "
                    "render its own work directory (or output)",
                    path=path,
                )
            self._paths.add(key)
        try:
            yield
        finally:
            with self._lock:
                self._paths.discard(key)


@dataclass(frozen=True)
class RenderHooks:
    """A render's caller's hooks (:meth:`Renderer.render`'s ``on_frames`` and ``cancel``)."""

    on_frames: OnFrames | None = None
    cancel: threading.Event | None = None

    def frames(self, done: int, total: int) -> None:
        """Tell ``on_frames``; what it raises is logged (a progress display must not break a
        render)."""
        if self.on_frames is None:
            return
        try:
            self.on_frames(done, total)
        except Exception:
            log.warning("on_frames(%d, %d) raised; the render goes on", done, total,
                        exc_info=True)  # fmt: skip

    def check(self, work_dir: Path) -> None:
        """Raises Cancelled (naming the render's ``work_dir``) once ``cancel`` is set."""
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled("the render was cancelled", path=work_dir)


# A part of a chunk split between inference actors (split_frames) has at least this many
# frames: a chunk shorter than twice this stays whole.
MIN_PART_FRAMES = 8


def split_frames(backlog: Sequence[int], frames: int, min_part: int) -> list[int]:
    """How many of a chunk's ``frames`` each inference actor should infer, given the frames
    each still has to infer (``backlog``), so that they finish as close together as can be:
    water filling, the least loaded first, no actor given fewer than ``min_part`` (those go
    to the others; a chunk shorter than that stays whole). Ties go to the lower index."""
    order = sorted(range(len(backlog)), key=lambda j: (backlog[j], j))
    for k in range(len(order), 1, -1):
        use = order[:k]  # the k least loaded
        level = (frames + sum(backlog[j] for j in use)) / k
        shares = {j: level - backlog[j] for j in use}
        if min(shares.values()) < min_part:
            continue  # the k-th is (nearly) above the water: fewer actors
        sizes = {j: int(share) for j, share in shares.items()}
        # the frames rounding left over: to the largest remainders, then the lower index
        by_remainder = sorted(use, key=lambda j: (sizes[j] - shares[j], j))
        for j in by_remainder[: frames - sum(sizes.values())]:
            sizes[j] += 1
        return [sizes.get(j, 0) for j in range(len(backlog))]
    return [frames if j == order[0] else 0 for j in range(len(backlog))]
