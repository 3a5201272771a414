"""`vfio-emu bench`: the primitives' cost against the peers a user would pick, put -> release
overhead, scaling curves, a chart, and a regression gate - all as ratios to a cffi no-op
measured in the same run, since a shared machine drifts more than any of these figures.

Every figure is the per-unit time of a loop of `per` units, sampled `rounds` times; the
baseline (a bare cffi call of the project's own no-op) is measured the same way, first
and last, and the faster of the two is used.  `measure()` and `baseline()` are the public
API a driver author benchmarks their own code with.
"""

from __future__ import annotations

import itertools
import json
import math
import multiprocessing
import os
import platform
import random
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from vfio_emu import __version__
from vfio_emu.check.scenarios import PCI_NAME, PciOps
from vfio_emu.check.scenarios import probe as generic_probe
from vfio_emu.check.scenarios import remove as generic_remove
from vfio_emu.check.verdict import Mode
from vfio_emu.explore import RACES, RandomWalk, run_race
from vfio_emu.linux.kernel import Kernel
from vfio_emu.linux.vfio import vfio_group_get_device_fd
from vfio_emu.plugins.hookspecs import hookimpl
from vfio_emu.plugins.manager import Plugins
from vfio_emu.shm import _binding as C
from vfio_emu.shm.arena import Arena

#: The key of the figure every ratio divides by.
BASELINE = "noop"


@dataclass
class Figure:
    """One measured thing: ns per unit, one sample per round."""

    key: str
    label: str
    group: str
    unit: str
    samples: list[float] = field(default_factory=list)
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else math.nan

    def ratio(self, baseline: float) -> float:
        return self.median / baseline if baseline else math.nan


def measure(fn: Callable[[], object], *, per: int = 1000, rounds: int = 15,
            warmup: int = 1) -> list[float]:
    """Nanoseconds per call of fn(), one sample per round of `per` calls in a plain loop."""
    samples = []
    for r in range(warmup + rounds):
        start = time.perf_counter_ns()
        for _ in range(per):
            fn()
        elapsed = time.perf_counter_ns() - start
        if r >= warmup:
            samples.append(elapsed / per)
    return samples


def baseline(*, per: int = 1000, rounds: int = 15) -> list[float]:
    """The cffi no-op measured as measure() measures: what every ratio divides by."""
    with Arena.create(capacity=4) as arena:
        h = arena.kref()._h
        noop = C.noop
        return measure(lambda: noop(h), per=per, rounds=rounds)


def _loop(body: Callable[[int], None], per: int, rounds: int) -> list[float]:
    """Like measure(), for a body that runs `per` units itself (a loop written out in the
    caller, or one C call), so no Python frame per unit is counted."""
    samples = []
    for r in range(rounds + 1):
        start = time.perf_counter_ns()
        body(per)
        elapsed = time.perf_counter_ns() - start
        if r:
            samples.append(elapsed / per)
    return samples


# -- the primitives and their peers -------------------------------------------------------

def _pair(k: Any) -> Callable[[], None]:
    get, put = k.get, k.put

    def pair() -> None:
        get()
        put()
    return pair


