"""Concurrent renders on one set of pools (scheduler.FairShare, Share) and the scheduler's
cancel and progress hooks, without Ray: a fake ``ray`` module stands in for the actors.

The Ray-side behaviour (two real renders on one Renderer) is in test_concurrent_renders.py."""

from __future__ import annotations

import itertools
import logging
import threading
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import ray.exceptions

from lipsync_ray.chunks import ChunkSpec, plan_chunks
from lipsync_ray.concurrency import MIN_PART_FRAMES, RenderHooks, split_frames
from lipsync_ray.config import PoolConfig
from lipsync_ray.errors import Cancelled, InputError, RenderError
from lipsync_ray.scheduler import (
    WAIT_ALONE_S,
    WAIT_SHARED_S,
    ChunkScheduler,
    FairShare,
)

# ---------------------------------------------------------------------------- FairShare alone

# limit, active renders -> chunks each render gets when they take greedily one after the other
SHARES = [
    (5, 1, [5]),
    (5, 2, [2, 2]),  # 5 // 2: the fifth slot stays free, no render exceeds its share
    (6, 2, [3, 3]),
    (8, 3, [2, 2, 2]),
    (5, 3, [1, 1, 1]),
    (3, 3, [1, 1, 1]),
    (2, 3, [1, 1, 1]),  # at least one each: a render's first chunk never waits for room
    (1, 2, [1, 1]),
]


