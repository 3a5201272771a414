"""The concurrent scenarios: a driver's life cycle split into tasks that race.

Each scenario does its setup in order (module loaded, device bound, FD open)
and returns the tasks that then run under the scheduler - a remove, a
process closing or opening FDs, a module unload - while delayed releases
become tasks of their own.  Like the battery, they use the driver only
through its plugin hooks, so they apply to any driver.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vfio_emu.check.battery import NAME, _bound, _open, unbind_asking
from vfio_emu.linux.errno import ENOMEM
from vfio_emu.linux.kernel import Kernel
from vfio_emu.linux.mdev import MdevDevice
from vfio_emu.linux.vfio import DeviceFile, vfio_group_get_device_fd
from vfio_emu.plugins.hookspecs import hookimpl
from vfio_emu.plugins.manager import Driver

Tasks = list[tuple[str, Callable[[], object]]]


@dataclass(frozen=True)
class CoreFinding:
    """What the emulated kernel's own code does wrong in one unregister order, whatever
    the driver: a FAIL matching it is known, for every driver."""

    match: str
    reason: str
    unregister_order: str


@dataclass(frozen=True)
class Race:
    """A concurrent scenario: setup(driver, kernel) returns its tasks, or a str saying why
    it does not apply to this driver."""

    name: str
    setup: Callable[[Driver, Kernel], Tasks | str]
    options: dict[str, Any] = field(default_factory=dict)
    unloads: bool = False
    core: tuple[CoreFinding, ...] = ()

    @property
    def doc(self) -> str:
        return " ".join((self.setup.__doc__ or "").split())


def close_vs_remove(driver: Driver, kernel: Kernel) -> Tasks:
    """Userspace closes its FD while the device is removed."""
    dev = _bound(driver, kernel)
    fd = _open(kernel)
    return [("remove", lambda: driver.unbind(kernel, dev)), ("close", fd.close)]


def open_vs_remove(driver: Driver, kernel: Kernel) -> Tasks:
    """Userspace opens the device (and closes it) while it is removed."""
    dev = _bound(driver, kernel)

    def user() -> None:
        fd = vfio_group_get_device_fd(kernel, NAME)  # -ENODEV once it is gone: fine
        if isinstance(fd, DeviceFile):
            fd.close()
    return [("remove", lambda: driver.unbind(kernel, dev)), ("open+close", user)]


class _Requests:
    """Userspace's request eventfd: counts ops->request calls, for any driver."""

    def __init__(self) -> None:
        self.count = 0

    @hookimpl(wrapper=True)
    def request(self, vdev: Any, count: int) -> Any:
        result = yield
        self.count += 1
        return result


def reopen_on_request(driver: Driver, kernel: Kernel) -> Tasks:
    """While remove waits, a VMM answers each request by reopening the device - a new FD
    first, then the old one closed - until the open fails (bug class 13 in the v6.1
    unregister order: the wait never ends)."""
    dev = _bound(driver, kernel)
    held = [_open(kernel)]
    asked = _Requests()

    def vmm() -> None:
        seen = 0
        sched = kernel.sched
        assert sched is not None
        def asked_again() -> bool:
            return asked.count > seen

        while True:
            sched.block(asked_again, "the VMM waits for a request", idle=True)
            seen = asked.count
            new = vfio_group_get_device_fd(kernel, NAME)
            held.pop().close()
            if not isinstance(new, DeviceFile):
                return
            held.append(new)
    return [("remove", lambda: unbind_asking(driver, kernel, dev, asked)), ("vmm", vmm)]


def failed_bind_then_bind(driver: Driver, kernel: Kernel) -> Tasks:
    """A bind fails at the kernel's register step and a device is bound again at once,
    while the failed bind's releases are pending (DEBUG_KOBJECT_RELEASE): each release
    is a task of its own, so it may come at any step of the unwind and of the new bind."""
    def probe() -> None:
        kernel.inject("register", ENOMEM)
        dev = driver.bind(kernel, NAME)
        kernel.clear_faults()
        if not isinstance(dev, int):  # it ignored the failure
            driver.unbind(kernel, dev)
            return
        driver.unbind(kernel, _bound(driver, kernel, f"{NAME}-again"))
    return [("probe", probe)]


def unload_vs_close(driver: Driver, kernel: Kernel) -> Tasks | str:
    """The module is unloaded (its mdev parent unregistered) while userspace closes the
    last FD of one of its mdevs (n/a for a driver whose devices are not mdevs)."""
    dev = _bound(driver, kernel)
    if not isinstance(dev, MdevDevice):
        driver.unbind(kernel, dev)
        return "its devices are not mdevs: unloading the module does not remove them"
    fd = _open(kernel)
    return [("unload", lambda: driver.exit_module(kernel)), ("close", fd.close)]


#: Emulated seconds the explorer's kernel waits before a hang: short, so a hang's schedules
#: stay short (six unregister rounds).
WATCHDOG_S = 60

RACES: dict[str, Race] = {r.name: r for r in (
    Race("close vs remove", close_vs_remove, {"watchdog_s": WATCHDOG_S}),
    Race("open vs remove", open_vs_remove, {"watchdog_s": WATCHDOG_S}),
    Race("reopen on request", reopen_on_request, {"watchdog_s": WATCHDOG_S}, core=(
        CoreFinding("blocked for more than", "the v6.1 core: vfio_unregister_group_dev() "
                    "keeps the device on the group list while it waits, so every reopen "
                    "finds it and the wait never ends (bug class 13; the later order "
                    "unlinks first: --unregister-order unlink-first)", "v6.1"),)),
    Race("failed bind, then bind", failed_bind_then_bind,
         {"watchdog_s": WATCHDOG_S, "delayed_release": True}),
    Race("unload vs close", unload_vs_close, {"watchdog_s": WATCHDOG_S}, unloads=True),
)}

__all__ = ["RACES", "WATCHDOG_S", "CoreFinding", "Race"]
