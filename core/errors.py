"""Every exception vfio-emu raises, in one hierarchy rooted at EmulatorError.

Two families.  Refusals: the caller passed something the emulated kernel
cannot take (a bad argument, a stale handle, a broken segment, a plugin that
does not fit the hookspecs).  Reported errors: the emulated kernel found a
bug and recorded it as a Report (KASAN, an oops, a hang); the exception
carries that report, so whoever catches it can show it without reporting it
twice.
"""

from __future__ import annotations

from vfio_emu.report import Report


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


class ArenaPermissionError(ArenaError, PermissionError):
    """The segment belongs to another user, or others may access it (not mode 0600)."""


class ArenaFormatError(ArenaError):
    """The segment is not a usable vfio-emu arena: foreign, truncated, corrupt, other version."""


class ArenaFullError(ArenaError):
    """Every slot of the arena is in use."""


class ArenaClosedError(ArenaError):
    """The arena was closed in this process (or its segment shrank under it); its objects can
    no longer be reached from here."""


class InvalidHandleError(EmulatorError, ValueError):
    """A handle or token that never named a valid object: out of range, wrong kind, other arena."""


class UseAfterFreeError(EmulatorError):
    """An operation on an object that was freed (its slot may since hold another object)."""


class DoubleFreeError(UseAfterFreeError):
    """free() of an object that was already freed."""


class PluginError(EmulatorError):
    """A driver plugin could not be loaded or does not fit the hook specifications."""


# -- reported errors: the emulated kernel found a bug and recorded it ------------------

class ReportedError(EmulatorError):
    """An error that stands for a report the emulated kernel has already recorded."""

    def __init__(self, report: Report) -> None:
        super().__init__(str(report))
        self.report = report


class KernelOops(ReportedError):
    """The emulated kernel crashed (e.g. a NULL pointer dereference)."""


class HangError(ReportedError):
    """The watchdog ended a wait that would never finish (or lockdep one that would deadlock)."""


class KasanUseAfterFree(ReportedError, UseAfterFreeError):
    """KASAN: an access to kernel memory after kfree(), with the allocation and free stacks."""


class KasanDoubleFree(ReportedError, DoubleFreeError):
    """KASAN: kfree() of memory that was already freed."""
