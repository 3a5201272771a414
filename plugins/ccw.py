"""vfio-ccw as a plugin, in the shape of the kernel it runs in.

v6.1 (as converted by the life-cycle helpers): struct vfio_ccw_private belongs to the css
(subchannel) driver - allocated at css probe, freed at css remove - and embeds both the
vfio_device and the mdev parent, so it outlives every mdev.  mdev probe calls
vfio_init_device() on the embedded vdev (init re-arms release_comp); release memsets the
vdev and completes release_comp; mdev remove unregisters, puts, and waits on release_comp
before anyone may free the private.  The probe error path puts without waiting (the latent
re-probe race under delayed release).

v6.2 (the parent rework): a refcounted parent struct device holds the mdev parent; the
private follows the mdev - vfio_alloc_device() at mdev probe, its sub-allocations made by
init and freed by release, the core frees it; no completion.
"""

from __future__ import annotations

from typing import Any

from vfio_emu.linux.device import Device, StructDevice, device_del, device_register, put_device
from vfio_emu.linux.errno import ENODEV, ENOMEM
from vfio_emu.linux.kernel import Kernel
from vfio_emu.linux.mdev import (
    MdevDevice,
    MdevParent,
    mdev_device_create,
    mdev_device_remove,
    mdev_register_parent,
    mdev_unregister_parent,
)
from vfio_emu.linux.slab import Tracked, embedded, kfree, kzalloc
from vfio_emu.linux.vfio import (
    VfioDevice,
    holders_of,
    memset_vfio_device,
    vfio_alloc_device,
    vfio_init_device,
    vfio_put_device,
    vfio_register_emulated_iommu_dev,
    vfio_unregister_group_dev,
)
from vfio_emu.plugins.hookspecs import hookimpl

TYPES = ["io"]  # vfio_ccw-io
NOT_OPER, STANDBY = "NOT_OPER", "STANDBY"


class Subchannel(Device):
    """A css subchannel: the bus device the css driver binds."""


class IoRegion(Tracked):
    """private->io_region (and its siblings): what init allocates."""


# -- v6.1 ---------------------------------------------------------------------------------

class CcwPrivate61(VfioDevice):
    """struct vfio_ccw_private (v6.1): the vfio_device first; the mdev parent inside."""


def css_probe_61(kernel: Kernel, driver: Any, sch: Device) -> int:
    """vfio_ccw_sch_probe: the private for the subchannel's whole life; the mdev parent."""
    private = kzalloc(kernel, CcwPrivate61)
    if private is None:
        return -ENOMEM
    private.sch = sch
    private.fsm_state = STANDBY
    private.release_comp = kernel.arena.completion(label="release_comp")
    private.parent = embedded(private, MdevParent)
    sch.drvdata = private
    ret = mdev_register_parent(private.parent, sch, driver.mdev_driver(kernel, max_instances=1),
                               TYPES)
    if ret:
        sch.drvdata = None
        private.release_comp.free()
        kfree(private)
        return ret
    return 0


def css_remove_61(kernel: Kernel, sch: Device) -> None:
    """vfio_ccw_sch_remove: remove the mdevs (each waits on release_comp), then free."""
    private = sch.drvdata
    mdev_unregister_parent(private.parent)
    sch.drvdata = None
    private.release_comp.free()
    kfree(private)


def mdev_probe_61(kernel: Kernel, driver: Any, mdev: MdevDevice) -> int:
    """vfio_ccw_mdev_probe."""
    assert mdev.parent is not None and mdev.parent.dev is not None
    private = mdev.parent.dev.drvdata
    if private.fsm_state == NOT_OPER:
        return -ENODEV
    ret = vfio_init_device(private, mdev, driver.ops)
    if ret:
        return ret
    ret = vfio_register_emulated_iommu_dev(private)
    if ret:
        vfio_put_device(private)  # release memsets and completes; nobody waits here
        return ret
    mdev.drvdata = private
    return 0


def mdev_remove_61(kernel: Kernel, mdev: MdevDevice) -> None:
    """vfio_ccw_mdev_remove: unregister, put, then wait until release has run."""
    private = mdev.drvdata
    vfio_unregister_group_dev(private)
    vfio_put_device(private)
    kernel.wait_for_completion(private.release_comp, "release_comp",
                               holders=lambda: holders_of(private))


# -- v6.2 ---------------------------------------------------------------------------------

