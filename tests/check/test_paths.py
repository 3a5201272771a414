"""`vfio-emu check` on drivers with the mistakes a driver author makes: every path of the
battery catches its kind of bug - each test driver beside its fixed twin, which passes -
and no driver's mistake (an exception, a hang, a crash, a bad return) ends the run."""

from __future__ import annotations

import ctypes
import json
import re
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest
from _drivers import Buf, GenericBusDriver, free_if_v61

from vfio_emu.check import FAIL, KNOWN, NOT_APPLICABLE, OK, Mode, check_driver, run_scenario
from vfio_emu.check.scenarios import probe as generic_probe
from vfio_emu.check.scenarios import remove as generic_remove
from vfio_emu.cli import main
from vfio_emu.linux.device import StructDevice, device_register, device_unregister, put_device
from vfio_emu.linux.errno import ENOMEM, ENOSPC
from vfio_emu.linux.kernel import Kernel
from vfio_emu.linux.mdev import (
    MdevParent,
    MdevType,
    mdev_device_create,
    mdev_device_remove,
    mdev_register_parent,
    mdev_unregister_parent,
)
from vfio_emu.linux.slab import Tracked, embedded, kfree, kzalloc, module_static
from vfio_emu.linux.vfio import (
    VfioDevice,
    vfio_alloc_device,
    vfio_device_set_open_count,
    vfio_put_device,
    vfio_register_emulated_iommu_dev,
)
from vfio_emu.plugins import pci as pci_plugin
from vfio_emu.plugins.hookspecs import hookimpl
from vfio_emu.plugins.manager import KnownFinding, Plugins

QUICK = {"isolate": False}


def checked(plugin: object, mode: Mode | None = None, **options: Any) -> list[Any]:
    p = Plugins(builtins=(), load_entrypoints=False)
    p.register(plugin, "under-test")
    return check_driver(p.driver("under-test"), mode or Mode(), **options)


def verdict(verdicts: list[Any], scenario: str) -> Any:
    return next(v for v in verdicts if v.scenario == scenario)


def failed(verdicts: list[Any]) -> list[str]:
    return [v.scenario for v in verdicts if v.status == FAIL]


class GoodBus(GenericBusDriver):
    """A correct bus driver: init allocates a buffer, release frees it, request asks."""

    @hookimpl
    def init(self, vdev: Any) -> int:
        buf = kzalloc(vdev.dev.kernel, Buf)
        if buf is None:
            return -ENOMEM
        vdev.buf = buf
        return 0

    @hookimpl
    def release(self, vdev: Any) -> None:
        kfree(vdev.buf)
        free_if_v61(vdev.dev.kernel, vdev)

    @hookimpl
    def request(self, vdev: Any, count: int) -> None:
        """Signal userspace's request eventfd."""


def test_the_fixed_twin_bus_driver_passes_every_path():
    verdicts = checked(GoodBus(), **QUICK)
    assert failed(verdicts) == []
    assert verdict(verdicts, "bind: mdev_create fails").status == NOT_APPLICABLE
    assert verdict(verdicts, "module unload while bound").status == NOT_APPLICABLE


# -- never a crash ---------------------------------------------------------------------------

class RaisingProbe(GoodBus):
    @hookimpl
    def probe(self, kernel: Kernel, driver: Any, dev: Any) -> int:
        raise RuntimeError("the driver's own bug")  # the line the verdict points at


def test_an_exception_in_the_driver_is_a_verdict_naming_its_line():
    verdicts = checked(RaisingProbe(), **QUICK)
    life = verdict(verdicts, "life cycle")
    assert life.status == FAIL and "RuntimeError" in life.error
    assert re.match(r"test_paths\.py:\d+: raise RuntimeError", life.where)
    assert len(verdicts) > 5  # the run went on to every other scenario


class ProbeReturnsNone(GoodBus):
    @hookimpl
    def probe(self, kernel: Kernel, driver: Any, dev: Any) -> Any:
        super().probe(kernel, driver, dev)
        return None  # BUG: probe must return 0 or -errno


