"""Named life-cycle scenarios for `vfio-emu run`: a small driver taken through the API.

Each scenario is a function of a Kernel.  The well-behaved ones must end
with no report under every semantics; the buggy ones (marked) show what the
emulator reports.  Userspace is played by threads that open and close FDs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from vfio_emu.linux.device import Device
from vfio_emu.linux.kernel import Kernel
from vfio_emu.linux.slab import Tracked, kfree, kzalloc
from vfio_emu.linux.vfio import (
    DeviceFile,
    VfioDevice,
    vfio_alloc_device,
    vfio_free_device,
    vfio_group_get_device_fd,
    vfio_put_device,
    vfio_register_group_dev,
    vfio_unregister_group_dev,
)

PCI_NAME = "0000:00:04.0"


class PciDevice(VfioDevice):
    """The driver's struct: vfio_device first, then its own fields."""


class Userspace:
    """A VMM: answers the request op by closing its FDs after `patience` requests; with
    reopen_at, it first opens the device once more on that request."""

    def __init__(self, patience: int = 0, reopen_at: int | None = None,
                 kernel: Kernel | None = None) -> None:
        self.patience = patience
        self.reopen_at = reopen_at
        self.kernel = kernel
        self.fds: list[DeviceFile] = []
        self.requests: list[int] = []

    def open(self, kernel: Kernel, name: str = PCI_NAME) -> DeviceFile | int:
        fd = vfio_group_get_device_fd(kernel, name)
        if isinstance(fd, DeviceFile):
            self.fds.append(fd)
        return fd

    def on_request(self, count: int) -> None:
        self.requests.append(count)
        if count == self.reopen_at and self.kernel is not None:
            self.open(self.kernel)  # a new FD while unregister waits
        if count >= self.patience:
            while self.fds:
                self.fds.pop().close()


class PciOps:
    """A vfio-pci-like op table; release frees the struct as v6.1 requires."""

    def __init__(self, kernel: Kernel, user: Userspace | None = None) -> None:
        self.kernel = kernel
        self.user = user

    def init(self, vdev: VfioDevice) -> int:
        return 0

    def release(self, vdev: VfioDevice) -> None:
        if self.kernel.semantics == "v6.1":
            vfio_free_device(vdev)

    def open_device(self, vdev: VfioDevice) -> int:
        return 0

    def close_device(self, vdev: VfioDevice) -> None:
        pass

    def request(self, vdev: VfioDevice, count: int) -> None:
        if self.user is not None:
            self.user.on_request(count)


def probe(kernel: Kernel, ops: object, dev: Device | str = PCI_NAME,
          cls: type[VfioDevice] = PciDevice,
          register: Callable[[VfioDevice], int] = vfio_register_group_dev) -> VfioDevice | int:
    """The generic probe (mtty_probe, vfio_pci_probe): alloc, register, put on a failure.

    The driver's struct `cls` is allocated on the parent `dev` (a bus device, its name in
    `kernel`, an mdev) with these ops; mdev drivers register with
    vfio_register_emulated_iommu_dev.  Returns the struct, or the -errno of the failed step.
    """
    parent = kernel.device(dev) if isinstance(dev, str) else dev
    vdev = vfio_alloc_device(cls, parent, ops)
    if isinstance(vdev, int):
        return vdev
    ret = register(vdev)
    if ret:
        vfio_put_device(vdev)
        return ret
    return vdev


def remove(vdev: VfioDevice) -> None:
    """The generic remove (mtty_remove, vfio_pci_remove): unregister (waits for FDs),
    then drop the driver's reference."""
    vfio_unregister_group_dev(vdev)
    vfio_put_device(vdev)


# -- scenarios -------------------------------------------------------------------------

def probe_remove(kernel: Kernel) -> None:
    """Probe, open and close an FD, remove: the plain life cycle."""
    vdev = probe(kernel, PciOps(kernel))
    assert not isinstance(vdev, int)
    user = Userspace()
    user.open(kernel)
    user.fds.pop().close()
    remove(vdev)


