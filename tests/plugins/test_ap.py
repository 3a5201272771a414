"""The vfio-ap plugin (vfio_emu.plugins.ap): open needs a KVM; the matrix list follows probe
and remove."""

from __future__ import annotations

import pytest
from _workers import FAST_CLOCK

from vfio_emu.linux.errno import EINVAL, EPERM
from vfio_emu.linux.kernel import Kernel
from vfio_emu.linux.vfio import DeviceFile, vfio_group_get_device_fd
from vfio_emu.plugins.manager import Plugins


@pytest.fixture
def ap():
    return Plugins(load_entrypoints=False, allow=["ap"]).driver("ap")


@pytest.mark.parametrize("semantics", ["v6.1", "v6.2"])
def test_open_without_a_kvm_fails_einval_and_with_one_attaches_it(ap, semantics):
    with Kernel(**FAST_CLOCK, semantics=semantics) as k:
        ap.init_module(k)
        mdev = ap.bind(k, "ap-0")
        vdev = mdev.drvdata
        assert vfio_group_get_device_fd(k, "ap-0") == -EINVAL  # no KVM on the group
        assert vdev.open_count == 0 and k.files == set()
        k.kvm = "kvm-1"
        fd = vfio_group_get_device_fd(k, "ap-0")
        assert isinstance(fd, DeviceFile) and vdev.kvm_attached == "kvm-1"
        fd.close()
        assert vdev.kvm_attached is None and vdev.kvm is None
        assert ap.unbind(k, mdev) == 0
        ap.exit_module(k)
        assert k.findings() == [] and k.leak_check() == []


def test_the_matrix_list_holds_exactly_the_probed_mdevs(ap):
    with Kernel(**FAST_CLOCK) as k:
        ap.init_module(k)
        matrix = k.module_data["ap"]
        mdevs = [ap.bind(k, f"ap-{i}") for i in range(3)]
        assert [v.dev for v in matrix.mdev_list] == mdevs
        assert matrix.mdev_parent.available_instances == 256 - 3
        ap.unbind(k, mdevs[1])
        assert [v.dev for v in matrix.mdev_list] == [mdevs[0], mdevs[2]]
        for m in (mdevs[0], mdevs[2]):
            ap.unbind(k, m)
        ap.exit_module(k)
        assert k.findings() == [] and k.leak_check() == []


def test_a_kvm_already_used_by_another_matrix_mdev_is_refused_eperm(ap):
    """vfio_ap_mdev_set_kvm(): two matrix mdevs may not share a guest."""
    with Kernel(**FAST_CLOCK) as k:
        ap.init_module(k)
        first, second = (ap.bind(k, f"ap-{i}") for i in range(2))
        k.kvm = "kvm-1"
        fd = vfio_group_get_device_fd(k, "ap-0")
        assert isinstance(fd, DeviceFile)
        assert vfio_group_get_device_fd(k, "ap-1") == -EPERM
        fd.close()
        again = vfio_group_get_device_fd(k, "ap-1")  # free again once the first closed
        assert isinstance(again, DeviceFile)
        again.close()
        for m in (first, second):
            assert ap.unbind(k, m) == 0
        ap.exit_module(k)
        assert k.findings() == [] and k.leak_check() == []
