"""The explorer: a concurrent scenario run under many schedules, its failures replayable.

One run is a race (explore.scenarios) in a fresh kernel under a Scheduler
whose policy picks every switch; its verdict is judged exactly as the check
battery judges a scenario, and comes with the schedule that replays it.
explore() runs schedules chosen by a strategy - random walk, PCT, or DFS over
every schedule with at most k preemptions - in worker processes (each its own
kernel, so a driver that crashes takes only its worker down), and shrinks
every distinct failure to the fewest non-default picks that still fail.

Which schedules run follows from the seed alone: the i-th random or PCT
schedule draws from (seed, i), whatever the number of workers; only a --time
budget makes how many run depend on the machine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import faulthandler
import functools
import math
import os
import pickle
import random
import re
import select
import signal
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from vfio_emu.check.battery import _one, timeline_line
from vfio_emu.check.isolate import BUDGET_S, unlink_segments_of
from vfio_emu.check.verdict import FAIL, KNOWN, NOT_APPLICABLE, Mode, Verdict
from vfio_emu.errors import EmulatorError, InvalidArgumentError
from vfio_emu.explore.scenarios import RACES, Race
from vfio_emu.explore.schedule import Schedule
from vfio_emu.explore.strategy import PCT, STRATEGIES, RandomWalk, Replay, ScheduleMismatch, dfs
from vfio_emu.linux.kernel import Kernel
from vfio_emu.linux.sched import Decision, Policy, Scheduler
from vfio_emu.linux.trace import Event
from vfio_emu.plugins.manager import Driver
from vfio_emu.shm.arena import Arena, close_owned

#: What differs between two runs of one failure: pids, addresses, indices.
_NUMBERS = re.compile(r"0x[0-9a-f]+|\d+")
#: Schedules random and PCT run when no budget is given.
DEFAULT_BUDGET = 200


@dataclass
class Outcome:
    """One run: its verdict, its schedule, and what the explorer needs from it."""

    verdict: Verdict
    schedule: Schedule
    decisions: list[Decision] = field(default_factory=list)
    picks: list[int] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)

    @property
    def preemptions(self) -> int:
        return self.schedule.preemptions(self.decisions)

    @property
    def signature(self) -> str:
        """What makes two failures the same: the first finding, addresses masked."""
        return _NUMBERS.sub("N", self.verdict.findings[0]) if self.verdict.findings else ""

    @property
    def state(self) -> int:
        """The run's timeline, hashed: distinct values are distinct interleavings' effects."""
        return hash(tuple(self.verdict.timeline))


#: How `vfio-emu check --explore` names a race in its table (and in the replay it prints).
CHECK_PREFIX = "explore: "


def race_named(name: str) -> Race:
    """A race by its name, or by the name `check --explore` gives it."""
    race = RACES.get(name[len(CHECK_PREFIX):] if name.startswith(CHECK_PREFIX) else name)
    if race is None:
        raise InvalidArgumentError(f"no concurrent scenario {name!r}: choose one of "
                                   f"{', '.join(repr(n) for n in RACES)}")
    return race


def run_race(driver: Driver, race: Race, mode: Mode, seed: int = 0,
             policy: Policy | None = None) -> Outcome:
    """The race once, under this policy (default: no preemption at all)."""
    policy = policy or Replay()
    if race.options.get("delayed_release") and not mode.delayed_release:
        mode = Mode(mode.semantics, True, mode.unregister_order)  # the race turns it on
    got: dict[str, Any] = {}

    def body(driver: Driver, kernel: Any) -> str:
        got["trace"] = kernel.trace  # its events are read once the run is over
        tasks = race.setup(driver, kernel)
        if isinstance(tasks, str):
            return tasks
        sched = got["sched"] = Scheduler(kernel, policy)
        for name, fn in tasks:
            sched.spawn(fn, name)
        try:
            sched.run()
        except ScheduleMismatch as e:
            got["mismatch"] = e
            return ""
        errors = [t.error for t in sched.tasks if t.error is not None]
        own = [err for err in errors if not hasattr(err, "report")]
        if own:  # a driver's own exception: the first is the verdict's error
            raise own[0]
        return ""

    _watch_run()
    verdict = _one(driver, race.name, body, mode, seed,
                   options={**race.options, "arena": _arena()}, unloads=race.unloads,
                   timeline=_task_line)
    if "mismatch" in got:
        raise got["mismatch"]
    sched = got.get("sched")
    decisions = list(sched.decisions) if sched is not None else []
    picks = list(sched.picks) if sched is not None else []
    outcome = Outcome(verdict, Schedule.of(seed, decisions, picks), decisions, picks,
                      list(got["trace"].events) if "trace" in got else [],
                      [t.name for t in sched.tasks] if sched is not None else [])
    verdict.schedule = str(outcome.schedule)
    _mark_known(driver, race, verdict, mode)
    return outcome


#: In a worker process, by its pid: the file a hung run's stacks go to, and when the
#: watchdog was last set.
_HANG_FILES: dict[int, list[Any]] = {}


def _watch_run() -> None:
    """In a worker, a run that takes more than BUDGET_S of real time ends the worker with
    every thread's stack in its hang file: a task blocked the one thread the tasks share,
    on something the emulated kernel cannot see (a plain lock, an event, a loop).

    Setting faulthandler's watchdog costs a thread start, a tenth of a run: it is set for
    2 * BUDGET_S and set again only once BUDGET_S has passed, so every run has BUDGET_S at
    least and a hung one ends within 2 * BUDGET_S."""
    watch = _HANG_FILES.get(os.getpid())
    if watch is not None:  # (in no other process: the caller's own is never ended)
        now = time.monotonic()
        if now - watch[1] > BUDGET_S:
            faulthandler.dump_traceback_later(2 * BUDGET_S, exit=True, file=watch[0])
            watch[1] = now


def _task_line(event: Any) -> str:
    """A timeline line that names its task: the setup's and teardown's are main's."""
    return timeline_line(event if event.task else dataclasses.replace(event, task="main"))


