"""struct device (include/linux/device.h) and the kobject inside it.

Two kinds.  A bus device (a PCI function, a subchannel) outlives everything
the emulation does to it, so its references are not counted.  A refcounted
struct device of the driver's own (vfio-ccw's v6.2 parent, vfio-ap's
matrix_dev) or of the mdev core is kernel memory: device_register() =
device_initialize() + device_add(); once initialized it must go with
put_device(), whose release frees it - never with kfree(): that leaks the
kobject's name (what ce3895735cc2 fixed) and skips the release.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vfio_emu.errors import InvalidArgumentError
from vfio_emu.linux.errno import ENOMEM
from vfio_emu.linux.slab import Tracked, kfree, kzalloc, mem_of
from vfio_emu.stack import capture_stack

if TYPE_CHECKING:  # annotations only: the kernel state holds the bus devices
    from vfio_emu.linux.kernel import Kernel


class Device:
    """A parent struct device (e.g. &pdev->dev): a name, driver data, and its kernel.

    A bus device (a PCI function, a subchannel) outlives everything here, so
    its references are not counted; a StructDevice's are (an mdev's, say).
    """

    def __init__(self, kernel: Kernel, name: str) -> None:
        self.kernel = kernel
        self.name = name
        self.drvdata: Any = None

    def __repr__(self) -> str:
        return f"<Device {self.name}>"

    def get_ref(self) -> None:
        """get_device() by a child's device_add(): nothing to count for a bus device."""

    def put_ref(self) -> None:
        """put_device() by a child's device_del()."""


class KName(Tracked):
    """The string dev_set_name() allocates (kobject->name), freed at kobject cleanup."""

    def _kzalloc(self, kernel: Kernel) -> None:
        self.text = ""


class StructDevice(Tracked, Device):
    """struct device, refcounted: kzalloc() it (or a subclass), set .parent if it has one,
    then device_register().  While it is in sysfs (device_add() to device_del()) it holds a
    reference on its parent, as kobject_add()/kobject_del() do."""

    def _kzalloc(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self.name = ""
        self.drvdata = None
        self.parent: Device | None = None  # dev->parent
        self.kname: KName | None = None
        self.kref = kernel.arena.kref(label=f"device@{id(self):#x}", count=0)  # zeroed
        self.initialized = False
        self.added = False  # kobj->state_in_sysfs
        self.release: Callable[[StructDevice], None] | None = None
        self.holders: list[Any] = []

    def _kfree(self) -> None:
        object.__getattribute__(self, "kref").free()

    def __repr__(self) -> str:
        mem = mem_of(self)
        return (f"<{type(self).__name__} {mem.what} freed>" if mem is not None and mem.freed
                else f"<{type(self).__name__} {self.name}>")

    def get_ref(self) -> None:
        get_device(self)

    def put_ref(self) -> None:
        put_device(self)

    def _bus_remove(self) -> None:
        """bus_remove_device() inside device_del(): unbind the driver (the mdev bus does)."""


def _check(dev: object, access: str) -> StructDevice:
    if not isinstance(dev, StructDevice):
        raise InvalidArgumentError(f"{access}: {dev!r} is not a refcounted struct device")
    return dev


def device_initialize(dev: StructDevice) -> None:
    """The kobject exists from here on: only put_device() may free the device now."""
    _check(dev, "device_initialize")
    if dev.initialized:
        dev.kernel.warn(f"kobject ({id(dev):#x}): tried to init an initialized object, "
                        "something is seriously wrong.")
    dev.kref.init()
    dev.initialized = True


def dev_set_name(dev: StructDevice, name: str) -> int:
    """Allocate the device's name; 0 or -ENOMEM."""
    _check(dev, "dev_set_name")
    kname = kzalloc(dev.kernel, KName)
    if kname is None:
        return -ENOMEM
    kname.text = name
    mem = mem_of(kname)
    assert mem is not None
    mem.what = f"kobject name '{name}' of {type(dev).__name__}@{id(dev):#x}"
    if dev.kname is not None:
        kfree(dev.kname)
    dev.kname, dev.name = kname, name
    return 0


def device_add(dev: StructDevice, *, inject: bool = True) -> int:
    """Into sysfs, holding a reference on dev->parent (kobject_add) until device_del();
    fails (-ENOMEM) when an allocation failure is injected (inject=False: a step of the
    kernel's own that the checker does not fail)."""
    _check(dev, "device_add")
    if inject:
        fail = dev.kernel.should_fail_alloc(f"device_add {type(dev).__name__}")
        if fail:
            return fail
    if dev.parent is not None:
        dev.parent.get_ref()
    dev.added = True
    dev.kernel.trace.add(dev.kernel.jiffies(), dev.name or "-", "device_add")
    return 0


def device_register(dev: StructDevice, name: str | None = None) -> int:
    """device_initialize() then device_add(); on failure the caller must put_device()."""
    device_initialize(dev)
    if name is not None:
        ret = dev_set_name(dev, name)
        if ret:
            return ret
    return device_add(dev)


def device_del(dev: StructDevice) -> None:
    """Out of the device tree: the bus unbinds its driver, then kobject_del() drops the
    reference on the parent."""
    _check(dev, "device_del")
    if not dev.added:
        return
    dev.added = False
    dev._bus_remove()
    if dev.parent is not None:
        dev.parent.put_ref()


def device_unregister(dev: StructDevice) -> None:
    """device_del() then put_device()."""
    device_del(dev)
    put_device(dev)


def get_device(dev: StructDevice) -> StructDevice:
    _check(dev, "get_device")
    dev.kref.get()
    dev.holders.append(capture_stack())
    return dev


def put_device(dev: StructDevice) -> None:
    """Drop a reference; the last one runs kobject cleanup (see _cleanup)."""
    _check(dev, "put_device")
    if not dev.initialized:
        dev.kernel.warn(f"kobject: '{dev.name or '(null)'}' ({id(dev):#x}): is not "
                        "initialized, yet kobject_put() is being called.")
    if dev.holders:
        dev.holders.pop()
    if dev.kref.put():
        dev.kernel.kobject_release(lambda: _cleanup(dev), dev.name or type(dev).__name__)


def _cleanup(dev: StructDevice) -> None:
    """kobject_cleanup(): a device still in sysfs is taken out (its parent reference is
    dropped last, after the release); then dev->release, then the name is freed."""
    parent = dev.parent if dev.added else None
    dev.added = False
    kname, release = dev.kname, dev.release
    if release is None:
        dev.kernel.warn(f"Device '{dev.name}' does not have a release() function, it is broken "
                        "and must be fixed. See Documentation/core-api/kobject.rst.")
    else:
        release(dev)  # may free dev: nothing of it is touched afterwards
    if kname is not None:
        kfree(kname)
    if parent is not None:
        parent.put_ref()
