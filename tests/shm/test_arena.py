"""The shared-memory arena (vfio_emu.shm.arena, .handle, the C core through _binding): bad
handles and tokens, bad segments, ownership, pickling, bad arguments.

Every refusal must be a clear exception of the documented class, and the arena
must keep working after it.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import struct
import subprocess
import sys

import pytest
from _workers import FAST_CLOCK, attach_use_close, unique_name, use_pickled_arena_and_close

from vfio_emu import (
    Arena,
    ArenaClosedError,
    ArenaError,
    ArenaExistsError,
    ArenaFormatError,
    ArenaFullError,
    ArenaNotFoundError,
    Completion,
    DoubleFreeError,
    InvalidArgumentError,
    InvalidHandleError,
    Kref,
    Refcount,
    Token,
    UseAfterFreeError,
)
from vfio_emu.shm import _binding as C

SHM = "/dev/shm/"


def assert_usable(arena):
    """Allocate an object of each kind, use it, free it: the arena still works."""
    in_use = arena.in_use
    k = arena.kref(label="probe")
    k.get()
    assert k.put() == 0
    assert k.put() == 1
    c = arena.completion()
    c.complete()
    assert c.try_wait_for_completion() is True
    r = arena.refcount(2)
    assert r.dec_and_test() is False
    for o in (k, c, r):
        o.free()
    assert arena.in_use == in_use


@pytest.fixture
def shm_names():
    """Names of raw /dev/shm files a test writes by hand; removed at teardown."""
    names: list[str] = []
    yield names
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(SHM + name)


def write_segment(shm_names, data: bytes) -> str:
    name = unique_name("raw")
    shm_names.append(name)
    with open(SHM + name, "wb") as f:
        f.write(data)
    os.chmod(SHM + name, 0o600)
    return name


def real_segment_bytes(make_arena) -> bytes:
    a = make_arena(capacity=4, warn_capacity=2)
    with open(SHM + a.name, "rb") as f:
        return f.read()


# ---- stale handles and tokens ----------------------------------------------------------

@pytest.mark.parametrize(("make", "op", "opname"), [
    (lambda a: a.kref(label="victim"), lambda o: o.get(), "kref_get"),
    (lambda a: a.kref(label="victim"), lambda o: o.put(), "kref_put"),
    (lambda a: a.kref(label="victim"), lambda o: o.get_many(2), "kref_get"),
    (lambda a: a.kref(label="victim"), lambda o: o.read(), "kref_read"),
    (lambda a: a.refcount(1, label="victim"), lambda o: o.inc(), "refcount_inc"),
    (lambda a: a.refcount(1, label="victim"), lambda o: o.dec_and_test(),
     "refcount_dec_and_test"),
    (lambda a: a.refcount(1, label="victim"), lambda o: o.set(3), "refcount_set"),
    (lambda a: a.completion(label="victim"), lambda o: o.complete(), "complete"),
    (lambda a: a.completion(label="victim"), lambda o: o.try_wait_for_completion(),
     "try_wait_for_completion"),
    (lambda a: a.completion(label="victim"), lambda o: o.wait_for_completion_timeout(10),
     "wait_for_completion_timeout"),
])
def test_stale_handle_after_free_raises_use_after_free_naming_op_and_label(
        arena, make, op, opname):
    obj = make(arena)
    obj.free()
    with pytest.raises(UseAfterFreeError) as exc:
        op(obj)
    assert not isinstance(exc.value, DoubleFreeError)
    msg = str(exc.value)
    assert opname + "()" in msg
    assert "'victim'" in msg
    assert "is free" in msg
    assert_usable(arena)


def test_stale_handle_to_a_reused_slot_does_not_touch_the_new_object(arena):
    old = arena.kref(label="old")
    old.free()
    new = arena.refcount(5, label="new")
    assert new.index == old.index and new.gen != old.gen
    with pytest.raises(UseAfterFreeError) as exc:
        old.get()
    assert "now holds refcount 'new'" in str(exc.value)
    assert new.read() == 5


def test_a_kref_starts_at_one_or_as_zeroed_memory_holds_it(arena):
    one, zero = arena.kref(label="init"), arena.kref(label="zeroed", count=0)
    assert (one.read(), zero.read()) == (1, 0) and zero.label == "zeroed"
    zero.init()
    assert zero.put() == 1
    for bad in (2, -1, "0"):
        with pytest.raises(InvalidArgumentError):
            arena.kref(count=bad)
    for k in (one, zero):
        k.free()
    long = arena.kref(label="é" * C.LABEL_MAX)  # cut on a character boundary, as before
    assert long.label == "é" * ((C.LABEL_MAX - 1) // 2) and arena.objects()[0].label == long.label
    long.free()
    assert arena.in_use == 0


def test_double_free_raises_double_free_error(arena):
    k = arena.kref(label="twice")
    k.free()
    with pytest.raises(DoubleFreeError) as exc:
        k.free()
    assert isinstance(exc.value, UseAfterFreeError)
    assert "double-free" in str(exc.value) and "'twice'" in str(exc.value)
    assert arena.in_use == 0
    assert_usable(arena)


def test_double_free_through_a_second_handle_is_caught(arena):
    k = arena.kref()
    again = arena.open(k.token)
    k.free()
    with pytest.raises(DoubleFreeError):
        again.free()
    assert arena.in_use == 0
    assert_usable(arena)


def test_token_of_freed_object_raises_use_after_free_on_open(arena):
    k = arena.kref(label="gone")
    token = k.token
    k.free()
    with pytest.raises(UseAfterFreeError):
        arena.open(token)
    arena.completion()  # the slot may now hold another kind: still a stale token
    with pytest.raises(UseAfterFreeError):
        arena.open(token)
    assert_usable(arena)


def test_token_round_trip_opens_the_same_object(arena):
    k = arena.kref(label="tok")
    opened = arena.open(k.token)
    assert isinstance(opened, Kref)
    assert opened == k
    assert opened.label == "tok"
    opened.get()
    assert k.read() == 2
    assert arena.open(tuple(k.token)) == k  # a plain tuple works as well


@pytest.mark.parametrize("index", [64, 1000, -1, 2**32])
def test_token_with_out_of_range_slot_raises_invalid_handle(arena, index):
    k = arena.kref()
    with pytest.raises(InvalidHandleError):
        arena.open(Token(arena.name, arena.incarnation, "kref", index, k.gen))
    assert_usable(arena)


def test_token_of_another_arena_raises_invalid_handle(arena, make_arena):
    other = make_arena()
    k = other.kref()
    with pytest.raises(InvalidHandleError) as exc:
        arena.open(k.token)
    assert other.name in str(exc.value)
    assert_usable(arena)


def test_token_of_wrong_kind_raises_invalid_handle(arena):
    k = arena.kref()
    with pytest.raises(InvalidHandleError) as exc:
        arena.open(Token(arena.name, arena.incarnation, "completion", k.index, k.gen))
    assert "does not hold a completion" in str(exc.value)
    with pytest.raises(InvalidHandleError):
        arena.open(Token(arena.name, arena.incarnation, "refcount", k.index, k.gen))
    assert k.read() == 1
    assert_usable(arena)


@pytest.mark.parametrize("token", [
    None, 5, "kref", ("a", "kref", 0), ("x", "kref", 0, 1, 2),
])
def test_malformed_token_raises_invalid_handle(arena, token):
    with pytest.raises(InvalidHandleError):
        arena.open(token)
    assert_usable(arena)


def test_token_with_unknown_kind_or_non_int_fields_raises_invalid_handle(arena):
    k = arena.kref()
    for token in (Token(arena.name, arena.incarnation, "mutex", k.index, k.gen),
                  Token(arena.name, arena.incarnation, "kref", str(k.index), k.gen),
                  Token(arena.name, arena.incarnation, "kref", k.index, float(k.gen)),
                  Token(arena.name, arena.incarnation, "kref", k.index, 1 << 40)):
        with pytest.raises(InvalidHandleError):
            arena.open(token)
    assert_usable(arena)


def test_full_arena_raises_arena_full_and_recovers_after_one_free(arena):
    objs = [arena.refcount(1) for _ in range(arena.capacity)]
    assert arena.in_use == arena.capacity
    with pytest.raises(ArenaFullError) as exc:
        arena.kref()
    assert str(arena.capacity) in str(exc.value)
    with pytest.raises(ArenaFullError):
        arena.completion()
    victim = objs.pop(17)
    victim.free()
    again = arena.kref()
    assert again.index == victim.index
    assert again.read() == 1
    for o in objs:
        o.free()
    again.free()
    assert arena.in_use == 0
    assert_usable(arena)


# ---- bad segments --------------------------------------------------------------------

def test_attach_to_missing_name_raises_arena_not_found():
    with pytest.raises(ArenaNotFoundError) as exc:
        Arena.attach(unique_name("missing"))
    assert isinstance(exc.value, FileNotFoundError)


def test_create_with_existing_name_raises_arena_exists(arena):
    with pytest.raises(ArenaExistsError) as exc:
        Arena.create(capacity=4, name=arena.name)
    assert isinstance(exc.value, FileExistsError)
    assert os.path.exists(SHM + arena.name)  # the failed create did not unlink it
    assert_usable(arena)


@pytest.mark.parametrize("fill", [b"\0", b"random"])
def test_attach_to_foreign_segment_raises_format_error(shm_names, fill):
    data = bytes(8192) if fill == b"\0" else os.urandom(8192)
    name = write_segment(shm_names, data)
    with pytest.raises(ArenaFormatError) as exc:
        Arena.attach(name)
    assert "not a vfio-emu arena" in str(exc.value)


@pytest.mark.parametrize("size", [0, 4])
def test_attach_to_empty_segment_raises_format_error(shm_names, size):
    name = write_segment(shm_names, bytes(size))
    with pytest.raises(ArenaFormatError) as exc:
        Arena.attach(name)
    assert "not a vfio-emu arena" in str(exc.value)


def test_attach_to_short_foreign_segment_says_not_an_arena(shm_names):
    name = write_segment(shm_names, bytes(100))
    with pytest.raises(ArenaFormatError) as exc:
        Arena.attach(name)
    assert "not a vfio-emu arena" in str(exc.value)


def test_attach_to_truncated_segment_raises_format_error(shm_names, make_arena):
    data = real_segment_bytes(make_arena)
    name = write_segment(shm_names, data[: 4096 + 300])
    with pytest.raises(ArenaFormatError) as exc:
        Arena.attach(name)
    assert "truncated" in str(exc.value)


def test_attach_to_segment_of_another_version_raises_format_error(shm_names, make_arena):
    data = bytearray(real_segment_bytes(make_arena))
    (version,) = struct.unpack_from("<I", data, 8)
    struct.pack_into("<I", data, 8, version + 1)
    name = write_segment(shm_names, bytes(data))
    with pytest.raises(ArenaFormatError) as exc:
        Arena.attach(name)
    assert "version" in str(exc.value)


@pytest.mark.parametrize(("offset", "fmt", "value"), [
    (16, "<I", 5),        # capacity disagrees with the size
    (16, "<I", 0),        # capacity 0
    (12, "<I", 64),       # slot_size
    (28, "<I", 4095),     # hdr_size
])
def test_attach_to_corrupt_header_raises_format_error(shm_names, make_arena, offset, fmt, value):
    data = bytearray(real_segment_bytes(make_arena))
    struct.pack_into(fmt, data, offset, value)
    name = write_segment(shm_names, bytes(data))
    with pytest.raises(ArenaFormatError) as exc:
        Arena.attach(name)
    assert "corrupt" in str(exc.value)


def test_attach_to_segment_with_trailing_bytes_raises_format_error(shm_names, make_arena):
    data = real_segment_bytes(make_arena)
    name = write_segment(shm_names, data + bytes(4096))
    with pytest.raises(ArenaFormatError) as exc:
        Arena.attach(name)
    assert "corrupt" in str(exc.value)


def test_copy_of_a_real_segment_attaches_as_control(shm_names, make_arena):
    """The format tests above patch one field; unpatched, the same copy is accepted."""
    data = real_segment_bytes(make_arena)
    name = write_segment(shm_names, data)
    a = Arena.attach(name)
    try:
        assert a.capacity == 4
        assert not a.owner
        assert_usable(a)
    finally:
        a.close()
    assert os.path.exists(SHM + name)


# ---- ownership ---------------------------------------------------------------------------

def test_created_segment_has_mode_0600(arena):
    assert os.stat(SHM + arena.name).st_mode & 0o777 == 0o600


def test_creator_owns_and_its_close_unlinks(make_arena):
    a = make_arena()
    assert a.owner
    assert os.path.exists(SHM + a.name)
    a.close()
    assert a.closed
    assert not os.path.exists(SHM + a.name)
    a.close()  # idempotent


def test_context_manager_closes_and_unlinks():
    with Arena.create(capacity=4, **FAST_CLOCK) as a:
        name = a.name
        assert os.path.exists(SHM + name)
    assert a.closed
    assert not os.path.exists(SHM + name)


def test_attacher_in_same_process_does_not_unlink_on_close(arena):
    b = Arena.attach(arena.name)
    assert not b.owner
    k = b.kref()
    assert arena.open(k.token).read() == 1
    b.close()
    assert os.path.exists(SHM + arena.name)
    assert arena.objects()[0].kind == "kref"


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_child_that_only_attached_never_unlinks_and_creator_close_does(make_arena, method):
    a = make_arena()
    k = a.kref()
    ctx = multiprocessing.get_context(method)
    q = ctx.Queue()
    p = ctx.Process(target=attach_use_close, args=(a.name, k.token, q))
    p.start()
    owner, existed = q.get(timeout=60)
    p.join(60)
    assert p.exitcode == 0
    assert (owner, existed) == (False, True)
    assert os.path.exists(SHM + a.name)
    assert k.read() == 1
    a.close()
    assert not os.path.exists(SHM + a.name)


def test_pickled_arena_in_spawned_child_attaches_and_never_unlinks(make_arena):
    a = make_arena()
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=use_pickled_arena_and_close, args=(a, q))
    p.start()
    owner, value, existed = q.get(timeout=60)
    p.join(60)
    assert p.exitcode == 0
    assert (owner, value, existed) == (False, 7, True)
    assert os.path.exists(SHM + a.name)
    assert a.in_use == 0


FORK_EXIT_SCRIPT = r"""
import os, sys
from vfio_emu import Arena
a = Arena.create(capacity=4)
k = a.kref()
pid = os.fork()
if pid == 0:
    k.get()
    sys.exit(0)  # a normal exit: atexit handlers and weakref finalizers run
