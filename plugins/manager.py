"""Driver plugins: loading, validation, and per-driver dispatch of the ops hooks.

Per-driver dispatch: when the set of plugins changes, every driver gets a
small pluggy PluginManager of its own holding just that driver and the
observers (tracer, fault injector, ...).  Its hook callers are plain ones,
so a call for device D reaches D's driver and the observers, never another
driver, and nothing is filtered per call.  (pluggy's subset_hook_caller
filters its implementations on every call: 1.5x a direct call, measured.)
The DriverOps object built from those callers is what the device model holds
as vdev->ops: it has exactly the ops the driver implements, so a missing
ops->release is still the v6.1 NULL dereference it would be.

Loading: built-in drivers by module name, third-party ones from the
entry-point group "vfio_emu.drivers", then check_pending().  The environment
variable VFIO_EMU_PLUGINS restricts which plugins load (a comma-separated
allow-list of names); VFIO_EMU_TRACE_HOOKS=1 prints every hook call.
"""

from __future__ import annotations

import fnmatch
import functools
import importlib
import inspect
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

import pluggy

from vfio_emu.errors import InvalidArgumentError, PluginError
from vfio_emu.linux.device import Device
from vfio_emu.linux.kernel import Kernel
from vfio_emu.plugins import hookspecs

ENTRY_POINT_GROUP = "vfio_emu.drivers"
ALLOW_ENV = "VFIO_EMU_PLUGINS"
TRACE_ENV = "VFIO_EMU_TRACE_HOOKS"
#: Built-in drivers and observers, by module name; the last dotted part is the plugin name.
BUILTINS: tuple[str, ...] = (
    "vfio_emu.plugins.ap", "vfio_emu.plugins.ccw", "vfio_emu.plugins.mtty",
    "vfio_emu.plugins.pci")
#: Built-in observers, loaded on request (each wraps every driver's ops).
OBSERVERS: dict[str, str] = {"tracer": "vfio_emu.plugins.tracer"}
#: vfio_device_ops members, with the arguments the device model passes.
OPS: dict[str, tuple[str, ...]] = {
    "init": ("vdev",), "release": ("vdev",), "open_device": ("vdev",),
    "close_device": ("vdev",), "request": ("vdev", "count"), "match": ("vdev", "buf"),
}


def _implements(hook: Any, plugin: object) -> bool:
    """A plain (not wrapper) implementation: the driver's own code for that op."""
    return any(impl.plugin is plugin and not (impl.wrapper or impl.hookwrapper)
               for impl in hook.get_hookimpls())


def _bind(caller: Any, args: tuple[str, ...]) -> Callable[..., Any]:
    """The op as the device model calls it: positional, as in C."""
    if args == ("vdev",):
        return lambda vdev: caller(vdev=vdev)
    return lambda vdev, arg: caller(**{"vdev": vdev, args[1]: arg})


def _direct(caller: Any) -> Callable[..., Any] | None:
    """A hook's one implementation, to call with the hookspec's arguments in their order,
    positionally - when that is all pluggy would do: one plain hookimpl, no wrapper, no
    hookwrapper, no optional arguments (tracing is on: None, see Driver).  Its return
    value is the implementation's own (for a firstresult hook, what pluggy returns too;
    for another, pluggy's list holds it).  None when pluggy must dispatch."""
    impls = caller.get_hookimpls()
    if len(impls) != 1 or caller.spec is None or caller.is_historic():
        return None
    impl = impls[0]
    if impl.wrapper or impl.hookwrapper or impl.kwargnames:
        return None
    fn: Callable[..., Any] = impl.function
    spec = tuple(caller.spec.argnames)
    if tuple(impl.argnames) == spec:
        return fn
    pick = [spec.index(name) for name in impl.argnames]  # a subset, maybe reordered
    return lambda *args: fn(*[args[i] for i in pick])


@dataclass(frozen=True)
class KnownFinding:
    """A finding a driver declares (check_known_findings): in the scenarios matching the
    glob `scenario`, under the semantics / delayed_release given (None: any), a report
    title or error containing `match` is known - for `reason`."""

    scenario: str
    match: str
    reason: str
    semantics: str | None = None
    delayed_release: bool | None = None

    def __post_init__(self) -> None:
        for what in ("scenario", "match", "reason"):
            value = getattr(self, what)
            if not isinstance(value, str) or not value:
                raise InvalidArgumentError(f"KnownFinding.{what} must be a non-empty str, "
                                           f"not {value!r}")

    def applies(self, scenario: str, semantics: str, delayed_release: bool) -> bool:
        return (fnmatch.fnmatchcase(scenario, self.scenario)
                and self.semantics in (None, semantics)
                and self.delayed_release in (None, delayed_release))


