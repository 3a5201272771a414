"""The emulated kernel: all the state one life-cycle run shares, and nothing global.

A Kernel owns (or is given) an arena for the counters, and keeps what the
real kernel keeps in globals: the vfio device ida, the device-set xarray, the
group device list, a workqueue for DEBUG_KOBJECT_RELEASE, the trace and the
reports.  Two kernels never see each other's devices.
"""

from __future__ import annotations

import heapq
import itertools
import os
import random
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vfio_emu.errors import HangError, InvalidArgumentError, KernelOops, ReportedError
from vfio_emu.linux.device import Device
from vfio_emu.linux.errno import ENOMEM
from vfio_emu.linux.mutex import Mutex
from vfio_emu.linux.sched import Scheduler
from vfio_emu.linux.trace import Trace
from vfio_emu.report import Report
from vfio_emu.shm.arena import Arena
from vfio_emu.shm.completion import Completion
from vfio_emu.stack import caller_stack

if TYPE_CHECKING:  # annotations only: vfio sits above the kernel state it uses
    from vfio_emu.linux.vfio import DeviceFile, DeviceSet, VfioDevice

#: ida_alloc_max(&vfio.device_ida, MINORMASK): the largest vfio device index.
MINORMASK = (1 << 20) - 1
SEMANTICS = ("v6.1", "v6.2")
#: The kernel's own steps a fault can be injected into (Kernel.inject): a bind's
#: (vfio_register_*_dev, mdev_device_create) and a module init's (mdev_register_parent).
FAULT_POINTS = ("register", "mdev_create", "mdev_register_parent")
#: "v6.1": the device stays on the group list while unregister waits (re-open race);
#: "unlink-first": the later order, unlinked and device_del'd before the wait.
UNREGISTER_ORDERS = ("v6.1", "unlink-first")


