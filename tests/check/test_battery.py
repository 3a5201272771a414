"""`vfio-emu check` (vfio_emu.check.battery): the built-in drivers pass the battery in every
mode; wrong drivers are caught - the shared test driver (tests/_drivers.py) with one buggy
step, and upstream drivers as they were before a fix - and the CLI says so."""

from __future__ import annotations

import json

import pytest
from _drivers import Buf, GenericBusDriver, free_if_v61
from _drivers import remove as generic_remove

from vfio_emu.check import FAIL, KNOWN, Mode, check_driver
from vfio_emu.cli import main
from vfio_emu.linux.device import device_del, device_register, put_device
from vfio_emu.linux.errno import ENOMEM
from vfio_emu.linux.mdev import MdevParent, MdevType, mdev_device_create, mdev_register_parent
from vfio_emu.linux.slab import embedded, kfree, kzalloc
from vfio_emu.linux.vfio import vfio_unregister_group_dev
from vfio_emu.plugins import ccw as ccw_plugin
from vfio_emu.plugins.hookspecs import hookimpl
from vfio_emu.plugins.manager import ALLOW_ENV, Plugins

MODES = [("v6.1", False), ("v6.1", True), ("v6.2", False), ("v6.2", True)]
QUICK = dict(isolate=False)  # in-process: the scenarios here neither hang nor crash


class BusDriver(GenericBusDriver):
    """A small, correct bus driver: init allocates two buffers, release frees them; probe
    and remove are the generic pair (tests/_drivers.py)."""

    @hookimpl
    def init(self, vdev):
        a = kzalloc(vdev.dev.kernel, Buf)
        if a is None:
            return -ENOMEM
        b = kzalloc(vdev.dev.kernel, Buf)
        if b is None:
            kfree(a)
            return -ENOMEM
        vdev.bufs = (a, b)
        return 0

    @hookimpl
    def release(self, vdev):
        for buf in vdev.bufs:
            kfree(buf)
        free_if_v61(vdev.dev.kernel, vdev)

    @hookimpl
    def request(self, vdev, count):
        """Signal userspace's request eventfd (the battery's VMM answers the op)."""


class LeakyInit(BusDriver):
    """Bug class 9: init's second allocation fails and the first one is not freed."""

    @hookimpl
    def init(self, vdev):
        a = kzalloc(vdev.dev.kernel, Buf)
        if a is None:
            return -ENOMEM
        b = kzalloc(vdev.dev.kernel, Buf)
        if b is None:
            return -ENOMEM  # BUG: a leaks; release is not called for a failed init
        vdev.bufs = (a, b)
        return 0


class NoPutInRemove(BusDriver):
    """Remove unregisters but never drops its reference: the device leaks."""

    @hookimpl
    def remove(self, kernel, driver, dev):
        vfio_unregister_group_dev(dev.drvdata)


def checked(plugin, semantics="v6.1", delayed_release=False, **options):
    p = Plugins(builtins=(), load_entrypoints=False)
    p.register(plugin, "under-test")
    return check_driver(p.driver("under-test"), Mode(semantics, delayed_release),
                        **{**QUICK, **options})


BUILTIN = sorted(Plugins(load_entrypoints=False).drivers)


#: vfio-ccw's latent holes under delayed release (docs/plugins.md has the kernel functions):
#: the mdev type lives in memory the driver frees at css remove (v6.1: the private; v6.2:
#: struct vfio_ccw_parent, which nothing in the mdev core pins), while a delayed mdev release
#: - or the type's own delayed kobject release - still reads it; and, in v6.1, the mdev
#: probe's error path puts without waiting on release_comp, so the private can be freed
#: under a pending vfio_device release.
CCW_TYPE_HOLE = "use-after-free in read of MdevType.parent"
CCW_V61_PROBE_HOLE = "use-after-free in vfio_device_release"


@pytest.mark.parametrize("name", BUILTIN)
@pytest.mark.parametrize(("semantics", "delayed"), MODES)
def test_every_builtin_driver_passes_every_scenario_or_fails_only_as_declared(
        name, semantics, delayed):
    driver = Plugins(load_entrypoints=False).driver(name)
    verdicts = check_driver(driver, Mode(semantics, delayed))
    assert len(verdicts) >= 12
    failed = [v for v in verdicts if v.status == FAIL]
    assert [(v.scenario, v.error, v.reports) for v in failed] == []


