"""`vfio-emu check`: a driver through every life-cycle path of the battery.

Each scenario runs in a fresh emulated kernel, in a child process of its own
(see isolate): the driver's module is loaded, a device of it appears and is
bound (check_bind), userspace opens and closes it, it is removed
(check_unbind), pending delayed releases run, and the module is unloaded.  A
scenario passes when nothing was reported - no use-after-free, WARN, oops or
hang - and the leak check finds nothing.  Whatever the driver does - raise,
hang, crash - is a verdict of that scenario, never the checker's end.

Userspace is not a thread: it acts at emulated times on the kernel's event
queue, and emulated time passes only while the kernel waits, so a scenario's
verdict and timeline follow from the program and the seed.
"""

from __future__ import annotations

import functools
import os
import re
import traceback
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pluggy

from vfio_emu import linux as linux_pkg
from vfio_emu import shm as shm_pkg
from vfio_emu.check.isolate import BUDGET_S, ChildFailure, run_isolated
from vfio_emu.check.verdict import FAIL, KNOWN, NOT_APPLICABLE, OK, Mode, Verdict, driver_frame
from vfio_emu.errors import EmulatorError, ReportedError
from vfio_emu.linux.kernel import Kernel
from vfio_emu.linux.mdev import MdevDevice
from vfio_emu.linux.vfio import DeviceFile, vfio_group_get_device_fd
from vfio_emu.plugins.hookspecs import hookimpl
from vfio_emu.plugins.manager import Driver, KnownFinding
from vfio_emu.report import Report

NAME = "vfio-emu-check-0"
REPEATS = 10
#: Emulated seconds userspace keeps its FD after unregister started waiting.
HOLD_S = 25
#: Emulated seconds a wait may take before the watchdog calls it a hang.
WATCHDOG_S = 600
#: Allocations of the kernel's own that are not injected: mdev_device_create() leaks the
#: instance it took when its allocation fails (as written upstream; bug class 29), which
#: is no driver's doing.
CORE_OWN = frozenset({"MdevDevice"})


@dataclass
class _Run:
    """What one scenario body leaves for the verdict."""

    verdict: Verdict
    kernel: Kernel | None = None
    exception: BaseException | None = None
    not_applicable: str = ""
    extra: list[Report] = field(default_factory=list)


@contextmanager
def _kernel(driver: Driver, mode: Mode, seed: int, *, load: bool = True,
            **options: Any) -> Iterator[Kernel]:
    options.setdefault("watchdog_s", WATCHDOG_S)
    kernel = Kernel(semantics=mode.semantics,
                    delayed_release=options.pop("delayed_release", mode.delayed_release),
                    unregister_order=mode.unregister_order, seed=seed, **options)
    try:
        if load:
            ret = driver.init_module(kernel)
            if ret:
                raise EmulatorError(f"module init of {driver.name} failed: {ret}")
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


# -- scenario bodies ------------------------------------------------------------------------

def _step(driver: Driver, kernel: Kernel, after: str) -> None:
    """The driver's invariants (check_invariants) must hold between any two steps."""
    broken = driver.invariants(kernel)
    if broken:
        more = f" (+{len(broken) - 1} more)" if len(broken) > 1 else ""
        raise EmulatorError(f"invariant broken after {after}: {broken[0]}{more}")


def life_cycle(driver: Driver, kernel: Kernel, name: str = NAME) -> None:
    """Bind, open, close, remove."""
    dev = _bound(driver, kernel, name)
    _step(driver, kernel, "the bind")
    _open(kernel, name).close()
    _step(driver, kernel, "the close")
    driver.unbind(kernel, dev)
    _step(driver, kernel, "the remove")


def _vfio_device_of(kernel: Kernel, dev: Any) -> Any:
    return next((v for v in list(kernel.devices) if v.dev is dev), None)


