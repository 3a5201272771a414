"""The emulated kernel's scheduler: tasks run one at a time and switch only at kernel
operations, waits block a task until what it waits for holds, emulated time passes only
when no task can run, and a deadlock is a hang report, never a hung test."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable
from typing import Any

import pytest
from _drivers import probe, remove

from vfio_emu.errors import EmulatorError, HangError
from vfio_emu.explore.strategy import RandomWalk, Replay, dfs
from vfio_emu.linux.kernel import Kernel
from vfio_emu.linux.mutex import Mutex
from vfio_emu.linux.sched import Decision, Scheduler
from vfio_emu.linux.slab import kfree
from vfio_emu.linux.vfio import vfio_unregister_group_dev


def run_tasks(kernel: Kernel, tasks: list[tuple[str, Callable[[], Any]]],
              policy: Any = None) -> Scheduler:
    sched = Scheduler(kernel, policy)
    for name, fn in tasks:
        sched.spawn(fn, name)
    sched.run()
    return sched


def test_one_task_runs_at_a_time_and_switches_only_at_kernel_operations(make_kernel):
    kernel = make_kernel()
    log: list[str] = []

    def task(name: str) -> Callable[[], None]:
        def body() -> None:
            for i in range(3):
                log.append(f"{name}{i}")
                log.append(f"{name}{i}")  # no switch point between the two: always a pair
                kernel.preempt("step")
        return body

    sched = run_tasks(kernel, [("a", task("a")), ("b", task("b"))],
                      RandomWalk(random.Random(1)))
    assert all(log[i] == log[i + 1] for i in range(0, len(log), 2))
    assert sorted(set(log)) == ["a0", "a1", "a2", "b0", "b1", "b2"]
    assert len(sched.picks) == len(sched.decisions) > 0


def test_without_a_policy_the_running_task_goes_on_until_it_ends(make_kernel):
    kernel = make_kernel()
    log: list[str] = []

    def task(name: str) -> Callable[[], None]:
        def body() -> None:
            for _ in range(3):
                log.append(name)
                kernel.preempt("step")
        return body

    run_tasks(kernel, [("a", task("a")), ("b", task("b"))])
    assert log == ["a", "a", "a", "b", "b", "b"]


def lost_update(kernel: Kernel, counter: list[int]) -> list[tuple[str, Callable[[], None]]]:
    """Two tasks increment a counter with a switch point between read and write."""
    def inc() -> None:
        value = counter[0]
        kernel.preempt("between the read and the write")
        counter[0] = value + 1
    return [("a", inc), ("b", inc)]


def interleaved(kernel: Kernel, log: list[str]) -> list[tuple[str, Callable[[], None]]]:
    """Fails only as a1 b1 a2 b2: two preemptions, whatever task starts."""
    def task(name: str) -> Callable[[], None]:
        def body() -> None:
            log.append(f"{name}1")
            kernel.preempt("step")
            log.append(f"{name}2")
        return body
    return [("a", task("a")), ("b", task("b"))]


def explore_dfs(make_kernel: Callable[..., Kernel], bound: int,
                program: Callable[[Kernel, list[Any]], list[tuple[str, Callable[[], None]]]],
                state: Callable[[], list[Any]]) -> list[list[Any]]:
    """Every schedule of the program with at most `bound` preemptions: the end states."""
    ends: list[list[Any]] = []

    def run(prefix: list[int]) -> tuple[list[Decision], list[int]]:
        kernel = make_kernel()
        shared = state()
        sched = run_tasks(kernel, program(kernel, shared), Replay(prefix=prefix))
        ends.append(shared)
        return sched.decisions, sched.picks

    for _ in dfs(run, bound):
        pass
    return ends


def test_a_race_that_needs_exactly_one_preemption_is_found_with_one_and_not_with_none(
        make_kernel):
    ends0 = explore_dfs(make_kernel, 0, lost_update, lambda: [0])
    ends1 = explore_dfs(make_kernel, 1, lost_update, lambda: [0])
    assert all(c == [2] for c in ends0)
    assert [1] in ends1  # the lost update


def test_a_race_that_needs_exactly_two_preemptions_is_found_with_two_and_not_with_one(
        make_kernel):
    ends1 = explore_dfs(make_kernel, 1, interleaved, list)
    ends2 = explore_dfs(make_kernel, 2, interleaved, list)
    bad = ["a1", "b1", "a2", "b2"]
    assert bad not in ends1
    assert bad in ends2


def steps_program(sizes: tuple[int, ...]) -> Callable[[Kernel, list[Any]],
                                                      list[tuple[str, Callable[[], None]]]]:
    """Task i takes sizes[i] steps with a switch point between each two (none before the
    first or after the last): so each schedule is exactly one order of the steps."""
    def program(kernel: Kernel, log: list[Any]) -> list[tuple[str, Callable[[], None]]]:
        def task(tid: int) -> Callable[[], None]:
            def body() -> None:
                for i in range(sizes[tid]):
                    if i:
                        kernel.preempt("step")
                    log.append(tid)
            return body
        return [(f"t{t}", task(t)) for t in range(len(sizes))]
    return program


def orders_within(sizes: tuple[int, ...], bound: int) -> set[tuple[int, ...]]:
    """By brute force: every order of the steps with at most `bound` preemptions (a switch
    away from a task that still has steps left)."""
    steps = [t for t, n in enumerate(sizes) for _ in range(n)]
    found = set()
    for order in set(itertools.permutations(steps)):
        left = list(sizes)
        preemptions = 0
        for prev, nxt in itertools.pairwise(order):
            left[prev] -= 1
            if nxt != prev and left[prev] > 0:
                preemptions += 1
        if preemptions <= bound:
            found.add(order)
    return found


@pytest.mark.parametrize(("sizes", "bound"), [((2, 2), 0), ((2, 2), 1), ((3, 2), 2),
                                              ((3, 3), 1), ((2, 2, 2), 2), ((3, 3), 5)])
def test_dfs_with_bound_k_visits_every_schedule_with_at_most_k_preemptions_once(
        make_kernel, sizes, bound):
    ends = explore_dfs(make_kernel, bound, steps_program(sizes), list)
    expected = orders_within(sizes, bound)
    assert len(ends) == len(expected)  # each once
    assert {tuple(e) for e in ends} == expected


def test_dfs_without_a_real_bound_visits_every_interleaving(make_kernel):
    ends = explore_dfs(make_kernel, 99, steps_program((3, 3)), list)
    assert len(ends) == math.comb(6, 3) == 20


def test_a_blocked_task_sleeps_until_what_it_waits_for_holds(make_kernel):
    kernel = make_kernel()
    comp = kernel.arena.completion()
    log: list[str] = []

    def waiter() -> None:
        kernel.wait_for_completion(comp, "comp")
        log.append("woken")

    def completer() -> None:
        log.append("completing")
        comp.complete()

    run_tasks(kernel, [("waiter", waiter), ("completer", completer)])
    assert log == ["completing", "woken"]
    assert kernel.jiffies() == 0  # nobody slept: no time passed
    comp.free()


def test_emulated_time_passes_only_when_no_task_can_run(make_kernel):
    kernel = make_kernel()
    seen: list[tuple[str, int]] = []

    def sleeper() -> None:
        kernel.advance(kernel.HZ * 5)
        seen.append(("sleeper", kernel.jiffies()))

    def busy() -> None:
        for _ in range(3):
            kernel.preempt("step")
        seen.append(("busy", kernel.jiffies()))

    run_tasks(kernel, [("sleeper", sleeper), ("busy", busy)])
    assert seen == [("busy", 0), ("sleeper", kernel.HZ * 5)]


def test_a_wait_nobody_can_end_is_the_watchdog_s_hang_report(make_kernel):
    kernel = make_kernel(watchdog_s=30)
    comp = kernel.arena.completion()
    sched = run_tasks(kernel, [("waiter", lambda: kernel.wait_for_completion(comp, "comp"))])
    assert isinstance(sched.tasks[0].error, HangError)
    detail = sched.tasks[0].error.report.detail
    assert "wait_for_completion(comp): nobody has completed it" in detail
    assert kernel.jiffies() == kernel.HZ * 30
    comp.free()


def test_an_abba_deadlock_needs_one_preemption_and_is_a_hang_report_naming_both_tasks(
        make_kernel):
    def program(kernel: Kernel, out: list[Any]) -> list[tuple[str, Callable[[], None]]]:
        a, b = Mutex(kernel, "A"), Mutex(kernel, "B")

        def ab() -> None:
            with a, b:
                pass

        def ba() -> None:
            with b, a:
                pass
        out.append(kernel)
        return [("ab", ab), ("ba", ba)]

    def hangs(kernels: list[list[Any]]) -> list[str]:
        return [r.detail for (k,) in kernels for r in k.reports if r.kind == "hang"]

    assert hangs(explore_dfs(make_kernel, 0, program, list)) == []
    found = hangs(explore_dfs(make_kernel, 1, program, list))
    assert found and "ab: mutex_lock(B)" in found[0] and "ba: mutex_lock(A)" in found[0]


def test_an_idle_task_waiting_for_events_is_cancelled_not_hung(make_kernel):
    kernel = make_kernel()
    events = [0]
    log: list[str] = []

    def listener() -> None:
        sched = kernel.sched
        assert sched is not None
        while True:
            seen = events[0]
            sched.block(lambda seen=seen: events[0] > seen, "waits for an event", idle=True)
            log.append("event")

    def producer() -> None:
        events[0] += 1
        kernel.preempt("sent")

    sched = run_tasks(kernel, [("listener", listener), ("producer", producer)])
    assert log == ["event"]
    assert [t.error for t in sched.tasks] == [None, None]
    assert not [r for r in kernel.reports if r.kind == "hang"]


def test_delayed_releases_are_tasks_of_their_own_under_a_scheduler(make_kernel):
    kernel = make_kernel(delayed_release=True)
    vdev, ops = probe(kernel)

    sched = run_tasks(kernel, [("remove", lambda: remove(vdev))])
    assert [t.name for t in sched.tasks] == ["remove", "kworker: vfio0 release"]
    assert sched.tasks[1].work
    assert ops.calls[-1] == "release"
    released = [e.task for e in kernel.trace.events if e.op == "vfio_device_release"]
    assert released == ["kworker: vfio0 release"]


def test_a_livelock_ends_in_a_report_not_a_hung_test(make_kernel):
    kernel = make_kernel()

    def spin() -> None:
        while True:
            kernel.preempt("spin")

    sched = Scheduler(kernel, max_steps=500)
    sched.spawn(spin, "spinner")
    sched.run()
    assert isinstance(sched.tasks[0].error, HangError)
    assert "livelock" in sched.hang.title


def test_a_loop_of_timed_waits_is_a_livelock_too(make_kernel):
    kernel = make_kernel()

    def poll() -> None:
        while True:
            kernel.advance(1)  # each wait times out at once: time moves, nothing happens

    sched = Scheduler(kernel, max_steps=500)
    sched.spawn(poll, "poller")
    sched.run()
    assert isinstance(sched.tasks[0].error, HangError)
    assert sched.hang is not None and "livelock" in sched.hang.title


def test_a_policy_that_picks_a_task_that_cannot_run_ends_the_run_and_run_raises(make_kernel):
    kernel = make_kernel()

    class Wrong:
        def choose(self, decision: Decision) -> int:
            return 7

    with pytest.raises(EmulatorError, match="the policy chose task 7, not one of"):
        run_tasks(kernel, [("a", lambda: kernel.preempt("x")),
                           ("b", lambda: kernel.preempt("x"))], Wrong())
    assert kernel.sched is None


def test_only_a_task_can_block_and_a_kernel_runs_one_scheduler_at_a_time(make_kernel):
    kernel = make_kernel()
    sched = Scheduler(kernel)
    with pytest.raises(EmulatorError, match="only a task"):
        sched.block(lambda: False, "outside")
    inner: list[BaseException] = []

    def nested() -> None:
        try:
            Scheduler(kernel).run()
        except EmulatorError as e:
            inner.append(e)
    sched.spawn(nested, "nested")
    sched.run()
    assert inner and "already runs a scheduler" in str(inner[0])
    assert kernel.sched is None


def test_outside_a_scheduler_the_last_put_releases_on_the_caller_as_before(make_kernel):
    kernel = make_kernel()
    vdev, ops = probe(kernel)
    remove(vdev)
    assert ops.calls[-1] == "release"
    assert ops.release_threads == ["MainThread"]
    assert kernel.sched is None


def test_kfree_is_atomic_no_task_sees_a_struct_half_freed(make_kernel):
    kernel = make_kernel()
    victim, _ = probe(kernel)
    vfio_unregister_group_dev(victim)
    sched = run_tasks(kernel, [("free", lambda: kfree(victim)),
                               ("other", lambda: kernel.preempt("step"))])
    ops = [d.op for d in sched.decisions]
    assert "kfree" not in ops  # the trace record inside the free is no switch point
    assert any(op.startswith("kfree Priv@") for op in ops)  # after it, there is one


def test_ctrl_c_while_the_scheduler_waits_interrupts_run(make_kernel):
    import os
    import signal
    import threading

    kernel = make_kernel()
    never = threading.Event()

    def stuck() -> None:  # a driver blocking on what the kernel cannot see
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: its handler runs in run()'s thread
        never.wait()

    sched = Scheduler(kernel)
    sched.spawn(stuck, "stuck")
    with pytest.raises(KeyboardInterrupt):
        sched.run()
    assert kernel.sched is None and kernel.trace.sched is None
    never.set()


def test_a_task_whose_wait_times_out_with_others_is_no_current_task_of_that_pick(make_kernel):
    kernel = make_kernel()
    sched = run_tasks(kernel, [("a", lambda: kernel.advance(5)),
                               ("b", lambda: kernel.advance(5))])
    both = [d for d in sched.decisions if d.enabled == (0, 1)]
    assert both and both[-1].current is None  # b blocked: picking a is no preemption
