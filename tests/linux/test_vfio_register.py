"""vfio_register_group_dev() and vfio_unregister_group_dev(): the registration count,
the unregister wait with its ->request loop, both unregister orders, and the hangs
the watchdog reports.

Every correct sequence must end with no report, no leak and no WARN, under
both semantics; every buggy sequence must produce the report that names its
bug.  Test names read as the behaviour they pin; "cNN" names the bug class
(docs/lifecycle.md lists them).

Waits never depend on timing: unregister is unblocked from inside ->request
(as userspace reacts to the request eventfd) or by userspace's action queued
on the kernel's event queue at an emulated time, and its watchdog bounds the
hangs.
"""

from __future__ import annotations

from typing import Any

import pytest
from _asserts import BOTH, assert_clean, dmesg_kinds, only_report, ops_of, stack_text
from _drivers import NAME, PATIENT, Driver, MttyLikeDriver, Priv, is_freed, probe, remove

from vfio_emu import REFCOUNT_SATURATED
from vfio_emu.errors import HangError, UseAfterFreeError
from vfio_emu.linux.errno import EBUSY, EINVAL, ENODEV
from vfio_emu.linux.vfio import (
    DeviceFile,
    State,
    core_of,
    vfio_alloc_device,
    vfio_device_put_registration,
    vfio_device_try_get_registration,
    vfio_group_get_device_fd,
    vfio_put_device,
    vfio_register_group_dev,
    vfio_unregister_group_dev,
)

# -- register ------------------------------------------------------------------------------

@BOTH
def test_register_of_a_second_device_on_the_same_parent_fails_ebusy_and_put_cleans_up(
        make_kernel, semantics):
    k = make_kernel(semantics=semantics)
    dev = k.device(NAME)
    first = vfio_alloc_device(Priv, dev, Driver(k))
    assert isinstance(first, Priv)
    assert vfio_register_group_dev(first) == 0
    drv = Driver(k)
    second = vfio_alloc_device(Priv, dev, drv)
    assert isinstance(second, Priv)
    assert vfio_register_group_dev(second) == -EBUSY
    assert second.state is State.INITIALIZED  # register failure leaves it initialized
    assert second.dev_set is not None  # ... with its (singleton) set: release undoes it
    vfio_put_device(second)  # the probe error path
    assert is_freed(second) and drv.calls == ["init", "release"]
    remove(first)
    # __vfio_register_dev() prints dev_WARN "Device already exists on group"; nothing else.
    [warn] = k.reports
    assert warn.kind == "WARN" and "Device already exists on group" in warn.title
    k.reports.clear()
    assert k.leak_check() == []


@BOTH
def test_register_twice_warns_and_returns_einval_keeping_one_registration(make_kernel,
                                                                          semantics):
    k = make_kernel(semantics=semantics)
    vdev, _ = probe(k)
    assert vfio_register_group_dev(vdev) == -EINVAL
    assert "not initialized" in only_report(k, "WARN").title
    assert k.devices == [vdev]
    assert core_of(vdev, "test").refcount.read() == 1
    remove(vdev)
    k.reports.clear()
    assert k.leak_check() == []


@BOTH
def test_unregister_of_a_never_registered_device_warns_and_returns(make_kernel, semantics):
    k = make_kernel(semantics=semantics)
    drv = Driver(k)
    vdev = vfio_alloc_device(Priv, k.device(NAME), drv)
    assert isinstance(vdev, Priv)
    vfio_unregister_group_dev(vdev)  # must not wait
    assert "vfio_unregister_group_dev" in only_report(k, "WARN").title
    assert vdev.state is State.INITIALIZED and drv.requests == []
    vfio_put_device(vdev)
    k.reports.clear()
    assert k.leak_check() == []


# -- the unregister wait and ->request -----------------------------------------------------

@BOTH
def test_remove_with_an_open_fd_requests_0_1_2_until_userspace_closes_it(make_kernel,
                                                                          semantics):
    k = make_kernel(semantics=semantics, watchdog_s=PATIENT)
    fd: DeviceFile | None = None

    def on_request(vdev, count):
        if count == 2:  # userspace gives in after the third request, a second later
            assert fd is not None
            k.schedule_delayed(k.HZ, fd.close, "userspace closes")

    vdev, drv = probe(k, driver=Driver(k, on_request=on_request))
    fd = vfio_group_get_device_fd(k, NAME)
    assert isinstance(fd, DeviceFile)
    remove(vdev)  # blocks in unregister until userspace closed fd
    assert drv.requests == [0, 1, 2]  # every 10 s (emulated), until the close
    assert fd.closed and is_freed(vdev)
    assert drv.calls == ["init", "open_device", "close_device", "release"]
    assert_clean(k)