def two_devices_in_one_set(driver: Driver, kernel: Kernel) -> str:
    """Two devices that share a device set, opened and closed in both orders (n/a when
    the driver puts each device in a set of its own)."""
    names = (f"{NAME}-a", f"{NAME}-b")
    devs = [_bound(driver, kernel, n) for n in names]
    vdevs = [_vfio_device_of(kernel, d) for d in devs]
    shared = all(v is not None for v in vdevs) and vdevs[0].dev_set is vdevs[1].dev_set
    if shared:
        for first, second in ((0, 1), (1, 0)):
            fds = [_open(kernel, names[first]), _open(kernel, names[second])]
            _step(driver, kernel, f"opening {names[first]} then {names[second]}")
            fds[0].close()
            _step(driver, kernel, f"closing {names[first]} with {names[second]} still open")
            fds[1].close()
            _step(driver, kernel, f"closing {names[second]}, the set's last")
    for dev in reversed(devs):
        driver.unbind(kernel, dev)
        _step(driver, kernel, "a remove")
    return "" if shared else "its devices do not share a device set"


def fd_held_during_remove(driver: Driver, kernel: Kernel) -> None:
    """Remove while userspace holds an FD, which it closes 25 s later (emulated)."""
    dev = _bound(driver, kernel)
    fd = _open(kernel)
    kernel.schedule_delayed(kernel.HZ * HOLD_S, fd.close, "userspace closes its FD")
    driver.unbind(kernel, dev)


class _Vmm:
    """Userspace as a VMM: it gives the device back only when ops->request asks (its
    eventfd), observing the request op of every driver without knowing any."""

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self.asked = 0

    @hookimpl(wrapper=True)
    def request(self, vdev: Any, count: int) -> Any:
        result = yield
        self.asked += 1
        for fd in [f for f in list(self.kernel.files) if f.vdev is vdev]:
            self.kernel.schedule_delayed(1, fd.close, "the VMM lets go, as asked")
        return result


def unbind_asking(driver: Driver, kernel: Kernel, dev: Any, vmm: object) -> None:
    """Unbind while userspace (vmm, an observer of ops->request) waits to be asked: a hang
    of a driver with no request op is said as such."""
    with driver.observed(vmm):
        try:
            driver.unbind(kernel, dev)
        except ReportedError as e:
            if getattr(driver.ops, "request", None) is None and e.report.kind == "hang":
                raise EmulatorError("unregister waits for userspace, and the driver has no "
                                    "request op to ask it") from e
            raise


def fd_given_back_on_request(driver: Driver, kernel: Kernel) -> None:
    """Remove while a VMM holds an FD that it gives back only when ops->request asks."""
    dev = _bound(driver, kernel)
    _open(kernel)
    unbind_asking(driver, kernel, dev, _Vmm(kernel))


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
        kernel.flush()  # the last release is in, before the next bind asks for an instance


def module_unload_while_bound(driver: Driver, kernel: Kernel) -> str:
    """Unload the module while an mdev of it is bound: unregistering the mdev parent
    removes it (n/a for a driver whose devices are not mdevs)."""
    dev = _bound(driver, kernel)
    if not isinstance(dev, MdevDevice):
        driver.unbind(kernel, dev)
        return "its devices are not mdevs: the module's parent does not remove them"
    driver.exit_module(kernel)
    return ""


def module_unload_while_open(driver: Driver, kernel: Kernel) -> str:
    """Unload the module while an mdev of it is open; userspace closes 25 s later."""
    dev = _bound(driver, kernel)
    if not isinstance(dev, MdevDevice):
        driver.unbind(kernel, dev)
        return "its devices are not mdevs: the module's parent does not remove them"
    fd = _open(kernel)
    kernel.schedule_delayed(kernel.HZ * HOLD_S, fd.close, "userspace closes its FD")
    driver.exit_module(kernel)
    return ""


