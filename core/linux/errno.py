"""The errnos the life cycle returns (include/uapi/asm-generic/errno-base.h, errno.h).

Kernel functions return them negated (-ENOMEM), as in C.
"""

from __future__ import annotations

from vfio_emu.shm.completion import ERESTARTSYS

EPERM = 1
ENOENT = 2
EAGAIN = 11
ENOMEM = 12
EBUSY = 16
EEXIST = 17
ENODEV = 19
EINVAL = 22
ENOSPC = 28
EUSERS = 87

__all__ = ["EAGAIN", "EBUSY", "EEXIST", "EINVAL", "ENODEV", "ENOENT", "ENOMEM", "ENOSPC", "EPERM",
           "ERESTARTSYS", "EUSERS"]
