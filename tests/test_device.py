"""The vfio device life cycle and the bug classes a driver can commit, KUnit/lkdtm style.

Every correct sequence must end with no report, no leak and no WARN, under
both semantics; every buggy sequence must produce the report that names its
bug.  Test names read as the behaviour they pin; "cNN" names the bug class
(docs/lifecycle.md lists them).

Waits never depend on timing: unregister is unblocked from inside ->request
(as userspace reacts to the request eventfd) or by a threading.Timer armed
there, and its watchdog bounds the hangs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
from _drivers import (
    Buf,
    CcwOps,
    CcwPrivate,
    Driver,
    MdevVfioDriver,
    MttyLikeDriver,
    NoReleaseDriver,
    Priv,
    is_freed,
    probe,
    remove,
)

from vfio_emu import REFCOUNT_SATURATED
from vfio_emu.errors import (
    EmulatorError,
    HangError,
    InvalidArgumentError,
    KernelOops,
    UseAfterFreeError,
)
from vfio_emu.linux.device import (
    StructDevice,
    dev_set_name,
    device_add,
    device_initialize,
    device_register,
    device_unregister,
)
from vfio_emu.linux.device import put_device as put_device_struct
from vfio_emu.linux.errno import EBUSY, EINVAL, ENODEV, ENOMEM, EUSERS
from vfio_emu.linux.kernel import Kernel
from vfio_emu.linux.mdev import (
    MdevParent,
    mdev_device_create,
    mdev_device_remove,
    mdev_get_device,
    mdev_put_device,
    mdev_register_parent,
    mdev_unregister_parent,
)
from vfio_emu.linux.slab import kfree, kvfree, kzalloc
from vfio_emu.linux.vfio import (
    DeviceFile,
    State,
    core_of,
    get_device,
    put_device,
    vfio_alloc_device,
    vfio_assign_device_set,
    vfio_device_put_registration,
    vfio_device_set_open_count,
    vfio_device_try_get_registration,
    vfio_free_device,
    vfio_group_get_device_fd,
    vfio_init_device,
    vfio_put_device,
    vfio_register_emulated_iommu_dev,
    vfio_register_group_dev,
    vfio_unregister_group_dev,
)
from vfio_emu.report import Report

BOTH = pytest.mark.parametrize("semantics", ["v6.1", "v6.2"])
NAME = "0000:00:01.0"
#: A watchdog no correct test can reach (3.6 s real at the default 1000x clock).
PATIENT = 3600


@pytest.fixture
def make_kernel() -> Iterator[Callable[..., Kernel]]:
    """Kernel(...) factory; every kernel made is flushed and closed at teardown."""
    made: list[Kernel] = []

    def make(**kwargs: Any) -> Kernel:
        k = Kernel(**kwargs)
        made.append(k)
        return k

    try:
        yield make
    finally:
        for k in made:
            k.close()


# -- helpers ----------------------------------------------------------------------------

def assert_clean(k: Kernel) -> None:
    """No report, no WARN (kernel or refcount) and nothing leaked."""
    assert k.reports == [], "\n".join(map(str, k.reports))
    assert [str(w) for w in k.arena.dmesg()] == []
    leaks = k.leak_check()
    assert leaks == [], "\n".join(map(str, leaks))


def reports_of(k: Kernel, kind: str) -> list[Report]:
    return [r for r in k.reports if r.kind == kind]


def only_report(k: Kernel, kind: str) -> Report:
    found = reports_of(k, kind)
    assert len(found) == 1, f"expected one {kind!r} report, got:\n" + "\n".join(
        map(str, k.reports))
    return found[0]


def stack_text(rep: Report, heading_prefix: str) -> str:
    found = [str(s) for h, s in rep.stacks if h.startswith(heading_prefix)]
    assert found, f"no stack headed {heading_prefix!r} in {[h for h, _ in rep.stacks]}"
    return found[0]


def dmesg_kinds(k: Kernel) -> list[str]:
    return [w.kind for w in k.arena.dmesg()]


def ops_of(k: Kernel, device: str = "vfio0") -> list[str]:
    return [e.op for e in k.trace.events if e.device == device]


def in_order(seq: Sequence[str], expected: Sequence[str]) -> bool:
    """Whether expected is a subsequence of seq (in order, gaps allowed)."""
    it = iter(seq)
    return all(any(x == want for x in it) for want in expected)


def leak_titles(k: Kernel) -> list[str]:
    return [r.title for r in k.leak_check()]


# =======================================================================================
# 1. Correct sequences report nothing
# =======================================================================================

@BOTH
def test_probe_then_remove_reports_nothing_and_releases_once(make_kernel, semantics):
    k = make_kernel(semantics=semantics)
    vdev, drv = probe(k)
    assert vdev.state is State.REGISTERED and vdev.index == 0
    remove(vdev)
    assert is_freed(vdev)
    assert drv.calls == ["init", "release"]
    assert_clean(k)


@BOTH
def test_open_and_close_between_probe_and_remove_reports_nothing(make_kernel, semantics):
    k = make_kernel(semantics=semantics)
    vdev, drv = probe(k)
    fd = vfio_group_get_device_fd(k, NAME)
    assert isinstance(fd, DeviceFile)
    assert vdev.open_count == 1
    fd.close()
    assert vdev.open_count == 0
    remove(vdev)
    assert drv.calls == ["init", "open_device", "close_device", "release"]
    assert drv.requests == []  # no FD open at unregister: nobody is asked
    assert_clean(k)


@BOTH
def test_remove_with_an_open_fd_requests_0_1_2_until_a_timer_closes_it(make_kernel,
                                                                        semantics):
    k = make_kernel(semantics=semantics, watchdog_s=PATIENT)
    timers: list[threading.Timer] = []
    fd: DeviceFile | None = None

    def on_request(vdev, count):
        if count == 2:  # userspace gives in after the third request
            assert fd is not None
            t = threading.Timer(0.0, fd.close)
            timers.append(t)
            t.start()

    vdev, drv = probe(k, driver=Driver(k, on_request=on_request))
    fd = vfio_group_get_device_fd(k, NAME)
    assert isinstance(fd, DeviceFile)
    remove(vdev)  # blocks in unregister until the Timer closed fd
    for t in timers:
        t.join()
    assert len(drv.requests) >= 3
    assert drv.requests == list(range(len(drv.requests)))
    assert fd.closed and is_freed(vdev)
    assert drv.calls == ["init", "open_device", "close_device", "release"]
    assert_clean(k)


@BOTH
def test_remove_waits_for_an_fd_closed_from_inside_request(make_kernel, semantics):
    k = make_kernel(semantics=semantics)
    fds: list[DeviceFile] = []
    vdev, drv = probe(k, driver=Driver(k, on_request=lambda v, n: n == 1 and fds[0].close()))
    fd = vfio_group_get_device_fd(k, NAME)
    assert isinstance(fd, DeviceFile)
    fds.append(fd)
    remove(vdev)
    assert drv.requests == [0, 1]
    assert_clean(k)


@BOTH
def test_register_of_a_second_device_on_the_same_parent_fails_ebusy_and_put_cleans_up(
        make_kernel, semantics):
    k = make_kernel(semantics=semantics)
    dev = k.device(NAME)
    first = vfio_alloc_device(Priv, dev, Driver(k))
    assert isinstance(first, Priv)
    assert vfio_register_group_dev(first) == 0
    drv = Driver(k)
    second = vfio_alloc_device(Priv, dev, drv)
    assert isinstance(second, Priv)
    assert vfio_register_group_dev(second) == -EBUSY
    assert second.state is State.INITIALIZED  # register failure leaves it initialized
    assert second.dev_set is not None  # ... with its (singleton) set: release undoes it
    vfio_put_device(second)  # the probe error path
    assert is_freed(second) and drv.calls == ["init", "release"]
    remove(first)
    # __vfio_register_dev() prints dev_WARN "Device already exists on group"; nothing else.
    [warn] = k.reports
    assert warn.kind == "WARN" and "Device already exists on group" in warn.title
    k.reports.clear()
    assert k.leak_check() == []


@BOTH
def test_init_failure_fails_the_alloc_with_its_errno_and_never_calls_release(make_kernel,
                                                                             semantics):
    k = make_kernel(semantics=semantics)
    drv = Driver(k, init_ret=-ENOMEM)
    assert vfio_alloc_device(Priv, k.device(NAME), drv) == -ENOMEM
    assert drv.calls == ["init"]
    assert not k.ida and k.dev_sets == {}
    assert_clean(k)


@BOTH
def test_init_failure_after_assigning_a_set_releases_the_set_and_index(make_kernel, semantics):
    k = make_kernel(semantics=semantics)
    bus = object()

    def init(vdev):
        assert vfio_assign_device_set(vdev, bus) == 0
        return -ENOMEM

    assert vfio_alloc_device(Priv, k.device(NAME), Driver(k, on_init=init)) == -ENOMEM
    assert_clean(k)


@BOTH
def test_failslab_alloc_failure_returns_enomem_and_calls_no_op(make_kernel, semantics):
    k = make_kernel(semantics=semantics)
    drv = Driver(k)
    k.fail_next_allocs(1)
    assert vfio_alloc_device(Priv, k.device(NAME), drv) == -ENOMEM
    assert drv.calls == []
    vdev, _ = probe(k, driver=drv)  # only the next allocation failed
    remove(vdev)
    assert_clean(k)


@BOTH
def test_unlink_first_order_refuses_a_reopen_during_the_unregister_wait(make_kernel,
                                                                        semantics):
    k = make_kernel(semantics=semantics, unregister_order="unlink-first")
    fds: list[DeviceFile] = []
    reopened: list[object] = []

    def on_request(vdev, count):
        reopened.append(vfio_group_get_device_fd(k, NAME))
        fds[0].close()

    vdev, drv = probe(k, driver=Driver(k, on_request=on_request))
    fd = vfio_group_get_device_fd(k, NAME)
    assert isinstance(fd, DeviceFile)
    fds.append(fd)
    remove(vdev)
    assert reopened == [-ENODEV]
    assert drv.requests == [0]
    assert_clean(k)


@BOTH
def test_delayed_release_runs_on_a_worker_after_put_returns_and_flush_waits(make_kernel,
                                                                            semantics):
    k = make_kernel(semantics=semantics, delayed_release=True, seed=1)
    put_returned = threading.Event()
    seen: list[bool] = []
    # The release records whether put() had already returned when it ran.
    vdev, drv = probe(k, driver=Driver(k, on_release=lambda v: seen.append(
        put_returned.wait(5))))
    vfio_unregister_group_dev(vdev)
    vfio_put_device(vdev)
    put_returned.set()
    k.flush()
    assert seen == [True]
    assert len(drv.release_threads) == 1 and drv.release_threads[0].startswith("kworker")
    assert is_freed(vdev)
    assert in_order(ops_of(k), ["vfio_put_device", "kobject_release: delayed",
                                "vfio_device_release", "kfree"])
    assert_clean(k)


@BOTH
def test_get_device_holder_keeps_the_device_alive_until_its_put(make_kernel, semantics):
    k = make_kernel(semantics=semantics)
    vdev, drv = probe(k)
    get_device(vdev)
    remove(vdev)
    assert not is_freed(vdev) and "release" not in drv.calls
    put_device(vdev)
    assert is_freed(vdev) and drv.calls == ["init", "release"]
    assert_clean(k)


@BOTH
def test_trace_records_every_transition_in_order_with_its_counters(make_kernel, semantics):
    k = make_kernel(semantics=semantics)
    vdev, _ = probe(k)
    fd = vfio_group_get_device_fd(k, NAME)
    assert isinstance(fd, DeviceFile)
    fd.close()
    remove(vdev)
    expected = ["vfio_init_device", "vfio_assign_device_set", "vfio_register_group_dev",
                "try_get_registration", "fd open", "fd close", "put_registration",
                "put_registration", "unlink: group list, device_del",
                "vfio_unregister_group_dev", "vfio_put_device", "vfio_device_release", "kfree"]
    assert in_order(ops_of(k), expected), k.trace.timeline()
    by_op: dict[str, list[Any]] = {}
    for e in k.trace.events:
        by_op.setdefault(e.op, []).append(e)
    assert by_op["vfio_init_device"][0].kref == (0, 1)
    assert by_op["vfio_register_group_dev"][0].refcount == (0, 1)
    assert by_op["try_get_registration"][0].refcount == (1, 2)
    assert [e.refcount for e in by_op["put_registration"]] == [(2, 1), (1, 0)]
    assert by_op["vfio_put_device"][0].kref == (1, 0)
    assert [e.open_count for e in by_op["fd open"]] == [1]
    assert_clean(k)


# =======================================================================================
# 2. Bug classes (docs/lifecycle.md): the buggy sequence and the report that names it
# =======================================================================================

# -- 1. UAF after put ------------------------------------------------------------------

@BOTH
def test_c01_touching_a_private_field_after_the_final_put_is_a_uaf_with_both_stacks(
        make_kernel, semantics):
    k = make_kernel(semantics=semantics)
    vdev, _ = probe(k)
    vdev.node = "on mdev_list"
    remove(vdev)
    with pytest.raises(UseAfterFreeError):
        vdev.node = None  # list_del(&matrix_mdev->node) after the put
    rep = only_report(k, "use-after-free")
    assert "use-after-free" in rep.title and "node" in rep.title
    assert "probe" in stack_text(rep, "Allocated by")
    assert "remove" in stack_text(rep, "Freed by")


@BOTH
def test_c01_touching_private_fields_before_the_final_put_is_fine(make_kernel, semantics):
    k = make_kernel(semantics=semantics)
    vdev, _ = probe(k)
    vdev.node = "on mdev_list"
    vfio_unregister_group_dev(vdev)
    vdev.node = None
    vfio_put_device(vdev)
    assert_clean(k)


# -- 2. UAF inside release ---------------------------------------------------------------

class FreeThenTouch(Driver):
    """v6.1 release that frees the struct first and reads its fields afterwards."""

    def release(self, vdev):
        self.calls.append("release")
        vfio_free_device(vdev)
        self.regions = vdev.regions  # BUG: vdev is gone


class TouchThenFree(Driver):
    def release(self, vdev):
        self.calls.append("release")
        self.regions = vdev.regions
        vfio_free_device(vdev)


def test_c02_release_reading_fields_after_vfio_free_device_is_a_uaf(make_kernel):
    k = make_kernel(semantics="v6.1")
    vdev, _ = probe(k, driver=FreeThenTouch(k))
    vdev.regions = []
    vfio_unregister_group_dev(vdev)
    with pytest.raises(UseAfterFreeError):
        vfio_put_device(vdev)
    rep = only_report(k, "use-after-free")
    assert "regions" in rep.title
    assert "release" in stack_text(rep, "Freed by")


def test_c02_release_reading_fields_before_vfio_free_device_is_fine(make_kernel):
    k = make_kernel(semantics="v6.1")
    vdev, drv = probe(k, driver=TouchThenFree(k))
    vdev.regions = []
    remove(vdev)
    assert drv.regions == []
    assert_clean(k)


# -- 3. double put -------------------------------------------------------------------------

@BOTH
def test_c03_double_put_is_a_uaf_in_vfio_put_device(make_kernel, semantics):
    k = make_kernel(semantics=semantics)
    vdev, drv = probe(k)
    remove(vdev)
    with pytest.raises(UseAfterFreeError):
        vfio_put_device(vdev)  # the caller's cleanup puts again
    rep = only_report(k, "use-after-free")
    assert "vfio_put_device" in rep.title
    assert drv.calls.count("release") == 1


@BOTH
def test_c03_double_put_steals_a_holders_reference_and_its_put_is_a_uaf(make_kernel,
                                                                        semantics):
    k = make_kernel(semantics=semantics)
    vdev, drv = probe(k)
    get_device(vdev)  # someone else (sysfs, another driver) holds the object
    vfio_unregister_group_dev(vdev)
    vfio_put_device(vdev)
    vfio_put_device(vdev)  # BUG: the second put drops the holder's reference
    assert drv.calls.count("release") == 1 and is_freed(vdev)
    with pytest.raises(UseAfterFreeError):
        put_device(vdev)  # the holder lets go
    assert "use-after-free" in only_report(k, "use-after-free").title


def test_c03_double_put_before_a_delayed_release_underflows_the_kref(make_kernel):
    # The memory survives the first put until the worker runs (>= 1 emulated s =
    # 50 ms real at time_scale 20), so the second put decrements a zero kref.
    k = make_kernel(delayed_release=True, time_scale=20.0, seed=0)
    vdev, drv = probe(k)
    vfio_unregister_group_dev(vdev)
    vfio_put_device(vdev)
    vfio_put_device(vdev)
    assert "SUB_UAF" in dmesg_kinds(k)
    k.flush()
    assert drv.calls.count("release") == 1


# -- 4. missing put on a probe error path ---------------------------------------------------

def buggy_probe_leaks_on_error(k: Kernel, drv: Driver, put_on_error: bool) -> int:
    vdev = vfio_alloc_device(Priv, k.device(NAME), drv)
    assert isinstance(vdev, Priv)
    assert vfio_assign_device_set(vdev, k) == 0  # like vfio-pci: the bus is the set_id
    # ... the PF has VFs enabled: -EBUSY
    if put_on_error:
        vfio_put_device(vdev)
    return -EBUSY


@BOTH
def test_c04_missing_put_on_probe_error_leaks_memory_index_and_set(make_kernel, semantics):
    k = make_kernel(semantics=semantics)
    assert buggy_probe_leaks_on_error(k, Driver(k), put_on_error=False) == -EBUSY
    leaks = k.leak_check()
    titles = [r.title for r in leaks]
    assert len(leaks) == 3, titles
    mem = next(r for r in leaks if "unreferenced object Priv" in r.title)
    assert "buggy_probe_leaks_on_error" in stack_text(mem, "allocated by")
    assert any("vfio device index 0" in t for t in titles)
    assert any("vfio_device_set" in t and "device_count 1" in t for t in titles)


@BOTH
def test_c04_put_on_probe_error_leaks_nothing(make_kernel, semantics):
    k = make_kernel(semantics=semantics)
    drv = Driver(k)
    assert buggy_probe_leaks_on_error(k, drv, put_on_error=True) == -EBUSY
    assert drv.calls == ["init", "release"]
    assert_clean(k)


# -- 5. release skipped: kfree instead of put ---------------------------------------------

@BOTH
def test_c05_kfree_instead_of_put_leaks_index_and_set_and_a_set_walk_is_a_uaf(
        make_kernel, semantics):
    k = make_kernel(semantics=semantics)
    vdev, drv = probe(k)
    dev_set = vdev.dev_set
    assert dev_set is not None
    vfio_unregister_group_dev(vdev)
    kvfree(vdev)  # BUG: release never runs
    assert "release" not in drv.calls
    with pytest.raises(UseAfterFreeError), dev_set:
        vfio_device_set_open_count(dev_set)  # the dangling list node
    assert "vfio_device_set_open_count" in only_report(k, "use-after-free").title
    titles = leak_titles(k)
    assert any("vfio device index 0" in t for t in titles), titles
    assert any("vfio_device_set" in t for t in titles), titles
    assert not any("unreferenced object" in t for t in titles), titles


@BOTH
def test_c05_kfree_of_a_registered_device_makes_the_next_lookup_a_uaf(make_kernel,
                                                                      semantics):
    k = make_kernel(semantics=semantics)
    vdev, _ = probe(k)
    kvfree(vdev)  # BUG: neither unregistered nor put
    with pytest.raises(UseAfterFreeError):
        vfio_group_get_device_fd(k, NAME)
    assert "vfio_group_get_device_fd" in only_report(k, "use-after-free").title


# -- 6. missing ops->release ---------------------------------------------------------------

def test_c06_missing_release_in_v61_is_a_null_pointer_oops(make_kernel):
    k = make_kernel(semantics="v6.1")
    vdev, _ = probe(k, driver=NoReleaseDriver(k))
    vfio_unregister_group_dev(vdev)
    with pytest.raises(KernelOops) as exc:
        vfio_put_device(vdev)
    assert exc.value.report.kind == "oops"
    assert "NULL pointer dereference" in exc.value.report.title
    assert exc.value.report in k.reports


def test_c06_missing_release_in_v62_is_fine(make_kernel):
    k = make_kernel(semantics="v6.2")
    vdev, _ = probe(k, driver=NoReleaseDriver(k))
    remove(vdev)
    assert is_freed(vdev)
    assert_clean(k)


# -- 7. put without unregister --------------------------------------------------------------

@BOTH
def test_c07_put_without_unregister_warns_and_a_later_lookup_is_a_uaf(make_kernel,
                                                                      semantics):
    k = make_kernel(semantics=semantics)
    vdev, _ = probe(k)
    vfio_put_device(vdev)  # BUG: still registered
    warn = only_report(k, "WARN")
    assert "released while still registered" in warn.title
    with pytest.raises(UseAfterFreeError):
        vfio_group_get_device_fd(k, NAME)
    assert "use-after-free" in only_report(k, "use-after-free").title


# -- 8. put of a never-initialized object --------------------------------------------------

def test_c08_put_after_a_failed_init_warns_not_initialized_and_underflows(make_kernel):
    k = make_kernel(semantics="v6.1")  # the ccw path: vfio_init_device is static in v6.2
    drv = Driver(k, init_ret=-ENOMEM)
    vdev = kzalloc(k, Priv)  # the ccw path: the driver owns the memory
    assert vfio_init_device(vdev, k.device(NAME), drv) == -ENOMEM
    vfio_put_device(vdev)  # BUG: there is no kobject to put
    warn = only_report(k, "WARN")
    assert "is not initialized, yet kobject_put() is being called" in warn.title
    assert "SUB_UAF" in dmesg_kinds(k)
    assert "release" not in drv.calls and not is_freed(vdev)


def test_c08_kfree_after_a_failed_init_is_fine(make_kernel):
    k = make_kernel(semantics="v6.1")
    drv = Driver(k, init_ret=-ENOMEM)
    vdev = kzalloc(k, Priv)
    assert vfio_init_device(vdev, k.device(NAME), drv) == -ENOMEM
    kfree(vdev)
    assert_clean(k)


# -- 9. init partial-failure leak ----------------------------------------------------------

def init_allocates_then_fails(vdev: Any, free_on_error: bool) -> int:
    vdev.vconfig = kzalloc(core_of(vdev, "test").kernel, Buf)  # A
    # ... B fails
    if free_on_error:
        kfree(vdev.vconfig)
    return -ENOMEM


@BOTH
def test_c09_init_that_fails_without_undoing_its_allocation_leaks_it(make_kernel, semantics):
    k = make_kernel(semantics=semantics)
    drv = Driver(k, on_init=lambda v: init_allocates_then_fails(v, free_on_error=False))
    assert vfio_alloc_device(Priv, k.device(NAME), drv) == -ENOMEM
    assert "release" not in drv.calls  # nobody else will free it
    [leak] = k.leak_check()
    assert "unreferenced object Buf" in leak.title
    assert "init_allocates_then_fails" in stack_text(leak, "allocated by")


@BOTH
def test_c09_init_that_undoes_its_allocation_on_failure_leaks_nothing(make_kernel,
                                                                      semantics):
    k = make_kernel(semantics=semantics)
    drv = Driver(k, on_init=lambda v: init_allocates_then_fails(v, free_on_error=True))
    assert vfio_alloc_device(Priv, k.device(NAME), drv) == -ENOMEM
    assert_clean(k)


# -- 10. delayed release assumptions -------------------------------------------------------

class ParentRes(Buf):
    """A parent-owned resource the device's release still uses (the ccw/mdev parent)."""