@dataclass(frozen=True)
class Scenario:
    """A named scenario of the battery: its body and the kernel options it adds."""

    name: str
    run: Callable[[Driver, Kernel], Any]
    options: dict[str, Any] = field(default_factory=dict)
    unloads: bool = False  # the body unloads the module itself

    @property
    def doc(self) -> str:
        return " ".join((self.run.__doc__ or "").split())


#: The fixed scenarios, in order; the fault families follow them (see scenario_names).
BATTERY: tuple[Scenario, ...] = (
    Scenario("life cycle", life_cycle),
    Scenario("FD held during remove", fd_held_during_remove),
    Scenario("FD given back on request", fd_given_back_on_request),
    Scenario("open during unregister", open_during_unregister),
    Scenario(f"probe/remove x{REPEATS}", repeated),
    Scenario("two devices in one set", two_devices_in_one_set),
    Scenario("delayed release", life_cycle, {"delayed_release": True}),
    Scenario("module unload while bound", module_unload_while_bound, unloads=True),
    Scenario("module unload while open", module_unload_while_open, unloads=True),
)


# -- one run ---------------------------------------------------------------------------------

def _availability(kernel: Kernel) -> dict[str, int]:
    """What every mdev type offers now: get_available() or available_instances."""
    out = {}
    for parent in kernel.mdev_parents:
        get_available = getattr(parent.driver, "get_available", None)
        for mtype in parent.types:
            name = f"{mtype.sysfs_name} of {parent.dev.name if parent.dev else '?'}"
            out[name] = (int(get_available(mtype)) if get_available is not None
                         else parent.available_instances)
    return out


def _one(driver: Driver, name: str, body: Callable[[Driver, Kernel], Any], mode: Mode,
         seed: int, *, options: dict[str, Any] | None = None, unloads: bool = False,
         load: bool = True, inject: Callable[[Kernel], None] | None = None,
         step: str = "", timeline: Callable[[Any], str] | None = None) -> Verdict:
    """One scenario, in this process: every exception becomes part of the verdict.

    After the body: pending delayed releases run; every mdev type must offer again what
    it offered after the module loaded; the module is unloaded (unless the body did) and
    what the kernel reported and the leak check found make the verdict (timeline: how
    an event reads in it, timeline_line by default)."""
    verdict = Verdict(driver.name, name, mode, seed)
    error: BaseException | None = None
    not_applicable = ""
    extra: list[Report] = []
    try:
        with _kernel(driver, mode, seed, load=load, **(options or {})) as kernel:
            start = _availability(kernel)
            if inject is not None:
                inject(kernel)
            try:
                result = body(driver, kernel)
                not_applicable = result if isinstance(result, str) else ""
                kernel.flush()
                _step(driver, kernel, "the scenario")
            except Exception as e:  # a driver's own bug is a verdict, not a crash
                error = e
            if step and not kernel.fault_fired(step):
                not_applicable = f"the {phase_of(name)} never takes the {step} step"
            try:
                kernel.flush()
                if not unloads and error is None:
                    end = _availability(kernel)
                    extra = [Report("leak", f"mdev type {t}: {end[t]} available once every "
                                    f"device is gone, {n} before", "an instance (or what "
                                    "get_available counts) was never given back")
                             for t, n in start.items() if end.get(t, n) != n]
                if not unloads and (error is None or isinstance(error, ReportedError)):
                    driver.exit_module(kernel)
                    kernel.flush()
            except Exception as e:
                error = error or e
            verdict.reports = [r for r in kernel.findings() + kernel.leak_check() + extra
                               if r.kind != "info"]
            verdict.timeline = list(map(timeline or timeline_line, kernel.trace.events))
    except Exception as e:  # module init, or the kernel's close
        error = error or e
    return _judge(driver, verdict, error, not_applicable)


#: What differs between two runs of one seed: the process and where Python put an object.
_PID = re.compile(r" pid \d+ +")
_TASK = re.compile(r"python:\d+")  # the hung-task line names the process
_ADDRESS = re.compile(r"@0x[0-9a-f]+")


