"""Fault injection: make a chosen step fail with a chosen errno, to drive error paths.

Two halves.  Driver ops are hooks, so an observer wraps them: `FaultInjector`
fails `init` or `open_device` (of any driver, or of one) after they ran, as if
they had failed, undoing an open with close_device.  Steps of the kernel's own
- an allocation, `register`, `mdev_create` - are fault points the core
consults: `kernel.inject(step, errno)` (allocations: `kernel.fail_next_allocs`).
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from vfio_emu.errors import InvalidArgumentError
from vfio_emu.plugins.hookspecs import hookimpl

STEPS = ("init", "open_device")


class FaultInjector:
    """Fails the next `times` calls of one op with -errno (register it as an observer)."""

    def __init__(self, step: str, errno: int, times: int = 1, driver: str | None = None) -> None:
        if step not in STEPS:
            raise InvalidArgumentError(f"step={step!r}: choose one of {STEPS}")
        if type(errno) is not int or errno <= 0:
            raise InvalidArgumentError(f"errno={errno!r} must be a positive errno")
        self.step, self.errno, self.times, self.driver = step, errno, times, driver
        self.injected = 0

    def _due(self, op: str, driver_name: str | None) -> bool:
        if op != self.step or self.times <= 0:
            return False
        if self.driver is not None and driver_name != self.driver:
            return False
        self.times -= 1
        self.injected += 1
        return True

    @hookimpl(wrapper=True)
    def init(self, vdev: Any) -> Generator[None, Any, Any]:
        result = yield
        return -self.errno if self._due("init", getattr(vdev.ops, "name", None)) else result

    @hookimpl(wrapper=True)
    def open_device(self, vdev: Any) -> Generator[None, Any, Any]:
        result = yield
        if result == 0 and self._due("open_device", getattr(vdev.ops, "name", None)):
            close = getattr(vdev.ops, "close_device", None)  # undo what open did
            if close is not None:
                close(vdev)
            return -self.errno
        return result
