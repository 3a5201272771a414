"""The cost of per-driver dispatch against one direct pluggy hook call, in the same run.

A driver's ops->release goes through its own plugin manager (that driver and
the observers only); the baseline is a plain PluginManager with one implementation of
the same hook, called directly.  Both implementations do nothing, so only
the dispatch is measured.  Two other drivers are loaded, as in real use.
"""

from __future__ import annotations

from itertools import repeat
from typing import TYPE_CHECKING

import pluggy
import pytest

from vfio_emu.plugins import hookspecs
from vfio_emu.plugins.hookspecs import hookimpl
from vfio_emu.plugins.manager import Plugins

if TYPE_CHECKING:
    from conftest import Measure

LOOP = 1000


class Quiet:
    """A driver whose ops do nothing: what is left is the dispatch."""

    def __init__(self) -> None:
        self.released = 0

    @hookimpl
    def release(self, vdev: object) -> None:
        self.released += 1

    @hookimpl
    def probe(self, kernel: object, driver: object, dev: object) -> int:
        return 0


@pytest.mark.benchmark(group="plugins")
def test_release_dispatch_to_one_driver(measure: Measure) -> None:
    p = Plugins(builtins=(), load_entrypoints=False)
    drivers = [Quiet() for _ in range(3)]
    for i, d in enumerate(drivers):
        p.register(d, f"quiet{i}")
    release = p.driver("quiet0").ops.release
    token = object()

    def run() -> None:
        for _ in repeat(None, LOOP):
            release(token)

    measure(run, key="release_dispatch", label="driver ops->release (per-driver manager)",
            per=LOOP)
    assert drivers[0].released > 0 and drivers[1].released == drivers[2].released == 0


@pytest.mark.benchmark(group="plugins")
def test_direct_pluggy_call_with_one_impl(measure: Measure) -> None:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    only = Quiet()
    pm.register(only, "only")
    hook = pm.hook.release
    token = object()

    def run() -> None:
        for _ in repeat(None, LOOP):
            hook(vdev=token)

    measure(run, key="pluggy_direct", label="pm.hook.release(vdev=...) with one impl", per=LOOP)
    assert only.released > 0
