"""struct vfio_device, device sets and the v6.1/v6.2 life-cycle API of include/linux/vfio.h.

A driver's private struct subclasses VfioDevice (the kernel embeds it first).
Its memory is tracked: once freed (kvfree, vfio_free_device, or the v6.2
core), every read or write through a stale reference is a KASAN-style
use-after-free report with the allocation and free stacks, raised as
UseAfterFreeError.  The two counters live in the arena: the object count
(a kref, the driver's reference) and the registration count (a refcount_t
plus a completion that unregister waits on).  A device set (devices sharing a
reset domain and one lock) lives exactly as long as its member objects - not
their registrations: an unregistered device not yet released keeps it alive.
Userspace's side - the device FD and the container - is here too, as
VFIO_GROUP_GET_DEVICE_FD and the FD's release reach into the same fields.
"""

from __future__ import annotations

import enum
import os
import threading
from dataclasses import dataclass, field
from threading import get_ident
from typing import Any, TypeVar

from vfio_emu import stack as _stack
from vfio_emu.errors import EmulatorError, HangError, InvalidArgumentError
from vfio_emu.linux.device import Device
from vfio_emu.linux.errno import EBUSY, EINVAL, ENODEV, ENOMEM, ENOSPC
from vfio_emu.linux.kernel import MINORMASK, Kernel
from vfio_emu.linux.mutex import Mutex
from vfio_emu.linux.slab import Tracked, kfree, kvfree, kzalloc, mem_of, use_after_free
from vfio_emu.shm.refcount import Kref, Refcount
from vfio_emu.stack import Stack, caller_stack, capture_stack, getpid


class State(enum.Enum):
    """Where a vfio_device is in its life cycle."""

    ALLOCATED = "allocated"
    INITIALIZED = "initialized"
    REGISTERED = "registered"
    UNREGISTERING = "unregistering"
    UNREGISTERED = "unregistered"
    RELEASED = "released"
    FREED = "freed"


@dataclass
class Core:
    """The core-private fields of struct vfio_device, kept beside the driver's own."""

    kernel: Kernel
    kref: Kref
    refcount: Refcount
    comp: Any  # Completion
    state: State = State.ALLOCATED
    index: int = -1
    dev: Device | None = None
    ops: Any = None
    dev_set: DeviceSet | None = None
    open_count: int = 0
    initialized: bool = False  # device_initialize() ran: the kobject exists
    in_sysfs: bool = False  # device_add() to device_del(): holds a reference on dev
    kvm: Any = None  # valid between open_device and close_device
    holders: list[tuple[int, Stack]] = field(default_factory=list)  # get_device() callers
    #: "vfio<index>", or "vfio?@<address>" without an index: kept with the index (set_index),
    #: as every traced transition names the device.
    name: str = field(default="", init=False)

    def __post_init__(self) -> None:
        self.set_index(self.index)

    def set_index(self, index: int) -> None:
        self.index = index
        self.name = f"vfio{index}" if index >= 0 else f"vfio?@{id(self):#x}"


