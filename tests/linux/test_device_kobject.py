"""struct device and its kobject (drivers/base/core.c, lib/kobject.c): a driver's own
refcounted struct device (v6.2 vfio-ccw's parent, vfio-ap's matrix_dev), its
register/unregister, and the release() it must have.

Every correct sequence must end with no report, no leak and no WARN; every
buggy sequence must produce the report that names its bug.  Test names read as
the behaviour they pin; "cNN" names the bug class (docs/lifecycle.md lists them).
"""

from __future__ import annotations

from _asserts import assert_clean, only_report, stack_text
from _drivers import is_freed

from vfio_emu.linux.device import (
    StructDevice,
    dev_set_name,
    device_add,
    device_initialize,
    device_register,
    device_unregister,
)
from vfio_emu.linux.device import get_device as get_device_struct
from vfio_emu.linux.device import put_device as put_device_struct
from vfio_emu.linux.errno import ENOMEM
from vfio_emu.linux.kernel import Kernel
from vfio_emu.linux.slab import kfree, kzalloc

# -- 23. device_register() failure followed by kfree() instead of put_device() -------------

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


# -- device_register() and device_unregister() ---------------------------------------------

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


# -- the parent reference (lib/kobject.c: kobject_add, kobject_del, kobject_cleanup) --------

class ChildDevice(StructDevice):
    """A struct device with a parent."""


def parent_and_child(k: Kernel) -> tuple[ParentDevice, ChildDevice, list[str]]:
    released: list[str] = []
    parent = kzalloc(k, ParentDevice)
    parent.release = lambda dev: (released.append("parent"), kfree(dev))
    assert device_register(parent, "parent") == 0
    child = kzalloc(k, ChildDevice)
    child.parent = parent
    child.release = lambda dev: (released.append("child"), kfree(dev))
    assert device_register(child, "child") == 0
    return parent, child, released


def test_device_del_drops_the_reference_on_the_parent_at_once(make_kernel):
    """kobject_del() puts kobj->parent: a deleted child that is still referenced no longer
    pins its parent (kobject_cleanup() then skips the put: 'avoid dropping the parent
    reference unnecessarily')."""
    k = make_kernel()
    parent, child, released = parent_and_child(k)
    assert parent.kref.read() == 2  # its own, and the child's from device_add()
    get_device_struct(child)  # someone still holds the child
    device_unregister(child)  # device_del() + put
    assert parent.kref.read() == 1
    device_unregister(parent)
    assert released == ["parent"]  # gone, though the child is not
    put_device_struct(child)
    assert released == ["parent", "child"]
    assert_clean(k)


def test_a_child_never_deleted_pins_its_parent_until_after_its_release(make_kernel):
    """kobject_cleanup() of a kobject still in sysfs deletes it itself and drops the
    parent reference last, after the release."""
    k = make_kernel()
    parent, child, released = parent_and_child(k)
    device_unregister(parent)  # the parent's own reference goes; the child still pins it
    assert released == []
    put_device_struct(child)  # no device_del(): cleanup deletes it
    assert released == ["child", "parent"]
    assert_clean(k)
