"""What every arena object shares: its (slot, generation) handle, tokens, pickling, free().

A handle is a small private C struct {slot pointer, arena, index, gen}.
Every C entry point compares the slot's generation with the handle's
before it touches the object, so a handle to a freed or reused slot is
reported, never silently accepted.  The hot-path methods of subclasses
call one bound C function and branch to the slow path here only when C
returned something other than a plain success.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

from vfio_emu.errors import (
    ArenaClosedError,
    DoubleFreeError,
    EmulatorError,
    InvalidArgumentError,
    InvalidHandleError,
    UseAfterFreeError,
)
from vfio_emu.shm import _binding as C
from vfio_emu.shm import dmesg

if TYPE_CHECKING:
    from vfio_emu.shm.arena import Arena

KIND_NAMES = C.KIND_NAMES
KIND_BY_NAME = {name: kind for kind, name in KIND_NAMES.items()}


class Token(NamedTuple):
    """A small picklable reference to an object, for another process that attached the arena.

    incarnation names the arena itself, not just its name: a token of an arena that was
    closed and re-created under the same name never opens an object of the new one.
    """

    arena: str
    incarnation: int
    kind: str
    slot: int
    gen: int


#: Only the arena makes handles: a handle made by hand could point anywhere.
_ARENA_ONLY = object()


class Handle:
    """Base of Refcount, Kref and Completion: an object living in an arena slot.

    Objects come from an Arena (arena.kref(), arena.open(token), unpickling),
    never from calling these classes.
    """

    __slots__ = ("__weakref__", "_arena", "_h", "_label")
    KIND: ClassVar[int] = 0

    def __init__(self, arena: Arena, h: Any, label: str, *, _key: object = None) -> None:
        if _key is not _ARENA_ONLY:
            raise TypeError(f"{type(self).__name__} objects come from an Arena "
                            f"(e.g. arena.{KIND_NAMES.get(self.KIND, 'kref')}()), not from "
                            "the class")
        self._arena = arena
        self._h = h
        self._label = label

    @property
    def arena(self) -> Arena:
        return self._arena

    @property
    def index(self) -> int:
        """Slot index in the arena."""
        return int(self._h.index)

    @property
    def gen(self) -> int:
        """Generation of the slot when this object was allocated."""
        return int(self._h.gen)

    @property
    def label(self) -> str:
        """The label given at allocation (also kept in the slot, for other processes)."""
        return self._label

    @property
    def token(self) -> Token:
        """A reference another process can pass to Arena.open()."""
        return Token(self._arena.name, self._arena.incarnation, KIND_NAMES[self.KIND],
                     self.index, self.gen)

    def __reduce__(self) -> tuple[Any, ...]:
        # The arena's bound _open pickles as the arena (attached, or reused, on the other
        # side) and the method name: unpickling reopens the same object there.
        return (self._arena._open, (self.KIND, self.index, self.gen, self._arena.incarnation))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._describe()}>"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Handle)
            and type(other) is type(self)
            and other._arena is self._arena
            and other.index == self.index
            and other.gen == self.gen
        )

    def __hash__(self) -> int:
        return hash((id(self._arena), self.index, self.gen))

    def free(self) -> None:
        """Return the slot to the arena; any later use of this object is a use-after-free."""
        rc = C.slot_free(self._h)
        if rc:
            raise self._error(rc, "free")

    def _describe(self) -> str:
        name = f"'{self._label}' " if self._label else ""
        return (f"{KIND_NAMES[self.KIND]} {name}(slot {self.index}, gen {self.gen}, "
                f"arena '{self._arena.name}')")

    def _error(self, rc: int, op: str) -> EmulatorError:
        """Turn a C status into the exception that names the object and the operation."""
        if self._arena.closed:
            return ArenaClosedError(f"{op}() on {self._describe()}: "
                                    f"{self._arena._closed_why()}")
        if rc == C.E_STALE:
            now = self._arena._slot_state(self.index)
            if op == "free":
                return DoubleFreeError(f"double-free of {self._describe()}; the slot {now}")
            return UseAfterFreeError(
                f"use-after-free: {op}() on freed {self._describe()}; the slot {now}")
        if rc in (C.E_RANGE, C.E_KIND):
            return InvalidHandleError(f"{op}(): invalid handle {self._describe()}")
        return EmulatorError(f"{op}() on {self._describe()} failed with status {rc}")

    def _slow(self, r: int, op: str) -> int:
        """Everything but a plain success: raise on error, attach the stack to a WARN."""
        if r < 0:
            raise self._error(r, op)
        if r & C.RET_WARN:
            dmesg.attach_stack(self._arena._ptr, r >> C.RET_SEQ_SHIFT)
        return r & C.RET_TRUE


def int32(value: object, what: str) -> int:
    """A C int argument: any int in signed or unsigned 32-bit range, as signed."""
    if type(value) is not int:
        raise InvalidArgumentError(f"{what} must be an int, not {type(value).__name__}")
    if not -(1 << 31) <= value < (1 << 32):
        raise InvalidArgumentError(f"{what}={value} does not fit in 32 bits")
    return value - (1 << 32) if value >= (1 << 31) else value
