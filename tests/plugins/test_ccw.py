"""The vfio-ccw plugin (vfio_emu.plugins.ccw): v6.1's release_comp and its latent races, and
the v6.2 parent split.  (tests/linux/test_ccw_flow.py pins the same v6.1 flow step by step.)"""

from __future__ import annotations

import pytest
from _workers import FAST_CLOCK

from vfio_emu.errors import UseAfterFreeError
from vfio_emu.linux.errno import EINVAL, ENOMEM
from vfio_emu.linux.kernel import Kernel
from vfio_emu.linux.mdev import (
    mdev_device_create,
    mdev_device_remove,
    mdev_get_device,
    mdev_put_device,
)
from vfio_emu.linux.vfio import State, core_of, vfio_group_get_device_fd
from vfio_emu.plugins import ccw as ccw_plugin
from vfio_emu.plugins.manager import Plugins


def _seed_vdev_late() -> int:
    import random

    return next(s for s in range(1000)
                if (lambda r: (r.randint(0, 3), r.randint(0, 3)))(random.Random(s)) == (3, 0))


SEED_VDEV_LATE = _seed_vdev_late()


@pytest.fixture
def ccw():
    return Plugins(load_entrypoints=False, allow=["ccw"]).driver("ccw")


def kernel(**options):
    return Kernel(**FAST_CLOCK, **options)


@pytest.mark.parametrize("semantics", ["v6.1", "v6.2"])
def test_css_probe_mdev_create_open_close_remove_css_remove_is_clean(ccw, semantics):
    with kernel(semantics=semantics) as k:
        mdev = ccw.bind(k, "0.0.0001")
        assert not isinstance(mdev, int)
        vfio_group_get_device_fd(k, "0.0.0001").close()
        assert ccw.unbind(k, mdev) == 0
        assert k.findings() == [] and k.leak_check() == []


def test_v61_mdev_remove_returns_only_after_the_delayed_release_ran(ccw):
    with kernel(semantics="v6.1", delayed_release=True, seed=3) as k:
        mdev = ccw.bind(k, "0.0.0001")
        sch = k.device("0.0.0001.sch")
        private = sch.drvdata
        assert mdev_device_remove(mdev) == 0
        # release (delayed 1-4 s) has run: it memset the embedded vdev and completed
        assert core_of(private, "test").state is State.ALLOCATED
        ops = [e.op for e in k.trace.events]
        assert ops.index("kobject_release: delayed") < ops.index("memset vfio_device")
        ccw_plugin.css_remove_61(k, sch)


def test_v61_probe_error_path_puts_without_waiting_so_a_reprobe_races_the_release(
        ccw, monkeypatch):
    """The latent issue of the v6.1 flow: register fails, probe puts and returns; the
    next probe re-inits the embedded vdev while its delayed release is still pending."""
    real = ccw_plugin.vfio_register_emulated_iommu_dev
    calls = {"n": 0}

    def fail_once(vdev):
        calls["n"] += 1
        return -ENOMEM if calls["n"] == 1 else real(vdev)

    monkeypatch.setattr(ccw_plugin, "vfio_register_emulated_iommu_dev", fail_once)
    # A seed whose first delay (the vdev's release) is 4 HZ and second (the mdev's) 1 HZ.
    with kernel(semantics="v6.1", delayed_release=True, seed=SEED_VDEV_LATE) as k:
        sch = k.device("0.0.0001.sch")
        assert ccw_plugin.css_probe_61(k, ccw, sch) == 0
        private = sch.drvdata
        assert mdev_device_create(private.mdev_type, "u1") == -ENOMEM
        assert private.parent.available_instances == 0  # the mdev's release is pending
        k.advance(k.HZ)  # 1 s: the mdev's release gives the instance back, not the vdev's
        assert private.parent.available_instances == 1
        mdev_device_create(private.mdev_type, "u2")  # re-probe: the vdev release is pending
        warns = [r.title for r in k.reports if r.kind == "WARN"]
        assert any("tried to init an initialized object" in t for t in warns)
        k.flush()


def test_v62_parent_is_freed_under_an_mdev_still_referenced_after_css_remove(ccw):
    """A finding in the v6.2 code: mdev_device_release() reads mdev->type->parent, and
    the type is embedded in struct vfio_ccw_parent, which vfio_ccw_sch_remove() frees with
    device_unregister(&parent->dev) (release vfio_ccw_free_parent) as soon as its own last
    reference goes.  Nothing in the mdev core pins it: the mdev parent is registered on the
    subchannel, so mdev_type_add()'s get_device() and every mdev's parent reference pin
    &sch->dev.  An mdev still referenced at css remove is released into freed memory."""
    with kernel(semantics="v6.2") as k:
        mdev = ccw.bind(k, "0.0.0001")
        mdev_get_device(mdev)  # a sysfs user holds the mdev
        assert ccw.unbind(k, mdev) == 0  # mdev remove, then css remove frees the parent
        with pytest.raises(UseAfterFreeError):
            mdev_put_device(mdev)
        assert any("read of MdevType.parent" in r.title
                   for r in k.reports if r.kind == "use-after-free")


