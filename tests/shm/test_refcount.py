"""refcount_t and kref in the arena (vfio_emu.shm.refcount: Refcount, Kref, KrefArray): the
v6.1 per-API table, the WARN records of vfio_emu.shm.dmesg, batches."""

from __future__ import annotations

import gc
import inspect
import os
import weakref

import pytest

from vfio_emu import (
    REFCOUNT_MAX,
    REFCOUNT_SATURATED,
    InvalidArgumentError,
    KrefArray,
    UseAfterFreeError,
)

SAT = 0xC0000000
INT_MAX = 0x7FFFFFFF
NEG1 = 0xFFFFFFFF
INT_MIN = 0x80000000

TEXT = {
    "ADD_NOT_ZERO_OVF": "refcount_t: saturated; leaking memory.",
    "ADD_OVF": "refcount_t: saturated; leaking memory.",
    "ADD_UAF": "refcount_t: addition on 0; use-after-free.",
    "SUB_UAF": "refcount_t: underflow; use-after-free.",
    "DEC_LEAK": "refcount_t: decrement hit 0; leaking memory.",
}


def run(arena, fn, *args):
    """Call fn(*args); return (its result, the WARN records it emitted)."""
    seq = arena.warn_seq
    result = fn(*args)
    return result, arena.dmesg(since=seq)


def check_warns(records, kinds):
    assert [r.kind for r in records] == kinds
    for rec in records:
        assert rec.text == TEXT[rec.kind]


def test_constants_match_the_kernel():
    assert REFCOUNT_MAX == INT_MAX
    assert REFCOUNT_SATURATED == SAT == 3221225472


# ---- include/linux/refcount.h, one row per (API, start value) ------------------------------

# (start, expected final read(), expected WARN kinds)
INC = [
    (0, SAT, ["ADD_UAF"]),
    (1, 2, []),
    (2, 3, []),
    (INT_MAX - 1, INT_MAX, []),
    (INT_MAX, SAT, ["ADD_OVF"]),
    (INT_MIN, SAT, ["ADD_OVF"]),
    (SAT, SAT, ["ADD_OVF"]),
    (NEG1, SAT, ["ADD_OVF"]),
]


@pytest.mark.parametrize(("start", "final", "warns"), INC)
def test_inc_from_zero_warns_add_uaf_past_int_max_or_negative_warns_add_ovf_and_saturates(
        arena, start, final, warns):
    r = arena.refcount(start)
    result, recs = run(arena, r.inc)
    assert result is None
    assert r.read() == final
    check_warns(recs, warns)


# (start, i, final, warns)
ADD = [
    (0, 0, SAT, ["ADD_UAF"]),
    (0, 5, SAT, ["ADD_UAF"]),
    (0, -1, SAT, ["ADD_UAF"]),
    (1, 0, 1, []),
    (1, 2, 3, []),
    (1, INT_MAX - 1, INT_MAX, []),
    (1, INT_MAX, SAT, ["ADD_OVF"]),
    (2, -1, 1, []),            # a negative add that stays positive is not checked
    (2, -3, SAT, ["ADD_OVF"]),  # ... one that goes negative is an overflow
    (2, NEG1, 1, []),          # i given unsigned is the same int as -1
    (INT_MAX, 1, SAT, ["ADD_OVF"]),
    (SAT, 1, SAT, ["ADD_OVF"]),
    (NEG1, 2, SAT, ["ADD_OVF"]),
]


@pytest.mark.parametrize(("start", "i", "final", "warns"), ADD)
def test_add_saturates_on_zero_negative_or_overflowing_result(arena, start, i, final, warns):
    r = arena.refcount(start)
    result, recs = run(arena, r.add, i)
    assert result is None
    assert r.read() == final
    check_warns(recs, warns)


# (start, returns, final, warns)
INC_NOT_ZERO = [
    (0, False, 0, []),
    (1, True, 2, []),
    (2, True, 3, []),
    (INT_MAX, True, SAT, ["ADD_NOT_ZERO_OVF"]),
    (INT_MIN, True, SAT, ["ADD_NOT_ZERO_OVF"]),
    (SAT, True, SAT, ["ADD_NOT_ZERO_OVF"]),
    (NEG1, True, SAT, ["ADD_NOT_ZERO_OVF"]),
]


