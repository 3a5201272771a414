"""A schedule: the picks that made one interleaving, as a string that replays it.

Only the picks that differ from the default are kept: at each decision the
task that reached it goes on, or, when it cannot, the lowest-numbered task
that can.  So a schedule is short - "12=1,30=0": at decision 12 task 1, at
decision 30 task 0 - and its number of preemptions is visible.  It carries
the vfio-emu version and a digest of the emulated kernel's code: replaying it
against another model is refused, since the same picks would mean something
else there.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from importlib import resources

from vfio_emu import __version__
from vfio_emu.errors import InvalidArgumentError
from vfio_emu.linux.sched import Decision


@functools.cache
def model_id() -> str:
    """The version and a digest of the emulated kernel's sources (vfio_emu.linux)."""
    digest = hashlib.sha256()
    root = resources.files("vfio_emu.linux")
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".py"):
            digest.update(entry.name.encode() + b"\0" + entry.read_bytes())
    return f"{__version__}+{digest.hexdigest()[:8]}"


def default_pick(decision: Decision) -> int:
    """What a run does where its schedule says nothing."""
    return decision.current if decision.current is not None else decision.enabled[0]


_FORMAT = re.compile(r"^(?P<model>[^:\s]+):(?P<seed>\d+):(?P<picks>(\d+=\d+(,\d+=\d+)*)?)$")


@dataclass(frozen=True)
class Schedule:
    """The seed of the kernel and the non-default picks, by decision index."""

    seed: int = 0
    picks: tuple[tuple[int, int], ...] = ()  # (decision index, task id), ascending
    model: str = ""

    def __post_init__(self) -> None:
        if not self.model:
            object.__setattr__(self, "model", model_id())

    def __str__(self) -> str:
        return f"{self.model}:{self.seed}:" + ",".join(f"{i}={t}" for i, t in self.picks)

    @classmethod
    def parse(cls, text: str) -> Schedule:
        """A schedule as str() wrote it; refused if made by another model."""
        m = _FORMAT.match(text.strip()) if isinstance(text, str) else None
        if m is None:
            raise InvalidArgumentError(
                f"schedule {text!r}: expected MODEL:SEED:PICKS, e.g. '{model_id()}:0:12=1,30=0'")
        if m["model"] != model_id():
            raise InvalidArgumentError(
                f"schedule {text!r} was made by vfio-emu {m['model']}, this is {model_id()}: "
                "the same picks would mean another interleaving here; explore again")
        picks = tuple((int(i), int(t)) for i, t in (p.split("=") for p in m["picks"].split(",")
                                                    if p))
        if [i for i, _ in picks] != sorted({i for i, _ in picks}):
            raise InvalidArgumentError(f"schedule {text!r}: decision indices must ascend")
        return cls(int(m["seed"]), picks, m["model"])

    @classmethod
    def of(cls, seed: int, decisions: list[Decision], chosen: list[int]) -> Schedule:
        """The schedule of a run: its picks that were not the default."""
        return cls(seed, tuple((d.index, t) for d, t in zip(decisions, chosen, strict=False)
                               if t != default_pick(d)))

    def preemptions(self, decisions: list[Decision]) -> int:
        """How many picks took the CPU from a task that could have gone on."""
        by_index = dict(self.picks)
        return sum(1 for d in decisions if d.current is not None
                   and by_index.get(d.index, d.current) != d.current)


__all__ = ["Schedule", "default_pick", "model_id"]
