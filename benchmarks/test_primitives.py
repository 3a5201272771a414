"""Per-call cost of refcount_t, kref and completion, against a cffi no-op in the same run.

pytest-benchmark adds ~35-45 ns of harness to every call of the benchmarked
function - as much as the calls measured here - so each benchmarked run is an
inner loop of LOOP calls and conftest.py reports time / LOOP.  Loops that only
get (or only put) end with one atomic that undoes them, so the object is as it
was after every run (one extra call per LOOP: +0.1%).  Each test then checks
the object's state, so with --benchmark-disable this is a quick correctness run.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable, Iterator
from itertools import repeat
from typing import TYPE_CHECKING, Any

import pytest

import vfio_emu
from vfio_emu import Arena, Completion, Kref, KrefArray, Refcount
from vfio_emu.shm import _binding as C

if TYPE_CHECKING:
    from conftest import Measure

#: Calls per benchmarked run: harness overhead / LOOP is well under 0.1 ns per call.
LOOP = 1000
BATCH_SIZES = (1, 10, 100, 1000)
#: Pairs in one C call for "the same loop in pure C": the crossing amortised to nothing.
C_LOOP = 100_000
ARRAY_LEN = 100
ARRAY_REPS = 100
#: Ping-pong: round trips per run and runs; fixed, so the test stays bounded.
ROUND_TRIPS = 100
PING_ROUNDS = 30


class LockedCounter:
    """The obvious thread-safe pure-Python refcount: what a kref pair must beat by 3x."""

    __slots__ = ("_lock", "n")

    def __init__(self, n: int = 1) -> None:
        self._lock = threading.Lock()
        self.n = n

    def get(self) -> None:
        with self._lock:
            self.n += 1

    def put(self) -> bool:
        with self._lock:
            self.n -= 1
            return self.n == 0


class PlainCounter:
    """The same without the lock (not thread-safe): the floor of any Python method pair."""

    __slots__ = ("n",)

    def __init__(self, n: int = 1) -> None:
        self.n = n

    def get(self) -> None:
        self.n += 1

    def put(self) -> bool:
        self.n -= 1
        return self.n == 0


def call_loop(f: Callable[[Any], object], arg: Any) -> Callable[[], None]:
    """LOOP calls of f(arg), f and arg bound in the closure (no attribute lookups)."""

    def run() -> None:
        for _ in repeat(None, LOOP):
            f(arg)

    return run


@pytest.fixture(scope="module")
def arena() -> Iterator[Arena]:
    with Arena.create(capacity=256) as a:
        yield a


@pytest.fixture(autouse=True)
def _no_warn(arena: Arena) -> Iterator[None]:
    """No benchmark may saturate a count: that would WARN, and time the slow path."""
    seq = arena.warn_seq
    yield
    assert arena.dmesg(seq) == []


@pytest.fixture
def kref(arena: Arena) -> Iterator[Kref]:
    k = arena.kref("bench")
    yield k
    k.free()


@pytest.fixture
def refcount(arena: Arena) -> Iterator[Refcount]:
    r = arena.refcount(1, "bench")
    yield r
    r.free()


@pytest.fixture
def completion(arena: Arena) -> Iterator[Completion]:
    c = arena.completion("bench")
    yield c
    c.free()


# -- the crossing itself -----------------------------------------------------


@pytest.mark.benchmark(group="crossing", warmup=True)
def test_noop(measure: Measure, kref: Kref) -> None:
    """The baseline every ratio divides by: a cffi call that releases the GIL, does nothing."""
    measure(call_loop(C.noop, kref._h), key="noop", label="C.noop(h)  [baseline]", per=LOOP)
    assert C.noop(kref._h) == 0


@pytest.mark.benchmark(group="crossing")
def test_noop_gil(measure: Measure, kref: Kref) -> None:
    """The same no-op in _fast, which keeps the GIL: what the release costs."""
    measure(call_loop(C.noop_gil, kref._h), key="noop_gil",
            label="C.noop_gil(h)  (_fast, GIL kept)", per=LOOP)
    assert C.noop_gil(kref._h) == 0


@pytest.mark.benchmark(group="crossing")
def test_ctypes_noop(measure: Measure, kref: Kref) -> None:
    """The same C no-op through ctypes: why the binding is cffi API mode."""
    f = ctypes.CDLL(vfio_emu.shm._core.__file__).vfio_noop
    f.argtypes = [ctypes.c_void_p]
    f.restype = ctypes.c_int64
    p = int(C.ffi.cast("uintptr_t", kref._h))
    measure(call_loop(f, p), key="ctypes_noop", label="ctypes vfio_noop(p)", per=LOOP)
    assert f(p) == 0


# -- single operations -------------------------------------------------------


@pytest.mark.benchmark(group="single")
def test_refcount_inc(measure: Measure, kref: Kref) -> None:
    """Target: the bare get entry point within 1.1x the no-op."""
    h, inc, sub = kref._h, C.refcount_inc, C.refcount_sub_and_test

    def run() -> None:
        for _ in repeat(None, LOOP):
            inc(h)
        sub(h, LOOP)

    measure(run, key="refcount_inc", label="C.refcount_inc(h)  bare get", per=LOOP)
    assert kref.read() == 1


@pytest.mark.benchmark(group="single")
def test_refcount_dec_and_test(measure: Measure, kref: Kref) -> None:
    """Target: the bare put entry point within 1.1x the no-op (never reaching zero here)."""
    h, dec, add = kref._h, C.refcount_dec_and_test, C.refcount_add
    kref.get_many(LOOP)

    def run() -> None:
        for _ in repeat(None, LOOP):
            dec(h)
        add(h, LOOP)

    measure(run, key="refcount_dec_and_test", label="C.refcount_dec_and_test(h)  bare put",
            per=LOOP)
    assert kref.read() == LOOP + 1
    assert kref.put_many(LOOP) == 0 and kref.read() == 1


@pytest.mark.benchmark(group="single")
def test_kref_get(measure: Measure, kref: Kref) -> None:
    """Target: Kref.get(), as callers write it, within 1.5x the no-op."""
    k, h, sub = kref, kref._h, C.refcount_sub_and_test

    def run() -> None:
        for _ in repeat(None, LOOP):
            k.get()
        sub(h, LOOP)

    measure(run, key="kref_get", label="Kref.get()", per=LOOP)
    assert kref.read() == 1


@pytest.mark.benchmark(group="single")
def test_kref_put(measure: Measure, kref: Kref) -> None:
    """Target: Kref.put() within 1.5x the no-op (the common case: not the last reference)."""
    k, h, add = kref, kref._h, C.refcount_add
    kref.get_many(LOOP)

    def run() -> None:
        for _ in repeat(None, LOOP):
            k.put()
        add(h, LOOP)

    measure(run, key="kref_put", label="Kref.put()", per=LOOP)
    assert kref.read() == LOOP + 1
    kref.put_many(LOOP)
    released: list[Kref] = []
    assert kref.put(released.append) == 1 and released == [kref]
    kref.init()


@pytest.mark.benchmark(group="single")
def test_refcount_inc_not_zero(measure: Measure, refcount: Refcount) -> None:
    """The CAS-loop get: what a get that must not resurrect a dying object costs."""
    r, h, sub = refcount, refcount._h, C.refcount_sub_and_test

    def run() -> None:
        for _ in repeat(None, LOOP):
            r.inc_not_zero()
        sub(h, LOOP)

    measure(run, key="inc_not_zero", label="Refcount.inc_not_zero()", per=LOOP)
    assert refcount.read() == 1 and refcount.inc_not_zero() and refcount.read() == 2
    refcount.set(0)
    assert not refcount.inc_not_zero() and refcount.read() == 0


@pytest.mark.benchmark(group="single")
def test_lock_counter_get(measure: Measure) -> None:
    """One half of the Lock counter pair, for scale."""
    lc = LockedCounter()

    def run() -> None:
        for _ in repeat(None, LOOP):
            lc.get()
        lc.n -= LOOP

    measure(run, key="lock_get", label="LockedCounter.get()", per=LOOP)
    assert lc.n == 1


@pytest.mark.benchmark(group="single")
def test_lock_counter_put(measure: Measure) -> None:
    """The other half: put() also returns whether it hit zero, like Kref.put()."""
    lc = LockedCounter(LOOP + 1)

    def run() -> None:
        for _ in repeat(None, LOOP):
            lc.put()
        lc.n += LOOP

    measure(run, key="lock_put", label="LockedCounter.put()", per=LOOP)
    assert lc.n == LOOP + 1
    assert LockedCounter(1).put()


# -- get+put pairs -----------------------------------------------------------


@pytest.mark.benchmark(group="pair")
def test_bare_pair(measure: Measure, kref: Kref) -> None:
    """The bare entry points as a pair: the floor for the method pair below."""
    h, inc, dec = kref._h, C.refcount_inc, C.refcount_dec_and_test

    def run() -> None:
        for _ in repeat(None, LOOP):
            inc(h)
            dec(h)

    measure(run, key="bare_pair", label="C.refcount_inc + C.refcount_dec_and_test", per=LOOP,
            unit="pair")
    assert kref.read() == 1


@pytest.mark.benchmark(group="pair")
def test_kref_pair(measure: Measure, kref: Kref) -> None:
    """Target: a method pair at most 1/3 of the Lock counter pair."""
    k = kref

    def run() -> None:
        for _ in repeat(None, LOOP):
            k.get()
            k.put()

    measure(run, key="kref_pair", label="Kref.get() + Kref.put()", per=LOOP, unit="pair")
    assert kref.read() == 1


@pytest.mark.benchmark(group="pair")
def test_plain_counter_pair(measure: Measure) -> None:
    """A lock-free Python counter pair: the cost of two Python method calls alone."""
    pc = PlainCounter()

    def run() -> None:
        for _ in repeat(None, LOOP):
            pc.get()
            pc.put()

    measure(run, key="plain_pair", label="PlainCounter get+put (no lock)", per=LOOP, unit="pair")
    assert pc.n == 1


@pytest.mark.benchmark(group="pair")
def test_lock_counter_pair(measure: Measure) -> None:
    """The denominator of the pair target."""
    lc = LockedCounter()

    def run() -> None:
        for _ in repeat(None, LOOP):
            lc.get()
            lc.put()

    measure(run, key="lock_pair", label="LockedCounter get+put", per=LOOP, unit="pair")
    assert lc.n == 1


@pytest.mark.benchmark(group="pair")
def test_completion_pair(measure: Measure, completion: Completion) -> None:
    """complete() then try_wait_for_completion(): a count handed over with nobody asleep."""
    c = completion

    def run() -> None:
        for _ in repeat(None, LOOP):
            c.complete()
            c.try_wait_for_completion()

    measure(run, key="completion_pair", label="complete() + try_wait_for_completion()",
            per=LOOP, unit="pair")
    assert completion.done == 0 and not completion.try_wait_for_completion()
    completion.complete()
    assert completion.try_wait_for_completion() and completion.done == 0


# -- batches -----------------------------------------------------------------


@pytest.mark.benchmark(group="batch")
def test_kref_pairs_c(measure: Measure, kref: Kref) -> None:
    """The same loop in pure C: C_LOOP pairs per crossing, the denominator of the batch target."""
    h, pairs = kref._h, C.kref_pairs
    measure(lambda: pairs(h, C_LOOP), key="kref_pairs_c",
            label=f"C.kref_pairs(h, {C_LOOP:_})  pure C", per=C_LOOP, unit="pair")
    assert kref.read() == 1


@pytest.mark.benchmark(group="batch")
@pytest.mark.parametrize("n", BATCH_SIZES)
def test_kref_pairs(measure: Measure, kref: Kref, n: int) -> None:
    """Target: from N = 100 on, a batch costs at most 1.3x the pure-C loop per pair."""
    h, pairs = kref._h, C.kref_pairs

    def run() -> None:
        for _ in repeat(None, LOOP):
            pairs(h, n)

    measure(run, key=f"kref_pairs_{n}", label=f"C.kref_pairs(h, {n})", per=LOOP * n, unit="pair")
    assert pairs(h, n) == 0 and kref.read() == 1


@pytest.mark.benchmark(group="batch")
def test_kref_array(measure: Measure, arena: Arena) -> None:
    """KrefArray get+put over 100 objects: two crossings for 100 pairs."""
    krefs = [arena.kref("bench-array") for _ in range(ARRAY_LEN)]
    try:
        arr = KrefArray(krefs)

        def run() -> None:
            for _ in repeat(None, ARRAY_REPS):
                arr.get()
                arr.put()

        measure(run, key="kref_array", label=f"KrefArray({ARRAY_LEN}) get+put",
                per=ARRAY_REPS * ARRAY_LEN, unit="object")
        assert all(k.read() == 1 for k in krefs)
        arr.get()
        assert all(k.read() == 2 for k in krefs)
        assert arr.put() == 0 and all(k.read() == 1 for k in krefs)
    finally:
        for k in krefs:
            k.free()


# -- cross-thread wake-up ----------------------------------------------------


class Echo(threading.Thread):
    """Answers every ping with a pong until stopped (stop, then one last ping)."""

    def __init__(self, ping: Completion, pong: Completion) -> None:
        super().__init__(name="bench-echo", daemon=True)
        self.ping, self.pong = ping, pong
        self.stopping = False
        self.answered = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while True:
                self.ping.wait_for_completion()
                if self.stopping:
                    return
                self.pong.complete()
                self.answered += 1
        except BaseException as e:  # reported by the test
            self.error = e

    def stop(self) -> None:
        self.stopping = True
        self.ping.complete()
        self.join(timeout=10)


@pytest.mark.benchmark(group="wakeup")
@pytest.mark.timeout(60)
def test_ping_pong(measure: Measure, arena: Arena) -> None:
    """wait -> complete -> wake -> complete -> wake between two threads, per round trip.

    Between threads of one process the GIL handoff, not the completion, sets
    this figure: the woken thread must wait for the GIL until the other enters
    its own wait, usually asleep, so each leg pays a thread wake-up.
    """
    ping, pong = arena.completion("ping"), arena.completion("pong")
    echo = Echo(ping, pong)
    sent = 0

    def run() -> None:
        nonlocal sent
        for _ in repeat(None, ROUND_TRIPS):
            ping.complete()
            pong.wait_for_completion()
        sent += ROUND_TRIPS

    echo.start()
    try:
        measure.pedantic(run, key="ping_pong",
                         label=f"thread ping-pong (spin_ns={arena.spin_ns})",
                         per=ROUND_TRIPS, unit="round trip", rounds=PING_ROUNDS, warmup_rounds=2)
    finally:
        echo.stop()
    assert not echo.is_alive() and echo.error is None
    assert echo.answered == sent > 0
    assert ping.done == 0 and pong.done == 0
    ping.free()
    pong.free()


def _echo_process(ping: Completion, pong: Completion, stop: Refcount) -> None:
    """Child side of the cross-process ping-pong: answer until stop reads non-zero."""
    while True:
        ping.wait_for_completion()
        if stop.read():
            return
        pong.complete()


@pytest.mark.benchmark(group="wakeup")
@pytest.mark.timeout(60)
@pytest.mark.parametrize("spin", [True, False], ids=["spin", "sleep"])
def test_ping_pong_processes(measure: Measure, arena: Arena, spin: bool) -> None:
    """The same round trip between two processes of one arena: the completion's own cost.

    With spinning (2+ CPUs) the woken side usually never sleeps; without it,
    each leg is a futex sleep and wake-up, dominated by waking an idle vCPU.
    """
    import multiprocessing

    ping, pong = arena.completion("xping"), arena.completion("xpong")
    stop = arena.refcount(0, "xstop")
    saved = arena.spin_ns
    arena.spin_ns = saved if spin else 0
    child = multiprocessing.get_context("fork").Process(
        target=_echo_process, args=(ping, pong, stop), daemon=True)
    sent = 0

    def run() -> None:
        nonlocal sent
        for _ in repeat(None, ROUND_TRIPS):
            ping.complete()
            pong.wait_for_completion()
        sent += ROUND_TRIPS

    child.start()
    try:
        measure.pedantic(run, key=f"ping_pong_proc_{'spin' if spin else 'sleep'}",
                         label=f"process ping-pong (parent spin_ns={arena.spin_ns})",
                         per=ROUND_TRIPS, unit="round trip", rounds=PING_ROUNDS, warmup_rounds=2)
    finally:
        stop.set(1)
        ping.complete()
        child.join(timeout=10)
        arena.spin_ns = saved
    assert child.exitcode == 0
    assert sent > 0 and ping.done == 0 and pong.done == 0
    for obj in (ping, pong, stop):
        obj.free()


# -- drift check -------------------------------------------------------------


@pytest.mark.benchmark(group="crossing")
def test_noop_again(measure: Measure, kref: Kref) -> None:
    """The baseline once more, last: its ratio to the first shows the drift over the run."""
    measure(call_loop(C.noop, kref._h), key="noop_last",
            label="C.noop(h) again, last (drift check)", per=LOOP)
    assert C.noop(kref._h) == 0