@pytest.mark.parametrize(("start", "ret", "final", "warns"), INC_NOT_ZERO)
def test_inc_not_zero_refuses_zero_silently_and_returns_true_when_saturating(
        arena, start, ret, final, warns):
    r = arena.refcount(start)
    result, recs = run(arena, r.inc_not_zero)
    assert result is ret
    assert r.read() == final
    check_warns(recs, warns)


ADD_NOT_ZERO = [
    (0, 5, False, 0, []),
    (0, 0, False, 0, []),
    # v6.1: the overflow check runs even when old == 0, so a negative i on 0 saturates.
    (0, -1, False, SAT, ["ADD_NOT_ZERO_OVF"]),
    (1, 2, True, 3, []),
    (1, INT_MAX - 1, True, INT_MAX, []),
    (1, INT_MAX, True, SAT, ["ADD_NOT_ZERO_OVF"]),
    (3, -1, True, 2, []),
    (3, -4, True, SAT, ["ADD_NOT_ZERO_OVF"]),
    (SAT, 1, True, SAT, ["ADD_NOT_ZERO_OVF"]),
    (NEG1, 1, True, SAT, ["ADD_NOT_ZERO_OVF"]),
]


@pytest.mark.parametrize(("start", "i", "ret", "final", "warns"), ADD_NOT_ZERO)
def test_add_not_zero_refuses_zero_and_saturates_on_overflow(arena, start, i, ret, final, warns):
    r = arena.refcount(start)
    result, recs = run(arena, r.add_not_zero, i)
    assert result is ret
    assert r.read() == final
    check_warns(recs, warns)


DEC = [
    (0, SAT, ["DEC_LEAK"]),
    (1, SAT, ["DEC_LEAK"]),   # 1 -> 0 through dec() is a leak: nobody can free it
    (2, 1, []),
    (INT_MAX, INT_MAX - 1, []),
    (INT_MIN, SAT, ["DEC_LEAK"]),
    (SAT, SAT, ["DEC_LEAK"]),
    (NEG1, SAT, ["DEC_LEAK"]),
]


@pytest.mark.parametrize(("start", "final", "warns"), DEC)
def test_dec_to_zero_or_below_warns_dec_leak_and_saturates(arena, start, final, warns):
    r = arena.refcount(start)
    result, recs = run(arena, r.dec)
    assert result is None
    assert r.read() == final
    check_warns(recs, warns)


DEC_AND_TEST = [
    (0, False, SAT, ["SUB_UAF"]),
    (1, True, 0, []),
    (2, False, 1, []),
    (INT_MAX, False, INT_MAX - 1, []),
    (INT_MIN, False, SAT, ["SUB_UAF"]),
    (SAT, False, SAT, ["SUB_UAF"]),
    (NEG1, False, SAT, ["SUB_UAF"]),
]


@pytest.mark.parametrize(("start", "ret", "final", "warns"), DEC_AND_TEST)
def test_dec_and_test_is_true_only_from_one_and_underflow_saturates(
        arena, start, ret, final, warns):
    r = arena.refcount(start)
    result, recs = run(arena, r.dec_and_test)
    assert result is ret
    assert r.read() == final
    check_warns(recs, warns)


SUB_AND_TEST = [
    (0, 0, True, 0, []),       # v6.1 rule: true iff old == i, even 0 == 0, no WARN
    (0, 1, False, SAT, ["SUB_UAF"]),
    (5, 5, True, 0, []),
    (5, 3, False, 2, []),
    (5, 6, False, SAT, ["SUB_UAF"]),
    (1, -1, False, 2, []),
    (INT_MAX, INT_MAX, True, 0, []),
    (INT_MAX, -1, False, SAT, ["SUB_UAF"]),
    (SAT, 1, False, SAT, ["SUB_UAF"]),
    (SAT, SAT, True, 0, []),   # old == i (both INT_MIN/2): true even on a "bad" value
    (NEG1, NEG1, True, 0, []),
    (NEG1, 1, False, SAT, ["SUB_UAF"]),
]


