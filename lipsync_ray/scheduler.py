"""The actor pools, and the scheduling of one render's chunks through them.

::

    start_actors(ray, pool, ...)       InferenceActor and CompositorActor pools (Ray restarts
                                       them without limit; the chunks bound the retries)
    plan_chunks(frames, C)             ChunkRange values of C output frames (lipsync_ray.chunks)
    ChunkScheduler(...).run(specs)     InferenceActor ──predictions (ObjectRef)──▶ CompositorActor
                                         at most `in_flight` chunks submitted at once
                                         a failed chunk: retried (max_retries), or, when a worker
                                           or node died, run again once Ray restarts its actors
                                           (SYSTEM_RETRIES, not counted against max_retries)
                                         a hung chunk (no progress for chunk_timeout_s): its
                                           actor is restarted and the chunk retried
                                         cancel (a threading.Event): no more chunks; Cancelled
    FairShare / Share                  the pools' in-flight chunks shared by concurrent renders
                                       (lipsync_ray.concurrency; ChunkScheduler takes a Share)

The scheduler owns no actors: the driver (:class:`lipsync_ray.pipeline.Renderer`) starts them
with :func:`start_actors` and hands over the lists, the resolved pool settings, the work
directory that records finished chunks, and a callback that waits for restarted actors.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

import numpy as np

from lipsync_ray.actors import (
    CONCURRENCY_GROUPS,
    INFERENCE_CONCURRENCY_GROUPS,
    CompositorActor,
    InferenceActor,
)
from lipsync_ray.chunks import ChunkRange, ChunkResult, ChunkSpec, JobContext, plan_chunks
from lipsync_ray.concurrency import MIN_PART_FRAMES, FairShare, Share, split_frames
from lipsync_ray.config import Placement, PoolConfig
from lipsync_ray.contract import AUDIO_CONTEXT
from lipsync_ray.encode import EncodeOptions
from lipsync_ray.errors import Cancelled, InputError, LipsyncError, RenderError
from lipsync_ray.options import SessionOptions
from lipsync_ray.storage import Location

__all__ = [
    "ChunkDecision",
    "ChunkRecorder",
    "ChunkScheduler",
    "ChunkTotals",
    "FairShare",
    "Next",
    "Share",
    "decide_failure",
    "padded_rows",
    "plan_chunks",
    "start_actors",
]

log = logging.getLogger(__name__)

ACTOR_START_TIMEOUT_S = 600.0
# A chunk may lose its workers this many times (nodes or processes dying) before the render
# stops; each loss waits for Ray to restart the actors (they restart without limit: the
# chunks bound the work, not the actors).
SYSTEM_RETRIES = 8
# Actor tasks run as soon as their arguments are ready, not in submission order. In order, a
# task waits for every earlier one's arguments: the `describe` probe of `wait_for_actors` would
# queue behind a `composite` whose predictions come from a hung `infer`, and the driver would
# block there (up to ACTOR_START_TIMEOUT_S) instead of restarting the hung actor. Order between
# chunks never mattered: `encode_chunk` takes the `composite` result as its argument.
_UNORDERED = {"allow_out_of_order_execution": True}
# How long the scheduler waits for a chunk before looking again, alone on its pools (seconds),
# and when it shares them or can be cancelled: room freed by another render, or a cancel,
# is noticed within this (a loop costs one ray.wait call).
WAIT_ALONE_S = 1.0
WAIT_SHARED_S = 0.1
# How long a hung chunk's inference actor has to name the chunk that holds its session.
HOLDER_TIMEOUT_S = 2.0
# At a render's end (its last chunks, one per inference actor) a chunk's inference is split
# between the inference actors so that they finish together (split_frames, none getting fewer
# than MIN_PART_FRAMES); the actors have this long to say what they still hold.
BACKLOG_TIMEOUT_S = 1.0


def padded_rows(features: np.ndarray, chunk: ChunkRange) -> np.ndarray:
    """Feature rows ``[start - 8, stop + 8)`` of ``chunk``, zero where they run off either end."""
    lo, hi = chunk.start - AUDIO_CONTEXT, chunk.stop + AUDIO_CONTEXT
    rows = np.zeros((hi - lo, features.shape[1]), dtype=np.float32)
    a, b = max(lo, 0), min(hi, len(features))
    rows[a - lo : b - lo] = features[a:b]
    return rows


def start_actors(
    ray,
    pool: PoolConfig,
    model: str,
    avatar: str | Location,
    session: SessionOptions,
    encode: EncodeOptions,
) -> tuple[list, list]:
    """Create the inference and compositor pools without waiting for them.

    Returns the two lists of actor handles; each actor opens its session when it starts (wait
    on their ``describe`` calls, e.g. with :func:`gather`). ``model`` is the generator file to
    load, ``avatar`` a local path or a location each node stages on its own."""
    gpus = pool.gpus_per_actor or 0.0
    inference_cls = ray.remote(concurrency_groups=INFERENCE_CONCURRENCY_GROUPS)(InferenceActor)
    compositor_cls = ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(CompositorActor)
    inference = [
        inference_cls.options(
            num_cpus=pool.cpus_per_inference_actor,
            num_gpus=gpus,
            max_restarts=-1,  # chunks bound the retries (max_retries, SYSTEM_RETRIES)
            max_task_retries=0,
            **_UNORDERED,
        ).remote(model, avatar, session, pool.cpus_per_inference_actor, pool.batch_size)
        for _ in range(pool.inference_actors)
    ]
    placements = _compositor_placements(ray, pool)
    compositors = [
        compositor_cls.options(
            num_cpus=pool.cpus_per_compositor,
            max_restarts=-1,  # chunks bound the retries (max_retries, SYSTEM_RETRIES)
            max_task_retries=0,
            **_UNORDERED,
            **placements[k % len(placements)],
        ).remote(avatar, encode, pool.cpus_per_compositor, pool.compositor_niceness)
        for k in range(pool.compositors)
    ]
    return inference, compositors


def _compositor_placements(ray, pool: PoolConfig) -> list[dict]:
    """Scheduling options for compositors, cycled over the pool.

    ``Placement.SPLIT`` pins compositors (softly: Ray may still move a restarted one) to the
    alive nodes that have CPUs and no GPU, round-robin, so GPU nodes keep their CPUs for the
    inference actors feeding the GPUs. With no CPU-only node it says so and lets Ray decide.
    """
    if pool.placement is not Placement.SPLIT:
        return [{}]
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    cpu_nodes = [
        n["NodeID"]
        for n in ray.nodes()
        if n.get("Alive") and n["Resources"].get("CPU", 0) > 0 and not n["Resources"].get("GPU")
    ]
    if not cpu_nodes:
        log.warning("placement 'split': the cluster has no CPU-only node; Ray places compositors")
        return [{}]
    return [
        {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=node, soft=True)}
        for node in sorted(cpu_nodes)
    ]


class ChunkRecorder(Protocol):
    """Where finished chunks go (:class:`lipsync_ray.workdir.directory.WorkDir`)."""

    def record(self, result: ChunkResult) -> None: ...


@dataclass
class ChunkTotals:
    """What one render's chunks add up to (summed over the chunks that ran)."""

    timings: dict[str, float] = field(default_factory=dict)  # wall seconds per stage
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds per stage
    retries: int = 0  # chunks run again, for any reason
    generated: int = 0  # frames the generator produced (not passed through)
    seams: list[float] = field(default_factory=list)

    def seam(self) -> float | None:
        return float(np.mean(self.seams)) if self.seams else None