class CcwParent(StructDevice):
    """struct vfio_ccw_parent: its own struct device, the mdev parent inside."""


class CcwPrivate62(VfioDevice):
    """struct vfio_ccw_private (v6.2): allocated per mdev by vfio_alloc_device()."""


def css_probe_62(kernel: Kernel, driver: Any, sch: Device) -> int:
    """vfio_ccw_sch_probe (v6.2): register the parent device, then the mdev parent."""
    parent = kzalloc(kernel, CcwParent)
    if parent is None:
        return -ENOMEM
    parent.release = kfree
    ret = device_register(parent, "parent")
    if ret:
        put_device(parent)  # never kfree: the kobject exists (ce3895735cc2)
        return ret
    parent.mdev_parent = embedded(parent, MdevParent)
    ret = mdev_register_parent(parent.mdev_parent, parent,
                               driver.mdev_driver(kernel, max_instances=1), TYPES)
    if ret:
        device_del(parent)
        put_device(parent)
        return ret
    sch.drvdata = parent
    return 0


def css_remove_62(kernel: Kernel, sch: Device) -> None:
    parent = sch.drvdata
    mdev_unregister_parent(parent.mdev_parent)
    device_del(parent)
    put_device(parent)  # device_unregister()
    sch.drvdata = None


@hookimpl
def init(vdev: VfioDevice) -> int:
    """v6.1: vfio_ccw_mdev_init_dev re-arms release_comp.  v6.2: the private's own setup,
    self-unwinding on failure."""
    if isinstance(vdev, CcwPrivate61):
        vdev.release_comp.init()
        return 0
    assert vdev.dev is not None
    region = kzalloc(vdev.dev.kernel, IoRegion)
    if region is None:
        return -ENOMEM
    vdev.io_region = region
    vdev.fsm_state = STANDBY
    return 0


@hookimpl
def release(vdev: VfioDevice) -> None:
    """v6.1: memset the embedded vdev and complete release_comp; frees nothing.
    v6.2: vfio_ccw_free_private - the sub-allocations; the core frees the private."""
    if isinstance(vdev, CcwPrivate61):
        memset_vfio_device(vdev)
        vdev.release_comp.complete()
        return
    kfree(vdev.io_region)


@hookimpl
def probe(kernel: Kernel, driver: Any, dev: MdevDevice) -> int:
    """The mdev probe."""
    if kernel.semantics == "v6.1":
        return mdev_probe_61(kernel, driver, dev)
    vdev = vfio_alloc_device(CcwPrivate62, dev, driver.ops)
    if isinstance(vdev, int):
        return vdev
    ret = vfio_register_emulated_iommu_dev(vdev)
    if ret:
        vfio_put_device(vdev)
        return ret
    assert dev.parent is not None and dev.parent.dev is not None
    dev.parent.dev.drvdata = vdev  # dev_set_drvdata(&parent->dev, private)
    dev.drvdata = vdev
    return 0


@hookimpl
def remove(kernel: Kernel, driver: Any, dev: MdevDevice) -> None:
    """The mdev remove."""
    if kernel.semantics == "v6.1":
        mdev_remove_61(kernel, dev)
        return
    vdev = dev.drvdata
    vfio_unregister_group_dev(vdev)
    assert dev.parent is not None and dev.parent.dev is not None
    dev.parent.dev.drvdata = None
    vfio_put_device(vdev)


@hookimpl
def check_bind(kernel: Kernel, driver: Any, name: str) -> MdevDevice | int:
    """A subchannel appears (css probe), then an mdev of it is created."""
    sch = kernel.device(f"{name}.sch")
    css_probe = css_probe_61 if kernel.semantics == "v6.1" else css_probe_62
    ret = css_probe(kernel, driver, sch)
    if ret:
        return ret
    parent = sch.drvdata.parent if kernel.semantics == "v6.1" else sch.drvdata.mdev_parent
    mdev = mdev_device_create(parent.types[0], name)
    if isinstance(mdev, int):
        (css_remove_61 if kernel.semantics == "v6.1" else css_remove_62)(kernel, sch)
    return mdev


@hookimpl
def check_unbind(kernel: Kernel, driver: Any, dev: MdevDevice) -> int:
    """The mdev goes, then the subchannel."""
    sch = kernel.device(f"{dev.uuid}.sch")
    ret = mdev_device_remove(dev)
    (css_remove_61 if kernel.semantics == "v6.1" else css_remove_62)(kernel, sch)
    return ret
