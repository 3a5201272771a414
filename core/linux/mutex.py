"""struct mutex (include/linux/mutex.h): the kernel's sleeping lock, as the model takes it.

Without a scheduler, it is a thread lock whose wait is bounded by the kernel's
lock watchdog (a hang report instead of waiting forever).  Under a scheduler,
taking and releasing it are switch points, and a task that finds it held
sleeps until it is free: if nothing can ever free it, the scheduler reports
the deadlock.  Drivers take it for any lock they hold across a call into the
kernel (a plain threading.Lock would block the one running task for real).
"""

from __future__ import annotations

import threading
from threading import get_ident
from typing import TYPE_CHECKING

from vfio_emu.errors import HangError

if TYPE_CHECKING:  # annotations only: the kernel owns its locks
    from vfio_emu.linux.kernel import Kernel


class Mutex:
    """mutex_init(): a named lock of one kernel; `with m:` is mutex_lock/mutex_unlock.
    recursive=True lets the holder take it again (the model's own re-entrant walks)."""

    __slots__ = ("_depth", "_lock", "kernel", "name", "owner", "recursive")

    def __init__(self, kernel: Kernel, name: str, recursive: bool = False) -> None:
        self.kernel = kernel
        self.name = name
        self.recursive = recursive
        self._lock = threading.Lock()
        self.owner: object = None  # the holder: a task under a scheduler, else a thread ident
        self._depth = 0

    def __repr__(self) -> str:
        return f"<Mutex {self.name} {'held' if self.owner is not None else 'free'}>"

    def held(self) -> bool:
        """Whether the calling thread holds it (lockdep_assert_held)."""
        return self.owner is not None and self.owner == self.kernel.owner()

    def lock(self) -> None:
        """mutex_lock(): wait until it is free; the watchdog's hang instead of forever."""
        me = self.kernel.owner()
        if self.recursive and self.owner == me:
            self._depth += 1
            return
        if self.kernel.sched is None and self._lock.acquire(False):  # free: no wait
            self.owner, self._depth = me, 1
            return
        self._wait(me)

    def _wait(self, me: object) -> None:
        """mutex_lock() of a held mutex, or of any under a scheduler (a switch point)."""
        kernel = self.kernel
        sched = kernel.sched
        if sched is not None and sched.current is not None:
            sched.preempt(f"mutex_lock({self.name})")
            while not self._lock.acquire(blocking=False):
                sched.block(lambda: self.owner is None, f"mutex_lock({self.name}) held by "
                            f"{self._holder()}")
        elif not self._lock.acquire(timeout=kernel.lock_timeout_s()):
            raise HangError(kernel.report(
                "hang", kernel.hung_task(kernel.lock_timeout_s()),
                f"mutex_lock({self.name}): held by {self._holder()}"))
        self.owner, self._depth = me, 1

    def unlock(self) -> None:
        """mutex_unlock()."""
        self._depth -= 1
        if self._depth > 0:
            return
        self.owner = None
        self._lock.release()
        sched = self.kernel.sched  # kernel.preempt(), without its call when there is none
        if sched is not None:
            sched.preempt(f"mutex_unlock({self.name})")

    def _holder(self) -> str:
        owner = self.owner
        name = getattr(owner, "name", None)  # a task
        if isinstance(name, str):
            return f"task {name!r}"
        for t in threading.enumerate():
            if t.ident == owner:
                return t.name
        return f"thread {owner}"

    def __enter__(self) -> Mutex:
        # lock(), its common case in place: a free lock, no scheduler, not held by me
        if self.kernel.sched is None and self._lock.acquire(False):
            self.owner, self._depth = get_ident(), 1
            return self
        self.lock()
        return self

    def __exit__(self, *exc: object) -> None:
        # unlock(), in place
        self._depth -= 1
        if self._depth > 0:
            return
        self.owner = None
        self._lock.release()
        sched = self.kernel.sched
        if sched is not None:
            sched.preempt(f"mutex_unlock({self.name})")


__all__ = ["Mutex"]
