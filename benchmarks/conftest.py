"""Ratio table for the primitive benchmarks: ns per call and x the cffi no-op, from one run.

Absolute nanoseconds drift by up to ~1.5x between runs on a shared machine; ratios
to a no-op measured in the same process hold far better.
So every benchmark reports through the ``measure`` fixture, which knows how many
calls (or pairs, objects, round trips) one benchmarked run makes, and the
session ends with a table of ns per unit, x the no-op, and the project's targets.

Real run (about 25 s; also `make bench`)::

    python -m pytest benchmarks --benchmark-enable -p no:cacheprovider

Add ``--ratios-json PATH`` (or set VFIO_EMU_RATIOS_JSON=PATH) to also write the
table as JSON.  With the default ``--benchmark-disable`` every benchmark runs once,
as a correctness check, and nothing is printed.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable, Generator, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import cffi
import pytest
from pytest_benchmark import __version__ as pytest_benchmark_version
from pytest_benchmark.fixture import BenchmarkFixture

#: The key of the benchmark every ratio divides by.
BASELINE = "noop"
RATIOS_ENV = "VFIO_EMU_RATIOS_JSON"


@dataclass(frozen=True)
class Row:
    """One benchmark, scaled from "per benchmarked run" down to one unit (call, pair...)."""

    key: str
    label: str
    group: str | None
    unit: str
    per: int  # units in one benchmarked run: the inner loop
    rounds: int
    iterations: int
    median_ns: float
    min_ns: float
    iqr_ns: float


@dataclass(frozen=True)
class Target:
    """A performance goal: median(num) / median(den) <= limit, both from this run."""

    name: str
    num: str
    den: str
    limit: float

    def ratio(self, rows: dict[str, Row]) -> float | None:
        if self.num not in rows or self.den not in rows:
            return None
        return rows[self.num].median_ns / rows[self.den].median_ns


TARGETS = (
    Target("bare get C.refcount_inc / no-op", "refcount_inc", BASELINE, 1.1),
    Target("bare put C.refcount_dec_and_test / no-op", "refcount_dec_and_test", BASELINE, 1.1),
    Target("Kref.get() / no-op", "kref_get", BASELINE, 1.5),
    Target("Kref.put() / no-op", "kref_put", BASELINE, 1.5),
    Target("Kref get+put pair / Lock counter pair", "kref_pair", "lock_pair", 1 / 3),
    Target("batch N=100 / pure-C loop (per pair)", "kref_pairs_100", "kref_pairs_c", 1.3),
    Target("batch N=1000 / pure-C loop (per pair)", "kref_pairs_1000", "kref_pairs_c", 1.3),
    Target("per-driver release dispatch / direct pluggy call", "release_dispatch",
           "pluggy_direct", 1.3),
)

_ROWS = pytest.StashKey[list[Row]]()
_REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()


class Measure:
    """The benchmark fixture, plus the key, label and units per run the table needs."""

    def __init__(self, benchmark: BenchmarkFixture) -> None:
        self.benchmark = benchmark
        self._spec: tuple[str, str, int, str] | None = None

    def __call__(self, fn: Callable[[], object], *, key: str, label: str, per: int,
                 unit: str = "call") -> None:
        """Benchmark fn (which runs `per` units), with pytest-benchmark's calibration."""
        self._describe(key, label, per, unit)
        self.benchmark(fn)

    def pedantic(self, fn: Callable[[], object], *, key: str, label: str, per: int, unit: str,
                 rounds: int, warmup_rounds: int = 0) -> None:
        """Benchmark fn a fixed number of times: for runs too slow or stateful to calibrate."""
        self._describe(key, label, per, unit)
        self.benchmark.pedantic(  # type: ignore[no-untyped-call]
            fn, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)

    def _describe(self, key: str, label: str, per: int, unit: str) -> None:
        self._spec = (key, label, per, unit)
        # Also lands in --benchmark-json output, so raw results can be rescaled later.
        self.benchmark.extra_info.update(key=key, unit=unit, per=per)

    def row(self) -> Row | None:
        """The scaled result, or None if nothing was timed (benchmarks disabled)."""
        meta = self.benchmark.stats
        if self._spec is None or meta is None or not meta.stats.rounds:
            return None
        key, label, per, unit = self._spec
        s = meta.stats
        scale = 1e9 / per
        return Row(key, label, self.benchmark.group, unit, per, s.rounds, meta.iterations,
                   s.median * scale, s.min * scale, s.iqr * scale)


