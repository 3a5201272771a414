"""The v6.1 vfio-ccw flow (vfio_ccw_sch_probe/remove, vfio_ccw_mdev_probe/remove): a
private struct that embeds its vfio_device and outlives it, and the release_comp
that its remove waits on - bug classes 17 to 21, with tests/_drivers.py's CcwOps.
The ccw plugin itself is pinned in tests/plugins/test_ccw.py.

Every correct sequence must end with no report, no leak and no WARN; every
buggy sequence must produce the report that names its bug.  Test names read as
the behaviour they pin; "cNN" names the bug class (docs/lifecycle.md lists them).
"""

from __future__ import annotations

from typing import Any

import pytest
from _asserts import assert_clean, only_report
from _drivers import PATIENT, CcwOps, CcwPrivate

from vfio_emu.errors import HangError, UseAfterFreeError
from vfio_emu.linux.kernel import Kernel
from vfio_emu.linux.slab import kfree, kzalloc
from vfio_emu.linux.vfio import (
    DeviceFile,
    core_of,
    get_device,
    put_device,
    vfio_group_get_device_fd,
    vfio_init_device,
    vfio_put_device,
    vfio_register_emulated_iommu_dev,
    vfio_unregister_group_dev,
)

# -- 17-21. the v6.1 vfio-ccw pattern: embedded vdev, release_comp -------------------------

def ccw_probe(k: Kernel, sch: Any, ops: CcwOps, private: CcwPrivate | None = None,
              register: bool = True) -> CcwPrivate:
    """css probe allocated private; mdev probe inits (and registers) the embedded vdev."""
    private = private if private is not None else kzalloc(k, CcwPrivate)
    assert vfio_init_device(private, sch, ops) == 0
    if register:
        assert vfio_register_emulated_iommu_dev(private) == 0
    return private


def ccw_remove(k: Kernel, private: CcwPrivate) -> None:
    """mdev remove (v6.1): unregister, put, then wait for release_comp."""
    vfio_unregister_group_dev(private)
    vfio_put_device(private)
    k.wait_for_completion(private.release_comp, "release_comp")


def test_c17_ccw_remove_waits_forever_on_release_comp_when_a_get_device_leaked(make_kernel):
    k = make_kernel(watchdog_s=20)
    private = ccw_probe(k, k.device("0.0.0001"), CcwOps())
    get_device(private)  # BUG: never put
    with pytest.raises(HangError) as exc:
        ccw_remove(k, private)
    rep = exc.value.report
    assert rep.kind == "hang" and "release_comp" in rep.detail
    assert "blocked for more than 20 seconds" in rep.title


def test_c17_ccw_remove_returns_once_the_last_holder_puts(make_kernel):
    k = make_kernel(watchdog_s=PATIENT)
    ops = CcwOps()
    private = ccw_probe(k, k.device("0.0.0001"), ops)
    get_device(private)
    vfio_unregister_group_dev(private)
    vfio_put_device(private)
    # The holder lets go 5 s (emulated) into remove's wait.
    k.schedule_delayed(5 * k.HZ, lambda: put_device(private), "the holder puts")
    k.wait_for_completion(private.release_comp, "release_comp")
    assert ops.calls == ["init", "release"]
    kfree(private)  # css remove
    assert_clean(k)


@pytest.mark.parametrize("complete_all", [False, True], ids=["c18-complete", "c19-complete_all"])
def test_c18_c19_stale_release_comp_lets_remove_free_a_referenced_private(make_kernel,
                                                                          complete_all):
    k = make_kernel()
    sch = k.device("0.0.0001")
    ops = CcwOps(reinit=False, complete_all=complete_all)  # BUG: init does not re-arm
    # First mdev: the probe fails after init and puts without waiting (vfio_ccw_mdev_probe's error):
    # release completes release_comp and nobody consumes it.
    private = ccw_probe(k, sch, ops, register=False)
    vfio_put_device(private)
    if complete_all:  # a consumed wait does not close a complete_all()ed completion
        k.wait_for_completion(private.release_comp, "release_comp")
    # Second mdev on the same subchannel, while someone holds a reference.
    ccw_probe(k, sch, ops, private)
    get_device(private)
    ccw_remove(k, private)  # returns at once: the stale count, not the release
    assert ops.calls.count("release") == 1
    kfree(private)  # css remove frees the struct the holder still points into
    with pytest.raises(UseAfterFreeError):
        put_device(private)
    assert "use-after-free" in only_report(k, "use-after-free").title


