"""One full device life cycle, against the cffi no-op of the same run.

probe (alloc, init, register) -> open an FD -> close it -> remove (unregister,
put) -> release -> free: every transition of the model, with its trace
events and checks, as a driver and userspace drive it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from vfio_emu.check.scenarios import PCI_NAME, PciOps, probe, remove
from vfio_emu.linux.kernel import Kernel
from vfio_emu.linux.vfio import vfio_group_get_device_fd

if TYPE_CHECKING:
    from conftest import Measure

CYCLES = 20


@pytest.fixture
def kernel() -> Iterator[Kernel]:
    k = Kernel(semantics="v6.1")
    try:
        yield k
    finally:
        k.close()


@pytest.mark.benchmark(group="lifecycle")
def test_probe_open_close_remove_release_cycle(measure: Measure, kernel: Kernel) -> None:
    ops = PciOps(kernel)

    def run() -> None:
        for _ in range(CYCLES):
            vdev = probe(kernel, ops)
            fd = vfio_group_get_device_fd(kernel, PCI_NAME)
            fd.close()  # type: ignore[union-attr]
            remove(vdev)  # type: ignore[arg-type]
        kernel.trace.events.clear()  # keep memory flat over many rounds

    measure(run, key="lifecycle_cycle", label="probe->open->close->remove->release",
            per=CYCLES, unit="cycle")
    assert kernel.reports == []
    assert kernel.leak_check() == []
    assert kernel.arena.in_use == 0
