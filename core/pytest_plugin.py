"""vfio-emu's pytest plugin: kernel findings fail tests, and the check battery runs as tests.

Registered under the `pytest11` entry point `vfio_emu`; `-p no:vfio_emu` turns it
off.  A test suite that uses none of its fixtures pays for nothing but loading it.

- `vfio_kernel`: a fresh emulated kernel per test, in the mode the markers (or
  `--vfio-modes`) say.  When the test returns, its driver (if any) is unloaded,
  pending releases run and the kernel is asked what it found: a WARN, a KASAN
  report, an oops or a hang fails the test with the report in a "vfio-emu"
  section; a test whose only findings are leaks is LEAKED (letter L), which
  fails the session too.
- `vfio_driver`: the driver plugin named by `@pytest.mark.vfio_driver("name")`
  (or the `vfio_driver` ini option), loaded into that kernel.
- `@pytest.mark.vfio_expect(kind, match=...)`: the test must produce that
  finding (strict); it then does not fail on it.
- A test stopped by pytest-timeout gets a section saying who holds which device.
- `vfio_noop_ns`: the cffi no-op's median ns per call, measured once a session, to turn
  a pytest-benchmark figure into a ratio that survives a noisy machine.
- `--vfio-check NAME` (or the `vfio_check` ini option): one test item per driver,
  mode and scenario of `vfio-emu check`, with ids such as
  `vfio-check::acme[v6.2-delayed]::FD held during remove`.
"""

from __future__ import annotations

import statistics
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from vfio_emu import bench
from vfio_emu.check import ALL_MODES, FAIL, KNOWN, NOT_APPLICABLE, Mode, Verdict
from vfio_emu.check import run_scenario as _run_scenario
from vfio_emu.check import scenario_names as _scenario_names
from vfio_emu.check.verdict import driver_frame
from vfio_emu.linux.kernel import Kernel
from vfio_emu.linux.vfio import holders_report
from vfio_emu.plugins.manager import Driver, Plugins
from vfio_emu.report import Report

#: The emulated seconds a wait in a test may take before the watchdog calls it a hang.
WATCHDOG_S = 120
_MODE_IDS = {Mode("v6.1"): "v6.1", Mode("v6.1", True): "v6.1-delayed",
             Mode("v6.2"): "v6.2", Mode("v6.2", True): "v6.2-delayed"}
_CONTEXT = pytest.StashKey["_Context"]()
_LEAKED = "vfio_leaked"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("vfio-emu", "the VFIO life-cycle emulator")
    group.addoption("--vfio-check", action="append", default=[], metavar="DRIVER",
                    help="run DRIVER through the vfio-emu check battery, one test per "
                         "scenario and mode (repeatable)")
    group.addoption("--vfio-modes", default=None, metavar="MODES",
                    help="the modes of vfio_kernel and --vfio-check: 'all', or a comma-separated "
                         "list of v6.1, v6.1-delayed, v6.2, v6.2-delayed (default: v6.1)")
    group.addoption("--vfio-seed", type=int, default=0, metavar="N",
                    help="the seed the release delays are drawn from (default 0)")
    parser.addini("vfio_check", "drivers to run through the check battery", type="args",
                  default=[])
    parser.addini("vfio_driver", "the driver the vfio_driver fixture loads by default",
                  default="")


def pytest_configure(config: pytest.Config) -> None:
    for line in ("vfio_semantics(name): run vfio_kernel with these semantics (v6.1, v6.2)",
                 "vfio_delayed_release: run vfio_kernel with DEBUG_KOBJECT_RELEASE",
                 "vfio_driver(name): the driver plugin the vfio_driver fixture loads",
                 "vfio_expect(kind, match=''): the test must produce this kernel finding"):
        config.addinivalue_line("markers", line)


def _modes(config: pytest.Config) -> list[Mode]:
    raw = config.getoption("--vfio-modes")
    if not raw:
        return [Mode()]
    if raw == "all":
        return list(ALL_MODES)
    by_id = {v: k for k, v in _MODE_IDS.items()}
    try:
        return [by_id[part.strip()] for part in raw.split(",") if part.strip()]
    except KeyError as e:
        raise pytest.UsageError(f"--vfio-modes: unknown mode {e.args[0]!r} (choose from "
                                f"all, {', '.join(by_id)})") from None


# -- fixtures -----------------------------------------------------------------------------