@pytest.mark.parametrize("delayed", [False, True], ids=["sync-release", "delayed-release"])
def test_c10_freeing_a_parent_right_after_put_is_a_uaf_only_with_delayed_release(
        make_kernel, delayed):
    k = make_kernel(delayed_release=delayed, seed=2)
    parent = kzalloc(k, ParentRes)
    parent.users = 1
    freed_parent = threading.Event()
    if not delayed:
        freed_parent.set()  # a synchronous release runs inside put: nothing to wait for

    def release_uses_parent(vdev):
        freed_parent.wait(5)
        vdev.parent.users -= 1

    vdev, _ = probe(k, driver=Driver(k, on_release=release_uses_parent))
    vdev.parent = parent
    vfio_unregister_group_dev(vdev)
    vfio_put_device(vdev)
    kfree(parent)  # BUG if release has not run yet: "put() released it, surely"
    freed_parent.set()
    k.flush()
    if delayed:
        rep = only_report(k, "use-after-free")
        assert "ParentRes.users" in rep.title
    else:
        assert_clean(k)


# -- 11/12. unregister hangs ---------------------------------------------------------------

@BOTH
def test_c11_fd_kept_open_and_requests_ignored_hangs_unregister_until_the_watchdog(
        make_kernel, semantics):
    k = make_kernel(semantics=semantics, watchdog_s=30)
    vdev, drv = probe(k)

    def userspace_opens():
        return vfio_group_get_device_fd(k, NAME)

    fd = userspace_opens()
    assert isinstance(fd, DeviceFile)
    with pytest.raises(HangError) as exc:
        vfio_unregister_group_dev(vdev)
    rep = exc.value.report
    assert rep.kind == "hang" and "blocked for more than 30 seconds" in rep.title
    assert rep in k.reports
    assert str(fd) in rep.detail  # the holder is named ...
    assert "userspace_opens" in stack_text(rep, str(fd))  # ... with its opener's stack
    assert drv.requests == [0, 1, 2]  # one request per 10 s wait
    fd.close()