def test_a_probe_returning_none_is_a_verdict():
    life = verdict(checked(ProbeReturnsNone(), **QUICK), "life cycle")
    assert life.status == FAIL and "must return 0 or -errno, not None" in life.error


class UseAfterFreeInProbe(GoodBus):
    @hookimpl
    def probe(self, kernel: Kernel, driver: Any, dev: Any) -> int:
        buf = kzalloc(kernel, Buf)
        assert buf is not None
        kfree(buf)
        buf.size = 1  # BUG: written after the free
        return super().probe(kernel, driver, dev)


def test_a_use_after_free_in_the_first_bind_is_a_kasan_verdict():
    life = verdict(checked(UseAfterFreeInProbe(), **QUICK), "life cycle")
    assert life.status == FAIL
    assert any("use-after-free in write of Buf.size" in line for line in life.findings)
    assert re.match(r"test_paths\.py:\d+: buf.size = 1", life.where)


class RemoveWaitsOnAPlainEvent(GoodBus):
    @hookimpl
    def remove(self, kernel: Kernel, driver: Any, dev: Any) -> None:
        threading.Event().wait()  # BUG: nothing the emulated kernel can see ever sets it


def test_a_remove_blocked_on_what_the_kernel_cannot_see_is_a_hang_with_stacks():
    v = run_scenario(_registered(RemoveWaitsOnAPlainEvent()), "life cycle", budget_s=2)
    assert v.status == FAIL and "did not finish in 2 s" in v.error
    assert v.reports[0].kind == "hang"
    assert "in remove" in v.reports[0].stacks[0][1]  # every thread's stack, the driver's too
    assert v.where.startswith("test_paths.py:")


class WaitsOnACompletionNobodyCompletes(GoodBus):
    @hookimpl
    def remove(self, kernel: Kernel, driver: Any, dev: Any) -> None:
        super().remove(kernel, driver, dev)
        comp = kernel.arena.completion(label="never")
        kernel.wait_for_completion(comp, "never")  # BUG: no one completes it


def test_a_wait_for_completion_nobody_completes_is_a_hang_report():
    life = verdict(checked(WaitsOnACompletionNobodyCompletes(), **QUICK), "life cycle")
    assert life.status == FAIL
    assert any(line.startswith("hang:") for line in life.findings)


class SegfaultInProbe(GoodBus):
    @hookimpl
    def probe(self, kernel: Kernel, driver: Any, dev: Any) -> int:
        ctypes.string_at(0)  # BUG: a C extension of the driver's dereferences NULL
        return 0


def test_a_segfault_in_the_driver_fails_its_scenario_and_the_run_goes_on():
    verdicts = checked(SegfaultInProbe(), scenarios=["life cycle", "FD held during remove"],
                       budget_s=10)
    assert [v.status for v in verdicts] == [FAIL, FAIL]
    # (Under AddressSanitizer, its handler reports the SIGSEGV and exits the process.)
    assert "the driver's process died" in verdicts[0].error


# -- userspace that gives the device back only when asked ------------------------------------

class NoRequestOp(GoodBus):
    request = None  # type: ignore[assignment]  # BUG: unregister cannot ask userspace


def test_a_driver_without_request_hangs_its_remove_under_a_vmm():
    verdicts = checked(NoRequestOp(), **QUICK)
    v = verdict(verdicts, "FD given back on request")
    assert v.status == FAIL and "no request op to ask it" in v.error
    assert verdict(verdicts, "FD held during remove").status == OK  # it does let go itself


# -- module init: every allocation and kernel step fails once --------------------------------

class Holder(Tracked):
    """The module's statics: its parent device, mdev parent and type, the pool."""


