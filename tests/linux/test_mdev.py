"""The mdev core (drivers/vfio/mdev/): parents and their types, available_instances,
and mdev devices whose object outlives their removal.

Every correct sequence must end with no report, no leak and no WARN; every
buggy sequence must produce the report that names its bug.  Test names read as
the behaviour they pin; "cNN" names the bug class (docs/lifecycle.md lists them).
"""

from __future__ import annotations

from typing import Any

import pytest
from _asserts import assert_clean, only_report
from _drivers import Driver, MdevVfioDriver

from vfio_emu.errors import UseAfterFreeError
from vfio_emu.linux.device import StructDevice, device_register, device_unregister
from vfio_emu.linux.errno import ENOENT, ENOMEM, EUSERS
from vfio_emu.linux.kernel import Kernel
from vfio_emu.linux.mdev import (
    MdevParent,
    MdevType,
    mdev_device_create,
    mdev_device_remove,
    mdev_get_device,
    mdev_put_device,
    mdev_register_parent,
    mdev_unregister_parent,
)
from vfio_emu.linux.slab import Tracked, embedded, kfree, kzalloc
from vfio_emu.linux.vfio import get_device, put_device

# -- 22/29/30. mdev ------------------------------------------------------------------------

class Holder(Tracked):
    """A driver's struct with the mdev parent and its type inside, as drivers embed them
    (vfio_ccw_private, ap_matrix_dev, mtty_dev)."""


def holder_of(k: Kernel, drv: MdevVfioDriver, dev: str = "0.0.0001",
              type_name: str = "io") -> Holder:
    holder = kzalloc(k, Holder)
    assert holder is not None
    holder.parent = embedded(holder, MdevParent)
    holder.mtype = embedded(holder, MdevType)
    holder.mtype.sysfs_name = type_name
    assert mdev_register_parent(holder.parent, k.device(dev), drv, [holder.mtype]) == 0
    return holder


def mdev_setup(k: Kernel) -> tuple[Holder, MdevVfioDriver]:
    drv = MdevVfioDriver(k)
    return holder_of(k, drv), drv


def test_c22_freeing_the_parent_while_an_mdev_is_referenced_is_a_uaf_at_its_release(
        make_kernel):
    k = make_kernel()
    parent, _ = mdev_setup(k)
    mdev = mdev_device_create(parent.mtype, "uuid-22")
    assert not isinstance(mdev, int)
    mdev_get_device(mdev)  # a sysfs user holds the mdev
    mdev_unregister_parent(parent.parent)
    kfree(parent)  # BUG: the mdev object is still alive, and its type is in this memory
    with pytest.raises(UseAfterFreeError):
        mdev_put_device(mdev)  # mdev_device_release: parent = mdev->type->parent
    assert "read of MdevType.parent" in only_report(k, "use-after-free").title


def test_c22_freeing_the_parent_after_the_last_mdev_reference_is_fine(make_kernel):
    k = make_kernel()
    parent, drv = mdev_setup(k)
    mdev = mdev_device_create(parent.mtype, "uuid-22")
    assert not isinstance(mdev, int)
    mdev_get_device(mdev)
    mdev_unregister_parent(parent.parent)
    mdev_put_device(mdev)
    kfree(parent)
    assert drv.ops.calls == ["init", "release"]
    assert_clean(k)


def test_c29_failed_mdev_allocation_never_returns_its_instance(make_kernel):
    k = make_kernel()
    parent, _ = mdev_setup(k)
    assert parent.parent.available_instances == 1
    k.fail_next_allocs(1)
    assert mdev_device_create(parent.mtype, "uuid-29a") == -ENOMEM
    assert parent.parent.available_instances == 0  # as written upstream: lost
    assert "an instance was lost or counted twice" in only_report(k, "WARN").title
    assert mdev_device_create(parent.mtype, "uuid-29b") == -EUSERS
    mdev_unregister_parent(parent.parent)
    kfree(parent)


