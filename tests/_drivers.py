"""Small emulated drivers for the device life-cycle tests (tests/test_device.py).

Each driver is a private struct (a VfioDevice subclass) plus an ops object.
Driver records every op call so tests can assert what the core called and
in which order; hooks let a test act from inside an op (userspace closing
its FD when asked by ->request, a driver checking the set in ->close_device).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

from vfio_emu.linux.kernel import Kernel
from vfio_emu.linux.slab import Tracked, mem_of
from vfio_emu.linux.vfio import (
    VfioDevice,
    memset_vfio_device,
    vfio_alloc_device,
    vfio_free_device,
    vfio_put_device,
    vfio_register_emulated_iommu_dev,
    vfio_register_group_dev,
    vfio_unregister_group_dev,
)

Hook = Callable[..., Any]


class Priv(VfioDevice):
    """struct my_device { struct vfio_device vdev; ... }: a driver's private struct."""


class Buf(Tracked):
    """A buffer a driver kzalloc()s for itself (e.g. mtty's vconfig, pci's region array)."""


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
        if self.kernel.semantics == "v6.1":
            vfio_free_device(vdev)

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


def probe(kernel: Kernel, name: str = "0000:00:01.0", driver: Driver | None = None,
          cls: type[Priv] = Priv) -> tuple[Priv, Driver]:
    """The generic probe (mtty_probe, vfio_pci_probe): alloc, register (error: put).
    Asserts success."""
    driver = driver if driver is not None else Driver(kernel)
    vdev = vfio_alloc_device(cls, kernel.device(name), driver)
    assert isinstance(vdev, cls), f"vfio_alloc_device returned {vdev!r}"
    ret = vfio_register_group_dev(vdev)
    assert ret == 0, f"vfio_register_group_dev returned {ret}"
    return vdev, driver


def remove(vdev: VfioDevice) -> None:
    """The generic remove (mtty_remove, vfio_pci_remove): unregister (waits for FDs),
    then the driver's put."""
    vfio_unregister_group_dev(vdev)
    vfio_put_device(vdev)


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
        vdev = vfio_alloc_device(Priv, mdev, self.ops)
        if isinstance(vdev, int):
            return vdev
        ret = vfio_register_emulated_iommu_dev(vdev)
        if ret:
            vfio_put_device(vdev)
            return ret
        mdev.drvdata = vdev
        return 0

    def remove(self, mdev: Any) -> None:
        vdev = mdev.drvdata
        vfio_unregister_group_dev(vdev)
        vfio_put_device(vdev)


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