@BOTH
def test_c12_no_request_op_hangs_unregister_silently(make_kernel, semantics):
    k = make_kernel(semantics=semantics, watchdog_s=20)
    vdev, drv = probe(k, driver=MttyLikeDriver(k))
    fd = vfio_group_get_device_fd(k, NAME)
    assert isinstance(fd, DeviceFile)
    with pytest.raises(HangError) as exc:
        vfio_unregister_group_dev(vdev)
    assert exc.value.report.kind == "hang"
    assert str(fd) in exc.value.report.detail
    assert "ops->request" not in ops_of(k)
    assert drv.requests == []
    fd.close()


# -- 13. re-open during the unregister wait -----------------------------------------------

@pytest.mark.parametrize(("order", "reopen_ok", "requests"),
                         [("v6.1", True, [0, 1]), ("unlink-first", False, [0])])
def test_c13_reopen_during_unregister_extends_the_wait_only_in_v61_order(
        make_kernel, order, reopen_ok, requests):
    k = make_kernel(unregister_order=order, watchdog_s=PATIENT)
    fds: list[Any] = []

    def on_request(vdev, count):
        if count == 0:
            fds.append(vfio_group_get_device_fd(k, NAME))  # userspace opens again ...
            fds[0].close()  # ... and closes the old FD
        elif count == 1:
            fds[1].close()

    vdev, drv = probe(k, driver=Driver(k, on_request=on_request))
    fds.append(vfio_group_get_device_fd(k, NAME))
    remove(vdev)
    assert isinstance(fds[1], DeviceFile) is reopen_ok
    if not reopen_ok:
        assert fds[1] == -ENODEV
    assert drv.requests == requests
    assert_clean(k)


