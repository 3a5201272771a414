"""Several processes on the same arena (vfio_emu.shm): exact kref counts, exactly-once
release, killed holders, WARNs and allocations from other processes.

Children run the entry points of tests/_workers.py, under 'fork' and 'spawn'."""

from __future__ import annotations

import multiprocessing
import os
import signal

import pytest
from _workers import (
    BIG_TIMEOUT,
    alloc_free_churn,
    drop_one_reference_each,
    get_put_pairs,
    hold_references_and_hang,
    warn_in_child,
)

NPROC = 4


def run_children(ctx, target, args_per_child, start=None, timeout=120):
    """Start one process per args tuple, collect one queue result from each, join all.

    With start, children block on that completion until all are up, then
    complete_all() lets them go at once, so they really run at the same time.
    """
    q = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, q)) for args in args_per_child]
    for p in procs:
        p.start()
    if start is not None:
        start.complete_all()
    try:
        results = [q.get(timeout=timeout) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout)
            if p.is_alive():
                p.kill()
                p.join()
    assert [p.exitcode for p in procs] == [0] * len(procs)
    return results


@pytest.mark.parametrize(("method", "pairs"), [("fork", 20_000), ("spawn", 5_000)])
def test_concurrent_get_put_pairs_on_one_kref_end_at_start_value(arena, method, pairs):
    ctx = multiprocessing.get_context(method)
    k = arena.kref(label="shared")
    start = arena.completion()
    seq = arena.warn_seq
    released = run_children(ctx, get_put_pairs, [([k], start, pairs, 100)] * NPROC, start)
    assert released == [0] * NPROC  # the parent's reference kept every put() above zero
    assert k.read() == 1
    assert arena.dmesg(since=seq) == []


def test_concurrent_get_put_pairs_on_separate_krefs_end_at_start_value(arena):
    ctx = multiprocessing.get_context("fork")
    krefs = [arena.kref(label=f"own-{i}") for i in range(NPROC)]
    shared = arena.kref(label="shared")
    shared.get_many(9)  # start value 10
    start = arena.completion()
    seq = arena.warn_seq
    released = run_children(
        ctx, get_put_pairs, [([k, shared], start, 10_000, 50) for k in krefs], start)
    assert released == [0] * NPROC
    assert [k.read() for k in krefs] == [1] * NPROC
    assert shared.read() == 10
    assert arena.dmesg(since=seq) == []


@pytest.mark.parametrize(("method", "nkrefs"), [("fork", 25), ("spawn", 5)])
def test_last_put_across_processes_releases_exactly_once(make_arena, method, nkrefs):
    """NPROC processes each hold one reference to every kref and drop it at once:
    for every kref exactly one process sees put() == 1 and runs release."""
    arena = make_arena(capacity=2 * nkrefs + 1)
    ctx = multiprocessing.get_context(method)
    krefs = [arena.kref(label=f"race-{i}") for i in range(nkrefs)]
    releases = [arena.completion(label=f"released-{i}") for i in range(nkrefs)]
    for k in krefs:
        k.get_many(NPROC - 1)  # count == NPROC: one reference per child, none for us
    start = arena.completion()
    seq = arena.warn_seq
    results = run_children(ctx, drop_one_reference_each, [(krefs, releases, start)] * NPROC,
                           start)
    per_kref = [sum(r[i] for r in results) for i in range(nkrefs)]
    assert per_kref == [1] * nkrefs
    assert [c.done for c in releases] == [1] * nkrefs  # release ran exactly once each
    assert [k.read() for k in krefs] == [0] * nkrefs
    assert arena.dmesg(since=seq) == []


def test_child_killed_while_holding_references_leaves_arena_usable(arena):
    ctx = multiprocessing.get_context("fork")
    k = arena.kref(label="held-by-victim")
    ready = arena.completion()
    never = arena.completion(label="never-completed")
    before = arena.in_use
    p = ctx.Process(target=hold_references_and_hang, args=(k, 5, ready, never))
    p.start()
    try:
        assert ready.wait_for_completion_timeout(BIG_TIMEOUT) >= 1
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.join(60)
    assert p.exitcode == -signal.SIGKILL
    # The references the victim took are leaked, exactly.
    assert k.read() == 1 + 5
    assert arena.in_use == before
    # Allocation and free still work, in every slot that is free.
    objs = [arena.refcount(1) for _ in range(arena.capacity - before)]
    assert arena.in_use == arena.capacity
    for o in objs:
        o.free()
    assert arena.in_use == before
    # The completion the victim slept on still counts exactly.
    never.complete()
    assert never.try_wait_for_completion() is True
    assert never.try_wait_for_completion() is False
    # And the leaked references can be dropped by someone else.
    assert k.put_many(5) == 0
    assert k.put() == 1


def test_warn_from_another_process_is_in_the_shared_log_with_its_pid_and_stack(arena):
    ctx = multiprocessing.get_context("fork")
    r = arena.refcount(0, label="warned-in-child")
    seq = arena.warn_seq
    (child_pid,) = run_children(ctx, warn_in_child, [(r,)])
    (rec,) = arena.dmesg(since=seq)
    assert rec.kind == "ADD_UAF"
    assert rec.pid == child_pid != os.getpid()
    assert rec.label == "warned-in-child"
    assert "warn_in_child" in rec.stack
    assert r.read() == 0xC0000000


def test_concurrent_alloc_free_from_several_processes_keeps_the_free_list_intact(make_arena):
    arena = make_arena(capacity=16)
    ctx = multiprocessing.get_context("fork")
    start = arena.completion()
    bad = run_children(ctx, alloc_free_churn, [(arena, start, 2_000)] * NPROC, start)
    assert bad == [0] * NPROC
    assert arena.in_use == 1
    assert [o.kind for o in arena.objects()] == ["completion"]
    # Every other slot comes back exactly once.
    objs = [arena.refcount(1) for _ in range(arena.capacity - 1)]
    assert len({o.index for o in objs} | {start.index}) == arena.capacity