def remove_with_open_fd(kernel: Kernel) -> None:
    """Remove while userspace holds an FD: request is called every 10 s until it lets go."""
    user = Userspace(patience=2)
    vdev = probe(kernel, PciOps(kernel, user))
    assert not isinstance(vdev, int)
    user.open(kernel)
    remove(vdev)


def open_during_unregister(kernel: Kernel) -> None:
    """While unregister waits, userspace opens the device again (bug class 13 in v6.1
    order: the new FD extends the wait; with unlink-first the open fails)."""
    user = Userspace(patience=1, reopen_at=0, kernel=kernel)
    vdev = probe(kernel, PciOps(kernel, user))
    assert not isinstance(vdev, int)
    user.open(kernel)
    remove(vdev)


def delayed_release(kernel: Kernel) -> None:
    """A driver whose struct outlives the vfio_device waits for release (as vfio-ccw's
    release_comp does), so it is right even when release runs seconds later."""
    comp = kernel.arena.completion(label="release_comp")

    class Ops(PciOps):
        def release(self, vdev: VfioDevice) -> None:
            comp.complete()

    ops = Ops(kernel)
    vdev = probe(kernel, ops)
    assert not isinstance(vdev, int)
    remove(vdev)
    kernel.wait_for_completion(comp, "release_comp")
    if kernel.semantics == "v6.1":
        kfree(vdev)  # v6.1 lets this driver keep its struct; now nobody can reach it
    comp.free()


class Shared(Tracked):
    """Driver state the release still uses (e.g. a port pool)."""

    def _kzalloc(self, kernel: Kernel) -> None:
        self.ports_free = 0


def assume_sync_release(kernel: Kernel) -> None:
    """Frees state right after the final put, assuming release already ran (class 10):
    with --delayed-release the release then writes freed memory."""
    allocated = kzalloc(kernel, Shared)
    assert allocated is not None
    shared = allocated

    class Ops(PciOps):
        def release(self, vdev: VfioDevice) -> None:
            shared.ports_free += 1  # give the port back
            super().release(vdev)

    vdev = probe(kernel, Ops(kernel))
    assert not isinstance(vdev, int)
    remove(vdev)
    kfree(shared)  # "release has run by now"
    kernel.flush()


def uaf_after_put(kernel: Kernel) -> None:
    """Remove touches its struct after the final put (class 1)."""
    vdev = probe(kernel, PciOps(kernel))
    assert not isinstance(vdev, int)
    vdev.list_node = "on the driver's list"
    remove(vdev)
    kernel.flush()
    del vdev.list_node  # list_del(&vdev->node) after release freed it


def fd_held_forever(kernel: Kernel) -> None:
    """Userspace keeps its FD and ignores every request (class 11): the watchdog
    reports the hang and who holds the device."""
    user = Userspace(patience=10**9)
    vdev = probe(kernel, PciOps(kernel, user))
    assert not isinstance(vdev, int)
    user.open(kernel)
    remove(vdev)


def missing_release(kernel: Kernel) -> None:
    """No ops->release (class 6): in v6.1 the last put dereferences NULL."""

    class Ops(PciOps):
        release = None  # type: ignore[assignment]

    vdev = probe(kernel, Ops(kernel))
    assert not isinstance(vdev, int)
    remove(vdev)
    kernel.flush()


@dataclass(frozen=True)
class Scenario:
    name: str
    run: Callable[[Kernel], None]
    buggy: bool

    @property
    def doc(self) -> str:
        """The docstring's first sentence, on one line."""
        text = " ".join((self.run.__doc__ or "").split())
        return text.split(". ")[0].rstrip(".") + "."


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("probe-remove", probe_remove, False),
    Scenario("remove-with-open-fd", remove_with_open_fd, False),
    Scenario("open-during-unregister", open_during_unregister, False),
    Scenario("delayed-release", delayed_release, False),
    Scenario("assume-sync-release", assume_sync_release, True),
    Scenario("uaf-after-put", uaf_after_put, True),
    Scenario("fd-held-forever", fd_held_forever, True),
    Scenario("missing-release", missing_release, True),
)}
