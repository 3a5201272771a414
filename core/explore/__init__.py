"""The interleaving explorer: a driver's life cycle as racing tasks, under every schedule.

A race (explore.scenarios) is a scenario split into tasks - a remove, a
process closing an FD, a module unload, and the delayed releases - that the
emulated kernel's scheduler (vfio_emu.linux.sched) runs one at a time,
switching only at kernel operations.  A strategy picks every switch; a
failing run prints a schedule string that replays it exactly.
"""

from vfio_emu.explore.explorer import (
    DEFAULT_BUDGET,
    Exploration,
    Outcome,
    describe,
    explore,
    minimise,
    race_named,
    replay,
    run_race,
)
from vfio_emu.explore.scenarios import RACES, Race
from vfio_emu.explore.schedule import Schedule, model_id
from vfio_emu.explore.strategy import PCT, STRATEGIES, RandomWalk, Replay, ScheduleMismatch, dfs

__all__ = ["DEFAULT_BUDGET", "PCT", "RACES", "STRATEGIES", "Exploration", "Outcome", "Race",
           "RandomWalk", "Replay", "Schedule", "ScheduleMismatch", "describe", "dfs", "explore",
           "minimise", "model_id", "race_named", "replay", "run_race"]