# -- 14. missing put_registration ------------------------------------------------------------

@BOTH
def test_c14_missing_put_registration_hangs_unregister_and_names_the_holder(make_kernel,
                                                                            semantics):
    k = make_kernel(semantics=semantics, watchdog_s=20)
    vdev, _ = probe(k)
    assert vfio_device_try_get_registration(vdev)
    # ... error path returns without vfio_device_put_registration()
    with pytest.raises(HangError) as exc:
        vfio_unregister_group_dev(vdev)
    rep = exc.value.report
    assert rep.kind == "hang"
    assert "1 registration reference(s) held without an open FD" in rep.detail


@BOTH
def test_c14_try_get_then_put_registration_lets_unregister_finish(make_kernel, semantics):
    k = make_kernel(semantics=semantics)
    vdev, drv = probe(k)
    assert vfio_device_try_get_registration(vdev)
    vfio_device_put_registration(vdev)
    remove(vdev)
    assert drv.requests == []
    assert_clean(k)


# -- 15. extra put_registration ---------------------------------------------------------------

@BOTH
def test_c15_extra_put_registration_frees_the_device_under_an_open_fd(make_kernel, semantics):
    k = make_kernel(semantics=semantics)
    vdev, drv = probe(k)
    fd = vfio_group_get_device_fd(k, NAME)
    assert isinstance(fd, DeviceFile)
    vfio_device_put_registration(vdev)  # BUG: one put too many
    remove(vdev)  # does not wait: the count already says "no FD"
    assert drv.requests == [] and is_freed(vdev)
    with pytest.raises(UseAfterFreeError):
        fd.close()
    assert "use-after-free" in only_report(k, "use-after-free").title


