"""One small exception hierarchy, rooted at EmulatorError, for everything vfio-emu refuses."""

from __future__ import annotations


class EmulatorError(Exception):
    """Base of every error vfio-emu raises."""


class InvalidArgumentError(EmulatorError, ValueError):
    """A caller passed a value the emulated kernel API cannot take (names the argument)."""


class ArenaError(EmulatorError):
    """Creating, attaching to or using a shared-memory arena failed."""


class ArenaNotFoundError(ArenaError, FileNotFoundError):
    """No segment of that name exists."""


class ArenaExistsError(ArenaError, FileExistsError):
    """A segment of that name already exists (arenas are created exclusively)."""


class ArenaFormatError(ArenaError):
    """The segment is not a usable vfio-emu arena: foreign, truncated, corrupt, other version."""


class ArenaFullError(ArenaError):
    """Every slot of the arena is in use."""


class ArenaClosedError(ArenaError):
    """The arena was closed in this process; its objects can no longer be reached from here."""


class InvalidHandleError(EmulatorError, ValueError):
    """A handle or token that never named a valid object: out of range, wrong kind, other arena."""


class UseAfterFreeError(EmulatorError):
    """An operation on an object that was freed (its slot may since hold another object)."""


class DoubleFreeError(UseAfterFreeError):
    """free() of an object that was already freed."""
