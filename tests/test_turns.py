"""``actors.Turns``: the chunks an inference actor holds at once take turns on its session, one
at a time, the lowest key first (a short render's chunks before a long one's), equal keys in
the order they asked. Pure threads, no Ray."""

from __future__ import annotations

import threading
import time

import pytest

from lipsync_ray.actors import Turns


def _wait_until(predicate, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.005)


def _waiting(turns: Turns) -> int:
    with turns._cond:
        return len(turns._waiting)


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        # a short render's chunk (priority 25) overtakes a long render's queued chunks (1500)
        ([(1500, 3), (1500, 4), (25, 0)], [(25, 0), (1500, 3), (1500, 4)]),
        # one render: its chunks in chunk order, whatever order they asked in
        ([(100, 2), (100, 0), (100, 1)], [(100, 0), (100, 1), (100, 2)]),
        # equal keys: the order they asked in
        ([(7, 0), (7, 0), (7, 0)], [(7, 0), (7, 0), (7, 0)]),
    ],
)
def test_the_lowest_key_takes_the_next_turn(keys, expected) -> None:
    turns = Turns()
    order: list[tuple[int, int]] = []
    tags: list[int] = []
    threads = []
    with turns.turn((0, 0)):  # the session is busy: everyone below waits
        for tag, key in enumerate(keys):

            def run(key=key, tag=tag) -> None:
                with turns.turn(key):
                    order.append(key)
                    tags.append(tag)

            thread = threading.Thread(target=run)
            thread.start()
            threads.append(thread)
            _wait_until(lambda n=tag + 1: _waiting(turns) == n)  # asked in this order
    for thread in threads:
        thread.join(10)
    assert order == expected
    if len(set(keys)) == 1:
        assert tags == sorted(tags)


def test_one_holder_at_a_time() -> None:
    turns = Turns()
    holders, most = [0], [0]
    lock = threading.Lock()

    def work(key) -> None:
        for _ in range(50):
            with turns.turn(key):
                with lock:
                    holders[0] += 1
                    most[0] = max(most[0], holders[0])
                time.sleep(0.0005)
                with lock:
                    holders[0] -= 1

    threads = [threading.Thread(target=work, args=((k % 3, k),)) for k in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert most[0] == 1 and holders[0] == 0


def test_a_failing_turn_lets_the_next_one_go() -> None:
    turns = Turns()
    with pytest.raises(ValueError), turns.turn((1, 0)):
        raise ValueError("the model failed")
    done = threading.Event()

    def run() -> None:
        with turns.turn((2, 0)):
            done.set()

    thread = threading.Thread(target=run)
    thread.start()
    assert done.wait(5)
    thread.join(5)
