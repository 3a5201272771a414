"""An observer that puts every driver op call on the kernel's timeline, with its result.

It knows no driver: its hookimpls are pluggy wrappers around every driver's
ops.  Load it with Plugins(observers=["tracer"]).
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from vfio_emu.plugins.hookspecs import hookimpl


def _record(vdev: Any, op: str) -> Generator[None, Any, Any]:
    # Read what the event needs now: after the op (release) the device may be freed.
    kernel, name = vdev.dev.kernel, f"vfio{vdev.index}"
    result = yield
    kernel.trace.record(kernel.jiffies(), name, f"ops->{op}",
                        detail="" if result is None or isinstance(result, list)
                        else f"ret {result}")
    return result


@hookimpl(wrapper=True)
def init(vdev: Any) -> Generator[None, Any, Any]:
    return (yield from _record(vdev, "init"))


@hookimpl(wrapper=True)
def release(vdev: Any) -> Generator[None, Any, Any]:
    return (yield from _record(vdev, "release"))


@hookimpl(wrapper=True)
def open_device(vdev: Any) -> Generator[None, Any, Any]:
    return (yield from _record(vdev, "open_device"))


@hookimpl(wrapper=True)
def close_device(vdev: Any) -> Generator[None, Any, Any]:
    return (yield from _record(vdev, "close_device"))


@hookimpl(wrapper=True)
def probe(kernel: Any, driver: Any, dev: Any) -> Generator[None, Any, Any]:
    result = yield
    kernel.trace.record(kernel.jiffies(), dev.name, f"{driver.name} probe", detail=f"ret {result}")
    return result


@hookimpl(wrapper=True)
def remove(kernel: Any, driver: Any, dev: Any) -> Generator[None, Any, Any]:
    name = dev.name
    result = yield
    kernel.trace.record(kernel.jiffies(), name, f"{driver.name} remove")
    return result