def timeline_line(event: object) -> str:
    """An event as a verdict's timeline shows it: the same for two runs of one seed."""
    return _ADDRESS.sub("@…", _TASK.sub("python:N", _PID.sub(" ", str(event))))


def phase_of(name: str) -> str:
    return "module init" if name.startswith("module init") else "bind"


def _judge(driver: Driver, verdict: Verdict, error: BaseException | None,
           not_applicable: str) -> Verdict:
    if error is not None and not isinstance(error, ReportedError):
        verdict.error = _describe(error)
    # Where to look first: the exception, then each report's call trace, then what freed
    # the memory (a use-after-free), then what allocated it (a leak).
    order = {"Call Trace": 0, "waiting in": 0}
    stacks = sorted(((order.get(h, 1 if h.startswith("Freed") else 2), n, i, text)
                     for n, r in enumerate(verdict.reports)
                     for i, (h, text) in enumerate(r.stacks)))
    texts = ([] if error is None else ["".join(traceback.format_tb(error.__traceback__))]) + [
        text for _, _, _, text in stacks]
    verdict.where = driver_frame(texts, driver.source_files)
    if verdict.findings:
        verdict.status = FAIL
    elif not_applicable:
        verdict.status, verdict.note = NOT_APPLICABLE, not_applicable
    return verdict


#: The emulated kernel's and pluggy's own files: a frame there is never the driver's mistake.
_EMULATOR_DIRS = tuple(os.path.dirname(m.__file__ or "") + os.sep
                       for m in (linux_pkg, shm_pkg, pluggy))


def _describe(e: BaseException) -> str:
    """An exception as one line, with where it was raised (the checker's own verdicts
    - "binding failed", "no request op" - are their message alone)."""
    message = e.report.title if isinstance(e, ReportedError) else \
        (str(e).splitlines() or [""])[0]
    frames = traceback.extract_tb(e.__traceback__) if e.__traceback__ else []
    if isinstance(e, EmulatorError) and frames and frames[-1].filename == __file__:
        return message
    # Where the driver made the mistake, not the emulator line that noticed it.
    outside = [f for f in frames if not f.filename.startswith(_EMULATOR_DIRS)]
    where = (outside or frames)[-1] if frames else None
    at = f" at {where.filename.rsplit('/', 1)[-1]}:{where.lineno}" if where else ""
    return f"{type(e).__name__}{at}: {message}"


# -- the fault families: every kernel step and allocation of a bind and of a module init ---

def _count(driver: Driver, mode: Mode, seed: int, phase: str) -> list[str]:
    """The allocations a clean bind (or module init) makes, by name, in order."""
    with _kernel(driver, mode, seed, load=phase == "bind") as kernel:
        before = len(kernel.alloc_log)
        if phase == "module init":
            ret = driver.init_module(kernel)
            if ret:
                raise EmulatorError(f"module init of {driver.name} failed: {ret}")
            names = kernel.alloc_log[before:]
        else:
            dev = _bound(driver, kernel)
            names = kernel.alloc_log[before:]
            driver.unbind(kernel, dev)
        kernel.flush()
        driver.exit_module(kernel)
        return names


def _bind_after_fault(driver: Driver, kernel: Kernel) -> None:
    """A bind with a failure injected: it must unwind cleanly - and bind again after."""
    dev = driver.bind(kernel, NAME)
    kernel.clear_faults()  # only the bind is failed, not what follows
    if isinstance(dev, int):
        if dev >= 0:
            raise EmulatorError(f"bind returned {dev} after a failed step")
        kernel.flush()
        life_cycle(driver, kernel, f"{NAME}-again")
    else:  # the kernel ignored that failure (e.g. the singleton device set)
        driver.unbind(kernel, dev)