@dataclass
class _Part:
    """Frames of a chunk inferred by one ``infer`` call (the whole chunk but at a render's
    end, where it may be split between the inference actors)."""

    inference: int
    predictions: object  # ObjectRef[Predictions]
    frames: int
    inferred: bool = False  # its frames no longer count as queued on its inference actor


@dataclass
class _Task:
    spec: ChunkSpec
    attempt: int
    submitted: float
    inference: int  # the slot's inference actor (the share counts the chunk in flight there)
    compositor: int
    parts: list[_Part]  # in frame order
    system_failures: int = 0  # lost workers or nodes; not counted against max_retries
    timed_out: bool = False  # its actor was restarted because the chunk hung


def wait_for_actors(ray, actors: Sequence, what: str) -> None:
    """Block until ``actors`` answer again (Ray restarts them); ``what`` names the chunk.

    "Unavailable" means restarting (its node died, or its process): poll. "Died" means
    its restarts are used up: the render cannot go on."""
    errors = ray.exceptions
    deadline = time.monotonic() + ACTOR_START_TIMEOUT_S
    for actor in actors:
        while True:
            try:
                ray.get(actor.describe.remote(), timeout=max(1.0, deadline - time.monotonic()))
                break
            except (errors.ActorUnavailableError, errors.GetTimeoutError) as exc:
                if time.monotonic() > deadline:
                    raise RenderError(
                        f"{what}: an actor did not come back within "
                        f"{ACTOR_START_TIMEOUT_S:.0f} s: {short(exc)}"
                    ) from exc
                time.sleep(0.5)
            except errors.RayError as exc:
                raise RenderError(
                    f"{what}: an actor died and could not be restarted: {short(exc)}"
                ) from exc


