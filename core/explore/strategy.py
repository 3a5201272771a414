"""How the explorer picks the next task: replay, random walk, PCT and bounded DFS.

Each policy answers Scheduler decisions (vfio_emu.linux.sched.Decision); the
DFS strategy is a generator of prefixes, each run once, that together cover
every schedule with at most k preemptions (iterative context bounding).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

from vfio_emu.errors import EmulatorError
from vfio_emu.explore.schedule import default_pick
from vfio_emu.linux.sched import Decision

STRATEGIES = ("random", "pct", "dfs")


class ScheduleMismatch(EmulatorError):
    """A replayed schedule names a task that cannot run there: another program or model."""


class Replay:
    """Take the given picks (by decision index), the default everywhere else."""

    def __init__(self, picks: dict[int, int] | None = None,
                 prefix: list[int] | None = None) -> None:
        self.picks = picks or {}
        self.prefix = prefix or []

    def choose(self, decision: Decision) -> int:
        i = decision.index
        tid = self.prefix[i] if i < len(self.prefix) else self.picks.get(i)
        if tid is None:
            return default_pick(decision)
        if tid not in decision.enabled:
            raise ScheduleMismatch(
                f"the schedule picks task {tid} at decision {i}, but only {decision.enabled} "
                f"can run there ({decision.op}): it was made for another run")
        return tid


class RandomWalk:
    """A task chosen uniformly among those that can run, at every decision."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def choose(self, decision: Decision) -> int:
        return self.rng.choice(decision.enabled)


class PCT:
    """Probabilistic concurrency testing (Burckhardt et al., ASPLOS 2010): tasks get random
    priorities above `depth`; at depth - 1 decisions drawn from the first `length`, the
    running task drops below every other; the highest-priority task that can run runs.
    A bug of depth d is found with probability at least 1 / (n * length^(d-1))."""

    def __init__(self, rng: random.Random, depth: int, length: int) -> None:
        self.rng = rng
        self.depth = depth
        self.priority: dict[int, float] = {}
        points = rng.sample(range(max(length, depth)), depth - 1) if depth > 1 else []
        # the i-th change point (in decision order) lowers to depth - 1 - i
        self.changes = {p: depth - 1 - i for i, p in enumerate(sorted(points))}

    def choose(self, decision: Decision) -> int:
        for tid in decision.enabled:
            if tid not in self.priority:
                self.priority[tid] = self.depth + self.rng.random()
        low = self.changes.get(decision.index)
        if low is not None and decision.current is not None:
            self.priority[decision.current] = low
        return max(decision.enabled, key=lambda t: self.priority[t])


def dfs(run: Callable[[list[int]], tuple[list[Decision], list[int]]], bound: int,
        root: list[int] | None = None) -> Iterator[None]:
    """Every schedule with at most `bound` preemptions (that starts with the picks `root`),
    each run exactly once.

    run(prefix) runs with those picks at the first decisions and the default after, and
    returns the run's decisions and picks.  From each run, every decision past its prefix
    branches to each other task that could have run there, as long as the preemptions
    so far stay within the bound (a pick away from a task that could go on is one
    preemption; a pick among tasks when the running one blocked costs nothing).  Yields
    after each run.
    """
    stack: list[list[int]] = [list(root or [])]
    while stack:
        prefix = stack.pop()
        decisions, picks = run(prefix)
        yield
        spent = sum(1 for d, t in zip(decisions[:len(prefix)], picks, strict=False)
                    if d.current is not None and t != d.current)
        branches = []
        for j in range(len(prefix), len(decisions)):
            d = decisions[j]
            for alt in d.enabled:
                if alt == picks[j]:
                    continue
                cost = spent + (1 if d.current is not None and alt != d.current else 0)
                if cost <= bound:
                    branches.append([*picks[:j], alt])
            if d.current is not None and picks[j] != d.current:
                spent += 1
        stack.extend(reversed(branches))  # the earliest branch is explored first


__all__ = ["PCT", "STRATEGIES", "RandomWalk", "Replay", "ScheduleMismatch", "dfs"]