# -- 16. refcount_inc instead of inc_not_zero ---------------------------------------------

@BOTH
def test_c16_refcount_inc_after_unregister_warns_add_uaf_and_saturates(make_kernel,
                                                                       semantics):
    k = make_kernel(semantics=semantics)
    vdev, _ = probe(k)
    vfio_unregister_group_dev(vdev)
    reg = core_of(vdev, "test").refcount
    reg.inc()  # BUG: "revives" an unregistered device
    assert dmesg_kinds(k) == ["ADD_UAF"]
    assert reg.read() == REFCOUNT_SATURATED
    vfio_put_device(vdev)


@BOTH
def test_c16_try_get_registration_after_unregister_fails_without_a_warning(make_kernel,
                                                                           semantics):
    k = make_kernel(semantics=semantics)
    vdev, _ = probe(k)
    vfio_unregister_group_dev(vdev)
    assert vfio_device_try_get_registration(vdev) is False
    assert core_of(vdev, "test").refcount.read() == 0
    vfio_put_device(vdev)
    assert_clean(k)


# -- 17-21. the v6.1 vfio-ccw pattern: embedded vdev, release_comp -------------------------

def ccw_probe(k: Kernel, sch: Any, ops: CcwOps, private: CcwPrivate | None = None,
              register: bool = True) -> CcwPrivate:
    """css probe allocated private; mdev probe inits (and registers) the embedded vdev."""
    private = private if private is not None else kzalloc(k, CcwPrivate)
    assert vfio_init_device(private, sch, ops) == 0
    if register:
        assert vfio_register_emulated_iommu_dev(private) == 0
    return private


def ccw_remove(k: Kernel, private: CcwPrivate) -> None:
    """mdev remove (v6.1): unregister, put, then wait for release_comp."""
    vfio_unregister_group_dev(private)
    vfio_put_device(private)
    k.wait_for_completion(private.release_comp, "release_comp")


def test_c17_ccw_remove_waits_forever_on_release_comp_when_a_get_device_leaked(make_kernel):
    k = make_kernel(watchdog_s=20)
    private = ccw_probe(k, k.device("0.0.0001"), CcwOps())
    get_device(private)  # BUG: never put
    with pytest.raises(HangError) as exc:
        ccw_remove(k, private)
    rep = exc.value.report
    assert rep.kind == "hang" and "release_comp" in rep.detail
    assert "blocked for more than 20 seconds" in rep.title


def test_c17_ccw_remove_returns_once_the_last_holder_puts(make_kernel):
    k = make_kernel(watchdog_s=PATIENT)
    ops = CcwOps()
    private = ccw_probe(k, k.device("0.0.0001"), ops)
    get_device(private)
    t = threading.Timer(0.0, put_device, (private,))
    vfio_unregister_group_dev(private)
    vfio_put_device(private)
    t.start()  # the holder lets go while remove waits
    k.wait_for_completion(private.release_comp, "release_comp")
    t.join()
    assert ops.calls == ["init", "release"]
    kfree(private)  # css remove
    assert_clean(k)


@pytest.mark.parametrize("complete_all", [False, True], ids=["c18-complete", "c19-complete_all"])
def test_c18_c19_stale_release_comp_lets_remove_free_a_referenced_private(make_kernel,
                                                                          complete_all):
    k = make_kernel()
    sch = k.device("0.0.0001")
    ops = CcwOps(reinit=False, complete_all=complete_all)  # BUG: init does not re-arm
    # First mdev: the probe fails after init and puts without waiting (vfio_ccw_mdev_probe's error):
    # release completes release_comp and nobody consumes it.
    private = ccw_probe(k, sch, ops, register=False)
    vfio_put_device(private)
    if complete_all:  # a consumed wait does not close a complete_all()ed completion
        k.wait_for_completion(private.release_comp, "release_comp")
    # Second mdev on the same subchannel, while someone holds a reference.
    ccw_probe(k, sch, ops, private)
    get_device(private)
    ccw_remove(k, private)  # returns at once: the stale count, not the release
    assert ops.calls.count("release") == 1
    kfree(private)  # css remove frees the struct the holder still points into
    with pytest.raises(UseAfterFreeError):
        put_device(private)
    assert "use-after-free" in only_report(k, "use-after-free").title


@pytest.mark.parametrize("complete_all", [False, True], ids=["c18-complete", "c19-complete_all"])
def test_c18_c19_init_that_rearms_release_comp_makes_remove_wait_for_the_holder(
        make_kernel, complete_all):
    k = make_kernel(watchdog_s=20)
    sch = k.device("0.0.0001")
    ops = CcwOps(reinit=True, complete_all=complete_all)
    private = ccw_probe(k, sch, ops, register=False)
    vfio_put_device(private)
    ccw_probe(k, sch, ops, private)
    get_device(private)
    with pytest.raises(HangError):  # waits for the holder, as it must
        ccw_remove(k, private)
    put_device(private)
    k.wait_for_completion(private.release_comp, "release_comp")
    kfree(private)
    assert [r.kind for r in k.reports] == ["hang"]
    assert k.leak_check() == []


def test_c20_css_remove_freeing_private_without_the_release_comp_wait_is_a_uaf(make_kernel):
    k = make_kernel()
    private = ccw_probe(k, k.device("0.0.0001"), CcwOps())
    get_device(private)
    vfio_unregister_group_dev(private)
    vfio_put_device(private)
    kfree(private)  # BUG: no wait_for_completion(&private->release_comp)
    with pytest.raises(UseAfterFreeError):
        put_device(private)
    assert "use-after-free" in only_report(k, "use-after-free").title


def test_c21_delayed_release_landing_on_a_reprobed_ccw_vdev_is_reported(make_kernel):
    k = make_kernel(delayed_release=True, time_scale=10.0, seed=0)
    sch = k.device("0.0.0001")
    ops = CcwOps()
    private = ccw_probe(k, sch, ops, register=False)
    vfio_put_device(private)  # probe error path: put, no wait; release is >= 100 ms away
    ccw_probe(k, sch, ops, private)  # re-probe re-inits the embedded vdev at once
    k.flush()
    assert k.reports != []


def test_c17_release_comp_hang_report_can_name_the_leaked_get_device_caller(make_kernel):
    k = make_kernel(watchdog_s=20)
    private = ccw_probe(k, k.device("0.0.0001"), CcwOps())
    core = core_of(private, "test")

    def leaky_sysfs_reader():
        get_device(private)

    leaky_sysfs_reader()
    vfio_unregister_group_dev(private)
    vfio_put_device(private)
    assert core.kref.read() == 1  # the holder's reference is still there
    with pytest.raises(HangError) as exc:
        k.wait_for_completion(private.release_comp, "release_comp", holders=lambda: [
            f"get_device() by pid {pid}:\n{stack}" for pid, stack in core.holders])
    assert "leaky_sysfs_reader" in exc.value.report.detail


