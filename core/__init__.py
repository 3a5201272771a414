"""vfio-emu: emulate the Linux VFIO device life cycle in userspace.

The primitives live in a shared-memory Arena so several processes can hold
references: Refcount (refcount_t), Kref and Completion, each with the exact
Linux v6.1 semantics, and a WARN log readable from every process.  They and
every exception are re-exported here; the emulated kernel a driver programs
against is vfio_emu.linux, the driver plugins vfio_emu.plugins, the tools
vfio_emu.check.
"""

from vfio_emu.errors import (
    ArenaClosedError,
    ArenaError,
    ArenaExistsError,
    ArenaFormatError,
    ArenaFullError,
    ArenaNotFoundError,
    ArenaPermissionError,
    DoubleFreeError,
    EmulatorError,
    HangError,
    InvalidArgumentError,
    InvalidHandleError,
    KasanDoubleFree,
    KasanUseAfterFree,
    KernelOops,
    PluginError,
    ReportedError,
    UseAfterFreeError,
)
from vfio_emu.shm.arena import Arena, SlotInfo
from vfio_emu.shm.clock import MAX_SCHEDULE_TIMEOUT, Clock
from vfio_emu.shm.completion import ERESTARTSYS, UINT_MAX, Completion
from vfio_emu.shm.dmesg import WarnRecord
from vfio_emu.shm.handle import Handle, Token
from vfio_emu.shm.refcount import REFCOUNT_MAX, REFCOUNT_SATURATED, Kref, KrefArray, Refcount

__version__ = "0.1.0"

__all__ = [
    "ERESTARTSYS",
    "MAX_SCHEDULE_TIMEOUT",
    "REFCOUNT_MAX",
    "REFCOUNT_SATURATED",
    "UINT_MAX",
    "Arena",
    "ArenaClosedError",
    "ArenaError",
    "ArenaExistsError",
    "ArenaFormatError",
    "ArenaFullError",
    "ArenaNotFoundError",
    "ArenaPermissionError",
    "Clock",
    "Completion",
    "DoubleFreeError",
    "EmulatorError",
    "Handle",
    "HangError",
    "InvalidArgumentError",
    "InvalidHandleError",
    "KasanDoubleFree",
    "KasanUseAfterFree",
    "KernelOops",
    "Kref",
    "KrefArray",
    "PluginError",
    "Refcount",
    "ReportedError",
    "SlotInfo",
    "Token",
    "UseAfterFreeError",
    "WarnRecord",
    "__version__",
]
