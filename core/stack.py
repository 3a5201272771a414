"""Python call stacks, captured cheaply and printed the way the kernel prints a call trace.

Capturing walks the frames and keeps each one's code object and instruction offset;
the (file, line, function) triples are worked out, and source lines looked up, only
when a stack is read or printed, which for allocation and free stacks is almost never.
The emulator's own frames - every module of the shared-memory and emulated-kernel
layers - are skipped from the innermost end, so a stack starts at the code that called
into the emulator: the driver, the test, the checker.
"""

from __future__ import annotations

import ctypes
import os
import sys
import traceback
from collections.abc import Iterable, Iterator, Sequence
from types import CodeType
from typing import Any, Protocol, overload

from vfio_emu._stackwalk import lib as _stackwalk

#: Frames of modules under these prefixes are the emulator's plumbing, not the caller's code.
INTERNAL_PREFIXES = ("vfio_emu.shm.", "vfio_emu.linux.", __name__)

Frame = tuple[str, int, str]

#: This process's pid, as getpid() returns it: the busiest paths (a trace event, an
#: allocation) read it here without a call.
PID = os.getpid()


def _forked() -> None:
    global PID
    PID = os.getpid()


os.register_at_fork(after_in_child=_forked)


def getpid() -> int:
    """os.getpid() without its system call: the task a stack, a trace event or a record is
    of (kept per process, and taken anew in a forked child)."""
    return PID


def _internal(frame: Any) -> bool:
    name = frame.f_globals.get("__name__", "")
    return isinstance(name, str) and name.startswith(INTERNAL_PREFIXES)


#: Whether a code object's frames are the emulator's own (_internal), by id(code); the code
#: object is kept alongside, so its id is never reused for another one.
_INTERNAL_CODE: dict[int, tuple[bool, CodeType]] = {}


def _internal_code(frame: Any) -> bool:
    """_internal(frame), remembered for the frame's code object (a code object runs in the
    module that compiled it)."""
    code = frame.f_code
    known = _INTERNAL_CODE.get(id(code))
    if known is None:
        known = _INTERNAL_CODE[id(code)] = (_internal(frame), code)
    return known[0]


def _line(code: CodeType, lasti: int) -> int | None:
    """The line of the instruction at byte offset lasti: what frame.f_lineno says."""
    if lasti < 0:
        return code.co_firstlineno
    for start, end, line in code.co_lines():
        if start <= lasti < end:
            return line
    return None


class Stack(Sequence[Frame]):
    """A captured Python stack: (file, line, function) frames, outermost first.

    capture_stack() keeps (code, offset) pairs; the triples are made on first use.
    """

    __slots__ = ("_data",)

    def __init__(self, frames: Iterable[Frame] = ()) -> None:
        #: The frames; or, as capture_stack() left them, a list innermost first: code,
        #: offset, code, offset...
        self._data: tuple[Frame, ...] | list[Any] = tuple(frames)

    @property
    def frames(self) -> tuple[Frame, ...]:
        data = self._data
        if isinstance(data, tuple):
            return data
        frames = self._data = tuple(
            (code.co_filename, _line(code, lasti), code.co_name)  # type: ignore[misc]
            for code, lasti in zip(data[-2::-2], data[-1::-2], strict=True))
        return frames

    @overload
    def __getitem__(self, index: int) -> Frame: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[Frame, ...]: ...

    def __getitem__(self, index: int | slice) -> Frame | tuple[Frame, ...]:
        return self.frames[index]

    def __len__(self) -> int:
        data = self._data
        return len(data) if isinstance(data, tuple) else len(data) // 2

    def __iter__(self) -> Iterator[Frame]:
        return iter(self.frames)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Stack):
            return self.frames == other.frames
        if isinstance(other, tuple):
            return self.frames == other
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.frames)

    def __repr__(self) -> str:
        return f"Stack({self.frames!r})"

    def __str__(self) -> str:
        summary = traceback.StackSummary.from_list([(f, n, name, None)
                                                    for f, n, name in self.frames])
        return "".join(summary.format())


_new_stack = object.__new__


def capture_stack_py(limit: int = 16, internal: bool = False) -> Stack:
    """capture_stack() in Python: what the C walk (csrc/pystack.c) does, and what its
    tests hold it to."""
    frame: Any = sys._getframe(1)
    if not internal:
        known = _INTERNAL_CODE
        while frame is not None:
            hit = known.get(id(frame.f_code))
            if not (_internal_code(frame) if hit is None else hit[0]):
                break
            frame = frame.f_back
    raw: list[Any] = []
    append = raw.append
    while frame is not None and limit > 0:
        append(frame.f_code)
        append(frame.f_lasti)
        frame = frame.f_back
        limit -= 1
    stack = _new_stack(Stack)
    stack._data = raw
    return stack


class _Capture(Protocol):
    def __call__(self, limit: int = 16, internal: bool = False) -> Stack: ...


#: capture_stack(limit=16, internal=False): the stack of the code that called into the
#: emulator, cheaply (format it later).  internal=True keeps the emulator's own frames
#: too: where a fault happened inside the emulated kernel (a release on a worker), those
#: are the interesting ones.
#:
#: It runs several times per life-cycle transition, so the walk is C (csrc/pystack.c): the
#: walk of capture_stack_py(), over the same frame API.  A C method has no frame of its
#: own: the frame it starts from is its caller's, as sys._getframe(1) is in Python.
#: (The module hands out its type's address; ctypes turns that into the type.)
_StackCapture: Any = ctypes.cast(_stackwalk.vfio_stackcapture_type(), ctypes.py_object).value
capture_stack: _Capture = _StackCapture(Stack, _INTERNAL_CODE, _internal_code).capture


def caller_stack(limit: int = 32, max_bytes: int | None = None) -> str:
    """The caller's stack as text, innermost last; outermost frames are dropped first
    until it fits max_bytes (a WARN record's stack field)."""
    entries = traceback.format_list(list(traceback.StackSummary.from_list(
        [(f, n, name, None) for f, n, name in capture_stack(limit)])))
    while (max_bytes is not None and len(entries) > 1
           and len("".join(entries).encode()) >= max_bytes):
        entries.pop(0)
    return "".join(entries)