@dataclass
class _Context:
    """One test's emulated kernel and what it found."""

    kernel: Kernel
    driver: Driver | None = None
    findings: list[Report] = field(default_factory=list)
    done: bool = False

    def finish(self) -> list[Report]:
        """Unload the driver, let pending releases run, ask the kernel (once)."""
        if not self.done:
            self.done = True
            try:
                if self.driver is not None:
                    self.kernel.flush()
                    self.driver.exit_module(self.kernel)
                self.kernel.flush()
            finally:
                self.findings = [r for r in self.kernel.findings() + self.kernel.leak_check()
                                 if r.kind != "info"]
        return self.findings


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test using vfio_kernel runs once per --vfio-modes mode (one mode by default)."""
    if "vfio_mode" in metafunc.fixturenames:
        modes = _modes(metafunc.config)
        if len(modes) > 1 and not _marked_mode(metafunc.definition):
            metafunc.parametrize("vfio_mode", modes, ids=[_MODE_IDS[m] for m in modes],
                                 indirect=True)


def _marked_mode(node: Any) -> bool:
    return bool(node.get_closest_marker("vfio_semantics")
                or node.get_closest_marker("vfio_delayed_release"))


@pytest.fixture
def vfio_mode(request: pytest.FixtureRequest) -> Mode:
    """The mode of this test's kernel: markers first, then --vfio-modes."""
    param = getattr(request, "param", None)
    semantics = request.node.get_closest_marker("vfio_semantics")
    delayed = request.node.get_closest_marker("vfio_delayed_release")
    base = param if isinstance(param, Mode) else _modes(request.config)[0]
    return Mode(semantics.args[0] if semantics else base.semantics,
                True if delayed else base.delayed_release)


@pytest.fixture(scope="session")
def vfio_noop_ns() -> float:
    """Median ns of one cffi no-op call (vfio_emu.bench.baseline): divide by it."""
    return statistics.median(bench.baseline())


@pytest.fixture
def vfio_plugins() -> Plugins:
    """The driver plugins installed (built in and by entry point)."""
    return Plugins()


@pytest.fixture
def vfio_kernel(request: pytest.FixtureRequest, vfio_mode: Mode) -> Iterator[Kernel]:
    """A fresh emulated kernel; its findings decide the test (see the module's doc)."""
    kernel = Kernel(semantics=vfio_mode.semantics, delayed_release=vfio_mode.delayed_release,
                    seed=request.config.getoption("--vfio-seed"), watchdog_s=WATCHDOG_S)
    request.node.stash[_CONTEXT] = _Context(kernel)
    try:
        yield kernel
    finally:
        request.node.stash[_CONTEXT].finish()
        kernel.close()


@pytest.fixture
def vfio_driver(request: pytest.FixtureRequest, vfio_kernel: Kernel,
                vfio_plugins: Plugins) -> Driver:
    """The driver named by the vfio_driver marker (or ini option), loaded into vfio_kernel;
    it is unloaded when the test returns."""
    marker = request.node.get_closest_marker("vfio_driver")
    name = (getattr(request, "param", None)  # @pytest.mark.parametrize(..., indirect=True)
            or (marker.args[0] if marker else request.config.getini("vfio_driver")))
    if not name:
        raise pytest.UsageError("vfio_driver: name the driver with @pytest.mark.vfio_driver"
                                "('name') or the vfio_driver ini option")
    driver = vfio_plugins.driver(name)
    ret = driver.init_module(vfio_kernel)
    if ret:
        pytest.fail(f"module init of {name} failed: {ret}")
    request.node.stash[_CONTEXT].driver = driver
    return driver


# -- findings decide the test --------------------------------------------------------------

def _expected(item: pytest.Item) -> list[tuple[str, str]]:
    return [(m.args[0], m.kwargs.get("match", m.args[1] if len(m.args) > 1 else ""))
            for m in item.iter_markers("vfio_expect")]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    context = item.stash.get(_CONTEXT, None)
    if context is None or call.when != "call":
        return report
    if report.failed and "Timeout" in str(report.longrepr):  # pytest-timeout fired
        report.sections.append(("vfio-emu: who holds what at the timeout",
                                holders_report(context.kernel)))
    findings = context.finish()
    expected = _expected(item)
    unmet = [(kind, match) for kind, match in expected
             if not any(r.kind == kind and match in r.title for r in findings)]
    findings = [r for r in findings
                if not any(r.kind == kind and match in r.title for kind, match in expected)]
    if findings:
        where = (driver_frame([st for r in findings for _, st in r.stacks],
                              context.driver.source_files) if context.driver else "")
        report.sections.append(("vfio-emu", (f"first driver frame: {where}\n" if where else "")
                                + "\n".join(str(r) for r in findings)))
        report.user_properties.append(("vfio_emu_findings", [r.title for r in findings]))
    if report.passed and unmet:
        report.outcome = "failed"
        report.longrepr = "vfio_expect: the kernel did not report " + ", ".join(
            f"{kind} matching {match!r}" for kind, match in unmet)
    elif report.passed and findings:
        report.outcome = "failed"
        report.longrepr = "vfio-emu: the emulated kernel reported:\n" + "\n".join(
            str(r) for r in findings)
        if all(r.kind == "leak" for r in findings):
            setattr(report, _LEAKED, True)
    return report


