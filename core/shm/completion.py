"""struct completion (kernel/sched/completion.c, v6.1), shared by every process of an arena.

Timeouts are in jiffies of the arena's emulated clock and follow the
kernel's return conventions.  Every wait - even the uninterruptible one -
sleeps in slices of WAIT_SLICE_NS and comes back to Python between them, so
Ctrl-C or a pytest-timeout gets through within one slice.  If such an exception lands
just after the C core took a count, the count is handed back (complete()),
so an interrupted wait never loses or double-consumes one.  (That needs
CPython 3.11 or later, which runs signal handlers only at calls and loop
jumps; on 3.10 a handler may also run between the wait's return and its
caller, and a count taken in that instant is lost with the exception.)
"""

from __future__ import annotations

import time

from vfio_emu.errors import InvalidArgumentError
from vfio_emu.shm import _binding as C
from vfio_emu.shm.clock import MAX_SCHEDULE_TIMEOUT
from vfio_emu.shm.handle import Handle

#: The kernel's "restart the syscall" status; interruptible waits return -ERESTARTSYS.
ERESTARTSYS = 512
#: done's value after complete_all(): every later wait passes until reinit.
UINT_MAX = 0xFFFFFFFF
#: Longest real time a wait sleeps in C before Python's signal handlers get to run.
WAIT_SLICE_NS = 20_000_000
_NS_MAX = (1 << 63) - 1

_complete = C.completion_complete
_try_wait = C.completion_try_wait
_wait = C.completion_wait
_E_TIMEDOUT = C.E_TIMEDOUT
_E_INTR = C.E_INTR


def _timeout(timeout: object) -> int:
    if type(timeout) is not int or not 0 <= timeout <= MAX_SCHEDULE_TIMEOUT:
        raise InvalidArgumentError(
            f"timeout={timeout!r} must be an int of jiffies from 0 to "
            "MAX_SCHEDULE_TIMEOUT (which means none)")
    return timeout


class Completion(Handle):
    """A one-or-many-shot event: complete() counts, complete_all() opens it for good."""

    __slots__ = ()
    KIND = C.KIND_COMPLETION

    def reinit(self) -> None:
        """reinit_completion(): done = 0 (the caller guarantees nobody waits)."""
        r = C.completion_reinit(self._h)
        if r:
            self._slow(r, "reinit_completion")

    init = reinit

    def complete(self) -> None:
        """complete(): one more count (up to UINT_MAX), wake one sleeper."""
        r = _complete(self._h)
        if r:
            self._slow(r, "complete")

    def complete_all(self) -> None:
        """complete_all(): done = UINT_MAX, wake everyone; permanent until reinit()."""
        r = C.completion_complete_all(self._h)
        if r:
            self._slow(r, "complete_all")

    def try_wait_for_completion(self) -> bool:
        """try_wait_for_completion(): take a count without sleeping."""
        r = _try_wait(self._h)
        if r & -2:
            return bool(self._slow(r, "try_wait_for_completion"))
        return r == 1  # type: ignore[no-any-return]

    def completion_done(self) -> bool:
        """completion_done(): True if a wait would not sleep."""
        r = C.completion_done(self._h)
        if r < 0:
            self._slow(r, "completion_done")
        return r == 1  # type: ignore[no-any-return]

    @property
    def done(self) -> int:
        """The raw count (UINT_MAX after complete_all)."""
        r = C.completion_read(self._h)
        if r < 0:
            self._slow(r, "completion.done")
        return r  # type: ignore[no-any-return]

    @property
    def waiters(self) -> int:
        """Tasks registered asleep on this completion, in any process.

        A process killed in its sleep stays counted; it costs only a spurious wake.
        """
        r = C.completion_waiters(self._h)
        if r < 0:
            self._slow(r, "completion.waiters")
        return r  # type: ignore[no-any-return]

    def wait_for_completion(self) -> None:
        """wait_for_completion(): uninterruptible, no timeout."""
        self._wait(MAX_SCHEDULE_TIMEOUT, False, "wait_for_completion")

    def wait_for_completion_timeout(self, timeout: int) -> int:
        """wait_for_completion_timeout(): 0 on timeout, else the jiffies left (>= 1)."""
        return self._wait(_timeout(timeout), False, "wait_for_completion_timeout")

    def wait_for_completion_interruptible(self) -> int:
        """wait_for_completion_interruptible(): 0, or -ERESTARTSYS if a signal came first."""
        r = self._wait(MAX_SCHEDULE_TIMEOUT, True, "wait_for_completion_interruptible")
        return r if r < 0 else 0

    def wait_for_completion_interruptible_timeout(self, timeout: int) -> int:
        """-ERESTARTSYS, 0 on timeout, or the jiffies left (>= 1)."""
        return self._wait(_timeout(timeout), True, "wait_for_completion_interruptible_timeout")

    def _wait(self, timeout: int, interruptible: bool, op: str) -> int:
        clock = self._arena.clock
        start = time.monotonic_ns()
        end = None if timeout >= MAX_SCHEDULE_TIMEOUT else start + clock.jiffies_to_ns(timeout)
        # A deadline past int64 nanoseconds (~292 years) is no deadline at all.
        deadline = -1 if end is None or end >= _NS_MAX else end
        spin = not interruptible  # spinning would hide a signal that lands meanwhile
        h = self._h
        consumed = C.new("uint32_t *")
        try:
            while True:
                r = _wait(h, deadline, WAIT_SLICE_NS, spin, consumed)
                if r == 1:
                    if end is None:
                        return timeout
                    left = clock.ns_to_jiffies(end - time.monotonic_ns())
                    return max(1, min(left, timeout))
                if r == _E_TIMEDOUT:
                    return 0
                if r == _E_INTR and interruptible:
                    return -ERESTARTSYS
                if r < 0 and r != _E_INTR:
                    self._slow(r, op)
                # A slice ended (or an uninterruptible sleep saw a signal): Python's
                # signal handlers run here, and may raise.
        except BaseException:
            if consumed[0]:
                consumed[0] = 0
                _complete(h)  # hand back the count this interrupted wait took
            raise
