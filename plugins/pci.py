"""vfio-pci, as a plugin: vfio_pci.c and vfio_pci_core.c as converted to the life-cycle helpers.

init allocates nothing (locks and lists only); release frees what was made later (the region
array a variant driver may add, the saved power state) and, in v6.1, the device.  Probe:
alloc, drvdata, then register_device - which picks the device set (root bus, slot or bus) and
leaves
its undo to release - then register; a failure puts.  open_device builds the region array,
close_device frees it and resets the bus if no other device of the set is open (the set open
count still counts the closing device, so "> 1" means "someone else").  request signals
userspace's eventfd, or says once that nobody listens; match finds the device by name for
VFIO_GROUP_GET_DEVICE_FD.  (v6.1 vfio_pci_ops: init, release, open_device, close_device,
request, match - and read/write/mmap/ioctl, which the life cycle does not reach.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vfio_emu.linux.device import Device
from vfio_emu.linux.errno import EINVAL, ENOMEM
from vfio_emu.linux.kernel import Kernel
from vfio_emu.linux.mutex import Mutex
from vfio_emu.linux.slab import Tracked, kfree, kzalloc
from vfio_emu.linux.vfio import (
    VfioDevice,
    vfio_alloc_device,
    vfio_assign_device_set,
    vfio_device_set_open_count,
    vfio_free_device,
    vfio_put_device,
    vfio_register_group_dev,
    vfio_unregister_group_dev,
)
from vfio_emu.plugins.hookspecs import hookimpl

#: vfio_pci_dev_in_denylist(): devices vfio-pci refuses to bind.
DENYLIST = frozenset({"0000:00:1f.3"})


class Regions(Tracked):
    """vdev->region: the device regions built at open."""


class VfioPciCoreDevice(VfioDevice):
    """struct vfio_pci_core_device: the vfio_device first."""


def slot_of(pdev: Device) -> str:
    """The slot of a device named domain:bus:slot.function."""
    return pdev.name.rsplit(".", 1)[0]


def bus_of(pdev: Device) -> str:
    """The PCI bus of a device named domain:bus:slot.function."""
    parts = pdev.name.split(":")
    return ":".join(parts[:2]) if len(parts) >= 3 else "0000:00"


def set_req_trigger(vdev: VfioPciCoreDevice, trigger: Callable[[int], object] | None) -> None:
    """VFIO_DEVICE_SET_IRQS on the request index: userspace's eventfd (None: unset)."""
    vdev.req_trigger = trigger


@hookimpl
def init(vdev: VfioPciCoreDevice) -> int:
    """vfio_pci_core_init_dev: allocates nothing."""
    vdev.pdev = vdev.dev
    vdev.irq_type = "none"
    kernel = vdev.pdev.kernel
    vdev.igate = Mutex(kernel, "vdev->igate")  # mutex_init()
    vdev.ioeventfds_lock = Mutex(kernel, "vdev->ioeventfds_lock")
    vdev.ioeventfds_list = []
    vdev.region = None
    vdev.pm_save = None
    vdev.req_trigger = None
    vdev.req_warned = False
    vdev.needs_reset = False
    vdev.resets = 0
    return 0


@hookimpl
def release(vdev: VfioPciCoreDevice) -> None:
    """vfio_pci_core_release_dev."""
    if vdev.region is not None:
        kfree(vdev.region)
    if vdev.pm_save is not None:
        kfree(vdev.pm_save)
    if vdev.pdev.kernel.semantics == "v6.1":
        vfio_free_device(vdev)


@hookimpl
def open_device(vdev: VfioPciCoreDevice) -> int:
    """vfio_pci_core_enable: the regions are built here."""
    region = kzalloc(vdev.pdev.kernel, Regions)
    if region is None:
        return -ENOMEM
    vdev.region = region
    return 0