_, status = os.waitpid(pid, 0)
print(a.name, os.waitstatus_to_exitcode(status), os.path.exists("/dev/shm/" + a.name),
      k.read())
# the creator never closes: interpreter exit must unlink
"""


def test_forked_child_exit_never_unlinks_and_unclosed_creator_unlinks_at_exit():
    out = subprocess.run([sys.executable, "-c", FORK_EXIT_SCRIPT], capture_output=True,
                         text=True, timeout=60, check=True).stdout.split()
    name, child_rc, existed_after_child, count = out
    assert (child_rc, existed_after_child, count) == ("0", "True", "2")
    assert not os.path.exists(SHM + name)


def test_objects_after_close_raise_arena_closed_not_crash(make_arena):
    a = make_arena()
    k, c, r = a.kref(label="k"), a.completion(), a.refcount(3)
    a.close()
    for op in (k.get, k.put, k.read, lambda: k.get_many(3), c.complete,
               c.try_wait_for_completion, lambda: c.wait_for_completion_timeout(10),
               c.wait_for_completion, r.inc, r.read, lambda: r.set(1), k.free,
               a.kref, a.objects, a.dmesg, lambda: a.open(k.token)):
        with pytest.raises(ArenaClosedError):
            op()


def test_attacher_close_leaves_the_creators_objects_alive(arena):
    b = Arena.attach(arena.name)
    k = arena.kref()
    kb = b.open(k.token)
    b.close()
    with pytest.raises(ArenaClosedError):
        kb.get()
    k.get()
    assert k.read() == 2


# ---- pickling ----------------------------------------------------------------------------

@pytest.mark.parametrize("make", [lambda a: a.kref(label="p"), lambda a: a.refcount(9, label="p"),
                                  lambda a: a.completion(label="p")])
def test_pickle_round_trip_of_a_handle_yields_an_equal_object(arena, make):
    obj = make(arena)
    back = pickle.loads(pickle.dumps(obj))
    assert back == obj
    assert type(back) is type(obj)
    assert back.label == "p"
    assert back.arena is arena
    assert hash(back) == hash(obj)


def test_pickle_of_freed_handle_fails_to_load_with_use_after_free(arena):
    k = arena.kref()
    data = pickle.dumps(k)
    k.free()
    with pytest.raises(UseAfterFreeError):
        pickle.loads(data)


def test_pickle_of_an_arena_reuses_this_processs_mapping(arena):
    assert pickle.loads(pickle.dumps(arena)) is arena


def test_handles_of_different_objects_or_kinds_are_not_equal(arena):
    k1, k2 = arena.kref(), arena.kref()
    assert k1 != k2
    assert k1 == arena.open(k1.token)
    r = arena.refcount(1)
    assert isinstance(r, Refcount) and isinstance(arena.completion(), Completion)
    assert r != k1


# ---- invalid arguments ---------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [
    {"capacity": 0},
    {"capacity": -1},
    {"capacity": "x"},
    {"capacity": 4.0},
    {"capacity": (1 << 22) + 1},
    {"capacity": 4, "warn_capacity": 0},
    {"capacity": 4, "hz": 0},
    {"capacity": 4, "time_scale": 0},
    {"capacity": 4, "time_scale": float("inf")},
    {"capacity": 4, "name": "a/b"},
    {"capacity": 4, "name": ""},
    {"capacity": 4, "name": ".."},
    {"capacity": 4, "name": "x" * 201},
    {"capacity": 4, "name": 42},
])
def test_create_with_invalid_arguments_raises_invalid_argument(kwargs):
    with pytest.raises(InvalidArgumentError) as exc:
        Arena.create(**kwargs)
    assert isinstance(exc.value, ValueError)


@pytest.mark.parametrize("name", ["a/b", "", 7])
def test_attach_with_invalid_name_raises_invalid_argument(name):
    with pytest.raises(InvalidArgumentError):
        Arena.attach(name)


@pytest.mark.parametrize("make", [
    lambda a: a.refcount(1, label=5),
    lambda a: a.kref(label=b"bytes"),
    lambda a: a.completion(label=["x"]),
    lambda a: a.refcount(1 << 32),
    lambda a: a.refcount(-(1 << 31) - 1),
    lambda a: a.refcount("1"),
])
def test_alloc_with_invalid_arguments_raises_and_allocates_nothing(arena, make):
    with pytest.raises(InvalidArgumentError) as exc:
        make(arena)
    assert isinstance(exc.value, ValueError)
    assert arena.in_use == 0
    assert_usable(arena)


@pytest.mark.parametrize("bad", ["1", 1.0, None, 1 << 32])
def test_refcount_add_with_invalid_amount_raises_invalid_argument(arena, bad):
    r = arena.refcount(1)
    with pytest.raises(InvalidArgumentError) as exc:
        r.add(bad)
    assert isinstance(exc.value, ValueError)
    assert r.read() == 1
    assert_usable(arena)


def test_spin_ns_rejects_negative_and_non_int(arena):
    for bad in (-1, 1.5, "1"):
        with pytest.raises(InvalidArgumentError):
            arena.spin_ns = bad
    arena.spin_ns = 0
    assert arena.spin_ns == 0


def test_errors_share_one_hierarchy():
    from vfio_emu import EmulatorError

    for cls in (ArenaError, InvalidArgumentError, InvalidHandleError, UseAfterFreeError):
        assert issubclass(cls, EmulatorError)
    for cls in (ArenaNotFoundError, ArenaExistsError, ArenaFormatError, ArenaFullError,
                ArenaClosedError):
        assert issubclass(cls, ArenaError)


# ---- listing -----------------------------------------------------------------------------

def test_objects_lists_live_objects_with_kind_label_value_and_not_freed_ones(arena):
    r = arena.refcount(5, label="rc")
    k = arena.kref(label="kr")
    k.get()
    c = arena.completion(label="co")
    for _ in range(3):
        c.complete()
    gone = arena.kref(label="freed")
    gone.free()
    listing = {o.label: o for o in arena.objects()}
    assert set(listing) == {"rc", "kr", "co"}
    assert (listing["rc"].kind, listing["rc"].value, listing["rc"].index) == ("refcount", 5,
                                                                            r.index)
    assert (listing["kr"].kind, listing["kr"].value) == ("kref", 2)
    assert (listing["co"].kind, listing["co"].value) == ("completion", 3)
    assert all(o.owner_pid == os.getpid() for o in listing.values())
    assert listing["kr"].gen == k.gen
    assert arena.in_use == 3


def test_long_label_is_truncated_consistently(arena):
    k = arena.kref(label="L" * 200)
    assert k.label == "L" * 47
    assert arena.open(k.token).label == k.label
    assert arena.objects()[0].label == k.label


def test_pickle_round_trip_still_reuses_creator_mapping_after_a_second_attach_closed(arena):
    k = arena.kref()
    Arena.attach(arena.name).close()
    assert pickle.loads(pickle.dumps(arena)) is arena
    assert pickle.loads(pickle.dumps(k)) == k


# ---- the WARN log --------------------------------------------------------------------------

def test_warn_from_a_higher_layer_is_recorded_with_text_object_and_stack(arena):
    k = arena.kref(label="layered")
    seq = arena.warn_seq
    rec = arena.warn("vfio: device still in use", k)
    assert rec.kind == "WARN"
    assert rec.text == "vfio: device still in use"
    assert rec.label == "layered" and rec.object_kind == "kref"
    assert "test_warn_from_a_higher_layer_is_recorded_with_text_object_and_stack" in rec.stack
    assert arena.dmesg(since=seq) == [rec]
    assert arena.warn_seq == seq + 1
    k.free()
    with pytest.raises(UseAfterFreeError):
        arena.warn("late", k)


def test_dmesg_ring_keeps_the_newest_records_oldest_first(make_arena):
    a = make_arena(capacity=4, warn_capacity=4)
    r = a.refcount(0)
    first = a.warn_seq
    for _ in range(10):
        r.set(0)
        r.inc()
    recs = a.dmesg(since=first)
    assert [rec.seq for rec in recs] == list(range(first + 7, first + 11))
    assert all(rec.kind == "ADD_UAF" for rec in recs)
    assert a.dmesg(since=first + 9) == recs[-1:]
    assert a.dmesg(since=a.warn_seq) == []


def test_segment_layout_is_header_then_128_byte_slots_then_warn_ring(make_arena):
    a = make_arena(capacity=5, warn_capacity=3)
    with open(SHM + a.name, "rb") as f:
        hdr = f.read(64)
    size = os.stat(SHM + a.name).st_size
    magic, version, slot_size, capacity, warn_capacity, warn_rec_size, hdr_size = \
        struct.unpack_from("<QIIIIII", hdr, 0)
    total_size, slots_offset, ring_offset = struct.unpack_from("<QQQ", hdr, 32)
    assert (magic, version) == (0x554D4520F10E4D55, 2)
    assert (slot_size, capacity, warn_capacity, hdr_size) == (128, 5, 3, 4096)
    assert slots_offset == hdr_size
    assert ring_offset - slots_offset == capacity * 128
    assert total_size == size == ring_offset + warn_capacity * warn_rec_size


# ---- the allocator under contention -----------------------------------------------------

def _churn(arena, n, q):
    q.put(C.slot_churn(arena._ptr, n))


CHURNERS = 4  # more than the CPUs: a churner preempted between its read and its CAS is the ABA


def test_allocator_never_hands_out_one_slot_twice_to_racing_threads(make_arena):
    """Threads alloc/free 8 slots as fast as C goes (the C call lets the others run)."""
    import threading

    arena = make_arena(capacity=8)
    results = []
    threads = [threading.Thread(target=lambda: results.append(C.slot_churn(arena._ptr, 500_000)))
               for _ in range(CHURNERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == [0] * CHURNERS
    assert arena.in_use == 0
    assert len({arena.refcount(1).index for _ in range(8)}) == 8


def test_allocator_never_hands_out_one_slot_twice_to_racing_processes(make_arena):
    arena = make_arena(capacity=8)
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_churn, args=(arena, 500_000, q)) for _ in range(CHURNERS)]
    for p in procs:
        p.start()
    try:
        results = [q.get(timeout=120) for _ in procs]
    finally:
        for p in procs:
            p.join(120)
    assert results == [0] * CHURNERS
    assert arena.in_use == 0


# ---- more bad input -----------------------------------------------------------------------

def test_arena_name_over_200_bytes_of_utf8_is_refused():
    with pytest.raises(InvalidArgumentError, match="200 bytes"):
        Arena.create(name="é" * 101)  # 101 characters, 202 bytes


def test_arena_and_objects_cannot_be_built_by_hand(arena):
    from vfio_emu import Kref, Refcount

    with pytest.raises(TypeError, match=r"Arena\.create"):
        Arena(C.NULL, "x", False)
    for cls in (Kref, Refcount, Completion):
        with pytest.raises(TypeError, match="come from an Arena"):
            cls(arena, C.new("vfio_handle_t *"), "")


def test_closing_after_the_segment_was_unlinked_by_hand_still_closes():
    a = Arena.create(capacity=2)
    Arena.unlink(a.name)
    a.close()
    assert a.closed


def test_closed_arena_refuses_questions_about_its_segment():
    a = Arena.create(capacity=2)
    a.close()
    for question in (lambda: a.in_use, lambda: a.warn_seq, lambda: a.dmesg()):
        with pytest.raises(ArenaClosedError):
            question()


def test_token_with_even_generation_never_named_an_object(arena):
    k = arena.kref()
    with pytest.raises(InvalidHandleError, match="never named"):
        arena.open((arena.name, arena.incarnation, "kref", k.index, k.gen + 1))


@pytest.mark.parametrize("bad", [
    lambda a: a.warn(123),
    lambda a: a.warn("x", obj="not an object"),
    lambda a: a.open((a.name, a.incarnation, [], 0, 1)),
    lambda a: a.dmesg(since="3"),
    lambda a: a.dmesg(since=-1),
    lambda a: a.kref().get_many(2**63),
    lambda a: a.kref().put_many(-1),
    lambda a: a.clock.msecs_to_jiffies(1.5),
    lambda a: setattr(a, "spin_ns", 10**12),
    lambda a: Arena.create(time_scale=5e-324),
    lambda a: Arena.create(time_scale=1e300),
], ids=["warn-text", "warn-obj", "open-kind", "dmesg-str", "dmesg-neg", "get_many-huge",
        "put_many-neg", "msecs-float", "spin-huge", "scale-tiny", "scale-huge"])
def test_bad_argument_is_a_clear_emulator_error(arena, bad):
    with pytest.raises((InvalidArgumentError, InvalidHandleError)):
        bad(arena)
    assert arena.kref().read() == 1  # and the arena still works


def test_warn_about_an_object_of_another_arena_is_refused(arena, make_arena):
    other = make_arena(capacity=2).kref()
    with pytest.raises(InvalidArgumentError, match="not an object of arena"):
        arena.warn("x", other)


def test_label_is_cut_on_a_character_boundary(arena):
    k = arena.kref(label="é" * 40)  # 80 bytes: the slot keeps 47, i.e. 23 whole characters
    assert k.label == "é" * 23
    assert arena.open(k.token).label == k.label