class MdevDriverBase:
    """A small correct mdev driver: a refcounted parent device, the mdev parent on it, one
    type, instances taken from a pool of 4 (get_available) by init and given back by
    release."""

    POOL = 4

    def holder(self, kernel: Kernel) -> Any:
        return kernel.module_data["under-test"]

    @hookimpl
    def driver_init(self, kernel: Kernel, driver: Any) -> int:
        h = module_static(kernel, Holder)
        h.pool = self.POOL
        h.dev = kzalloc(kernel, StructDevice)
        if h.dev is None:
            return -ENOMEM
        h.dev.release = kfree
        ret = device_register(h.dev, "parent")
        if ret:
            put_device(h.dev)
            return ret
        h.parent = embedded(h, MdevParent)
        h.mtype = embedded(h, MdevType)
        h.mtype.sysfs_name = "one"
        ret = mdev_register_parent(h.parent, h.dev, driver.mdev_driver(
            kernel, get_available=lambda mtype: h.pool), [h.mtype])
        if ret:
            return self.unwind_register_failure(h, ret)
        kernel.module_data["under-test"] = h
        return 0

    def unwind_register_failure(self, h: Any, ret: int) -> int:
        device_unregister(h.dev)
        return ret

    @hookimpl
    def driver_exit(self, kernel: Kernel, driver: Any) -> None:
        h = self.holder(kernel)
        mdev_unregister_parent(h.parent)  # its mdevs' removes still reach the module state
        del kernel.module_data["under-test"]
        device_unregister(h.dev)

    @hookimpl
    def init(self, vdev: Any) -> int:
        h = self.holder(vdev.dev.kernel)
        if h.pool == 0:
            return -ENOSPC
        h.pool -= 1
        vdev.h = h
        return 0

    @hookimpl
    def release(self, vdev: Any) -> None:
        vdev.h.pool += 1
        free_if_v61(vdev.h.dev.kernel, vdev)

    @hookimpl
    def request(self, vdev: Any, count: int) -> None:
        """Signal userspace's request eventfd."""

    @hookimpl
    def probe(self, kernel: Kernel, driver: Any, dev: Any) -> int:
        vdev = generic_probe(kernel, driver.ops, dev, VfioDevice,
                             register=vfio_register_emulated_iommu_dev)
        if isinstance(vdev, int):
            return vdev
        dev.drvdata = vdev
        return 0

    @hookimpl
    def remove(self, kernel: Kernel, driver: Any, dev: Any) -> None:
        generic_remove(dev.drvdata)

    @hookimpl
    def check_bind(self, kernel: Kernel, driver: Any, name: str) -> Any:
        return mdev_device_create(self.holder(kernel).mtype, name)

    @hookimpl
    def check_unbind(self, kernel: Kernel, driver: Any, dev: Any) -> int:
        return mdev_device_remove(dev)


@pytest.mark.parametrize("mode", [Mode("v6.1"), Mode("v6.2", True)], ids=str)
def test_the_fixed_twin_mdev_driver_passes_every_path(mode):
    verdicts = checked(MdevDriverBase(), mode, **QUICK)
    assert failed(verdicts) == []
    assert verdict(verdicts, "module unload while open").status == OK


class DoublePutOnModuleInitFailure(MdevDriverBase):
    def unwind_register_failure(self, h: Any, ret: int) -> int:
        device_unregister(h.dev)
        put_device(h.dev)  # BUG: device_unregister() already dropped the last reference
        return ret


def test_a_module_init_error_path_that_puts_its_parent_twice_is_caught():
    verdicts = checked(DoublePutOnModuleInitFailure(), **QUICK)
    assert failed(verdicts) == ["module init: mdev_register_parent fails"]
    v = verdict(verdicts, "module init: mdev_register_parent fails")
    assert v.injected == "-ENOMEM from the kernel's mdev_register_parent step"
    assert v.where.startswith("test_paths.py:") and "put_device(h.dev)" in v.where


class ReleaseKeepsItsInstance(MdevDriverBase):
    @hookimpl
    def release(self, vdev: Any) -> None:
        free_if_v61(vdev.h.dev.kernel, vdev)  # BUG: the instance never goes back to the pool