@pytest.mark.parametrize("semantics", ["v6.1", "v6.2"])
@pytest.mark.parametrize("delayed", [False, True])
def test_ccw_fails_only_on_its_delayed_release_lifetime_holes(semantics, delayed):
    ccw = Plugins(load_entrypoints=False).driver("ccw")
    verdicts = check_driver(ccw, Mode(semantics, delayed), **QUICK)
    known = [v for v in verdicts if v.status == KNOWN]
    assert "delayed release" in [v.scenario for v in known]
    for v in known:
        assert not v.error
        assert any(hole in r.title for r in v.reports
                   for hole in (CCW_TYPE_HOLE, CCW_V61_PROBE_HOLE))
        assert {r.kind for r in v.reports} <= {"use-after-free", "leak"}
    if not delayed:  # without DEBUG_KOBJECT_RELEASE elsewhere, only that scenario
        assert [v.scenario for v in known] == ["delayed release"]
    elif semantics == "v6.1":  # the probe error path's hole shows where register fails
        register = next(v for v in verdicts if v.scenario == "bind: register fails")
        assert any(CCW_V61_PROBE_HOLE in r.title for r in register.reports)


def test_the_builtin_drivers_are_ap_ccw_mtty_and_pci():
    assert BUILTIN == ["ap", "ccw", "mtty", "pci"]


@pytest.mark.parametrize(("semantics", "delayed"), MODES)
def test_a_correct_bus_driver_passes_every_scenario(semantics, delayed):
    verdicts = checked(BusDriver(), semantics=semantics, delayed_release=delayed)
    assert [v.scenario for v in verdicts if not v.passed] == []
    faults = [v for v in verdicts if v.scenario.startswith("bind: allocation")]
    assert len(faults) >= 3  # vdev, two buffers, the device set


def test_an_init_that_leaks_on_partial_failure_fails_the_probe_fault_scenario():
    verdicts = checked(LeakyInit())
    failed = [v for v in verdicts if not v.passed]
    assert [v.scenario for v in failed] == ["bind: allocation 3/4 fails (Buf)"]
    assert [r.kind for r in failed[0].reports] == ["leak"]
    assert "unreferenced object Buf" in failed[0].reports[0].title
    assert "init" in failed[0].reports[0].stacks[0][1]  # allocated in the driver's init


def test_a_remove_without_the_final_put_fails_with_leaks():
    verdicts = checked(NoPutInRemove())
    life = next(v for v in verdicts if v.scenario == "life cycle")
    assert not life.passed
    assert {r.kind for r in life.reports} == {"leak"}
    assert any("vfio device index" in r.title for r in life.reports)
    vdev_leak = next(r for r in life.reports if "VfioDevice" in r.title)
    assert "the driver's own from vfio_alloc_device()" in vdev_leak.detail  # which reference


@pytest.fixture
def only_builtins(monkeypatch):
    """The CLI loads entry points: keep whatever else is installed out of these tests."""
    monkeypatch.setenv(ALLOW_ENV, "ap,mtty,pci")  # ccw v6.1's finding is tested above