def test_c21_reprobe_of_a_released_embedded_vdev_never_uses_its_freed_set(make_kernel):
    k = make_kernel()
    sch = k.device("0.0.0001")
    ops = CcwOps()
    private = ccw_probe(k, sch, ops)
    ccw_remove(k, private)  # release ran: the singleton set was freed
    ccw_probe(k, sch, ops, private)
    fd = vfio_group_get_device_fd(k, "0.0.0001")  # takes dev_set->lock: not a freed set
    assert isinstance(fd, DeviceFile)
    fd.close()
    assert private.dev_set in k.dev_sets.values(), "registered into a freed device set"
    ccw_remove(k, private)
    kfree(private)
    assert_clean(k)


# -- 22/29/30. mdev ------------------------------------------------------------------------

def mdev_setup(k: Kernel) -> tuple[MdevParent, MdevVfioDriver]:
    drv = MdevVfioDriver(k)
    parent = kzalloc(k, MdevParent)
    assert mdev_register_parent(parent, k.device("0.0.0001"), drv, ["io"]) == 0
    return parent, drv


def test_c22_freeing_the_parent_while_an_mdev_is_referenced_is_a_uaf_at_its_release(
        make_kernel):
    k = make_kernel()
    parent, _ = mdev_setup(k)
    mdev = mdev_device_create(parent.types[0], "uuid-22")
    assert not isinstance(mdev, int)
    mdev_get_device(mdev)  # a sysfs user holds the mdev
    mdev_unregister_parent(parent)
    kfree(parent)  # BUG: the mdev object is still alive
    with pytest.raises(UseAfterFreeError):
        mdev_put_device(mdev)  # mdev_device_release gives the instance back to parent
    assert "available_instances" in only_report(k, "use-after-free").title


def test_c22_freeing_the_parent_after_the_last_mdev_reference_is_fine(make_kernel):
    k = make_kernel()
    parent, drv = mdev_setup(k)
    mdev = mdev_device_create(parent.types[0], "uuid-22")
    assert not isinstance(mdev, int)
    mdev_get_device(mdev)
    mdev_unregister_parent(parent)
    mdev_put_device(mdev)
    kfree(parent)
    assert drv.ops.calls == ["init", "release"]
    assert_clean(k)


def test_c29_failed_mdev_allocation_never_returns_its_instance(make_kernel):
    k = make_kernel()
    parent, _ = mdev_setup(k)
    assert parent.available_instances == 1
    k.fail_next_allocs(1)
    assert mdev_device_create(parent.types[0], "uuid-29a") == -ENOMEM
    assert parent.available_instances == 0  # as written upstream: lost
    assert "an instance was lost or counted twice" in only_report(k, "WARN").title
    assert mdev_device_create(parent.types[0], "uuid-29b") == -EUSERS
    mdev_unregister_parent(parent)
    kfree(parent)


def test_c30_create_after_remove_fails_eusers_while_the_old_mdev_is_referenced(make_kernel):
    k = make_kernel()
    parent, _ = mdev_setup(k)
    old = mdev_device_create(parent.types[0], "uuid-30a")
    assert not isinstance(old, int)
    mdev_get_device(old)
    assert mdev_device_remove(old) == 0
    assert mdev_device_create(parent.types[0], "uuid-30b") == -EUSERS
    mdev_put_device(old)  # the object release gives the instance back
    new = mdev_device_create(parent.types[0], "uuid-30c")
    assert not isinstance(new, int)
    mdev_unregister_parent(parent)
    kfree(parent)
    assert_clean(k)


def test_c30_create_after_remove_succeeds_when_nobody_holds_the_old_mdev(make_kernel):
    k = make_kernel()
    parent, _ = mdev_setup(k)
    old = mdev_device_create(parent.types[0], "uuid-30a")
    assert not isinstance(old, int)
    assert mdev_device_remove(old) == 0
    new = mdev_device_create(parent.types[0], "uuid-30b")
    assert not isinstance(new, int)
    mdev_unregister_parent(parent)
    kfree(parent)
    assert_clean(k)


# -- 24. double vfio_assign_device_set ------------------------------------------------------

@BOTH
def test_c24_double_assign_device_set_warns_double_add_and_leaks_the_set(make_kernel,
                                                                         semantics):
    k = make_kernel(semantics=semantics)
    bus = object()
    vdev = vfio_alloc_device(Priv, k.device(NAME), Driver(k))
    assert isinstance(vdev, Priv)
    assert vfio_assign_device_set(vdev, bus) == 0
    assert vfio_assign_device_set(vdev, bus) == 0  # BUG
    assert "list_add double add" in only_report(k, "WARN").title
    assert vfio_register_group_dev(vdev) == 0
    remove(vdev)
    assert is_freed(vdev)
    [leak] = k.leak_check()
    assert "vfio_device_set" in leak.title and "device_count 1" in leak.title


@BOTH
def test_c24_single_assign_device_set_is_freed_with_its_last_member(make_kernel, semantics):
    k = make_kernel(semantics=semantics)
    bus = object()
    vdevs = []
    for i in range(2):
        vdev = vfio_alloc_device(Priv, k.device(f"0000:00:01.{i}"), Driver(k))
        assert isinstance(vdev, Priv)
        assert vfio_assign_device_set(vdev, bus) == 0
        assert vfio_register_group_dev(vdev) == 0
        vdevs.append(vdev)
    assert vdevs[0].dev_set is vdevs[1].dev_set
    remove(vdevs[0])
    assert len(k.dev_sets) == 1  # the other member keeps it alive
    remove(vdevs[1])
    assert_clean(k)


# -- 25. "last close" check ------------------------------------------------------------------

def test_c25_close_device_sees_its_own_open_count_so_only_eq_1_detects_the_last_close(
        make_kernel):
    k = make_kernel()
    bus = object()
    checks: list[tuple[str, int]] = []

    def on_close(vdev):
        checks.append((vdev.dev.name, vfio_device_set_open_count(vdev.dev_set)))

    vdevs, fds = [], []
    for i in range(2):
        drv = Driver(k, on_close=on_close)
        vdev = vfio_alloc_device(Priv, k.device(f"0000:00:01.{i}"), drv)
        assert isinstance(vdev, Priv)
        assert vfio_assign_device_set(vdev, bus) == 0
        assert vfio_register_group_dev(vdev) == 0
        vdevs.append(vdev)
    for i in range(2):
        fd = vfio_group_get_device_fd(k, f"0000:00:01.{i}")
        assert isinstance(fd, DeviceFile)
        fds.append(fd)
    for fd in fds:
        fd.close()
    counts = [c for _, c in checks]
    assert counts == [2, 1]
    assert [c == 0 for c in counts] == [False, False]  # BUG check: never "last close"
    assert [c == 1 for c in counts] == [False, True]  # e806e223621e: the last close
    for vdev in vdevs:
        remove(vdev)
    assert_clean(k)  # close_device runs under the set lock: no lockdep WARN


# -- 27. open_device failure -----------------------------------------------------------------

@BOTH
def test_c27_open_device_failure_restores_open_count_and_drops_the_registration(
        make_kernel, semantics):
    k = make_kernel(semantics=semantics)
    vdev, drv = probe(k, driver=Driver(k, open_rets=(-EBUSY,)))
    assert vfio_group_get_device_fd(k, NAME) == -EBUSY
    assert vdev.open_count == 0
    assert core_of(vdev, "test").refcount.read() == 1  # only the registration ref
    assert k.files == set()
    fd = vfio_group_get_device_fd(k, NAME)
    assert isinstance(fd, DeviceFile)
    assert drv.calls == ["init", "open_device", "open_device"]  # called again
    fd.close()
    remove(vdev)  # no hang: the failed open gave its reference back
    assert drv.requests == []
    assert_clean(k)


