"""The test drivers, written once for every test: tests/linux/ (the emulated kernel),
tests/plugins/ (the plugin manager) and tests/check/ (the battery) all build on them.

The generic probe/remove pair (alloc, register, put on a failure; unregister, put)
is vfio_emu.check.scenarios' probe and remove, which `vfio-emu run` and the
benchmarks use too; everything here calls them rather than writing the pair again:

- Driver: a well-behaved ops table that records every callback in .calls, with hooks
  that let a test act from inside an op (userspace closing its FD when asked by
  ->request, a driver checking its set in ->close_device);
- Priv, Buf: a driver's private struct (embedding the vfio_device) and a buffer it
  kzalloc()s for itself;
- free_if_v61: how a correct ->release ends under each ABI;
- probe/remove: the generic pair on a bus device (NAME unless told), probe asserting
  it succeeds;
- MdevVfioDriver: the pair as an mdev driver (mdpy/ap-like) runs it on its mdev;
- GenericBusDriver: the pair in plugin form, as the probe/remove hookimpls that
  vfio_emu.plugins.manager dispatches to; a test's subclass adds the ops it needs;
- CcwPrivate, CcwOps: vfio-ccw's v6.1 embedded vdev and its release_comp.

A deliberately buggy driver stays in the test that uses it, as a subclass of one of these
that overrides only its buggy step.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

from vfio_emu.check import scenarios
from vfio_emu.check.scenarios import remove
from vfio_emu.linux.kernel import Kernel
from vfio_emu.linux.slab import Tracked, mem_of
from vfio_emu.linux.vfio import (
    VfioDevice,
    memset_vfio_device,
    vfio_free_device,
    vfio_register_emulated_iommu_dev,
)
from vfio_emu.plugins.hookspecs import hookimpl

__all__ = [
    "NAME",
    "PATIENT",
    "Buf",
    "CcwOps",
    "CcwPrivate",
    "Driver",
    "GenericBusDriver",
    "MdevVfioDriver",
    "MttyLikeDriver",
    "NoReleaseDriver",
    "Priv",
    "free_if_v61",
    "is_freed",
    "probe",
    "remove",
]

Hook = Callable[..., Any]

#: The bus device probe() binds when a test names none (a PCI function).
NAME = "0000:00:01.0"
#: A watchdog no correct test can reach (3.6 s real at the default 1000x clock).
PATIENT = 3600


class Priv(VfioDevice):
    """struct my_device { struct vfio_device vdev; ... }: a driver's private struct."""


class Buf(Tracked):
    """A buffer a driver kzalloc()s for itself (e.g. mtty's vconfig, pci's region array)."""


def free_if_v61(kernel: Kernel, vdev: VfioDevice) -> None:
    """The end of a correct ->release: vfio_free_device() under v6.1, where the driver
    frees its struct; nothing under v6.2, where the core does."""
    if kernel.semantics == "v6.1":
        vfio_free_device(vdev)


class Driver:
    """A well-behaved vfio driver's ops: every callback is recorded in .calls.

    release frees the struct with vfio_free_device() under v6.1 and leaves it
    to the core under v6.2, as the two ABIs require.
    """

    def __init__(self, kernel: Kernel, *, init_ret: int = 0, open_rets: tuple[int, ...] = (),
                 on_init: Hook | None = None, on_release: Hook | None = None,
                 on_close: Hook | None = None, on_request: Hook | None = None) -> None:
        self.kernel = kernel
        self.init_ret = init_ret
        self._open_rets: Iterator[int] = iter(open_rets)
        self.on_init = on_init
        self.on_release = on_release
        self.on_close = on_close
        self.on_request = on_request
        self.calls: list[str] = []
        self.requests: list[int] = []
        self.release_threads: list[str] = []

    def init(self, vdev: VfioDevice) -> int:
        self.calls.append("init")
        if self.on_init is not None:
            return int(self.on_init(vdev))
        return self.init_ret

    def release(self, vdev: VfioDevice) -> None:
        self.calls.append("release")
        self.release_threads.append(threading.current_thread().name)
        if self.on_release is not None:
            self.on_release(vdev)
        free_if_v61(self.kernel, vdev)

    def open_device(self, vdev: VfioDevice) -> int:
        self.calls.append("open_device")
        return next(self._open_rets, 0)

    def close_device(self, vdev: VfioDevice) -> None:
        self.calls.append("close_device")
        if self.on_close is not None:
            self.on_close(vdev)

    def request(self, vdev: VfioDevice, count: int) -> None:
        self.requests.append(count)
        if self.on_request is not None:
            self.on_request(vdev, count)


