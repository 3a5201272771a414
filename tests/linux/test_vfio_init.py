"""vfio_alloc_device() and vfio_init_device() (drivers/vfio/vfio_main.c): ops->init and
its failures, the probe error path that must put, and the arguments they refuse.

Every correct sequence must end with no report, no leak and no WARN, under
both semantics; every buggy sequence must produce the report that names its
bug.  Test names read as the behaviour they pin; "cNN" names the bug class
(docs/lifecycle.md lists them).
"""

from __future__ import annotations

from typing import Any

import pytest
from _asserts import BOTH, assert_clean, dmesg_kinds, only_report, stack_text
from _drivers import NAME, Buf, Driver, Priv, is_freed, probe, remove

from vfio_emu.errors import EmulatorError, InvalidArgumentError
from vfio_emu.linux.errno import EBUSY, EINVAL, ENOMEM
from vfio_emu.linux.kernel import Kernel
from vfio_emu.linux.slab import kfree, kzalloc
from vfio_emu.linux.vfio import (
    core_of,
    vfio_alloc_device,
    vfio_assign_device_set,
    vfio_init_device,
    vfio_put_device,
)

# -- ops->init and its failures ------------------------------------------------------------

@BOTH
def test_init_failure_fails_the_alloc_with_its_errno_and_never_calls_release(make_kernel,
                                                                             semantics):
    k = make_kernel(semantics=semantics)
    drv = Driver(k, init_ret=-ENOMEM)
    assert vfio_alloc_device(Priv, k.device(NAME), drv) == -ENOMEM
    assert drv.calls == ["init"]
    assert not k.ida and k.dev_sets == {}
    assert_clean(k)


@BOTH
def test_init_failure_after_assigning_a_set_releases_the_set_and_index(make_kernel, semantics):
    k = make_kernel(semantics=semantics)
    bus = object()

    def init(vdev):
        assert vfio_assign_device_set(vdev, bus) == 0
        return -ENOMEM

    assert vfio_alloc_device(Priv, k.device(NAME), Driver(k, on_init=init)) == -ENOMEM
    assert_clean(k)


@BOTH
def test_failslab_alloc_failure_returns_enomem_and_calls_no_op(make_kernel, semantics):
    k = make_kernel(semantics=semantics)
    drv = Driver(k)
    k.fail_next_allocs(1)
    assert vfio_alloc_device(Priv, k.device(NAME), drv) == -ENOMEM
    assert drv.calls == []
    vdev, _ = probe(k, driver=drv)  # only the next allocation failed
    remove(vdev)
    assert_clean(k)


# -- 4. missing put on a probe error path --------------------------------------------------

def buggy_probe_leaks_on_error(k: Kernel, drv: Driver, put_on_error: bool) -> int:
    vdev = vfio_alloc_device(Priv, k.device(NAME), drv)
    assert isinstance(vdev, Priv)
    assert vfio_assign_device_set(vdev, k) == 0  # like vfio-pci: the bus is the set_id
    # ... the PF has VFs enabled: -EBUSY
    if put_on_error:
        vfio_put_device(vdev)
    return -EBUSY


@BOTH
def test_c04_missing_put_on_probe_error_leaks_memory_index_and_set(make_kernel, semantics):
    k = make_kernel(semantics=semantics)
    assert buggy_probe_leaks_on_error(k, Driver(k), put_on_error=False) == -EBUSY
    leaks = k.leak_check()
    titles = [r.title for r in leaks]
    assert len(leaks) == 3, titles
    mem = next(r for r in leaks if "unreferenced object Priv" in r.title)
    assert "buggy_probe_leaks_on_error" in stack_text(mem, "allocated by")
    assert any("vfio device index 0" in t for t in titles)
    assert any("vfio_device_set" in t and "device_count 1" in t for t in titles)


@BOTH
def test_c04_put_on_probe_error_leaks_nothing(make_kernel, semantics):
    k = make_kernel(semantics=semantics)
    drv = Driver(k)
    assert buggy_probe_leaks_on_error(k, drv, put_on_error=True) == -EBUSY
    assert drv.calls == ["init", "release"]
    assert_clean(k)


# -- 8. put of a never-initialized object --------------------------------------------------

def test_c08_put_after_a_failed_init_warns_not_initialized_and_underflows(make_kernel):
    k = make_kernel(semantics="v6.1")  # the ccw path: vfio_init_device is static in v6.2
    drv = Driver(k, init_ret=-ENOMEM)
    vdev = kzalloc(k, Priv)  # the ccw path: the driver owns the memory
    assert vfio_init_device(vdev, k.device(NAME), drv) == -ENOMEM
    vfio_put_device(vdev)  # BUG: there is no kobject to put
    warn = only_report(k, "WARN")
    assert "is not initialized, yet kobject_put() is being called" in warn.title
    assert "SUB_UAF" in dmesg_kinds(k)
    assert "release" not in drv.calls and not is_freed(vdev)


