"""`vfio-emu explore`: each race a driver can lose is found without a sleep or a tuned delay,
printed as a schedule that replays it exactly, shrunk to its fewest preemptions - and each
fixed twin survives every schedule with up to two preemptions."""

from __future__ import annotations

import ctypes
import os
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from _drivers import Buf, GenericBusDriver, free_if_v61

from vfio_emu.check import FAIL, KNOWN, OK, Mode
from vfio_emu.errors import InvalidArgumentError
from vfio_emu.explore import (
    RACES,
    Race,
    Schedule,
    ScheduleMismatch,
    explore,
    explorer,
    model_id,
    replay,
    run_race,
)
from vfio_emu.linux.errno import ENODEV, ENOMEM
from vfio_emu.linux.kernel import Kernel
from vfio_emu.linux.slab import kfree, kzalloc
from vfio_emu.linux.vfio import (
    VfioDevice,
    memset_vfio_device,
    vfio_init_device,
    vfio_put_device,
    vfio_register_group_dev,
    vfio_unregister_group_dev,
)
from vfio_emu.plugins.hookspecs import hookimpl
from vfio_emu.plugins.manager import Driver, Plugins

V61 = Mode("v6.1")
UNLINK_FIRST = Mode("v6.1", unregister_order="unlink-first")


def driver_of(plugin: object) -> Driver:
    p = Plugins(builtins=(), load_entrypoints=False)
    p.register(plugin, "under-test")
    return p.driver("under-test")


def masked(lines: list[str]) -> list[str]:
    """Findings without what differs between processes: pids and addresses."""
    return [re.sub(r"python:\d+|0x[0-9a-f]+", "…", line) for line in lines]


def builtin(name: str) -> Driver:
    return Plugins(load_entrypoints=False).driver(name)


# -- a close racing a remove -------------------------------------------------------------------

class ClosesIntoFreedRegions(GenericBusDriver):
    """Its remove frees the regions before it unregisters: a close that comes after the
    free writes them (the race: a close that comes first is fine)."""

    @hookimpl
    def init(self, vdev: Any) -> int:
        regions = kzalloc(vdev.dev.kernel, Buf)
        if regions is None:
            return -ENOMEM
        vdev.regions = regions
        return 0

    @hookimpl
    def close_device(self, vdev: Any) -> None:
        vdev.regions.closed = True  # the last close resets the regions

    @hookimpl
    def release(self, vdev: Any) -> None:
        free_if_v61(vdev.dev.kernel, vdev)

    @hookimpl
    def remove(self, kernel: Kernel, driver: Any, dev: Any) -> None:
        vdev = dev.drvdata
        kfree(vdev.regions)  # BUG: userspace may still have the device open
        vfio_unregister_group_dev(vdev)
        vfio_put_device(vdev)


class FreesRegionsAfterUnregister(ClosesIntoFreedRegions):
    """The fixed twin: unregister waits for the last close; only then the free."""

    @hookimpl
    def remove(self, kernel: Kernel, driver: Any, dev: Any) -> None:
        vdev = dev.drvdata
        vfio_unregister_group_dev(vdev)
        kfree(vdev.regions)
        vfio_put_device(vdev)


def test_a_close_racing_a_remove_that_frees_too_early_is_found_and_replays():
    driver = driver_of(ClosesIntoFreedRegions())
    r = explore(driver, "close vs remove", V61, strategy="random", budget=20)
    assert [o.verdict.status for o in r.failures] == [FAIL]
    found = r.failures[0]
    assert "use-after-free in write of Buf.closed" in found.verdict.findings[0]
    assert found.verdict.where.endswith("vdev.regions.closed = True  # the last close resets "
                                        "the regions")
    again = replay(driver, RACES["close vs remove"], V61, str(found.schedule))
    assert masked(again.verdict.findings) == masked(found.verdict.findings)
    assert again.verdict.timeline == found.verdict.timeline


def test_the_race_is_lost_only_in_some_schedules():
    driver = driver_of(ClosesIntoFreedRegions())
    r = explore(driver, "close vs remove", V61, strategy="dfs", bound=2)
    assert r.exhausted and r.runs > 1
    # the close first: the remove frees what nobody touches any more
    close_first = run_race(driver, RACES["close vs remove"], V61,
                           policy=_first_pick(1))
    assert close_first.verdict.status == OK