def _init_after_fault(driver: Driver, kernel: Kernel) -> None:
    """A module init with a failure injected: it must unwind cleanly - and load again."""
    ret = driver.init_module(kernel)
    kernel.clear_faults()  # only the module init is failed, not what follows
    if ret == 0:  # it ignored the failure: it must still work and unload
        life_cycle(driver, kernel)
        kernel.flush()
        driver.exit_module(kernel)
    kernel.flush()
    ret = driver.init_module(kernel)
    if ret:
        raise EmulatorError(f"module init failed again after an injected failure: {ret}")


#: The kernel steps each phase can take (Kernel.inject).
STEPS = {"bind": ("register", "mdev_create", "mdev_register_parent"),
         "module init": ("mdev_register_parent",)}


def _fault_runs(driver: Driver, mode: Mode, seed: int, phase: str, names: list[str]
                ) -> list[tuple[str, Callable[[], Verdict]]]:
    """(scenario name, run) for every kernel step and allocation of a bind or module init."""
    body = _init_after_fault if phase == "module init" else _bind_after_fault
    load = phase == "bind"
    runs: list[tuple[str, Callable[[], Verdict]]] = []
    for step in STEPS[phase]:
        label = f"{phase}: {step} fails"

        def run_step(step: str = step, label: str = label) -> Verdict:
            verdict = _one(driver, label, body, mode, seed, load=load, step=step,
                           inject=lambda k: k.inject(step, 12))
            verdict.injected = f"-ENOMEM from the kernel's {step} step"
            return verdict
        runs.append((label, run_step))
    own = [f"{i + 1} ({what})" for i, what in enumerate(names) if what in CORE_OWN]
    for i, what in enumerate(names):
        if what in CORE_OWN:
            continue
        label = f"{phase}: allocation {i + 1}/{len(names)} fails ({what or '?'})"

        def run_alloc(i: int = i, label: str = label) -> Verdict:
            verdict = _one(driver, label, body, mode, seed, load=load,
                           inject=lambda k: k.fail_next_allocs(1, skip=i))
            verdict.injected = f"allocation {i + 1} of the {len(names)} of a clean {phase}"
            if own and verdict.status == OK:
                verdict.note = "not injected (the kernel's own): " + ", ".join(own)
            return verdict
        runs.append((label, run_alloc))
    return runs


# -- the public entry points ----------------------------------------------------------------

def _isolated(fn: Callable[[], Verdict], driver: Driver, name: str, mode: Mode, seed: int,
              isolate: bool, budget_s: float) -> Verdict:
    if not isolate:
        return fn()
    result = run_isolated(fn, budget_s)
    if isinstance(result, ChildFailure):
        verdict = Verdict(driver.name, name, mode, seed, status=FAIL, error=result.detail)
        verdict.reports = [Report("hang" if result.hung else "oops", result.detail,
                                  stacks=(("every thread", result.stacks),))]
        verdict.where = driver_frame([result.stacks], driver.source_files)
        return verdict
    return result  # type: ignore[no-any-return]


def _runs(driver: Driver, mode: Mode, seed: int, isolate: bool, budget_s: float
          ) -> Iterator[tuple[str, Callable[[], Verdict] | Verdict]]:
    """Every scenario run of the battery, in order: a name and how to run it (or, when
    counting a phase's allocations failed, the verdict that says so)."""
    for sc in BATTERY:
        options = dict(sc.options)

        def run(sc: Scenario = sc, options: dict[str, Any] = options) -> Verdict:
            return _one(driver, sc.name, sc.run, mode, seed, options=options,
                        unloads=sc.unloads)
        yield sc.name, run
    for phase in ("module init", "bind"):
        counted = _isolated_value(functools.partial(_count, driver, mode, seed, phase),
                                  isolate, budget_s)
        if not isinstance(counted, list):
            yield f"{phase}: counting its allocations", Verdict(
                driver.name, f"{phase}: counting its allocations", mode, seed, status=FAIL,
                error=counted)
            continue
        yield from _fault_runs(driver, mode, seed, phase, counted)


