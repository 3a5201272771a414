"""struct completion (kernel/sched/completion.c, v6.1) in the arena (vfio_emu.shm.completion):
counting, complete_all, timeouts, signals, processes.

The fixture arena runs at hz=1000 and 1000x speed: 1 jiffy = 1 us of real time.
Tests that install a SIGALRM handler switch pytest-timeout to its thread method,
so the two never fight over the one ITIMER_REAL.
"""

from __future__ import annotations

import multiprocessing
import random
import signal
import threading
import time
from contextlib import contextmanager

import pytest
from _workers import (
    BIG_TIMEOUT,
    complete_when_waited,
    wait_attached,
    wait_for_waiters,
    wait_pickled,
)

from vfio_emu import (
    ERESTARTSYS,
    MAX_SCHEDULE_TIMEOUT,
    UINT_MAX,
    InvalidArgumentError,
    UseAfterFreeError,
)
from vfio_emu.shm.completion import WAIT_SLICE_NS

signal_test = pytest.mark.timeout(60, method="thread")


class Alarm(Exception):
    """Raised by the tests' SIGALRM handler."""


def raise_alarm(signum, frame):
    raise Alarm


@contextmanager
def sigalrm(handler):
    """Install handler for SIGALRM; always cancel ITIMER_REAL and restore the old handler."""
    old = signal.signal(signal.SIGALRM, handler)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def assert_counts_exactly(c):
    """The completion holds no count, takes one complete() and gives it back exactly once."""
    assert c.waiters == 0
    assert c.done == 0
    c.complete()
    assert c.try_wait_for_completion() is True
    assert c.try_wait_for_completion() is False


# ---- counting --------------------------------------------------------------------------

def test_init_completion_starts_not_done(arena):
    c = arena.completion()
    assert c.done == 0
    assert c.completion_done() is False
    assert c.try_wait_for_completion() is False
    assert c.waiters == 0


def test_n_completes_let_exactly_n_try_waits_pass(arena):
    c = arena.completion()
    for _ in range(5):
        c.complete()
    assert c.done == 5
    assert [c.try_wait_for_completion() for _ in range(6)] == [True] * 5 + [False]
    assert c.done == 0


def test_n_completes_let_exactly_n_sleeping_waits_pass(arena):
    c = arena.completion()
    for _ in range(3):
        c.complete()
    c.wait_for_completion()
    assert c.wait_for_completion_interruptible() == 0
    assert c.wait_for_completion_timeout(1000) >= 1
    assert c.done == 0
    assert c.wait_for_completion_timeout(1000) == 0


def test_complete_all_is_permanent_until_reinit(arena):
    c = arena.completion()
    c.complete_all()
    assert c.done == UINT_MAX
    for _ in range(5):
        assert c.try_wait_for_completion() is True
        c.wait_for_completion()
        assert c.wait_for_completion_interruptible() == 0
        assert 1 <= c.wait_for_completion_timeout(1000) <= 1000
        assert 1 <= c.wait_for_completion_interruptible_timeout(1000) <= 1000
        assert c.completion_done() is True
    assert c.done == UINT_MAX
    c.reinit()
    assert c.done == 0
    assert c.completion_done() is False
    assert c.try_wait_for_completion() is False
    assert c.wait_for_completion_timeout(100) == 0


def test_complete_after_complete_all_saturates_at_uint_max_and_never_wraps(arena):
    c = arena.completion()
    c.complete()
    c.complete_all()
    for _ in range(3):
        c.complete()
        assert c.done == UINT_MAX
    assert c.try_wait_for_completion() is True
    assert c.done == UINT_MAX


def test_complete_all_overrides_pending_counts_and_reinit_drops_them(arena):
    c = arena.completion()
    c.complete()
    c.complete()
    c.complete_all()
    c.reinit()
    assert c.try_wait_for_completion() is False
    c.init()  # init_completion is the same store
    assert c.done == 0


def test_completion_done_is_true_while_a_count_is_pending(arena):
    c = arena.completion()
    c.complete()
    c.complete()
    assert c.completion_done() is True
    assert c.try_wait_for_completion() is True
    assert c.completion_done() is True
    assert c.try_wait_for_completion() is True
    assert c.completion_done() is False
    # completion_done() itself never consumes
    c.complete()
    for _ in range(3):
        assert c.completion_done() is True
    assert c.done == 1


# ---- timeouts ------------------------------------------------------------------------------