#: The arena a Kernel() would make for itself: the same size and clock.
_KERNEL_DEFAULTS: dict[str, Any] = Kernel.__init__.__kwdefaults__ or {}
#: Each thread's arena for its runs (.arena), and the pid that made it (.pid).
_runs = threading.local()


def _arena() -> Arena:
    """The arena the runs of this thread share: making and unlinking a segment took about
    half of a run.  Each run's kernel reads only the WARNs logged after it started; what a
    run leaks stays allocated, so a new arena replaces this one once it is half full.  Two
    threads, or a forked worker and its parent, never share one: their kernels would read
    each other's WARNs.  (A thread a driver left running after its run may still touch
    this arena; its WARNs would then show in a later run, as they would in the kernel.)"""
    arena: Arena | None = getattr(_runs, "arena", None)
    mine = getattr(_runs, "pid", 0) == os.getpid()
    if arena is None or not mine or arena.closed or arena.in_use > arena.capacity // 2:
        if arena is not None and mine:
            arena.close()
        arena = Arena.create(**{k: _KERNEL_DEFAULTS[k] for k in ("capacity", "hz",
                                                                  "time_scale")})
        _runs.arena, _runs.pid = arena, os.getpid()
    return arena


def _mark_known(driver: Driver, race: Race, verdict: Verdict, mode: Mode) -> None:
    """A FAIL with a finding the driver declared, or the kernel's own (Race.core), is known
    (not strict here: one schedule need not show every declared finding)."""
    if verdict.status != FAIL:
        return
    try:
        known = driver.known_findings()
    except EmulatorError:
        known = []
    reasons = [k.reason for k in known if k.applies(verdict.scenario, mode.semantics,
                                                     mode.delayed_release)
               and any(k.match in line for line in verdict.findings)]
    reasons += [c.reason for c in race.core if c.unregister_order == mode.unregister_order
                and any(c.match in line for line in verdict.findings)]
    if reasons:
        verdict.status, verdict.note = KNOWN, "; ".join(dict.fromkeys(reasons))


def replay(driver: Driver, race: Race, mode: Mode, schedule: Schedule | str) -> Outcome:
    """The run a schedule (as printed) describes: the same verdict and timeline."""
    if isinstance(schedule, str):
        schedule = Schedule.parse(schedule)
    return _fitted(schedule, run_race(driver, race, mode, schedule.seed,
                                      Replay(dict(schedule.picks))))


def _fitted(schedule: Schedule, out: Outcome) -> Outcome:
    """out, if the run took every pick of its schedule (a pick past its last decision was
    made for another run)."""
    if schedule.picks and schedule.picks[-1][0] >= len(out.decisions):
        raise ScheduleMismatch(
            f"the schedule picks at decision {schedule.picks[-1][0]}, but this run has "
            f"only {len(out.decisions)} decisions: it was made for another run")
    return out