def _isolated_value(fn: Callable[[], list[str]], isolate: bool, budget_s: float
                    ) -> list[str] | str:
    """fn()'s list, or one line saying why there is none."""
    def guarded() -> list[str] | str:
        try:
            return fn()
        except Exception as e:
            return _describe(e)

    if not isolate:
        return guarded()
    result = run_isolated(guarded, budget_s)
    if isinstance(result, ChildFailure):
        return result.detail
    return result  # type: ignore[no-any-return]


def scenario_names(driver: Driver, mode: Mode | None = None, seed: int = 0, *,
                   isolate: bool = True, budget_s: float = BUDGET_S) -> list[str]:
    """The names of every scenario run check_driver() would make, in order."""
    return [name for name, _ in _runs(driver, mode or Mode(), seed, isolate, budget_s)]


def check_driver(driver: Driver, mode: Mode | None = None, *, seed: int = 0,
                 scenarios: Iterable[str] | None = None, isolate: bool = True,
                 budget_s: float = BUDGET_S,
                 progress: Callable[[str], None] | None = None) -> list[Verdict]:
    """The driver through the battery in one mode (every scenario, or those named), each
    run in a child process of its own unless isolate=False; verdicts in order, with the
    driver's known findings applied."""
    mode = mode or Mode()
    wanted = None if scenarios is None else set(scenarios)
    verdicts = []
    for name, run in _runs(driver, mode, seed, isolate, budget_s):
        if wanted is not None and name not in wanted:
            continue
        if progress is not None:
            progress(f"{driver.name}: {name}")
        verdicts.append(run if isinstance(run, Verdict)
                        else _isolated(run, driver, name, mode, seed, isolate, budget_s))
    if wanted is not None and (missing := wanted - {v.scenario for v in verdicts}):
        raise EmulatorError(f"no scenario named {', '.join(sorted(missing))!r} for driver "
                            f"'{driver.name}' (see scenario_names())")
    return apply_known(driver, verdicts, mode)


def apply_known(driver: Driver, verdicts: list[Verdict], mode: Mode) -> list[Verdict]:
    """A FAIL in which a finding the driver declared appears is "known" (the declaration
    covers that scenario run); a declared finding that no longer happens, in a scenario that
    ran, is a FAIL (as a strict xfail)."""
    try:
        known = driver.known_findings()
    except EmulatorError as e:
        return [*verdicts, Verdict(driver.name, "check_known_findings", mode, status=FAIL,
                                   error=str(e))]
    used: set[int] = set()
    for v in verdicts:
        if v.status != FAIL:
            continue
        matched = [i for i, k in enumerate(known)
                   if k.applies(v.scenario, mode.semantics, mode.delayed_release)
                   and any(k.match in line for line in v.findings)]
        if matched:
            used.update(matched)
            v.status, v.note = KNOWN, "; ".join(dict.fromkeys(known[i].reason
                                                             for i in matched))
    out = list(verdicts)
    for i, k in enumerate(known):
        ran = [v for v in verdicts
               if k.applies(v.scenario, mode.semantics, mode.delayed_release)]
        if ran and i not in used:
            out.append(Verdict(driver.name, f"known finding: {k.scenario}", mode,
                               status=FAIL, error=f"the declared finding no longer happens: "
                               f"{k.match!r} ({k.reason})"))
    return out


def run_scenario(driver: Driver, name: str, mode: Mode | None = None, *, seed: int = 0,
                 isolate: bool = True, budget_s: float = BUDGET_S) -> Verdict:
    """One scenario run, by name (as check_driver() and `--scenario` name it)."""
    verdicts = check_driver(driver, mode, seed=seed, scenarios=[name], isolate=isolate,
                            budget_s=budget_s)
    return verdicts[0]


__all__ = ["BATTERY", "KnownFinding", "Scenario", "check_driver", "run_scenario",
           "scenario_names"]