def test_wait_timeout_returns_zero_when_never_completed(arena):
    c = arena.completion()
    assert c.wait_for_completion_timeout(2000) == 0
    assert c.wait_for_completion_interruptible_timeout(2000) == 0
    assert_counts_exactly(c)


def test_wait_timeout_returns_remaining_jiffies_between_one_and_timeout_when_completed(arena):
    c = arena.completion()
    c.complete()
    left = c.wait_for_completion_timeout(BIG_TIMEOUT)
    assert 1 <= left <= BIG_TIMEOUT
    assert c.done == 0


def test_wait_timeout_is_woken_by_complete_from_another_thread(arena):
    c = arena.completion()
    seen = []

    def completer():
        seen.append(wait_for_waiters(c))
        c.complete()

    t = threading.Thread(target=completer)
    t.start()
    left = c.wait_for_completion_timeout(BIG_TIMEOUT)
    t.join()
    assert seen == [1]
    assert 1 <= left <= BIG_TIMEOUT
    assert_counts_exactly(c)


def test_wait_timeout_zero_behaves_like_try_wait(arena):
    c = arena.completion()
    assert c.wait_for_completion_timeout(0) == 0
    assert c.wait_for_completion_interruptible_timeout(0) == 0
    c.complete()
    assert c.wait_for_completion_timeout(0) == 1
    assert c.done == 0
    c.complete()
    assert c.wait_for_completion_interruptible_timeout(0) == 1
    assert c.done == 0
    c.complete_all()
    assert c.wait_for_completion_timeout(0) == 1
    assert c.done == UINT_MAX


def test_max_schedule_timeout_means_no_deadline_and_returns_itself(arena):
    """schedule_timeout(MAX_SCHEDULE_TIMEOUT) sleeps without end and returns MAX back."""
    c = arena.completion()
    t = threading.Timer(0.05, c.complete)  # long after a 0-jiffy deadline would have passed
    t.start()
    try:
        assert c.wait_for_completion_timeout(MAX_SCHEDULE_TIMEOUT) == MAX_SCHEDULE_TIMEOUT
    finally:
        t.join()
    assert c.done == 0


def test_huge_finite_timeout_waits_and_returns_nearly_all_of_it(arena):
    c = arena.completion()
    t = threading.Timer(0.05, c.complete)
    t.start()
    try:
        left = c.wait_for_completion_timeout(MAX_SCHEDULE_TIMEOUT - 1)
    finally:
        t.join()
    assert MAX_SCHEDULE_TIMEOUT - 1 - 10**9 < left <= MAX_SCHEDULE_TIMEOUT - 1
    assert c.done == 0


def test_timeout_above_max_schedule_timeout_is_invalid(arena):
    with pytest.raises(InvalidArgumentError):
        arena.completion().wait_for_completion_timeout(MAX_SCHEDULE_TIMEOUT + 1)


@pytest.mark.parametrize("bad", [-1, -(1 << 70), 1.5, 10.0, "10", None, True])
def test_bad_timeout_raises_invalid_argument_and_consumes_nothing(arena, bad):
    c = arena.completion()
    c.complete()
    for wait in (c.wait_for_completion_timeout, c.wait_for_completion_interruptible_timeout):
        with pytest.raises(InvalidArgumentError):
            wait(bad)
        with pytest.raises(ValueError):
            wait(bad)
    assert c.done == 1
    assert c.waiters == 0


@signal_test
def test_count_landing_before_deadline_is_consumed_even_if_wait_returns_late(arena):
    """A complete() that lands before the deadline is taken even once the deadline passed.

    SIGALRM interrupts the (uninterruptible) sleep well before the deadline; the
    handler completes, then stays in Python until the deadline is over; the wait
    must still take that count and report success (>= 1), not a timeout.
    """
    c = arena.completion()
    timeout = 300_000  # jiffies = 0.3 s real
    timeout_s = arena.clock.jiffies_to_ns(timeout) / 1e9
    fired = []

    def handler(signum, frame):
        if fired:
            return
        fired.append(time.monotonic())
        c.complete()
        # The wait computed its deadline before it slept, i.e. before now.
        time.sleep(timeout_s + 0.02)

    with sigalrm(handler):
        signal.setitimer(signal.ITIMER_REAL, 0.01)
        left = c.wait_for_completion_timeout(timeout)
    assert fired, "SIGALRM never arrived"
    assert left == 1  # deadline already passed: "remaining" is clamped to 1
    assert c.done == 0
    assert_counts_exactly(c)


# ---- signals ------------------------------------------------------------------------------