def _first_pick(tid: int) -> Any:
    from vfio_emu.explore import Replay
    return Replay({0: tid})


def test_the_fixed_twin_of_the_close_race_survives_every_schedule_with_two_preemptions():
    r = explore(driver_of(FreesRegionsAfterUnregister()), "close vs remove", V61,
                strategy="dfs", bound=2)
    assert r.exhausted and r.passed and not r.known
    assert r.runs > 10


def test_a_failure_is_shrunk_to_the_fewest_non_default_picks_that_still_fail():
    driver = driver_of(ClosesIntoFreedRegions())
    r = explore(driver, "close vs remove", V61, strategy="random", budget=30, seed=3)
    assert r.failures[0].schedule.picks == ()  # the default schedule already loses it
    assert r.failures[0].preemptions == 0


# -- the v6.1 re-open endless wait (bug class 13) ------------------------------------------

def test_the_v61_reopen_endless_wait_is_found_and_replays_from_its_schedule():
    pci = builtin("pci")
    r = explore(pci, "reopen on request", V61, strategy="random", budget=3)
    assert not r.failures
    [found] = r.known
    v = found.verdict
    assert v.status == KNOWN and "bug class 13" in v.note
    assert v.reports[0].kind == "hang"
    assert "waits for the registration count to reach 0; it is 1" in v.reports[0].detail
    again = replay(pci, RACES["reopen on request"], V61, found.schedule)
    assert masked(again.verdict.findings) == masked(v.findings)
    assert again.verdict.timeline == v.timeline
    assert sum("ops->request" in line for line in v.timeline) == 6  # every 10 s, for 60 s


def test_unlinking_first_survives_every_schedule_with_two_preemptions():
    r = explore(builtin("pci"), "reopen on request", UNLINK_FIRST, strategy="dfs", bound=2)
    assert r.exhausted and r.passed and not r.known


def test_a_driver_without_a_request_op_is_told_by_its_declared_finding():
    r = explore(builtin("mtty"), "reopen on request", UNLINK_FIRST, budget=2)
    assert not r.failures
    assert r.known[0].verdict.error.endswith("the driver has no request op to ask it")


# -- the ccw v6.1 probe-error race under delayed release -------------------------------------

class CcwPrivate(VfioDevice):
    """vfio-ccw's v6.1 private: embeds the vfio_device and outlives it."""

    def _kzalloc(self, kernel: Kernel) -> None:
        super()._kzalloc(kernel)
        self.release_comp = kernel.arena.completion(label="release_comp")

    def _kfree(self) -> None:
        self.release_comp.free()
        super()._kfree()


class CcwProbeErrorPutsWithoutWaiting:
    """vfio_ccw_mdev_probe's v6.1 error path: it puts the vfio_device and frees the private
    at once, while the release (delayed) is still to come."""

    wait_on_error = False

    @hookimpl
    def probe(self, kernel: Kernel, driver: Any, dev: Any) -> int:
        """Its devices come only from check_bind (the css probe and the mdev create)."""
        return -ENODEV

    @hookimpl
    def init(self, vdev: Any) -> int:
        vdev.release_comp.init()
        return 0

    @hookimpl
    def release(self, vdev: Any) -> None:
        memset_vfio_device(vdev)
        vdev.release_comp.complete()

    @hookimpl
    def check_bind(self, kernel: Kernel, driver: Any, name: str) -> Any:
        private = kzalloc(kernel, CcwPrivate)
        if private is None:
            return -ENOMEM
        ret = vfio_init_device(private, kernel.device(name), driver.ops)
        if ret:
            kfree(private)
            return ret
        ret = vfio_register_group_dev(private)
        if ret:
            vfio_put_device(private)
            if self.wait_on_error:
                kernel.wait_for_completion(private.release_comp, "release_comp")
            kfree(private)  # the css remove
            return ret
        return private

    @hookimpl
    def check_unbind(self, kernel: Kernel, driver: Any, dev: Any) -> int:
        vfio_unregister_group_dev(dev)
        vfio_put_device(dev)
        kernel.wait_for_completion(dev.release_comp, "release_comp")
        kfree(dev)
        return 0