def minimise(driver: Driver, race: Race, mode: Mode, failing: Outcome) -> Outcome:
    """Drop picks, latest first, while the run still fails the same way: the fewest
    non-default picks (so preemptions) that show the failure."""
    best = failing
    i = len(best.schedule.picks) - 1
    while i >= 0:
        picks = best.schedule.picks[:i] + best.schedule.picks[i + 1:]
        try:
            trial = _fitted(Schedule(best.schedule.seed, picks),
                            run_race(driver, race, mode, best.schedule.seed,
                                     Replay(dict(picks))))
        except ScheduleMismatch:
            trial = None
        if trial is not None and trial.signature == best.signature \
                and trial.verdict.status == best.verdict.status:
            best = trial
        i -= 1
    return best


# -- many schedules -----------------------------------------------------------------------------

@dataclass
class Exploration:
    """What exploring one race found: counts, and one minimised run per distinct failure."""

    driver: str
    race: str
    mode: Mode
    strategy: str
    seed: int
    runs: int = 0
    states: set[int] = field(default_factory=set)
    failures: list[Outcome] = field(default_factory=list)  # FAIL, minimised, one per kind
    known: list[Outcome] = field(default_factory=list)  # declared findings, one per kind
    not_applicable: str = ""
    elapsed_s: float = 0.0
    exhausted: bool = False  # dfs: every schedule within the bound ran
    errors: list[str] = field(default_factory=list)  # workers that died

    @property
    def rate(self) -> float:
        return self.runs / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def passed(self) -> bool:
        return not self.failures and not self.errors


def _schedules(driver: Driver, race: Race, mode: Mode, strategy: str, seed: int,
               indices: range | None, roots: list[list[int]] | None, bound: int, depth: int,
               length: int) -> Iterator[Outcome]:
    """The runs of one worker: schedules `indices` (random, pct) or the dfs subtrees
    under `roots`."""
    if strategy == "dfs":
        last: list[Outcome] = []

        def run(prefix: list[int]) -> tuple[list[Decision], list[int]]:
            out = run_race(driver, race, mode, seed, Replay(prefix=prefix))
            last[:] = [out]
            return out.decisions, out.picks
        for root in roots or [[]]:
            for _ in dfs(run, bound, root):
                yield last[0]
        return
    for i in indices or range(0):
        rng = random.Random(f"{seed}:{i}")
        policy: Policy = RandomWalk(rng) if strategy == "random" else PCT(rng, depth, length)
        yield run_race(driver, race, mode, seed, policy)


def _worker(driver: Driver, race: Race, mode: Mode, strategy: str, seed: int,
            indices: range | None, roots: list[list[int]] | None, bound: int, depth: int,
            length: int, deadline: float | None, emit: Callable[[tuple[Any, ...]], None]
            ) -> None:
    """Run a share of the schedules; emit ("run", state, failure) per run, failure being
    the minimised outcome of a new kind of failure (or None): one message, so a budget
    reached at that run still counts what it found."""
    seen: set[str] = set()
    for out in _schedules(driver, race, mode, strategy, seed, indices, roots, bound, depth,
                          length):
        emit(("run", out.state, _new_failure(driver, race, mode, out, seen)))
        if deadline is not None and time.monotonic() >= deadline:
            emit(("stopped",))
            return
    emit(("exhausted",))


def _new_failure(driver: Driver, race: Race, mode: Mode, out: Outcome, seen: set[str]
                 ) -> Outcome | None:
    """out minimised, if it fails in a way not seen before (then it is seen)."""
    if out.verdict.status not in (FAIL, KNOWN) or out.signature in seen:
        return None
    seen.add(out.signature)
    return minimise(driver, race, mode, out)