@signal_test
def test_uninterruptible_wait_lets_raising_signal_handler_propagate_and_stays_usable(arena):
    c = arena.completion()
    with sigalrm(raise_alarm):
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with pytest.raises(Alarm):
            c.wait_for_completion()
    assert_counts_exactly(c)


@signal_test
def test_uninterruptible_timed_wait_ignores_non_raising_signals(arena):
    c = arena.completion()
    hits = []
    with sigalrm(lambda *_: hits.append(1)):
        signal.setitimer(signal.ITIMER_REAL, 0.01, 0.01)
        left = c.wait_for_completion_timeout(200_000)  # 0.2 s
    assert hits, "SIGALRM never arrived"
    assert left == 0  # timed out: the signals did not end the wait
    assert_counts_exactly(c)


@signal_test
def test_interruptible_wait_returns_erestartsys_when_handler_does_not_raise(arena):
    c = arena.completion()
    hits = []
    with sigalrm(lambda *_: hits.append(1)):
        # Repeating timer: one signal is enough, the rest make the test independent of
        # where exactly in the wait the first one lands.
        signal.setitimer(signal.ITIMER_REAL, 0.05, 0.05)
        assert c.wait_for_completion_interruptible() == -ERESTARTSYS
    assert ERESTARTSYS == 512
    assert hits
    assert_counts_exactly(c)


@signal_test
def test_interruptible_timeout_returns_erestartsys_on_signal(arena):
    c = arena.completion()
    with sigalrm(lambda *_: None):
        signal.setitimer(signal.ITIMER_REAL, 0.05, 0.05)
        assert c.wait_for_completion_interruptible_timeout(BIG_TIMEOUT) == -ERESTARTSYS
    assert_counts_exactly(c)


@signal_test
def test_interruptible_wait_with_raising_handler_propagates(arena):
    c = arena.completion()
    with sigalrm(raise_alarm):
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with pytest.raises(Alarm):
            c.wait_for_completion_interruptible()
    assert_counts_exactly(c)


@signal_test
def test_interruptible_wait_does_not_spin_past_a_signal(arena):
    """Interruptible waits never spin: a signal sent to the waiting thread finds it asleep.

    The signal is thread-directed (pthread_kill), as the guarantee is about the
    waiting thread; a process-directed one may go to pytest-timeout's thread.
    """
    c = arena.completion()
    arena.spin_ns = WAIT_SLICE_NS  # an uninterruptible wait would spin its whole first slice
    hits = []
    main = threading.main_thread().ident
    # 10 ms: inside the first 20 ms slice, not at a slice boundary.
    timer = threading.Timer(0.01, signal.pthread_kill, (main, signal.SIGALRM))
    with sigalrm(lambda *_: hits.append(1)):
        timer.start()
        try:
            r = c.wait_for_completion_interruptible_timeout(400_000)  # 0.4 s
        finally:
            timer.cancel()
            timer.join()
    arena.spin_ns = 0
    assert hits
    assert r == -ERESTARTSYS


@signal_test
def test_interrupted_waits_never_lose_or_double_consume_a_count(arena):
    """complete() K times from a thread while SIGALRM (raising) keeps interrupting
    wait_for_completion() at random moments: successful waits + what is left == K."""
    c = arena.completion()
    rng = random.Random(0xC0FFEE)
    K = 400
    delays = [rng.uniform(0, 0.002) for _ in range(K)]

    def completer():
        for d in delays:
            if d > 0.001:
                time.sleep(d)
            c.complete()

    got = interrupted = 0
    t = threading.Thread(target=completer)
    end = time.monotonic() + 20  # hard bound; normally ~1 s
    with sigalrm(raise_alarm):
        t.start()
        while True:
            try:
                if not t.is_alive() or time.monotonic() > end:
                    break
                signal.setitimer(signal.ITIMER_REAL, rng.uniform(0.0001, 0.003))
                c.wait_for_completion()
                got += 1  # no signal check between the return and this line
                signal.setitimer(signal.ITIMER_REAL, 0)
            except Alarm:
                interrupted += 1
        signal.setitimer(signal.ITIMER_REAL, 0)
    t.join()
    assert not t.is_alive()
    assert got + c.done == K
    assert c.waiters == 0
    assert got > 0 and interrupted > 0  # both paths were exercised