def test_an_instance_never_given_back_is_caught_once_every_device_is_gone():
    verdicts = checked(ReleaseKeepsItsInstance(), **QUICK)
    life = verdict(verdicts, "life cycle")
    assert life.status == FAIL
    assert any("mdev type one of parent: 3 available once every device is gone, 4 before"
               in line for line in life.findings)


class ExitWithoutUnregisteringTheParent(MdevDriverBase):
    @hookimpl
    def driver_exit(self, kernel: Kernel, driver: Any) -> None:
        h = kernel.module_data.pop("under-test")
        device_unregister(h.dev)  # BUG: its mdevs are still there, and so is the parent


def test_a_module_unloaded_with_an_mdev_bound_is_caught():
    verdicts = checked(ExitWithoutUnregisteringTheParent(), **QUICK)
    assert verdict(verdicts, "module unload while bound").status == FAIL
    assert verdict(verdicts, "module unload while open").status == FAIL


# -- known findings ----------------------------------------------------------------------------

class KnowsItHasNoRequestOp(NoRequestOp):
    @hookimpl
    def check_known_findings(self) -> list[KnownFinding]:
        return [KnownFinding("FD given back on request", "no request op", "a sample")]


class KnowsOfAFindingItNoLongerHas(GoodBus):
    @hookimpl
    def check_known_findings(self) -> list[KnownFinding]:
        return [KnownFinding("FD given back on request", "no request op", "fixed since")]


def test_a_declared_finding_is_known_and_one_that_no_longer_happens_fails():
    known = verdict(checked(KnowsItHasNoRequestOp(), **QUICK), "FD given back on request")
    assert known.status == KNOWN and known.note == "a sample"
    stale = checked(KnowsOfAFindingItNoLongerHas(), **QUICK)
    assert failed(stale) == ["known finding: FD given back on request"]


# -- one seed: the same verdicts and the same timeline ---------------------------------------

def test_the_same_seed_replays_the_same_verdicts_and_timeline():
    runs = [checked(GoodBus(), Mode("v6.1", True), seed=5,
                    scenarios=["delayed release", "FD held during remove"], **QUICK)
            for _ in range(2)]
    assert [(v.status, v.timeline) for v in runs[0]] == [(v.status, v.timeline)
                                                          for v in runs[1]]
    assert verdict(runs[0], "delayed release").replay() == (
        "vfio-emu check under-test --scenario 'delayed release' --semantics v6.1 "
        "--delayed-release --seed 5")


def _registered(plugin: object) -> Any:
    p = Plugins(builtins=(), load_entrypoints=False)
    p.register(plugin, "under-test")
    return p.driver("under-test")


# -- the CLI ---------------------------------------------------------------------------------