class CcwProbeErrorWaits(CcwProbeErrorPutsWithoutWaiting):
    """The fixed twin: the error path waits on release_comp as the remove path does."""

    wait_on_error = True


def test_the_ccw_v61_probe_error_race_under_delayed_release_is_found_and_replays():
    driver = driver_of(CcwProbeErrorPutsWithoutWaiting())
    race = RACES["failed bind, then bind"]
    r = explore(driver, race, V61, strategy="random", budget=20)
    # without a preemption the release comes after the free; other schedules lose it
    # elsewhere (the memset of the re-initialized vdev, its counters)
    default = run_race(driver, race, V61)
    assert default.verdict.findings[0].endswith("use-after-free in vfio_device_release")
    assert r.failures and all("use-after-free" in o.verdict.findings[0] for o in r.failures)
    found = r.failures[0]
    assert "kworker: vfio0 release" in found.tasks
    again = replay(driver, race, V61, str(found.schedule))
    assert masked(again.verdict.findings) == masked(found.verdict.findings)
    assert again.verdict.timeline == found.verdict.timeline


def test_the_fixed_twin_of_the_ccw_probe_error_path_survives_every_schedule_with_two_preemptions():
    r = explore(driver_of(CcwProbeErrorWaits()), "failed bind, then bind", V61, strategy="dfs",
                bound=2)
    assert r.exhausted and r.passed and not r.known
    assert r.runs >= 3  # the release before, and after, each step the error path takes


def test_the_builtin_ccw_shows_its_declared_v61_probe_error_finding():
    ccw = builtin("ccw")
    default = run_race(ccw, RACES["failed bind, then bind"], V61)
    assert default.verdict.status == KNOWN
    assert default.verdict.findings[0].endswith("use-after-free in vfio_device_release")
    assert "error path puts without waiting on release_comp" in default.verdict.note
    r = explore(ccw, "failed bind, then bind", V61, budget=5)
    assert not r.failures and r.known  # other schedules: other reads of the freed memory


# -- the strategies on a race of known depth --------------------------------------------------

def two_preemptions(driver: Driver, kernel: Kernel) -> list[tuple[str, Any]]:
    """Lost only as a1 b1 a2 b2: two preemptions."""
    log: list[str] = []

    def task(name: str) -> Any:
        def body() -> None:
            log.append(f"{name}1")
            kernel.preempt("step")
            log.append(f"{name}2")
            if log == ["a1", "b1", "a2", "b2"]:
                raise AssertionError("interleaved")
        return body
    return [("a", task("a")), ("b", task("b"))]


DEPTH2 = Race("two preemptions", two_preemptions)


@pytest.mark.parametrize("strategy", ["random", "pct", "dfs"])
def test_every_strategy_finds_a_race_that_needs_two_preemptions(strategy):
    r = explore(driver_of(GenericBusDriver()), DEPTH2, V61, strategy=strategy, budget=100)
    [found] = r.failures
    assert "AssertionError" in found.verdict.error
    assert found.preemptions == 2  # it cannot be shrunk below two


def test_dfs_with_one_preemption_does_not_find_it():
    r = explore(driver_of(GenericBusDriver()), DEPTH2, V61, strategy="dfs", bound=1)
    assert r.exhausted and r.passed


def test_the_same_seed_runs_the_same_schedules_whatever_the_number_of_workers():
    driver = driver_of(GenericBusDriver())
    one = explore(driver, DEPTH2, V61, strategy="random", budget=40, seed=5, jobs=1)
    two = explore(driver, DEPTH2, V61, strategy="random", budget=40, seed=5, jobs=2)
    assert one.runs == two.runs == 40
    assert one.states == two.states
    assert [str(o.schedule) for o in one.failures] == [str(o.schedule) for o in two.failures]


def test_dfs_on_two_workers_covers_the_same_schedules_as_on_one():
    driver = driver_of(GenericBusDriver())
    one = explore(driver, DEPTH2, V61, strategy="dfs", bound=2)
    two = explore(driver, DEPTH2, V61, strategy="dfs", bound=2, jobs=2)
    assert one.exhausted and two.exhausted
    assert one.runs == two.runs and one.states == two.states