def test_freeing_a_completion_wakes_its_waiter_with_use_after_free(arena):
    c = arena.completion(label="freed-under-waiter")
    errors = []

    def waiter():
        try:
            c.wait_for_completion_timeout(BIG_TIMEOUT)
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=waiter)
    t.start()
    assert wait_for_waiters(c) == 1
    c.free()
    t.join(30)
    assert not t.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], UseAfterFreeError)
    assert "freed-under-waiter" in str(errors[0])
    assert arena.in_use == 0
    other = arena.completion()
    assert_counts_exactly(other)


def test_reused_completion_slot_starts_with_no_phantom_waiters(make_arena):
    """Allocation never resets 'waiters': a sleeper woken by free() that leaves only after
    the slot was reused must not drive the new completion's count below zero."""
    arena = make_arena(capacity=1)
    errors = []

    def waiter(c):
        try:
            c.wait_for_completion_timeout(BIG_TIMEOUT)
        except UseAfterFreeError as e:
            errors.append(e)

    for round_ in range(30):
        c = arena.completion()
        t = threading.Thread(target=waiter, args=(c,))
        t.start()
        assert wait_for_waiters(c) == 1
        c.free()
        reused = arena.completion()  # the only slot: the one the sleeper is leaving
        t.join(30)
        assert len(errors) == round_ + 1
        assert reused.index == c.index
        assert reused.waiters == 0
        reused.free()


def test_complete_wakes_one_of_two_waiting_threads_and_the_other_sleeps_on(arena):
    c = arena.completion()
    results = []

    def waiter():
        results.append(c.wait_for_completion_timeout(BIG_TIMEOUT))

    threads = [threading.Thread(target=waiter) for _ in range(2)]
    for t in threads:
        t.start()
    assert wait_for_waiters(c, 2) == 2
    c.complete()
    deadline = time.monotonic() + 30
    while not results and time.monotonic() < deadline:
        time.sleep(0.0005)
    assert len(results) == 1
    assert c.done == 0  # the one count went to exactly one waiter...
    assert wait_for_waiters(c, 1) == 1  # ...and the other is still asleep
    c.complete()
    for t in threads:
        t.join(30)
    assert len(results) == 2 and all(r >= 1 for r in results)
    assert_counts_exactly(c)


def test_complete_all_wakes_every_waiting_thread(arena):
    c = arena.completion()
    results = []

    def waiter():
        results.append(c.wait_for_completion_timeout(BIG_TIMEOUT))

    threads = [threading.Thread(target=waiter) for _ in range(3)]
    for t in threads:
        t.start()
    assert wait_for_waiters(c, 3) == 3
    c.complete_all()
    for t in threads:
        t.join(30)
    assert len(results) == 3 and all(r >= 1 for r in results)
    assert c.done == UINT_MAX
    assert c.waiters == 0


# ---- across processes ------------------------------------------------------------------

@pytest.mark.parametrize("method", ["fork", "spawn"])
@pytest.mark.parametrize("how", ["pickled", "token"])
def test_child_waiting_is_woken_by_parent_complete(arena, method, how):
    ctx = multiprocessing.get_context(method)
    c = arena.completion(label=f"wake-child-{method}")
    q = ctx.Queue()
    if how == "pickled":
        p = ctx.Process(target=wait_pickled, args=(c, BIG_TIMEOUT, q))
    else:
        p = ctx.Process(target=wait_attached, args=(arena.name, c.token, BIG_TIMEOUT, q))
    p.start()
    try:
        assert wait_for_waiters(c) == 1
        c.complete()
        left = q.get(timeout=60)
    finally:
        p.join(60)
    assert p.exitcode == 0
    assert 1 <= left <= BIG_TIMEOUT
    assert_counts_exactly(c)


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_parent_waiting_is_woken_by_child_complete(arena, method):
    ctx = multiprocessing.get_context(method)
    c = arena.completion(label=f"wake-parent-{method}")
    q = ctx.Queue()
    p = ctx.Process(target=complete_when_waited, args=(c, q))
    p.start()
    try:
        left = c.wait_for_completion_timeout(BIG_TIMEOUT)
        seen = q.get(timeout=60)
    finally:
        p.join(60)
    assert p.exitcode == 0
    assert seen == 1
    assert 1 <= left <= BIG_TIMEOUT
    assert_counts_exactly(c)


def test_counts_made_in_a_child_are_visible_to_the_parent(arena):
    ctx = multiprocessing.get_context("fork")
    c = arena.completion()

    def child():
        for _ in range(3):
            c.complete()

    p = ctx.Process(target=child)
    p.start()
    p.join(60)
    assert p.exitcode == 0
    assert c.done == 3
    assert [c.try_wait_for_completion() for _ in range(4)] == [True, True, True, False]