class DriverOps:
    """struct vfio_device_ops of one driver: one attribute per op the driver implements."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        ops = [op for op in OPS if getattr(self, op, None) is not None]
        return f"<DriverOps {self.name}: {', '.join(ops)}>"


class MdevDriverAdapter:
    """What mdev_register_parent() wants (probe, remove, max_instances, get_available),
    dispatching to one driver's probe/remove hooks."""

    def __init__(self, driver: Driver, kernel: Kernel, max_instances: int = 0,
                 get_available: Callable[[Any], int] | None = None) -> None:
        self._driver, self._kernel = driver, kernel
        self.max_instances = max_instances
        if get_available is not None:
            self.get_available = get_available

    def probe(self, mdev: Device) -> int:
        return self._driver.probe(self._kernel, mdev)

    def remove(self, mdev: Device) -> None:
        self._driver.remove(self._kernel, mdev)


class Driver:
    """One loaded driver plugin: its name, its ops, and its entry points.

    A hook whose only implementation is the driver's own plain hookimpl is called
    directly, as pluggy would call it; once an observer wraps it (or pluggy traces the
    calls), through pluggy.  The ops are looked at again whenever the plugins change.
    """

    def __init__(self, name: str, plugin: object, ops: DriverOps,
                 callers: dict[str, Any], pm: pluggy.PluginManager | None = None,
                 implemented: Iterable[str] = (), direct: bool = True) -> None:
        self.name = name
        self.plugin = plugin
        self.ops = ops
        self._callers = callers
        self._pm = pm
        #: The ops the driver implements: DriverOps has exactly these.
        self._implemented = tuple(implemented)
        self._direct_ok = direct
        self._direct: dict[str, Callable[..., Any] | None] = {}
        self._has_impls: dict[str, bool] = {}
        self._dispatch()

    def _dispatch(self) -> None:
        """How each hook is called now: directly (_direct), or through pluggy."""
        self._direct = {h: _direct(c) if self._direct_ok else None
                        for h, c in self._callers.items()}
        self._has_impls = {h: bool(c.get_hookimpls()) for h, c in self._callers.items()}
        for op in self._implemented:
            fn = self._direct[op]
            setattr(self.ops, op, fn if fn is not None else _bind(self._callers[op], OPS[op]))

    @contextmanager
    def observed(self, observer: object) -> Iterator[None]:
        """Let an observer's hookimpls (wrappers) see this driver's calls for a while - a
        checker's userspace answering ops->request, say."""
        if self._pm is None:
            raise InvalidArgumentError(f"driver '{self.name}' has no plugin manager")
        self._pm.register(observer)
        self._dispatch()
        try:
            yield
        finally:
            self._pm.unregister(observer)
            self._dispatch()

    def __repr__(self) -> str:
        return f"<Driver {self.name}>"

    def init_module(self, kernel: Kernel) -> int:
        """module_init(): 0 or -errno (a driver without driver_init: 0)."""
        direct = self._direct["driver_init"]
        ret = (direct(kernel, self) if direct is not None
               else self._callers["driver_init"](kernel=kernel, driver=self))
        if ret is None and not self._has_impls["driver_init"]:
            return 0
        if type(ret) is not int or ret > 0:
            raise PluginError(f"driver '{self.name}': driver_init() must return 0 or -errno, "
                              f"not {ret!r}")
        return ret

    @functools.cached_property
    def source_files(self) -> frozenset[str]:
        """The files the driver's code is in: where a report's "first driver frame" is."""
        obj = self.plugin if inspect.ismodule(self.plugin) else type(self.plugin)
        try:
            path = inspect.getsourcefile(obj)
        except TypeError:
            return frozenset()
        return frozenset({os.path.realpath(path)}) if path else frozenset()

    def invariants(self, kernel: Kernel) -> list[str]:
        """The promises of this driver (and of the observers) broken now."""
        broken: list[str] = []
        direct = self._direct["check_invariants"]
        if direct is not None:  # pluggy's list of the results that are not None
            one = direct(kernel, self)
            results = [] if one is None else [one]
        else:
            results = self._callers["check_invariants"](kernel=kernel, driver=self)
        for found in results:
            if not isinstance(found, (list, tuple)) or not all(
                    isinstance(m, str) for m in found):
                raise PluginError(f"driver '{self.name}': check_invariants() must return a "
                                  f"list of messages, not {found!r}")
            broken += found
        return broken

    def known_findings(self) -> list[KnownFinding]:
        """What the driver declares it knows about (check_known_findings)."""
        direct = self._direct["check_known_findings"]
        found = direct() if direct is not None else self._callers["check_known_findings"]()
        if found is None:
            return []
        if not isinstance(found, (list, tuple)) or not all(
                isinstance(k, KnownFinding) for k in found):
            raise PluginError(f"driver '{self.name}': check_known_findings() must return a "
                              f"list of KnownFinding, not {found!r}")
        return list(found)

    def exit_module(self, kernel: Kernel) -> None:
        """module_exit()."""
        direct = self._direct["driver_exit"]
        if direct is not None:
            direct(kernel, self)
        else:
            self._callers["driver_exit"](kernel=kernel, driver=self)

    def probe(self, kernel: Kernel, dev: Device) -> int:
        direct = self._direct["probe"]
        ret = (direct(kernel, self, dev) if direct is not None
               else self._callers["probe"](kernel=kernel, driver=self, dev=dev))
        if type(ret) is not int:
            raise PluginError(f"driver '{self.name}': probe() must return 0 or -errno, "
                              f"not {ret!r}")
        return ret

    def remove(self, kernel: Kernel, dev: Device) -> None:
        direct = self._direct["remove"]
        if direct is not None:
            direct(kernel, self, dev)
        else:
            self._callers["remove"](kernel=kernel, driver=self, dev=dev)

    def bind(self, kernel: Kernel, name: str) -> Any:
        """Make a device of this driver appear and bind it (check_bind): device or -errno."""
        if not self._has_impls["check_bind"]:
            return self._bind_bus_device(kernel, name)
        direct = self._direct["check_bind"]
        if direct is not None:
            return direct(kernel, self, name)
        return self._callers["check_bind"](kernel=kernel, driver=self, name=name)

    def unbind(self, kernel: Kernel, dev: Any) -> int:
        """Unbind it again (check_unbind): 0 or -errno."""
        if not self._has_impls["check_unbind"]:
            self.remove(kernel, dev)
            return 0
        direct = self._direct["check_unbind"]
        if direct is not None:
            return int(direct(kernel, self, dev))
        return int(self._callers["check_unbind"](kernel=kernel, driver=self, dev=dev))

    def _bind_bus_device(self, kernel: Kernel, name: str) -> Any:
        """The default: a bus device of that name, probed by this driver."""
        dev = kernel.device(name)
        ret = self.probe(kernel, dev)
        return ret if ret else dev

    def mdev_driver(self, kernel: Kernel, max_instances: int = 0,
                    get_available: Callable[[Any], int] | None = None) -> MdevDriverAdapter:
        """An mdev driver for mdev_register_parent() whose probe/remove are this driver's."""
        return MdevDriverAdapter(self, kernel, max_instances, get_available)


