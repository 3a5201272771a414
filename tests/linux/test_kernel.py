"""The Kernel itself: the configurations it accepts, the trace of every transition
with its counters, and what its delayed-release worker reports.
"""

from __future__ import annotations

from typing import Any

import pytest
from _asserts import BOTH, assert_clean, in_order, ops_of
from _drivers import NAME, Driver, probe, remove

from vfio_emu.errors import InvalidArgumentError
from vfio_emu.linux.kernel import Kernel
from vfio_emu.linux.vfio import DeviceFile, vfio_free_device, vfio_group_get_device_fd

# -- configuration -------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [{"semantics": "v5"}, {"unregister_order": "v6.6"},
                                    {"watchdog_s": 0}, {"watchdog_s": 1.5}],
                         ids=["semantics", "order", "watchdog0", "watchdog-float"])
def test_kernel_rejects_unknown_configuration(kwargs):
    with pytest.raises(InvalidArgumentError):
        Kernel(**kwargs)


# -- the trace -----------------------------------------------------------------------------

@BOTH
def test_trace_records_every_transition_in_order_with_its_counters(make_kernel, semantics):
    k = make_kernel(semantics=semantics)
    vdev, _ = probe(k)
    fd = vfio_group_get_device_fd(k, NAME)
    assert isinstance(fd, DeviceFile)
    fd.close()
    remove(vdev)
    expected = ["vfio_init_device", "vfio_assign_device_set", "vfio_register_group_dev",
                "try_get_registration", "fd open", "fd close", "put_registration",
                "put_registration", "unlink: group list, device_del",
                "vfio_unregister_group_dev", "vfio_put_device", "vfio_device_release", "kfree"]
    assert in_order(ops_of(k), expected), k.trace.timeline()
    by_op: dict[str, list[Any]] = {}
    for e in k.trace.events:
        by_op.setdefault(e.op, []).append(e)
    assert by_op["vfio_init_device"][0].kref == (0, 1)
    assert by_op["vfio_register_group_dev"][0].refcount == (0, 1)
    assert by_op["try_get_registration"][0].refcount == (1, 2)
    assert [e.refcount for e in by_op["put_registration"]] == [(2, 1), (1, 0)]
    assert by_op["vfio_put_device"][0].kref == (1, 0)
    assert [e.open_count for e in by_op["fd open"]] == [1]
    assert_clean(k)


# -- the delayed-release worker ------------------------------------------------------------

def test_a_delayed_release_that_raises_an_unreported_error_is_reported(make_kernel):
    k = make_kernel(semantics="v6.2", delayed_release=True, seed=0)

    class V61Release(Driver):
        def release(self, vdev):
            vfio_free_device(vdev)  # a v6.1 driver built against v6.2

    vdev, _ = probe(k, driver=V61Release(k))
    remove(vdev)
    k.flush()
    assert any("vfio_free_device" in r.title or "v6.2" in r.title for r in k.reports)