def test_c08_kfree_after_a_failed_init_is_fine(make_kernel):
    k = make_kernel(semantics="v6.1")
    drv = Driver(k, init_ret=-ENOMEM)
    vdev = kzalloc(k, Priv)
    assert vfio_init_device(vdev, k.device(NAME), drv) == -ENOMEM
    kfree(vdev)
    assert_clean(k)


# -- 9. init partial-failure leak ----------------------------------------------------------

def init_allocates_then_fails(vdev: Any, free_on_error: bool) -> int:
    vdev.vconfig = kzalloc(core_of(vdev, "test").kernel, Buf)  # A
    # ... B fails
    if free_on_error:
        kfree(vdev.vconfig)
    return -ENOMEM


@BOTH
def test_c09_init_that_fails_without_undoing_its_allocation_leaks_it(make_kernel, semantics):
    k = make_kernel(semantics=semantics)
    drv = Driver(k, on_init=lambda v: init_allocates_then_fails(v, free_on_error=False))
    assert vfio_alloc_device(Priv, k.device(NAME), drv) == -ENOMEM
    assert "release" not in drv.calls  # nobody else will free it
    [leak] = k.leak_check()
    assert "unreferenced object Buf" in leak.title
    assert "init_allocates_then_fails" in stack_text(leak, "allocated by")


@BOTH
def test_c09_init_that_undoes_its_allocation_on_failure_leaks_nothing(make_kernel,
                                                                      semantics):
    k = make_kernel(semantics=semantics)
    drv = Driver(k, on_init=lambda v: init_allocates_then_fails(v, free_on_error=True))
    assert vfio_alloc_device(Priv, k.device(NAME), drv) == -ENOMEM
    assert_clean(k)


# -- bad input -----------------------------------------------------------------------------

class NotEmbedding:
    """A struct that does not start with a struct vfio_device."""


@pytest.mark.parametrize("cls", [NotEmbedding, Buf, "Priv"], ids=["plain", "tracked", "str"])
def test_alloc_of_a_struct_without_an_embedded_vfio_device_warns_and_returns_einval(
        make_kernel, cls):
    k = make_kernel()
    assert vfio_alloc_device(cls, k.device(NAME), Driver(k)) == -EINVAL
    assert "does not embed struct vfio_device" in only_report(k, "WARN").title
    assert k.allocations == {} and not k.ida


def test_alloc_with_a_parent_that_is_not_a_device_is_invalid(make_kernel):
    k = make_kernel()
    with pytest.raises(InvalidArgumentError):
        vfio_alloc_device(Priv, NAME, Driver(k))
    assert k.allocations == {}


def test_alloc_with_null_ops_is_invalid_and_leaks_nothing(make_kernel):
    k = make_kernel()
    with pytest.raises(InvalidArgumentError):
        vfio_alloc_device(Priv, k.device(NAME), None)
    assert k.leak_check() == []


def test_init_with_a_parent_from_another_kernel_is_invalid(make_kernel):
    k, other = make_kernel(), make_kernel()
    vdev = kzalloc(k, Priv)
    with pytest.raises(InvalidArgumentError):
        vfio_init_device(vdev, other.device(NAME), Driver(k))
    assert not k.ida and not other.ida
    kfree(vdev)
    assert_clean(k)
    assert_clean(other)


def test_vfio_init_device_is_not_for_drivers_in_v62(make_kernel):
    k = make_kernel(semantics="v6.2")
    vdev = kzalloc(k, Priv)
    with pytest.raises(EmulatorError, match=r"static in v6\.2"):
        vfio_init_device(vdev, k.device(NAME), Driver(k))
    kfree(vdev)
    assert_clean(k)


def _index_stack_and_mine(k: Kernel, alloc: Any) -> tuple[Any, Any]:
    """The stack the ida keeps for the index `alloc()` takes, and this caller's own."""
    from vfio_emu.stack import capture_stack

    def caller() -> tuple[Any, Any]:
        vdev = alloc()
        return vdev, capture_stack()  # the line below the alloc: the same frames but one

    vdev, mine = caller()
    taken = k.ida[core_of(vdev, "test").index]
    vfio_put_device(vdev)
    return taken, mine


@BOTH
def test_the_index_is_taken_by_the_allocating_caller_s_stack(make_kernel, semantics):
    """vfio_alloc_device() gives the ida the allocation's stack (captured once): the
    caller's frames, as vfio_init_device() called by a driver records its own."""
    k = make_kernel(semantics=semantics)
    drv = Driver(k)
    taken, mine = _index_stack_and_mine(k, lambda: vfio_alloc_device(Priv, k.device(NAME), drv))
    assert taken[-1][2] == "<lambda>" and taken[-3] == mine[-2]
    assert taken[-2][2] == "caller" and taken[-2][1] == mine[-1][1] - 1
    if semantics == "v6.1":
        def init() -> Any:
            vdev = kzalloc(k, Priv)
            assert vfio_init_device(vdev, k.device(NAME), drv) == 0
            return vdev
        taken, mine = _index_stack_and_mine(k, init)
        assert taken[-1][2] == "init" and taken[-1][1] == init.__code__.co_firstlineno + 2
        assert taken[-2][2] == "caller" and taken[-3] == mine[-2]
    assert_clean(k)
