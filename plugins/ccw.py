"""vfio-ccw as a plugin: drivers/s390/cio/vfio_ccw_{drv,ops}.c, in both versions.

v6.1 (as converted by the life-cycle helpers): struct vfio_ccw_private belongs to the css
(subchannel) driver - allocated at css probe, freed at css remove - and embeds the
vfio_device, the mdev parent and the mdev type, so it outlives every mdev.  The mdev parent
is registered on the subchannel.  mdev probe calls vfio_init_device() on the embedded vdev
(init re-arms release_comp); release memsets the vdev and completes release_comp; mdev
remove unregisters, puts, and waits on release_comp before anyone may free the private.
The probe error path puts without waiting (the latent re-probe race under delayed release).

v6.2 (the parent rework): struct vfio_ccw_parent - its own struct device, a child of the
subchannel, released with kfree - embeds the mdev parent and the mdev type; the mdev parent
is still registered on the subchannel, so nothing in the mdev core pins vfio_ccw_parent.
The private follows the mdev: vfio_alloc_device() at mdev probe, kept in the parent
device's drvdata, its sub-allocations made by init and freed by release; no completion.

Both: open_device needs an operational subchannel and registers the device regions before
the fsm's OPEN event, close_device sends CLOSE and drops them, request relays unregister's
requests to userspace's eventfd or says once that nobody listens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vfio_emu.linux.device import (
    Device,
    StructDevice,
    device_del,
    device_register,
    device_unregister,
    put_device,
)
from vfio_emu.linux.errno import EINVAL, ENODEV, ENOMEM
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
from vfio_emu.plugins.manager import KnownFinding

# The fsm states the life cycle goes through (vfio_ccw_private.h); private->state is
# .fsm_state here, as .state is the vfio_device's own life-cycle state.
NOT_OPER, STANDBY, IDLE = "NOT_OPER", "STANDBY", "IDLE"


class Subchannel(Device):
    """A css subchannel: the bus device the css driver binds."""


class IoRegion(Tracked):
    """private->io_region (and its siblings): what v6.2's init allocates."""


class DevRegions(Tracked):
    """private->region: the async, schib and crw device regions registered at open."""


def _name_type(mtype: MdevType) -> MdevType:
    mtype.sysfs_name = "io"
    mtype.pretty_name = "I/O subchannel (Non-QDIO)"
    return mtype


def set_req_trigger(private: VfioDevice, trigger: Callable[[int], object] | None) -> None:
    """VFIO_DEVICE_SET_IRQS on VFIO_CCW_REQ_IRQ_INDEX: userspace's eventfd (None: unset)."""
    private.req_trigger = trigger


# -- v6.1 ---------------------------------------------------------------------------------

class CcwPrivate61(VfioDevice):
    """struct vfio_ccw_private (v6.1): the vfio_device first; the mdev parent and type
    inside."""


def css_probe_61(kernel: Kernel, driver: Any, sch: Device) -> int:
    """vfio_ccw_sch_probe: the private for the subchannel's whole life; the mdev parent on
    the subchannel."""
    private = kzalloc(kernel, CcwPrivate61)
    if private is None:
        return -ENOMEM
    private.sch = sch
    private.fsm_state = STANDBY
    private.req_trigger = None
    private.region = None
    private.release_comp = kernel.arena.completion(label="release_comp")
    private.parent = embedded(private, MdevParent)
    private.mdev_type = _name_type(embedded(private, MdevType))
    sch.drvdata = private
    ret = mdev_register_parent(private.parent, sch, driver.mdev_driver(kernel, max_instances=1),
                               [private.mdev_type])
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
    """vfio_ccw_mdev_probe: private = dev_get_drvdata(mdev->dev.parent)."""
    assert mdev.parent is not None
    private = mdev.parent.drvdata
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
    assert mdev.parent is not None
    private = mdev.parent.drvdata
    vfio_unregister_group_dev(private)
    vfio_put_device(private)
    kernel.wait_for_completion(private.release_comp, "release_comp",
                               holders=lambda: holders_of(private))


# -- v6.2 ---------------------------------------------------------------------------------