def test_check_cli_json_reports_each_driver_with_a_summary(capsys, only_builtins):
    assert main(["check", "mtty", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out["drivers"]) == ["mtty"] and list(out["drivers"]["mtty"]) == ["v6.1"]
    verdicts = out["drivers"]["mtty"]["v6.1"]
    assert all(v["passed"] for v in verdicts)
    summary = out["summary"]
    assert summary["runs"] == len(verdicts) and summary["FAIL"] == 0 and summary["known"] == 1
    assert out["seed"] == 0 and out["plugin_errors"] == {}


def test_check_cli_table_and_exit_status(capsys, only_builtins):
    assert main(["check"]) == 0
    out = capsys.readouterr().out
    assert "driver mtty (v6.1)" in out and "FD held during remove" in out
    assert "scenario runs passed" in out.splitlines()[-1]


def test_check_cli_refuses_an_unknown_driver(capsys, only_builtins):
    assert main(["check", "no-such-driver"]) == 2
    assert "no driver named no-such-driver" in capsys.readouterr().err


# -- wrong drivers from upstream history ------------------------------------------------

class CcwWithoutReleaseWait:
    """v6.1 vfio-ccw as if mdev remove did not wait on release_comp: the css remove may
    then free the private while its vfio_device release is still to come."""

    init = staticmethod(ccw_plugin.init)
    release = staticmethod(ccw_plugin.release)
    probe = staticmethod(ccw_plugin.probe)
    check_bind = staticmethod(ccw_plugin.check_bind)
    check_unbind = staticmethod(ccw_plugin.check_unbind)
    driver_exit = staticmethod(ccw_plugin.driver_exit)
    open_device = staticmethod(ccw_plugin.open_device)
    close_device = staticmethod(ccw_plugin.close_device)
    request = staticmethod(ccw_plugin.request)

    @staticmethod
    @hookimpl
    def remove(kernel, driver, dev):
        generic_remove(dev.drvdata)  # BUG: no wait_for_completion(&private->release_comp)


def test_ccw_v61_without_the_release_comp_wait_is_a_use_after_free_of_the_private():
    verdicts = checked(CcwWithoutReleaseWait(), semantics="v6.1", delayed_release=True)
    uafs = [r for v in verdicts for r in v.reports if r.kind == "use-after-free"]
    assert any(r.title == "BUG: KASAN: use-after-free in vfio_device_release"
               and "CcwPrivate61" in r.detail for r in uafs)
    # the real driver waits on its remove path: the life cycle shows only the parent's hole
    real = check_driver(Plugins(load_entrypoints=False).driver("ccw"), Mode("v6.1", True),
                        **QUICK)
    life = next(v for v in real if v.scenario == "life cycle")
    assert life.reports and all("MdevType.parent" in r.title
                                for r in life.reports if r.kind == "use-after-free")
    variant_life = next(v for v in verdicts if v.scenario == "life cycle")
    assert any("vfio_device_release" in r.title for r in variant_life.reports)


class CcwParentKfreeOnRegisterFailure:
    """v6.2 vfio-ccw before ce3895735cc2: a failed device_register() of the parent is
    unwound with kfree() instead of put_device()."""

    init = staticmethod(ccw_plugin.init)
    release = staticmethod(ccw_plugin.release)
    probe = staticmethod(ccw_plugin.probe)
    remove = staticmethod(ccw_plugin.remove)
    check_unbind = staticmethod(ccw_plugin.check_unbind)
    driver_exit = staticmethod(ccw_plugin.driver_exit)
    open_device = staticmethod(ccw_plugin.open_device)
    close_device = staticmethod(ccw_plugin.close_device)
    request = staticmethod(ccw_plugin.request)

    @staticmethod
    @hookimpl
    def check_bind(kernel, driver, name):
        """vfio_ccw_sch_probe (v6.2) with the old unwind, then an mdev of it."""
        sch = kernel.device(f"{name}.sch")
        parent = kzalloc(kernel, ccw_plugin.CcwParent)
        if parent is None:
            return -ENOMEM
        parent.parent = sch
        parent.release = kfree
        ret = device_register(parent, "parent")
        if ret:
            kfree(parent)  # BUG: the kobject is initialized: only put_device() may free it
            return ret
        sch.drvdata = parent
        parent.mdev_parent = embedded(parent, MdevParent)
        parent.mdev_type = embedded(parent, MdevType)
        parent.mdev_type.sysfs_name = "io"
        ret = mdev_register_parent(parent.mdev_parent, sch,
                                   driver.mdev_driver(kernel, max_instances=1),
                                   [parent.mdev_type])
        if ret:
            device_del(parent)
            put_device(parent)
            sch.drvdata = None
            return ret
        ccw_plugin._bound_subchannels(kernel).append(sch)
        mdev = mdev_device_create(parent.mdev_type, name)
        if isinstance(mdev, int):
            ccw_plugin._bound_subchannels(kernel).remove(sch)
            ccw_plugin.css_remove_62(kernel, sch)
        return mdev


def test_ccw_v62_parent_unwind_with_kfree_leaks_the_kobject_name():
    verdicts = checked(CcwParentKfreeOnRegisterFailure(), semantics="v6.2")
    # Beyond the v6.2 driver's own delayed-release hole (CCW_TYPE_HOLE), only the unwind.
    failed = [v for v in verdicts if not v.passed and v.scenario != "delayed release"]
    assert all(v.where.startswith("test_battery.py:") for v in failed)  # the kfree line
    assert failed and all("(device_add CcwParent)" in v.scenario for v in failed)
    assert any("kobject name 'parent'" in r.title for v in failed for r in v.reports)


def test_a_driver_error_is_described_at_the_drivers_line_and_a_report_by_its_title():
    from vfio_emu.check.battery import _describe
    from vfio_emu.errors import KasanUseAfterFree
    from vfio_emu.linux.kernel import Kernel
    from vfio_emu.linux.slab import kzalloc
    from vfio_emu.report import Report

    with Kernel() as kernel:
        buf = kzalloc(kernel, Buf)
        try:
            buf.unregsiter()  # the emulated object's own __getattr__ raises this
        except AttributeError as e:
            described = _describe(e)
    assert described.startswith("AttributeError at test_battery.py:")
    assert "slab.py" not in described
    report = Report("use-after-free", "BUG: KASAN: use-after-free in vfio_put_device")
    assert _describe(KasanUseAfterFree(report)) == \
        "KasanUseAfterFree: BUG: KASAN: use-after-free in vfio_put_device"
