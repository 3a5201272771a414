"""The plugin manager (vfio_emu.plugins.manager): per-driver dispatch, observers, loading
and validation against the hookspecs, the built-in observers, and the mtty driver.

The test drivers are tests/_drivers.py's generic bus driver plus recording ops; the
third-party driver installed by entry point is written out in full, as its author would."""

from __future__ import annotations

import sys
import textwrap

import pytest
from _drivers import GenericBusDriver, free_if_v61
from _workers import FAST_CLOCK

from vfio_emu.errors import HangError, KernelOops, PluginError
from vfio_emu.linux.errno import ENOMEM
from vfio_emu.linux.kernel import Kernel
from vfio_emu.linux.mdev import mdev_device_create, mdev_device_remove
from vfio_emu.linux.vfio import get_device, put_device, vfio_group_get_device_fd
from vfio_emu.plugins.hookspecs import hookimpl
from vfio_emu.plugins.manager import ALLOW_ENV, TRACE_ENV, Plugins


@pytest.fixture
def kernel():
    k = Kernel(**FAST_CLOCK, watchdog_s=30)
    try:
        yield k
    finally:
        k.close()


class NoRelease(GenericBusDriver):
    """A test driver without ops->release; records its ops.  It is a driver, not an
    observer: it implements probe (and remove), the generic pair of tests/_drivers.py."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls: list[str] = []

    @hookimpl
    def init(self, vdev):
        self.calls.append(f"{self.name}.init")
        return 0

    @hookimpl
    def open_device(self, vdev):
        self.calls.append(f"{self.name}.open_device")
        return 0


class Recorder(NoRelease):
    """The same driver with a release that frees as each ABI requires."""

    @hookimpl
    def release(self, vdev):
        self.calls.append(f"{self.name}.release")
        free_if_v61(vdev.dev.kernel, vdev)


class Observer:
    """Wraps every init and release of every driver, knowing none of them."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    @hookimpl(wrapper=True)
    def init(self, vdev):
        self.seen.append(f"init {vdev.ops.name}")
        return (yield)

    @hookimpl(wrapper=True)
    def release(self, vdev):
        self.seen.append(f"release {vdev.ops.name}")
        return (yield)


class FailInit:
    """A fault injector: ops->init fails with this errno, for every driver."""

    def __init__(self, errno: int) -> None:
        self.errno = errno

    @hookimpl(wrapper=True)
    def init(self, vdev):
        yield
        return -self.errno


def plugins_with(*named):
    p = Plugins(builtins=(), load_entrypoints=False)
    for name, plugin in named:
        p.register(plugin, name)
    return p


def test_each_drivers_ops_reach_only_that_driver_and_the_observers(kernel):
    a, b, obs = Recorder("a"), Recorder("b"), Observer()
    p = plugins_with(("a", a), ("b", b), ("obs", obs))
    assert sorted(p.drivers) == ["a", "b"]  # the observer implements no probe
    for name in ("a", "b"):
        drv = p.driver(name)
        assert drv.probe(kernel, kernel.device(f"dev-{name}")) == 0
        drv.remove(kernel, kernel.device(f"dev-{name}"))
    assert a.calls == ["a.init", "a.release"]
    assert b.calls == ["b.init", "b.release"]
    assert obs.seen == ["init a", "release a", "init b", "release b"]
    assert kernel.findings() == [] and kernel.leak_check() == []


def test_dispatch_follows_plugins_registered_later(kernel):
    a = Recorder("a")
    p = plugins_with(("a", a))
    b = Recorder("b")
    p.register(b, "b")  # a's callers are rebuilt: b's init must not reach a
    assert p.driver("a").probe(kernel, kernel.device("x")) == 0
    assert a.calls == ["a.init"] and b.calls == []
    p.driver("a").remove(kernel, kernel.device("x"))