class MttyLikeDriver(Driver):
    """No ->request (like the mtty sample): userspace is never asked to let go."""

    request = None  # type: ignore[assignment]


class NoReleaseDriver(Driver):
    """No ->release: a bug in v6.1 (mandatory there), fine in v6.2."""

    release = None  # type: ignore[assignment]


def probe(kernel: Kernel, name: str = NAME, driver: Driver | None = None,
          cls: type[Priv] = Priv) -> tuple[Priv, Driver]:
    """The generic probe (scenarios.probe) of a bus device with a recording Driver's ops.
    Asserts success."""
    driver = driver if driver is not None else Driver(kernel)
    vdev = scenarios.probe(kernel, driver, name, cls)
    assert isinstance(vdev, cls), f"probe returned {vdev!r}"
    return vdev, driver


def is_freed(obj: object) -> bool:
    """Whether a kzalloc'd struct was freed (without touching it, which would be a UAF)."""
    mem = mem_of(obj)
    assert mem is not None, f"{obj!r} was not kzalloc'd"
    return mem.freed


class MdevVfioDriver:
    """An mdev driver (mdpy/ap-like): probe allocs + registers a vfio device on the mdev."""

    max_instances = 1

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self.ops = Driver(kernel)

    def probe(self, mdev: Any) -> int:
        vdev = scenarios.probe(self.kernel, self.ops, mdev, Priv,
                               register=vfio_register_emulated_iommu_dev)
        if isinstance(vdev, int):
            return vdev
        mdev.drvdata = vdev
        return 0

    def remove(self, mdev: Any) -> None:
        remove(mdev.drvdata)


class GenericBusDriver:
    """The generic probe/remove as a driver plugin's hookimpls, on a bus device.

    It implements no op: a test's subclass adds the hookimpls it needs (an init that
    allocates, a release that records...), and the plugin's ops are what probe gets.
    """

    @hookimpl
    def probe(self, kernel: Kernel, driver: Any, dev: Any) -> int:
        vdev = scenarios.probe(kernel, driver.ops, dev, VfioDevice)
        if isinstance(vdev, int):
            return vdev
        dev.drvdata = vdev
        return 0

    @hookimpl
    def remove(self, kernel: Kernel, driver: Any, dev: Any) -> None:
        remove(dev.drvdata)


class CcwPrivate(VfioDevice):
    """struct vfio_ccw_private (v6.1): embeds the vfio_device and outlives it
    (vfio_ccw_sch_probe/remove).

    It is kzalloc()ed by the css probe and freed by the css remove; the
    vfio_device release only signals release_comp.
    """

    def _kzalloc(self, kernel: Kernel) -> None:
        super()._kzalloc(kernel)
        self.release_comp = kernel.arena.completion(label=f"ccw@{id(self):#x}.release_comp")

    def _kfree(self) -> None:
        self.release_comp.free()
        super()._kfree()


class CcwOps:
    """vfio-ccw's v6.1 ops: init re-arms release_comp, release completes it and frees nothing.

    reinit=False is bug class 18 (docs/lifecycle.md): a stale count survives into the next probe;
    complete_all=True makes release open the completion for good (bug class 19).
    """

    def __init__(self, *, reinit: bool = True, complete_all: bool = False) -> None:
        self.reinit = reinit
        self.complete_all = complete_all
        self.calls: list[str] = []

    def init(self, vdev: Any) -> int:
        self.calls.append("init")
        if self.reinit:
            vdev.release_comp.init()
        return 0

    def release(self, vdev: Any) -> None:
        self.calls.append("release")
        memset_vfio_device(vdev)  # so the next vfio_init_device() starts clean
        if self.complete_all:
            vdev.release_comp.complete_all()
        else:
            vdev.release_comp.complete()