# -- schedules ----------------------------------------------------------------------------------

def test_a_schedule_string_round_trips_and_refuses_another_model():
    s = Schedule(7, ((3, 1), (12, 0)))
    assert str(s) == f"{model_id()}:7:3=1,12=0"
    assert Schedule.parse(str(s)) == s
    with pytest.raises(InvalidArgumentError, match=r"made by vfio-emu 0\.0\.1\+deadbeef"):
        Schedule.parse("0.0.1+deadbeef:7:3=1")
    for bad in ("", "nonsense", f"{model_id()}:x:", f"{model_id()}:0:5=1,2=0"):
        with pytest.raises(InvalidArgumentError):
            Schedule.parse(bad)


def test_a_schedule_that_does_not_fit_the_run_is_refused():
    driver = driver_of(GenericBusDriver())
    with pytest.raises(ScheduleMismatch, match="picks task 9 at decision 0"):
        replay(driver, DEPTH2, V61, Schedule(0, ((0, 9),)))


# -- never a crash ------------------------------------------------------------------------------

class CrashesOnClose(FreesRegionsAfterUnregister):
    @hookimpl
    def close_device(self, vdev: Any) -> None:
        ctypes.string_at(0)  # BUG: the driver's C code dereferences NULL


def _orphans() -> set[str]:
    """Arena segments whose creator is dead (other processes' live ones do not count)."""
    def dead(name: str) -> bool:
        try:
            os.kill(int(name.split("-")[2]), 0)
        except ProcessLookupError:
            return True
        except (ValueError, IndexError, PermissionError):
            return False
        return False
    return {n for n in os.listdir("/dev/shm") if n.startswith("vfio-emu-") and dead(n)}


def test_a_driver_that_crashes_the_interpreter_costs_a_worker_not_the_explorer():
    before = _orphans()
    r = explore(driver_of(CrashesOnClose()), "close vs remove", V61, budget=3)
    assert not r.passed
    assert r.errors[0].startswith("a worker died")  # of SIGSEGV; under ASan, its exit status
    assert _orphans() <= before  # the dead worker's arena is unlinked for it


def test_workers_stopped_at_the_budget_leave_no_arena_behind():
    before = _orphans()
    r = explore(driver_of(FreesRegionsAfterUnregister()), "close vs remove", V61,
                strategy="dfs", budget=3, jobs=2)
    assert r.runs >= 3 and not r.exhausted
    assert _orphans() <= before


def test_a_race_that_does_not_apply_is_not_applicable():
    r = explore(driver_of(FreesRegionsAfterUnregister()), "unload vs close", V61, budget=3)
    assert r.not_applicable.startswith("its devices are not mdevs")
    assert r.runs == 0


def test_bad_arguments_are_refused_by_name():
    driver = driver_of(GenericBusDriver())
    with pytest.raises(InvalidArgumentError, match="no concurrent scenario 'nope'"):
        explore(driver, "nope")
    with pytest.raises(InvalidArgumentError, match="strategy='bfs'"):
        explore(driver, DEPTH2, strategy="bfs")
    with pytest.raises(InvalidArgumentError, match="jobs=0"):
        explore(driver, DEPTH2, jobs=0)
    with pytest.raises(InvalidArgumentError, match="time_s=-1"):
        explore(driver, DEPTH2, time_s=-1)


def test_every_builtin_driver_gets_through_every_race_in_both_orders_without_a_new_failure():
    for name in ("ap", "ccw", "mtty", "pci"):
        for mode in (V61, UNLINK_FIRST):
            for race in RACES:
                r = explore(builtin(name), race, mode, budget=4)
                assert r.passed, (name, race, mode, [o.verdict.findings for o in r.failures])
                assert all(o.verdict.status == KNOWN for o in r.known)
                if r.not_applicable:
                    assert r.runs == 0