def explore(driver: Driver, race: Race | str, mode: Mode | None = None, *,
            strategy: str = "random", budget: int | None = None, time_s: float | None = None,
            bound: int = 2, depth: int = 3, seed: int = 0, jobs: int = 1,
            progress: Callable[[Exploration], None] | None = None) -> Exploration:
    """Explore a race's interleavings (see the module docstring).

    budget: schedules to run (random, pct: default DEFAULT_BUDGET; dfs: no cap).
    time_s: stop after this many seconds (a cap on top of the budget).  bound: dfs's
    preemption bound.  depth: PCT's bug depth.  jobs: worker processes.
    """
    mode = mode or Mode()
    race = race_named(race) if isinstance(race, str) else race
    if strategy not in STRATEGIES:
        raise InvalidArgumentError(f"strategy={strategy!r}: choose one of {STRATEGIES}")
    for what, value, low in (("budget", budget, 1), ("bound", bound, 0), ("depth", depth, 1),
                             ("jobs", jobs, 1), ("seed", seed, 0)):
        if value is not None and (type(value) is not int or value < low):
            raise InvalidArgumentError(f"{what}={value!r} must be an int >= {low}")
    if time_s is not None and not (isinstance(time_s, (int, float)) and time_s > 0):
        raise InvalidArgumentError(f"time_s={time_s!r} must be a positive number of seconds")
    result = Exploration(driver.name, race.name, mode, strategy, seed)
    started = time.monotonic()
    deadline = None if time_s is None else started + time_s
    # The first run, in this process's child: n/a, and PCT's length and dfs's roots.
    first = _isolated(lambda: run_race(driver, race, mode, seed))
    if isinstance(first, str):
        result.errors.append(first)
        result.elapsed_s = time.monotonic() - started
        return result
    if first.verdict.status == NOT_APPLICABLE:
        result.not_applicable = first.verdict.note
        result.elapsed_s = time.monotonic() - started
        return result
    length = max(len(first.decisions), 1)
    shares: list[tuple[range | None, list[list[int]] | None]]
    if strategy == "dfs":
        roots = [[]] if jobs == 1 else _roots(first, bound)
        shares = [(None, roots[k::jobs]) for k in range(min(jobs, len(roots)))]
    else:
        total = budget or DEFAULT_BUDGET
        shares = [(range(k, total, jobs), None) for k in range(min(jobs, total))]
    if strategy == "dfs" and jobs > 1:  # the root run itself is no worker's
        minimised = _isolated(lambda: _new_failure(driver, race, mode, first, set()))
        if isinstance(minimised, str):  # minimising crashed its process
            result.errors.append(minimised)
            minimised = None
        _account(result, ("run", first.state, minimised))
        if budget is not None and result.runs >= budget:
            shares = []
    cap = budget if strategy == "dfs" else None
    _run_workers(result, [functools.partial(_worker, driver, race, mode, strategy, seed, idx,
                                            roots, bound, depth, length, deadline)
                          for idx, roots in shares], cap, progress, started)
    result.elapsed_s = time.monotonic() - started
    return result


def _roots(first: Outcome, bound: int) -> list[list[int]]:
    """The first run's branches: disjoint dfs subtrees, one share each."""
    roots: list[list[int]] = []
    spent = 0
    for j, d in enumerate(first.decisions):
        for alt in d.enabled:
            if alt == first.picks[j]:
                continue
            if spent + (1 if d.current is not None and alt != d.current else 0) <= bound:
                roots.append([*first.picks[:j], alt])
        if d.current is not None and first.picks[j] != d.current:
            spent += 1
    return roots


def _account(result: Exploration, msg: tuple[Any, ...]) -> None:
    if msg[0] == "run":
        result.runs += 1
        result.states.add(msg[1])
        out: Outcome | None = msg[2]
        if out is not None:
            bucket = result.failures if out.verdict.status == FAIL else result.known
            if all(o.signature != out.signature for o in bucket):
                bucket.append(out)
    elif msg[0] == "exhausted":
        result.exhausted = True


def _isolated(fn: Callable[[], Any]) -> Any:
    """fn() in a forked child; its outcome, or why there is none."""
    results: list[Any] = []
    errors: list[str] = []
    _fork_all([lambda emit: emit(("value", fn()))], lambda msg: results.append(msg[1]),
              errors.append)
    return results[0] if results else (errors or ["the run ended without a result"])[0]


def _run_workers(result: Exploration, workers: list[Callable[[Callable[..., None]], None]],
                 cap: int | None, progress: Callable[[Exploration], None] | None,
                 started: float) -> None:
    exhausted = [0]

    def on_message(msg: tuple[Any, ...]) -> bool:
        if msg[0] == "exhausted":
            exhausted[0] += 1
            return False
        _account(result, msg)
        if progress is not None and msg[0] == "run":
            result.elapsed_s = time.monotonic() - started
            progress(result)
        return cap is not None and result.runs >= cap

    _fork_all(workers, on_message, result.errors.append)
    result.exhausted = exhausted[0] == len(workers) and (cap is None or result.runs < cap)