# -- 28. set open count without the set lock ------------------------------------------------

@BOTH
def test_c28_set_open_count_without_the_set_lock_is_a_lockdep_warning(make_kernel,
                                                                      semantics):
    k = make_kernel(semantics=semantics)
    vdev, _ = probe(k)
    assert vfio_device_set_open_count(vdev.dev_set) == 0
    assert "lockdep_assert_held" in only_report(k, "WARN").title
    remove(vdev)


@BOTH
def test_c28_set_open_count_under_the_set_lock_is_fine(make_kernel, semantics):
    k = make_kernel(semantics=semantics)
    vdev, _ = probe(k)
    with vdev.dev_set as dev_set:
        assert vfio_device_set_open_count(dev_set) == 0
    remove(vdev)
    assert_clean(k)


# -- 32. lkdtm-style primitive misuse on the device's counters -------------------------------

@BOTH
def test_c32_refcount_dec_of_the_registration_count_to_zero_leaks_it_forever(make_kernel,
                                                                             semantics):
    k = make_kernel(semantics=semantics, watchdog_s=20)
    vdev, _ = probe(k)
    reg = core_of(vdev, "test").refcount
    reg.dec()  # REFCOUNT_DEC_ZERO: 1 -> 0 through refcount_dec
    assert dmesg_kinds(k) == ["DEC_LEAK"]
    assert reg.read() == REFCOUNT_SATURATED
    with pytest.raises(HangError):  # the count can never reach 0 again
        vfio_unregister_group_dev(vdev)
    assert "SUB_UAF" in dmesg_kinds(k)
    assert reg.read() == REFCOUNT_SATURATED


@BOTH
def test_c32_kref_put_from_zero_saturates_and_the_object_is_never_freed(make_kernel,
                                                                        semantics):
    k = make_kernel(semantics=semantics)
    vdev = kzalloc(k, Priv)  # kref 0: REFCOUNT_DEC_AND_TEST_NEGATIVE on the object count
    vfio_put_device(vdev)
    assert "SUB_UAF" in dmesg_kinds(k)
    kref = core_of(vdev, "test").kref
    assert kref.read() == REFCOUNT_SATURATED
    for _ in range(3):
        vfio_put_device(vdev)  # no put can free it any more
    assert kref.read() == REFCOUNT_SATURATED and not is_freed(vdev)
    assert any("unreferenced object Priv" in t for t in leak_titles(k))


def test_c32_refcount_dec_of_the_kref_to_zero_warns_dec_leak_and_leaks_the_object(
        make_kernel):
    k = make_kernel()
    vdev, _ = probe(k)
    vfio_unregister_group_dev(vdev)
    core_of(vdev, "test").kref.refcount.dec()
    assert dmesg_kinds(k) == ["DEC_LEAK"]
    vfio_put_device(vdev)
    assert any("unreferenced object Priv" in t for t in leak_titles(k))


# =======================================================================================
# 3. Bad input
# =======================================================================================

class NotEmbedding:
    """A struct that does not start with a struct vfio_device."""


@pytest.mark.parametrize("cls", [NotEmbedding, Buf, "Priv"], ids=["plain", "tracked", "str"])
def test_alloc_of_a_struct_without_an_embedded_vfio_device_warns_and_returns_einval(
        make_kernel, cls):
    k = make_kernel()
    assert vfio_alloc_device(cls, k.device(NAME), Driver(k)) == -EINVAL
    assert "does not embed struct vfio_device" in only_report(k, "WARN").title
    assert k.allocations == {} and not k.ida


def test_alloc_with_a_parent_that_is_not_a_device_is_invalid(make_kernel):
    k = make_kernel()
    with pytest.raises(InvalidArgumentError):
        vfio_alloc_device(Priv, NAME, Driver(k))
    assert k.allocations == {}


def test_alloc_with_null_ops_is_invalid_and_leaks_nothing(make_kernel):
    k = make_kernel()
    with pytest.raises(InvalidArgumentError):
        vfio_alloc_device(Priv, k.device(NAME), None)
    assert k.leak_check() == []


def test_init_with_a_parent_from_another_kernel_is_invalid(make_kernel):
    k, other = make_kernel(), make_kernel()
    vdev = kzalloc(k, Priv)
    with pytest.raises(InvalidArgumentError):
        vfio_init_device(vdev, other.device(NAME), Driver(k))
    assert not k.ida and not other.ida
    kfree(vdev)
    assert_clean(k)
    assert_clean(other)


@pytest.mark.parametrize("obj", [object(), None, 0, -ENOMEM], ids=["object", "None", "0",
                                                                   "errno"])
def test_put_of_something_that_is_not_a_vfio_device_is_invalid(make_kernel, obj):
    k = make_kernel()
    with pytest.raises(InvalidArgumentError):
        vfio_put_device(obj)
    assert k.reports == []


@BOTH
def test_register_twice_warns_and_returns_einval_keeping_one_registration(make_kernel,
                                                                          semantics):
    k = make_kernel(semantics=semantics)
    vdev, _ = probe(k)
    assert vfio_register_group_dev(vdev) == -EINVAL
    assert "not initialized" in only_report(k, "WARN").title
    assert k.devices == [vdev]
    assert core_of(vdev, "test").refcount.read() == 1
    remove(vdev)
    k.reports.clear()
    assert k.leak_check() == []


@BOTH
def test_unregister_of_a_never_registered_device_warns_and_returns(make_kernel, semantics):
    k = make_kernel(semantics=semantics)
    drv = Driver(k)
    vdev = vfio_alloc_device(Priv, k.device(NAME), drv)
    assert isinstance(vdev, Priv)
    vfio_unregister_group_dev(vdev)  # must not wait
    assert "vfio_unregister_group_dev" in only_report(k, "WARN").title
    assert vdev.state is State.INITIALIZED and drv.requests == []
    vfio_put_device(vdev)
    k.reports.clear()
    assert k.leak_check() == []


@BOTH
def test_closing_an_fd_twice_is_invalid_and_drops_only_one_reference(make_kernel, semantics):
    k = make_kernel(semantics=semantics)
    vdev, drv = probe(k)
    fd = vfio_group_get_device_fd(k, NAME)
    assert isinstance(fd, DeviceFile)
    fd.close()
    with pytest.raises(InvalidArgumentError):
        fd.close()
    assert core_of(vdev, "test").refcount.read() == 1
    assert drv.calls.count("close_device") == 1
    remove(vdev)
    assert_clean(k)


def test_vfio_free_device_does_not_exist_in_v62(make_kernel):
    k = make_kernel(semantics="v6.2")
    vdev, _ = probe(k)
    with pytest.raises(EmulatorError, match=r"v6\.2"):
        vfio_free_device(vdev)
    assert not is_freed(vdev)
    remove(vdev)
    assert_clean(k)


def test_a_delayed_release_that_raises_an_unreported_error_is_reported(make_kernel):
    k = make_kernel(semantics="v6.2", delayed_release=True, seed=0)

    class V61Release(Driver):
        def release(self, vdev):
            vfio_free_device(vdev)  # a v6.1 driver built against v6.2

    vdev, _ = probe(k, driver=V61Release(k))
    remove(vdev)
    k.flush()
    assert any("vfio_free_device" in r.title or "v6.2" in r.title for r in k.reports)