def test_the_python_example_in_docs_explore_md_runs():
    text = (Path(__file__).parents[2] / "docs" / "explore.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(code, "docs/explore.md", "exec"), {})


def test_a_budget_reached_at_a_failing_schedule_still_counts_its_failure():
    driver = driver_of(ClosesIntoFreedRegions())  # its first schedule fails
    for jobs in (1, 2):
        r = explore(driver, "close vs remove", V61, strategy="dfs", budget=1, jobs=jobs)
        assert r.runs == 1
        assert len(r.failures) == 1 and not r.passed


def test_a_schedule_with_picks_past_the_run_s_last_decision_is_refused():
    driver = driver_of(FreesRegionsAfterUnregister())
    with pytest.raises(ScheduleMismatch, match=r"only \d+ decisions"):
        replay(driver, RACES["close vs remove"], V61, Schedule(0, ((99999, 1),)))


def test_runs_in_one_process_share_an_arena_until_it_is_half_full():
    arena = explorer._arena()
    assert explorer._arena() is arena
    leaked = [arena.refcount() for _ in range(arena.capacity // 2 + 1)]  # noqa: F841
    fresh = explorer._arena()
    assert fresh is not arena and arena.closed and fresh.in_use == 0


def test_a_run_on_the_shared_arena_sees_none_of_an_earlier_runs_warns():
    explorer._arena().refcount(0).inc()  # a WARN already in the arena
    out = run_race(builtin("pci"), RACES["close vs remove"], V61)
    assert out.verdict.status == OK and out.verdict.reports == []


def test_two_threads_runs_never_share_an_arena():
    import threading
    names = []
    thread = threading.Thread(target=lambda: names.append(explorer._arena().name))
    thread.start()
    thread.join()
    assert names and names[0] != explorer._arena().name


_PLAIN = threading.Lock()


class HoldsAPlainLockAcrossUnregister(ClosesIntoFreedRegions):
    """Its remove holds a threading.Lock across the unregister wait, which its close needs:
    a deadlock the emulated kernel cannot see (the tasks share one thread)."""

    @hookimpl
    def close_device(self, vdev: Any) -> None:
        with _PLAIN:
            pass

    @hookimpl
    def remove(self, kernel: Kernel, driver: Any, dev: Any) -> None:
        vdev = dev.drvdata
        with _PLAIN:
            vfio_unregister_group_dev(vdev)
        kfree(vdev.regions)
        vfio_put_device(vdev)


def test_a_run_that_blocks_the_thread_is_an_error_with_the_stacks_not_a_hung_explorer(
        monkeypatch):
    monkeypatch.setattr(explorer, "BUDGET_S", 1)  # real seconds: it never ends by itself
    r = explore(driver_of(HoldsAPlainLockAcrossUnregister()), "close vs remove", V61,
                budget=5)
    assert r.errors and "did not finish in 1 s (real time)" in r.errors[0]
    assert "plain lock" in r.errors[0] and "in close_device" in r.errors[0]
    assert not _orphans()


def test_a_killed_explorer_leaves_no_arena_of_its_workers_behind():
    """The workers' arenas are theirs: unlinked as each worker exits, even when the parent
    that would have cleaned up after them is gone (they exit at their next message)."""
    child = os.fork()
    if child == 0:  # a parent of workers, killed while they run
        try:
            explore(builtin("pci"), "reopen on request", V61, budget=100_000, jobs=2)
        finally:
            os._exit(0)
    workers = _polled(lambda: _arenas_of_children_of(child), lambda found: len(found) == 2)
    os.kill(child, signal.SIGKILL)
    os.waitpid(child, 0)
    left = _polled(lambda: workers & set(os.listdir("/dev/shm")), lambda found: not found)
    assert len(workers) == 2 and not left


def _polled(read: Any, done: Any, tries: int = 200) -> Any:
    """read() until done(it) (bounded: a condition, not a timing, is awaited)."""
    for _ in range(tries):
        got = read()
        if done(got):
            break
        time.sleep(0.05)
    return got


def _arenas_of_children_of(pid: int) -> set[str]:
    return {n for n in os.listdir("/dev/shm")
            if n.startswith("vfio-emu-") and _parent_of(int(n.split("-")[2])) == pid}


def _parent_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def test_a_forked_worker_makes_an_arena_of_its_own():
    parent = explorer._arena().name
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its arena's name, then leave without cleanup hooks
        try:
            os.write(write, explorer._arena().name.encode())
            explorer._arena().close()
        finally:
            os._exit(0)
    os.close(write)
    child = os.read(read, 200).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert child and child != parent and not explorer._arena().closed