def _fork_all(workers: list[Callable[[Callable[..., None]], None]],
              on_message: Callable[[tuple[Any, ...]], Any],
              on_error: Callable[[str], None]) -> None:
    """Each worker in a forked child, streaming pickled messages; on_message returning
    True stops them all.  A child that dies is one error line."""
    children: dict[int, tuple[int, bytearray]] = {}
    hang_files: dict[int, Any] = {}  # closed in the finally below
    for work in workers:
        r, w = os.pipe()
        stacks = tempfile.TemporaryFile()  # noqa: SIM115 (closed in the finally below)
        pid = os.fork()
        if pid == 0:  # the child: never returns
            os.close(r)
            code = 0
            out = os.fdopen(w, "wb")
            _HANG_FILES[os.getpid()] = [stacks, -math.inf]

            def emit(msg: tuple[Any, ...], out: Any = out) -> None:
                data = pickle.dumps(msg)
                out.write(len(data).to_bytes(8, "little") + data)
                out.flush()
            try:
                work(emit)
            except BaseException:
                emit(("error", traceback.format_exc()))
                code = 3
            finally:
                try:
                    close_owned()  # the worker's arena: os._exit() runs no finalizer
                    with contextlib.suppress(OSError):  # the parent may be gone
                        out.close()
                finally:
                    os._exit(code)
        os.close(w)
        children[r] = (pid, bytearray())
        hang_files[pid] = stacks
    stop = False
    try:
        while children:
            ready, _, _ = select.select(list(children), [], [])
            for fd in ready:
                pid, buf = children[fd]
                chunk = os.read(fd, 1 << 16)
                buf += chunk
                while len(buf) >= 8 and len(buf) >= 8 + int.from_bytes(buf[:8], "little"):
                    size = int.from_bytes(buf[:8], "little")
                    msg = pickle.loads(bytes(buf[8:8 + size]))
                    del buf[:8 + size]
                    if msg[0] == "error":
                        on_error(f"a worker raised:\n{msg[1]}")
                    elif not stop and on_message(msg):
                        stop = True
                        for other_pid, _ in children.values():
                            _kill(other_pid)
                if not chunk:
                    os.close(fd)
                    del children[fd]
                    _, status = os.waitpid(pid, 0)
                    unlink_segments_of(pid)  # a worker killed or crashed cannot close its own
                    if stop:
                        continue
                    hung = _hang_report(hang_files[pid])
                    if os.WIFSIGNALED(status):
                        on_error(f"a worker died of {signal.Signals(os.WTERMSIG(status)).name} "
                                 "(the driver crashed the interpreter)")
                    elif hung:
                        on_error(hung)
                    elif os.WEXITSTATUS(status) not in (0, 3):  # 3: it said why itself
                        on_error(f"a worker died (exit status {os.WEXITSTATUS(status)}) without "
                                 "a result (a runtime, e.g. a sanitizer, ended it)")
    finally:
        for fd, (pid, _) in children.items():
            _kill(pid)
            os.close(fd)
            os.waitpid(pid, 0)
            unlink_segments_of(pid)
        for stacks in hang_files.values():
            stacks.close()


def _hang_report(stacks: Any) -> str:
    """The error line of a worker whose run hung (its hang file written), else ""."""
    stacks.seek(0)
    text = stacks.read().decode("utf-8", "replace")
    if not text:
        return ""
    return (f"a run did not finish in {BUDGET_S:g} s (real time): a task blocked the thread "
            "the tasks share, on something the emulated kernel cannot see (a plain lock, an "
            "event, a loop); a lock held across kernel calls must be a linux.mutex.Mutex. "
            f"Every thread's stack:\n{text}")


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, 9)


def describe(result: Exploration) -> str:
    """One line: what ran and what it found."""
    if result.not_applicable:
        return f"{result.driver}: {result.race}: n/a ({result.not_applicable})"
    what = (f"{result.runs} schedule(s) in {result.elapsed_s:.1f} s ({result.rate:.0f}/s), "
            f"{len(result.states)} distinct timeline(s)")
    if result.strategy == "dfs":
        what += ", every schedule within the bound" if result.exhausted else \
            ", stopped before every schedule within the bound ran"
    found = f"{len(result.failures)} failure(s)" + (
        f", {len(result.known)} known" if result.known else "")
    return f"{result.driver}: {result.race} [{result.mode}; {result.strategy}]: {what}; {found}"


__all__ = ["DEFAULT_BUDGET", "Exploration", "Outcome", "describe", "explore", "minimise",
           "race_named", "replay", "run_race"]