class CcwParent(StructDevice):
    """struct vfio_ccw_parent: its own struct device (.parent is the subchannel), with the
    struct mdev_parent (here .mdev_parent: .parent names the device's parent) and the
    struct mdev_type inside."""


class CcwPrivate62(VfioDevice):
    """struct vfio_ccw_private (v6.2): allocated per mdev by vfio_alloc_device()."""


def css_probe_62(kernel: Kernel, driver: Any, sch: Device) -> int:
    """vfio_ccw_sch_probe (v6.2): register the parent device, then the mdev parent - on the
    subchannel."""
    parent = kzalloc(kernel, CcwParent)
    if parent is None:
        return -ENOMEM
    parent.parent = sch
    parent.release = kfree  # vfio_ccw_free_parent
    ret = device_register(parent, "parent")
    if ret:
        put_device(parent)  # never kfree: the kobject exists (ce3895735cc2)
        sch.drvdata = None
        return ret
    sch.drvdata = parent
    parent.mdev_parent = embedded(parent, MdevParent)
    parent.mdev_type = _name_type(embedded(parent, MdevType))
    ret = mdev_register_parent(parent.mdev_parent, sch,
                               driver.mdev_driver(kernel, max_instances=1), [parent.mdev_type])
    if ret:
        device_del(parent)
        put_device(parent)
        sch.drvdata = None
        return ret
    return 0


def css_remove_62(kernel: Kernel, sch: Device) -> None:
    """vfio_ccw_sch_remove (v6.2)."""
    parent = sch.drvdata
    mdev_unregister_parent(parent.mdev_parent)
    device_unregister(parent)
    sch.drvdata = None


def mdev_probe_62(kernel: Kernel, driver: Any, mdev: MdevDevice) -> int:
    """vfio_ccw_mdev_probe (v6.2): the private goes in the parent device's drvdata."""
    assert mdev.parent is not None
    parent = mdev.parent.drvdata  # dev_get_drvdata(&sch->dev)
    private = vfio_alloc_device(CcwPrivate62, mdev, driver.ops)
    if isinstance(private, int):
        return private
    parent.drvdata = private
    ret = vfio_register_emulated_iommu_dev(private)
    if ret:
        parent.drvdata = None
        vfio_put_device(private)
        return ret
    mdev.drvdata = private
    return 0


def mdev_remove_62(kernel: Kernel, mdev: MdevDevice) -> None:
    """vfio_ccw_mdev_remove (v6.2): unregister, clear the parent's drvdata, put."""
    assert mdev.parent is not None
    parent = mdev.parent.drvdata
    private = parent.drvdata
    vfio_unregister_group_dev(private)
    parent.drvdata = None
    vfio_put_device(private)


# -- struct vfio_device_ops ----------------------------------------------------------------

@hookimpl
def init(vdev: VfioDevice) -> int:
    """vfio_ccw_mdev_init_dev.  v6.1: re-arm release_comp.  v6.2: the private's own setup
    (state, regions), self-unwinding on failure."""
    if isinstance(vdev, CcwPrivate61):
        vdev.release_comp.init()
        return 0
    assert vdev.dev is not None
    vdev.fsm_state = STANDBY
    vdev.req_trigger = None
    vdev.region = None
    region = kzalloc(vdev.dev.kernel, IoRegion)
    if region is None:
        return -ENOMEM
    vdev.io_region = region
    return 0


@hookimpl
def release(vdev: VfioDevice) -> None:
    """vfio_ccw_mdev_release_dev.  v6.1: memset the embedded vdev and complete
    release_comp; it frees nothing.  v6.2: the sub-allocations; the core frees the private."""
    if isinstance(vdev, CcwPrivate61):
        memset_vfio_device(vdev)
        vdev.release_comp.complete()
        return
    kfree(vdev.io_region)


@hookimpl
def open_device(vdev: VfioDevice) -> int:
    """vfio_ccw_mdev_open_device: refused on a non-operational subchannel; the device
    regions, then the fsm's OPEN event."""
    if vdev.fsm_state == NOT_OPER:
        return -EINVAL
    assert vdev.dev is not None
    regions = kzalloc(vdev.dev.kernel, DevRegions)
    if regions is None:
        return -ENOMEM
    vdev.region = regions
    vdev.fsm_state = IDLE  # VFIO_CCW_EVENT_OPEN: STANDBY -> IDLE
    return 0