def test_c30_create_after_remove_fails_eusers_while_the_old_mdev_is_referenced(make_kernel):
    k = make_kernel()
    parent, _ = mdev_setup(k)
    old = mdev_device_create(parent.mtype, "uuid-30a")
    assert not isinstance(old, int)
    mdev_get_device(old)
    assert mdev_device_remove(old) == 0
    assert mdev_device_create(parent.mtype, "uuid-30b") == -EUSERS
    mdev_put_device(old)  # the object release gives the instance back
    new = mdev_device_create(parent.mtype, "uuid-30c")
    assert not isinstance(new, int)
    mdev_unregister_parent(parent.parent)
    kfree(parent)
    assert_clean(k)


def test_c30_create_after_remove_succeeds_when_nobody_holds_the_old_mdev(make_kernel):
    k = make_kernel()
    parent, _ = mdev_setup(k)
    old = mdev_device_create(parent.mtype, "uuid-30a")
    assert not isinstance(old, int)
    assert mdev_device_remove(old) == 0
    new = mdev_device_create(parent.mtype, "uuid-30b")
    assert not isinstance(new, int)
    mdev_unregister_parent(parent.parent)
    kfree(parent)
    assert_clean(k)


# -- 31. counting instances in the driver as well as in the mdev core ----------------------

class DoubleCountingDriver(MdevVfioDriver):
    """The pre-9c799c224d6e pattern: the driver still takes an instance itself."""

    max_instances = 2

    def probe(self, mdev):
        mdev.type.parent.available_instances -= 1  # BUG: the core already counted this one
        return super().probe(mdev)

    def remove(self, mdev):
        super().remove(mdev)


def test_c31_counting_in_driver_and_core_warns_and_refuses_the_second_instance(make_kernel):
    k = make_kernel()
    drv = DoubleCountingDriver(k)
    parent = holder_of(k, drv, "matrix", "passthrough")
    first = mdev_device_create(parent.mtype, "uuid-31a")
    assert not isinstance(first, int)
    assert "an instance was lost or counted twice" in only_report(k, "WARN").title
    assert mdev_device_create(parent.mtype, "uuid-31b") == -EUSERS  # only 1 exists
    mdev_unregister_parent(parent.parent)
    kfree(parent)


def test_c31_counting_only_in_the_core_allows_max_instances(make_kernel):
    k = make_kernel()
    drv = MdevVfioDriver(k)
    drv.max_instances = 2
    parent = holder_of(k, drv, "matrix", "passthrough")
    mdevs = [mdev_device_create(parent.mtype, f"uuid-31-{i}") for i in range(2)]
    assert not any(isinstance(m, int) for m in mdevs)
    assert parent.parent.available_instances == 0
    mdev_unregister_parent(parent.parent)
    assert parent.parent.available_instances == 2
    kfree(parent)
    assert_clean(k)


# -- the kernel's mechanism: who pins whom (mdev_core.c, mdev_sysfs.c, lib/kobject.c) -------

class ReleaseReadsTheMdev(Driver):
    """An ops->release that still reads vdev->dev - the mdev - as no release may."""

    def release(self, vdev: Any) -> None:
        self.seen = vdev.dev.uuid
        super().release(vdev)


def test_a_held_vfio_device_does_not_keep_its_mdev_or_the_instance_after_remove(make_kernel):
    """vfio_unregister_group_dev() ends in device_del(&vdev->device), whose kobject_del()
    drops the vfio_device's reference on its parent, the mdev: a vfio_device held by an
    extra get_device() no longer pins the mdev, so mdev_device_remove() releases the mdev
    and its instance comes back at once - and a release that still reads vdev->dev then
    reads freed memory."""
    k = make_kernel()
    drv = MdevVfioDriver(k)
    drv.ops = ReleaseReadsTheMdev(k)
    holder = holder_of(k, drv)
    mdev = mdev_device_create(holder.mtype, "uuid-held")
    assert not isinstance(mdev, int)
    vdev = get_device(mdev.drvdata)  # someone holds the vfio_device
    assert mdev_device_remove(mdev) == 0
    assert holder.parent.available_instances == 1  # the mdev was released at remove
    again = mdev_device_create(holder.mtype, "uuid-again")
    assert not isinstance(again, int)
    with pytest.raises(UseAfterFreeError):
        put_device(vdev)  # the last put: the release reads the freed mdev
    assert "read of MdevDevice.uuid" in only_report(k, "use-after-free").title
    k.reports.clear()
    mdev_unregister_parent(holder.parent)
    kfree(holder)


