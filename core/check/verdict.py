"""A verdict: one driver through one scenario in one mode, as data.

The CLI prints verdicts and the tests assert on them.  A verdict says what
was injected, what the emulated kernel reported, where in the driver's own
code it went wrong, and the command that replays it.
"""

from __future__ import annotations

import functools
import linecache
import os.path
import re
import shlex
from dataclasses import dataclass, field

from vfio_emu.linux.kernel import SEMANTICS, UNREGISTER_ORDERS
from vfio_emu.report import Report

#: The outcomes of a scenario run.
OK, FAIL, NOT_APPLICABLE, KNOWN = "ok", "FAIL", "n/a", "known"


@dataclass(frozen=True)
class Mode:
    """The kernel a scenario runs in: semantics, DEBUG_KOBJECT_RELEASE, unregister order."""

    semantics: str = "v6.1"
    delayed_release: bool = False
    unregister_order: str = "v6.1"

    def __post_init__(self) -> None:
        if self.semantics not in SEMANTICS:
            raise ValueError(f"semantics={self.semantics!r}: choose one of {SEMANTICS}")
        if self.unregister_order not in UNREGISTER_ORDERS:
            raise ValueError(f"unregister_order={self.unregister_order!r}: choose one of "
                             f"{UNREGISTER_ORDERS}")

    def __str__(self) -> str:
        return ", ".join([self.semantics]
                         + (["delayed release"] if self.delayed_release else [])
                         + ([f"{self.unregister_order} unregister order"]
                            if self.unregister_order != "v6.1" else []))

    def flags(self) -> list[str]:
        """The CLI options that select this mode."""
        return (["--semantics", self.semantics]
                + (["--delayed-release"] if self.delayed_release else [])
                + (["--unregister-order", self.unregister_order]
                   if self.unregister_order != "v6.1" else []))


#: The four kernels --all-modes runs: v6.1 and v6.2, each with and without delayed release.
ALL_MODES = (Mode("v6.1"), Mode("v6.1", True), Mode("v6.2"), Mode("v6.2", True))


@dataclass
class Verdict:
    """One driver through one scenario: ok, FAIL, n/a (a step it never takes) or known."""

    driver: str
    scenario: str
    mode: Mode = field(default_factory=Mode)
    seed: int = 0
    status: str = OK
    reports: list[Report] = field(default_factory=list)
    error: str = ""  # an exception no report stands for (a driver's own bug, or a hang)
    where: str = ""  # the first frame in the driver's own code: "file:line: source"
    injected: str = ""  # what was made to fail, and where
    note: str = ""  # e.g. why a step is not applicable, or the known finding's reason
    timeline: list[str] = field(default_factory=list)
    schedule: str = ""  # an explored run's schedule (vfio-emu explore --replay)

    @property
    def passed(self) -> bool:
        return self.status != FAIL

    @property
    def findings(self) -> list[str]:
        """One line per finding: the error, then each report's kind and title."""
        return ([self.error] if self.error else []) + [f"{r.kind}: {r.title}"
                                                        for r in self.reports]

    def replay(self) -> str:
        """The command that runs this scenario again, in this mode, with this seed (an
        explored run: with its schedule)."""
        if self.schedule:
            return shlex.join(["vfio-emu", "explore", self.driver, "--scenario", self.scenario,
                               *self.mode.flags(), "--replay", self.schedule])
        return shlex.join(["vfio-emu", "check", self.driver, "--scenario", self.scenario,
                           *self.mode.flags(), "--seed", str(self.seed)])


_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+)')


@functools.lru_cache(maxsize=1024)
def _realpath(path: str) -> str:
    """os.path.realpath of a stack's file, once per file (a verdict of every run asks)."""
    return os.path.realpath(path)


def driver_frame(texts: list[str], files: frozenset[str]) -> str:
    """The innermost frame of the driver's own files in these stacks (formatted Python call
    traces, outermost first), with its source line: where the driver author looks first."""
    if not files:
        return ""
    for text in texts:
        hits = [m for m in _FRAME.finditer(text) if _realpath(m["file"]) in files]
        if hits:
            last = hits[-1]
            path, line = last["file"], int(last["line"])
            source = linecache.getline(path, line).strip()
            return f"{os.path.basename(path)}:{line}: {source}" if source else \
                f"{os.path.basename(path)}:{line}"
    return ""