@pytest.mark.parametrize(("start", "i", "ret", "final", "warns"), SUB_AND_TEST)
def test_sub_and_test_true_iff_old_equals_i_and_warns_sub_uaf_on_negative(
        arena, start, i, ret, final, warns):
    r = arena.refcount(start)
    result, recs = run(arena, r.sub_and_test, i)
    assert result is ret
    assert r.read() == final
    check_warns(recs, warns)


DEC_IF_ONE = [
    (0, False, 0),
    (1, True, 0),
    (2, False, 2),
    (INT_MAX, False, INT_MAX),
    (SAT, False, SAT),
    (NEG1, False, NEG1),
]


@pytest.mark.parametrize(("start", "ret", "final"), DEC_IF_ONE)
def test_dec_if_one_moves_only_one_to_zero_and_never_warns(arena, start, ret, final):
    r = arena.refcount(start)
    result, recs = run(arena, r.dec_if_one)
    assert result is ret
    assert r.read() == final
    assert recs == []


DEC_NOT_ONE = [
    (1, False, 1, []),
    (2, True, 1, []),
    (INT_MAX, True, INT_MAX - 1, []),
    (SAT, True, SAT, []),            # saturated: true, untouched, silent
    (INT_MIN, True, INT_MAX, []),    # other negatives are decremented (unsigned compare)
    (NEG1, True, NEG1 - 1, []),
]


@pytest.mark.parametrize(("start", "ret", "final", "warns"), DEC_NOT_ONE)
def test_dec_not_one_decrements_all_but_one_and_saturated(arena, start, ret, final, warns):
    r = arena.refcount(start)
    result, recs = run(arena, r.dec_not_one)
    assert result is ret
    assert r.read() == final
    check_warns(recs, warns)


def test_dec_not_one_on_zero_warns_underflow_returns_true_and_does_not_saturate(arena):
    r = arena.refcount(0, label="quirk")
    result, recs = run(arena, r.dec_not_one)
    assert result is True
    assert r.read() == 0  # v6.1 quirk: neither moved nor saturated
    check_warns(recs, ["SUB_UAF"])
    assert (recs[0].old, recs[0].new) == (0, 0)
    # and it keeps doing so: every call WARNs, the value never moves
    result, recs = run(arena, r.dec_not_one)
    assert result is True
    assert r.read() == 0
    check_warns(recs, ["SUB_UAF"])


def test_saturation_warn_records_old_and_saturated_new_value(arena):
    r = arena.refcount(INT_MAX)
    _, recs = run(arena, r.inc)
    assert (recs[0].old, recs[0].new) == (INT_MAX, -0x40000000)
    assert recs[0].object_kind == "refcount"
    assert (recs[0].object_index, recs[0].object_gen) == (r.index, r.gen)


def test_saturated_count_stays_saturated_under_any_further_op(arena):
    r = arena.refcount(SAT)
    for op in (r.inc, r.dec, r.dec_and_test, r.inc_not_zero, r.dec_if_one, r.dec_not_one,
               lambda: r.add(100), lambda: r.sub_and_test(100), lambda: r.add_not_zero(7)):
        op()
        assert r.read() == SAT


def test_warn_record_carries_caller_stack_label_and_pid(arena):
    r = arena.refcount(0, label="stacked-refcount")
    _, recs = run(arena, r.inc)
    (rec,) = recs
    assert rec.label == "stacked-refcount"
    assert rec.pid == os.getpid()
    assert os.path.basename(__file__) in rec.stack
    assert "test_warn_record_carries_caller_stack_label_and_pid" in rec.stack
    # the emulator's own frames are not the caller's
    assert "vfio_emu/refcount.py" not in rec.stack and "core/refcount.py" not in rec.stack
    text = str(rec)
    assert "refcount_t: addition on 0; use-after-free." in text
    assert "stacked-refcount" in text


def _helper_that_underflows(r):
    r.dec_and_test()


def test_warn_stack_names_the_innermost_caller_function(arena):
    r = arena.refcount(0)
    _, recs = run(arena, _helper_that_underflows, r)
    assert "_helper_that_underflows" in recs[0].stack
    assert "test_warn_stack_names_the_innermost_caller_function" in recs[0].stack