def test_the_type_pins_the_parent_device_until_its_last_mdev_is_released(make_kernel):
    """mdev_type_add() takes get_device(parent->dev) for each type and mdev_type_release()
    puts it; mdev_device_create() takes a reference on the type and mdev_device_release()
    puts it: a refcounted parent device outlives its unregistration while an mdev lives."""
    k = make_kernel()
    released: list[str] = []
    pdev = kzalloc(k, StructDevice)
    pdev.release = lambda dev: (released.append("parent device"), kfree(dev))
    assert device_register(pdev, "matrix") == 0
    drv = MdevVfioDriver(k)
    holder = kzalloc(k, Holder)
    holder.parent = embedded(holder, MdevParent)
    holder.mtype = embedded(holder, MdevType)
    holder.mtype.sysfs_name = "passthrough"
    assert mdev_register_parent(holder.parent, pdev, drv, [holder.mtype]) == 0
    assert pdev.kref.read() == 2  # its own and the type's
    mdev = mdev_device_create(holder.mtype, "uuid-pin")
    assert not isinstance(mdev, int)
    assert (pdev.kref.read(), holder.mtype.kobj.read()) == (3, 2)  # + the mdev's; + the mdev
    mdev_get_device(mdev)
    mdev_unregister_parent(holder.parent)  # the mdev is removed (device_del: -1), the type
    device_unregister(pdev)  # removed (-1 on it): its own reference goes too
    assert released == [] and pdev.kref.read() == 1  # the type still pins it
    mdev_put_device(mdev)  # release: instance back, the type's last put, then the parent's
    assert released == ["parent device"]
    kfree(holder)
    assert_clean(k)


def test_create_after_the_parent_is_unregistered_finds_no_create_file(make_kernel):
    """parent_remove_sysfs_files() removes each type's directory with its 'create'
    attribute: userspace gets -ENOENT, and mdev_device_create() is never reached."""
    k = make_kernel()
    holder, drv = mdev_setup(k)
    mdev_unregister_parent(holder.parent)
    assert mdev_device_create(holder.mtype, "uuid-late") == -ENOENT
    assert drv.ops.calls == []
    kfree(holder)
    assert_clean(k)


# -- the parent's unreg_sem ----------------------------------------------------------------

def test_unreg_sem_down_write_waits_for_the_readers_and_then_shuts_them_out(make_kernel):
    import threading

    from vfio_emu.linux.mdev import RWSem

    k = make_kernel(watchdog_s=30)
    sem = RWSem(k)
    assert sem.down_read_trylock() and sem.down_read_trylock()
    taken = threading.Event()

    def writer() -> None:
        sem.down_write()
        taken.set()

    t = threading.Thread(target=writer)
    t.start()
    try:
        assert not taken.wait(0.1)  # two readers hold it
        sem.up_read()
        assert not taken.wait(0.1)  # one still does
        sem.up_read()
        assert taken.wait(30)
        assert not sem.down_read_trylock()  # a writer holds it
        sem.up_write()
        assert sem.down_read_trylock()
        sem.up_read()
        sem.down_write()  # nobody holds it: no wait
        sem.up_write()
    finally:
        t.join(30)
    assert_clean(k)


def test_unreg_sem_held_by_a_reader_forever_is_the_watchdog_s_hang(make_kernel):
    from vfio_emu.errors import HangError
    from vfio_emu.linux.mdev import RWSem

    k = make_kernel(watchdog_s=1, lock_watchdog_s=0.2)
    sem = RWSem(k)
    assert sem.down_read_trylock()
    with pytest.raises(HangError):
        sem.down_write()
    assert "down_write(&parent->unreg_sem): 1 reader(s) hold it" in only_report(k, "hang").detail
    sem.up_read()
    sem.down_write()  # the failed writer left nothing behind
    sem.up_write()