@pytest.mark.parametrize("complete_all", [False, True], ids=["c18-complete", "c19-complete_all"])
def test_c18_c19_init_that_rearms_release_comp_makes_remove_wait_for_the_holder(
        make_kernel, complete_all):
    k = make_kernel(watchdog_s=20)
    sch = k.device("0.0.0001")
    ops = CcwOps(reinit=True, complete_all=complete_all)
    private = ccw_probe(k, sch, ops, register=False)
    vfio_put_device(private)
    ccw_probe(k, sch, ops, private)
    get_device(private)
    with pytest.raises(HangError):  # waits for the holder, as it must
        ccw_remove(k, private)
    put_device(private)
    k.wait_for_completion(private.release_comp, "release_comp")
    kfree(private)
    assert [r.kind for r in k.reports] == ["hang"]
    assert k.leak_check() == []


def test_c20_css_remove_freeing_private_without_the_release_comp_wait_is_a_uaf(make_kernel):
    k = make_kernel()
    private = ccw_probe(k, k.device("0.0.0001"), CcwOps())
    get_device(private)
    vfio_unregister_group_dev(private)
    vfio_put_device(private)
    kfree(private)  # BUG: no wait_for_completion(&private->release_comp)
    with pytest.raises(UseAfterFreeError):
        put_device(private)
    assert "use-after-free" in only_report(k, "use-after-free").title


def test_c21_delayed_release_landing_on_a_reprobed_ccw_vdev_is_reported(make_kernel):
    k = make_kernel(delayed_release=True, time_scale=10.0, seed=0)
    sch = k.device("0.0.0001")
    ops = CcwOps()
    private = ccw_probe(k, sch, ops, register=False)
    vfio_put_device(private)  # probe error path: put, no wait; release is >= 100 ms away
    ccw_probe(k, sch, ops, private)  # re-probe re-inits the embedded vdev at once
    k.flush()
    assert k.reports != []


def test_c17_release_comp_hang_report_can_name_the_leaked_get_device_caller(make_kernel):
    k = make_kernel(watchdog_s=20)
    private = ccw_probe(k, k.device("0.0.0001"), CcwOps())
    core = core_of(private, "test")

    def leaky_sysfs_reader():
        get_device(private)

    leaky_sysfs_reader()
    vfio_unregister_group_dev(private)
    vfio_put_device(private)
    assert core.kref.read() == 1  # the holder's reference is still there
    with pytest.raises(HangError) as exc:
        k.wait_for_completion(private.release_comp, "release_comp", holders=lambda: [
            f"get_device() by pid {pid}:\n{stack}" for pid, stack in core.holders])
    assert "leaky_sysfs_reader" in exc.value.report.detail


def test_c21_reprobe_of_a_released_embedded_vdev_never_uses_its_freed_set(make_kernel):
    k = make_kernel()
    sch = k.device("0.0.0001")
    ops = CcwOps()
    private = ccw_probe(k, sch, ops)
    ccw_remove(k, private)  # release ran: the singleton set was freed
    ccw_probe(k, sch, ops, private)
    fd = vfio_group_get_device_fd(k, "0.0.0001")  # takes dev_set->lock: not a freed set
    assert isinstance(fd, DeviceFile)
    fd.close()
    assert private.dev_set in k.dev_sets.values(), "registered into a freed device set"
    ccw_remove(k, private)
    kfree(private)
    assert_clean(k)