class Plugins:
    """The plugin manager of one emulation: drivers and observers, nothing global."""

    def __init__(self, *, builtins: Iterable[str] = BUILTINS, load_entrypoints: bool = True,
                 allow: Iterable[str] | None = None, trace: bool | None = None,
                 observers: Iterable[str] = (), strict: bool = True) -> None:
        """allow: the plugin names that may load (default: $VFIO_EMU_PLUGINS, or all).
        trace: print every hook call (default: $VFIO_EMU_TRACE_HOOKS).
        observers: built-in observers to load too, by name (e.g. "tracer").
        strict=False: a third-party plugin that fails to load or to validate is left out
        and named in .errors (the checker reports it), instead of raising PluginError."""
        self._strict = strict
        #: Third-party plugins left out (strict=False): name -> why.
        self.errors: dict[str, str] = {}
        if allow is None and os.environ.get(ALLOW_ENV):
            allow = [n.strip() for n in os.environ[ALLOW_ENV].split(",") if n.strip()]
        self._allow = None if allow is None else frozenset(allow)
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.drivers: dict[str, Driver] = {}
        for module_name in builtins:
            name = module_name.rsplit(".", 1)[-1]
            if self._allowed(name):
                self._register(importlib.import_module(module_name), name, rebuild=False)
        for name in observers:
            if name not in OBSERVERS:
                raise InvalidArgumentError(
                    f"no built-in observer '{name}' (there are: {', '.join(sorted(OBSERVERS))})")
            self._register(importlib.import_module(OBSERVERS[name]), name, rebuild=False)
        if load_entrypoints:
            self._load_entrypoints()
        self._check_pending()
        self._trace = (trace if trace is not None
                       else os.environ.get(TRACE_ENV) not in (None, "", "0"))
        self._rebuild()

    def _allowed(self, name: str) -> bool:
        return self._allow is None or name in self._allow

    def _load_entrypoints(self) -> None:
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if not self._allowed(ep.name) or self.pm.has_plugin(ep.name):
                continue
            try:
                try:
                    plugin = ep.load()
                except Exception as e:
                    raise PluginError(f"plugin '{ep.name}' ({ep.value}) failed to load: "
                                      f"{type(e).__name__}: {e}") from e
                self._register(plugin, ep.name, rebuild=False)
            except PluginError as e:
                if self._strict:
                    raise
                self.errors[ep.name] = str(e)

    def _check_pending(self) -> None:
        while True:
            try:
                self.pm.check_pending()
                return
            except pluggy.PluginValidationError as e:
                name = self.pm.get_name(e.plugin) or repr(e.plugin)
                error = PluginError(f"plugin '{name}': {e}")
                if self._strict:
                    raise error from e
                self.errors[name] = str(error)
                self.pm.unregister(e.plugin)

    def _register(self, plugin: object, name: str, rebuild: bool = True) -> None:
        try:
            self.pm.register(plugin, name=name)
        except pluggy.PluginValidationError as e:
            raise PluginError(f"plugin '{name}': {e}") from e
        except ValueError as e:  # a name or an object registered twice
            raise PluginError(f"plugin '{name}': {e}") from e
        if rebuild:
            self._check_pending()
            self._rebuild()

    def register(self, plugin: object, name: str) -> None:
        """Add a driver or an observer (e.g. a test's fault injector) by hand."""
        if not isinstance(name, str) or not name:
            raise InvalidArgumentError(f"plugin name must be a non-empty str, not {name!r}")
        self._register(plugin, name)

    def unregister(self, name: str) -> None:
        plugin = self.pm.get_plugin(name)
        if plugin is None:
            raise InvalidArgumentError(f"no plugin named '{name}'")
        self.pm.unregister(plugin)
        self._rebuild()

    def driver(self, name: str) -> Driver:
        try:
            return self.drivers[name]
        except KeyError:
            raise InvalidArgumentError(
                f"no driver named '{name}' (loaded: {', '.join(sorted(self.drivers)) or 'none'})"
            ) from None

    def _rebuild(self) -> None:
        """Give every driver its own manager (it + the observers): once per change."""
        hook = self.pm.hook
        plugins = [(name, p) for name, p in self.pm.list_name_plugin() if p is not None]
        drivers = [(name, p) for name, p in plugins if _implements(hook.probe, p)]
        observers = [(name, p) for name, p in plugins if not _implements(hook.probe, p)]
        self.drivers = {}
        for name, plugin in drivers:
            own = pluggy.PluginManager(hookspecs.PROJECT)
            own.add_hookspecs(hookspecs)
            for plugin_name, p in [(name, plugin), *observers]:
                own.register(p, name=plugin_name)
            if self._trace:
                own.trace.root.setwriter(sys.stderr.write)
                own.enable_tracing()
            callers = {h: getattr(own.hook, h) for h in (
                *OPS, "driver_init", "driver_exit", "probe", "remove", "check_bind",
                "check_unbind", "check_known_findings", "check_invariants")}
            implemented = [op for op in OPS if _implements(getattr(hook, op), plugin)]
            self.drivers[name] = Driver(name, plugin, DriverOps(name), callers, own,
                                        implemented, direct=not self._trace)
