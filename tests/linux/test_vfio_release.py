"""vfio_put_device() and the release (vfio_device_release): the object count (the
kobject's kref), ops->release under both ABIs, DEBUG_KOBJECT_RELEASE's delayed
release on a worker, and KASAN on a struct touched after its last put.

Every correct sequence must end with no report, no leak and no WARN, under
both semantics; every buggy sequence must produce the report that names its
bug.  Test names read as the behaviour they pin; "cNN" names the bug class
(docs/lifecycle.md lists them).
"""

from __future__ import annotations

import threading

import pytest
from _asserts import (
    BOTH,
    assert_clean,
    dmesg_kinds,
    in_order,
    leak_titles,
    only_report,
    ops_of,
    stack_text,
)
from _drivers import NAME, Buf, Driver, NoReleaseDriver, Priv, is_freed, probe, remove

from vfio_emu import REFCOUNT_SATURATED
from vfio_emu.errors import EmulatorError, InvalidArgumentError, KernelOops, UseAfterFreeError
from vfio_emu.linux.errno import ENOMEM
from vfio_emu.linux.slab import kfree, kvfree, kzalloc
from vfio_emu.linux.vfio import (
    State,
    core_of,
    get_device,
    put_device,
    vfio_device_set_open_count,
    vfio_free_device,
    vfio_group_get_device_fd,
    vfio_put_device,
    vfio_unregister_group_dev,
)

# -- the last put releases, once -----------------------------------------------------------

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


# -- 1. UAF after put ----------------------------------------------------------------------

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


# -- 2. UAF inside release -----------------------------------------------------------------

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


# -- 5. release skipped: kfree instead of put ----------------------------------------------

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


# -- 32. lkdtm-style primitive misuse on the object count (the kref) -----------------------

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


# -- bad input -----------------------------------------------------------------------------

@pytest.mark.parametrize("obj", [object(), None, 0, -ENOMEM], ids=["object", "None", "0",
                                                                   "errno"])
def test_put_of_something_that_is_not_a_vfio_device_is_invalid(make_kernel, obj):
    k = make_kernel()
    with pytest.raises(InvalidArgumentError):
        vfio_put_device(obj)
    assert k.reports == []


def test_vfio_free_device_does_not_exist_in_v62(make_kernel):
    k = make_kernel(semantics="v6.2")
    vdev, _ = probe(k)
    with pytest.raises(EmulatorError, match=r"v6\.2"):
        vfio_free_device(vdev)
    assert not is_freed(vdev)
    remove(vdev)
    assert_clean(k)