def test_v61_private_does_not_outlive_an_mdev_still_referenced_after_css_remove(ccw):
    with kernel(semantics="v6.1") as k:
        mdev = ccw.bind(k, "0.0.0001")
        mdev_get_device(mdev)
        assert ccw.unbind(k, mdev) == 0  # css remove kfree()s the private and its type
        with pytest.raises(UseAfterFreeError):
            mdev_put_device(mdev)
        assert any("read of MdevType.parent" in r.title
                   for r in k.reports if r.kind == "use-after-free")


def test_v61_css_probe_rejects_nothing_but_a_not_oper_subchannel(ccw):
    with kernel(semantics="v6.1") as k:
        sch = k.device("0.0.0002.sch")
        assert ccw_plugin.css_probe_61(k, ccw, sch) == 0
        sch.drvdata.fsm_state = ccw_plugin.NOT_OPER
        assert mdev_device_create(sch.drvdata.mdev_type, "u") == -19  # -ENODEV
        ccw_plugin.css_remove_61(k, sch)
        assert k.leak_check() == []


# -- the real wiring and every op (vfio_ccw_drv.c, vfio_ccw_ops.c) --------------------------

def test_ccw_implements_the_ops_its_kernel_struct_has(ccw):
    """vfio_ccw_dev_ops: init, release, open_device, close_device, request (and read,
    write, ioctl, dma_unmap, which the life cycle does not reach)."""
    assert {op for op in ("init", "release", "open_device", "close_device", "request", "match")
            if getattr(ccw.ops, op, None) is not None} == {
        "init", "release", "open_device", "close_device", "request"}


def test_v62_mdev_parent_is_registered_on_the_subchannel_and_pins_it_not_the_parent(ccw):
    """vfio_ccw_sch_probe (v6.2): mdev_register_parent(&parent->parent, &sch->dev, ...);
    struct vfio_ccw_parent is a child device of the subchannel that only its own
    registration holds."""
    with kernel(semantics="v6.2") as k:
        mdev = ccw.bind(k, "0.0.0001")
        sch = k.device("0.0.0001.sch")
        parent = sch.drvdata
        assert isinstance(parent, ccw_plugin.CcwParent) and parent.parent is sch
        assert mdev.parent is sch and mdev.type is parent.mdev_type
        assert parent.mdev_parent.dev is sch
        assert parent.kref.read() == 1  # neither the type nor the mdev pins it
        assert parent.drvdata is mdev.drvdata  # the private, in the parent's drvdata
        assert ccw.unbind(k, mdev) == 0
        assert k.findings() == [] and k.leak_check() == []


@pytest.mark.parametrize("semantics", ["v6.1", "v6.2"])
def test_open_registers_the_regions_and_close_drops_them(ccw, semantics):
    with kernel(semantics=semantics) as k:
        mdev = ccw.bind(k, "0.0.0001")
        private = mdev.drvdata
        fd = vfio_group_get_device_fd(k, "0.0.0001")
        assert private.fsm_state == ccw_plugin.IDLE and private.region is not None
        fd.close()
        assert private.fsm_state == ccw_plugin.STANDBY and private.region is None
        assert ccw.unbind(k, mdev) == 0
        assert k.findings() == [] and k.leak_check() == []


@pytest.mark.parametrize("semantics", ["v6.1", "v6.2"])
def test_open_of_a_not_operational_subchannel_is_einval(ccw, semantics):
    with kernel(semantics=semantics) as k:
        mdev = ccw.bind(k, "0.0.0001")
        mdev.drvdata.fsm_state = ccw_plugin.NOT_OPER
        assert vfio_group_get_device_fd(k, "0.0.0001") == -EINVAL
        mdev.drvdata.fsm_state = ccw_plugin.STANDBY
        assert ccw.unbind(k, mdev) == 0
        assert k.findings() == [] and k.leak_check() == []


def test_request_relays_unregister_to_the_eventfd_or_says_once_nobody_listens(ccw):
    with kernel(semantics="v6.2") as k:
        mdev = ccw.bind(k, "0.0.0001")
        fd = vfio_group_get_device_fd(k, "0.0.0001")
        k.kvm = None
        signalled: list[int] = []

        def userspace(count: int) -> None:  # the eventfd: let go on the second request
            signalled.append(count)
            if count == 1:
                fd.close()

        ccw_plugin.set_req_trigger(mdev.drvdata, userspace)
        assert ccw.unbind(k, mdev) == 0
        assert signalled == [0, 1]
        assert [r for r in k.reports if r.kind == "info"] == []

    with kernel(semantics="v6.2") as k:
        mdev = ccw.bind(k, "0.0.0001")
        for count in range(3):  # what unregister's loop calls, every 10 s, with no eventfd
            ccw.ops.request(mdev.drvdata, count)
        notices = [r.title for r in k.reports if r.kind == "info"]
        assert notices == ["vfio_ccw 0.0.0001: No device request channel registered, "
                           "blocked until released by user"]
        k.reports.clear()
        assert ccw.unbind(k, mdev) == 0
        assert k.findings() == [] and k.leak_check() == []