@BOTH
def test_remove_waits_for_an_fd_closed_from_inside_request(make_kernel, semantics):
    k = make_kernel(semantics=semantics)
    fds: list[DeviceFile] = []
    vdev, drv = probe(k, driver=Driver(k, on_request=lambda v, n: n == 1 and fds[0].close()))
    fd = vfio_group_get_device_fd(k, NAME)
    assert isinstance(fd, DeviceFile)
    fds.append(fd)
    remove(vdev)
    assert drv.requests == [0, 1]
    assert_clean(k)


@BOTH
def test_unlink_first_order_refuses_a_reopen_during_the_unregister_wait(make_kernel,
                                                                        semantics):
    k = make_kernel(semantics=semantics, unregister_order="unlink-first")
    fds: list[DeviceFile] = []
    reopened: list[object] = []

    def on_request(vdev, count):
        reopened.append(vfio_group_get_device_fd(k, NAME))
        fds[0].close()

    vdev, drv = probe(k, driver=Driver(k, on_request=on_request))
    fd = vfio_group_get_device_fd(k, NAME)
    assert isinstance(fd, DeviceFile)
    fds.append(fd)
    remove(vdev)
    assert reopened == [-ENODEV]
    assert drv.requests == [0]
    assert_clean(k)


# -- 7. put without unregister -------------------------------------------------------------

@BOTH
def test_c07_put_without_unregister_warns_and_a_later_lookup_is_a_uaf(make_kernel,
                                                                      semantics):
    k = make_kernel(semantics=semantics)
    vdev, _ = probe(k)
    vfio_put_device(vdev)  # BUG: still registered
    warn = only_report(k, "WARN")
    assert "released while still registered" in warn.title
    with pytest.raises(UseAfterFreeError):
        vfio_group_get_device_fd(k, NAME)
    assert "use-after-free" in only_report(k, "use-after-free").title


# -- 11/12. unregister hangs ---------------------------------------------------------------

@BOTH
def test_c11_fd_kept_open_and_requests_ignored_hangs_unregister_until_the_watchdog(
        make_kernel, semantics):
    k = make_kernel(semantics=semantics, watchdog_s=30)
    vdev, drv = probe(k)

    def userspace_opens():
        return vfio_group_get_device_fd(k, NAME)

    fd = userspace_opens()
    assert isinstance(fd, DeviceFile)
    with pytest.raises(HangError) as exc:
        vfio_unregister_group_dev(vdev)
    rep = exc.value.report
    assert rep.kind == "hang" and "blocked for more than 30 seconds" in rep.title
    assert rep in k.reports
    assert str(fd) in rep.detail  # the holder is named ...
    assert "userspace_opens" in stack_text(rep, str(fd))  # ... with its opener's stack
    assert drv.requests == [0, 1, 2]  # one request per 10 s wait
    fd.close()


@BOTH
def test_c12_no_request_op_hangs_unregister_silently(make_kernel, semantics):
    k = make_kernel(semantics=semantics, watchdog_s=20)
    vdev, drv = probe(k, driver=MttyLikeDriver(k))
    fd = vfio_group_get_device_fd(k, NAME)
    assert isinstance(fd, DeviceFile)
    with pytest.raises(HangError) as exc:
        vfio_unregister_group_dev(vdev)
    assert exc.value.report.kind == "hang"
    assert str(fd) in exc.value.report.detail
    assert "ops->request" not in ops_of(k)
    assert drv.requests == []
    fd.close()


# -- 13. re-open during the unregister wait ------------------------------------------------

@pytest.mark.parametrize(("order", "reopen_ok", "requests"),
                         [("v6.1", True, [0, 1]), ("unlink-first", False, [0])])
