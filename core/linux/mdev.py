"""The mdev core (drivers/vfio/mdev, v6.1): parents, types, instances and their accounting.

The driver owns the memory: its struct mdev_parent and struct mdev_type are
embedded in its own structures.  Each type has a kobject: registering the
parent takes get_device(parent->dev) for it (mdev_type_add), every mdev
takes a reference on it (mdev_device_create), and its release - after the
parent is unregistered and the last mdev released - puts parent->dev
(mdev_type_release).  mdev_device_release() reads mdev->type->parent, gives
the instance back to the parent (when the core counts them) and puts the
type: so an instance comes back only when the mdev OBJECT is released, not at
remove, and a type or parent freed before that release is a use-after-free.
A parent's unreg_sem is held for write while mdev_unregister_parent()
removes every child; creates meanwhile fail.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from vfio_emu.errors import HangError, InvalidArgumentError
from vfio_emu.linux.device import (
    Device,
    StructDevice,
    device_add,
    device_del,
    device_initialize,
    get_device,
    put_device,
)
from vfio_emu.linux.errno import EAGAIN, EEXIST, ENODEV, ENOENT, ENOMEM, EUSERS
from vfio_emu.linux.kernel import Kernel
from vfio_emu.linux.slab import Tracked, kfree, kzalloc, mem_of


class RWSem:
    """A reader/writer semaphore with the trylock the mdev core uses; down_write waits
    under the kernel's watchdog."""

    def __init__(self, kernel: Kernel) -> None:
        self._kernel = kernel
        self._lock = threading.Lock()  # never taken twice by one thread: no RLock needed
        #: What a waiting down_write() sleeps on: made (under _lock) by the first one.
        self._cond: threading.Condition | None = None
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0  # only a waiting writer is woken

    def down_read_trylock(self) -> bool:
        sched = self._kernel.sched  # kernel.preempt(), without its call when none runs
        if sched is not None:
            sched.preempt("down_read_trylock(&parent->unreg_sem)")
        with self._lock:
            if self._writer:
                return False
            self._readers += 1
            return True

    def up_read(self) -> None:
        with self._lock:
            self._readers -= 1
            if self._writers_waiting and self._cond is not None:
                self._cond.notify_all()
        sched = self._kernel.sched  # kernel.preempt(), without its call when none runs
        if sched is not None:
            sched.preempt("up_read(&parent->unreg_sem)")

    def down_write(self) -> None:
        kernel = self._kernel
        sched = kernel.sched
        if sched is not None and sched.current is not None:
            sched.preempt("down_write(&parent->unreg_sem)")
            while self._writer or self._readers:
                sched.block(lambda: not (self._writer or self._readers),
                            "down_write(&parent->unreg_sem)")
            self._writer = True
            return
        limit = time.monotonic() + kernel.lock_timeout_s()
        with self._lock:
            if self._writer or self._readers:
                if self._cond is None:
                    self._cond = threading.Condition(self._lock)
                cond = self._cond
                self._writers_waiting += 1
                try:
                    while self._writer or self._readers:
                        kernel.run_delayed_work()  # a waiting task lets queued releases run
                        if time.monotonic() >= limit:
                            raise HangError(kernel.report(
                                "hang", kernel.hung_task(kernel.lock_timeout_s()),
                                f"down_write(&parent->unreg_sem): {self._readers} "
                                f"reader(s){' and a writer' if self._writer else ''} hold it"))
                        cond.wait(0.02)  # bounded, so signal handlers run
                finally:
                    self._writers_waiting -= 1
            self._writer = True

    def up_write(self) -> None:
        with self._lock:
            self._writer = False
            if self._writers_waiting and self._cond is not None:
                self._cond.notify_all()
        sched = self._kernel.sched  # kernel.preempt(), without its call when none runs
        if sched is not None:
            sched.preempt("up_write(&parent->unreg_sem)")


