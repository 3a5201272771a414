"""acme-vfio: a small bus driver converted to the VFIO life-cycle helpers.

Its init allocates a buffer and its release frees it; request relays unregister's request
to userspace's eventfd; probe and remove are the generic pair.
"""

from vfio_emu.linux.errno import ENOMEM
from vfio_emu.linux.slab import Tracked, kfree, kzalloc
from vfio_emu.linux.vfio import (
    VfioDevice,
    vfio_alloc_device,
    vfio_free_device,
    vfio_put_device,
    vfio_register_group_dev,
    vfio_unregister_group_dev,
)
from vfio_emu.plugins.hookspecs import hookimpl


class AcmeDevice(VfioDevice):
    """struct acme_device { struct vfio_device vdev; ... }"""


class Buf(Tracked):
    """What init allocates."""


@hookimpl
def init(vdev):
    buf = kzalloc(vdev.dev.kernel, Buf)
    if buf is None:
        return -ENOMEM
    vdev.buf, vdev.kernel, vdev.req_trigger = buf, vdev.dev.kernel, None
    return 0


@hookimpl
def release(vdev):
    kfree(vdev.buf)
    if vdev.kernel.semantics == "v6.1":
        vfio_free_device(vdev)


@hookimpl
def request(vdev, count):
    if vdev.req_trigger is not None:
        vdev.req_trigger(count)


@hookimpl
def probe(kernel, driver, dev):
    vdev = vfio_alloc_device(AcmeDevice, dev, driver.ops)
    if isinstance(vdev, int):
        return vdev
    ret = vfio_register_group_dev(vdev)
    if ret:
        vfio_put_device(vdev)
        return ret
    dev.drvdata = vdev
    return 0


@hookimpl
def remove(kernel, driver, dev):
    vfio_unregister_group_dev(dev.drvdata)
    vfio_put_device(dev.drvdata)