class Partial(GenericBusDriver):
    """Ops that declare fewer arguments than their hookspecs (pluggy passes what each
    hookimpl names), and invariants that are and are not broken."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        self.broken: list[str] | None = None

    @hookimpl
    def request(self, vdev):  # no count
        self.requests.append("asked")

    @hookimpl
    def match(self, buf):  # no vdev
        return 1 if buf == "x" else 0

    @hookimpl
    def check_invariants(self, driver):  # no kernel
        return self.broken


def _caller_of_op():
    """A driver mixin whose open_device notes which function called it."""
    import sys

    seen: list[str] = []

    class Spy:
        @hookimpl
        def open_device(self, vdev):
            seen.append(sys._getframe(1).f_code.co_name)
            return 0

    return Spy, seen


def test_a_hook_only_its_driver_implements_is_called_directly_until_observed(kernel):
    """No observer wraps open_device: the model calls the driver's function itself (no
    pluggy frame between); while an observer wraps it, pluggy dispatches, and after it
    leaves the direct call is back."""
    spy, seen = _caller_of_op()

    class Driver(spy, Recorder):
        pass

    class WrapsOpen:
        def __init__(self) -> None:
            self.seen = 0

        @hookimpl(wrapper=True)
        def open_device(self, vdev):
            self.seen += 1
            return (yield)

    drv = plugins_with(("d", Driver("d"))).driver("d")
    assert drv.ops.open_device == Driver.open_device.__get__(drv.plugin)
    dev = kernel.device("x")
    assert drv.probe(kernel, dev) == 0
    observer = WrapsOpen()
    for observe in (False, True, False):
        fd = vfio_group_get_device_fd(kernel, "x")
        if observe:
            with drv.observed(observer):
                fd.close()
                fd = vfio_group_get_device_fd(kernel, "x")
                assert seen[-1] == "_multicall" and observer.seen == 1
        else:
            assert seen[-1] == "vfio_group_get_device_fd"  # the model: nothing between
        fd.close()
    drv.remove(kernel, dev)
    assert kernel.findings() == [] and kernel.leak_check() == []


def test_a_hookimpl_called_directly_gets_the_arguments_it_names_and_returns_as_pluggy(kernel):
    """The same calls, directly and through pluggy (hook tracing on): the same results."""
    results = []
    for trace in (False, True):
        plugin = Partial()
        p = Plugins(builtins=(), load_entrypoints=False, trace=trace)
        p.register(plugin, "partial")
        drv = p.driver("partial")
        got = [drv.ops.match(None, "x"), drv.ops.match(None, "y"), drv.ops.request(None, 3)]
        got += [plugin.requests, drv.invariants(kernel), drv.init_module(kernel)]
        plugin.broken = ["a promise"]
        got += [drv.invariants(kernel), drv.known_findings(), drv.exit_module(kernel)]
        results.append(got)
    direct, pluggy = results
    assert direct[:2] == [1, 0] and direct[3:] == [["asked"], [], 0, ["a promise"], [], None]
    assert direct[2] is None and pluggy[2] == []  # a void op: pluggy's list of no result
    assert direct[:2] + direct[3:] == pluggy[:2] + pluggy[3:]


def test_with_hook_tracing_every_call_goes_through_pluggy(kernel, capfd):
    p = Plugins(builtins=(), load_entrypoints=False, trace=True)
    p.register(Recorder("a"), "a")
    drv = p.driver("a")
    assert drv.probe(kernel, kernel.device("x")) == 0
    drv.remove(kernel, kernel.device("x"))
    err = capfd.readouterr().err
    assert "probe" in err and "init" in err and "release" in err


def test_a_driver_without_release_has_no_release_op_and_oopses_in_v61(kernel):
    p = plugins_with(("norel", NoRelease("norel")))
    drv = p.driver("norel")
    assert getattr(drv.ops, "release", None) is None
    assert drv.probe(kernel, kernel.device("x")) == 0
    with pytest.raises(KernelOops):
        drv.remove(kernel, kernel.device("x"))
    assert [r.kind for r in kernel.reports] == ["oops"]


def test_a_fault_injector_fails_init_and_the_probe_unwinds_cleanly(kernel):
    a = Recorder("a")
    p = plugins_with(("a", a), ("fault", FailInit(12)))
    assert p.driver("a").probe(kernel, kernel.device("x")) == -ENOMEM
    assert "a.release" not in a.calls  # release is never called for a failed init
    assert kernel.findings() == [] and kernel.leak_check() == []


def test_a_hookimpl_with_an_unknown_argument_is_refused_naming_plugin_and_hook():
    class Bad:
        @hookimpl
        def init(self, vdev, not_an_argument):
            return 0

    with pytest.raises(PluginError, match=r"plugin 'bad'.*init"):
        plugins_with(("bad", Bad()))


def test_an_unknown_hook_is_refused_by_check_pending():
    class Typo:
        @hookimpl
        def open_devcie(self, vdev):
            return 0

    p = Plugins(builtins=(), load_entrypoints=False)
    with pytest.raises(PluginError, match=r"plugin 'typo'.*open_devcie"):
        p.register(Typo(), "typo")


def test_the_allow_list_in_the_environment_restricts_what_loads(monkeypatch):
    monkeypatch.setenv(ALLOW_ENV, "nothing-by-that-name")
    assert Plugins(load_entrypoints=False).drivers == {}
    monkeypatch.setenv(ALLOW_ENV, "mtty")
    assert list(Plugins(load_entrypoints=False).drivers) == ["mtty"]


def test_hook_tracing_from_the_environment_prints_every_call(monkeypatch, capfd, kernel):
    monkeypatch.setenv(TRACE_ENV, "1")
    p = Plugins(builtins=(), load_entrypoints=False)
    p.register(Recorder("a"), "a")
    p.driver("a").probe(kernel, kernel.device("x"))
    p.driver("a").remove(kernel, kernel.device("x"))
    err = capfd.readouterr().err
    assert "probe" in err and "init" in err and "release" in err


def test_a_third_party_driver_is_discovered_by_its_entry_point(tmp_path, monkeypatch, kernel):
    (tmp_path / "acme_vfio.py").write_text(textwrap.dedent('''
        from vfio_emu.plugins.hookspecs import hookimpl
        from vfio_emu.linux.vfio import (VfioDevice, vfio_alloc_device, vfio_put_device,
                                     vfio_register_group_dev, vfio_unregister_group_dev)

        @hookimpl
        def release(vdev):
            pass

        @hookimpl
        def probe(kernel, driver, dev):
            vdev = vfio_alloc_device(VfioDevice, dev, driver.ops)
            dev.drvdata = vdev
            return vfio_register_group_dev(vdev)

        @hookimpl
        def remove(kernel, driver, dev):
            vfio_unregister_group_dev(dev.drvdata)
            vfio_put_device(dev.drvdata)
    '''))
    dist = tmp_path / "acme_vfio-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-vfio\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[vfio_emu.drivers]\nacme = acme_vfio\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "acme" not in Plugins(load_entrypoints=False).drivers  # tests stay hermetic
    p = Plugins()
    assert "acme" in p.drivers
    kernel_v62 = Kernel(**FAST_CLOCK, semantics="v6.2")
    try:
        drv = p.driver("acme")
        assert drv.probe(kernel_v62, kernel_v62.device("acme0")) == 0
        drv.remove(kernel_v62, kernel_v62.device("acme0"))
        assert kernel_v62.findings() == [] and kernel_v62.leak_check() == []
    finally:
        kernel_v62.close()
        sys.modules.pop("acme_vfio", None)


def test_an_entry_point_that_fails_to_import_is_a_plugin_error(tmp_path, monkeypatch):
    dist = tmp_path / "broken_vfio-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-vfio\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[vfio_emu.drivers]\nbroken = no_such_module_x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginError, match=r"plugin 'broken'.*failed to load"):
        Plugins()


# -- mtty ------------------------------------------------------------------------------

@pytest.fixture
def mtty():
    return Plugins(load_entrypoints=False, allow=["mtty"]).driver("mtty")


@pytest.mark.parametrize("semantics", ["v6.1", "v6.2"])
def test_mtty_create_open_close_remove_is_clean_and_gives_the_ports_back(mtty, semantics):
    with Kernel(**FAST_CLOCK, semantics=semantics) as k:
        mtty.init_module(k)
        g = k.module_data["mtty"]
        for _ in range(10):
            m = mdev_device_create(g.parent.types[1], "uuid-0")  # mtty-2: two ports
            assert not isinstance(m, int) and g.avail_ports == 22
            fd = vfio_group_get_device_fd(k, "uuid-0")
            fd.close()
            assert mdev_device_remove(m) == 0 and g.avail_ports == 24
        mtty.exit_module(k)
        assert k.findings() == [] and k.leak_check() == []


def test_mtty_ports_come_back_at_release_not_at_remove(mtty, kernel):
    mtty.init_module(kernel)
    g = kernel.module_data["mtty"]
    m = mdev_device_create(g.parent.types[0], "uuid-0")
    vdev = m.drvdata
    get_device(vdev)  # someone still holds the vfio_device
    assert mdev_device_remove(m) == 0
    assert g.avail_ports == 23  # removed, not released: the port is still taken
    put_device(vdev)
    assert g.avail_ports == 24
    mtty.exit_module(kernel)


def test_mtty_init_failing_to_allocate_gives_its_ports_back(mtty, kernel):
    mtty.init_module(kernel)
    g = kernel.module_data["mtty"]
    kernel.fail_next_allocs(1, skip=2)  # the mdev, the vdev, then init's vconfig fails
    assert mdev_device_create(g.parent.types[1], "uuid-0") == -ENOMEM
    assert g.avail_ports == 24
    mtty.exit_module(kernel)
    assert kernel.findings() == [] and kernel.leak_check() == []


def test_mtty_has_no_request_op_so_an_fd_held_through_remove_hangs_silently(mtty):
    with Kernel(**FAST_CLOCK, watchdog_s=30) as k:
        mtty.init_module(k)
        g = k.module_data["mtty"]
        m = mdev_device_create(g.parent.types[0], "uuid-0")
        fd = vfio_group_get_device_fd(k, "uuid-0")
        with pytest.raises(HangError):
            mdev_device_remove(m)
        assert not [e for e in k.trace.events if e.op == "ops->request"]
        fd.close()


# -- the built-in observers ------------------------------------------------------------

def test_the_tracer_puts_every_driver_op_on_the_timeline(kernel):
    p = Plugins(builtins=("vfio_emu.plugins.mtty",), load_entrypoints=False,
                observers=["tracer"])
    assert sorted(p.drivers) == ["mtty"]  # the tracer is an observer, not a driver
    mtty = p.driver("mtty")
    mtty.init_module(kernel)
    m = mtty.bind(kernel, "u")
    vfio_group_get_device_fd(kernel, "u").close()
    mtty.unbind(kernel, m)
    mtty.exit_module(kernel)
    ops = [e.op for e in kernel.trace.events if e.op.startswith(("ops->", "mtty "))]
    # v6.1 mtty_dev_ops has init and release only: the open and close reach no op.
    assert ops == ["ops->init", "mtty probe", "ops->release", "mtty remove"]
    assert kernel.findings() == [] and kernel.leak_check() == []


def test_an_unknown_observer_is_refused():
    from vfio_emu.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="no built-in observer"):
        Plugins(builtins=(), load_entrypoints=False, observers=["nosuch"])


@pytest.mark.parametrize("step", ["init", "open_device"])
def test_the_fault_injector_fails_a_chosen_op_and_everything_unwinds(kernel, step):
    from vfio_emu.plugins.faults import FaultInjector

    faults = FaultInjector(step, 5)  # -EIO
    p = plugins_with(("a", Recorder("a")), ("faults", faults))
    drv = p.driver("a")
    dev = kernel.device("x")
    if step == "open_device":  # the op ran and "failed": the FD is not created
        assert drv.probe(kernel, dev) == 0
        assert vfio_group_get_device_fd(kernel, "x") == -5
        assert dev.drvdata.open_count == 0
        drv.remove(kernel, dev)
    else:
        assert drv.probe(kernel, dev) == -5
    assert faults.injected == 1
    assert kernel.findings() == [] and kernel.leak_check() == []


@pytest.mark.parametrize("step", ["register", "mdev_create"])
def test_a_kernel_fault_point_fails_its_step_and_the_driver_unwinds(step):
    mtty = Plugins(load_entrypoints=False, allow=["mtty"]).driver("mtty")
    with Kernel(**FAST_CLOCK) as k:
        mtty.init_module(k)
        k.inject(step, 12)
        assert mtty.bind(k, "u") == -ENOMEM
        assert k.module_data["mtty"].avail_ports == 24
        mtty.exit_module(k)
        assert [r for r in k.findings()] == [] and k.leak_check() == []
        assert any(e.op == f"fault injected: {step}" for e in k.trace.events)


def test_the_builtin_drivers_implement_the_ops_of_their_kernel_structs():
    """v6.1: vfio_pci_ops, vfio_ccw_dev_ops, vfio_ap_matrix_dev_ops, mtty_dev_ops - the
    members the life cycle reaches."""
    p = Plugins(load_entrypoints=False)
    ops = {name: {op for op in ("init", "release", "open_device", "close_device", "request",
                                "match") if getattr(p.driver(name).ops, op, None) is not None}
           for name in ("ap", "ccw", "mtty", "pci")}
    assert ops == {
        "pci": {"init", "release", "open_device", "close_device", "request", "match"},
        "ccw": {"init", "release", "open_device", "close_device", "request"},
        "ap": {"init", "release", "open_device", "close_device"},
        "mtty": {"init", "release"},
    }
