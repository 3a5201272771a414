"""Device sets: devices sharing a reset domain and one lock, freed with the last member object.

A set lives exactly as long as its member objects - not their registrations:
an unregistered device that is not yet released keeps the set alive.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from vfio_emu.errors import InvalidArgumentError
from vfio_emu.kernel import EINVAL, HangError
from vfio_emu.memory import Tracked, kfree, kzalloc, mem_of

if TYPE_CHECKING:
    from vfio_emu.device import VfioDevice
    from vfio_emu.kernel import Kernel


class DeviceSet(Tracked):
    """struct vfio_device_set: set_id, the set mutex, the member list, device_count.

    Kernel memory: freed with its last member, and poisoned then.
    """

    def _kzalloc(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self.set_id: Any = None  # kept alive: the xarray is keyed by its identity
        self.lock = threading.Lock()
        self.lock_owner: int | None = None
        self.device_list: list[VfioDevice] = []
        self.device_count = 0
        mem = mem_of(self)
        assert mem is not None
        mem.is_device_set = True  # type: ignore[attr-defined]  # listed as a set by leak_check

    def describe(self) -> str:
        return f"(set_id {type(self.set_id).__name__}@{id(self.set_id):#x})"

    def __enter__(self) -> DeviceSet:
        """mutex_lock(&dev_set->lock): lockdep's report instead of a self-deadlock, and the
        watchdog's instead of waiting forever for another holder."""
        kernel = self.kernel
        if self.held():
            raise HangError(kernel.report(
                "WARN", "WARNING: possible recursive locking detected",
                f"this task already holds &dev_set->lock of {self.describe()} and takes it "
                "again: it would deadlock"))
        if not self.lock.acquire(timeout=kernel.lock_timeout_s()):
            raise HangError(kernel.report(
                "hang", kernel.hung_task(kernel.lock_timeout_s()),
                f"mutex_lock(&dev_set->lock) of {self.describe()}: held by thread "
                f"{self.lock_owner}"))
        self.lock_owner = threading.get_ident()
        return self

    def __exit__(self, *exc: object) -> None:
        self.lock_owner = None
        self.lock.release()

    def held(self) -> bool:
        return self.lock_owner == threading.get_ident()


def vfio_assign_device_set(vdev: VfioDevice, set_id: Any) -> int:
    """Put vdev in the set keyed by set_id (created on first use); 0 or -EINVAL."""
    from vfio_emu.device import core_of

    core = core_of(vdev, "vfio_assign_device_set")
    kernel = core.kernel
    if set_id is None:
        kernel.warn("WARNING: vfio_assign_device_set: set_id is NULL")
        return -EINVAL
    with kernel.xa_lock:  # lookup, create and count++ as one step, as under xa_lock
        dev_set = kernel.dev_sets.get(id(set_id))
        if dev_set is None:
            new = kzalloc(kernel, DeviceSet)
            if isinstance(new, int):
                return new  # -ENOMEM
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
    kernel.trace.record(kernel.jiffies(), core.name, "vfio_assign_device_set",
                        detail=f"{dev_set.describe()} count {dev_set.device_count}")
    return 0


def vfio_release_device_set(vdev: VfioDevice) -> None:
    """Leave the set; the last member frees it (from release, or a failed init)."""
    from vfio_emu.device import core_of

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
    from vfio_emu.device import core_of

    if not isinstance(dev_set, DeviceSet):
        raise InvalidArgumentError(f"vfio_device_set_open_count: {dev_set!r} is not a set")
    if not dev_set.held():
        dev_set.kernel.warn("WARNING: lockdep_assert_held(&dev_set->lock) failed in "
                            "vfio_device_set_open_count")
    return sum(core_of(d, "vfio_device_set_open_count").open_count
               for d in dev_set.device_list)