class Kernel:
    """One emulated kernel: semantics, clock, counters' arena, trace and reports."""

    def __init__(self, *, semantics: str = "v6.1", unregister_order: str = "v6.1",
                 delayed_release: bool = False, watchdog_s: int = 120, hz: int = 250,
                 time_scale: float = 1000.0, capacity: int = 4096,
                 arena: Arena | None = None, seed: int | None = 0,
                 container_fix: bool = True, lock_watchdog_s: float = 30.0) -> None:
        """semantics: "v6.1" or "v6.2".  delayed_release: DEBUG_KOBJECT_RELEASE.
        watchdog_s: emulated seconds any life-cycle wait may last before it is
        reported as a hang.  time_scale: how much faster than real time the
        emulated clock runs (10 s of unregister cadence take 10 ms at 1000).
        container_fix=False emulates the merge-window core before 7fdba0011157, whose
        container unregister on open failure and close was unbalanced.
        lock_watchdog_s: real seconds a lock wait may take at least before it is reported
        (threads really contend for locks, so their waits are not scaled).  seed: the
        DEBUG_KOBJECT_RELEASE delays are drawn from it (default 0, so a run repeats; None
        draws a fresh one).
        """
        if semantics not in SEMANTICS:
            raise InvalidArgumentError(f"semantics={semantics!r}: choose one of {SEMANTICS}")
        if unregister_order not in UNREGISTER_ORDERS:
            raise InvalidArgumentError(
                f"unregister_order={unregister_order!r}: choose one of {UNREGISTER_ORDERS}")
        if type(watchdog_s) is not int or watchdog_s < 1:
            raise InvalidArgumentError(f"watchdog_s={watchdog_s!r} must be a positive int")
        self.semantics = semantics
        self.unregister_order = unregister_order
        self.delayed_release = delayed_release
        self.watchdog_s = watchdog_s
        if not isinstance(lock_watchdog_s, (int, float)) or not lock_watchdog_s > 0:
            raise InvalidArgumentError(
                f"lock_watchdog_s={lock_watchdog_s!r} must be a positive number of seconds")
        self.lock_watchdog_s = float(lock_watchdog_s)
        self._lock_timeout_s = 0.0  # set once the clock exists, below
        self._own_arena = arena is None
        self.arena = arena if arena is not None else Arena.create(
            capacity=capacity, hz=hz, time_scale=time_scale)
        self.clock = self.arena.clock
        #: The WARNs of this kernel are those logged after it started (a given arena may
        #: hold an earlier kernel's).
        self._warn_since = self.arena.warn_seq
        self._lock_timeout_s = max(
            self.clock.jiffies_to_ns(self.HZ * watchdog_s) / 1e9, self.lock_watchdog_s)
        self.trace = Trace()
        self.reports: list[Report] = []
        self.rng = random.Random(seed)
        self.ida: dict[int, Any] = {}  # index -> the stack that took it
        self.dev_sets: dict[int, DeviceSet] = {}
        self.devices: list[VfioDevice] = []  # the group device list: findable by name
        self.mdevs: list[Any] = []  # mdev_list: every mdev device of every parent
        self.mdev_parents: list[Any] = []  # every registered mdev parent
        #: The scheduler whose tasks run on this kernel now (explore), or None: then the
        #: callers' own threads run freely and waits are bounded by real time.
        self.sched: Scheduler | None = None
        self.mdev_list_lock = Mutex(self, "mdev_list_lock", recursive=True)
        self.xa_lock = Mutex(self, "vfio_device_set_xa lock")  # the device-set xarray's
        self.device_lock = Mutex(self, "group->device_lock", recursive=True)  # group list
        self._parents: dict[str, Device] = {}
        self.module_data: dict[str, Any] = {}  # a driver module's globals, per kernel
        self.kvm: Any = None  # the group's KVM (VFIO_GROUP_SET_KVM), given at first open
        self.container_fix = container_fix
        self.container_users = 1  # the group's own reference
        self.container_devices: set[str] = set()  # registered for dma_unmap notifications
        self.allocations: dict[int, Any] = {}  # live kzalloc'd memory, by id
        self.files: set[DeviceFile] = set()
        self._work: list[tuple[int, int, Callable[[], None], str]] = []  # a heap, by due
        self._work_seq = itertools.count()
        #: The workqueue's own clock (jiffies): when the last work item ran.  Due times
        #: count from it, not from the wall clock, so their order follows from the seed.
        self._work_now = 0
        self._worker: threading.Thread | None = None
        self._advancing = threading.Lock()  # one advance() at a time (not the worker's own)
        self._lock = threading.Lock()
        self._fail_allocs = 0
        self._fail_skip = 0
        self._faults: dict[str, tuple[int, int]] = {}
        self._fired: set[str] = set()
        self.alloc_log: list[str] = []

    # -- fault injection ----------------------------------------------------------

    def fail_next_allocs(self, n: int = 1, skip: int = 0) -> None:
        """failslab: let `skip` allocations through, then make the next n fail (-ENOMEM)."""
        for what, value in (("n", n), ("skip", skip)):
            if type(value) is not int or value < 0:
                raise InvalidArgumentError(f"{what}={value!r} must be a non-negative int")
        with self._lock:
            self._fail_allocs, self._fail_skip = n, skip

    def clear_faults(self) -> None:
        """Cancel every injected failure not yet due (those that fired stay recorded)."""
        with self._lock:
            self._fail_allocs = self._fail_skip = 0
            self._faults.clear()

    def inject(self, step: str, errno: int, times: int = 1) -> None:
        """Make the kernel's own step ("register", "mdev_create") fail with -errno."""
        if step not in FAULT_POINTS:
            raise InvalidArgumentError(f"step={step!r}: choose one of {FAULT_POINTS}")
        if type(errno) is not int or errno <= 0 or type(times) is not int or times < 0:
            raise InvalidArgumentError("errno must be a positive errno and times >= 0")
        with self._lock:
            self._faults[step] = (errno, times)

    def fault_fired(self, step: str) -> bool:
        """Whether a fault injected into this step was consumed (the step was taken)."""
        with self._lock:
            return step in self._fired

    def injected(self, step: str) -> int:
        """0, or the -errno an injected fault makes this step return."""
        if not self._faults:  # none injected (one read of a dict: no lock needed)
            return 0
        with self._lock:
            errno, times = self._faults.get(step, (0, 0))
            if times <= 0:
                return 0
            self._faults[step] = (errno, times - 1)
            self._fired.add(step)
        self.trace.add(self.jiffies(), "-", f"fault injected: {step}", detail=f"-{errno}")
        return -errno

    def should_fail_alloc(self, what: str = "") -> int:
        """0, or -ENOMEM if an injected allocation failure is due (every call counts one
        allocation in alloc_attempts and names it in alloc_log, so a checker can fail
        each one in turn)."""
        if not self._fail_allocs:  # none due: one append, atomic, needs no lock
            self.alloc_log.append(what)
            return 0
        with self._lock:
            self.alloc_log.append(what)
            if self._fail_allocs > 0:
                if self._fail_skip > 0:
                    self._fail_skip -= 1
                    return 0
                self._fail_allocs -= 1
                return -ENOMEM
        return 0

    @property
    def alloc_attempts(self) -> int:
        """How many allocations were attempted (each one is named in alloc_log)."""
        return len(self.alloc_log)

    # -- life cycle of the emulation itself ---------------------------------

    def close(self) -> None:
        """Wait for delayed releases, then close the arena if this kernel created it."""
        self.flush()
        if self._own_arena:
            self.arena.close()

    def __enter__(self) -> Kernel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def device(self, name: str) -> Device:
        """The parent struct device of that name (a PCI function, a subchannel): one per name."""
        if not isinstance(name, str) or not name:
            raise InvalidArgumentError(f"device name must be a non-empty str, not {name!r}")
        dev = self._parents.get(name)  # made once: later ones are one dict read
        if dev is not None:
            return dev
        with self._lock:
            dev = self._parents.get(name)
            if dev is None:
                dev = self._parents[name] = Device(self, name)
        return dev

    @property
    def HZ(self) -> int:
        return self.clock.hz

    def jiffies(self) -> int:
        """The emulated time: it passes only while the kernel waits (see advance())."""
        return self._work_now  # one read of an int, atomic: no lock needed

    def set_jiffies(self, now: int) -> None:
        """Let emulated time reach `now` (the scheduler's: when no task can run)."""
        with self._lock:
            self._work_now = max(self._work_now, now)

    def owner(self) -> object:
        """Who takes a lock now: the running task under a scheduler (tasks share a thread),
        else the thread."""
        sched = self.sched
        task = sched.task() if sched is not None else None
        return task if task is not None else threading.get_ident()

    def preempt(self, op: str) -> None:
        """A switch point of the scheduler running on this kernel, if one is."""
        sched = self.sched
        if sched is not None:
            sched.preempt(op)

    # -- reports ------------------------------------------------------------

    def report(self, kind: str, title: str, detail: str = "",
               stacks: tuple[tuple[str, object], ...] = ()) -> Report:
        """Record a finding; WARNs also go to the arena's WARN log."""
        if not stacks:
            stacks = (("Call Trace", caller_stack()),)
        # Captured stacks are formatted here, the first time anyone needs their text.
        rep = Report(kind, title, detail, tuple((h, str(st)) for h, st in stacks))
        with self._lock:
            self.reports.append(rep)
        if kind == "WARN":
            self.arena.warn(title)
        self.trace.add(self.jiffies(), "-", f"report: {kind}", detail=title)
        return rep

    def warn(self, title: str, detail: str = "") -> Report:
        """WARN(): a kernel warning with its text, and the Python call trace."""
        return self.report("WARN", title, detail)

    def oops(self, title: str, detail: str = "") -> KernelOops:
        """An oops: recorded, and returned as the exception that ends the caller."""
        return KernelOops(self.report("oops", title, detail))

    # -- DEBUG_KOBJECT_RELEASE's workqueue ------------------------------------

    def kobject_release(self, cleanup: Callable[[], None], name: str) -> None:
        """kobject_release() of the kobject `name`: its cleanup now - or, with
        DEBUG_KOBJECT_RELEASE, HZ + HZ * (0..3) jiffies later on the workqueue (the delay
        drawn from the kernel's seed)."""
        if not self.delayed_release:
            cleanup()
            return
        delay = self.HZ + self.HZ * self.rng.randint(0, 3)
        self.trace.add(self.jiffies(), name, "kobject_release: delayed",
                       detail=f"{delay} jiffies")
        self.schedule_delayed(delay, cleanup, f"{name} release")

    def schedule_delayed(self, jiffies: int, fn: Callable[[], None], what: str) -> None:
        """schedule_delayed_work(): queue fn to run `jiffies` (emulated) from now - a
        delayed release, or an action of userspace's at a time of its choosing.

        The queue runs on no timer.  Emulated time passes only while the emulated kernel
        waits (wait_for_completion(), the unregister loop: advance()) or flushes, and the
        items due meanwhile run then, in the order they fall due (ties: in the order
        queued), on the worker thread.  So whether a delayed release or a close comes
        before or after the caller's next step follows from the program and the seed,
        never from how loaded the machine is.  Errors become reports.

        Under a scheduler, the item is a task of its own, runnable at once: the policy
        decides where it falls among the other tasks' steps.
        """
        sched = self.sched
        if sched is not None:
            sched.spawn(lambda: self._run_item(fn, what), f"kworker: {what}", work=True)
            sched.preempt(f"queue_work({what})")  # another CPU may take it at once
            return
        with self._lock:
            heapq.heappush(self._work, (self._work_now + jiffies, next(self._work_seq),
                                        fn, what))

    def run_delayed_work(self) -> None:
        """Let the worker run everything queued, without waiting for it (a wait that does
        not know how long it sleeps - a lock - lets queued work go on meanwhile)."""
        with self._lock:
            if self.sched is not None or self._worker is not None or not self._work:
                return
            self._worker = threading.Thread(target=self._drain, name="kworker", daemon=True)
            worker = self._worker
        worker.start()

    def advance(self, jiffies: int) -> None:
        """Let `jiffies` of emulated time pass: run every queued item due by then, in due
        order, and wait for them; later ones stay queued.  Every wait of the emulated kernel
        calls it with the time it sleeps (so userspace's timed actions and delayed releases
        happen during that sleep, at their emulated time); tests call it to place an event
        exactly between two steps."""
        if type(jiffies) is not int or jiffies < 0:
            raise InvalidArgumentError(f"jiffies={jiffies!r} must be a non-negative int")
        sched = self.sched
        if sched is not None:  # a sleep: the other tasks run meanwhile
            sched.block(lambda: False, f"schedule_timeout({jiffies})", timeout=jiffies)
            return
        if threading.current_thread() is self._worker:
            # A work item that waits: what falls due meanwhile runs here, in its thread.
            with self._lock:
                limit = self._work_now + jiffies
            self._run_due(limit)
        else:
            with self._advancing:
                with self._lock:
                    worker = self._worker
                if worker is not None:
                    worker.join()  # a flush's or a kick's drain: let it finish first
                with self._lock:
                    limit = self._work_now + jiffies
                    worker = self._worker = threading.Thread(
                        target=self._drain, args=(limit,), name="kworker", daemon=True)
                worker.start()
                worker.join()
        with self._lock:
            self._work_now = max(self._work_now, limit)

    def _drain(self, limit: int | None = None) -> None:
        """The worker: run what is due, then let the next kick start a new one."""
        try:
            self._run_due(limit)
        finally:
            with self._lock:
                self._worker = None

    def _run_due(self, limit: int | None) -> None:
        while True:
            with self._lock:
                if not self._work or (limit is not None and self._work[0][0] > limit):
                    return
                due, _, fn, what = heapq.heappop(self._work)
                self._work_now = max(self._work_now, due)
            self._run_item(fn, what)

    def _run_item(self, fn: Callable[[], None], what: str) -> None:
        try:
            fn()
        except BaseException as e:  # a release that crashed: never lose it
            if not isinstance(e, ReportedError):  # not already reported
                self.report("oops", f"BUG: {what} raised {type(e).__name__}: {e}")

    def flush(self, timeout_s: float = 60.0) -> None:
        """flush_scheduled_work(): run and wait for every queued work item, including those
        that work items queue themselves."""
        sched = self.sched
        if sched is not None:
            if sched.current is not None:  # a task: the work items are tasks; wait for them
                sched.block(lambda: not sched.pending_work(), "flush_scheduled_work()")
            return
        while True:
            self.run_delayed_work()
            with self._lock:
                worker = self._worker
            if worker is None:
                return
            worker.join(timeout_s)
            if worker.is_alive():
                self.report("hang", self.hung_task(timeout_s),
                            "flush_scheduled_work(): a work item never finished")
                return

    def hung_task(self, seconds: float) -> str:
        """The hung-task detector's first line."""
        return f"INFO: task python:{os.getpid()} blocked for more than {seconds:g} seconds."

    # -- waits under the watchdog -------------------------------------------------

    def lock_timeout_s(self) -> float:
        """Real seconds a lock wait may last: the watchdog, but never less than
        lock_watchdog_s, since contention between threads is real time, not emulated."""
        return self._lock_timeout_s

    def wait_for_completion(self, comp: Any, what: str,
                            holders: Callable[[], list[str]] | None = None,
                            stacks: Callable[[], tuple[tuple[str, object], ...]] | None = None
                            ) -> None:
        """wait_for_completion() as a driver calls it (uninterruptible, no timeout) - but
        after watchdog_s emulated seconds, a hang report of what is waited for and who
        holds it, and HangError instead of waiting forever."""
        if not isinstance(comp, Completion):
            raise InvalidArgumentError(f"wait_for_completion: {comp!r} is not a Completion")
        waited = 0
        while not comp.try_wait_for_completion():
            if self.wait_completion_timeout(comp, self.HZ * 10, f"wait_for_completion({what})"):
                return
            waited += 10
            if waited >= self.watchdog_s:
                who = holders() if holders is not None else []
                raise HangError(self.report(
                    "hang", self.hung_task(waited),
                    f"wait_for_completion({what}): nobody has completed it. Holders:\n"
                    + ("\n".join(who) or "  none known"),
                    (*(stacks() if stacks is not None else ()),
                     ("waiting in", caller_stack()))))

    def wait_completion_timeout(self, comp: Completion, jiffies: int, what: str,
                                interruptible: bool = False) -> int:
        """Sleep up to `jiffies` on comp: 0 on timeout, else >= 1 (a count was taken),
        or -ERESTARTSYS for an interruptible wait a signal ended.  What falls due meanwhile
        runs: queued work (advance()), or, under a scheduler, the other tasks."""
        sched = self.sched
        if sched is not None:
            while not comp.try_wait_for_completion():
                if not sched.block(comp.completion_done, what, timeout=jiffies):
                    return 0
            return 1
        self.advance(jiffies)
        if interruptible:
            return comp.wait_for_completion_interruptible_timeout(jiffies)
        return comp.wait_for_completion_timeout(jiffies)

    # -- the leak check ---------------------------------------------------------

    def leak_check(self) -> list[Report]:
        """Every struct, index, device set and open FD still alive, as leak reports.

        It records nothing itself, so it can be asked any number of times; it first
        waits for pending delayed releases, which may report what they find.
        """
        self.flush()
        dev_sets = list(self.dev_sets.values())
        set_ids = {id(dev_set) for dev_set in dev_sets}  # listed as sets, below
        found = [Report("leak", f"unreferenced object {mem.what}", _leak_detail(mem.obj),
                        (("allocated by", str(mem.alloc_stack)),))
                 for key, mem in list(self.allocations.items()) if key not in set_ids]
        found += [Report("leak", f"vfio device index {index} (vfio{index}) was never "
                         "returned to the ida", stacks=(("taken by", str(stack)),))
                  for index, stack in sorted(self.ida.items())]
        found += [Report("leak", f"vfio_device_set {dev_set.describe()} still alive with "
                         f"device_count {dev_set.device_count}",
                         stacks=(("allocated by", str(getattr(self.allocations.get(id(dev_set)),
                                                              "alloc_stack", ""))),))
                  for dev_set in dev_sets]
        found += [Report("leak", f"{f} was never closed", stacks=(("opened by",
                                                                   str(f.open_stack)),))
                  for f in list(self.files)]
        found += [Report("leak", f"{name} is still registered with the container (its "
                         "dma_unmap notifier and iommu_entry were never removed)")
                  for name in sorted(self.container_devices)]
        return found

    def findings(self) -> list[Report]:
        """Everything reported, plus the refcount WARNs the C core logged in the arena."""
        out = list(self.reports)
        for w in self.arena.dmesg(self._warn_since):
            if w.kind != "WARN":  # the kernel's own WARNs are in self.reports already
                out.append(Report("WARN", w.text, f"{w.object}: "
                                  f"{w.old & 0xFFFFFFFF:#x} -> {w.new & 0xFFFFFFFF:#x}",
                                  (("Call Trace", w.stack),)))
        return out

    def __repr__(self) -> str:
        return f"<Kernel {self.semantics} pid {os.getpid()} arena '{self.arena.name}'>"


def _leak_detail(obj: object) -> str:
    """What a leaked struct says of itself (a vfio_device: who still holds it)."""
    explain = getattr(obj, "leak_detail", None)
    return explain() if callable(explain) else "memory allocated and never freed"
