"""`vfio-emu check`: every loaded driver through a battery of life-cycle scenarios.

Each scenario runs in a fresh emulated kernel: the driver's module is loaded,
a device of it appears and is bound (check_bind), userspace opens and closes
it, it is removed (check_unbind), pending delayed releases run, and the
module is unloaded.  A scenario passes when nothing was reported - no
use-after-free, WARN, oops or hang - and the leak check finds nothing.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from vfio_emu.errors import EmulatorError, ReportedError
from vfio_emu.linux.kernel import FAULT_POINTS, Kernel
from vfio_emu.linux.vfio import DeviceFile, vfio_group_get_device_fd
from vfio_emu.plugins.manager import Driver
from vfio_emu.report import Report

NAME = "vfio-emu-check-0"
REPEATS = 10
#: Emulated seconds userspace keeps its FD after unregister started waiting.
HOLD_S = 25
#: Allocations of the kernel's own that are not injected: mdev_device_create() leaks the
#: instance it took when its allocation fails (as written upstream; bug class 29), which
#: is no driver's doing.
CORE_OWN = frozenset({"MdevDevice"})


@dataclass
class Verdict:
    """One driver through one scenario."""

    driver: str
    scenario: str
    reports: list[Report] = field(default_factory=list)
    error: str = ""

    @property
    def passed(self) -> bool:
        return not self.reports and not self.error


#: Emulated seconds a wait may take before the watchdog calls it a hang: far beyond
#: HOLD_S, so a busy machine delaying userspace's close is not taken for a hang.
WATCHDOG_S = 600


@contextmanager
def _kernel(driver: Driver, **options: Any) -> Iterator[Kernel]:
    kernel = Kernel(watchdog_s=WATCHDOG_S, **options)
    try:
        driver.init_module(kernel)
        yield kernel
    finally:
        kernel.close()


def _open(kernel: Kernel, name: str = NAME) -> DeviceFile:
    kernel.kvm = kernel.kvm or "kvm"  # userspace is a VMM: the group has a KVM
    fd = vfio_group_get_device_fd(kernel, name)
    if not isinstance(fd, DeviceFile):
        raise EmulatorError(f"opening {name} failed: {fd}")
    return fd


def _bound(driver: Driver, kernel: Kernel, name: str = NAME) -> Any:
    dev = driver.bind(kernel, name)
    if isinstance(dev, int):
        raise EmulatorError(f"binding a device of {driver.name} failed: {dev}")
    return dev


def life_cycle(driver: Driver, kernel: Kernel, name: str = NAME) -> None:
    """Bind, open, close, remove."""
    dev = _bound(driver, kernel, name)
    _open(kernel, name).close()
    driver.unbind(kernel, dev)


def fd_held_during_remove(driver: Driver, kernel: Kernel) -> None:
    """Remove while userspace holds an FD, which it closes 25 s later (emulated)."""
    dev = _bound(driver, kernel)
    fd = _open(kernel)
    kernel.schedule_delayed(kernel.HZ * HOLD_S, fd.close, "userspace closes its FD")
    driver.unbind(kernel, dev)


def open_during_unregister(driver: Driver, kernel: Kernel) -> None:
    """While remove waits, userspace opens the device once more, then closes both."""
    dev = _bound(driver, kernel)
    first = _open(kernel)
    again: list[DeviceFile] = []

    def reopen() -> None:  # may fail: -ENODEV is fine
        fd = vfio_group_get_device_fd(kernel, NAME)
        if isinstance(fd, DeviceFile):
            again.append(fd)

    def close_all() -> None:
        first.close()
        for fd in again:
            fd.close()

    kernel.schedule_delayed(1, reopen, "userspace opens the device again")
    kernel.schedule_delayed(kernel.HZ * HOLD_S, close_all, "userspace closes its FDs")
    driver.unbind(kernel, dev)


def repeated(driver: Driver, kernel: Kernel) -> None:
    """Bind, open, close and remove, ten times (a new name each time: with delayed release
    the previous device may still be on its way out)."""
    for i in range(REPEATS):
        life_cycle(driver, kernel, f"{NAME}-{i}")


def _finish(driver: Driver, kernel: Kernel, verdict: Verdict) -> Verdict:
    # Pending delayed releases run before the module goes: racing module unload against
    # them is another question than the driver's own life cycle.
    kernel.flush()
    driver.exit_module(kernel)
    kernel.flush()
    verdict.reports = [r for r in kernel.findings() + kernel.leak_check() if r.kind != "info"]
    return verdict


def _run(driver: Driver, name: str, body: Callable[[Driver, Kernel], None],
         **options: Any) -> Verdict:
    verdict = Verdict(driver.name, name)
    try:
        with _kernel(driver, **options) as kernel:
            try:
                body(driver, kernel)
            except Exception as e:  # a driver's own bug is a verdict, not a crash
                if not isinstance(e, ReportedError):
                    verdict.error = _describe(e)
            return _finish(driver, kernel, verdict)
    except Exception as e:
        verdict.error = verdict.error or _describe(e)
        return verdict


def _describe(e: BaseException) -> str:
    """An exception as one line, with where it was raised."""
    where = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
    at = f" at {where.filename.rsplit('/', 1)[-1]}:{where.lineno}" if where else ""
    return f"{type(e).__name__}{at}: {(str(e).splitlines() or [''])[0]}"


def probe_faults(driver: Driver, **options: Any) -> Iterator[Verdict]:
    """Fail each allocation of a bind in turn: the probe must unwind without a trace."""
    with _kernel(driver, **options) as kernel:
        before = len(kernel.alloc_log)
        dev = _bound(driver, kernel)
        names = kernel.alloc_log[before:]
        driver.unbind(kernel, dev)
        driver.exit_module(kernel)
    steps = len(names)
    for step, what in enumerate(names):
        if what in CORE_OWN:
            continue
        verdict = Verdict(driver.name,
                          f"probe fault at allocation {step + 1}/{steps} ({what or '?'})")
        try:
            with _kernel(driver, **options) as kernel:
                kernel.fail_next_allocs(1, skip=step)
                dev = driver.bind(kernel, NAME)
                if isinstance(dev, int):
                    if dev >= 0:
                        verdict.error = f"bind returned {dev} after a failed allocation"
                else:  # the kernel ignored that failure (e.g. the singleton device set)
                    driver.unbind(kernel, dev)
                yield _finish(driver, kernel, verdict)
        except Exception as e:
            verdict.error = _describe(e)
            yield verdict


#: The battery, in order: (name, body, extra kernel options).
BATTERY: tuple[tuple[str, Callable[[Driver, Kernel], None], dict[str, Any]], ...] = (
    ("life cycle", life_cycle, {}),
    ("FD held during remove", fd_held_during_remove, {}),
    ("open during unregister", open_during_unregister, {}),
    (f"probe/remove x{REPEATS}", repeated, {}),
    ("delayed release", life_cycle, {"delayed_release": True}),
)


def kernel_faults(driver: Driver, **options: Any) -> Iterator[Verdict]:
    """Fail each of the kernel's own probe steps (register, mdev create) once: the driver
    must unwind it cleanly (a step its devices do not take just does not fire)."""
    for step in FAULT_POINTS:
        verdict = Verdict(driver.name, f"{step} fails")
        try:
            with _kernel(driver, **options) as kernel:
                kernel.inject(step, 12)
                dev = driver.bind(kernel, NAME)
                if not isinstance(dev, int):
                    driver.unbind(kernel, dev)
                yield _finish(driver, kernel, verdict)
        except Exception as e:
            verdict.error = _describe(e)
            yield verdict


def check_driver(driver: Driver, *, semantics: str = "v6.1", delayed_release: bool = False,
                 progress: Callable[[str], None] | None = None) -> list[Verdict]:
    """Every scenario of the battery, then a fault at every probe allocation."""
    verdicts = []
    for name, body, extra in BATTERY:
        if progress is not None:
            progress(f"{driver.name}: {name}")
        options = {"semantics": semantics, "delayed_release": delayed_release, **extra}
        verdicts.append(_run(driver, name, body, **options))
    if progress is not None:
        progress(f"{driver.name}: probe faults")
    verdicts += kernel_faults(driver, semantics=semantics, delayed_release=delayed_release)
    verdicts += probe_faults(driver, semantics=semantics, delayed_release=delayed_release)
    return verdicts