def pytest_report_teststatus(report: pytest.TestReport, config: pytest.Config
                             ) -> tuple[str, str, str] | None:
    if report.when == "call" and getattr(report, _LEAKED, False):
        return "leaked", "L", "LEAKED"
    return None


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int,
                            config: pytest.Config) -> None:
    lines = []
    for category in ("failed", "leaked"):
        for report in terminalreporter.stats.get(category, []):
            titles = [v for k, v in getattr(report, "user_properties", ())
                      if k == "vfio_emu_findings"]
            for title in (titles[0] if titles else []):
                lines.append(f"{report.nodeid}: {title}")
    if lines:
        terminalreporter.section("vfio-emu findings")
        for line in lines:
            terminalreporter.write_line(line)


# -- the check battery as tests --------------------------------------------------------------

class VfioCheckFailure(Exception):
    """A scenario of the battery failed: its verdict, as `vfio-emu check` prints it."""


class VfioCheckItem(pytest.Item):
    """One driver x mode x scenario of the battery."""

    def __init__(self, *, driver: str, mode: Mode, scenario: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.driver_name, self.mode, self.scenario = driver, mode, scenario

    def runtest(self) -> None:
        driver = Plugins(strict=False).driver(self.driver_name)
        verdict = _run_scenario(driver, self.scenario, self.mode,
                                seed=self.config.getoption("--vfio-seed"))
        if verdict.status == NOT_APPLICABLE:
            pytest.skip(f"not applicable: {verdict.note}")
        if verdict.status == FAIL:
            raise VfioCheckFailure(_describe(verdict))
        if verdict.status == KNOWN:
            self.user_properties.append(("vfio_emu_known", verdict.note))

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException],
                     style: Any = None) -> str:
        if isinstance(excinfo.value, VfioCheckFailure):
            return str(excinfo.value)
        return str(super().repr_failure(excinfo))

    def reportinfo(self) -> tuple[Any, int | None, str]:
        return self.path, None, f"vfio-emu check {self.driver_name}: {self.scenario}"


def _describe(v: Verdict) -> str:
    lines = [f"{v.driver}: {v.scenario} ({v.mode}) FAILED"]
    lines += [f"  {line}" for line in v.findings]
    if v.where:
        lines.append(f"first driver frame: {v.where}")
    if v.injected:
        lines.append(f"injected: {v.injected}")
    lines.append(f"replay: {v.replay()}")
    lines += [str(r) for r in v.reports]
    return "\n".join(lines)


class VfioCheckCollector(pytest.Collector):
    """The battery of every driver named by --vfio-check (or the vfio_check ini option)."""

    def collect(self) -> list[pytest.Item | pytest.Collector]:
        names = list(self.config.getoption("--vfio-check")) or list(
            self.config.getini("vfio_check"))
        plugins = Plugins(strict=False)
        items: list[pytest.Item | pytest.Collector] = []
        for name in names:
            if name not in plugins.drivers:
                raise pytest.UsageError(f"--vfio-check: no driver named {name!r} "
                                        f"({plugins.errors.get(name, 'not installed')})")
            for mode in _modes(self.config):
                for scenario in _scenario_names(plugins.driver(name), mode,
                                                seed=self.config.getoption("--vfio-seed")):
                    items.append(VfioCheckItem.from_parent(
                        self, name=f"{name}[{_MODE_IDS.get(mode, str(mode))}]::{scenario}",
                        driver=name, mode=mode, scenario=scenario))
        return items


@pytest.hookimpl(tryfirst=True)  # before -k and -m deselect
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config,
                                  items: list[pytest.Item]) -> None:
    if not (config.getoption("--vfio-check") or config.getini("vfio_check")):
        return
    collector = VfioCheckCollector.from_parent(session, name="vfio-check")
    items.extend(item for item in collector.collect() if isinstance(item, pytest.Item))
