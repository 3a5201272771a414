"""vfio-ap as a plugin: drivers/s390/crypto/vfio_ap_ops.c, as converted to the helpers.

The matrix device is the driver's own refcounted parent (registered at module init,
unwound with put_device - ce3895735cc2); each mdev gets a struct ap_matrix_mdev from
vfio_alloc_device whose init allocates nothing, and whose release (v6.1) only frees it.
The mdev core counts instances (max_instances).  open_device needs a KVM; remove takes
guests_lock then mdevs_lock to take the mdev off the matrix list, then puts.
"""

from __future__ import annotations

from typing import Any

from vfio_emu.linux.device import StructDevice, device_register, device_unregister, put_device
from vfio_emu.linux.errno import EINVAL, ENOMEM, EPERM
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
from vfio_emu.linux.mutex import Mutex
from vfio_emu.linux.slab import embedded, kfree, kzalloc
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

MAX_ZDEV_ENTRIES_EXT = 256


class MatrixDev(StructDevice):
    """struct ap_matrix_dev: the parent device, with the mdev list and its locks, and the
    struct mdev_parent (here .mdev_parent: .parent names the device's parent) and the
    struct mdev_type inside."""


class ApMatrixMdev(VfioDevice):
    """struct ap_matrix_mdev: the vfio_device first."""


def _matrix(kernel: Kernel) -> MatrixDev:
    m = kernel.module_data.get("ap")
    assert isinstance(m, MatrixDev), "vfio_ap: driver_init has not run"
    return m


@hookimpl
def driver_init(kernel: Kernel, driver: Any) -> int:
    """vfio_ap_init: vfio_ap_matrix_dev_create (the matrix device), then
    vfio_ap_mdev_register (the mdev parent on it); each failure undoes what came before."""
    matrix = kzalloc(kernel, MatrixDev)
    if matrix is None:
        return -ENOMEM
    matrix.release = kfree
    matrix.parent = kernel.device("vfio_ap")  # root_device_register(VFIO_AP_ROOT_NAME)
    ret = device_register(matrix, "matrix")
    if ret:
        put_device(matrix)  # never kfree once registered (ce3895735cc2)
        return ret
    matrix.mdevs_lock = Mutex(kernel, "matrix_dev->mdevs_lock")  # mutex_init()
    matrix.guests_lock = Mutex(kernel, "matrix_dev->guests_lock")
    matrix.mdev_list = []
    matrix.mdev_parent = embedded(matrix, MdevParent)
    matrix.mdev_type = embedded(matrix, MdevType)
    matrix.mdev_type.sysfs_name = "passthrough"  # VFIO_AP_MDEV_TYPE_HWVIRT
    matrix.mdev_type.pretty_name = "VFIO AP Passthrough Device"
    ret = mdev_register_parent(matrix.mdev_parent, matrix,
                               driver.mdev_driver(kernel, max_instances=MAX_ZDEV_ENTRIES_EXT),
                               [matrix.mdev_type])
    if ret:
        device_unregister(matrix)  # vfio_ap_matrix_dev_destroy()
        return ret
    kernel.module_data["ap"] = matrix
    return 0


@hookimpl
def driver_exit(kernel: Kernel, driver: Any) -> None:
    """vfio_ap_exit: the mdev parent (removing every mdev, whose remove still reaches
    matrix_dev), then the matrix device."""
    matrix = _matrix(kernel)
    mdev_unregister_parent(matrix.mdev_parent)
    del kernel.module_data["ap"]
    device_unregister(matrix)


@hookimpl
def check_known_findings() -> list[KnownFinding]:
    return [KnownFinding(
        "*on request", "no request op",
        "v6.1 vfio_ap_matrix_dev_ops has no request op (added upstream later): removing an "
        "mdev a VMM holds waits until the VMM lets go on its own")]


@hookimpl
def init(vdev: ApMatrixMdev) -> int:
    """vfio_ap_mdev_init_dev: allocates nothing."""
    mdev = vdev.dev
    assert mdev is not None
    vdev.mdev = mdev
    vdev.kernel = mdev.kernel  # for release, which must not touch the mdev
    vdev.matrix = {"apm": set(), "aqm": set(), "adm": set()}
    vdev.shadow_apcb = {"apm": set(), "aqm": set(), "adm": set()}
    vdev.qtable = {}
    vdev.kvm_attached = None
    return 0


@hookimpl
def release(vdev: ApMatrixMdev) -> None:
    """vfio_ap_mdev_release_dev (v6.1): only the free; gone in v6.2.  (It never touches
    the mdev: after a failed register nothing pins it.)"""
    if vdev.kernel.semantics == "v6.1":
        vfio_free_device(vdev)


@hookimpl
def open_device(vdev: ApMatrixMdev) -> int:
    """vfio_ap_mdev_open_device: no KVM, no guest (-EINVAL); a KVM another mdev already
    uses is refused (vfio_ap_mdev_set_kvm: -EPERM)."""
    if vdev.kvm is None:
        return -EINVAL
    matrix = _matrix(vdev.kernel)
    with matrix.mdevs_lock:
        if any(m is not vdev and m.kvm_attached is vdev.kvm for m in matrix.mdev_list):
            return -EPERM
        vdev.kvm_attached = vdev.kvm
    return 0


@hookimpl
def close_device(vdev: ApMatrixMdev) -> None:
    vdev.kvm_attached = None


@hookimpl
def probe(kernel: Kernel, driver: Any, dev: MdevDevice) -> int:
    """vfio_ap_mdev_probe."""
    vdev = vfio_alloc_device(ApMatrixMdev, dev, driver.ops)
    if isinstance(vdev, int):
        return vdev
    ret = vfio_register_emulated_iommu_dev(vdev)
    if ret:
        vfio_put_device(vdev)
        return ret
    dev.drvdata = vdev
    matrix = _matrix(kernel)
    with matrix.mdevs_lock:
        matrix.mdev_list.append(vdev)
    return 0


@hookimpl
def remove(kernel: Kernel, driver: Any, dev: MdevDevice) -> None:
    """vfio_ap_mdev_remove: unregister, off the matrix list under both locks, put."""
    vdev = dev.drvdata
    vfio_unregister_group_dev(vdev)
    matrix = _matrix(kernel)
    with matrix.guests_lock, matrix.mdevs_lock:
        vdev.qtable.clear()  # reset and unlink the queues
        matrix.mdev_list.remove(vdev)
    vfio_put_device(vdev)


@hookimpl
def check_bind(kernel: Kernel, driver: Any, name: str) -> MdevDevice | int:
    return mdev_device_create(_matrix(kernel).mdev_type, name)


@hookimpl
def check_unbind(kernel: Kernel, driver: Any, dev: MdevDevice) -> int:
    return mdev_device_remove(dev)