class VfioDevice(Tracked):
    """struct vfio_device: subclass it for the driver's struct (it comes first, as in C).

    Fields the core owns are read-only properties here (dev, ops, dev_set,
    index, open_count, state); the driver adds its own attributes freely.
    Allocate it with vfio_alloc_device() (or kzalloc() for the ccw path).
    """

    def _kzalloc(self, kernel: Kernel) -> None:
        name = f"{type(self).__name__}@{id(self):#x}"
        a = kernel.arena
        kref = a.kref(label=f"{name}.kref", count=0)  # zeroed: device_initialize() makes it 1
        object.__getattribute__(self, "__dict__")["_vfio"] = Core(
            kernel, kref, a.refcount(0, label=f"{name}.reg"), a.completion(label=f"{name}.comp"))

    def _kfree(self) -> None:
        core: Core = object.__getattribute__(self, "__dict__")["_vfio"]
        core.state = State.FREED
        for handle in (core.kref, core.refcount, core.comp):
            handle.free()  # the counters were in this memory
        core.kernel.trace.add(core.kernel.jiffies(), core.name, "kfree")

    def __repr__(self) -> str:
        core = object.__getattribute__(self, "__dict__").get("_vfio")
        name = core.name if core is not None else "?"
        mem = mem_of(self)
        state = "freed" if mem is not None and mem.freed else (
            core.state.value if core is not None else "not allocated by kzalloc")
        return f"<{type(self).__name__} {name} {state}>"

    def leak_detail(self) -> str:
        """Which reference was never dropped, for the leak check."""
        core = object.__getattribute__(self, "__dict__")["_vfio"]
        count = core.kref.read()
        held = [f"get_device() by pid {pid} at:\n{stack}" for pid, stack in core.holders]
        own = count - len(held)
        lines = [f"{core.name} ({core.state.value}): object count {count}"]
        if own > 0:
            lines.append(f"{own} reference(s) never put: the driver's own from "
                         "vfio_alloc_device()/vfio_init_device() needs a vfio_put_device()")
        lines += held
        return "\n".join(lines)

    @property
    def dev(self) -> Device | None:
        return core_of(self, "vdev->dev").dev

    @property
    def ops(self) -> Any:
        return core_of(self, "vdev->ops").ops

    @property
    def dev_set(self) -> DeviceSet | None:
        return core_of(self, "vdev->dev_set").dev_set

    @property
    def index(self) -> int:
        return core_of(self, "vdev->index").index

    @property
    def kvm(self) -> Any:
        """vdev->kvm: the group's KVM, set for open_device and cleared after the last close."""
        return core_of(self, "vdev->kvm").kvm

    @property
    def open_count(self) -> int:
        return core_of(self, "vdev->open_count").open_count

    @property
    def state(self) -> State:
        return core_of(self, "vdev state").state


_dict_of = object.__getattribute__


def core_of(vdev: object, access: str) -> Core:
    """The core fields of a live device; a freed one is a use-after-free right here."""
    if isinstance(vdev, VfioDevice):  # the common case first: a live device
        d = _dict_of(vdev, "__dict__")
        mem = d.get("_kmem")
        if mem is not None and not mem.freed:
            return d["_vfio"]  # type: ignore[no-any-return]
    if not isinstance(vdev, VfioDevice):
        raise InvalidArgumentError(f"{access}: {vdev!r} is not a vfio_device")
    mem = mem_of(vdev)
    if mem is None:
        raise InvalidArgumentError(
            f"{access}: {vdev!r} was not allocated by vfio_alloc_device() or kzalloc()")
    if mem.freed:
        use_after_free(vdev, access)
    return object.__getattribute__(vdev, "__dict__")["_vfio"]  # type: ignore[no-any-return]


# -- device sets --------------------------------------------------------------------------