class Next(enum.Enum):
    """What the scheduler does with a chunk that failed."""

    RETRY = "retry"  # run it again as its next attempt (uses its max_retries budget)
    RERUN = "rerun"  # its workers died: run it again, same attempt (SYSTEM_RETRIES budget)
    FAIL = "fail"  # stop the render with ``ChunkDecision.error``


@dataclass(frozen=True)
class ChunkDecision:
    """:func:`decide_failure`'s verdict on one failed chunk."""

    next: Next
    attempt: int  # the attempt the chunk runs as next (0 is the first run)
    system_failures: int  # its workers lost so far, this failure included
    wait_for_actors: bool  # block until its actors answer again (Ray restarts them) first
    reason: str  # for the log line: the last error, or that it hung
    error: LipsyncError | None = None  # Next.FAIL: what the render raises


def decide_failure(
    cause: BaseException,
    *,
    chunk: str,
    attempt: int,
    system_failures: int,
    system: bool,
    timed_out: bool,
    max_retries: int,
    chunk_timeout_s: float,
) -> ChunkDecision:
    """Retry a failed chunk or give up; pure (no Ray), so the rules have a table test.

    Args:
        cause: the chunk's own exception (:func:`root_cause` of what Ray raised).
        chunk: the chunk named in errors (``ChunkSpec.describe()``).
        attempt: the attempt that failed (0: the first run).
        system_failures: workers the chunk lost before this failure.
        system: the failure is the machinery's (:func:`is_system_failure`: a worker or node
            died, or an actor this scheduler restarted).
        timed_out: the scheduler restarted the chunk's actor because it hung.

    Rules, in order: an :class:`InputError` fails the render at once (bad input fails the same
    way every time), re-raised with the chunk named. A lost worker that was not a hang is not
    the chunk's fault: wait for the actors, run it again without using ``max_retries``, up to
    ``SYSTEM_RETRIES`` times. Anything else, a hang included, uses one retry; after
    ``max_retries`` retries the render stops with a RenderError naming the chunk, the attempts
    and the last error (the hang's timeout). A hung chunk waits for its restarted actor only
    when it is retried.
    """
    if isinstance(cause, InputError):
        error = type(cause)(f"{chunk}: {cause.message}", path=cause.path)
        return ChunkDecision(Next.FAIL, attempt, system_failures, False, cause.message, error)
    if system and not timed_out:
        lost = system_failures + 1
        if lost > SYSTEM_RETRIES:
            error = RenderError(f"{chunk}: its workers died {lost} times; last: {short(cause)}")
            return ChunkDecision(Next.FAIL, attempt, lost, True, short(cause), error)
        return ChunkDecision(Next.RERUN, attempt, lost, True, short(cause))
    reason = f"no result within {chunk_timeout_s:g} s (hung)" if timed_out else short(cause)
    if attempt >= max_retries:
        error = RenderError(f"{chunk} failed {attempt + 1} times; last error: {reason}")
        return ChunkDecision(Next.FAIL, attempt, system_failures, False, reason, error)
    # A hang we answered by restarting its actor: retry once the actor answers again.
    # (Checked after the budget: the last hang names the chunk, not a used-up restart.)
    return ChunkDecision(Next.RETRY, attempt + 1, system_failures, system, reason)


