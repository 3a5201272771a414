"""The mdev core (drivers/vfio/mdev/): parents and their types, available_instances,
and mdev devices whose object outlives their removal.

Every correct sequence must end with no report, no leak and no WARN; every
buggy sequence must produce the report that names its bug.  Test names read as
the behaviour they pin; "cNN" names the bug class (docs/lifecycle.md lists them).
"""

from __future__ import annotations

import pytest
from _asserts import assert_clean, only_report
from _drivers import MdevVfioDriver

from vfio_emu.errors import UseAfterFreeError
from vfio_emu.linux.errno import ENOMEM, EUSERS
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
