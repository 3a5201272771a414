"""The mdev core (drivers/vfio/mdev): parents, types, instances, available-instance accounting.

An instance counted against max_instances comes back only when the mdev
OBJECT is released - not at remove - so a reference held elsewhere (or a
delayed release) keeps it away.  A parent's unreg_sem is held for write
while mdev_unregister_parent() removes every child; creates meanwhile fail.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from vfio_emu.errors import HangError, InvalidArgumentError
from vfio_emu.linux.device import Device, StructDevice, device_initialize, get_device, put_device
from vfio_emu.linux.errno import EAGAIN, EEXIST, ENODEV, ENOMEM, EUSERS
from vfio_emu.linux.kernel import Kernel
from vfio_emu.linux.slab import Tracked, kfree, kzalloc, mem_of


class RWSem:
    """A reader/writer semaphore with the trylock the mdev core uses; down_write waits
    under the kernel's watchdog."""

    def __init__(self, kernel: Kernel) -> None:
        self._kernel = kernel
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False

    def down_read_trylock(self) -> bool:
        with self._cond:
            if self._writer:
                return False
            self._readers += 1
            return True

    def up_read(self) -> None:
        with self._cond:
            self._readers -= 1
            self._cond.notify_all()

    def down_write(self) -> None:
        kernel = self._kernel
        limit = time.monotonic() + kernel.lock_timeout_s()
        with self._cond:
            while self._writer or self._readers:
                if time.monotonic() >= limit:
                    raise HangError(kernel.report(
                        "hang", kernel.hung_task(kernel.lock_timeout_s()),
                        f"down_write(&parent->unreg_sem): {self._readers} "
                        f"reader(s){' and a writer' if self._writer else ''} hold it"))
                self._cond.wait(0.02)  # bounded, so signal handlers run
            self._writer = True

    def up_write(self) -> None:
        with self._cond:
            self._writer = False
            self._cond.notify_all()


class MdevType:
    """struct mdev_type: what userspace creates instances of."""

    def __init__(self, parent: MdevParent, name: str) -> None:
        self.parent = parent
        self.name = name

    def __repr__(self) -> str:
        return f"<MdevType {self.name}>"


