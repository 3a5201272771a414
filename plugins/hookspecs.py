"""The hooks a driver plugin implements: struct vfio_device_ops and the driver's entry points.

Hook names are the kernel's.  A plugin with a plain (non-wrapper) `probe` is a
driver; any other plugin is an observer, whose hookimpls (usually
`wrapper=True`) see every driver's calls.  Each driver's ops reach only that driver's hookimpls,
plus the observers' (see vfio_emu.plugins.manager).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from vfio_emu.linux.device import Device
    from vfio_emu.linux.kernel import Kernel
    from vfio_emu.linux.vfio import VfioDevice

PROJECT = "vfio_emu"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# -- struct vfio_device_ops ------------------------------------------------------

@hookspec(firstresult=True)
def init(vdev: VfioDevice) -> int:  # type: ignore[empty-body]
    """ops->init: once, inside vfio_init_device, before the kobject exists.  0 or -errno;
    on failure release is NOT called, so init undoes its own partial work."""


@hookspec
def release(vdev: VfioDevice) -> None:
    """ops->release: once, when the object count reaches 0 (v6.1: mandatory, and it must
    end with vfio_free_device(); v6.2: optional, the core frees)."""


@hookspec(firstresult=True)
def open_device(vdev: VfioDevice) -> int:  # type: ignore[empty-body]
    """ops->open_device: open_count 0 -> 1, under the device set lock.  0 or -errno."""


@hookspec
def close_device(vdev: VfioDevice) -> None:
    """ops->close_device: the last close, open_count still 1, under the device set lock."""


@hookspec
def request(vdev: VfioDevice, count: int) -> None:
    """ops->request: unregister asks userspace to let go, count = 0, 1, 2... every 10 s."""


@hookspec(firstresult=True)
def match(vdev: VfioDevice, buf: str) -> int:  # type: ignore[empty-body]
    """ops->match: VFIO_GROUP_GET_DEVICE_FD's name lookup: <0 abort, 0 no, >0 yes."""


# -- the driver's own entry points ------------------------------------------------------

@hookspec(firstresult=True)
def driver_init(kernel: Kernel, driver: Any) -> int:  # type: ignore[empty-body]
    """module_init(): e.g. mtty registers its mdev parent; 0 or -errno, and on failure it
    has undone its own work (the checker fails each of its allocations and kernel steps).
    driver is the plugin's vfio_emu.plugins.manager.Driver: its ops and an mdev driver
    adapter."""


@hookspec
def driver_exit(kernel: Kernel, driver: Any) -> None:
    """module_exit()."""


@hookspec(firstresult=True)
def probe(kernel: Kernel, driver: Any, dev: Device) -> int:  # type: ignore[empty-body]
    """The driver's probe for a device (a PCI function, an mdev): 0 or -errno."""


@hookspec
def remove(kernel: Kernel, driver: Any, dev: Device) -> None:
    """The driver's remove: unregister (which may block), then put."""


# -- how the checker makes a device of this driver appear and go --------------------

@hookspec(firstresult=True)
def check_bind(kernel: Kernel, driver: Any, name: str) -> Any:
    """Make one device of this driver appear under `name` and bind it (e.g. a PCI function
    that the driver probes, or an mdev created through sysfs): the bound device, or
    -errno.  Userspace then opens it by that name."""


@hookspec(firstresult=True)
def check_unbind(kernel: Kernel, driver: Any, dev: Any) -> int:  # type: ignore[empty-body]
    """Unbind and remove that device again (this blocks while FDs are open): 0 or -errno."""


@hookspec(firstresult=True)
def check_known_findings() -> list[Any]:  # type: ignore[empty-body]
    """Findings of this driver the author knows about (vfio_emu.plugins.manager.KnownFinding:
    a scenario, a text of the report, a reason): `vfio-emu check` shows them as "known"
    and fails when one no longer happens."""


@hookspec
def check_invariants(kernel: Kernel, driver: Any) -> list[str]:  # type: ignore[empty-body]
    """What must hold between any two steps of a scenario, as the driver (or a library it
    builds on) promises it: one message per broken promise, [] when all hold.  `vfio-emu
    check` asks after every step and fails the scenario on a broken one."""