class DeviceSet(Tracked):
    """struct vfio_device_set: set_id, the set mutex, the member list, device_count.

    Kernel memory: freed with its last member, and poisoned then.
    """

    def _kzalloc(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self.set_id: Any = None  # kept alive: the xarray is keyed by its identity
        self.lock = Mutex(kernel, "&dev_set->lock")
        self.device_list: list[VfioDevice] = []
        self.device_count = 0

    def _kfree(self) -> None:
        # Out of the xarray, the key need not stay alive; and the set_id is often the
        # device itself, whose core holds this set: a reference cycle, left to the GC.
        self.set_id = None

    def describe(self) -> str:
        return f"(set_id {type(self.set_id).__name__}@{id(self.set_id):#x})"

    def __enter__(self) -> DeviceSet:
        """mutex_lock(&dev_set->lock): lockdep's report instead of a self-deadlock."""
        lock = self.lock
        if lock.owner == get_ident():  # lock.held()
            raise HangError(self.kernel.report(
                "WARN", "WARNING: possible recursive locking detected",
                f"this task already holds &dev_set->lock of {self.describe()} and takes it "
                "again: it would deadlock"))
        lock.lock()
        return self

    def __exit__(self, *exc: object) -> None:
        self.lock.unlock()

    def held(self) -> bool:
        return self.lock.held()


def vfio_assign_device_set(vdev: VfioDevice, set_id: Any) -> int:
    """Put vdev in the set keyed by set_id (created on first use); 0 or -EINVAL."""
    core = core_of(vdev, "vfio_assign_device_set")
    kernel = core.kernel
    if set_id is None:
        kernel.warn("WARNING: vfio_assign_device_set: set_id is NULL")
        return -EINVAL
    with kernel.xa_lock:  # lookup, create and count++ as one step, as under xa_lock
        dev_set = kernel.dev_sets.get(id(set_id))
        if dev_set is None:
            new = kzalloc(kernel, DeviceSet)
            if new is None:
                return -ENOMEM
            new.set_id = set_id
            dev_set = kernel.dev_sets[id(set_id)] = new
        dev_set.device_count += 1
    with dev_set:
        if vdev in dev_set.device_list:
            # What CONFIG_DEBUG_LIST says; without it the list silently corrupts.
            kernel.warn("list_add double add: new=vfio_device->dev_set_list, "
                        f"prev=..., next=... ({core.name} assigned to {dev_set.describe()} twice)")
        else:
            dev_set.device_list.append(vdev)
        core.dev_set = dev_set
    kernel.trace.add(kernel.jiffies(), core.name, "vfio_assign_device_set",
                     detail=f"{dev_set.describe()} count {dev_set.device_count}")
    return 0


def vfio_release_device_set(vdev: VfioDevice) -> None:
    """Leave the set; the last member frees it (from release, or a failed init)."""
    core = core_of(vdev, "vfio_release_device_set")
    dev_set = core.dev_set
    if dev_set is None:
        return
    with dev_set:
        if vdev in dev_set.device_list:
            dev_set.device_list.remove(vdev)
    with core.kernel.xa_lock:  # count--, erase and free as one step
        dev_set.device_count -= 1
        if dev_set.device_count == 0:
            core.kernel.dev_sets.pop(id(dev_set.set_id), None)
            kfree(dev_set)


def vfio_device_set_open_count(dev_set: DeviceSet) -> int:
    """Sum of the members' open_count; the caller must hold the set lock (lockdep checks)."""
    if not isinstance(dev_set, DeviceSet):
        raise InvalidArgumentError(f"vfio_device_set_open_count: {dev_set!r} is not a set")
    if not dev_set.held():
        dev_set.kernel.warn("WARNING: lockdep_assert_held(&dev_set->lock) failed in "
                            "vfio_device_set_open_count")
    return sum(core_of(d, "vfio_device_set_open_count").open_count
               for d in dev_set.device_list)


# -- alloc / init / put / release ----------------------------------------------------

def _counts(core: Core) -> tuple[int, int]:
    return core.kref.read(), core.refcount.read()


def _trace(core: Core, op: str, kref: tuple[int, int] | None = None,
           reg: tuple[int, int] | None = None, detail: str = "") -> None:
    kernel = core.kernel
    trace = kernel.trace
    # Trace.add() in place, without a scheduler (and kernel.jiffies(): one int, read)
    if trace.sched is None:
        trace.pending.append((kernel._work_now, _stack.PID, core.name, op, kref, reg,
                               core.open_count, detail, ""))
    else:
        trace.add(kernel._work_now, core.name, op, kref, reg, core.open_count, detail)


_V = TypeVar("_V", bound="VfioDevice")


def vfio_alloc_device(cls: type[_V], dev: Device, ops: Any) -> _V | int:
    """Allocate the driver's struct and vfio_init_device() it; the struct, or -errno.

    The reference returned belongs to the caller: drop it with vfio_put_device().
    """
    if not isinstance(dev, Device):
        raise InvalidArgumentError(f"vfio_alloc_device: dev must be a Device, not {dev!r}")
    kernel = dev.kernel
    if not (isinstance(cls, type) and issubclass(cls, VfioDevice)):
        kernel.warn(f"WARNING: vfio_alloc_device: {cls!r} does not embed struct vfio_device "
                    "first (size < sizeof(struct vfio_device))")
        return -EINVAL
    if ops is None:
        raise InvalidArgumentError("vfio_alloc_device: ops is NULL")
    vdev = kzalloc(kernel, cls)
    if vdev is None:
        return -ENOMEM
    # The ida takes its index in this same call: its stack is the allocation's.
    ret = _init_device(vdev, dev, ops, _dict_of(vdev, "__dict__")["_kmem"].alloc_stack)
    if ret:
        kvfree(vdev)
        return ret
    return vdev


def vfio_init_device(vdev: VfioDevice, dev: Device, ops: Any) -> int:
    """Index, completion, ops->init, then device_initialize (kref = 1); 0 or -errno.

    v6.1 exports it for vfio-ccw, whose struct outlives the vfio_device; v6.2 made it
    static (d1104f9327df).  If ops->init fails, release is not called: init must undo
    its own work.
    """
    core = core_of(vdev, "vfio_init_device")
    if core.kernel.semantics != "v6.1":
        raise EmulatorError("vfio_init_device() is static in v6.2: drivers use "
                            "vfio_alloc_device()")
    return _init_device(vdev, dev, ops)


def _init_device(vdev: VfioDevice, dev: Device, ops: Any, stack: Stack | None = None) -> int:
    """vfio_init_device(); `stack`: the caller's, when its caller has it already (the stack
    capture_stack() would take here)."""
    core = core_of(vdev, "vfio_init_device")
    if not isinstance(dev, Device) or dev.kernel is not core.kernel:
        raise InvalidArgumentError(f"vfio_init_device: {dev!r} is not a device of this kernel")
    if ops is None:
        raise InvalidArgumentError("vfio_init_device: ops is NULL")
    kernel = core.kernel
    with kernel._lock:  # ida_alloc_max()
        free = 0  # the lowest index not taken
        while free in kernel.ida:
            free += 1
        if free > MINORMASK:
            return -ENOSPC
        kernel.ida[free] = capture_stack() if stack is None else stack
    core.set_index(free)
    core.comp.init()
    core.dev, core.ops = dev, ops
    init = getattr(ops, "init", None)
    if init is not None:
        ret = init(vdev)
        if type(ret) is not int:
            vfio_release_device_set(vdev)
            kernel.ida.pop(free, None)
            raise InvalidArgumentError(f"ops->init must return an int (0 or -errno), not {ret!r}")
        if ret:
            vfio_release_device_set(vdev)
            kernel.ida.pop(free, None)
            _trace(core, "vfio_init_device: init failed", detail=f"ret {ret}")
            core.set_index(-1)
            return int(ret)
    if core.initialized:
        # What kobject_init() says when the embedded kobject was never released or memset.
        kernel.warn(f"kobject ({id(vdev):#x}): tried to init an initialized object, something "
                    "is seriously wrong.", f"{core.name} is {core.state.value}")
    core.kref.init()  # device_initialize()
    core.initialized = True
    core.state = State.INITIALIZED
    _trace(core, "vfio_init_device", kref=(0, 1))
    return 0


def get_device(vdev: VfioDevice) -> VfioDevice:
    """get_device(&vdev->device): one more object reference; the caller is remembered."""
    core = core_of(vdev, "get_device")
    before = core.kref.read()
    core.kref.get()
    core.holders.append((getpid(), capture_stack()))
    _trace(core, "get_device", kref=(before, core.kref.read()))
    return vdev


def holders_of(vdev: VfioDevice) -> list[str]:
    """The get_device() callers still holding vdev, for a hang report (see
    Kernel.wait_for_completion's holders)."""
    core = core_of(vdev, "holders_of")
    return [f"  get_device() by pid {pid}:\n{stack}" for pid, stack in core.holders]


def holders_report(kernel: Kernel) -> str:
    """Who holds what now: every registered device with its counts, its open FDs and who
    opened them, its get_device() callers - what a task stuck on a device waits for."""
    lines = []
    with kernel.device_lock:
        devices = list(kernel.devices)
    for vdev in devices:
        core = object.__getattribute__(vdev, "__dict__")["_vfio"]
        lines.append(f"{core.name} ({core.state.value}): object count {core.kref.read()}, "
                     f"registration count {core.refcount.read()}, open {core.open_count}")
        for f in [f for f in list(kernel.files) if f.vdev is vdev]:
            lines.append(f"  {f} opened by pid {f.pid} at:\n{f.open_stack}")
        lines += [f"  get_device() by pid {pid} at:\n{stack}" for pid, stack in core.holders]
    return "\n".join(lines) or "no registered device"


def put_device(vdev: VfioDevice) -> None:
    """put_device(&vdev->device): balances a get_device() (the driver's own reference
    goes with vfio_put_device(); the kernel does not tell the two apart, hang reports do)."""
    core = core_of(vdev, "put_device")
    if core.holders:
        core.holders.pop()
    vfio_put_device(vdev)


def vfio_put_device(vdev: VfioDevice) -> None:
    """put_device(): drop a reference; the last one releases (later, with delayed_release)."""
    core = core_of(vdev, "vfio_put_device")
    kernel = core.kernel
    if not core.initialized:
        kernel.warn(f"kobject: '(null)' ({id(vdev):#x}): is not initialized, yet kobject_put() "
                    "is being called.")
    before = core.kref.read()
    # Trace first: after a put that is not the last, another holder may free it at once.
    _trace(core, "vfio_put_device", kref=(before, (before - 1) & 0xFFFFFFFF))
    if not core.kref.put():
        return
    if core.state in (State.REGISTERED, State.UNREGISTERING):
        kernel.warn(f"vfio {core.name}: released while still registered: still on the group "
                    "device list and in sysfs, reachable by every open FD")
    kernel.kobject_release(lambda: vfio_device_release(vdev), core.name)


def vfio_device_release(vdev: VfioDevice) -> None:
    """The device's release: leave the set, free the index, ops->release (v6.2: then free)."""
    core = core_of(vdev, "vfio_device_release")
    kernel = core.kernel
    # kobject_cleanup(): a device still in sysfs is taken out of it, and its reference on
    # the parent goes last, after the release (which may free vdev itself).
    pinned = core.dev if core.in_sysfs else None
    core.in_sysfs = False
    try:
        _release(vdev, core, kernel)
    finally:
        if pinned is not None:
            pinned.put_ref()


def _release(vdev: VfioDevice, core: Core, kernel: Kernel) -> None:
    vfio_release_device_set(vdev)
    kernel.ida.pop(core.index, None)
    core.state = State.RELEASED
    _trace(core, "vfio_device_release")
    release = getattr(core.ops, "release", None)
    if kernel.semantics == "v6.1":
        if release is None:
            raise kernel.oops("BUG: kernel NULL pointer dereference, address: 0000000000000000",
                              f"RIP: vfio_device_release+0x.. ({core.name}: ops->release is "
                              "NULL; it is mandatory in v6.1)")
        release(vdev)  # must end with vfio_free_device(), except ccw
    else:
        if release is not None:
            release(vdev)
        kvfree(vdev)


def memset_vfio_device(vdev: VfioDevice) -> None:
    """memset(&private->vdev, 0, sizeof(private->vdev)), as vfio-ccw's release does so
    that the next vfio_init_device() starts from a clean struct (its kobject too)."""
    core = core_of(vdev, "memset")
    core.kref.refcount.set(0)
    core.refcount.set(0)
    core.comp.reinit()
    core.set_index(-1)
    core.dev, core.ops, core.dev_set = None, None, None
    core.open_count, core.initialized, core.in_sysfs = 0, False, False
    core.holders.clear()
    core.state = State.ALLOCATED
    _trace(core, "memset vfio_device")


def vfio_free_device(vdev: VfioDevice) -> None:
    """v6.1: the driver's release frees the struct with this (= kvfree)."""
    core = core_of(vdev, "vfio_free_device")
    if core.kernel.semantics != "v6.1":
        raise EmulatorError("vfio_free_device() does not exist in v6.2: the core frees the "
                            "device after ops->release")
    kvfree(vdev)


# -- registration ---------------------------------------------------------------------

def vfio_device_try_get_registration(vdev: VfioDevice) -> bool:
    """refcount_inc_not_zero on the registration count: 0 means not registered (any more)."""
    core = core_of(vdev, "vfio_device_try_get_registration")
    before = core.refcount.read()
    ok = core.refcount.inc_not_zero()
    _trace(core, "try_get_registration", reg=(before, core.refcount.read()),
           detail="ok" if ok else "failed")
    return ok


def vfio_device_put_registration(vdev: VfioDevice) -> None:
    """refcount_dec_and_test on the registration count; 1 -> 0 completes the unregister wait."""
    core = core_of(vdev, "vfio_device_put_registration")
    before = core.refcount.read()
    # Trace first: once complete() runs, unregister may return and the driver free it all.
    _trace(core, "put_registration", reg=(before, (before - 1) & 0xFFFFFFFF))
    if core.refcount.dec_and_test():
        core.comp.complete()


def _register(vdev: VfioDevice, how: str) -> int:
    core = core_of(vdev, how)
    kernel = core.kernel
    if core.state is not State.INITIALIZED:
        kernel.warn(f"WARNING: {how}: {core.name} is {core.state.value}, not initialized")
        return -EINVAL
    fault = kernel.injected("register")
    if fault:
        return fault
    if core.dev_set is None:
        vfio_assign_device_set(vdev, vdev)  # a singleton set; the return value is ignored
    with kernel.device_lock:
        for other in kernel.devices:
            if core_of(other, "group device list").dev is core.dev:
                kernel.warn(f"WARNING: {core.dev.name if core.dev else '?'}: Device already "
                            "exists on group")
                return -EBUSY
    core.in_sysfs = True  # dev_set_name("vfio%d") + device_add(): pins the parent
    if core.dev is not None:
        core.dev.get_ref()
    before = core.refcount.read()
    core.refcount.set(1)  # refcounting can't start until the driver calls register
    with kernel.device_lock:
        kernel.devices.append(vdev)
    core.state = State.REGISTERED
    _trace(core, how, reg=(before, 1))
    return 0


def vfio_register_group_dev(vdev: VfioDevice) -> int:
    """Register a device with an IOMMU group: findable by name, registration count 1."""
    return _register(vdev, "vfio_register_group_dev")


def vfio_register_emulated_iommu_dev(vdev: VfioDevice) -> int:
    """Register a device whose IOMMU is emulated (mdev drivers)."""
    return _register(vdev, "vfio_register_emulated_iommu_dev")


def _unlink(vdev: VfioDevice, core: Core) -> None:
    with core.kernel.device_lock:
        if vdev in core.kernel.devices:
            core.kernel.devices.remove(vdev)
    _device_del(core)
    _trace(core, "unlink: group list, device_del")


def _device_del(core: Core) -> None:
    """device_del(): out of sysfs; kobject_del() drops the reference on the parent (the
    release no longer needs it: lib/kobject.c)."""
    if not core.in_sysfs:
        return
    core.in_sysfs = False
    if core.dev is not None:
        core.dev.put_ref()


def vfio_unregister_group_dev(vdev: VfioDevice) -> None:
    """Drop the registration reference and wait - asking userspace, every 10 s - until
    every FD is closed; a signal only turns the waits uninterruptible.  No upper
    bound, except the kernel's watchdog, which reports a hang (HangError)."""
    core = core_of(vdev, "vfio_unregister_group_dev")
    kernel = core.kernel
    if core.state is not State.REGISTERED:
        kernel.warn(f"WARNING: vfio_unregister_group_dev: {core.name} is {core.state.value}")
        return
    core.state = State.UNREGISTERING
    if kernel.unregister_order == "unlink-first":
        _unlink(vdev, core)
    vfio_device_put_registration(vdev)
    rc = 1 if core.comp.try_wait_for_completion() else 0
    i, interrupted, waited = 0, False, 0
    request = getattr(core.ops, "request", None)
    while rc <= 0:
        if request is not None:
            _trace(core, "ops->request", detail=f"count {i}")
            request(vdev, i)
            i += 1
        # 10 s asleep: what falls due meanwhile happens
        rc = kernel.wait_completion_timeout(core.comp, kernel.HZ * 10,
                                            f"vfio_unregister_group_dev({core.name})",
                                            interruptible=not interrupted)
        if rc < 0:
            interrupted = True
            kernel.report("info", f"vfio {core.name}: Device is currently in use, task "
                          f"\"python\" ({os.getpid()}) blocked until device is released")
        if rc <= 0:
            waited += 10
            if waited >= kernel.watchdog_s:
                raise HangError(_hang_report(vdev, core, waited))
    if kernel.unregister_order == "v6.1":
        _unlink(vdev, core)
    core.state = State.UNREGISTERED
    _trace(core, "vfio_unregister_group_dev", detail="done")


def _hang_report(vdev: VfioDevice, core: Core, waited: int) -> Any:
    kernel = core.kernel
    files = [f for f in list(kernel.files) if f.vdev is vdev]
    count = core.refcount.read()
    holders = [f"  {f} opened by pid {f.pid}" for f in files]
    extra = count - len(files)
    if count >= 1 << 31:
        holders.append(f"  the count is saturated ({count:#x}): it can never reach 0")
    elif extra > 0:
        holders.append(f"  {extra} registration reference(s) held without an open FD "
                       "(vfio_device_try_get_registration() callers)")
    return kernel.report(
        "hang", kernel.hung_task(waited),
        f"vfio_unregister_group_dev({core.name}) waits for the registration count to reach 0; "
        f"it is {count if count < 1 << 31 else 'saturated'}. Holders:\n"
        + ("\n".join(holders) or "  none found"),
        (*((f"{f} opened by", f.open_stack) for f in files), ("waiting in", caller_stack())))


# -- the container: the device's dma_unmap registration -------------------------------

def _container_register(core: Core) -> None:
    """After the first open_device: the device joins the container's device list."""
    core.kernel.container_devices.add(core.name)
    _trace(core, "container register")


def _container_unregister(core: Core) -> None:
    """list_del(&device->iommu_entry): twice is the list corruption DEBUG_LIST reports."""
    if core.name not in core.kernel.container_devices:
        core.kernel.warn(f"list_del corruption: {core.name}->iommu_entry is not on the "
                         "container's device list (container unregistered twice)")
        return
    core.kernel.container_devices.discard(core.name)
    _trace(core, "container unregister")


def _dev_set(core: Core, where: str) -> DeviceSet:
    """vdev->dev_set, which register always assigns - unless its allocation failed, as
    the kernel ignores: then the kernel dereferences NULL."""
    if core.dev_set is None:
        raise core.kernel.oops("BUG: kernel NULL pointer dereference, address: "
                               "0000000000000000", f"RIP: {where} ({core.name}: dev_set is NULL)")
    return core.dev_set


def _close_device(vdev: VfioDevice, core: Core, last: bool) -> None:
    """close_device on the last close, then the container unregister: only then in the
    fixed core (7fdba0011157); the merge-window core unregistered on every close."""
    if last:
        close_device = getattr(core.ops, "close_device", None)
        if close_device is not None:
            close_device(vdev)
    if last or not core.kernel.container_fix:
        _container_unregister(core)


# -- the device FD, as userspace sees it ------------------------------------------------

class DeviceFile:
    """An open device FD: holds one registration reference until close()."""

    def __init__(self, vdev: VfioDevice, kernel: Kernel) -> None:
        self.vdev = vdev
        self.kernel = kernel
        self.pid = getpid()
        self.open_stack = capture_stack()
        self.closed = False
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        core = object.__getattribute__(self.vdev, "__dict__")["_vfio"]
        return f"<vfio-device fd of {core.name}{' (closed)' if self.closed else ''}>"

    def close(self) -> None:
        """The last fput: close_device on the last close, then put_registration."""
        with self._lock:
            if self.closed:
                raise InvalidArgumentError(f"{self!r} is already closed")
            self.closed = True
        self.kernel.files.discard(self)
        core = core_of(self.vdev, "vfio_device_fops_release")
        with _dev_set(core, "vfio_device_fops_release"):
            if core.open_count == 0:
                self.kernel.warn("WARNING: vfio_device_fops_release: WARN_ON_ONCE("
                                 "device->open_count == 0)")
            else:
                _close_device(self.vdev, core, last=core.open_count == 1)
            core.open_count = (core.open_count - 1) & 0xFFFFFFFF  # unsigned, as in C
            if core.open_count == 0:
                core.kvm = None
        _trace(core, "fd close")
        if self.kernel.container_users <= 1:  # vfio_device_unassign_container()
            self.kernel.warn("WARNING: vfio_device_unassign_container: "
                             "WARN_ON(group->container_users <= 1)")
        self.kernel.container_users -= 1
        vfio_device_put_registration(self.vdev)


def vfio_group_get_device_fd(kernel: Kernel, name: str) -> DeviceFile | int:
    """VFIO_GROUP_GET_DEVICE_FD: find a registered device by name and open it; FD or -errno."""
    if not isinstance(kernel, Kernel):
        raise InvalidArgumentError(f"vfio_group_get_device_fd: {kernel!r} is not a Kernel")
    found = None
    with kernel.device_lock:  # the walk and the try_get, as under group->device_lock
        for vdev in kernel.devices:
            core = core_of(vdev, "vfio_group_get_device_fd")  # a freed device here is a UAF
            match = getattr(core.ops, "match", None)
            if match is not None:
                ret = match(vdev, name)
                if type(ret) is not int:
                    raise InvalidArgumentError(f"ops->match must return an int, not {ret!r}")
                if ret < 0:
                    return ret
                hit = ret > 0
            else:
                hit = core.dev is not None and core.dev.name == name
            if hit and vfio_device_try_get_registration(vdev):
                found = vdev
                break
    if found is None:
        return -ENODEV
    core = core_of(found, "vfio_device_open")
    dev_set = _dev_set(core, "vfio_device_open")
    kernel.container_users += 1  # vfio_device_assign_container()
    with dev_set:
        core.open_count += 1
        if core.open_count == 1:
            core.kvm = kernel.kvm  # under group_lock: the group's KVM
            open_device = getattr(core.ops, "open_device", None)
            ret = open_device(found) if open_device is not None else 0
            if ret:
                core.open_count -= 1
                core.kvm = None
                _trace(core, "open_device failed", detail=f"ret {ret}")
                kernel.container_users -= 1
                vfio_device_put_registration(found)
                return int(ret)
            _container_register(core)
    fail = kernel.should_fail_alloc()  # anon_inode_getfile() for the FD
    if fail:
        with dev_set:
            # The merge-window core unregistered here only for drivers with close_device.
            if core.open_count == 1 and (kernel.container_fix or getattr(
                    core.ops, "close_device", None) is not None):
                _close_device(found, core, last=True)
            core.open_count -= 1
            if core.open_count == 0:  # err_undo_count: the KVM goes with the last opener
                core.kvm = None
        _trace(core, "fd creation failed", detail=f"ret {fail}")
        kernel.container_users -= 1
        vfio_device_put_registration(found)
        return fail
    f = DeviceFile(found, kernel)
    kernel.files.add(f)
    _trace(core, "fd open")
    return f


__all__ = [
    "Core",
    "DeviceFile",
    "DeviceSet",
    "State",
    "VfioDevice",
    "core_of",
    "get_device",
    "holders_of",
    "holders_report",
    "memset_vfio_device",
    "put_device",
    "vfio_alloc_device",
    "vfio_assign_device_set",
    "vfio_device_put_registration",
    "vfio_device_release",
    "vfio_device_set_open_count",
    "vfio_device_try_get_registration",
    "vfio_free_device",
    "vfio_group_get_device_fd",
    "vfio_init_device",
    "vfio_put_device",
    "vfio_register_emulated_iommu_dev",
    "vfio_register_group_dev",
    "vfio_release_device_set",
    "vfio_unregister_group_dev",
]