@pytest.mark.parametrize("kwargs", [{"semantics": "v5"}, {"unregister_order": "v6.6"},
                                    {"watchdog_s": 0}, {"watchdog_s": 1.5}],
                         ids=["semantics", "order", "watchdog0", "watchdog-float"])
def test_kernel_rejects_unknown_configuration(kwargs):
    with pytest.raises(InvalidArgumentError):
        Kernel(**kwargs)


# -- 23. device_register() failure followed by kfree() instead of put_device() -----------

class ParentDevice(StructDevice):
    """A driver's own refcounted struct device (v6.2 vfio-ccw's parent, vfio-ap's matrix_dev)."""


def register_parent_failing_add(k: Kernel) -> ParentDevice:
    parent = kzalloc(k, ParentDevice)
    parent.release = kfree
    assert dev_set_name(parent, "parent") == 0
    device_initialize(parent)
    k.fail_next_allocs(1)  # device_add() fails
    assert device_add(parent) == -ENOMEM
    return parent


def test_c23_kfree_after_a_failed_device_register_leaks_the_kobject_name(make_kernel):
    k = make_kernel()
    parent = register_parent_failing_add(k)
    kfree(parent)  # BUG: the kobject is initialized; only put_device() may free it
    [leak] = k.leak_check()
    assert "kobject name 'parent'" in leak.title
    assert "register_parent_failing_add" in stack_text(leak, "allocated by")


def test_c23_put_device_after_a_failed_device_register_frees_everything(make_kernel):
    k = make_kernel()
    parent = register_parent_failing_add(k)
    put_device_struct(parent)
    assert is_freed(parent)
    assert_clean(k)


def test_device_unregister_releases_a_registered_struct_device(make_kernel):
    k = make_kernel()
    parent = kzalloc(k, ParentDevice)
    parent.release = kfree
    assert device_register(parent, "parent") == 0
    device_unregister(parent)
    assert is_freed(parent)
    assert_clean(k)


def test_struct_device_without_release_warns_it_is_broken(make_kernel):
    k = make_kernel()
    parent = kzalloc(k, ParentDevice)
    assert device_register(parent, "parent") == 0
    device_unregister(parent)
    assert "does not have a release() function" in only_report(k, "WARN").title
    kfree(parent)


# -- 31. counting instances in the driver as well as in the mdev core --------------------

class DoubleCountingDriver(MdevVfioDriver):
    """The pre-9c799c224d6e pattern: the driver still takes an instance itself."""

    max_instances = 2

    def probe(self, mdev):
        mdev.parent.available_instances -= 1  # BUG: the core already counted this one
        return super().probe(mdev)

    def remove(self, mdev):
        super().remove(mdev)


def test_c31_counting_in_driver_and_core_warns_and_refuses_the_second_instance(make_kernel):
    k = make_kernel()
    drv = DoubleCountingDriver(k)
    parent = kzalloc(k, MdevParent)
    assert mdev_register_parent(parent, k.device("matrix"), drv, ["ap"]) == 0
    first = mdev_device_create(parent.types[0], "uuid-31a")
    assert not isinstance(first, int)
    assert "an instance was lost or counted twice" in only_report(k, "WARN").title
    assert mdev_device_create(parent.types[0], "uuid-31b") == -EUSERS  # only 1 exists
    mdev_unregister_parent(parent)
    kfree(parent)


def test_c31_counting_only_in_the_core_allows_max_instances(make_kernel):
    k = make_kernel()
    drv = MdevVfioDriver(k)
    drv.max_instances = 2
    parent = kzalloc(k, MdevParent)
    assert mdev_register_parent(parent, k.device("matrix"), drv, ["ap"]) == 0
    mdevs = [mdev_device_create(parent.types[0], f"uuid-31-{i}") for i in range(2)]
    assert not any(isinstance(m, int) for m in mdevs)
    assert parent.available_instances == 0
    mdev_unregister_parent(parent)
    assert parent.available_instances == 2
    kfree(parent)
    assert_clean(k)


# -- 26. container unregister unbalanced (the merge-window core, before 7fdba0011157) -----

class NoClose(Driver):
    close_device = None  # type: ignore[assignment]


@pytest.mark.parametrize("container_fix", [False, True], ids=["merge-window", "fixed"])
def test_c26_fd_creation_failure_leaks_the_container_registration_without_close_device(
        make_kernel, container_fix):
    k = make_kernel(container_fix=container_fix)
    vdev, _ = probe(k, driver=NoClose(k))
    k.fail_next_allocs(1)  # anon_inode_getfile() fails after open_device
    assert vfio_group_get_device_fd(k, NAME) == -ENOMEM
    leaks = [r.title for r in k.leak_check() if "container" in r.title]
    if container_fix:
        assert leaks == []
        remove(vdev)
        assert_clean(k)
    else:
        assert leaks == ["vfio0 is still registered with the container (its dma_unmap "
                         "notifier and iommu_entry were never removed)"]


@pytest.mark.parametrize("container_fix", [False, True], ids=["merge-window", "fixed"])
def test_c26_every_close_unregistering_the_container_corrupts_its_list(
        make_kernel, container_fix):
    k = make_kernel(container_fix=container_fix)
    vdev, _ = probe(k)
    fds = [vfio_group_get_device_fd(k, NAME) for _ in range(2)]
    for fd in fds:
        fd.close()
    warns = [r.title for r in reports_of(k, "WARN")]
    if container_fix:
        assert warns == []
        remove(vdev)
        assert_clean(k)
    else:
        assert warns == ["list_del corruption: vfio0->iommu_entry is not on the container's "
                         "device list (container unregistered twice)"]


# -- locks: lockdep and the watchdog instead of deadlocks ------------------------------

def test_taking_the_set_lock_again_in_close_device_is_reported_not_deadlocked(make_kernel):
    k = make_kernel()

    def relock(vdev):
        with vdev.dev_set:  # close_device already runs under dev_set->lock
            pass

    probe(k, driver=Driver(k, on_close=relock))
    fd = vfio_group_get_device_fd(k, NAME)
    with pytest.raises(HangError):
        fd.close()
    assert "possible recursive locking detected" in only_report(k, "WARN").title


def test_a_set_lock_held_forever_by_another_thread_hits_the_watchdog(make_kernel):
    k = make_kernel(watchdog_s=1, lock_watchdog_s=0.2)
    vdev, _ = probe(k)
    held, done = threading.Event(), threading.Event()

    def holder():
        with vdev.dev_set:
            held.set()
            done.wait(30)

    t = threading.Thread(target=holder)
    t.start()
    held.wait(30)
    try:
        with pytest.raises(HangError):
            vfio_group_get_device_fd(k, NAME)
    finally:
        done.set()
        t.join(30)
    assert "dev_set->lock" in only_report(k, "hang").detail


def test_vfio_init_device_is_not_for_drivers_in_v62(make_kernel):
    k = make_kernel(semantics="v6.2")
    vdev = kzalloc(k, Priv)
    with pytest.raises(EmulatorError, match=r"static in v6\.2"):
        vfio_init_device(vdev, k.device(NAME), Driver(k))
    kfree(vdev)
    assert_clean(k)
