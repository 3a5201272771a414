"""Device sets (struct vfio_device_set): vfio_assign_device_set(), the set's open count
that tells close_device the last close, and the set lock under lockdep and the watchdog.

Every correct sequence must end with no report, no leak and no WARN, under
both semantics; every buggy sequence must produce the report that names its
bug.  Test names read as the behaviour they pin; "cNN" names the bug class
(docs/lifecycle.md lists them).
"""

from __future__ import annotations

import threading
import weakref

import pytest
from _asserts import BOTH, assert_clean, only_report
from _drivers import NAME, Driver, Priv, is_freed, probe, remove

from vfio_emu.errors import HangError
from vfio_emu.linux.vfio import (
    DeviceFile,
    vfio_alloc_device,
    vfio_assign_device_set,
    vfio_device_set_open_count,
    vfio_group_get_device_fd,
    vfio_register_group_dev,
)

# -- 24. double vfio_assign_device_set -----------------------------------------------------

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


def test_a_freed_device_set_no_longer_keeps_its_set_id_alive(make_kernel):
    """The xarray key is kept alive only while the set is in the xarray: a set keyed by
    its own device (the common case) would otherwise be a reference cycle."""
    k = make_kernel()
    vdev = vfio_alloc_device(Priv, k.device(NAME), Driver(k))
    assert isinstance(vdev, Priv) and vfio_assign_device_set(vdev, vdev) == 0
    assert vfio_register_group_dev(vdev) == 0
    gone = weakref.ref(vdev)
    remove(vdev)
    del vdev
    assert_clean(k)
    assert gone() is None  # freed by its last reference, not left to the cycle collector


# -- 25. "last close" check ----------------------------------------------------------------

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


# -- 28. set open count without the set lock -----------------------------------------------

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


# -- locks: lockdep and the watchdog instead of deadlocks ----------------------------------

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