class MdevParent(Tracked):
    """struct mdev_parent: kzalloc() it, or embed it (memory.embedded) in the driver's struct.

    The caller must keep it - and dev - alive until mdev_unregister_parent().
    """

    def _kzalloc(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self.dev: Device | None = None
        self.driver: Any = None
        self.types: list[MdevType] = []
        self.available_instances = 0
        self.max_instances = 0
        self.unreg_sem = RWSem(kernel)
        self.registered = False


class MdevDevice(StructDevice):
    """struct mdev_device: a refcounted struct device; its release returns the instance."""

    def _kzalloc(self, kernel: Kernel) -> None:
        super()._kzalloc(kernel)
        self.parent: MdevParent | None = None
        self.type: MdevType | None = None
        self.uuid = ""
        self.active = False
        self.counted = False
        self.pins_parent = False
        self.release = mdev_device_release

    def __repr__(self) -> str:
        mem = mem_of(self)
        if mem is not None and mem.freed:
            return f"<MdevDevice {mem.what} freed>"
        return f"<MdevDevice {self.uuid}>"


def mdev_register_parent(parent: MdevParent, dev: Device, driver: Any,
                         types: list[str]) -> int:
    """Make dev an mdev parent with these type names; available = driver.max_instances."""
    if not isinstance(parent, MdevParent):
        raise InvalidArgumentError(f"mdev_register_parent: {parent!r} is not an MdevParent")
    if not isinstance(dev, Device):
        raise InvalidArgumentError(f"mdev_register_parent: {dev!r} is not a Device")
    if not types or not all(isinstance(t, str) and t for t in types):
        raise InvalidArgumentError(f"mdev_register_parent: types must be names, not {types!r}")
    for attr in ("probe", "remove"):
        if not callable(getattr(driver, attr, None)):
            raise InvalidArgumentError(f"mdev_register_parent: the mdev driver has no {attr}()")
    parent.dev, parent.driver = dev, driver
    parent.types = [MdevType(parent, t) for t in types]
    parent.available_instances = parent.max_instances = int(
        getattr(driver, "max_instances", 0) or 0)
    parent.registered = True
    parent.kernel.trace.record(parent.kernel.jiffies(), dev.name, "mdev_register_parent",
                               detail=f"available {parent.available_instances}")
    return 0


def mdev_unregister_parent(parent: MdevParent) -> None:
    """Remove every child mdev (each may block on its FDs) with unreg_sem held for write."""
    kernel = parent.kernel
    if not isinstance(parent, MdevParent):
        raise InvalidArgumentError(f"mdev_unregister_parent: {parent!r} is not an MdevParent")
    parent.unreg_sem.down_write()
    try:
        # Every child still in the device tree, whatever its 'active' flag says.
        for mdev in [m for m in kernel.mdevs if m.parent is parent and m.added]:
            mdev.active = False
            _remove(mdev)
    finally:
        parent.unreg_sem.up_write()
    parent.registered = False
    kernel.trace.record(kernel.jiffies(), parent.dev.name if parent.dev else "-",
                        "mdev_unregister_parent")


def _check_accounting(parent: MdevParent, when: str) -> None:
    """The emulator's own check (the kernel has none): every counted instance is either
    available or held by a live mdev - not lost, not counted twice."""
    if getattr(parent.driver, "get_available", None) is not None:
        return
    live = sum(1 for m in parent.kernel.mdevs if m.parent is parent and m.counted)
    if parent.available_instances + live != parent.max_instances:
        parent.kernel.warn(
            f"mdev: {parent.dev.name if parent.dev else '?'}: available_instances "
            f"{parent.available_instances} + {live} live instance(s) != max_instances "
            f"{parent.max_instances} {when}: an instance was lost or counted twice")


def mdev_device_create(mtype: MdevType, uuid: str) -> MdevDevice | int:
    """Create an instance: counted against max_instances unless the driver has
    get_available; the driver's probe runs; the mdev, or -errno."""
    if not isinstance(mtype, MdevType):
        raise InvalidArgumentError(f"mdev_device_create: {mtype!r} is not an MdevType")
    parent = mtype.parent
    kernel = parent.kernel
    driver = parent.driver
    counted = getattr(driver, "get_available", None) is None
    fault = kernel.injected("mdev_create")
    if fault:
        return fault
    with kernel.mdev_list_lock:  # the uuid check, the instance and the list add, as one
        if any(m.uuid == uuid for m in kernel.mdevs):
            return -EEXIST
        if counted:
            if parent.available_instances == 0:
                return -EUSERS
            parent.available_instances -= 1
        mdev = kzalloc(kernel, MdevDevice)
        if mdev is None:
            _check_accounting(parent, "after a failed create")
            return -ENOMEM  # as upstream: the instance taken above is not given back
        device_initialize(mdev)
        mdev.parent, mdev.type, mdev.uuid, mdev.counted = parent, mtype, uuid, counted
        mdev.name = uuid
        kernel.mdevs.append(mdev)
    if not parent.unreg_sem.down_read_trylock():
        mdev_put_device(mdev)
        return -ENODEV
    try:
        mdev.added = True  # device_add(): pins the parent device until the release
        if parent.dev is not None:
            mdev.pins_parent = True
            parent.dev.get_ref()
        ret = driver.probe(mdev)
        if ret:
            _device_del(mdev)
            mdev_put_device(mdev)
            return int(ret)
        mdev.active = True
    finally:
        parent.unreg_sem.up_read()
    kernel.trace.record(kernel.jiffies(), uuid, "mdev_device_create",
                        detail=f"available {parent.available_instances}")
    with kernel.mdev_list_lock:
        _check_accounting(parent, "after create")
    return mdev


def _remove(mdev: MdevDevice) -> None:
    """device_del (the driver's remove, which may block in unregister), then put_device."""
    assert mdev.parent is not None
    mdev.added = False  # device_del(), whose bus remove calls the driver's remove
    mdev.parent.driver.remove(mdev)
    mdev.kernel.trace.record(mdev.kernel.jiffies(), mdev.uuid, "mdev_device_remove")
    mdev_put_device(mdev)


def _device_del(mdev: MdevDevice) -> None:
    """device_del(): out of the device tree (the parent stays pinned until the release)."""
    mdev.added = False


def mdev_device_remove(mdev: MdevDevice) -> int:
    """sysfs 'remove': 0, -ENODEV (unknown, or its parent is unregistering) or -EAGAIN."""
    if not isinstance(mdev, MdevDevice):
        raise InvalidArgumentError(f"mdev_device_remove: {mdev!r} is not an MdevDevice")
    if mdev not in mdev.kernel.mdevs:
        return -ENODEV
    if not mdev.active:
        return -EAGAIN
    mdev.active = False
    parent = mdev.parent
    assert parent is not None
    if not parent.unreg_sem.down_read_trylock():
        return -ENODEV
    try:
        _remove(mdev)  # may drop the last reference: mdev is gone afterwards
    finally:
        parent.unreg_sem.up_read()
    return 0


def mdev_get_device(mdev: MdevDevice) -> MdevDevice:
    """get_device(&mdev->dev)."""
    get_device(mdev)
    return mdev


def mdev_put_device(mdev: MdevDevice) -> None:
    """put_device(&mdev->dev); the last one runs mdev_device_release()."""
    put_device(mdev)


def mdev_device_release(mdev: StructDevice) -> None:
    """Unlink, give the instance back (if counted) - touching the parent - and free."""
    assert isinstance(mdev, MdevDevice)
    kernel = mdev.kernel
    parent = mdev.parent
    with kernel.mdev_list_lock:
        if mdev in kernel.mdevs:
            kernel.mdevs.remove(mdev)
        if mdev.counted and parent is not None:
            parent.available_instances += 1  # a freed parent makes this a use-after-free
        kernel.trace.record(kernel.jiffies(), mdev.uuid, "mdev_device_release",
                            detail=f"available {parent.available_instances if parent else '-'}")
        pinned = parent.dev if parent is not None and mdev.pins_parent else None
        kfree(mdev)
        if parent is not None:
            _check_accounting(parent, "after release")
    if pinned is not None:
        pinned.put_ref()  # the parent reference goes with the child's cleanup
