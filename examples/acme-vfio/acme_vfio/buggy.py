"""Two mistakes a port of acme can make, as plugins of their own (the tests pin them)."""

import acme_vfio
from vfio_emu.linux.vfio import vfio_free_device, vfio_unregister_group_dev
from vfio_emu.plugins.hookspecs import hookimpl


class Leaky:
    """release forgets the buffer init allocated."""

    init = staticmethod(acme_vfio.init)
    request = staticmethod(acme_vfio.request)
    probe = staticmethod(acme_vfio.probe)
    remove = staticmethod(acme_vfio.remove)

    @staticmethod
    @hookimpl
    def release(vdev):
        if vdev.kernel.semantics == "v6.1":  # BUG: kfree(vdev->buf) is missing
            vfio_free_device(vdev)


class UseAfterFree:
    """remove reads the device after the put that freed it."""

    init = staticmethod(acme_vfio.init)
    release = staticmethod(acme_vfio.release)
    request = staticmethod(acme_vfio.request)
    probe = staticmethod(acme_vfio.probe)

    @staticmethod
    @hookimpl
    def remove(kernel, driver, dev):
        vdev = dev.drvdata
        vfio_unregister_group_dev(vdev)
        acme_vfio.vfio_put_device(vdev)
        dev.drvdata = vdev.buf  # BUG: vdev was freed by the put


LEAKY = Leaky()
USE_AFTER_FREE = UseAfterFree()
