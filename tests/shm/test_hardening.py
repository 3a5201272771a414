"""The arena against a hostile or crashing co-tenant: crafted headers, shrunk segments,
foreign owners, forged tokens and pickles, close() racing this process's threads, kills in
the middle of an allocation or a WARN, and signal storms during interruptible waits.

Whatever happens, vfio-emu raises an EmulatorError that says what was wrong (or drops a
WARN and counts it), and the shared arena stays consistent for every other process.
"""

from __future__ import annotations

import mmap
import os
import pickle
import signal
import struct
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from vfio_emu import (
    ERESTARTSYS,
    Arena,
    ArenaClosedError,
    ArenaFormatError,
    ArenaFullError,
    ArenaNotFoundError,
    ArenaPermissionError,
    EmulatorError,
    InvalidHandleError,
    UseAfterFreeError,
)
from vfio_emu.shm import _binding as C

SHM = "/dev/shm/"
FAST = {"hz": 1000, "time_scale": 1000.0}
# Offsets in the header (csrc/vfio_emu.h, struct vfio_arena_hdr, layout version 2).
OFF_TIME_SCALE, OFF_HZ, OFF_FREE_HEAD, OFF_WARN_HEAD = 64, 72, 128, 256


@contextmanager
def header(arena: Arena) -> Iterator[mmap.mmap]:
    """The live header page of an arena, writable, as another process of this user sees it."""
    with open(SHM + arena.name, "r+b") as f, mmap.mmap(f.fileno(), 4096) as m:
        yield m