@hookimpl
def close_device(vdev: VfioDevice) -> None:
    """vfio_ccw_mdev_close_device: the fsm's CLOSE event, then the regions go."""
    vdev.fsm_state = STANDBY
    if vdev.region is not None:
        kfree(vdev.region)
        vdev.region = None


@hookimpl
def request(vdev: VfioDevice, count: int) -> None:
    """vfio_ccw_mdev_request: signal userspace's eventfd, or say (once) nobody listens."""
    if vdev.req_trigger is not None:
        vdev.req_trigger(count)
    elif count == 0:
        assert vdev.dev is not None
        vdev.dev.kernel.report("info", f"vfio_ccw {vdev.dev.name}: No device request channel "
                               "registered, blocked until released by user")


# -- the mdev driver and the css driver ------------------------------------------------------

@hookimpl
def probe(kernel: Kernel, driver: Any, dev: MdevDevice) -> int:
    """The mdev probe."""
    if kernel.semantics == "v6.1":
        return mdev_probe_61(kernel, driver, dev)
    return mdev_probe_62(kernel, driver, dev)


@hookimpl
def remove(kernel: Kernel, driver: Any, dev: MdevDevice) -> None:
    """The mdev remove."""
    if kernel.semantics == "v6.1":
        mdev_remove_61(kernel, dev)
    else:
        mdev_remove_62(kernel, dev)


def _css(kernel: Kernel) -> tuple[Callable[..., int], Callable[..., None]]:
    if kernel.semantics == "v6.1":
        return css_probe_61, css_remove_61
    return css_probe_62, css_remove_62


def _bound_subchannels(kernel: Kernel) -> list[Device]:
    """The subchannels the css driver is bound to (the driver core's list)."""
    found: list[Device] = kernel.module_data.setdefault("ccw", [])
    return found


@hookimpl
def driver_exit(kernel: Kernel, driver: Any) -> None:
    """vfio_ccw_sch_exit: css_driver_unregister() removes every bound subchannel."""
    css_remove = _css(kernel)[1]
    for sch in list(_bound_subchannels(kernel)):
        _bound_subchannels(kernel).remove(sch)
        css_remove(kernel, sch)


@hookimpl
def check_bind(kernel: Kernel, driver: Any, name: str) -> MdevDevice | int:
    """A subchannel appears (css probe), then an mdev of it is created."""
    sch = kernel.device(f"{name}.sch")
    css_probe, css_remove = _css(kernel)
    ret = css_probe(kernel, driver, sch)
    if ret:
        return ret
    _bound_subchannels(kernel).append(sch)
    holder = sch.drvdata
    mdev = mdev_device_create(holder.mdev_type, name)
    if isinstance(mdev, int):
        _bound_subchannels(kernel).remove(sch)
        css_remove(kernel, sch)
    return mdev


@hookimpl
def check_unbind(kernel: Kernel, driver: Any, dev: MdevDevice) -> int:
    """The mdev goes, then the subchannel."""
    sch = kernel.device(f"{dev.uuid}.sch")
    ret = mdev_device_remove(dev)
    _bound_subchannels(kernel).remove(sch)
    _css(kernel)[1](kernel, sch)
    return ret


@hookimpl
def check_known_findings() -> list[KnownFinding]:
    """The two upstream holes a delayed release shows (docs/plugins.md has the kernel
    functions); the plugin keeps the upstream code."""
    probe_error = ("upstream v6.1: vfio_ccw_mdev_probe's error path puts without waiting on "
                   "release_comp")
    return [
        KnownFinding(
            "*", "use-after-free in read of Mdev",
            "upstream: the mdev type and parent are embedded in memory css remove frees "
            "(v6.1: the private; v6.2: vfio_ccw_parent), which nothing pins, while an mdev's "
            "delayed release still reads them (mdev->type, its parent, its kobject)"),
        KnownFinding("bind: register fails", "use-after-free in vfio_device_release",
                     probe_error, semantics="v6.1", delayed_release=True),
        KnownFinding("failed bind, then bind", "use-after-free in vfio_device_release",
                     probe_error, semantics="v6.1", delayed_release=True),
    ]