def test_a_broken_third_party_plugin_fails_and_the_others_still_run(tmp_path: Path,
                                                                   monkeypatch, capsys):
    (tmp_path / "broken_vfio.py").write_text("import no_such_module_anywhere\n")
    dist = tmp_path / "broken_vfio-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-vfio\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[vfio_emu.drivers]\nbroken = broken_vfio\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("VFIO_EMU_PLUGINS", "broken,pci")
    assert main(["check", "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert set(out["drivers"]) == {"broken", "pci"}
    [broken] = out["drivers"]["broken"]["v6.1"]
    assert broken["status"] == FAIL and "failed to load" in broken["error"]
    assert all(v["passed"] for v in out["drivers"]["pci"]["v6.1"])
    assert out["summary"]["FAIL"] == 1


def test_the_table_wraps_its_lines_and_never_cuts_a_word(monkeypatch, capsys):
    monkeypatch.setenv("VFIO_EMU_PLUGINS", "ccw")
    main(["check", "--scenario", "delayed release"])
    out = capsys.readouterr().out
    table = out[:out.index("\n\n")]
    assert all(len(line) <= 110 for line in table.splitlines())
    joined = " ".join(line.strip() for line in table.splitlines()[1:])
    assert "use-after-free in read of MdevType.parent" in joined


def test_one_scenario_replays_by_name_and_an_unknown_name_is_a_usage_error(monkeypatch,
                                                                         capsys):
    monkeypatch.setenv("VFIO_EMU_PLUGINS", "pci")
    assert main(["check", "pci", "--scenario", "life cycle", "--seed", "3"]) == 0
    assert "life cycle" in capsys.readouterr().out
    assert main(["check", "pci", "--scenario", "no such scenario"]) == 2
    assert "no scenario named" in capsys.readouterr().err


def test_docs_of_the_battery_are_its_scenarios():
    from vfio_emu.check import BATTERY

    assert all(sc.doc for sc in BATTERY)
    assert textwrap.shorten(BATTERY[0].doc, 40)


# -- invariants a driver declares, and two devices in one set --------------------------------

class PciCountingTheClosingDevice:
    """vfio-pci with the last-close test counting the closing device itself (> 0 for > 1):
    no bus reset ever happens - a reset that does not happen reports nothing by itself, but
    pci's invariant (check_invariants) says what it promised."""

    init = staticmethod(pci_plugin.init)
    release = staticmethod(pci_plugin.release)
    open_device = staticmethod(pci_plugin.open_device)
    request = staticmethod(pci_plugin.request)
    match = staticmethod(pci_plugin.match)
    probe = staticmethod(pci_plugin.probe)
    remove = staticmethod(pci_plugin.remove)
    check_invariants = staticmethod(pci_plugin.check_invariants)

    @staticmethod
    @hookimpl
    def close_device(vdev: Any) -> None:
        vdev.needs_reset = True
        if vfio_device_set_open_count(vdev.dev_set) > 0:  # BUG: counts the closing device
            return
        for member in vdev.dev_set.device_list:
            member.needs_reset = False


def test_a_broken_driver_invariant_fails_the_scenario_and_names_the_step():
    verdicts = checked(PciCountingTheClosingDevice(), **QUICK)
    life = verdict(verdicts, "life cycle")
    assert life.status == FAIL
    assert life.error.startswith("invariant broken after the close: vfio-pci: ")
    two = verdict(verdicts, "two devices in one set")
    assert two.status == FAIL and "the bus reset never happened" in two.error


def test_the_real_pci_driver_resets_the_set_on_its_last_close_in_both_orders():
    pci = Plugins(load_entrypoints=False, allow=["pci"]).driver("pci")
    two = run_scenario(pci, "two devices in one set", isolate=False)
    assert two.status == OK
    assert sum("pci bus reset" in line for line in two.timeline) == 2  # one per round


class StaleListEntryAfterAFailedProbe(MdevDriverBase):
    """An mdev driver that keeps its mdevs on a module list (what its get_available counts)
    and adds to it before registering - but does not take the entry off when registering
    fails."""

    @hookimpl
    def driver_init(self, kernel: Kernel, driver: Any) -> int:
        ret = super().driver_init(kernel, driver)
        if ret == 0:
            h = self.holder(kernel)
            h.listed = []
            h.parent.driver.get_available = lambda mtype: self.POOL - len(h.listed)
        return ret

    @hookimpl
    def probe(self, kernel: Kernel, driver: Any, dev: Any) -> int:
        vdev = vfio_alloc_device(VfioDevice, dev, driver.ops)
        if isinstance(vdev, int):
            return vdev
        listed = self.holder(kernel).listed
        listed.append(vdev)
        ret = vfio_register_emulated_iommu_dev(vdev)
        if ret:
            vfio_put_device(vdev)  # BUG: still on the list
            return ret
        dev.drvdata = vdev
        return 0

    @hookimpl
    def remove(self, kernel: Kernel, driver: Any, dev: Any) -> None:
        self.holder(kernel).listed.remove(dev.drvdata)
        super().remove(kernel, driver, dev)


def test_a_stale_list_entry_after_a_failed_probe_is_caught_by_the_instances_check():
    verdicts = checked(StaleListEntryAfterAFailedProbe(), **QUICK)
    assert failed(verdicts) == ["bind: register fails"]
    v = verdict(verdicts, "bind: register fails")
    assert any("3 available once every device is gone, 4 before" in line
               for line in v.findings)