def run_python(code: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run code in a fresh interpreter (a crash there cannot take the test run with it)."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout)


# -- 1. reading a slot's label keeps its cdata alive ------------------------------------

def test_reopened_objects_keep_their_labels_through_many_opens(arena):
    k = arena.kref(label="x" * 40)
    for _ in range(2000):
        assert arena.open(k.token).label == "x" * 40


# -- 2. a segment that shrinks, or that is not ours -------------------------------------

def test_a_truncated_segment_closes_the_view_instead_of_killing_the_process():
    done = run_python("""
        import os
        from vfio_emu import Arena, ArenaClosedError
        a = Arena.create(capacity=8)
        b = Arena.attach(a.name)            # a second view, as another process has
        k = a.kref(label="k")
        kb = b.open(k.token)
        os.truncate("/dev/shm/" + a.name, 0)
        for obj, arena in ((k, a), (kb, b)):
            try:
                obj.get()
            except ArenaClosedError as e:
                assert "shrank" in str(e) and arena.lost and arena.closed, e
            else:
                raise AssertionError("get() on a truncated segment succeeded")
        a.close()                            # still unlinks the name
        assert not os.path.exists("/dev/shm/" + a.name)
        print("survived")
    """)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "survived"


def test_a_sigbus_outside_any_arena_still_kills_as_before():
    done = run_python("""
        import mmap, os, tempfile
        from vfio_emu import Arena
        a = Arena.create(capacity=8)         # installs the arena's SIGBUS handler
        print(a.name, flush=True)
        with tempfile.TemporaryFile() as f:
            f.truncate(4096)
            m = mmap.mmap(f.fileno(), 4096)
            f.truncate(0)
            m[0]                             # a SIGBUS that is not the arena's
        print("not reached")
    """)
    # Killed by it - or, under AddressSanitizer, reported by the handler we chained to.
    assert done.returncode == -signal.SIGBUS or (
        done.returncode != 0 and "AddressSanitizer: BUS" in done.stderr), done.stderr
    assert "not reached" not in done.stdout
    Arena.unlink(done.stdout.split()[0])  # its creator died: nobody else would


def test_attach_refuses_a_segment_others_may_access(make_arena):
    a = make_arena()
    os.chmod(SHM + a.name, 0o644)
    with pytest.raises(ArenaPermissionError, match="mode 0600"):
        Arena.attach(a.name)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can hand a segment to another uid")
def test_attach_refuses_a_segment_of_another_user(make_arena):
    a = make_arena()
    os.chown(SHM + a.name, 12345, -1)
    with pytest.raises(ArenaPermissionError, match="another owner"):
        Arena.attach(a.name)


# -- 3 and 7. forged WARN heads never hang C or turn into an error status ----------------

def test_warn_set_stack_on_a_head_of_2_64_minus_1_returns_at_once():
    done = run_python("""
        import mmap
        from vfio_emu import Arena
        from vfio_emu.shm import _binding as C
        a = Arena.create(capacity=8, warn_capacity=4)
        with open("/dev/shm/" + a.name, "r+b") as f, mmap.mmap(f.fileno(), 4096) as m:
            m[256:264] = (2**64 - 1).to_bytes(8, "little")
        print(C.warn_set_stack(a._ptr, 1, b"stack"))
        r = a.refcount(0)
        r.inc()                              # its WARN cannot get a sequence: dropped
        print(a.warn_dropped)
    """, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0", "1"]


@pytest.mark.parametrize("head", [C.WARN_SEQ_MAX, C.WARN_SEQ_MAX + 7, 2**63 + 5])
def test_warns_past_the_sequence_limit_are_dropped_not_raised(make_arena, head):
    a = make_arena()
    with header(a) as m:
        struct.pack_into("<Q", m, OFF_WARN_HEAD, head)
    r, z = a.refcount(0), a.refcount(0)
    r.inc()                      # WARN ADD_UAF: a plain return, no "status -922..." error
    assert r.read() == C.REFCOUNT_SATURATED
    assert z.dec_not_one() in (True, False)  # and no false use-after-free
    assert a.warn_dropped == 2
    assert a.dmesg() == []


def test_attach_refuses_a_warn_head_past_the_limit(make_arena):
    a = make_arena()
    with header(a) as m:
        struct.pack_into("<Q", m, OFF_WARN_HEAD, C.WARN_SEQ_MAX + 1)
    with pytest.raises(ArenaFormatError, match="corrupt"):
        Arena.attach(a.name)


# -- 4. close() racing other threads of the same process ------------------------------

def free_slots(arena: Arena) -> int:
    """Allocate until full (then free again): how many slots the free list still reaches."""
    got = []
    try:
        while True:
            got.append(arena.refcount(1))
    except ArenaFullError:
        pass
    for r in got:
        r.free()
    return len(got)


def _alloc_and_free_until_closed(view: Arena, go: threading.Barrier,
                                 still_allocated: list[object]) -> None:
    go.wait()
    try:
        while True:
            k = view.kref()  # all or nothing: close() waits for an alloc in flight
            try:
                k.free()  # the same
            except ArenaClosedError:
                still_allocated.append(k.token)
                raise
    except ArenaClosedError:
        pass


def test_close_racing_allocating_threads_loses_no_slot(make_arena):
    owner = make_arena(capacity=64)
    for _ in range(60):
        view = Arena.attach(owner.name)
        made: list[object] = []
        go = threading.Barrier(3)
        threads = [threading.Thread(target=_alloc_and_free_until_closed, args=(view, go, made))
                   for _ in range(2)]
        for t in threads:
            t.start()
        go.wait()
        view.close()
        for t in threads:
            t.join()
        for token in made:  # allocated and not yet freed when close() came
            owner.open(token).free()
        assert owner.in_use == 0
        assert free_slots(owner) == owner.capacity


def _wait_until_closed(comp: object, errors: list[BaseException]) -> None:
    try:
        comp.wait_for_completion_timeout(10**9)  # type: ignore[attr-defined]
    except EmulatorError as e:
        errors.append(e)


def test_close_during_a_wait_leaves_no_waiter_counted(make_arena):
    owner = make_arena(capacity=8, **FAST)
    comp = owner.completion()
    for _ in range(10):
        view = Arena.attach(owner.name)
        errors: list[BaseException] = []
        t = threading.Thread(target=_wait_until_closed, args=(view.open(comp.token), errors))
        t.start()
        while comp.waiters == 0 and t.is_alive():  # until it sleeps
            threading.Event().wait(0.001)
        view.close()
        t.join()
        assert [type(e) for e in errors] == [ArenaClosedError]
        assert comp.waiters == 0


# -- 5. a token or pickle never names an object of a later arena of the same name -------

def test_a_token_of_a_closed_arena_does_not_open_its_successor():
    name = f"vfio-emu-test-reuse-{os.getpid()}"
    first = Arena.create(capacity=8, name=name)
    k = first.kref(label="old")
    token, pickled = k.token, pickle.dumps(k)
    first.close()
    with Arena.create(capacity=8, name=name) as second:
        new = second.kref(label="new")
        assert (new.index, new.gen) == (token.slot, token.gen)  # the same slot and gen
        with pytest.raises(UseAfterFreeError, match="earlier arena"):
            second.open(token)
        with pytest.raises(ArenaNotFoundError, match="is gone"):
            pickle.loads(pickled)
        assert new.read() == 1


# -- 6. clock fields create() refuses are refused by attach() too ----------------------

@pytest.mark.parametrize(("offset", "fmt", "value"), [
    (OFF_TIME_SCALE, "<d", float("inf")), (OFF_TIME_SCALE, "<d", float("nan")),
    (OFF_TIME_SCALE, "<d", 5e-324), (OFF_TIME_SCALE, "<d", 1e-20),
    (OFF_TIME_SCALE, "<d", 1e10), (OFF_HZ, "<I", 0), (OFF_HZ, "<I", 10**6)])
def test_attach_refuses_a_clock_create_refuses(make_arena, offset, fmt, value):
    a = make_arena()
    with header(a) as m:
        struct.pack_into(fmt, m, offset, value)
    with pytest.raises(ArenaFormatError, match="corrupt"):
        Arena.attach(a.name)


def test_attach_refuses_a_free_list_head_past_the_slots(make_arena):
    a = make_arena(capacity=8)
    with header(a) as m:
        struct.pack_into("<Q", m, OFF_FREE_HEAD, 9)
    with pytest.raises(ArenaFormatError, match="corrupt"):
        Arena.attach(a.name)


def test_a_free_list_corrupted_after_attach_is_reported_not_followed(make_arena):
    a = make_arena(capacity=8)
    live = a.kref()
    with header(a) as m:  # the head now names a live slot, then a slot far out of range
        struct.pack_into("<Q", m, OFF_FREE_HEAD, (7 << 32) | (live.index + 1))
    with pytest.raises(ArenaFormatError, match="corrupt"):
        a.kref()
    with header(a) as m:
        struct.pack_into("<Q", m, OFF_FREE_HEAD, (8 << 32) | 1000)
    with pytest.raises(ArenaFormatError, match="corrupt"):
        a.kref()
    assert live.read() == 1


# -- 8. forged pickles -------------------------------------------------------------------

class Forged:
    def __init__(self, arena: Arena, *args: object) -> None:
        self.arena, self.args = arena, args

    def __reduce__(self) -> tuple[object, ...]:
        return (self.arena._open, self.args)


@pytest.mark.parametrize("kind", [0, 4, 99, -1, 2**40, "kref", None, 2.0])
def test_a_forged_pickle_of_an_unknown_kind_is_an_invalid_handle(arena, kind):
    k = arena.kref()
    data = pickle.dumps(Forged(arena, kind, k.index, k.gen, arena.incarnation))
    with pytest.raises(InvalidHandleError, match="kind"):
        pickle.loads(data)


@pytest.mark.parametrize("incarnation", [0, None, "x", 2**70])
def test_a_forged_pickle_of_another_incarnation_is_refused(arena, incarnation):
    k = arena.kref()
    data = pickle.dumps(Forged(arena, C.KIND_KREF, k.index, k.gen, incarnation))
    with pytest.raises(UseAfterFreeError, match="earlier arena"):
        pickle.loads(data)


# -- 9. in_use does not drift when a process dies mid-allocation ------------------------

def _churn_forever(name: str) -> None:
    a = Arena.attach(name)
    C.slot_churn(a._ptr, 1 << 60)


def test_in_use_matches_the_live_slots_after_kills_during_alloc_and_free(make_arena):
    import multiprocessing

    a = make_arena(capacity=64)
    ctx = multiprocessing.get_context("fork")
    for _ in range(20):
        p = ctx.Process(target=_churn_forever, args=(a.name,))
        p.start()
        threading.Event().wait(0.005)
        os.kill(p.pid, signal.SIGKILL)
        p.join()
        left = a.objects()
        assert a.in_use == len(left)
        for obj in left:  # what the dead process held, freed through its token
            a._open(C.KIND_REFCOUNT, obj.index, obj.gen, a.incarnation).free()
        assert a.in_use == 0


# -- kills during a WARN: the ring goes on -----------------------------------------------

def _warn_forever(name: str) -> None:
    a = Arena.attach(name)
    r = a.refcount(0)
    while True:
        r.set(0)
        r.inc()


def test_the_warn_ring_keeps_working_after_writers_are_killed_mid_warn(make_arena):
    import multiprocessing

    a = make_arena(capacity=64, warn_capacity=8)
    ctx = multiprocessing.get_context("fork")
    for _ in range(10):
        p = ctx.Process(target=_warn_forever, args=(a.name,))
        p.start()
        threading.Event().wait(0.005)
        os.kill(p.pid, signal.SIGKILL)
        p.join()
    seq, dropped = a.warn_seq, a.warn_dropped
    for i in range(16):
        a.warn(f"after the kills {i}")
    new = [w for w in a.dmesg(since=seq) if w.text.startswith("after the kills")]
    # Each WARN is either in the ring (the last 8 fit) or counted as dropped.
    assert a.warn_seq == seq + 16
    assert len(new) + (a.warn_dropped - dropped) >= 8
    assert all(w.pid == os.getpid() for w in new)


# -- interruptible waits under a signal storm: no count lost or taken twice --------------

@pytest.mark.parametrize("variant", ["interruptible", "interruptible_timeout"])
def test_interruptible_waits_under_a_signal_storm_keep_every_count(arena, variant):
    comp = arena.completion()
    completes = 300
    storm = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import os, signal, time
        for _ in range(20000):
            try:
                os.kill({os.getpid()}, signal.SIGUSR1)
            except ProcessLookupError:
                break
            time.sleep(0.0001)
    """)])
    old = signal.signal(signal.SIGUSR1, lambda *_: None)
    taken = interrupted = 0
    try:
        feeder = threading.Thread(target=lambda: [comp.complete() for _ in range(completes)])
        feeder.start()
        while taken < completes:
            if variant == "interruptible":
                r = comp.wait_for_completion_interruptible()
            else:
                r = comp.wait_for_completion_interruptible_timeout(10**6)
            if r == -ERESTARTSYS:
                interrupted += 1
            elif r > 0 or variant == "interruptible":  # (the timeout variant: 0 = timed out)
                assert r >= 0
                taken += 1
        feeder.join()
    finally:
        signal.signal(signal.SIGUSR1, old)
        storm.kill()
        storm.wait()
    assert taken == completes and comp.done == 0


# -- orphans: a creator killed before it could unlink --------------------------------------

def test_arenas_lists_an_orphan_and_removes_it_but_not_a_live_creators(make_arena, capsys):
    from vfio_emu.cli import main

    mine = make_arena(capacity=8)
    died = run_python("""
        import os
        from vfio_emu import Arena
        a = Arena.create(capacity=8)
        a.kref(label="left behind")
        print(a.name, flush=True)
        os._exit(0)                          # as SIGKILL would: no close, no unlink
    """)
    orphan = died.stdout.split()[0]
    try:
        assert Arena.attach(orphan).creator_alive is False
        assert mine.creator_alive is True
        assert main(["arenas"]) == 0
        listing = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
        assert "dead" in listing[orphan] and "1/8" in listing[orphan]
        assert "alive" in listing[mine.name]
        assert main(["arenas", "--remove-orphans"]) == 0
        assert f"removed {orphan}" in capsys.readouterr().out
        assert not os.path.exists(SHM + orphan)
        assert os.path.exists(SHM + mine.name)
    finally:
        if os.path.exists(SHM + orphan):
            Arena.unlink(orphan)


# -- a corrupt WARN ring: read without a crash, and overwritten, not obeyed --------------

RING = 4096  # + capacity * 128: the ring follows the slots; 2048-byte records


@pytest.mark.parametrize("garbage", ["ff", "41", "busy-from-the-future"])
def test_a_corrupt_warn_ring_is_read_safely_and_written_over(make_arena, garbage):
    a = make_arena(capacity=8, warn_capacity=8)
    a.warn("before")
    ring = RING + 8 * 128
    with open(SHM + a.name, "r+b") as f, mmap.mmap(f.fileno(), ring + 8 * 2048) as m:
        for rec in range(8):
            at = ring + rec * 2048
            if garbage == "busy-from-the-future":  # a live-looking claim stamped in 2262
                struct.pack_into("<Qq", m, at, (1 << 63) | a.warn_seq, (1 << 63) - 1)
            else:
                m[at:at + 2048] = bytes.fromhex(garbage) * 2048
    assert all(isinstance(w.text, str) for w in a.dmesg())  # whatever it holds now
    seq, dropped = a.warn_seq, a.warn_dropped
    for i in range(8):
        a.warn(f"after {i}")
    assert a.warn_dropped == dropped
    assert [w.text for w in a.dmesg(since=seq)] == [f"after {i}" for i in range(8)]