class ChunkScheduler:
    """Runs chunks through both pools with bounded in-flight work, retries and timeouts.

    Args:
        ray: the ``ray`` module (initialised).
        inference: the InferenceActor handles; a chunk goes to the one with the fewest
            frames still to infer (:class:`~lipsync_ray.concurrency.FairShare`).
        compositors: the CompositorActor handles; a chunk goes to the one with the fewest
            chunks in flight.
        pool: the resolved pool settings (in-flight limit, max_retries, chunk_timeout_s).
        recorder: records every finished chunk's shard (and segment).
        on_frames: called with the frame count of each finished chunk (progress).
        await_actors: ``(actors, what)`` blocks until ``actors`` answer again after a restart;
            default :func:`wait_for_actors`.
        share: this render's :class:`Share` of pools that concurrent renders use (the caller
            opens and closes it); None: the render is alone on them, with ``pool.in_flight()``
            chunks in flight.
        cancel: once set, no more chunks are submitted and :meth:`run` raises
            :class:`Cancelled` within about ``WAIT_SHARED_S``; the chunks in flight are
            cancelled where they have not started (a started one finishes and its files are
            adopted by the next render of the same work directory).
        on_submitted_all: called once, when the last new chunk has been submitted (retries
            may follow): the render's tail, where the driver can start work that needs no
            chunk (the AAC track).
    """

    def __init__(
        self,
        ray,
        inference: Sequence,
        compositors: Sequence,
        pool: PoolConfig,
        recorder: ChunkRecorder,
        on_frames: Callable[[int], None],
        *,
        await_actors: Callable[[Sequence, str], None] | None = None,
        share: Share | None = None,
        cancel: threading.Event | None = None,
        on_submitted_all: Callable[[], None] | None = None,
    ) -> None:
        self.ray, self.pool, self.recorder = ray, pool, recorder
        self._on_submitted_all = on_submitted_all
        self.inference, self.compositors = list(inference), list(compositors)
        self.on_frames = on_frames
        self._await = await_actors or partial(wait_for_actors, ray)
        self.totals = ChunkTotals()
        self._retry: deque[tuple[ChunkSpec, int, int]] = deque()
        self._inflight: dict[object, _Task] = {}
        # Alone: a share of pools of its own, which gives exactly the single render's rules
        # (pool.in_flight() chunks, least-loaded actors).
        self._own_share = share is None
        self.share = share or FairShare(pool.in_flight(), len(self.inference),
                                        len(self.compositors)).open()  # fmt: skip
        self.cancel = cancel
        self._wait_s = WAIT_ALONE_S if share is None and cancel is None else WAIT_SHARED_S
        # The next new chunks, taken from specs ahead of their submission: one more than there
        # are inference actors, to know when a chunk is one of the render's last.
        self._ahead: deque[ChunkSpec] = deque()
        self._specs_left = True
        self._finished_chunks = 0
        self._context_ref = None

    def run(self, specs: Iterable[ChunkSpec], context: JobContext) -> ChunkTotals:
        """Run every chunk of ``specs``; returns the stage timings, retries and quality figures.

        Raises:
            InputError: a chunk failed on bad input (fails the same way every time).
            RenderError: a chunk failed ``max_retries + 1`` times, lost its workers more than
                SYSTEM_RETRIES times, or its actors did not come back.
            Cancelled: ``cancel`` was set.
        """
        try:
            return self._run(iter(specs), context)
        finally:
            if self._own_share:
                self.share.close()

    def _run(self, pending: Iterator[ChunkSpec], context: JobContext) -> ChunkTotals:
        ray, pool, inflight = self.ray, self.pool, self._inflight
        self._check_cancel()
        self._context_ref = ray.put(context)
        last_progress = time.monotonic()
        while True:
            self._check_cancel()
            self._note_inferred()
            more = self._fill(pending)
            if not inflight:
                if not more:
                    break
                # Every slot is another render's: look again shortly.
                if self.cancel is not None:
                    self.cancel.wait(self._wait_s)
                else:
                    time.sleep(self._wait_s)
                last_progress = time.monotonic()
                continue
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=self._wait_s)
            for ref in ready:
                self._finished(ref)
            now = time.monotonic()
            if ready:
                last_progress = now
            # "No progress": no chunk finished within the timeout. The oldest chunk in flight
            # is the one holding the others up.
            oldest = min(inflight.values(), key=lambda t: t.submitted, default=None)
            if (
                oldest is not None
                and now - max(oldest.submitted, last_progress) > pool.chunk_timeout_s
            ):
                self._restart_hung(oldest, now, last_progress)
                last_progress = now  # the restart is an event: the others get a full timeout
        return self.totals

    def _fill(self, pending: Iterator[ChunkSpec]) -> bool:
        """Submit chunks (retries first) while the share has room; False once nothing is left
        to submit."""
        retry = self._retry
        while True:
            if retry:
                item = retry[0]
            else:
                while self._specs_left and len(self._ahead) <= len(self.inference):
                    spec = next(pending, None)
                    if spec is None:
                        self._specs_left = False
                    else:
                        self._ahead.append(spec)
                if not self._ahead:
                    self.share.idle()
                    if self._on_submitted_all is not None:
                        self._on_submitted_all()
                        self._on_submitted_all = None
                    return False
                item = (self._ahead[0], 0, 0)
            slot = self.share.take(item[0].frames)
            if slot is None:
                return True
            # One of the render's last chunks (one per inference actor): split between them.
            split = not retry and not self._specs_left and self.pool.split_tail
            if retry:
                retry.popleft()
            else:
                self._ahead.popleft()
            self._submit(*item, slot=slot, split=split)

    def _check_cancel(self) -> None:
        if self.cancel is None or not self.cancel.is_set():
            return
        # Chunks not started yet are dropped; a started one cannot be interrupted (threaded
        # actors), finishes, and its renamed files are adopted by the next render.
        for task_ref, task in self._inflight.items():
            for ref in (task_ref, *(p.predictions for p in task.parts)):
                with contextlib.suppress(Exception):
                    self.ray.cancel(ref)
        raise Cancelled(
            f"the render was cancelled ({self._finished_chunks} chunks finished in this run "
            "stay recorded)"
        )

    def _submit(
        self,
        spec: ChunkSpec,
        attempt: int,
        system_failures: int = 0,
        *,
        slot: tuple[int, int],
        split: bool = False,
    ) -> None:
        i, c = slot
        sizes = self._split(spec, i) if split else None
        if sizes is None:
            parts = [_Part(i, self.inference[i].infer.remote(spec), spec.frames)]
        else:
            parts, lo = [], 0
            for j, size in enumerate(sizes):
                if size:
                    if j != i:
                        self.share.move(size, i, j)
                    ref = self.inference[j].infer.remote(spec.part(lo, lo + size))
                    parts.append(_Part(j, ref, size))
                    lo += size
        # One compositor call writes the chunk's shard and encodes its segment from the
        # same frames: no second task, no re-read. A split chunk's parts come in frame order.
        first, *more = (p.predictions for p in parts)
        ref = self.compositors[c].composite.remote(spec, first, self._context_ref, *more)
        self._inflight[ref] = _Task(spec, attempt, time.monotonic(), i, c, parts, system_failures)
        log.debug(
            "%s: inference actor %s, compositor %d", spec.describe(),
            " + ".join(f"{p.inference} ({p.frames} frames)" if sizes else str(p.inference)
                       for p in parts), c,
        )  # fmt: skip

    def _split(self, spec: ChunkSpec, slot: int) -> list[int] | None:
        """Frames of ``spec`` for each inference actor (:func:`split_frames`) by what each
        still has to infer (one part only where one actor should take it all); None to leave
        the chunk whole on ``slot``'s actor (one actor, a short chunk, the split says so, or an
        actor that did not answer within BACKLOG_TIMEOUT_S)."""
        if len(self.inference) < 2 or spec.frames < 2 * MIN_PART_FRAMES:
            return None
        self._note_inferred()
        try:
            started = self.ray.get(
                [actor.backlog.remote() for actor in self.inference], timeout=BACKLOG_TIMEOUT_S
            )
        except self.ray.exceptions.RayError as exc:
            log.debug("%s stays whole: an inference actor did not answer (%s)",
                      spec.describe(), short(exc))  # fmt: skip
            return None
        # What the actors run (queued for a turn or inferring), and this render's parts that
        # they have not started yet (just submitted, or still in Ray's queue).
        backlog = [sum(frames.values()) for frames in started]
        for task in self._inflight.values():
            for p in task.parts:
                if not p.inferred and p.predictions.task_id().hex() not in started[p.inference]:
                    backlog[p.inference] += p.frames
        sizes = split_frames(backlog, spec.frames, MIN_PART_FRAMES)
        if sizes[slot] == spec.frames:
            return None
        log.debug("%s split %s by the frames left to infer %s", spec.describe(), sizes, backlog)
        return sizes

    def _note_inferred(self) -> None:
        """Count the chunks whose predictions are done as off their inference actor's queue
        (the next chunk goes where the fewest frames wait for a session)."""
        waiting = {p.predictions: p for t in self._inflight.values() for p in t.parts
                   if not p.inferred}  # fmt: skip
        if not waiting:
            return
        # fetch_local=False: the predictions stay where they are (the compositor reads them)
        done, _ = self.ray.wait(
            list(waiting), num_returns=len(waiting), timeout=0, fetch_local=False
        )
        for ref in done:
            self._settle_part(waiting[ref])

    def _settle(self, task: _Task) -> None:
        for part in task.parts:
            self._settle_part(part)

    def _settle_part(self, part: _Part) -> None:
        if not part.inferred:
            part.inferred = True
            self.share.inferred(part.inference, part.frames)

    def _finished(self, ref) -> None:
        """Record a chunk whose result is ready, or hand its failure to :meth:`_failed`."""
        ray, totals = self.ray, self.totals
        task = self._inflight.pop(ref)
        self._settle(task)
        self.share.give(task.inference, task.compositor)
        try:
            result: ChunkResult = ray.get(ref)
        except (ray.exceptions.RayError, LipsyncError) as exc:
            self._failed(task, exc)
            return
        self.recorder.record(result)
        for k, v in result.timings_s.items():
            totals.timings[k] = totals.timings.get(k, 0.0) + v
        for k, v in result.cpu_s.items():
            totals.cpu[k] = totals.cpu.get(k, 0.0) + v
        totals.generated += result.generated
        totals.seams.extend(result.seam_scores)
        self._finished_chunks += 1
        self.on_frames(result.shard.rows)

    def _failed(self, task: _Task, exc: BaseException) -> None:
        """Retry, re-run or give up on a failed chunk, as :func:`decide_failure` rules.

        Called inside the ``except`` that caught ``exc``: a RenderError raised here chains it.
        """
        cause = root_cause(self.ray, exc)
        chunk = task.spec.describe()
        decision = decide_failure(
            cause,
            chunk=chunk,
            attempt=task.attempt,
            system_failures=task.system_failures,
            system=is_system_failure(self.ray, cause),
            timed_out=task.timed_out,
            max_retries=self.pool.max_retries,
            chunk_timeout_s=self.pool.chunk_timeout_s,
        )
        if isinstance(decision.error, InputError):
            raise decision.error from None
        if decision.wait_for_actors:  # within ACTOR_START_TIMEOUT_S, else a RenderError
            self._await_actors(task)
        task.system_failures = decision.system_failures
        if decision.error is not None:
            raise decision.error
        if decision.next is Next.RERUN:
            log.warning("%s lost its worker (%s); running it again", chunk, decision.reason)
        else:
            log.warning(
                "%s failed (attempt %d), retrying: %s", chunk, task.attempt + 1, decision.reason
            )
        self.totals.retries += 1
        self._retry.append((task.spec, decision.attempt, decision.system_failures))

    def _await_actors(self, task: _Task) -> None:
        """Block until the actors of a failed chunk answer again (Ray restarts them)."""
        inference = sorted({task.inference, *(p.inference for p in task.parts)})
        actors = (*(self.inference[i] for i in inference), self.compositors[task.compositor])
        self.share.idle()  # blocks here: other renders should not wait for this one meanwhile
        self._await(actors, task.spec.describe())

    def _restart_hung(self, task: _Task, now: float, last_progress: float) -> None:
        # A hung chunk: restart the actor that holds it (Ray cannot interrupt a running
        # method of a threaded actor); its tasks fail with RayActorError and are retried.
        refs = [p.predictions for p in task.parts]
        done, _ = self.ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
        waiting = [p for p in task.parts if p.predictions not in done]
        actors = self.inference if waiting else self.compositors
        index = waiting[0].inference if waiting else task.compositor
        stalled = now - max(task.submitted, last_progress)
        if waiting:
            # The oldest chunk may be only waiting for its turn on the session behind the one
            # that hangs (a lower chunk index goes first): the hang is charged to the holder.
            holder = self._session_holder(index)
            if holder is not None and holder is not task:
                log.warning(
                    "%s made no progress for %.0f s, waiting for its turn behind %s",
                    task.spec.describe(), stalled, holder.spec.describe(),
                )  # fmt: skip
                task.submitted, task = now, holder
        log.warning("%s made no progress for %.0f s; restarting its actor", task.spec.describe(),
                    stalled)  # fmt: skip
        self.ray.kill(actors[index], no_restart=False)
        task.timed_out = True
        task.submitted = now  # its failure arrives through ray.wait

    def _session_holder(self, index: int) -> _Task | None:
        """This render's chunk whose ``infer`` holds inference actor ``index``'s session, if
        the actor says within ``HOLDER_TIMEOUT_S`` (it answers on its control thread)."""
        try:
            task_id = self.ray.get(
                self.inference[index].session_holder.remote(), timeout=HOLDER_TIMEOUT_S
            )
        except self.ray.exceptions.RayError as exc:  # no answer: the oldest chunk is charged
            log.debug("inference actor %d did not name its session's holder: %s", index, exc)
            return None
        for task in self._inflight.values():
            for p in task.parts:
                if p.inference == index and p.predictions.task_id().hex() == task_id:
                    return task
        return None