@hookimpl
def close_device(vdev: VfioPciCoreDevice) -> None:
    """vfio_pci_core_disable (the device needs a reset now), then
    vfio_pci_dev_set_try_reset(): on the set's last close, reset the bus for every device
    of the set that needs it."""
    if vdev.region is not None:
        kfree(vdev.region)
        vdev.region = None
    vdev.needs_reset = True
    dev_set = vdev.dev_set
    assert dev_set is not None  # register always assigns one
    if vfio_device_set_open_count(dev_set) > 1:
        return  # another device of the set is open (the count still has this one)
    for member in dev_set.device_list:
        member.needs_reset = False
    vdev.resets += 1
    vdev.pdev.kernel.trace.add(vdev.pdev.kernel.jiffies(), f"vfio{vdev.index}",
                               "pci bus reset", detail=bus_of(vdev.pdev))


@hookimpl
def check_invariants(kernel: Kernel, driver: Any) -> list[str]:
    """vfio-pci's promise: once the last device of a set closes, no device of the set is
    left needing a reset (vfio_pci_dev_set_try_reset)."""
    broken = []
    for vdev in list(kernel.devices):
        if not isinstance(vdev, VfioPciCoreDevice) or vdev.dev_set is None:
            continue
        members = vdev.dev_set.device_list
        if getattr(vdev, "needs_reset", False) and all(m.open_count == 0 for m in members):
            broken.append(f"vfio-pci: {vdev.pdev.name} still needs a reset after the last "
                          "device of its set closed: the bus reset never happened")
    return broken


@hookimpl
def request(vdev: VfioPciCoreDevice, count: int) -> None:
    """vfio_pci_core_request."""
    if vdev.req_trigger is not None:
        vdev.req_trigger(count)
    elif count == 0 and not vdev.req_warned:
        vdev.req_warned = True
        vdev.pdev.kernel.report("info", f"vfio-pci {vdev.pdev.name}: No device request channel "
                                "registered, blocked until released by user")


@hookimpl
def match(vdev: VfioPciCoreDevice, buf: str) -> int:
    """vfio_pci_core_match: the device's name, then optionally " vf_token=<uuid>" - which
    only a PF or VF that uses tokens accepts (vfio_pci_validate_vf_token); none here."""
    name = vdev.pdev.name
    if not buf.startswith(name):
        return 0
    rest = buf[len(name):]
    if rest and rest[0] != " ":
        return 0  # non-whitespace after the name
    options = rest.split()
    if options and options[0].startswith("vf_token=") and len(options) == 1:
        return -EINVAL  # "VF token incorrectly provided, not a PF or VF"
    if options:
        return -EINVAL  # unknown or duplicate option
    return 1


def set_id_of(kernel: Kernel, vdev: VfioPciCoreDevice, dev: Device) -> object:
    """A device on a root bus is its own set; one whose slot can be reset shares the
    slot's set; any other shares its bus's.  (Set dev.root_bus / dev.slot_reset.)"""
    if getattr(dev, "root_bus", False):
        return vdev
    if getattr(dev, "slot_reset", False):
        return kernel.device(f"pci-slot-{slot_of(dev)}")
    return kernel.device(f"pci-bus-{bus_of(dev)}")


def _register_device(kernel: Kernel, vdev: VfioPciCoreDevice) -> int:
    """vfio_pci_core_register_device: the device set; its undo is left to release."""
    dev = vdev.dev
    assert dev is not None
    if dev.drvdata is not vdev:
        kernel.warn("WARNING: vfio_pci_core_register_device: dev_get_drvdata(dev) != vdev")
        return -EINVAL
    ret = vfio_assign_device_set(vdev, set_id_of(kernel, vdev, dev))
    if ret:
        return ret
    return vfio_register_group_dev(vdev)


@hookimpl
def probe(kernel: Kernel, driver: Any, dev: Device) -> int:
    """vfio_pci_probe."""
    if dev.name in DENYLIST:
        return -EINVAL
    vdev = vfio_alloc_device(VfioPciCoreDevice, dev, driver.ops)
    if isinstance(vdev, int):
        return vdev
    dev.drvdata = vdev
    ret = _register_device(kernel, vdev)
    if ret:
        dev.drvdata = None
        vfio_put_device(vdev)
        return ret
    return 0


@hookimpl
def remove(kernel: Kernel, driver: Any, dev: Device) -> None:
    """vfio_pci_remove: unregister, then the driver's put."""
    vdev = dev.drvdata
    vfio_unregister_group_dev(vdev)
    dev.drvdata = None
    vfio_put_device(vdev)