@pytest.fixture
def measure(benchmark: BenchmarkFixture, request: pytest.FixtureRequest) -> Iterator[Measure]:
    """Like `benchmark`; records the result for the ratio table if the test passed."""
    m = Measure(benchmark)
    yield m
    report = request.node.stash.get(_REPORTS, {}).get("call")
    row = m.row()
    if row is not None and report is not None and report.passed:
        request.config.stash.setdefault(_ROWS, []).append(row)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[
        None, Any, None]:
    """Keep each phase's report on the item, so `measure` records only checked results."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    item.stash.setdefault(_REPORTS, {})[report.when] = report


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--ratios-json", metavar="PATH", default=None,
                     help=f"also write the benchmark ratio table as JSON to PATH "
                          f"(default: ${RATIOS_ENV} if set)")


#: The same no-op measured again as the run's last benchmark.
BASELINE_AGAIN = "noop_last"


def _table(rows: list[Row]) -> dict[str, Any]:
    by_key = {row.key: row for row in rows}
    # The faster of the first and the last no-op is the baseline: a slow (cold)
    # baseline would flatter every ratio, a fast one can only make them worse.
    bases = [by_key[k] for k in (BASELINE, BASELINE_AGAIN) if k in by_key]
    base = min(bases, key=lambda row: row.median_ns) if bases else None
    if base is not None:
        by_key[BASELINE] = base
    base_ns = base.median_ns if base is not None else None
    out_rows = []
    for row in rows:
        d = asdict(row)
        d["ratio_to_noop"] = row.median_ns / base_ns if base_ns else None
        out_rows.append(d)
    targets = []
    for t in TARGETS:
        r = t.ratio(by_key)
        targets.append({"name": t.name, "num": t.num, "den": t.den, "limit": t.limit,
                        "ratio": r, "status": "n/a" if r is None else
                        ("PASS" if r <= t.limit else "MISS")})
    return {"baseline": base.key if base is not None else BASELINE, "baseline_ns": base_ns,
            "rows": out_rows, "targets": targets}


def _lines(table: dict[str, Any]) -> list[str]:
    lines = [f"{'group':<10} {'benchmark':<52} {'unit':<10} {'median ns':>10} {'IQR %':>6} "
             f"{'x no-op':>8}"]
    for r in table["rows"]:
        ratio = "-" if r["ratio_to_noop"] is None else f"{r['ratio_to_noop']:.2f}"
        iqr = 100 * r["iqr_ns"] / r["median_ns"] if r["median_ns"] else 0.0
        lines.append(f"{r['group'] or '':<10} {r['label']:<52} {r['unit']:<10} "
                     f"{r['median_ns']:>10.2f} {iqr:>6.1f} {ratio:>8}")
    lines += ["", f"{'target':<52} {'limit':>7} {'ratio':>7}  result"]
    for t in table["targets"]:
        ratio = "-" if t["ratio"] is None else f"{t['ratio']:.3f}"
        lines.append(f"{t['name']:<52} {'<= ' + format(t['limit'], '.3g'):>7} {ratio:>7}  "
                     f"{t['status']}")
    return lines


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """After pytest-benchmark's own table: ns per unit and ratios (nothing if disabled)."""
    rows = config.stash.get(_ROWS, [])
    if not rows:
        return
    table = _table(rows)
    tr = terminalreporter
    tr.write_sep("-", "vfio-emu primitives: median ns per unit, x cffi no-op (same run)")
    for line in _lines(table):
        tr.write_line(line)
    path = config.getoption("--ratios-json", None) or os.environ.get(RATIOS_ENV)
    if path:
        table["environment"] = {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "python": f"{platform.python_implementation()} {platform.python_version()}",
            "cffi": cffi.__version__,
            "pytest_benchmark": pytest_benchmark_version,
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "args": list(config.invocation_params.args),
        }
        Path(path).write_text(json.dumps(table, indent=2) + "\n")
        tr.write_line(f"ratio table written to {path}")
