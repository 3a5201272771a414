"""The vfio-emu command line: `check` (the drivers), `explore` (their races), `run` (a
scenario), `lkdtm` (refcount), `arenas` (segments and their orphans), `bench`."""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict

from vfio_emu import __version__, bench
from vfio_emu.check import (
    ALL_MODES,
    FAIL,
    KNOWN,
    NOT_APPLICABLE,
    OK,
    Mode,
    Verdict,
    check_driver,
    lkdtm,
)
from vfio_emu.check.isolate import BUDGET_S
from vfio_emu.check.scenarios import SCENARIOS
from vfio_emu.errors import ArenaNotFoundError, EmulatorError
from vfio_emu.explore import RACES, Exploration, Outcome, describe, explore, race_named
from vfio_emu.explore import replay as replay_schedule
from vfio_emu.explore.chrome import write_chrome_trace
from vfio_emu.explore.explorer import CHECK_PREFIX
from vfio_emu.linux.kernel import SEMANTICS, UNREGISTER_ORDERS, Kernel
from vfio_emu.plugins.manager import Driver, Plugins
from vfio_emu.report import Report
from vfio_emu.shm.arena import Arena, segments


def _hex(value: int) -> str:
    return f"{value:#010x}"


def _table(outcomes: list[lkdtm.Outcome]) -> str:
    rows = [("TEST", "START", "FINAL", "WARN", "LKDTM VERDICT", "SELFTEST")]
    for o in outcomes:
        warn = ", ".join(sorted({w.kind for w in o.warns})) or "-"
        rows.append((o.case.name, _hex(o.case.start), _hex(o.final), warn, o.verdict,
                     "ok" if o.passed else "FAIL"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _verbose(o: lkdtm.Outcome) -> str:
    prefix = {"info": "", "warn": "(warn) ", "err": "(err) "}
    lines = [f"lkdtm: Performing direct entry {o.case.name}"]
    lines += [f"lkdtm: {prefix[level]}{text}" for level, text in o.log]
    return "\n".join(lines + [str(w) for w in o.warns])


def _as_json(outcomes: list[lkdtm.Outcome]) -> str:
    return json.dumps(
        [{
            "test": o.case.name,
            "start": o.case.start,
            "final": o.final,
            "returned": o.returned,
            "expect": o.case.expect,
            "verdict": o.verdict,
            "passed": o.passed,
            "log": [{"level": level, "text": text} for level, text in o.log],
            "warns": [{"seq": w.seq, "kind": w.kind, "text": w.text, "pid": w.pid,
                       "old": w.old, "new": w.new, "stack": w.stack} for w in o.warns],
        } for o in outcomes],
        indent=2,
    )


def cmd_lkdtm(args: argparse.Namespace) -> int:
    with Arena.create(capacity=8) as arena:
        try:
            outcomes = lkdtm.run_all(arena, args.case)
        except KeyError as e:
            print(f"vfio-emu lkdtm: {e.args[0]}", file=sys.stderr)
            return 2
    failed = [o for o in outcomes if not o.passed]
    if args.json:
        print(_as_json(outcomes))
        return 1 if failed else 0
    if args.verbose:
        for o in outcomes:
            print(_verbose(o), end="\n\n")
    print(_table(outcomes))
    print()
    print(f"lkdtm refcount: {len(outcomes) - len(failed)} of {len(outcomes)} cases "
          "gave the kernel's verdict" + (f"; FAILED: {', '.join(o.case.name for o in failed)}"
                                         if failed else ""))
    return 1 if failed else 0


#: Report kinds that are the kernel talking, not a finding (dev_warn and the like).
INFORMATIONAL = frozenset({"info"})


def cmd_run(args: argparse.Namespace) -> int:
    scenario = SCENARIOS[args.scenario]
    with Kernel(semantics=args.semantics, delayed_release=args.delayed_release,
                unregister_order=args.unregister_order, seed=args.seed) as kernel:
        error = None
        try:
            scenario.run(kernel)
            kernel.flush()
        except EmulatorError as e:
            error = f"{type(e).__name__}"
        reports = kernel.findings() + kernel.leak_check()
        events = list(kernel.trace.events)
    findings = [r for r in reports if r.kind not in INFORMATIONAL]
    if args.json:
        print(json.dumps({
            "scenario": scenario.name, "semantics": args.semantics,
            "delayed_release": args.delayed_release, "unregister_order": args.unregister_order,
            "stopped_by": error, "events": [e.as_dict() for e in events],
            "reports": [{"kind": r.kind, "title": r.title, "detail": r.detail,
                         "stacks": [{"heading": h, "stack": st} for h, st in r.stacks]}
                        for r in reports],
        }, indent=2))
        return 1 if findings else 0
    print(f"scenario {scenario.name} ({args.semantics}"
          f"{', delayed release' if args.delayed_release else ''}"
          f"{', unlink-first' if args.unregister_order != 'v6.1' else ''}): {scenario.doc}")
    print()
    print("      jiffies  pid         device       operation")
    print("\n".join(str(e) for e in events))
    for r in reports:
        print()
        print(r)
    print()
    if error:
        print(f"stopped by {error}")
    print(f"{len(findings)} report(s)" + (": " + ", ".join(sorted({r.kind for r in findings}))
                                         if findings else ""))
    return 1 if findings else 0


_STATUS_WIDTH = 5
_FOLD = re.compile(r'  File "[^"]*(?:/pluggy/|/vfio_emu/|/core/(?:linux|shm|check|explore)/|'
                   r'/plugins/manager\.py|/threading\.py)[^"]*", line \d+, in .*\n(?:    .*\n)?')


def _fold(text: str, keep_all: bool) -> str:
    """A call trace with the runs of pluggy's and vfio-emu's own frames folded."""
    if keep_all:
        return text

    def one_run(m: re.Match[str]) -> str:
        n = len(_FOLD.findall(m.group(0)))
        return f"  ... {n} frame(s) of pluggy/vfio-emu (-vv shows them)\n"

    return re.sub(f"(?:{_FOLD.pattern})+", one_run, text)


def _verdict_lines(v: Verdict, width: int) -> list[str]:
    """One scenario's line of the table, wrapped (never cut mid-word)."""
    findings = v.findings
    more = f" (+{len(findings) - 1} more)" if len(findings) > 1 else ""
    why = (findings[0] + more if v.status == FAIL and findings
           else f"{findings[0]}{more} - {v.note}" if v.status == KNOWN and findings
           else v.note)
    head = f"  {v.scenario:<{width}}  {v.status:<{_STATUS_WIDTH}}"
    if not why:
        return [head.rstrip()]
    indent = " " * len(head) + "  "
    return textwrap.wrap(why, width=max(60, 110), initial_indent=head + "  ",
                         subsequent_indent=indent) or [head]


def _details(v: Verdict, verbose: int) -> str:
    """What a driver author needs to act on a FAIL."""
    lines = [f"[{v.driver}: {v.scenario} ({v.mode})]"]
    if v.where:
        lines.append(f"first driver frame: {v.where}")
    if v.injected:
        lines.append(f"injected: {v.injected}")
    if v.note:
        lines.append(f"note: {v.note}")
    if v.error:
        lines.append(f"error: {v.error}")
    lines.append(f"replay: {v.replay()}")
    for r in v.reports:
        folded = Report(r.kind, r.title, r.detail,
                        tuple((h, _fold(st, verbose >= 2)) for h, st in r.stacks))
        lines.append(str(folded))
    if verbose and v.timeline:
        lines.append("timeline:")
        lines += [f"  {e}" for e in v.timeline]
    return "\n".join(lines)


def _verdict_json(v: Verdict) -> dict[str, object]:
    return {"scenario": v.scenario, "status": v.status, "passed": v.passed,
            "error": v.error, "where": v.where, "injected": v.injected, "note": v.note,
            "replay": v.replay(), "timeline": v.timeline,
            "reports": [{"kind": r.kind, "title": r.title, "detail": r.detail,
                         "stacks": [{"heading": h, "stack": st} for h, st in r.stacks]}
                        for r in v.reports]}


def cmd_check(args: argparse.Namespace) -> int:
    try:
        plugins = Plugins(strict=False)
        names = args.driver or sorted(set(plugins.drivers) | set(plugins.errors))
        unknown = [n for n in names if n not in plugins.drivers and n not in plugins.errors]
        if unknown:
            raise EmulatorError(f"no driver named {', '.join(unknown)} (installed: "
                                f"{', '.join(sorted(plugins.drivers)) or 'none'})")
        modes = list(ALL_MODES) if args.all_modes else [
            Mode(args.semantics, args.delayed_release, args.unregister_order)]
    except (EmulatorError, ValueError) as e:
        print(f"vfio-emu check: {e}", file=sys.stderr)
        return 2
    if not names:
        print("vfio-emu check: no driver is installed", file=sys.stderr)
        return 2

    def progress(what: str) -> None:
        if not args.json:
            print(f"  checking {what} ...", file=sys.stderr, flush=True)

    results: dict[str, dict[Mode, list[Verdict]]] = {}
    try:
        for name in names:
            results[name] = {}
            for mode in modes:
                if name in plugins.errors:  # a broken plugin fails; the others still run
                    results[name][mode] = [Verdict(name, "load the plugin", mode, args.seed,
                                                   status=FAIL, error=plugins.errors[name])]
                    continue
                results[name][mode] = check_driver(
                    plugins.driver(name), mode, seed=args.seed, scenarios=args.scenario,
                    budget_s=args.budget, progress=progress)
                if args.explore:
                    results[name][mode] += _explored(plugins.driver(name), mode, args,
                                                     progress)
    except EmulatorError as e:
        print(f"vfio-emu check: {e}", file=sys.stderr)
        return 2
    every = [v for by_mode in results.values() for vs in by_mode.values() for v in vs]
    counts = {status: sum(1 for v in every if v.status == status)
              for status in (OK, FAIL, KNOWN, NOT_APPLICABLE)}
    failed = counts[FAIL]
    if args.json:
        print(json.dumps({
            "seed": args.seed, "modes": [str(m) for m in modes],
            "summary": {"runs": len(every), "drivers": len(results), **counts},
            "plugin_errors": plugins.errors,
            "drivers": {name: {str(mode): [_verdict_json(v) for v in vs]
                               for mode, vs in by_mode.items()}
                        for name, by_mode in results.items()},
        }, indent=2))
        return 1 if failed else 0
    for name, by_mode in results.items():
        for mode, vs in by_mode.items():
            print(f"driver {name} ({mode})")
            width = max(len(v.scenario) for v in vs)
            for v in vs:
                print("\n".join(_verdict_lines(v, width)))
            for v in vs:
                if v.status == FAIL or (v.status == KNOWN and args.verbose):
                    print()
                    print(_details(v, args.verbose))
            print()
    print(f"check: {counts[OK] + counts[KNOWN]} of {len(every) - counts[NOT_APPLICABLE]} "
          f"scenario runs passed ({len(results)} driver{'s' if len(results) != 1 else ''}, "
          f"{len(modes)} mode{'s' if len(modes) != 1 else ''}, seed {args.seed}"
          + (f"; {counts[KNOWN]} known finding(s)" if counts[KNOWN] else "")
          + (f"; {counts[NOT_APPLICABLE]} not applicable" if counts[NOT_APPLICABLE] else "")
          + ")")
    return 1 if failed else 0


def _mode(args: argparse.Namespace) -> Mode:
    return Mode(args.semantics, args.delayed_release, args.unregister_order)


def _outcome_details(o: Outcome, verbose: int) -> str:
    v = o.verdict
    return (f"schedule: {o.schedule} ({o.preemptions} preemption(s), "
            f"{len(o.decisions)} decisions, tasks: {', '.join(o.tasks)})\n"
            + _details(v, verbose))


def cmd_explore(args: argparse.Namespace) -> int:
    try:
        plugins = Plugins(strict=False)
        if args.driver not in plugins.drivers:
            raise EmulatorError(plugins.errors.get(args.driver) or (
                f"no driver named {args.driver} (installed: "
                f"{', '.join(sorted(plugins.drivers)) or 'none'})"))
        driver = plugins.driver(args.driver)
        mode = _mode(args)
        races = [race_named(args.scenario)] if args.scenario else list(RACES.values())
        if args.replay and not args.scenario:
            raise EmulatorError("--replay needs --scenario: the race the schedule is of")
        if args.replay:
            return _replay(driver, races[0], mode, args)
        results = []
        for race in races:
            results.append(explore(
                driver, race, mode, strategy=args.strategy, budget=args.budget,
                time_s=args.time, bound=args.preemptions, depth=args.depth, seed=args.seed,
                jobs=args.jobs, progress=None if args.json else _progress))
            if not args.json:
                print(file=sys.stderr)
    except (EmulatorError, ValueError) as e:
        print(f"vfio-emu explore: {e}", file=sys.stderr)
        return 2
    failed = any(not r.passed for r in results)
    shown = next((o for r in results for o in r.failures + r.known), None)
    if args.trace and shown is not None:
        write_chrome_trace(args.trace, shown.events, f"vfio-emu explore {args.driver}: "
                           f"{shown.verdict.scenario} {shown.schedule}")
    if args.json:
        print(json.dumps({"driver": args.driver, "mode": str(mode), "seed": args.seed,
                          "strategy": args.strategy, "races": [_exploration_json(r)
                                                               for r in results]}, indent=2))
        return 1 if failed else 0
    for r in results:
        print(describe(r))
        for error in r.errors:
            print(f"  worker error: {error}")
        for o in r.failures + (r.known if args.verbose else []):
            print()
            print(_outcome_details(o, args.verbose))
        if r.failures or r.errors:
            print()
    if args.trace:
        print(f"trace: {args.trace}" if shown is not None else
              "trace: nothing failed, no trace written (--replay a schedule to trace it)")
    return 1 if failed else 0


_last_progress = [0.0]


def _progress(r: Exploration) -> None:
    """At most four progress lines a second, over each other."""
    now = time.monotonic()
    if now - _last_progress[0] < 0.25:
        return
    _last_progress[0] = now
    print(f"\r  {r.driver}: {r.race}: {r.runs} schedules, {r.rate:.0f}/s, "
          f"{len(r.states)} distinct, {len(r.failures)} failure(s) ", end="",
          file=sys.stderr, flush=True)


def _replay(driver: object, race: object, mode: Mode, args: argparse.Namespace) -> int:
    o = replay_schedule(driver, race, mode, args.replay)  # type: ignore[arg-type]
    if args.trace:
        write_chrome_trace(args.trace, o.events, f"vfio-emu explore {args.driver}: "
                           f"{o.verdict.scenario} {o.schedule}")
    if args.json:
        print(json.dumps(_verdict_json(o.verdict) | {"schedule": str(o.schedule)}, indent=2))
    else:
        print(f"{o.verdict.scenario}: {o.verdict.status}")
        print(_outcome_details(o, max(args.verbose, 1)))
    return 1 if o.verdict.status == FAIL else 0


def _exploration_json(r: Exploration) -> dict[str, object]:
    return {"race": r.race, "runs": r.runs, "distinct_timelines": len(r.states),
            "seconds": round(r.elapsed_s, 3), "schedules_per_s": round(r.rate, 1),
            "exhausted": r.exhausted, "not_applicable": r.not_applicable, "errors": r.errors,
            "failures": [_verdict_json(o.verdict) | {"schedule": str(o.schedule),
                                                    "preemptions": o.preemptions}
                         for o in r.failures],
            "known": [_verdict_json(o.verdict) | {"schedule": str(o.schedule)}
                      for o in r.known]}


def _explored(driver: Driver, mode: Mode, args: argparse.Namespace,
              progress: Callable[[str], None]) -> list[Verdict]:
    """check --explore N: each race under N random schedules, one verdict a race (its first
    failure, else its first known finding)."""
    out = []
    for race in RACES.values():
        progress(f"{driver.name}: exploring {race.name}")
        r = explore(driver, race, mode, budget=args.explore, seed=args.seed)
        name = f"{CHECK_PREFIX}{race.name}"
        found = r.failures or r.known
        if found:
            v = found[0].verdict
            v.scenario = name
            if len(found) > 1:
                more = (f"{len(found) - 1} more kind(s): `vfio-emu explore {driver.name} "
                        f"--scenario '{race.name}'` shows them")
                v.note = f"{v.note}; {more}" if v.note else more
        else:
            v = Verdict(driver.name, name, mode, args.seed)
            if r.not_applicable:
                v.status, v.note = NOT_APPLICABLE, r.not_applicable
            elif r.errors:
                v.status, v.error = FAIL, r.errors[0].splitlines()[0]
            else:
                v.note = f"{r.runs} schedules, {len(r.states)} distinct timelines"
        out.append(v)
    return out


def _size(n: int) -> str:
    return f"{n / 1024:.0f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.1f} MiB"


def cmd_arenas(args: argparse.Namespace) -> int:
    found = segments()
    removed = []
    if args.remove_orphans:
        for seg in found:
            if seg.orphaned:
                try:
                    Arena.unlink(seg.name)
                except ArenaNotFoundError:
                    continue  # gone meanwhile
                removed.append(seg.name)
    if args.json:
        print(json.dumps({"arenas": [{**asdict(s), "orphaned": s.orphaned} for s in found],
                          "removed": removed}, indent=2))
        return 0
    rows = [("NAME", "CREATOR", "STATE", "SIZE", "OBJECTS")]
    rows += [(s.name, str(s.creator_pid), "alive" if s.creator_alive else "dead (orphaned)",
              _size(s.size), f"{s.in_use}/{s.capacity}") for s in found]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    for name in removed:
        print(f"removed {name}")
    orphans = sum(1 for s in found if s.orphaned) - len(removed)
    if orphans:
        print(f"{orphans} orphaned: `vfio-emu arenas --remove-orphans` removes them")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.svg and importlib.util.find_spec("pygal") is None:
        # Said before the run, not after it: a missing library must not cost a measurement.
        print("vfio-emu bench: --svg needs pygal (pip install 'vfio-emu[bench]')",
              file=sys.stderr)
        return 2
    why = bench.png_unavailable() if args.png else ""
    if why:
        print(f"vfio-emu bench: --png needs pygal and cairosvg with the cairo library "
              f"(pip install 'vfio-emu[png]'): {why}", file=sys.stderr)
        return 2
    figures = bench.run(quick=args.quick)
    print(bench.table(figures))
    summary = bench.targets(figures)
    if summary:
        print()
        print(summary)
    data = bench.to_json(figures)
    if args.json:
        bench.write_json(figures, args.json)
        print(f"\nwritten: {args.json}")
    if args.svg:
        bench.svg(figures, args.svg)
        print(f"written: {args.svg}")
    if args.png:
        bench.png(figures, args.png)
        print(f"written: {args.png}")
    if args.compare:
        try:
            with open(args.compare) as f:
                saved = json.load(f)
        except (OSError, ValueError) as e:
            print(f"vfio-emu bench: --compare {args.compare}: {e}", file=sys.stderr)
            return 2
        lines, worse = bench.compare(data, saved, args.fail_above)
        print(f"\nagainst {args.compare} (ratios to the no-op; slower = more than "
              f"{args.fail_above:g}% and p < 0.01):")
        print("\n".join(lines))
        return 1 if worse else 0
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vfio-emu", description="Emulate the Linux VFIO device life cycle in userspace.")
    parser.add_argument("--version", action="version", version=f"vfio-emu {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("lkdtm", help="run the lkdtm refcount misuse catalogue against the C core",
                       description="Replay drivers/misc/lkdtm/refcount.c and judge each case "
                                   "as the kernel selftest does. Exit status 1 if any fails.")
    p.add_argument("case", nargs="*", help="run only these cases (e.g. REFCOUNT_INC_OVERFLOW)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="print each case's lkdtm log and WARN reports (dmesg style)")
    p.set_defaults(func=cmd_lkdtm)
    r = sub.add_parser(
        "run", help="run a life-cycle scenario and print its timeline and reports",
        description="Run a named scenario through the emulated VFIO life cycle. Exit status "
                    "1 if any report fired.",
        epilog="scenarios:\n" + "\n".join(
            f"  {s.name:<24}{'buggy: ' if s.buggy else ''}{s.doc}"
            for s in SCENARIOS.values()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("scenario", choices=sorted(SCENARIOS), metavar="SCENARIO")
    r.add_argument("--semantics", choices=SEMANTICS, default="v6.1")
    r.add_argument("--delayed-release", action="store_true",
                   help="DEBUG_KOBJECT_RELEASE: run final releases 1-4 s (emulated) later")
    r.add_argument("--unregister-order", choices=UNREGISTER_ORDERS, default="v6.1",
                   help="v6.1: findable while unregister waits; unlink-first: the later order")
    r.add_argument("--seed", type=int, default=0,
                   help="seed the release delays are drawn from (default 0)")
    r.add_argument("--json", action="store_true", help="machine-readable output")
    r.set_defaults(func=cmd_run)
    a = sub.add_parser(
        "arenas", help="list this user's arena segments; remove those whose creator died",
        description="List every vfio-emu arena segment of this user in /dev/shm: its creator, "
                    "whether that process still runs, size and objects in use.  A creator "
                    "killed with SIGKILL never unlinks its segment: --remove-orphans does.")
    a.add_argument("--remove-orphans", action="store_true",
                   help="unlink the segments whose creator is dead")
    a.add_argument("--json", action="store_true", help="machine-readable output")
    a.set_defaults(func=cmd_arenas)
    b = sub.add_parser(
        "bench", help="time the primitives, put -> release and scaling, as ratios to a no-op",
        description="Measure get/put, pairs, batches and completions beside the peers a user "
                    "would pick (a threading.Lock counter, multiprocessing.Value, atomics on "
                    "shared memory when installed), the last put running a release, the "
                    "device-model cycle with 0, 1 and 10 plugins, and scaling with live "
                    "objects and processes - every figure as a ratio to a cffi no-op call "
                    "measured in the same run.")
    b.add_argument("--quick", action="store_true", help="fewer rounds and sizes (a smoke test)")
    b.add_argument("--json", metavar="FILE", help="write the run (pytest-benchmark layout)")
    b.add_argument("--svg", metavar="FILE", help="draw the ratios as a chart (needs pygal)")
    b.add_argument("--png", metavar="FILE",
                   help="the same chart as PNG (needs pygal, cairosvg and the cairo library)")
    b.add_argument("--compare", metavar="BASELINE.json",
                   help="compare with a saved --json run; exit 1 if a figure got slower")
    b.add_argument("--fail-above", type=float, default=10.0, metavar="PCT",
                   help="how much slower (in %%, and significant) fails --compare (10)")
    b.set_defaults(func=cmd_bench)
    c = sub.add_parser(
        "check", help="run every installed driver through the life-cycle checks",
        description="Load the driver plugins and take each through the battery: life cycle, "
                    "an FD held during remove (given back after 25 s, or only when "
                    "ops->request asks), an open during unregister, repeated probe/remove, "
                    "delayed release, module unload with a device bound or open, and a "
                    "failure injected at every allocation and kernel step of the module init "
                    "and of a bind. Each scenario runs in a child process of its own. Exit "
                    "status 0 clean, 1 findings, 2 usage or the tool's own failure.")
    c.add_argument("driver", nargs="*", help="only these drivers (default: all installed)")
    c.add_argument("--semantics", choices=SEMANTICS, default="v6.1")
    c.add_argument("--delayed-release", action="store_true",
                   help="DEBUG_KOBJECT_RELEASE in every scenario")
    c.add_argument("--unregister-order", choices=UNREGISTER_ORDERS, default="v6.1",
                   help="v6.1: findable while unregister waits; unlink-first: the later order")
    c.add_argument("--all-modes", action="store_true",
                   help="v6.1 and v6.2, each with and without delayed release")
    c.add_argument("--seed", type=int, default=0,
                   help="the seed every delay is drawn from (each FAIL prints its replay)")
    c.add_argument("--scenario", action="append", metavar="NAME",
                   help="only this scenario (repeatable; the names the table shows)")
    c.add_argument("--budget", type=float, default=BUDGET_S, metavar="SECONDS",
                   help="real seconds a scenario may run before it is called a hang")
    c.add_argument("-v", "--verbose", action="count", default=0,
                   help="-v: each FAIL's timeline, and the details of known findings; -vv: "
                        "also the emulator's own frames")
    c.add_argument("--json", action="store_true",
                   help="machine-readable output (always a complete document)")
    c.add_argument("--explore", type=int, default=0, metavar="N",
                   help="also explore each concurrent scenario (vfio-emu explore) under N "
                        "random schedules")
    c.set_defaults(func=cmd_check)
    e = sub.add_parser(
        "explore", help="run a driver's concurrent scenarios under many interleavings",
        description="Split a driver's life cycle into racing tasks (a remove, userspace "
                    "closing or opening FDs, a module unload, delayed releases) and run them "
                    "one at a time, switching only at kernel operations, under schedules "
                    "picked by a strategy. Each failure is shrunk to its fewest preemptions "
                    "and printed with the schedule that replays it. Exit status 0 clean, 1 "
                    "findings, 2 usage or the tool's own failure.")
    e.add_argument("driver", help="the driver plugin")
    e.add_argument("--scenario", metavar="NAME", help="only this race: " + ", ".join(
        repr(n) for n in RACES))
    e.add_argument("--strategy", choices=("random", "pct", "dfs"), default="random",
                   help="random walk, PCT, or every schedule with at most K preemptions")
    e.add_argument("--preemptions", type=int, default=2, metavar="K",
                   help="dfs: the preemption bound (2)")
    e.add_argument("--depth", type=int, default=3, metavar="D", help="pct: the bug depth (3)")
    e.add_argument("--budget", type=int, default=None, metavar="N",
                   help="schedules per race (random, pct: 200; dfs: no cap)")
    e.add_argument("--time", type=float, default=None, metavar="S",
                   help="stop each race after S seconds")
    e.add_argument("--seed", type=int, default=0, help="picks the schedules (and the kernel's "
                                                       "delays)")
    e.add_argument("--jobs", type=int, default=1, metavar="N", help="worker processes")
    e.add_argument("--replay", metavar="SCHEDULE",
                   help="run the schedule a failure printed (with --scenario)")
    e.add_argument("--trace", metavar="FILE.json",
                   help="write the first failure's (or the replayed run's) timeline as Chrome "
                        "trace-event JSON, for ui.perfetto.dev")
    e.add_argument("--semantics", choices=SEMANTICS, default="v6.1")
    e.add_argument("--delayed-release", action="store_true",
                   help="DEBUG_KOBJECT_RELEASE (a race may turn it on itself)")
    e.add_argument("--unregister-order", choices=UNREGISTER_ORDERS, default="v6.1")
    e.add_argument("-v", "--verbose", action="count", default=0,
                   help="-v: the timeline of each failure, and known findings; -vv: also the "
                        "emulator's own frames")
    e.add_argument("--json", action="store_true", help="machine-readable output")
    e.set_defaults(func=cmd_explore)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
