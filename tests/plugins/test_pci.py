"""The vfio-pci plugin (vfio_emu.plugins.pci): device sets by bus, the last-close reset rule,
the request op."""

from __future__ import annotations

import pytest
from _workers import FAST_CLOCK

from vfio_emu.linux.errno import EINVAL, ENODEV
from vfio_emu.linux.kernel import Kernel
from vfio_emu.linux.vfio import vfio_group_get_device_fd
from vfio_emu.plugins.manager import Plugins
from vfio_emu.plugins.pci import set_req_trigger


@pytest.fixture
def pci():
    return Plugins(load_entrypoints=False, allow=["pci"]).driver("pci")


@pytest.fixture
def kernel():
    k = Kernel(**FAST_CLOCK, watchdog_s=60)
    try:
        yield k
    finally:
        k.close()


def bind(pci, kernel, name):
    dev = kernel.device(name)
    assert pci.probe(kernel, dev) == 0
    return dev


def resets(kernel):
    return [e.detail for e in kernel.trace.events if e.op == "pci bus reset"]


def test_two_functions_of_one_bus_share_a_set_and_another_bus_does_not(pci, kernel):
    a, b, c = (bind(pci, kernel, n) for n in ("0000:00:04.0", "0000:00:05.0", "0000:01:00.0"))
    assert a.drvdata.dev_set is b.drvdata.dev_set is not c.drvdata.dev_set
    assert a.drvdata.dev_set.device_count == 2
    for dev in (a, b, c):
        pci.remove(kernel, dev)
    assert kernel.findings() == [] and kernel.leak_check() == []


def test_a_root_bus_device_is_its_own_set_and_a_slot_reset_device_shares_its_slot(pci, kernel):
    root = kernel.device("0000:00:02.0")
    root.root_bus = True
    f0, f1 = kernel.device("0000:01:00.0"), kernel.device("0000:01:00.1")
    f0.slot_reset = f1.slot_reset = True
    other = kernel.device("0000:01:01.0")  # same bus, no slot reset
    for dev in (root, f0, f1, other):
        assert pci.probe(kernel, dev) == 0
    assert root.drvdata.dev_set.device_count == 1
    assert f0.drvdata.dev_set is f1.drvdata.dev_set is not other.drvdata.dev_set
    for dev in (root, f0, f1, other):
        pci.remove(kernel, dev)
    assert kernel.findings() == [] and kernel.leak_check() == []


def test_the_bus_is_reset_only_on_the_last_close_of_the_set(pci, kernel):
    a, b = bind(pci, kernel, "0000:00:04.0"), bind(pci, kernel, "0000:00:05.0")
    fa = vfio_group_get_device_fd(kernel, "0000:00:04.0")
    fb = vfio_group_get_device_fd(kernel, "0000:00:05.0")
    fa.close()
    assert resets(kernel) == []  # b is still open: its count keeps the set busy
    fb.close()
    assert resets(kernel) == ["0000:00"]  # the closing device counts 1: the set's last close
    for dev in (a, b):
        pci.remove(kernel, dev)
    assert kernel.findings() == [] and kernel.leak_check() == []


def test_open_builds_the_regions_and_close_frees_them(pci, kernel):
    dev = bind(pci, kernel, "0000:00:04.0")
    fd = vfio_group_get_device_fd(kernel, "0000:00:04.0")
    assert dev.drvdata.region is not None
    fd.close()
    assert dev.drvdata.region is None
    pci.remove(kernel, dev)
    assert kernel.leak_check() == []


def test_request_signals_userspace_which_closes_and_remove_returns(pci, kernel):
    dev = bind(pci, kernel, "0000:00:04.0")
    fd = vfio_group_get_device_fd(kernel, "0000:00:04.0")
    seen = []

    def eventfd(count):
        seen.append(count)
        fd.close()

    set_req_trigger(dev.drvdata, eventfd)
    pci.remove(kernel, dev)
    assert seen == [0]
    assert kernel.findings() == [] and kernel.leak_check() == []


def test_without_a_request_channel_remove_says_so_once_and_waits(pci, kernel):
    dev = bind(pci, kernel, "0000:00:04.0")
    fd = vfio_group_get_device_fd(kernel, "0000:00:04.0")
    kernel.schedule_delayed(kernel.HZ * 35, fd.close, "userspace closes 35 s later")
    pci.remove(kernel, dev)
    infos = [r.title for r in kernel.reports if r.kind == "info"]
    assert infos == ["vfio-pci 0000:00:04.0: No device request channel registered, "
                     "blocked until released by user"]
    assert [r for r in kernel.findings() if r.kind != "info"] == []


def test_a_denylisted_device_is_refused_before_anything_is_allocated(pci, kernel):
    assert pci.probe(kernel, kernel.device("0000:00:1f.3")) == -EINVAL
    assert kernel.allocations == {} and kernel.leak_check() == []


def test_match_finds_the_function_by_name_and_refuses_a_vf_token_it_has_no_use_for(
        pci, kernel):
    """vfio_pci_core_match: the name, then only " vf_token=<uuid>" - which a device that is
    neither a PF nor a VF refuses (vfio_pci_validate_vf_token: -EINVAL)."""
    dev = bind(pci, kernel, "0000:00:04.0")
    assert vfio_group_get_device_fd(kernel, "0000:00:04.00") == -ENODEV  # not this name
    token = "vf_token=2ab74924-c335-45f4-9b16-8569e5b08258"
    assert vfio_group_get_device_fd(kernel, f"0000:00:04.0 {token}") == -EINVAL
    assert vfio_group_get_device_fd(kernel, "0000:00:04.0 bogus=1") == -EINVAL
    fd = vfio_group_get_device_fd(kernel, "0000:00:04.0")
    assert not isinstance(fd, int)
    fd.close()
    pci.remove(kernel, dev)
    assert kernel.findings() == [] and kernel.leak_check() == []
