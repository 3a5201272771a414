"""acme's own tests, under vfio-emu's pytest plugin: the clean driver, and the two buggy
variants whose findings are expected (strict: the test fails if the finding goes away)."""

import pytest

from vfio_emu.errors import UseAfterFreeError
from vfio_emu.linux.vfio import vfio_group_get_device_fd


@pytest.mark.vfio_driver("acme")
def test_bind_open_close_remove(vfio_kernel, vfio_driver):
    dev = vfio_driver.bind(vfio_kernel, "0000:00:04.0")
    vfio_group_get_device_fd(vfio_kernel, "0000:00:04.0").close()
    vfio_driver.unbind(vfio_kernel, dev)


@pytest.mark.vfio_driver("acme-leaky")
@pytest.mark.vfio_expect("leak", match="unreferenced object Buf")
def test_the_leaky_variant_leaks_its_buffer(vfio_kernel, vfio_driver):
    dev = vfio_driver.bind(vfio_kernel, "0000:00:04.0")
    vfio_driver.unbind(vfio_kernel, dev)


@pytest.mark.vfio_driver("acme-uaf")
@pytest.mark.vfio_semantics("v6.2")  # the release is synchronous: the put frees at once
@pytest.mark.vfio_expect("use-after-free", match="read of AcmeDevice.buf")
def test_the_use_after_free_variant_reads_a_freed_device(vfio_kernel, vfio_driver):
    dev = vfio_driver.bind(vfio_kernel, "0000:00:04.0")
    with pytest.raises(UseAfterFreeError):
        vfio_driver.unbind(vfio_kernel, dev)
