"""Python call stacks, captured cheaply and printed the way the kernel prints a call trace.

Capturing walks the frames and keeps (file, line, function); source lines are
looked up only when a stack is printed, which for allocation and free stacks
is almost never.  The emulator's own frames - every module of the
shared-memory and emulated-kernel layers - are skipped from the innermost
end, so a stack starts at the code that called into the emulator: the
driver, the test, the checker.
"""

from __future__ import annotations

import sys
import traceback
from typing import Any

#: Frames of modules under these prefixes are the emulator's plumbing, not the caller's code.
INTERNAL_PREFIXES = ("vfio_emu.shm.", "vfio_emu.linux.", __name__)


def _internal(frame: Any) -> bool:
    name = frame.f_globals.get("__name__", "")
    return isinstance(name, str) and name.startswith(INTERNAL_PREFIXES)


class Stack(tuple):  # type: ignore[type-arg]
    """A captured Python stack: (file, line, function) frames, outermost first."""

    def __str__(self) -> str:
        summary = traceback.StackSummary.from_list([(f, n, name, None) for f, n, name in self])
        return "".join(summary.format())


def capture_stack(limit: int = 16, internal: bool = False) -> Stack:
    """The stack of the code that called into the emulator, cheaply (format it later).

    internal=True keeps the emulator's own frames too: where a fault happened inside
    the emulated kernel (a release on a worker), those are the interesting ones.
    """
    frame: Any = sys._getframe(1)
    while not internal and frame is not None and _internal(frame):
        frame = frame.f_back
    frames: list[tuple[str, int, str]] = []
    while frame is not None and len(frames) < limit:
        frames.append((frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name))
        frame = frame.f_back
    return Stack(reversed(frames))


def caller_stack(limit: int = 32, max_bytes: int | None = None) -> str:
    """The caller's stack as text, innermost last; outermost frames are dropped first
    until it fits max_bytes (a WARN record's stack field)."""
    entries = traceback.format_list(list(traceback.StackSummary.from_list(
        [(f, n, name, None) for f, n, name in capture_stack(limit)])))
    while (max_bytes is not None and len(entries) > 1
           and len("".join(entries).encode()) >= max_bytes):
        entries.pop(0)
    return "".join(entries)