def root_cause(ray, exc: BaseException) -> BaseException:
    """The exception behind Ray's wrappers (a task error wraps the actor's own exception)."""
    seen = 0
    while isinstance(exc, ray.exceptions.RayTaskError) and exc.cause is not None and seen < 8:
        exc, seen = exc.cause, seen + 1
    return exc


def is_system_failure(ray, exc: BaseException) -> bool:
    errors = ray.exceptions
    return isinstance(
        exc,
        (
            errors.RayActorError,
            errors.ObjectLostError,
            errors.WorkerCrashedError,
            errors.NodeDiedError,
            errors.LocalRayletDiedError,
        ),
    )


def gather(ray, refs, timeout_s: float):
    """``ray.get`` of the actors' start-up probes, with errors that say what went wrong."""
    try:
        return ray.get(refs, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError as exc:
        raise RenderError(
            f"actors did not start within {timeout_s:.0f} s: the cluster may lack the requested "
            "CPUs/GPUs (see `ray status`)"
        ) from exc
    except ray.exceptions.RayError as exc:
        cause = root_cause(ray, exc)
        if isinstance(cause, LipsyncError):
            raise cause from None
        raise RenderError(f"an actor failed to start: {short(cause)}") from exc


def short(exc: BaseException) -> str:
    """The last non-empty line of an exception's text (Ray's carry a whole traceback)."""
    text = [line for line in str(exc).strip().splitlines() if line.strip()]
    return text[-1].strip() if text else type(exc).__name__