@pytest.mark.parametrize(("limit", "active", "expected"), SHARES)
def test_each_render_gets_an_equal_share_within_the_limit(limit, active, expected):
    fair = FairShare(limit, inference=2, compositors=2)
    shares = [fair.open() for _ in range(active)]
    assert fair.per_render() == max(1, limit // active)
    got = []
    for share in shares:
        n = 0
        while share.take() is not None:
            n += 1
        got.append(n)
    assert got == expected
    assert fair.in_flight == sum(expected) <= max(limit, active)


def test_shares_are_recomputed_as_renders_come_and_go():
    fair = FairShare(6, inference=1, compositors=1)
    long = fair.open()
    slots = [long.take() for _ in range(6)]
    assert None not in slots and long.take() is None  # alone: the whole limit
    short = fair.open()
    assert fair.per_render() == 3
    # every slot is held by the long render, but a render's first chunk never waits for room
    assert short.take() == (0, 0) and fair.in_flight == 7
    assert short.take() is None  # its second does
    long.give(*slots.pop())
    long.give(*slots.pop())
    assert long.take() is None  # over its new share of 3: the freed slots are not its own
    assert short.take() == (0, 0) and fair.in_flight == 6
    short.close()
    assert fair.per_render() == 6 and fair.active == 1
    assert long.take() == (0, 0)  # alone again: back to the whole limit


def test_a_waiting_render_gets_the_freed_slot_first():
    """Two renders below their share wait for room (a third is still over its share): the one
    that asked first gets the freed slot, whichever asks first after it is freed."""
    fair = FairShare(6, inference=1, compositors=1)
    a = fair.open()
    held = [a.take() for _ in range(6)]  # alone: the whole limit
    b, c = fair.open(), fair.open()  # per render now 2
    assert b.take() is not None and c.take() is not None  # first chunks never wait: 8
    assert b.take() is None  # b waits for room first ...
    assert c.take() is None  # ... then c
    for _ in range(3):
        a.give(*held.pop())  # a: 3 (over its share), 5 in flight in all: one slot free
    assert c.take() is None, "c asked first after the room appeared, but b waited longer"
    assert b.take() is not None
    assert c.take() is None  # no room left (6)


def test_an_idle_render_does_not_hold_the_others_back():
    fair = FairShare(6, inference=1, compositors=1)
    a = fair.open()
    held = [a.take() for _ in range(6)]
    b, c = fair.open(), fair.open()
    assert b.take() is not None and c.take() is not None
    assert c.take() is None  # c waits for room
    for _ in range(3):
        a.give(*held.pop())
    assert b.take() is None  # c waits with as few in flight, and longer
    c.idle()  # c has nothing to submit after all
    assert b.take() is not None


# inference actors, compositors, steps: ("take", render) -> expected (inference, compositor),
# ("give", render, slot)
LEAST_LOADED = [
    (2, 3, [("take", 0, (0, 0)), ("take", 1, (1, 1)), ("take", 0, (0, 2)),
            ("give", 0, (0, 0)), ("take", 1, (0, 0)), ("take", 1, (1, 0))]),
    (1, 2, [("take", 0, (0, 0)), ("take", 1, (0, 1)), ("give", 1, (0, 1)),
            ("take", 0, (0, 1))]),
]  # fmt: skip


@pytest.mark.parametrize(("inference", "compositors", "steps"), LEAST_LOADED)
def test_chunks_go_to_the_least_loaded_actors_of_all_renders(inference, compositors, steps):
    fair = FairShare(8, inference, compositors)
    renders = [fair.open(), fair.open()]
    load_inf, load_comp = [0] * inference, [0] * compositors  # the reference count
    for op, render, slot in steps:
        if op == "give":
            renders[render].inferred(slot[0], 1)
            renders[render].give(*slot)
            load_inf[slot[0]] -= 1
            load_comp[slot[1]] -= 1
            continue
        got = renders[render].take()
        assert got == slot
        assert load_inf[got[0]] == min(load_inf) and load_comp[got[1]] == min(load_comp)
        load_inf[got[0]] += 1
        load_comp[got[1]] += 1
        assert fair.loads() == (tuple(load_inf), tuple(load_comp))


def test_the_next_chunk_goes_where_the_fewest_frames_wait_for_a_session():
    """Counted until their predictions are done, not until composited: actor 0 holds two
    chunks being composited (its session is free), actor 1 one it still infers, so the next
    chunk goes to actor 0 (by chunks in flight it went to actor 1, whose queue grew while
    actor 0 sat idle); then frames, not chunks, decide."""
    fair = FairShare(8, inference=2, compositors=2)
    share = fair.open()
    assert [share.take(64) for _ in range(3)] == [(0, 0), (1, 1), (0, 0)]
    share.inferred(0, 64)
    share.inferred(0, 64)
    assert fair.loads() == ((2, 1), (2, 1)) and fair.queued_frames() == (0, 64)
    assert share.take(64)[0] == 0
    share.inferred(1, 64)
    assert share.take(64)[0] == 1  # actor 0: 64 frames queued, actor 1: none
    assert share.take(27)[0] == 1  # 64 frames each: the fewer chunks in flight (3 and 2)
    assert share.take(64)[0] == 0  # 64 frames against 91
    assert fair.queued_frames() == (128, 91)
    with pytest.raises(RuntimeError, match="has 91 of this render's queued"):
        share.inferred(1, 92)
    share.close()
    assert fair.queued_frames() == (0, 0) and fair.loads() == ((0, 0), (0, 0))


def test_a_share_is_given_back_when_its_render_raises():
    fair = FairShare(4, inference=2, compositors=2)
    other = fair.open()
    other.take()
    with pytest.raises(RuntimeError, match="boom"), fair.share() as share:
        share.take()
        share.take()
        assert fair.in_flight == 3 and fair.active == 2
        raise RuntimeError("boom")
    assert share.closed and fair.active == 1 and fair.in_flight == 1
    assert fair.loads() == ((1, 0), (1, 0))  # only the other render's chunk is counted
    assert fair.queued_frames() == (1, 0)
    share.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        share.take()


@pytest.mark.parametrize(("limit", "inference", "compositors"), [(0, 1, 1), (2, 0, 1), (2, 1, 0)])
def test_a_fair_share_needs_room_and_actors(limit, inference, compositors):
    with pytest.raises(ValueError, match=f"got {limit}, {inference}, {compositors}"):
        FairShare(limit, inference, compositors)


# -------------------------------------------------------------------- ChunkScheduler, fake Ray


class _Ref:
    _ids = itertools.count()

    def __init__(self, value=None, error: BaseException | None = None) -> None:
        self.id = next(self._ids)
        self.value, self.error = value, error

    def __hash__(self) -> int:
        return self.id


class _Method:
    def __init__(self, call) -> None:
        self.remote = call


class FakeRay:
    """The part of ``ray`` the scheduler uses. Every composite finishes, in submission order,
    one per ``wait``; ``fail`` maps a chunk number to the error its first run raises."""

    exceptions = ray.exceptions

    def __init__(self, fail: dict[int, BaseException] | None = None) -> None:
        self.submitted: list[int] = []  # chunk numbers, in submission order
        self.actors: list[tuple[int, int]] = []  # (inference, compositor) of each submission
        self.cancelled: list[_Ref] = []
        self.wait_timeouts: set[float] = set()
        self.max_in_flight = 0
        self.parts: dict[int, list[tuple[int, int]]] = {}  # chunk: (inference, frames) parts
        self._fail = dict(fail or {})
        self._pending: list[_Ref] = []
        self._lock = threading.Lock()

    def actors_for(self, inference: int, compositors: int) -> tuple[list, list]:
        inf = [
            SimpleNamespace(
                infer=_Method(lambda spec, i=i: self._predictions(i, spec)),
                backlog=_Method(lambda: _Ref({})),  # no call started: every part counts whole
            )
            for i in range(inference)
        ]
        comp = [
            SimpleNamespace(
                composite=_Method(
                    lambda spec, p, ctx, *more, c=c: self._composite(spec, p, c, more)
                )
            )
            for c in range(compositors)
        ]
        return inf, comp

    def _predictions(self, i: int, spec: ChunkSpec) -> _Ref:
        ref = _Ref(("preds", i, spec.chunk, spec.start, spec.stop))
        ref.task_id = lambda ref=ref: SimpleNamespace(hex=lambda: f"task-{ref.id}")
        return ref

    def _composite(self, spec: ChunkSpec, preds: _Ref, c: int, more=()) -> _Ref:
        parts = [p.value for p in (preds, *more)]
        assert [(p[3], p[4]) for p in parts] == list(
            zip([spec.start, *(p[4] for p in parts[:-1])], [p[4] for p in parts], strict=True)
        ), "the parts of a chunk, in frame order, cover it"
        assert parts[-1][4] == spec.stop and all(p[2] == spec.chunk for p in parts)
        self.parts[spec.chunk] = [(p[1], p[4] - p[3]) for p in parts]
        error = self._fail.pop(spec.chunk, None)
        result = SimpleNamespace(
            shard=SimpleNamespace(rows=spec.frames), segment=None, timings_s={"composite": 0.1},
            cpu_s={}, generated=spec.frames, seam_scores=[],
        )  # fmt: skip
        ref = _Ref(result, error)
        with self._lock:
            self.submitted.append(spec.chunk)
            self.actors.append((preds.value[1], c))
            self._pending.append(ref)
            self.max_in_flight = max(self.max_in_flight, len(self._pending))
        return ref

    def put(self, value) -> _Ref:
        return _Ref(value)

    def wait(self, refs, num_returns=1, timeout=None, fetch_local=True):
        if timeout != 0:  # a look at the predictions (timeout 0) is not the scheduler's wait
            self.wait_timeouts.add(timeout)
        with self._lock:
            ready = [r for r in self._pending if r in refs][:num_returns]
            for r in ready:
                self._pending.remove(r)
        return ready, [r for r in refs if r not in ready]

    def get(self, ref: _Ref, timeout=None):
        if isinstance(ref, list):
            return [self.get(r) for r in ref]
        if ref.error is not None:
            raise ref.error
        return ref.value

    def cancel(self, ref: _Ref) -> None:
        self.cancelled.append(ref)


class _Recorder:
    def __init__(self) -> None:
        self.chunks: list[int] = []

    def record(self, result) -> None:
        self.chunks.append(result)


def _specs(frames: int, chunk_frames: int) -> list[ChunkSpec]:
    return [
        ChunkSpec(r.chunk, r.start, r.stop, np.arange(r.frames), np.zeros((r.frames + 16, 4)))
        for r in plan_chunks(frames, chunk_frames)
    ]


POOL = PoolConfig(chunk_frames=10, max_chunks_in_flight=3, max_retries=1)


def _scheduler(fake: FakeRay, on_frames, **kw) -> ChunkScheduler:
    inference, compositors = fake.actors_for(2, 2)
    return ChunkScheduler(fake, inference, compositors, POOL, _Recorder(), on_frames, **kw)


def test_alone_the_scheduler_runs_every_chunk_as_before():
    fake, rows = FakeRay(), []
    totals = _scheduler(fake, rows.append).run(_specs(95, 10), context=None)
    assert sorted(fake.submitted) == list(range(10)) and sum(rows) == 95
    assert fake.max_in_flight == POOL.in_flight() == 3
    assert fake.wait_timeouts == {WAIT_ALONE_S}
    assert totals.generated == 95 and totals.retries == 0
    # least loaded, ties to the lowest index: the first three go to (0,0), (1,1), (0,0)
    assert fake.actors[:3] == [(0, 0), (1, 1), (0, 0)]


@pytest.mark.parametrize("fail", [{}, {9: ray.exceptions.RayError("Traceback\nValueError: flaky")}])
def test_the_tail_hook_runs_once_when_the_last_new_chunk_is_submitted(fail):
    """``on_submitted_all`` (the driver starts the AAC track there) runs once, after the last
    chunk's submission and before the run ends; a retry of the last chunk does not call it
    again."""
    fake = FakeRay(fail=fail)
    seen: list[list[int]] = []
    scheduler = _scheduler(fake, lambda n: None, on_submitted_all=lambda: seen.append(
        list(fake.submitted)))  # fmt: skip
    totals = scheduler.run(_specs(95, 10), context=None)
    assert len(seen) == 1 and sorted(seen[0]) == list(range(10))  # all ten, none twice
    assert totals.retries == len(fail) and fake.submitted.count(9) == 1 + len(fail)


def test_shared_the_scheduler_keeps_to_its_share_and_gives_it_back():
    fake = FakeRay(fail={2: ray.exceptions.RayError("Traceback\nValueError: flaky")})
    fair = FairShare(POOL.in_flight(), inference=2, compositors=2)
    other = fair.open()
    held = other.take()  # another render holds one slot for the whole run
    with fair.share() as share:
        totals = _scheduler(fake, lambda n: None, share=share).run(_specs(60, 10), context=None)
    assert sorted(set(fake.submitted)) == list(range(6)) and totals.retries == 1  # retried
    assert fake.max_in_flight == fair.limit // 2 == 1
    assert fake.wait_timeouts == {WAIT_SHARED_S}
    assert share.closed and fair.in_flight == 1 and fair.loads() == ((1, 0), (1, 0))
    assert held == (0, 0) and set(fake.actors) == {(1, 1)}  # the other render's load counts


def test_cancel_submits_nothing_more_and_raises_cancelled():
    fake, cancel, frames = FakeRay(), threading.Event(), []

    def on_frames(n: int) -> None:
        frames.append(n)
        if len(frames) == 2:
            cancel.set()

    fair = FairShare(POOL.in_flight(), inference=2, compositors=2)
    with pytest.raises(Cancelled, match="2 chunks finished"), fair.share() as share:
        _scheduler(fake, on_frames, share=share, cancel=cancel).run(_specs(200, 10), None)
    # 3 in flight, one more submitted after the first finished, none after the second
    assert fake.submitted == [0, 1, 2, 3]
    assert frames == [10, 10]
    assert len(fake.cancelled) == 2 * 2  # the two in flight: composite and infer refs
    assert fair.in_flight == 0 and fair.active == 0


def test_a_render_cancelled_while_it_waits_for_room_raises_at_once():
    """Every slot is another render's, and this render already holds one (a first chunk
    never waits for room: here one taken before the run, whose result never comes): the
    scheduler waits without submitting and notices the cancel between two looks."""
    fake, cancel = FakeRay(), threading.Event()
    fair = FairShare(1, inference=1, compositors=1)
    other = fair.open()
    other.take()
    timer = threading.Timer(0.3, cancel.set)
    timer.start()
    with pytest.raises(Cancelled, match="0 chunks finished"), fair.share() as share:
        assert share.take() is not None
        _scheduler(fake, lambda n: None, share=share, cancel=cancel).run(_specs(30, 10), None)
    timer.join()
    assert fake.submitted == [] and fake.cancelled == []


def test_a_cancel_set_before_the_run_submits_nothing():
    fake, cancel = FakeRay(), threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        _scheduler(fake, lambda n: None, cancel=cancel).run(_specs(30, 10), None)
    assert fake.submitted == []


def test_an_input_error_still_fails_the_shared_render_and_frees_its_share():
    fake = FakeRay(fail={1: InputError("generator output has NaN")})
    fair = FairShare(POOL.in_flight(), inference=2, compositors=2)
    with pytest.raises(InputError, match="chunk 1"), fair.share() as share:
        _scheduler(fake, lambda n: None, share=share).run(_specs(60, 10), None)
    assert fair.active == 0 and fair.loads() == ((0, 0), (0, 0))


# ------------------------------------------------------------------------- the render's hooks


def test_an_on_frames_hook_that_raises_is_logged_not_raised(caplog):
    calls = []

    def hook(done: int, total: int) -> None:
        calls.append((done, total))
        raise ValueError("display gone")

    with caplog.at_level(logging.WARNING, logger="lipsync_ray.concurrency"):
        RenderHooks(on_frames=hook).frames(16, 62)
    assert calls == [(16, 62)]
    assert "on_frames(16, 62) raised" in caplog.text and "display gone" in caplog.text
    RenderHooks().frames(1, 2)  # no hook: nothing to call


class _HangingRay(FakeRay):
    """No composite finishes until the inference actor is killed; then every chunk in flight
    fails with RayActorError, in submission order. The actor names ``holder``'s latest
    ``infer`` call as the one holding its session (its Ray task id)."""

    def __init__(self, holder: int | None) -> None:
        super().__init__()
        self.holder, self.killed = holder, 0
        self._infers: dict[int, _Ref] = {}
        self._hung: list[_Ref] = []

    def actors_for(self, inference: int, compositors: int) -> tuple[list, list]:
        inf, comp = super().actors_for(inference, compositors)
        for actor in inf:
            actor.infer = _Method(self._infer)
            actor.session_holder = _Method(self._session_holder)
        return inf, comp

    def _infer(self, spec: ChunkSpec) -> _Ref:
        ref = self._predictions(0, spec)
        self._infers[spec.chunk] = ref
        return ref

    def _session_holder(self) -> _Ref:
        infer = self._infers.get(self.holder)
        return _Ref(None if infer is None else infer.task_id().hex())

    def _composite(self, spec: ChunkSpec, preds: _Ref, c: int, more=()) -> _Ref:
        ref = super()._composite(spec, preds, c, more)
        with self._lock:
            self._pending.remove(ref)
            self._hung.append(ref)
        return ref

    def kill(self, actor, no_restart: bool = True) -> None:
        assert not no_restart
        self.killed += 1
        with self._lock:
            for ref in self._hung:
                ref.error = ray.exceptions.RayActorError()
            self._pending.extend(self._hung)
            self._hung.clear()


@pytest.mark.parametrize(
    ("holder", "charged"),
    [
        (1, "chunk 1 (frames 10-19)"),  # the later chunk holds the session: it is charged
        (0, "chunk 0 (frames 0-9)"),  # the oldest holds it
        (None, "chunk 0 (frames 0-9)"),  # no chunk holds it (between turns): the oldest
    ],
)
def test_a_hang_is_charged_to_the_chunk_that_holds_the_session(holder, charged, caplog):
    """Two chunks on one inference actor, neither finishes: the scheduler restarts the actor
    once and charges the hang to the chunk the actor names as its session's holder; the other
    one only waited for its turn and runs again as a lost worker (max_retries 0: the charged
    chunk stops the render)."""
    fake = _HangingRay(holder)
    inference, compositors = fake.actors_for(1, 1)
    pool = PoolConfig(chunk_frames=10, max_chunks_in_flight=2, max_retries=0, chunk_timeout_s=0.2)
    scheduler = ChunkScheduler(
        fake, inference, compositors, pool, _Recorder(), lambda n: None,
        await_actors=lambda actors, what: None,
    )  # fmt: skip
    caplog.set_level(logging.WARNING, "lipsync_ray.scheduler")
    with pytest.raises(RenderError, match=r"failed 1 times.*\(hung\)") as info:
        scheduler.run(_specs(20, 10), context=None)
    assert str(info.value).startswith(f"{charged} failed"), info.value
    assert fake.killed == 1
    restarts = [r.getMessage() for r in caplog.records if "restarting its actor" in r.getMessage()]
    assert len(restarts) == 1 and restarts[0].startswith(charged), restarts


@pytest.mark.parametrize(
    ("backlog", "frames", "expected"),
    [
        ((0, 0), 64, [32, 32]),  # both idle: halves
        ((64, 0), 64, [0, 64]),  # one a whole chunk behind: the chunk goes to the other
        ((40, 0), 64, [12, 52]),  # level 52: 52 - 40 and 52 - 0
        ((60, 0), 64, [0, 64]),  # 2 frames for actor 0 would be below the minimum part
        ((0, 0), 15, [15, 0]),  # too short to split: whole, to the lower index
        ((5, 5), 21, [11, 10]),  # the odd frame to the lower index
        ((0, 10, 20, 30), 64, [32, 21, 11, 0]),  # level 31.3 for three; the frame left to 0
        ((7, 7, 7, 7), 64, [16, 16, 16, 16]),
        ((100, 0, 100, 0), 20, [0, 10, 0, 10]),
    ],
)
def test_split_frames_evens_out_what_the_inference_actors_have_left(backlog, frames, expected):
    sizes = split_frames(list(backlog), frames, min_part=8)
    assert sizes == expected and sum(sizes) == frames
    ends = [b + n for b, n in zip(backlog, sizes, strict=True) if n]
    assert max(ends) - min(ends) <= 1  # the actors that get frames finish together


def test_the_last_chunks_are_split_between_the_inference_actors():
    """A render's last chunks, one per inference actor, are inferred in parts on both actors
    (each part a spec of its own frames, the compositor given them in frame order); the
    others stay whole; the share's queued frames come back to zero."""
    fake = FakeRay()
    fair = FairShare(POOL.in_flight(), inference=2, compositors=2)
    with fair.share() as share:
        totals = _scheduler(fake, lambda n: None, share=share).run(_specs(140, 32), context=None)
    assert totals.generated == 140 and sorted(fake.submitted) == list(range(5))
    whole = {c: p for c, p in fake.parts.items() if len(p) == 1}
    split = {c: p for c, p in fake.parts.items() if len(p) > 1}
    assert set(whole) == {0, 1, 2, 4} and set(split) == {3}, fake.parts  # 4: 12 frames, whole
    assert {i for i, _ in split[3]} == {0, 1} and sum(n for _, n in split[3]) == 32
    assert all(n >= MIN_PART_FRAMES for _, n in split[3])
    assert fair.queued_frames() == (0, 0) and fair.loads() == ((0, 0), (0, 0))


def test_no_split_when_turned_off_or_alone():
    for pool, inference in ((replace(POOL, split_tail=False), 2), (POOL, 1)):
        fake = FakeRay()
        inf, comp = fake.actors_for(inference, 2)
        ChunkScheduler(fake, inf, comp, pool, _Recorder(), lambda n: None).run(
            _specs(140, 32), context=None
        )
        assert all(len(p) == 1 for p in fake.parts.values()) and len(fake.parts) == 5
