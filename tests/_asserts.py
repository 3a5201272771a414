"""What an emulated Kernel recorded, asserted: its reports, WARNs, leaks and trace.

Shared by the tests of the emulated kernel (tests/linux/); BOTH runs a test under
both semantics.  (A helper module, not conftest: no test imports a conftest.)
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from vfio_emu.linux.kernel import Kernel
from vfio_emu.report import Report

BOTH = pytest.mark.parametrize("semantics", ["v6.1", "v6.2"])


def assert_clean(k: Kernel) -> None:
    """No report, no WARN (kernel or refcount) and nothing leaked."""
    assert k.reports == [], "\n".join(map(str, k.reports))
    assert [str(w) for w in k.arena.dmesg()] == []
    leaks = k.leak_check()
    assert leaks == [], "\n".join(map(str, leaks))


def reports_of(k: Kernel, kind: str) -> list[Report]:
    return [r for r in k.reports if r.kind == kind]


def only_report(k: Kernel, kind: str) -> Report:
    found = reports_of(k, kind)
    assert len(found) == 1, f"expected one {kind!r} report, got:\n" + "\n".join(
        map(str, k.reports))
    return found[0]


def stack_text(rep: Report, heading_prefix: str) -> str:
    found = [str(s) for h, s in rep.stacks if h.startswith(heading_prefix)]
    assert found, f"no stack headed {heading_prefix!r} in {[h for h, _ in rep.stacks]}"
    return found[0]


def dmesg_kinds(k: Kernel) -> list[str]:
    return [w.kind for w in k.arena.dmesg()]


def ops_of(k: Kernel, device: str = "vfio0") -> list[str]:
    return [e.op for e in k.trace.events if e.device == device]


def in_order(seq: Sequence[str], expected: Sequence[str]) -> bool:
    """Whether expected is a subsequence of seq (in order, gaps allowed)."""
    it = iter(seq)
    return all(any(x == want for x in it) for want in expected)


def leak_titles(k: Kernel) -> list[str]:
    return [r.title for r in k.leak_check()]
