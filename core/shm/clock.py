"""Emulated time: jiffies at an emulated HZ, running time_scale times faster than real time.

The kernel's life-cycle delays are long (10 s between unregister requests,
1-4 s of DEBUG_KOBJECT_RELEASE delay); a time_scale of 1000 runs them in
10 ms and 1-4 ms while every timeout keeps its kernel value in jiffies.
The epoch and both factors live in the arena header, so every process that
attached the arena reads the same jiffies.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from vfio_emu.errors import InvalidArgumentError

#: schedule_timeout()'s "forever" (LONG_MAX): no deadline at all.
MAX_SCHEDULE_TIMEOUT = (1 << 63) - 1


@dataclass(frozen=True)
class Clock:
    """Converts between jiffies and real CLOCK_MONOTONIC nanoseconds."""

    hz: int
    time_scale: float
    epoch_ns: int

    @property
    def jiffy_ns(self) -> float:
        """Real nanoseconds one jiffy lasts."""
        return 1e9 / (self.hz * self.time_scale)

    def jiffies(self) -> int:
        """Jiffies elapsed since the arena was created."""
        return int((time.monotonic_ns() - self.epoch_ns) / self.jiffy_ns)

    def jiffies_to_ns(self, j: int) -> int:
        """Real nanoseconds that j jiffies take."""
        return int(j * self.jiffy_ns)

    def ns_to_jiffies(self, ns: int) -> int:
        """Jiffies covering ns real nanoseconds, rounded up as the kernel rounds timeouts."""
        return -int(-ns // self.jiffy_ns)

    def msecs_to_jiffies(self, ms: int) -> int:
        """msecs_to_jiffies(): emulated milliseconds to jiffies, rounded up."""
        if type(ms) is not int or ms < 0:
            raise InvalidArgumentError(f"ms={ms!r} must be a non-negative int")
        return -(-ms * self.hz // 1000)
