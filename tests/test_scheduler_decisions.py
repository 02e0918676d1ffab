"""The scheduler's retry and failure rules (scheduler.decide_failure), without Ray.

The Ray-side behaviour they drive (real failing, dying and hanging actors) is in
test_faults.py and test_hang.py; here each row is one failed chunk: what failed, on which
attempt, and what the scheduler must do next.
"""

from __future__ import annotations

import pytest

from lipsync_ray.errors import InputError, RenderError
from lipsync_ray.scheduler import SYSTEM_RETRIES, Next, decide_failure

CHUNK = "chunk 3 (frames 192-256)"
MAX_RETRIES = 2
TIMEOUT_S = 12.5

# The failure kinds a chunk meets: (cause, system, timed_out).
ERROR = (RuntimeError("Traceback ...\nValueError: boom"), False, False)  # its task raised
LOST = (RuntimeError("worker died\nActorDiedError: node lost"), True, False)  # a worker died
HUNG = (RuntimeError("ActorDiedError: killed by ray.kill"), True, True)  # we restarted it
HUNG_ERROR = (RuntimeError("ValueError: late"), False, True)  # hung, then failed by itself
BAD_INPUT = (InputError("generator output has NaN", path="m.onnx"), False, False)
BAD_INPUT_LOST = (InputError("generator output has NaN", path="m.onnx"), True, True)

FAILED_3 = "failed 3 times; last error: "
HUNG_12 = "no result within 12.5 s (hung)"
DIED = f"its workers died {SYSTEM_RETRIES + 1} times; last: ActorDiedError: node lost"

# kind, attempt, system failures so far ->
#   next, next attempt, system failures, wait for actors, error type, words in the message
DECISIONS = [
    # an error uses a retry, until max_retries retries are used
    (ERROR, 0, 0, (Next.RETRY, 1, 0, False, None, "boom")),
    (ERROR, 1, 3, (Next.RETRY, 2, 3, False, None, "boom")),
    (ERROR, MAX_RETRIES, 0, (Next.FAIL, 2, 0, False, RenderError, FAILED_3 + "ValueError: boom")),
    # a lost worker: run again at the same attempt, after the actors are back; not counted
    (LOST, 0, 0, (Next.RERUN, 0, 1, True, None, "node lost")),
    (LOST, MAX_RETRIES, 0, (Next.RERUN, 2, 1, True, None, "node lost")),
    (LOST, 1, SYSTEM_RETRIES - 1, (Next.RERUN, 1, SYSTEM_RETRIES, True, None, "node lost")),
    (LOST, 1, SYSTEM_RETRIES, (Next.FAIL, 1, SYSTEM_RETRIES + 1, True, RenderError, DIED)),
    # a hang uses a retry and waits for its restarted actor; the last one names the timeout
    (HUNG, 0, 0, (Next.RETRY, 1, 0, True, None, HUNG_12)),
    (HUNG, MAX_RETRIES, 0, (Next.FAIL, 2, 0, False, RenderError, FAILED_3 + HUNG_12)),
    (HUNG_ERROR, 0, 0, (Next.RETRY, 1, 0, False, None, "(hung)")),
    # bad input fails at once, whatever the attempt or the budget, with the chunk named
    (BAD_INPUT, 0, 0, (Next.FAIL, 0, 0, False, InputError, "generator output has NaN")),
    (BAD_INPUT_LOST, 1, 2, (Next.FAIL, 1, 2, False, InputError, "generator output has NaN")),
]  # fmt: skip


@pytest.mark.parametrize(("kind", "attempt", "lost", "expected"), DECISIONS)
def test_failure_decisions(kind, attempt, lost, expected):
    cause, system, timed_out = kind
    d = decide_failure(
        cause,
        chunk=CHUNK,
        attempt=attempt,
        system_failures=lost,
        system=system,
        timed_out=timed_out,
        max_retries=MAX_RETRIES,
        chunk_timeout_s=TIMEOUT_S,
    )
    next_, next_attempt, system_failures, wait, error_type, words = expected
    assert (d.next, d.attempt, d.system_failures, d.wait_for_actors) == (
        next_,
        next_attempt,
        system_failures,
        wait,
    )
    if error_type is None:
        assert d.error is None and words in d.reason
    else:
        assert type(d.error) is error_type
        assert str(d.error).startswith(f"{CHUNK}"), str(d.error)  # the chunk is named
        assert words in str(d.error)


def test_an_input_error_keeps_its_path():
    cause = InputError("generator output has NaN", path="m.onnx")
    d = decide_failure(
        cause, chunk=CHUNK, attempt=0, system_failures=0, system=False, timed_out=False,
        max_retries=MAX_RETRIES, chunk_timeout_s=TIMEOUT_S,
    )  # fmt: skip
    assert d.error.path == cause.path and d.error.exit_code == cause.exit_code


def test_no_retries_fails_on_the_first_error():
    cause, system, timed_out = ERROR
    d = decide_failure(
        cause, chunk=CHUNK, attempt=0, system_failures=0, system=system, timed_out=timed_out,
        max_retries=0, chunk_timeout_s=TIMEOUT_S,
    )  # fmt: skip
    assert d.next is Next.FAIL and "failed 1 times" in str(d.error)
