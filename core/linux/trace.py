"""The trace: every life-cycle transition as an event, printable as a timeline.

Events are recorded only on life-cycle transitions (alloc, register, open,
close, unregister steps, get_device/put, release ...), never by the
primitives: a Kref.get()/put() on its own stays one C call.
"""

from __future__ import annotations

import threading
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any, Protocol

from vfio_emu import stack as _stack


@dataclass(frozen=True)
class Event:
    """One transition: when (jiffies), who (pid), which device, what, and the counters."""

    jiffies: int
    pid: int
    device: str
    op: str
    kref: tuple[int, int] | None = None  # object count before, after
    refcount: tuple[int, int] | None = None  # registration count before, after
    open_count: int | None = None
    detail: str = ""
    task: str = ""  # the scheduler's task that did it (explore), else ""

    def __str__(self) -> str:
        who = f"{self.task:<16.16} " if self.task else ""
        parts = [f"[{self.jiffies:>10}] pid {self.pid:<7} {who}{self.device:<12} {self.op:<28}"]
        if self.kref is not None:
            parts.append(f"kref {self.kref[0]}->{self.kref[1]}")
        if self.refcount is not None:
            parts.append(f"reg {self.refcount[0]}->{self.refcount[1]}")
        if self.open_count is not None:
            parts.append(f"open {self.open_count}")
        if self.detail:
            parts.append(self.detail)
        return "  ".join(parts).rstrip()

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _direct_init(cls: type) -> None:
    """Give a frozen dataclass an __init__ that stores its fields straight into the new
    instance's __dict__ - the same parameters, defaults and result as the generated one,
    without its object.__setattr__() call per field (the trace makes an Event on every
    transition).  A class with anything else to initialise keeps its generated __init__."""
    params: list[str] = []
    stores: list[str] = []
    defaults: dict[str, Any] = {}
    for f in fields(cls):
        if not f.init or f.kw_only or f.default_factory is not MISSING:
            return
        if f.default is MISSING:
            params.append(f.name)
        else:
            defaults[f"_default_{f.name}"] = f.default
            params.append(f"{f.name}=_default_{f.name}")
        stores.append(f"    d[{f.name!r}] = {f.name}\n")
    if hasattr(cls, "__post_init__"):
        return
    ns: dict[str, Any] = {}
    exec(f"def __init__(self, {', '.join(params)}):\n    d = self.__dict__\n"
         + "".join(stores), defaults, ns)
    init = ns["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__annotations__ = dict(getattr(vars(cls).get("__init__"), "__annotations__", {}))
    cls.__init__ = init  # type: ignore[misc]


_direct_init(Event)


class Switch(Protocol):
    """What the trace tells of each event under a scheduler (linux.sched.Scheduler)."""

    def current_name(self) -> str: ...

    def preempt(self, op: str) -> None: ...


_FIELDS = tuple(f.name for f in fields(Event))
assert _FIELDS == ("jiffies", "pid", "device", "op", "kref", "refcount", "open_count",
                   "detail", "task"), "Trace.add() stores Event's fields in this order"


class Trace:
    """The events of one emulated kernel, in order (thread-safe append).

    A transition costs one tuple and one append: the Events are made from the pending
    tuples, in order, when `events` is read.  Under a scheduler (`sched` set), each event
    names its task, and each is a switch point: another task may run right after it.
    """

    def __init__(self, events: list[Event] | None = None, sched: Switch | None = None) -> None:
        self._events: list[Event] = [] if events is None else events
        #: Recorded and not yet read: Event field tuples (add()), or Events (record()).  The
        #: model's busiest path (linux.vfio._trace) appends add()'s tuple here itself when no
        #: scheduler runs.  Only ever appended to, and emptied from the front by `events`.
        self.pending: list[tuple[Any, ...] | Event] = []
        self._reading = threading.Lock()
        self.sched = sched

    @property
    def events(self) -> list[Event]:
        """Every event so far, in order: always the same list (it only grows, unless its
        reader clears it)."""
        pending = self.pending
        if pending:
            with self._reading:
                n = len(pending)  # appends after this are left for the next reader
                if n:
                    self._events.extend(e if isinstance(e, Event) else Event(*e)
                                        for e in pending[:n])
                    del pending[:n]  # one slice deletion: atomic with other threads' appends
        return self._events

    def record(self, jiffies: int, device: str, op: str, **fields: Any) -> Event:
        """Record one event, with any of Event's other fields, and return it."""
        sched = self.sched
        if sched is not None:
            fields["task"] = sched.current_name()
        event = Event(jiffies, _stack.PID, device, op, **fields)
        self.pending.append(event)  # one append: atomic, so threads need no lock
        if sched is not None:
            sched.preempt(op)
        return event

    def add(self, jiffies: int, device: str, op: str, kref: tuple[int, int] | None = None,
            refcount: tuple[int, int] | None = None, open_count: int | None = None,
            detail: str = "") -> None:
        """record() without the Event now (it is made when `events` is read): the same
        event, for the model's transitions and any caller that needs nothing back."""
        sched = self.sched
        if sched is None:
            self.pending.append((jiffies, _stack.PID, device, op, kref, refcount,
                                  open_count, detail, ""))
            return
        self.pending.append((jiffies, _stack.PID, device, op, kref, refcount, open_count,
                              detail, sched.current_name()))
        sched.preempt(op)

    def timeline(self) -> str:
        """The events as a readable timeline, one per line."""
        return "\n".join(str(e) for e in self.events)