def test_c13_reopen_during_unregister_extends_the_wait_only_in_v61_order(
        make_kernel, order, reopen_ok, requests):
    k = make_kernel(unregister_order=order, watchdog_s=PATIENT)
    fds: list[Any] = []

    def on_request(vdev, count):
        if count == 0:
            fds.append(vfio_group_get_device_fd(k, NAME))  # userspace opens again ...
            fds[0].close()  # ... and closes the old FD
        elif count == 1:
            fds[1].close()

    vdev, drv = probe(k, driver=Driver(k, on_request=on_request))
    fds.append(vfio_group_get_device_fd(k, NAME))
    remove(vdev)
    assert isinstance(fds[1], DeviceFile) is reopen_ok
    if not reopen_ok:
        assert fds[1] == -ENODEV
    assert drv.requests == requests
    assert_clean(k)


# -- 14. missing put_registration ----------------------------------------------------------

@BOTH
def test_c14_missing_put_registration_hangs_unregister_and_names_the_holder(make_kernel,
                                                                            semantics):
    k = make_kernel(semantics=semantics, watchdog_s=20)
    vdev, _ = probe(k)
    assert vfio_device_try_get_registration(vdev)
    # ... error path returns without vfio_device_put_registration()
    with pytest.raises(HangError) as exc:
        vfio_unregister_group_dev(vdev)
    rep = exc.value.report
    assert rep.kind == "hang"
    assert "1 registration reference(s) held without an open FD" in rep.detail


@BOTH
def test_c14_try_get_then_put_registration_lets_unregister_finish(make_kernel, semantics):
    k = make_kernel(semantics=semantics)
    vdev, drv = probe(k)
    assert vfio_device_try_get_registration(vdev)
    vfio_device_put_registration(vdev)
    remove(vdev)
    assert drv.requests == []
    assert_clean(k)


# -- 15. extra put_registration ------------------------------------------------------------

@BOTH
def test_c15_extra_put_registration_frees_the_device_under_an_open_fd(make_kernel, semantics):
    k = make_kernel(semantics=semantics)
    vdev, drv = probe(k)
    fd = vfio_group_get_device_fd(k, NAME)
    assert isinstance(fd, DeviceFile)
    vfio_device_put_registration(vdev)  # BUG: one put too many
    remove(vdev)  # does not wait: the count already says "no FD"
    assert drv.requests == [] and is_freed(vdev)
    with pytest.raises(UseAfterFreeError):
        fd.close()
    assert "use-after-free" in only_report(k, "use-after-free").title


# -- 16. refcount_inc instead of inc_not_zero ----------------------------------------------

@BOTH
def test_c16_refcount_inc_after_unregister_warns_add_uaf_and_saturates(make_kernel,
                                                                       semantics):
    k = make_kernel(semantics=semantics)
    vdev, _ = probe(k)
    vfio_unregister_group_dev(vdev)
    reg = core_of(vdev, "test").refcount
    reg.inc()  # BUG: "revives" an unregistered device
    assert dmesg_kinds(k) == ["ADD_UAF"]
    assert reg.read() == REFCOUNT_SATURATED
    vfio_put_device(vdev)


@BOTH
def test_c16_try_get_registration_after_unregister_fails_without_a_warning(make_kernel,
                                                                           semantics):
    k = make_kernel(semantics=semantics)
    vdev, _ = probe(k)
    vfio_unregister_group_dev(vdev)
    assert vfio_device_try_get_registration(vdev) is False
    assert core_of(vdev, "test").refcount.read() == 0
    vfio_put_device(vdev)
    assert_clean(k)


# -- 32. lkdtm-style primitive misuse on the registration count ----------------------------

@BOTH
def test_c32_refcount_dec_of_the_registration_count_to_zero_leaks_it_forever(make_kernel,
                                                                             semantics):
    k = make_kernel(semantics=semantics, watchdog_s=20)
    vdev, _ = probe(k)
    reg = core_of(vdev, "test").refcount
    reg.dec()  # REFCOUNT_DEC_ZERO: 1 -> 0 through refcount_dec
    assert dmesg_kinds(k) == ["DEC_LEAK"]
    assert reg.read() == REFCOUNT_SATURATED
    with pytest.raises(HangError):  # the count can never reach 0 again
        vfio_unregister_group_dev(vdev)
    assert "SUB_UAF" in dmesg_kinds(k)
    assert reg.read() == REFCOUNT_SATURATED
