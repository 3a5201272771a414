"""Device FDs (vfio_group_get_device_fd, the file's release): ops->open_device and
->close_device, open_count, the registration reference an FD holds, and the
container each FD registers the device with.

Every correct sequence must end with no report, no leak and no WARN, under
both semantics; every buggy sequence must produce the report that names its
bug.  Test names read as the behaviour they pin; "cNN" names the bug class
(docs/lifecycle.md lists them).
"""

from __future__ import annotations

import pytest
from _asserts import BOTH, assert_clean, reports_of
from _drivers import NAME, Driver, probe, remove

from vfio_emu.errors import InvalidArgumentError
from vfio_emu.linux.errno import EBUSY, ENOMEM
from vfio_emu.linux.vfio import DeviceFile, core_of, vfio_group_get_device_fd

# -- open and close ------------------------------------------------------------------------

@BOTH
def test_open_and_close_between_probe_and_remove_reports_nothing(make_kernel, semantics):
    k = make_kernel(semantics=semantics)
    vdev, drv = probe(k)
    fd = vfio_group_get_device_fd(k, NAME)
    assert isinstance(fd, DeviceFile)
    assert vdev.open_count == 1
    fd.close()
    assert vdev.open_count == 0
    remove(vdev)
    assert drv.calls == ["init", "open_device", "close_device", "release"]
    assert drv.requests == []  # no FD open at unregister: nobody is asked
    assert_clean(k)


@BOTH
def test_closing_an_fd_twice_is_invalid_and_drops_only_one_reference(make_kernel, semantics):
    k = make_kernel(semantics=semantics)
    vdev, drv = probe(k)
    fd = vfio_group_get_device_fd(k, NAME)
    assert isinstance(fd, DeviceFile)
    fd.close()
    with pytest.raises(InvalidArgumentError):
        fd.close()
    assert core_of(vdev, "test").refcount.read() == 1
    assert drv.calls.count("close_device") == 1
    remove(vdev)
    assert_clean(k)


# -- 27. open_device failure ---------------------------------------------------------------

@BOTH
def test_c27_open_device_failure_restores_open_count_and_drops_the_registration(
        make_kernel, semantics):
    k = make_kernel(semantics=semantics)
    vdev, drv = probe(k, driver=Driver(k, open_rets=(-EBUSY,)))
    assert vfio_group_get_device_fd(k, NAME) == -EBUSY
    assert vdev.open_count == 0
    assert core_of(vdev, "test").refcount.read() == 1  # only the registration ref
    assert k.files == set()
    fd = vfio_group_get_device_fd(k, NAME)
    assert isinstance(fd, DeviceFile)
    assert drv.calls == ["init", "open_device", "open_device"]  # called again
    fd.close()
    remove(vdev)  # no hang: the failed open gave its reference back
    assert drv.requests == []
    assert_clean(k)


# -- 26. container unregister unbalanced (the merge-window core, before 7fdba0011157) ------

class NoClose(Driver):
    close_device = None  # type: ignore[assignment]


@pytest.mark.parametrize("container_fix", [False, True], ids=["merge-window", "fixed"])
def test_c26_fd_creation_failure_leaks_the_container_registration_without_close_device(
        make_kernel, container_fix):
    k = make_kernel(container_fix=container_fix)
    vdev, _ = probe(k, driver=NoClose(k))
    k.fail_next_allocs(1)  # anon_inode_getfile() fails after open_device
    assert vfio_group_get_device_fd(k, NAME) == -ENOMEM
    leaks = [r.title for r in k.leak_check() if "container" in r.title]
    if container_fix:
        assert leaks == []
        remove(vdev)
        assert_clean(k)
    else:
        assert leaks == ["vfio0 is still registered with the container (its dma_unmap "
                         "notifier and iommu_entry were never removed)"]


@pytest.mark.parametrize("container_fix", [False, True], ids=["merge-window", "fixed"])
def test_c26_every_close_unregistering_the_container_corrupts_its_list(
        make_kernel, container_fix):
    k = make_kernel(container_fix=container_fix)
    vdev, _ = probe(k)
    fds = [vfio_group_get_device_fd(k, NAME) for _ in range(2)]
    for fd in fds:
        fd.close()
    warns = [r.title for r in reports_of(k, "WARN")]
    if container_fix:
        assert warns == []
        remove(vdev)
        assert_clean(k)
    else:
        assert warns == ["list_del corruption: vfio0->iommu_entry is not on the container's "
                         "device list (container unregistered twice)"]


@BOTH
def test_a_failed_fd_creation_unwinds_open_count_and_the_kvm(make_kernel, semantics):
    """vfio_device_open()'s err_undo_count: open_count--, and the KVM the first open took
    from the group is cleared when the count is back at 0."""
    k = make_kernel(semantics=semantics)
    vdev, drv = probe(k)
    k.kvm = "kvm"
    k.fail_next_allocs(1)  # anon_inode_getfile() fails
    assert vfio_group_get_device_fd(k, NAME) == -ENOMEM
    assert (vdev.open_count, vdev.kvm) == (0, None)
    assert drv.calls == ["init", "open_device", "close_device"]
    remove(vdev)
    assert_clean(k)
