"""The only module that touches cffi's ``lib``s: every C entry point is bound here once.

Binding to module globals keeps the hot path to one C call: no ``lib.name``
attribute lookup (measured at +40% per call) and no wrapper frame.  Two
extension modules: ``_core`` releases the GIL on every call, as cffi always
does; ``_fast`` holds only the lock-free calls that never sleep and keeps the
GIL (see csrc/build_ffi.py).
"""

from __future__ import annotations

import ctypes
from typing import Any

from vfio_emu.shm._core import ffi, lib
from vfio_emu.shm._fast import lib as fast

new = ffi.new
#: The handle type, resolved once (ffi.new() of a string looks its type up on every call).
HANDLE_P = ffi.typeof("vfio_handle_t *")
string = ffi.string
gc = ffi.gc
NULL = ffi.NULL

# Status codes and result bits (see csrc/vfio_emu.h).
E_STALE: int = lib.VFIO_E_STALE
E_RANGE: int = lib.VFIO_E_RANGE
E_KIND: int = lib.VFIO_E_KIND
E_FULL: int = lib.VFIO_E_FULL
E_NOENT: int = lib.VFIO_E_NOENT
E_EXIST: int = lib.VFIO_E_EXIST
E_FOREIGN: int = lib.VFIO_E_FOREIGN
E_VERSION: int = lib.VFIO_E_VERSION
E_TRUNCATED: int = lib.VFIO_E_TRUNCATED
E_CORRUPT: int = lib.VFIO_E_CORRUPT
E_SYS: int = lib.VFIO_E_SYS
E_INVAL: int = lib.VFIO_E_INVAL
E_INTR: int = lib.VFIO_E_INTR
E_TIMEDOUT: int = lib.VFIO_E_TIMEDOUT
E_OWNER: int = lib.VFIO_E_OWNER
RET_TRUE: int = lib.VFIO_RET_TRUE
RET_WARN: int = lib.VFIO_RET_WARN
RET_SEQ_SHIFT: int = lib.VFIO_RET_SEQ_SHIFT

KIND_FREE: int = lib.VFIO_KIND_FREE
KIND_REFCOUNT: int = lib.VFIO_KIND_REFCOUNT
KIND_KREF: int = lib.VFIO_KIND_KREF
KIND_COMPLETION: int = lib.VFIO_KIND_COMPLETION
WARN_OTHER: int = lib.VFIO_WARN_OTHER
KIND_NAMES: dict[int, str] = {
    lib.VFIO_KIND_REFCOUNT: "refcount", lib.VFIO_KIND_KREF: "kref",
    lib.VFIO_KIND_COMPLETION: "completion"}
WARN_KINDS: dict[int, str] = {
    lib.VFIO_WARN_ADD_NOT_ZERO_OVF: "ADD_NOT_ZERO_OVF",
    lib.VFIO_WARN_ADD_OVF: "ADD_OVF",
    lib.VFIO_WARN_ADD_UAF: "ADD_UAF",
    lib.VFIO_WARN_SUB_UAF: "SUB_UAF",
    lib.VFIO_WARN_DEC_LEAK: "DEC_LEAK",
    lib.VFIO_WARN_OTHER: "WARN",
}

SLOT_SIZE: int = lib.VFIO_SLOT_SIZE
LABEL_MAX: int = lib.VFIO_LABEL_MAX
WARN_STACK_MAX: int = lib.VFIO_WARN_STACK_MAX
CAPACITY_MAX: int = lib.VFIO_CAPACITY_MAX
HZ_MAX: int = lib.VFIO_HZ_MAX
TIME_SCALE_MIN: float = lib.VFIO_TIME_SCALE_MIN
TIME_SCALE_MAX: float = lib.VFIO_TIME_SCALE_MAX
WARN_SEQ_MAX: int = lib.VFIO_WARN_SEQ_MAX
WARN_CAPACITY_MAX: int = lib.VFIO_WARN_CAPACITY_MAX
REFCOUNT_MAX: int = lib.REFCOUNT_MAX
REFCOUNT_SATURATED: int = lib.REFCOUNT_SATURATED & 0xFFFFFFFF

# arena.c
arena_create: Any = lib.vfio_arena_create
arena_attach: Any = lib.vfio_arena_attach
arena_close: Any = lib.vfio_arena_close
arena_release: Any = lib.vfio_arena_release
arena_info: Any = lib.vfio_arena_info
arena_set_spin: Any = lib.vfio_arena_set_spin
arena_in_use: Any = lib.vfio_arena_in_use
proc_start_time: Any = lib.vfio_proc_start_time
shm_unlink: Any = lib.vfio_shm_unlink
slot_alloc: Any = lib.vfio_slot_alloc
slot_free: Any = lib.vfio_slot_free
slot_info: Any = lib.vfio_slot_info
slot_churn: Any = lib.vfio_slot_churn
handle_open: Any = lib.vfio_handle_open
noop: Any = lib.vfio_noop
noop_gil: Any = fast.vfio_noop_gil

#: RefOps(address, handle, slow, put_slow): the C type whose bound get/put are a Kref's
#: (csrc/pyref.c).  The module hands out its address; ctypes turns that into the type.
RefOps: Any = ctypes.cast(fast.vfio_refops_type(), ctypes.py_object).value


def address(h: Any) -> int:
    """A handle's address, for RefOps."""
    return int(ffi.cast("uintptr_t", h))
monotonic_ns: Any = lib.vfio_monotonic_ns

# refcount.c
refcount_set: Any = fast.vfio_refcount_set
refcount_read: Any = fast.vfio_refcount_read
refcount_inc: Any = fast.vfio_refcount_inc
refcount_add: Any = fast.vfio_refcount_add
refcount_inc_not_zero: Any = fast.vfio_refcount_inc_not_zero
refcount_add_not_zero: Any = fast.vfio_refcount_add_not_zero
refcount_dec_and_test: Any = fast.vfio_refcount_dec_and_test
refcount_sub_and_test: Any = fast.vfio_refcount_sub_and_test
refcount_dec: Any = fast.vfio_refcount_dec
refcount_dec_if_one: Any = fast.vfio_refcount_dec_if_one
refcount_dec_not_one: Any = fast.vfio_refcount_dec_not_one
refcount_inc_many: Any = lib.vfio_refcount_inc_many
refcount_dec_and_test_many: Any = lib.vfio_refcount_dec_and_test_many
kref_pairs: Any = lib.vfio_kref_pairs
refcount_inc_array: Any = lib.vfio_refcount_inc_array
refcount_dec_and_test_array: Any = lib.vfio_refcount_dec_and_test_array

# completion.c
completion_reinit: Any = fast.vfio_completion_reinit
completion_complete: Any = fast.vfio_completion_complete
completion_complete_all: Any = fast.vfio_completion_complete_all
completion_try_wait: Any = fast.vfio_completion_try_wait
completion_done: Any = fast.vfio_completion_done
completion_read: Any = fast.vfio_completion_read
completion_waiters: Any = fast.vfio_completion_waiters
completion_wait: Any = lib.vfio_completion_wait

# warn.c
warn_text: Any = lib.vfio_warn_text
warn_emit: Any = lib.vfio_warn_emit
warn_read: Any = lib.vfio_warn_read
warn_set_stack: Any = lib.vfio_warn_set_stack
