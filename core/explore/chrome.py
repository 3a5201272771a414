"""A run's timeline as Chrome trace-event JSON, for ui.perfetto.dev and chrome://tracing.

One track (thread) per task, in one process: each kernel transition is a
slice on the track of the task that made it; the object count, registration
count and open count of each device are counters; WARN, KASAN, hang and
other findings are instants across every track (the kernel's notices stay on
their task's).  Time is logical - each transition
takes one tick of 10 µs - because emulated time only moves while the kernel
waits: the jiffies of each slice are in its args.

Format: the Trace Event Format (Duffy, Google, "Trace Event Format", the
JSON Object Format with "traceEvents"), phases X (complete), C (counter),
i (instant) and M (metadata).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from vfio_emu.linux.trace import Event

PID = 1
#: Task tracks are threads FIRST_TID, FIRST_TID + 1, ...: never 0, nor the pid (a viewer
#: takes a tid equal to the pid for the process's main thread, and folds tid 0 into it).
FIRST_TID = PID + 1
TICK_US = 10
#: The task of setup and teardown, which run outside the scheduler.
MAIN = "main (setup, teardown)"


def chrome_trace(events: Iterable[Event], title: str = "vfio-emu") -> dict[str, Any]:
    """The events as a trace-event document (a dict: json.dump it)."""
    out: list[dict[str, Any]] = [
        {"ph": "M", "name": "process_name", "pid": PID, "tid": PID, "args": {"name": title}}]
    tids: dict[str, int] = {}

    def tid_of(task: str) -> int:
        name = task or MAIN
        if name not in tids:
            tids[name] = FIRST_TID + len(tids)
            out.append({"ph": "M", "name": "thread_name", "pid": PID, "tid": tids[name],
                        "args": {"name": name}})
            out.append({"ph": "M", "name": "thread_sort_index", "pid": PID,
                        "tid": tids[name], "args": {"sort_index": len(tids)}})
        return tids[name]

    for i, e in enumerate(events):
        ts = i * TICK_US
        tid = tid_of(e.task)
        if e.op.startswith("report: "):
            kind = e.op[8:]  # a finding marks every track; the kernel's notices, their own
            out.append({"ph": "i", "s": "t" if kind == "info" else "g",
                        "name": f"{kind}: {e.detail}", "cat": "report", "ts": ts, "pid": PID,
                        "tid": tid})
            continue
        args: dict[str, Any] = {"jiffies": e.jiffies, "device": e.device}
        if e.detail:
            args["detail"] = e.detail
        if e.kref is not None:
            args["kref"] = f"{e.kref[0]} -> {e.kref[1]}"
        if e.refcount is not None:
            args["registration"] = f"{e.refcount[0]} -> {e.refcount[1]}"
        cat = "driver" if e.op.startswith("ops->") or " probe" in e.op else "kernel"
        out.append({"ph": "X", "name": e.op, "cat": cat, "ts": ts, "dur": TICK_US - 1,
                    "pid": PID, "tid": tid, "args": args})
        counters = {"object count (kref)": e.kref[1] if e.kref else None,
                    "registration count": e.refcount[1] if e.refcount else None,
                    "open count": e.open_count}
        for name, value in counters.items():
            if value is not None:
                out.append({"ph": "C", "name": f"{e.device} {name}", "ts": ts, "pid": PID,
                            "args": {"value": value}})
    return {"traceEvents": out, "displayTimeUnit": "ms", "otherData": {"source": "vfio-emu"}}


def write_chrome_trace(path: str, events: Iterable[Event], title: str = "vfio-emu") -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(chrome_trace(events, title), f, indent=1)


__all__ = ["chrome_trace", "write_chrome_trace"]