class MdevType(Tracked):
    """struct mdev_type: embed it in the driver's struct (slab.embedded) and name it
    (sysfs_name); mdev_register_parent() adds it.  Its kobject counts the parent's
    registration and every mdev of the type."""

    def _kzalloc(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self.sysfs_name = ""
        self.pretty_name = ""
        self.parent: MdevParent | None = None
        # zeroed memory: kobject_init() in mdev_type_add makes it 1
        self.kobj = kernel.arena.kref(label=f"mdev_type@{id(self):#x}", count=0)
        self.in_sysfs = False  # its directory, and so its 'create' file, exists

    def _kfree(self) -> None:
        object.__getattribute__(self, "kobj").free()

    def __repr__(self) -> str:
        mem = mem_of(self)
        if mem is not None and mem.freed:
            return f"<MdevType {mem.what} freed>"
        return f"<MdevType {self.sysfs_name}>"


class MdevParent(Tracked):
    """struct mdev_parent: embed it (slab.embedded) in the driver's struct, or kzalloc() it.

    The caller must keep it - and dev - alive until mdev_unregister_parent() (and, as the
    kernel has it, until the last mdev of its types is released: that release writes it).
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
    """struct mdev_device: a refcounted struct device whose parent is the parent's device;
    mdev->type leads to the mdev_parent.  Its release gives the instance back."""

    def _kzalloc(self, kernel: Kernel) -> None:
        super()._kzalloc(kernel)
        self.type: MdevType | None = None
        self.uuid = ""
        self.active = False
        self.bound = False  # the mdev driver's probe succeeded: device_del() unbinds it
        #: The emulator's own bookkeeping (no kernel field): the parent whose instance this
        #: mdev holds, compared by identity only, for the accounting check.
        self.accounted_to: MdevParent | None = None
        self.release = mdev_device_release

    def __repr__(self) -> str:
        mem = mem_of(self)
        if mem is not None and mem.freed:
            return f"<MdevDevice {mem.what} freed>"
        return f"<MdevDevice {self.uuid}>"

    def _bus_remove(self) -> None:
        """device_del() of a bound mdev: the bus unbinds the driver (its remove, which may
        block in vfio_unregister_group_dev)."""
        if self.bound:
            self.bound = False
            assert self.type is not None and self.type.parent is not None
            self.type.parent.driver.remove(self)


def _counts_instances(parent: MdevParent) -> bool:
    """The core counts instances unless the driver has get_available."""
    return getattr(parent.driver, "get_available", None) is None


def mdev_register_parent(parent: MdevParent, dev: Device, driver: Any,
                         types: list[MdevType]) -> int:
    """Make dev an mdev parent with these types (each takes get_device(dev) until its
    kobject is released); available_instances = driver.max_instances."""
    if not isinstance(parent, MdevParent):
        raise InvalidArgumentError(f"mdev_register_parent: {parent!r} is not an MdevParent")
    if not isinstance(dev, Device):
        raise InvalidArgumentError(f"mdev_register_parent: {dev!r} is not a Device")
    if (not types or not all(isinstance(t, MdevType) for t in types)
            or not all(isinstance(t.sysfs_name, str) and t.sysfs_name for t in types)):
        raise InvalidArgumentError(
            f"mdev_register_parent: types must be named MdevType structs, not {types!r}")
    for attr in ("probe", "remove"):
        if not callable(getattr(driver, attr, None)):
            raise InvalidArgumentError(f"mdev_register_parent: the mdev driver has no {attr}()")
    fault = parent.kernel.injected("mdev_register_parent")
    if fault:  # e.g. parent_create_sysfs_files() failing: nothing was registered
        return fault
    parent.dev, parent.driver = dev, driver
    parent.types = list(types)
    parent.available_instances = parent.max_instances = int(
        getattr(driver, "max_instances", 0) or 0)
    for mtype in parent.types:  # parent_create_sysfs_files()
        _mdev_type_add(parent, mtype)
    parent.registered = True
    parent.kernel.mdev_parents.append(parent)
    parent.kernel.trace.add(parent.kernel.jiffies(), dev.name, "mdev_register_parent",
                            detail=f"available {parent.available_instances}")
    return 0


def _mdev_type_add(parent: MdevParent, mtype: MdevType) -> None:
    """mdev_type_add(): the type's kobject (1), pinning parent->dev until its release."""
    mtype.parent = parent
    assert parent.dev is not None
    parent.dev.get_ref()
    mtype.kobj.init()
    mtype.in_sysfs = True


def _mdev_type_remove(mtype: MdevType) -> None:
    """mdev_type_remove(): out of sysfs (no more 'create'), then the registration's put."""
    mtype.in_sysfs = False
    _mdev_type_put(mtype)


def _mdev_type_put(mtype: MdevType) -> None:
    """kobject_put(&type->kobj); the last one releases it (later, with delayed release)."""
    if mtype.kobj.put():
        mtype.kernel.kobject_release(lambda: _mdev_type_release(mtype),
                                     f"mdev_type {mtype.sysfs_name}")


def _mdev_type_release(mtype: MdevType) -> None:
    """mdev_type_release(): put_device(type->parent->dev) - reading the type and the parent."""
    parent = mtype.parent
    assert parent is not None and parent.dev is not None
    parent.dev.put_ref()


def mdev_unregister_parent(parent: MdevParent) -> None:
    """Remove every child mdev (each may block on its FDs) with unreg_sem held for write,
    then the types' sysfs files."""
    if not isinstance(parent, MdevParent):
        raise InvalidArgumentError(f"mdev_unregister_parent: {parent!r} is not an MdevParent")
    kernel = parent.kernel
    parent.unreg_sem.down_write()
    try:
        # device_for_each_child(parent->dev): every mdev still in the device tree.
        for mdev in [m for m in kernel.mdevs if m.parent is parent.dev and m.added]:
            _remove(mdev)
        for mtype in parent.types:  # parent_remove_sysfs_files()
            _mdev_type_remove(mtype)
    finally:
        parent.unreg_sem.up_write()
    parent.registered = False
    if parent in kernel.mdev_parents:
        kernel.mdev_parents.remove(parent)
    kernel.trace.add(kernel.jiffies(), parent.dev.name if parent.dev else "-",
                     "mdev_unregister_parent")


def _check_accounting(parent: MdevParent, when: str) -> None:
    """The emulator's own check (the kernel has none): every counted instance is either
    available or held by a live mdev - not lost, not counted twice."""
    if not _counts_instances(parent):
        return
    live = sum(1 for m in parent.kernel.mdevs if m.accounted_to is parent)
    if parent.available_instances + live != parent.max_instances:
        parent.kernel.warn(
            f"mdev: {parent.dev.name if parent.dev else '?'}: available_instances "
            f"{parent.available_instances} + {live} live instance(s) != max_instances "
            f"{parent.max_instances} {when}: an instance was lost or counted twice")


def mdev_device_create(mtype: MdevType, uuid: str) -> MdevDevice | int:
    """The type's sysfs 'create': an instance (counted against max_instances unless the
    driver has get_available), probed by the driver; the mdev, or -errno (-ENOENT once the
    parent is unregistered: the file is gone)."""
    if not isinstance(mtype, MdevType):
        raise InvalidArgumentError(f"mdev_device_create: {mtype!r} is not an MdevType")
    if not mtype.in_sysfs:
        return -ENOENT
    parent = mtype.parent
    assert parent is not None and parent.dev is not None
    kernel = parent.kernel
    driver = parent.driver
    fault = kernel.injected("mdev_create")
    if fault:
        return fault
    with kernel.mdev_list_lock:  # the uuid check, the instance and the list add, as one
        if any(m.uuid == uuid for m in kernel.mdevs):
            return -EEXIST
        if _counts_instances(parent):
            if parent.available_instances == 0:
                return -EUSERS
            parent.available_instances -= 1
        mdev = kzalloc(kernel, MdevDevice)
        if mdev is None:
            _check_accounting(parent, "after a failed create")
            return -ENOMEM  # as upstream: the instance taken above is not given back
        device_initialize(mdev)
        mdev.parent, mdev.type, mdev.uuid, mdev.name = parent.dev, mtype, uuid, uuid
        mdev.accounted_to = parent if _counts_instances(parent) else None
        mtype.kobj.get()  # pairs with the put in mdev_device_release()
        kernel.mdevs.append(mdev)
    if not parent.unreg_sem.down_read_trylock():
        mdev_put_device(mdev)
        return -ENODEV
    try:
        device_add(mdev, inject=False)  # pins parent->dev until device_del
        ret = driver.probe(mdev)  # device_driver_attach()
        if ret:
            device_del(mdev)
            mdev_put_device(mdev)
            return int(ret)
        mdev.bound = mdev.active = True
    finally:
        parent.unreg_sem.up_read()
    kernel.trace.add(kernel.jiffies(), uuid, "mdev_device_create",
                     detail=f"available {parent.available_instances}")
    with kernel.mdev_list_lock:
        _check_accounting(parent, "after create")
    return mdev


def _remove(mdev: MdevDevice) -> None:
    """mdev_device_remove_common(): device_del (the driver's remove, which may block in
    unregister; then the parent reference goes), then the put that balances
    device_initialize()."""
    device_del(mdev)
    mdev.kernel.trace.add(mdev.kernel.jiffies(), mdev.uuid, "mdev_device_remove")
    mdev_put_device(mdev)


def mdev_device_remove(mdev: MdevDevice) -> int:
    """sysfs 'remove': 0, -ENODEV (unknown, or its parent is unregistering) or -EAGAIN."""
    if not isinstance(mdev, MdevDevice):
        raise InvalidArgumentError(f"mdev_device_remove: {mdev!r} is not an MdevDevice")
    kernel = mdev.kernel
    with kernel.mdev_list_lock:
        if mdev not in kernel.mdevs:
            return -ENODEV
        if not mdev.active:
            return -EAGAIN
        mdev.active = False
    assert mdev.type is not None and mdev.type.parent is not None
    parent = mdev.type.parent
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


def mdev_device_release(dev: StructDevice) -> None:
    """mdev_device_release(): parent = mdev->type->parent; off the list and, if the core
    counts instances, available_instances++ (a freed type or parent makes these
    use-after-free); then the put of the type; then kfree(mdev)."""
    assert isinstance(dev, MdevDevice)
    mdev, kernel = dev, dev.kernel
    mtype = mdev.type
    assert mtype is not None
    parent = mtype.parent
    assert parent is not None
    with kernel.mdev_list_lock:
        if mdev in kernel.mdevs:
            kernel.mdevs.remove(mdev)
        if _counts_instances(parent):
            parent.available_instances += 1
        kernel.trace.add(kernel.jiffies(), mdev.uuid, "mdev_device_release",
                         detail=f"available {parent.available_instances}")
        _check_accounting(parent, "after release")
    _mdev_type_put(mtype)  # pairs with the get in mdev_device_create()
    kfree(mdev)