def test_every_misuse_is_recorded_not_just_the_first(arena):
    r = arena.refcount(0)
    seq = arena.warn_seq
    for _ in range(3):
        r.dec()
    assert [w.kind for w in arena.dmesg(since=seq)] == ["DEC_LEAK"] * 3


def test_set_is_a_plain_store_accepting_signed_or_unsigned(arena):
    r = arena.refcount(1)
    seq = arena.warn_seq
    for value, expected in ((0, 0), (-1, NEG1), (NEG1, NEG1), (-(1 << 31), INT_MIN),
                            (INT_MAX, INT_MAX), (SAT, SAT)):
        r.set(value)
        assert r.read() == expected
    assert arena.dmesg(since=seq) == []


@pytest.mark.parametrize("bad", [1 << 32, -(1 << 31) - 1, "1", 1.0, True, None])
def test_refcount_rejects_values_outside_32_bits_and_non_ints(arena, bad):
    r = arena.refcount(3)
    for op in (r.set, r.add, r.add_not_zero, r.sub_and_test):
        with pytest.raises(InvalidArgumentError):
            op(bad)
    assert r.read() == 3


# ---- kref -------------------------------------------------------------------------

class Releases:
    """A release callback that records every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, k):
        self.calls.append(k)


def test_kref_init_sets_one_and_get_put_move_by_one(arena):
    k = arena.kref()
    assert k.read() == 1
    k.get()
    assert k.read() == 2
    assert k.put() == 0
    assert k.read() == 1


def test_kref_init_resets_count_to_one(arena):
    k = arena.kref()
    k.get_many(4)
    k.init()
    assert k.read() == 1


def test_kref_put_of_last_reference_returns_one_and_runs_release_exactly_once(arena):
    rel = Releases()
    k = arena.kref(label="last")
    k.get()
    assert k.put(release=rel) == 0
    assert rel.calls == []
    assert k.put(release=rel) == 1
    assert rel.calls == [k]
    assert k.read() == 0


def test_kref_put_uses_default_release_unless_one_is_passed(arena):
    default, explicit = Releases(), Releases()
    k = arena.kref(release=default)
    assert k.put() == 1
    assert default.calls == [k]
    k2 = arena.kref(release=default)
    assert k2.put(release=explicit) == 1
    assert explicit.calls == [k2]
    assert default.calls == [k]


def test_kref_put_without_any_release_still_reports_the_last_put(arena):
    k = arena.kref()
    assert k.put() == 1
    assert k.read() == 0


def test_kref_get_unless_zero_on_zero_returns_zero_and_does_not_move(arena):
    k = arena.kref()
    assert k.put() == 1
    result, recs = run(arena, k.get_unless_zero)
    assert result == 0
    assert k.read() == 0
    assert recs == []


def test_kref_get_unless_zero_on_live_object_takes_a_reference(arena):
    k = arena.kref()
    assert k.get_unless_zero() == 1
    assert k.read() == 2


def test_kref_put_past_zero_warns_sub_uaf_saturates_and_does_not_release_again(arena):
    rel = Releases()
    k = arena.kref(label="gone", release=rel)
    assert k.put() == 1
    result, recs = run(arena, k.put)
    assert result == 0
    assert k.read() == SAT
    check_warns(recs, ["SUB_UAF"])
    assert recs[0].label == "gone"
    assert rel.calls == [k]


def test_kref_get_on_released_object_warns_add_uaf_and_saturates(arena):
    k = arena.kref()
    assert k.put() == 1
    _, recs = run(arena, k.get)
    check_warns(recs, ["ADD_UAF"])
    assert k.read() == SAT
    # a saturated kref never reaches zero again: put() can never release it
    rel = Releases()
    for _ in range(3):
        assert k.put(release=rel) == 0
    assert rel.calls == []
    assert k.read() == SAT


def test_kref_get_many_put_many_move_by_n(arena):
    rel = Releases()
    k = arena.kref(release=rel)
    k.get_many(5)
    assert k.read() == 6
    assert k.put_many(5) == 0
    assert k.read() == 1
    k.get_many(0)
    assert k.put_many(0) == 0
    assert k.read() == 1
    assert rel.calls == []
    assert k.put_many(1) == 1
    assert rel.calls == [k]


def test_kref_put_many_past_zero_releases_once_and_warns_underflow(arena):
    rel = Releases()
    k = arena.kref(release=rel)
    k.get()
    result, recs = run(arena, k.put_many, 3)  # 2 -> 1 -> 0 (release) -> underflow
    assert result == 1
    assert rel.calls == [k]
    assert k.read() == SAT
    check_warns(recs, ["SUB_UAF"])
    assert "test_kref_put_many_past_zero_releases_once_and_warns_underflow" in recs[0].stack


def test_kref_get_many_from_zero_warns_each_get_and_stamps_every_record(arena):
    k = arena.kref()
    assert k.put() == 1
    _, recs = run(arena, k.get_many, 3)
    check_warns(recs, ["ADD_UAF", "ADD_OVF", "ADD_OVF"])
    assert k.read() == SAT
    for rec in recs:
        assert "test_kref_get_many_from_zero_warns_each_get_and_stamps_every_record" in rec.stack


@pytest.mark.parametrize("bad", [-1, 1.5, "2", None])
def test_kref_get_many_put_many_reject_bad_counts(arena, bad):
    k = arena.kref()
    with pytest.raises(InvalidArgumentError):
        k.get_many(bad)
    with pytest.raises(InvalidArgumentError):
        k.put_many(bad)
    assert k.read() == 1


# ---- KrefArray ------------------------------------------------------------------------

def test_kref_array_get_and_put_move_every_kref_by_one(arena):
    ks = [arena.kref(label=f"k{i}") for i in range(4)]
    ks[1].get()
    arr = KrefArray(ks)
    assert len(arr) == 4
    arr.get()
    assert [k.read() for k in ks] == [2, 3, 2, 2]
    assert arr.put() == 0
    assert [k.read() for k in ks] == [1, 2, 1, 1]


def test_kref_array_put_releases_once_per_object_reaching_zero(arena):
    rel = Releases()
    ks = [arena.kref(label=f"k{i}") for i in range(4)]
    ks[1].get()
    arr = KrefArray(ks)
    assert arr.put(release=rel) == 3
    assert sorted(k.index for k in rel.calls) == sorted(ks[i].index for i in (0, 2, 3))
    assert [k.read() for k in ks] == [0, 1, 0, 0]
    assert arr.put(release=rel) == 1
    assert rel.calls[-1] == ks[1]
    assert len(rel.calls) == 4


def test_kref_array_put_uses_each_krefs_default_release(arena):
    rels = [Releases() for _ in range(3)]
    ks = [arena.kref(release=r) for r in rels]
    assert KrefArray(ks).put() == 3
    assert [r.calls for r in rels] == [[k] for k in ks]


def test_kref_array_with_a_zero_kref_warns_for_that_one_and_moves_the_others(arena):
    ks = [arena.kref(label=f"a{i}") for i in range(3)]
    assert ks[1].put() == 1
    seq = arena.warn_seq
    KrefArray(ks).get()
    recs = arena.dmesg(since=seq)
    check_warns(recs, ["ADD_UAF"])
    assert recs[0].label == "a1"
    assert "test_kref_array_with_a_zero_kref_warns" in recs[0].stack
    assert [k.read() for k in ks] == [2, SAT, 2]


def test_kref_array_with_stale_handle_raises_use_after_free_and_moves_nothing(arena):
    ks = [arena.kref(label=f"s{i}") for i in range(3)]
    arr = KrefArray(ks)
    ks[2].free()
    with pytest.raises(UseAfterFreeError) as exc:
        arr.get()
    assert "kref_get" in str(exc.value) and "'s2'" in str(exc.value)
    with pytest.raises(UseAfterFreeError) as exc:
        arr.put()
    assert "kref_put" in str(exc.value)
    assert [k.read() for k in ks[:2]] == [1, 1]


def test_kref_array_refuses_non_kref_members(arena):
    with pytest.raises(InvalidArgumentError):
        KrefArray([arena.kref(), arena.refcount(1)])


def test_kref_array_same_kref_twice_counts_twice_and_releases_once(arena):
    rel = Releases()
    k = arena.kref()
    k.get()
    assert KrefArray([k, k]).put(release=rel) == 1
    assert rel.calls == [k]
    assert k.read() == 0


# ---- batches and threads --------------------------------------------------------------------

def test_get_many_and_put_many_beyond_one_chunk_count_exactly(arena):
    from vfio_emu.shm.refcount import BATCH_CHUNK

    k = arena.kref()
    n = 2 * BATCH_CHUNK + 3
    k.get_many(n)
    assert k.read() == n + 1
    released = []
    assert k.put_many(n + 1, released.append) == 1
    assert released == [k] and k.read() == 0


def test_kref_array_shared_by_threads_releases_every_kref_exactly_once(make_arena):
    """Two threads put() the same KrefArray at once; counts alternate 1 and 2, so both
    calls reach zero somewhere, yet each kref is released exactly once (by one of them)."""
    import threading

    arena = make_arena(capacity=3000)
    for _ in range(5):
        krefs = [arena.kref() for _ in range(3000)]
        for k in krefs[1::2]:
            k.get()
        arr = KrefArray(krefs)
        released = []
        threads = [threading.Thread(target=arr.put, args=(released.append,)) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(k.index for k in released) == sorted(k.index for k in krefs)
        for k in krefs:
            k.free()


def test_kref_array_runs_every_release_even_when_one_raises(arena):
    krefs = [arena.kref() for _ in range(3)]
    seen = []

    def release(k):
        seen.append(k)
        if k is krefs[0]:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        KrefArray(krefs).put(release)
    assert seen == krefs


def test_kref_array_of_two_arenas_is_refused(arena, make_arena):
    with pytest.raises(InvalidArgumentError, match="one arena"):
        KrefArray([arena.kref(), make_arena(capacity=2).kref()])


def test_warns_racing_into_a_one_record_ring_are_kept_whole_or_dropped(make_arena):
    """Threads WARN into a ring of one record: every WARN is either logged whole (its own
    text and object) or counted as dropped, and Arena.warn() always returns its own."""
    import threading

    arena = make_arena(capacity=4, warn_capacity=1)
    r = arena.refcount(0, label="racer")
    errors = []

    def warner(tag):
        try:
            for i in range(2000):
                rec = arena.warn(f"{tag}-{i}")
                assert rec.text == f"{tag}-{i}" and rec.kind == "WARN"
        except BaseException as e:
            errors.append(e)

    def saturator():
        for _ in range(2000):
            r.inc()  # ADD_OVF from saturated: a refcount WARN each time

    threads = [threading.Thread(target=warner, args=(t,)) for t in "ab"]
    threads.append(threading.Thread(target=saturator))
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    for rec in arena.dmesg():
        if rec.kind == "WARN":
            assert rec.text.split("-")[0] in "ab" and rec.object_kind == ""
        else:
            assert rec.text == TEXT[rec.kind] and rec.label == "racer"


def test_kref_get_and_put_are_c_methods_bound_to_the_handle(arena):
    k = arena.kref()
    again = arena.open(k.token)  # made by the class, not in place: the same methods
    for kref in (k, again):
        assert inspect.isbuiltin(kref.get) and inspect.isbuiltin(kref.put)
    k.get()
    again.get()
    assert k.read() == 3
    assert k.put() == 0 and again.put() == 0 and k.put(release=None) == 1


def test_kref_put_refuses_what_a_python_put_would(arena):
    k = arena.kref()
    with pytest.raises(TypeError, match="unexpected keyword argument 'relase'"):
        k.put(relase=None)
    with pytest.raises(TypeError, match="at most one argument"):
        k.put(None, None)
    assert k.read() == 1  # nothing moved


def test_a_kref_goes_with_its_last_reference_no_collector_needed(arena):
    k = arena.kref()
    ref = weakref.ref(k)
    gc.disable()
    try:
        del k
        assert ref() is None  # no cycle through its C methods
    finally:
        gc.enable()


def test_a_kref_method_outliving_its_kref_says_so_on_its_slow_path(arena):
    k = arena.kref()
    put = k.put
    k.refcount.set(1)
    del k
    with pytest.raises(InvalidArgumentError, match="kref_put: the Kref this method was taken"):
        put()  # the last put: its release would need the kref
