"""mtty: the virtual serial-port mdev sample (samples/vfio-mdev/mtty.c), as a plugin.

Its life cycle, as converted to the helpers: init reserves ports from a global
pool (a CAS loop; -ENOSPC when too few are left) and allocates the config
space (on failure it gives the ports back: -ENOMEM); release gives the ports
back, frees the config space and - in v6.1 - the device.  The ports come back
at release, not at remove.  It counts its own instances (get_available), so
the mdev core does not.  Its ops are init and release only (v6.1 mtty_dev_ops:
no open_device, close_device or request): an unregister with an FD held just
waits.  The mdev parent and the two types live in the module's static
mtty_dev; the parent device is the sample's own static device.
"""

from __future__ import annotations

from typing import Any

from vfio_emu.linux.errno import ENOMEM, ENOSPC
from vfio_emu.linux.kernel import Kernel
from vfio_emu.linux.mdev import (
    MdevDevice,
    MdevParent,
    MdevType,
    mdev_device_create,
    mdev_device_remove,
    mdev_register_parent,
    mdev_unregister_parent,
)
from vfio_emu.linux.slab import Tracked, embedded, kfree, kzalloc, module_static
from vfio_emu.linux.vfio import (
    VfioDevice,
    vfio_alloc_device,
    vfio_free_device,
    vfio_put_device,
    vfio_register_emulated_iommu_dev,
    vfio_unregister_group_dev,
)
from vfio_emu.plugins.hookspecs import hookimpl
from vfio_emu.plugins.manager import KnownFinding

MAX_FIFOS = 24  # the port pool: MAX_MTTYS * 2 in the C sample
#: mtty_types[]: (sysfs_name, pretty_name); an instance of type i has i + 1 ports.
TYPES = (("1", "Single port serial"), ("2", "Dual port serial"))


class Globals(Tracked):
    """The module's statics: mtty_dev (with its mdev parent), mtty_types, the port pool."""

    def _kzalloc(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self.avail_ports = MAX_FIFOS


class VConfig(Tracked):
    """The emulated PCI config space, kzalloc()ed by init."""


class MdevState(VfioDevice):
    """struct mdev_state: the vfio_device first, then the serial ports."""


def _nr_ports(g: Globals, mtype: MdevType) -> int:
    return int(g.types.index(mtype)) + 1


def _globals(kernel: Kernel) -> Globals:
    g = kernel.module_data.get("mtty")
    assert isinstance(g, Globals), "mtty: driver_init has not run"
    return g


@hookimpl
def driver_init(kernel: Kernel, driver: Any) -> int:
    g = module_static(kernel, Globals)
    kernel.module_data["mtty"] = g
    g.parent = embedded(g, MdevParent)
    g.types = []
    for sysfs_name, pretty_name in TYPES:
        mtype = embedded(g, MdevType)
        mtype.sysfs_name, mtype.pretty_name = sysfs_name, pretty_name
        g.types.append(mtype)
    adapter = driver.mdev_driver(kernel, get_available=lambda mtype: g.avail_ports //
                                 _nr_ports(g, mtype))
    ret = mdev_register_parent(g.parent, kernel.device("mtty"), adapter, g.types)
    if ret:  # mtty_dev_init's err_device: the static device goes (nothing to free)
        del kernel.module_data["mtty"]
        return ret
    return 0


@hookimpl
def driver_exit(kernel: Kernel, driver: Any) -> None:
    g = _globals(kernel)
    mdev_unregister_parent(g.parent)
    del kernel.module_data["mtty"]


@hookimpl
def init(vdev: MdevState) -> int:
    """mtty_init_dev: reserve the ports, allocate the config space."""
    g = _globals(vdev.dev.kernel)  # type: ignore[union-attr]
    mdev = vdev.dev
    assert isinstance(mdev, MdevDevice) and isinstance(mdev.type, MdevType)
    nr_ports = _nr_ports(g, mdev.type)  # mdev->type - mtty_types + 1
    if g.avail_ports < nr_ports:  # the C loop is an atomic_try_cmpxchg on the pool
        return -ENOSPC
    g.avail_ports -= nr_ports
    vdev.globals = g  # the C code reaches its statics; the mdev may be gone by release
    vdev.nr_ports = nr_ports
    vconfig = kzalloc(mdev.kernel, VConfig)
    if vconfig is None:
        g.avail_ports += nr_ports
        return -ENOMEM
    vdev.vconfig = vconfig
    return 0


@hookimpl
def release(vdev: MdevState) -> None:
    """mtty_release_dev: the ports go back now, not at remove (never touching the mdev,
    which remove may already have freed)."""
    g = vdev.globals
    g.avail_ports += vdev.nr_ports
    kfree(vdev.vconfig)
    if g.kernel.semantics == "v6.1":
        vfio_free_device(vdev)


@hookimpl
def probe(kernel: Kernel, driver: Any, dev: MdevDevice) -> int:
    """mtty_probe: the generic pattern of alloc, register, put on a register failure."""
    vdev = vfio_alloc_device(MdevState, dev, driver.ops)
    if isinstance(vdev, int):
        return vdev
    ret = vfio_register_emulated_iommu_dev(vdev)
    if ret:
        vfio_put_device(vdev)
        return ret
    dev.drvdata = vdev
    return 0


@hookimpl
def check_bind(kernel: Kernel, driver: Any, name: str) -> MdevDevice | int:
    """An mdev of the first type, created through the parent's sysfs."""
    return mdev_device_create(_globals(kernel).types[0], name)


@hookimpl
def check_unbind(kernel: Kernel, driver: Any, dev: MdevDevice) -> int:
    return mdev_device_remove(dev)


@hookimpl
def remove(kernel: Kernel, driver: Any, dev: MdevDevice) -> None:
    """mtty_remove: unregister (no request op: it just waits), then put."""
    vdev = dev.drvdata
    vfio_unregister_group_dev(vdev)
    vfio_put_device(vdev)


@hookimpl
def check_known_findings() -> list[KnownFinding]:
    return [KnownFinding(
        "*on request", "no request op",
        "the v6.1 mtty sample has no request op: removing an mdev a VMM holds waits until "
        "the VMM lets go on its own")]