def _batches(h: Any, n: int) -> Callable[[int], None]:
    def run(m: int) -> None:
        for _ in range(m // n or 1):
            C.kref_pairs(h, n)
    return run


class _LockCounter:
    def __init__(self) -> None:
        self.lock, self.n = threading.Lock(), 0

    def pair(self) -> None:
        with self.lock:
            self.n += 1
        with self.lock:
            self.n -= 1


def primitives(per: int, rounds: int) -> list[Figure]:
    out = []
    with Arena.create(capacity=16) as arena:
        k = arena.kref()
        h = k._h
        inc, dec, noop = C.refcount_inc, C.refcount_dec_and_test, C.noop
        comp = arena.completion()

        def fig(key: str, label: str, group: str, unit: str, samples: list[float],
                note: str = "") -> None:
            out.append(Figure(key, label, group, unit, samples, note))

        fig("noop", "cffi no-op (the baseline)", "crossing", "call",
            measure(lambda: noop(h), per=per, rounds=rounds))
        fig("bare_get", "bare get: refcount_inc(h)", "single", "call",
            measure(lambda: inc(h), per=per, rounds=rounds))
        k.get_many(per * (rounds + 2))
        fig("bare_put", "bare put: refcount_dec_and_test(h)", "single", "call",
            measure(lambda: dec(h), per=per, rounds=rounds))
        fig("kref_get", "Kref.get()", "single", "call", measure(k.get, per=per, rounds=rounds))
        fig("kref_put", "Kref.put()", "single", "call", measure(k.put, per=per, rounds=rounds))
        fig("kref_pair", "Kref.get() + Kref.put()", "pair", "pair",
            measure(_pair(k), per=per, rounds=rounds))
        for n in (1, 100, 1000):
            fig(f"batch_{n}", f"kref_pairs(h, {n}): one C call of N pairs", "batch", "pair",
                _loop(_batches(h, n), per=max(per, n), rounds=rounds))

        def complete_pair() -> None:
            comp.complete()
            comp.try_wait_for_completion()
        fig("complete_pair", "complete() + try_wait_for_completion()", "pair", "pair",
            measure(complete_pair, per=per, rounds=rounds))
        counter = _LockCounter()
        fig("lock_pair", "threading.Lock counter get + put (process-local)", "peers", "pair",
            measure(counter.pair, per=per, rounds=rounds))
        value = multiprocessing.Value("i", 0)

        def mp_pair() -> None:
            with value.get_lock():
                value.value += 1
            with value.get_lock():
                value.value -= 1
        fig("mp_value_pair", "multiprocessing.Value with its lock, get + put (shared)",
            "peers", "pair", measure(mp_pair, per=max(per // 10, 10), rounds=rounds))
        out += _optional_peers(per, rounds)
        fig("noop_last", "cffi no-op again, last (drift check)", "crossing", "call",
            measure(lambda: noop(h), per=per, rounds=rounds))
    return out


def _optional_peers(per: int, rounds: int) -> list[Figure]:
    """Peers that may not be installed: each is measured, or listed with why it is not."""
    out = []
    try:
        import atomicx

        ai = atomicx.AtomicInt()

        def ax_pair() -> None:
            ai.inc()
            ai.dec()
        out.append(Figure("atomicx_pair", "atomicx.AtomicInt inc + dec (process-local)",
                          "peers", "pair", measure(ax_pair, per=per, rounds=rounds)))
    except ImportError:
        out.append(Figure("atomicx_pair", "atomicx.AtomicInt", "peers", "pair",
                          note="not installed (pip install atomicx)"))
    try:
        from multiprocessing import shared_memory

        import atomics

        shm = shared_memory.SharedMemory(create=True, size=8)
        try:
            assert shm.buf is not None
            with atomics.atomicview(buffer=shm.buf[:4], atype=atomics.INT) as a:
                def inc_dec() -> None:
                    a.inc()
                    a.dec()
                out.append(Figure("atomics_pair", "atomics atomicview on shared_memory, "
                                  "inc + dec", "peers", "pair",
                                  measure(inc_dec, per=per, rounds=rounds)))
        finally:
            shm.close()
            shm.unlink()
    except ImportError:
        out.append(Figure("atomics_pair", "atomics on shared_memory", "peers", "pair",
                          note="not installed (pip install atomics)"))
    return out


# -- put -> release -------------------------------------------------------------------------

class _Quiet:
    """An observer with a no-op wrapper on release: what each loaded plugin costs."""

    @hookimpl(wrapper=True)
    def release(self, vdev: Any) -> Any:
        return (yield)


def release_paths(per: int, rounds: int) -> list[Figure]:
    out = []
    with Arena.create(capacity=16) as arena:
        k = arena.kref()
        count = k.refcount
        released: list[object] = []

        def last_put() -> None:
            count.set(1)
            k.put(released.append)

        def not_last_put() -> None:
            count.set(2)
            k.put(released.append)

        out.append(Figure("kref_last_put", "Kref.put() that drops the last reference and "
                          "runs a release callback (+ a set)", "release", "put",
                          measure(last_put, per=per, rounds=rounds)))
        out.append(Figure("kref_other_put", "the same put when it is not the last (+ a set)",
                          "release", "put", measure(not_last_put, per=per, rounds=rounds)))
    cycles = max(per // 50, 5)
    out.append(Figure("cycle_direct", "probe -> open -> close -> remove -> release -> free, "
                      "ops called directly", "release", "cycle", _direct(cycles, rounds)))
    for name in ("pci", "mtty", "ap", "ccw"):
        out.append(Figure(f"cycle_{name}", f"the same through the {name} driver plugin",
                          "release", "cycle", _cycles(name, 0, cycles, rounds)))
    for observers in (1, 10):
        out.append(Figure(f"cycle_pci_{observers}_observers",
                          f"the same through pci, {observers} observer plugin(s) loaded",
                          "release", "cycle", _cycles("pci", observers, cycles, rounds)))
    return out


def _direct(per: int, rounds: int) -> list[float]:
    with Kernel(capacity=64) as kernel:
        ops = PciOps(kernel)

        def cycle() -> None:
            vdev = generic_probe(kernel, ops)
            assert not isinstance(vdev, int)
            fd = vfio_group_get_device_fd(kernel, PCI_NAME)
            assert not isinstance(fd, int)
            fd.close()
            generic_remove(vdev)
        return measure(cycle, per=per, rounds=rounds)


def _cycles(driver_name: str, observers: int, per: int, rounds: int) -> list[float]:
    """bind, open, close, unbind of one driver, with `observers` no-op observers loaded."""
    plugins = Plugins(builtins=(f"vfio_emu.plugins.{driver_name}",), load_entrypoints=False)
    for i in range(observers):
        plugins.register(_Quiet(), f"observer-{i}")
    driver = plugins.driver(driver_name)
    with Kernel(capacity=256) as kernel:
        kernel.kvm = "kvm"
        if driver.init_module(kernel):
            return []
        names = iter(range(1 << 30))

        def cycle() -> None:
            name = f"0000:00:{next(names) % 32:02x}.0"
            dev = driver.bind(kernel, name)
            fd = vfio_group_get_device_fd(kernel, name)
            assert not isinstance(fd, int)
            fd.close()
            driver.unbind(kernel, dev)
        try:
            return measure(cycle, per=per, rounds=rounds)
        finally:
            kernel.flush()
            driver.exit_module(kernel)


# -- scaling ---------------------------------------------------------------------------------

def scaling(quick: bool, per: int, rounds: int) -> list[Figure]:
    out = []
    sizes = (1, 1_000, 10_000) if quick else (1, 1_000, 100_000, 1_000_000)
    for n in sizes:
        with Arena.create(capacity=max(n, 1)) as arena:
            krefs = [arena.kref() for _ in range(n)]
            k = krefs[-1]
            out.append(Figure(f"live_{n}", f"Kref pair with {n:,} live objects in the arena",
                              "scaling", "pair",
                              measure(_pair(k), per=per, rounds=rounds)))
            del krefs
    cores = os.cpu_count() or 1
    for procs in sorted({1, 2, cores}):
        for shared in (True, False):
            what = "one object" if shared else "an object each"
            out.append(Figure(
                f"procs_{procs}_{'same' if shared else 'separate'}",
                f"{procs} process(es) of C get+put pairs on {what}",
                "scaling", "pair", _hammer(procs, shared, 200_000 if quick else 2_000_000,
                                           max(rounds // 3, 3))))
    return out


def _hammer_child(name: str, token: Any, n: int, start: Any, out: Any) -> None:
    arena = Arena.attach(name)
    k = arena.open(token)
    start.wait()
    t0 = time.perf_counter_ns()
    C.kref_pairs(k._h, n)
    out.put((time.perf_counter_ns() - t0) / n)
    arena.close()


def _hammer(procs: int, shared: bool, n: int, rounds: int) -> list[float]:
    """ns per pair per process, while `procs` processes hammer one object or their own."""
    ctx = multiprocessing.get_context("fork")
    samples = []
    with Arena.create(capacity=procs + 4) as arena:
        objects = [arena.kref() for _ in range(1 if shared else procs)]
        for _ in range(rounds):
            start, results = ctx.Event(), ctx.Queue()
            children = [ctx.Process(target=_hammer_child, args=(
                arena.name, objects[0 if shared else i].token, n, start, results))
                for i in range(procs)]
            for c in children:
                c.start()
            start.set()
            per_proc = [results.get(timeout=120) for _ in children]
            for c in children:
                c.join()
            samples.append(statistics.mean(per_proc))
    return samples


# -- the whole run, its output and the regression gate -----------------------------------

# -- exploration ---------------------------------------------------------------------------

def exploration(quick: bool, rounds: int) -> list[Figure]:
    """One random schedule of each of a driver's races in turn (vfio-emu explore's unit of
    work, in this process): how many schedules a second the explorer gets through."""
    out = []
    per = 5 if quick else 20
    for name in ("pci", "mtty", "ap", "ccw"):
        driver = Plugins(builtins=(f"vfio_emu.plugins.{name}",), load_entrypoints=False
                         ).driver(name)
        races = itertools.cycle(list(RACES.values()))
        rng = random.Random(0)

        def one(driver: Any = driver, races: Any = races, rng: random.Random = rng) -> None:
            run_race(driver, next(races), Mode(), policy=RandomWalk(rng))
        label = f"one random schedule of one of {name}'s races (each in turn), judged"
        out.append(Figure(f"explore_{name}", label, "explore", "schedule",
                          measure(one, per=per, rounds=max(rounds // 3, 3))))
    return out


def run(quick: bool = False) -> list[Figure]:
    per, rounds = (500, 7) if quick else (2000, 21)
    figures = primitives(per, rounds) + release_paths(per, rounds) + scaling(quick, per, rounds)
    return figures + exploration(quick, rounds)


def baseline_of(figures: Sequence[Figure]) -> float:
    noops = [f.median for f in figures if f.key in ("noop", "noop_last") and f.samples]
    return min(noops) if noops else math.nan


def table(figures: Sequence[Figure]) -> str:
    base = baseline_of(figures)
    rows = [("group", "what", "ns/unit", "x no-op")]
    for f in figures:
        if not f.samples:
            rows.append((f.group, f.label, "-", f.note))
            continue
        rows.append((f.group, f.label, f"{f.median:,.1f}", f"{f.ratio(base):.2f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}"
                     for r in rows)


#: The most one life-cycle transition may cost, in cffi no-ops, with every diagnostic on
#: (KASAN, the stacks, the trace, WARNs, the leak check's bookkeeping).
CYCLE_TARGET = 700
#: The cycle figures the target applies to, and how targets() names them.
CYCLES = {"cycle_direct": "ops called directly",
          **{f"cycle_{name}": f"through {name}" for name in ("pci", "mtty", "ap", "ccw")}}


def targets(figures: Sequence[Figure]) -> str:
    """The project's stated targets, as ratios of figures of this run."""
    med = {f.key: f.median for f in figures if f.samples}
    lines = []
    for peer, label, goal in (("atomicx_pair", "the process-local atomicx pair", 1.0),
                              ("mp_value_pair", "the multiprocessing.Value pair", 0.1)):
        if "kref_pair" in med and peer in med:
            r = med["kref_pair"] / med[peer]
            verdict = "met" if r <= goal else "not met"
            lines.append(f"Kref pair / {label}: {r:.2f} (target <= {goal:g}: {verdict})")
    live = [f.median for f in figures if f.key.startswith("live_") and f.samples]
    if len(live) > 1:
        r = max(live) / min(live)
        lines.append(f"Kref pair across live-object counts, slowest / fastest: {r:.2f} "
                     f"(target <= 1.3: {'met' if r <= 1.3 else 'not met'})")
    base = baseline_of(figures)
    for f in figures:
        if f.samples and f.key in CYCLES and not math.isnan(base):
            r = f.ratio(base)
            lines.append(f"probe -> open -> close -> remove -> release -> free, {CYCLES[f.key]} "
                         f"/ the cffi no-op: {r:.0f} (target <= {CYCLE_TARGET}: "
                         f"{'met' if r <= CYCLE_TARGET else 'not met'})")
    rates = [f"{f.key[8:]} {1e9 / f.median:.0f}" for f in figures
             if f.key.startswith("explore_") and f.samples]
    if rates:
        lines.append("explore, random schedules a second in one process (one worker): "
                     + ", ".join(rates))
    return "\n".join(lines)


def to_json(figures: Sequence[Figure]) -> dict[str, Any]:
    """pytest-benchmark's layout (machine_info, benchmarks with stats), ratios added."""
    base = baseline_of(figures)
    return {
        "machine_info": {"node": platform.node(), "processor": platform.processor(),
                         "python_version": platform.python_version(),
                         "cpu_count": os.cpu_count()},
        "datetime": datetime.now(timezone.utc).isoformat(),
        "version": __version__,
        "benchmarks": [{
            "name": f.key, "fullname": f.label, "group": f.group,
            "params": {"unit": f.unit},
            "extra_info": {"ratio_to_noop": f.ratio(base) if f.samples else None,
                           "note": f.note},
            "stats": ({"min": min(f.samples), "max": max(f.samples), "mean":
                       statistics.mean(f.samples), "median": f.median,
                       "stddev": statistics.pstdev(f.samples), "rounds": len(f.samples),
                       "data": f.samples} if f.samples else None),
        } for f in figures],
    }


def compare(current: dict[str, Any], saved: dict[str, Any], fail_above: float
            ) -> tuple[list[str], bool]:
    """Lines saying how each figure moved (its ratio to the no-op, median against median),
    and whether one is significantly slower (Mann-Whitney U, p < 0.01) by more than
    fail_above percent."""
    old = {b["name"]: b for b in saved.get("benchmarks", []) if b.get("stats")}
    lines, worse = [], False
    for b in current["benchmarks"]:
        if not b.get("stats") or b["name"] not in old or b["name"] in ("noop", "noop_last"):
            continue
        a_r = b["extra_info"]["ratio_to_noop"]
        o_r = old[b["name"]]["extra_info"]["ratio_to_noop"]
        change = (a_r / o_r - 1) * 100 if o_r else math.nan
        p = mann_whitney_p(_scaled(b), _scaled(old[b["name"]]))
        slower = change > fail_above and p < 0.01
        worse = worse or slower
        lines.append(f"{b['name']:<28} {o_r:8.2f} -> {a_r:8.2f} x no-op  {change:+6.1f}%  "
                     f"p={p:.3f}{'  SLOWER' if slower else ''}")
    return lines, worse


def _scaled(bench: dict[str, Any]) -> list[float]:
    """A figure's samples in units of its run's no-op (so two machines' runs compare)."""
    ratio, median = bench["extra_info"]["ratio_to_noop"], bench["stats"]["median"]
    unit = median / ratio if ratio else 1.0
    return [x / unit for x in bench["stats"]["data"]]


def mann_whitney_p(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p of the Mann-Whitney U test, normal approximation (ties averaged)."""
    if not a or not b:
        return 1.0
    ranked = sorted([(x, 0) for x in a] + [(x, 1) for x in b])
    ranks: list[float] = [0.0] * len(ranked)
    i = 0
    while i < len(ranked):
        j = i
        while j + 1 < len(ranked) and ranked[j + 1][0] == ranked[i][0]:
            j += 1
        for k in range(i, j + 1):
            ranks[k] = (i + j) / 2 + 1
        i = j + 1
    r_a = sum(r for r, (_, g) in zip(ranks, ranked, strict=True) if g == 0)
    n1, n2 = len(a), len(b)
    u = r_a - n1 * (n1 + 1) / 2
    mean, sd = n1 * n2 / 2, math.sqrt(n1 * n2 * (n1 + n2 + 1) / 12)
    if sd == 0:
        return 1.0
    z = abs(u - mean) / sd
    return math.erfc(z / math.sqrt(2))


def _chart(figures: Sequence[Figure]) -> Any:
    """A bar chart of the ratios to the no-op, log scale (pygal: pure Python, SVG out)."""
    import pygal

    base = baseline_of(figures)
    chart = pygal.HorizontalBar(logarithmic=True, width=1000, height=40 + 22 * len(figures),
                                title="vfio-emu bench: time per unit, x a cffi no-op call "
                                      "(same run)", show_legend=False)
    shown = [f for f in figures if f.samples]
    chart.x_labels = [f.label for f in shown]
    chart.add("x no-op", [round(f.ratio(base), 3) for f in shown])
    return chart


def svg(figures: Sequence[Figure], path: str) -> None:
    """The chart as SVG."""
    _chart(figures).render_to_file(path)


def png(figures: Sequence[Figure], path: str) -> None:
    """The chart as PNG (pygal renders it through cairosvg, which needs the cairo library)."""
    _chart(figures).render_to_png(path)


def png_unavailable() -> str:
    """Why --png cannot work here ("" if it can): pygal, cairosvg, or cairo itself missing."""
    try:
        import cairosvg  # noqa: F401 - it loads libcairo as it is imported
        import pygal  # noqa: F401
    except (ImportError, OSError) as e:
        return f"{type(e).__name__}: {e}"
    return ""


def write_json(figures: Sequence[Figure], path: str) -> dict[str, Any]:
    data = to_json(figures)
    with open(path, "w") as f:
        json.dump(data, f, indent=2, default=lambda o: asdict(o))
    return data
