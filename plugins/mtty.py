"""mtty: the virtual serial-port mdev sample (samples/vfio-mdev/mtty.c), as a plugin.

Its life cycle, as converted to the helpers: init reserves ports from a global
pool (a CAS loop; -ENOSPC when too few are left) and allocates the config
space (on failure it gives the ports back: -ENOMEM); release gives the ports
back, frees the config space and - in v6.1 - the device.  The ports come back
at release, not at remove.  It counts its own instances (get_available), so
the mdev core does not, and it has no request op: an unregister with an FD
held just waits.
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
from vfio_emu.linux.slab import Tracked, kfree, kzalloc
from vfio_emu.linux.vfio import (
    VfioDevice,
    vfio_alloc_device,
    vfio_free_device,
    vfio_put_device,
    vfio_register_emulated_iommu_dev,
    vfio_unregister_group_dev,
)
from vfio_emu.plugins.hookspecs import hookimpl

MAX_FIFOS = 24  # the port pool: MAX_MTTYS * 2 in the C sample
TYPES = {"mtty-1": 1, "mtty-2": 2}  # type name -> ports per instance


class Globals(Tracked):
    """The module's globals (mtty_dev): the parent, the port pool."""

    def _kzalloc(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self.avail_ports = MAX_FIFOS
        self.parent: MdevParent | None = None


class VConfig(Tracked):
    """The emulated PCI config space, kzalloc()ed by init."""


class MdevState(VfioDevice):
    """struct mdev_state: the vfio_device first, then the serial ports."""


def _globals(kernel: Kernel) -> Globals:
    g = kernel.module_data.get("mtty")
    assert isinstance(g, Globals), "mtty: driver_init has not run"
    return g


@hookimpl
def driver_init(kernel: Kernel, driver: Any) -> None:
    g = kzalloc(kernel, Globals)
    assert g is not None
    kernel.module_data["mtty"] = g
    parent = kzalloc(kernel, MdevParent)
    assert parent is not None
    g.parent = parent
    adapter = driver.mdev_driver(kernel, get_available=lambda mtype: g.avail_ports //
                                 TYPES[mtype.name])
    mdev_register_parent(parent, kernel.device("mtty"), adapter, list(TYPES))


@hookimpl
def driver_exit(kernel: Kernel, driver: Any) -> None:
    g = _globals(kernel)
    assert g.parent is not None
    mdev_unregister_parent(g.parent)
    kfree(g.parent)
    del kernel.module_data["mtty"]
    kfree(g)


@hookimpl
def init(vdev: MdevState) -> int:
    """mtty_init_dev: reserve the ports, allocate the config space."""
    g = _globals(vdev.dev.kernel)  # type: ignore[union-attr]
    mdev = vdev.dev
    assert isinstance(mdev, MdevDevice) and isinstance(mdev.type, MdevType)
    nr_ports = TYPES[mdev.type.name]
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
def open_device(vdev: MdevState) -> int:
    return 0


@hookimpl
def close_device(vdev: MdevState) -> None:
    pass


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
    g = _globals(kernel)
    assert g.parent is not None
    return mdev_device_create(g.parent.types[0], name)


@hookimpl
def check_unbind(kernel: Kernel, driver: Any, dev: MdevDevice) -> int:
    return mdev_device_remove(dev)


@hookimpl
def remove(kernel: Kernel, driver: Any, dev: MdevDevice) -> None:
    """mtty_remove: unregister (no request op: it just waits), then put."""
    vdev = dev.drvdata
    vfio_unregister_group_dev(vdev)
    vfio_put_device(vdev)
