"""The shared-memory arena: where every refcount, kref and completion lives.

Several processes attach the same named segment and hold references to the
same objects.  The creator owns the segment: closing it (or the context
manager, or interpreter exit) unlinks it; a process that only attached never
unlinks.  The C core keeps the segment consistent on its own - there are no
locks in it - so an exception, a signal or a killed process leaves it usable.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from vfio_emu.errors import (
    ArenaClosedError,
    ArenaError,
    ArenaExistsError,
    ArenaFormatError,
    ArenaFullError,
    ArenaNotFoundError,
    ArenaPermissionError,
    EmulatorError,
    InvalidArgumentError,
    InvalidHandleError,
    UseAfterFreeError,
)
from vfio_emu.shm import _binding as C
from vfio_emu.shm import dmesg as _dmesg
from vfio_emu.shm.clock import Clock
from vfio_emu.shm.completion import WAIT_SLICE_NS, Completion
from vfio_emu.shm.dmesg import WarnRecord
from vfio_emu.shm.handle import _ARENA_ONLY, KIND_BY_NAME, KIND_NAMES, Handle, Token, int32
from vfio_emu.shm.refcount import Kref, Refcount
from vfio_emu.stack import caller_stack

_H = TypeVar("_H", bound=Handle)
_CLASSES: dict[int, type[Handle]] = {
    C.KIND_REFCOUNT: Refcount, C.KIND_KREF: Kref, C.KIND_COMPLETION: Completion}

#: Arenas open in this process by name, so unpickled handles find their mapping.
_open_arenas: weakref.WeakValueDictionary[str, Arena] = weakref.WeakValueDictionary()

_FORMAT_PROBLEMS = {
    C.E_FOREIGN: "is not a vfio-emu arena (no vfio-emu magic in its header; "
                 "or its creator has not finished creating it)",
    C.E_VERSION: "has another layout version than this vfio-emu",
    C.E_TRUNCATED: "is truncated: smaller than its header says",
    C.E_CORRUPT: "is corrupt: its header fields contradict each other or the segment size",
}


@dataclass(frozen=True)
class SlotInfo:
    """A snapshot of one live object, for leak listings."""

    kind: str
    index: int
    gen: int
    label: str
    value: int
    owner_pid: int


@dataclass(frozen=True)
class Segment:
    """One arena segment found in /dev/shm: what `vfio-emu arenas` lists."""

    name: str
    size: int
    creator_pid: int
    creator_alive: bool
    capacity: int
    in_use: int

    @property
    def orphaned(self) -> bool:
        """Its creator - who alone would unlink it - is dead (e.g. killed with SIGKILL)."""
        return not self.creator_alive


#: Where POSIX shared-memory segments live on Linux.
SHM_DIR = "/dev/shm"


def segments(shm_dir: str = SHM_DIR) -> list[Segment]:
    """Every vfio-emu arena segment of this user, by name; other segments are left alone."""
    found = []
    for name in sorted(os.listdir(shm_dir)):
        path = os.path.join(shm_dir, name)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue  # unlinked meanwhile
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            continue
        try:
            arena = Arena.attach(name)
        except (ArenaError, InvalidArgumentError):
            continue  # not an arena of ours (or one we refuse to map)
        try:
            found.append(Segment(name, st.st_size, arena.creator_pid, arena.creator_alive,
                                 arena.capacity, arena.in_use))
        finally:
            arena.close()
    return found


def _check_name(name: object) -> str:
    if not isinstance(name, str):
        raise InvalidArgumentError(f"arena name must be a str, not {type(name).__name__}")
    if (not name or len(name.encode("utf-8", "surrogatepass")) > 200 or "/" in name
            or "\0" in name or name in (".", "..")):
        raise InvalidArgumentError(
            f"arena name {name!r} is not a valid shared-memory name "
            "(1 to 200 bytes of UTF-8, no '/' or NUL)")
    return name


def _os_error(rc: int, err: int, name: str) -> ArenaError:
    if rc == C.E_NOENT:
        return ArenaNotFoundError(f"no arena named '{name}' (no such shared-memory segment)")
    if rc == C.E_EXIST:
        return ArenaExistsError(f"a shared-memory segment named '{name}' already exists")
    if rc in _FORMAT_PROBLEMS:
        return ArenaFormatError(f"segment '{name}' {_FORMAT_PROBLEMS[rc]}")
    if rc == C.E_OWNER:
        return ArenaPermissionError(
            f"segment '{name}' is not private to this user (another owner, or not mode "
            "0600): whoever else can write it could shrink it under us")
    if err == errno.ENOSPC:
        return ArenaError(f"arena '{name}': no space left for the segment (is /dev/shm full?)")
    return ArenaError(f"arena '{name}': {os.strerror(err) if err else f'status {rc}'}")


_new_handle = object.__new__


def close_owned() -> None:
    """Close, and so unlink, every arena this process created and still has open: for a
    forked child to call before os._exit(), which runs no finalizer (the arenas it inherited
    are its parent's, and stay)."""
    for arena in list(_open_arenas.values()):
        if arena._finalizer is not None and arena._pid == os.getpid() and not arena.closed:
            with contextlib.suppress(ArenaError):
                arena.close()


def _unlink_at_exit(name: str, creator_pid: int) -> None:
    """Safety net for a creator that never closed: unlink at collection or exit."""
    if os.getpid() == creator_pid:
        C.shm_unlink(("/" + name).encode(), C.new("int *"))


class Arena:
    """A named shared-memory segment of fixed-size object slots and a WARN ring."""

    def __init__(self, ptr: Any, name: str, owner: bool, *, _key: object = None) -> None:
        """Use Arena.create() or Arena.attach()."""
        if _key is not _ARENA_ONLY:
            raise TypeError("arenas come from Arena.create() or Arena.attach()")
        self._ptr = C.gc(ptr, C.arena_release)
        self._name = name
        self._pid = os.getpid()
        info = self._info()
        self._capacity = int(info.capacity)
        self._warn_capacity = int(info.warn_capacity)
        self._incarnation = int(info.incarnation)
        self._creator_pid = int(info.creator_pid)
        self._creator_start = int(info.creator_start)
        self._clock = Clock(hz=int(info.hz), time_scale=float(info.time_scale),
                            epoch_ns=int(info.created_ns))
        self._finalizer = (weakref.finalize(self, _unlink_at_exit, name, self._pid)
                           if owner else None)
        known = _open_arenas.get(name)
        if known is None or known.closed:
            _open_arenas[name] = self

    # -- life cycle -------------------------------------------------------

    @classmethod
    def create(cls, capacity: int = 1024, name: str | None = None, *, hz: int = 250,
               time_scale: float = 1.0, warn_capacity: int = 256) -> Arena:
        """Create a new segment exclusively (mode 0600) and own it.

        capacity: number of object slots (1 to 4 Mi).  hz and time_scale
        set the emulated clock (see vfio_emu.shm.clock).  warn_capacity: how
        many WARN records the ring keeps before overwriting the oldest.
        """
        if name is None:
            name = f"vfio-emu-{os.getpid()}-{secrets.token_hex(4)}"
        _check_name(name)
        for what, value, top in (("capacity", capacity, C.CAPACITY_MAX),
                                 ("warn_capacity", warn_capacity, C.WARN_CAPACITY_MAX)):
            if type(value) is not int or not 1 <= value <= top:
                raise InvalidArgumentError(f"{what}={value!r} must be an int from 1 to {top}")
        if type(hz) is not int or not 1 <= hz <= C.HZ_MAX:
            raise InvalidArgumentError(f"hz={hz!r} must be an int from 1 to {C.HZ_MAX}")
        if (not isinstance(time_scale, (int, float)) or isinstance(time_scale, bool)
                or not C.TIME_SCALE_MIN <= time_scale <= C.TIME_SCALE_MAX):
            raise InvalidArgumentError(f"time_scale={time_scale!r} must be a number from "
                                       f"{C.TIME_SCALE_MIN:g} to {C.TIME_SCALE_MAX:g}")
        out, err = C.new("vfio_arena_t **"), C.new("int *")
        rc = C.arena_create(("/" + name).encode(), capacity, warn_capacity, hz,
                            float(time_scale), out, err)
        if rc:
            raise _os_error(rc, err[0], name)
        return cls(out[0], name, owner=True, _key=_ARENA_ONLY)

    @classmethod
    def attach(cls, name: str) -> Arena:
        """Map an existing arena; refuses a missing, foreign, truncated or other-version one."""
        _check_name(name)
        out, err = C.new("vfio_arena_t **"), C.new("int *")
        rc = C.arena_attach(("/" + name).encode(), out, err)
        if rc:
            raise _os_error(rc, err[0], name)
        return cls(out[0], name, owner=False, _key=_ARENA_ONLY)

    @staticmethod
    def unlink(name: str) -> None:
        """Remove a segment by name, e.g. one left behind by a creator that was killed."""
        _check_name(name)
        err = C.new("int *")
        rc = C.shm_unlink(("/" + name).encode(), err)
        if rc:
            raise _os_error(rc, err[0], name)

    def close(self) -> None:
        """Unmap this process's view; the creator also unlinks the segment.

        Objects of this arena raise ArenaClosedError afterwards (their
        memory is replaced by private zero pages, so nothing can crash).
        """
        if self.closed and (self._finalizer is None or not self._finalizer.alive):
            return  # (a view lost to a truncation still has its name to unlink)
        owner = self.owner
        err = C.new("int *")
        rc = C.arena_close(self._ptr, int(owner), err)
        if rc and not self.closed:
            raise ArenaError(f"closing arena '{self._name}': {os.strerror(err[0])}")
        if self._finalizer is not None:
            self._finalizer.detach()
        if _open_arenas.get(self._name) is self:
            del _open_arenas[self._name]
        if rc and err[0] != errno.ENOENT:  # already unlinked by hand: nothing left to do
            raise ArenaError(f"unlinking arena '{self._name}': {os.strerror(err[0])}")

    def __enter__(self) -> Arena:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> tuple[Any, ...]:
        return (_attach_cached, (self._name, self._incarnation))

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.in_use}/{self._capacity} slots in use"
        return f"<Arena '{self._name}' {state}>"

    # -- properties ---------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def in_use(self) -> int:
        """Objects currently allocated, across all processes (counted slot by slot)."""
        self._open_info()
        return int(C.arena_in_use(self._ptr))

    @property
    def incarnation(self) -> int:
        """This segment's identity: new at every create, even under a name used before."""
        return self._incarnation

    @property
    def creator_pid(self) -> int:
        return self._creator_pid

    @property
    def creator_alive(self) -> bool:
        """Whether the process that created the segment still runs (a pid reused by another
        process does not count: its start time differs)."""
        return _alive(self._creator_pid, self._creator_start)

    @property
    def lost(self) -> bool:
        """The segment shrank under this process (truncated by another process of this user):
        the view was closed instead of dying of SIGBUS."""
        return bool(self._info().lost)

    @property
    def owner(self) -> bool:
        """True in the process that created the segment (and will unlink it)."""
        return self._finalizer is not None and os.getpid() == self._pid

    @property
    def closed(self) -> bool:
        return bool(self._info().closed)

    @property
    def clock(self) -> Clock:
        """The emulated clock shared by every process of this arena."""
        return self._clock

    @property
    def spin_ns(self) -> int:
        """How long (real ns) a wait spins before it sleeps in this process; 0 on one CPU."""
        return int(self._info().spin_ns)

    @spin_ns.setter
    def spin_ns(self, value: int) -> None:
        if type(value) is not int or not 0 <= value <= WAIT_SLICE_NS:
            raise InvalidArgumentError(
                f"spin_ns={value!r} must be an int from 0 to {WAIT_SLICE_NS} (one wait slice)")
        C.arena_set_spin(self._ptr, value)

    # -- objects ----------------------------------------------------------------

    def refcount(self, value: int = 1, label: str | None = None) -> Refcount:
        """A refcount_t set to value (REFCOUNT_INIT(value))."""
        n = value if type(value) is int and -(1 << 31) <= value < (1 << 31) else int32(
            value, "value")
        r = self._alloc(Refcount, label)
        C.refcount_set(r._h, n)
        return r

    def kref(self, label: str | None = None,
             release: Callable[[Kref], object] | None = None, *, count: int = 1) -> Kref:
        """A kref after kref_init() (count 1); release is the default for put().
        count=0: the kref of zeroed memory, before its kref_init()."""
        if count not in (0, 1):
            raise InvalidArgumentError(f"count={count!r}: a new kref holds 1, or 0 (zeroed)")
        k = self._alloc(Kref, label)
        C.refcount_set(k._h, count)
        k.release = release  # what Kref.__init__ adds (_alloc does not run it)
        k._bind()
        return k

    def completion(self, label: str | None = None) -> Completion:
        """A completion after init_completion() (done = 0)."""
        return self._alloc(Completion, label)

    def open(self, token: Token | tuple[str, int, str, int, int]) -> Any:
        """Reopen an object from its token (as another process sends it)."""
        try:
            arena, incarnation, kind, index, gen = token
        except (TypeError, ValueError):
            raise InvalidHandleError(f"{token!r} is not an object token") from None
        if arena != self._name:
            raise InvalidHandleError(
                f"token {tuple(token)!r} belongs to arena '{arena}', not '{self._name}'")
        if not isinstance(kind, str) or kind not in KIND_BY_NAME:
            raise InvalidHandleError(f"token {tuple(token)!r}: unknown object kind {kind!r}")
        return self._open(KIND_BY_NAME[kind], index, gen, incarnation)

    def objects(self) -> list[SlotInfo]:
        """Every live object, across all processes: the raw material of a leak report."""
        info = C.new("vfio_slot_info_t *")
        out = []
        for index in range(self._capacity):
            if C.slot_info(self._ptr, index, info):
                raise ArenaClosedError(self._closed_why())
            if info.gen & 1 and info.kind in KIND_NAMES:
                value = info.done if info.kind == C.KIND_COMPLETION else info.refs & 0xFFFFFFFF
                out.append(SlotInfo(KIND_NAMES[info.kind], index, int(info.gen),
                                    C.string(info.label).decode("utf-8", "replace"),
                                    int(value), int(info.owner_pid)))
        return out

    # -- WARN log --------------------------------------------------------------

    def dmesg(self, since: int = 0) -> list[WarnRecord]:
        """WARN records with a sequence number above since, oldest first, from every process.

        Records already overwritten by the ring, or still being written, are not returned.
        """
        if type(since) is not int or since < 0:
            raise InvalidArgumentError(f"since={since!r} must be a non-negative int")
        info = self._open_info()
        return _dmesg.read(self._ptr, since, int(info.warn_head), self._warn_capacity)

    @property
    def warn_seq(self) -> int:
        """Sequence number of the newest WARN (pass it to dmesg(since=...) later)."""
        return int(self._open_info().warn_head)

    @property
    def warn_dropped(self) -> int:
        """WARNs the ring could not record (a record busy with a live writer)."""
        return int(self._open_info().warn_dropped)

    def warn(self, text: str, obj: Handle | None = None) -> WarnRecord:
        """Record a WARN raised by a higher layer, with the caller's stack.

        Returns the record as logged; if the ring could not keep it (seq 0,
        counted in warn_dropped) or it was overwritten at once, the record as
        it would have been logged.
        """
        if not isinstance(text, str):
            raise InvalidArgumentError(f"WARN text must be a str, not {type(text).__name__}")
        if obj is not None and (not isinstance(obj, Handle) or obj._arena is not self):
            raise InvalidArgumentError(f"{obj!r} is not an object of arena '{self._name}'")
        h = obj._h if obj is not None else C.NULL
        seq = C.warn_emit(self._ptr, h, C.WARN_OTHER, text.encode("utf-8", "replace"))
        if seq < 0:
            if obj is not None:
                raise obj._error(seq, "warn")
            raise ArenaClosedError(self._closed_why())
        _dmesg.attach_stack(self._ptr, seq)
        logged = _dmesg.read(self._ptr, seq - 1, seq, self._warn_capacity) if seq else []
        if logged:
            return logged[0]
        return WarnRecord(
            seq=seq, kind="WARN", text=text, pid=os.getpid(), tid=threading.get_native_id(),
            time_ns=time.monotonic_ns(),
            object_kind=KIND_NAMES[obj.KIND] if obj is not None else "",
            object_index=obj.index if obj is not None else 0xFFFFFFFF,
            object_gen=obj.gen if obj is not None else 0,
            label=obj.label if obj is not None else "", old=0, new=0,
            stack=caller_stack(max_bytes=C.WARN_STACK_MAX))

    # -- internals ---------------------------------------------------------------

    def _info(self) -> Any:
        info = C.new("vfio_arena_info_t *")
        C.arena_info(self._ptr, info)
        return info

    def _open_info(self) -> Any:
        info = self._info()
        if info.closed:
            raise ArenaClosedError(self._closed_why())
        return info

    def _alloc(self, cls: type[_H], label: str | None) -> _H:
        if label is not None and not isinstance(label, str):
            raise InvalidArgumentError(f"label must be a str, not {type(label).__name__}")
        if label and "\0" in label:
            raise InvalidArgumentError(f"label {label!r} contains a NUL character")
        if label and label.isascii() and len(label) < C.LABEL_MAX:
            raw = label.encode()  # fits as it is (the common case)
            text = label
        else:
            # Cut to the slot's field on a character boundary, so every reader decodes the same.
            raw = (label or "").encode("utf-8", "replace")[: C.LABEL_MAX - 1]
            text = raw.decode("utf-8", "ignore")
            raw = text.encode()
        h = C.new(C.HANDLE_P)
        rc = C.slot_alloc(self._ptr, cls.KIND, raw, h)
        if rc == C.E_FULL:
            raise ArenaFullError(
                f"arena '{self._name}' is full: all {self._capacity} slots are in use")
        if rc:
            raise self._status_error(rc, "allocate")
        # cls(self, h, text, _key=_ARENA_ONLY), its fields stored in place (kref() adds what
        # Kref.__init__ adds)
        obj = _new_handle(cls)
        obj._arena, obj._h, obj._label = self, h, text
        return obj

    def _open(self, kind: object, index: object, gen: object, incarnation: object) -> Any:
        if type(kind) is not int or kind not in _CLASSES:
            raise InvalidHandleError(f"object kind {kind!r} is not one of {sorted(_CLASSES)}")
        if incarnation != self._incarnation:
            raise UseAfterFreeError(
                f"use-after-free: {KIND_NAMES[kind]} slot {index!r} gen {gen!r} belongs to an "
                f"earlier arena named '{self._name}' (incarnation {incarnation!r}), which is "
                f"gone; '{self._name}' is now incarnation {self._incarnation:#x}")
        if type(index) is not int or type(gen) is not int:
            raise InvalidHandleError(f"slot index and generation must be ints: {index!r}, {gen!r}")
        if not 0 <= index < self._capacity:
            raise InvalidHandleError(
                f"slot {index} is out of range for arena '{self._name}' "
                f"(capacity {self._capacity})")
        if not 0 <= gen < (1 << 32) or not gen & 1:
            raise InvalidHandleError(
                f"generation {gen} never named an object (allocated generations are odd "
                "32-bit numbers)")
        h = C.new("vfio_handle_t *")
        rc = C.handle_open(self._ptr, index, gen, kind, h)
        if rc == C.E_STALE and not self.closed:
            raise UseAfterFreeError(
                f"use-after-free: open() of {KIND_NAMES[kind]} slot {index} gen {gen} "
                f"in arena '{self._name}'; the slot {self._slot_state(index)}")
        if rc == C.E_KIND:
            raise InvalidHandleError(
                f"slot {index} of arena '{self._name}' does not hold a {KIND_NAMES[kind]}; "
                f"it {self._slot_state(index)}")
        if rc:
            raise self._status_error(rc, "open")
        return _CLASSES[kind](self, h, self._slot_label(index), _key=_ARENA_ONLY)

    def _status_error(self, rc: int, op: str) -> EmulatorError:
        if self.closed:
            return ArenaClosedError(f"{op}: {self._closed_why()}")
        if rc == C.E_RANGE:
            return InvalidHandleError(f"{op}: slot out of range in arena '{self._name}'")
        if rc == C.E_CORRUPT:
            return ArenaFormatError(f"{op}: arena '{self._name}' free list is corrupt")
        return ArenaError(f"{op} in arena '{self._name}' failed with status {rc}")

    def _closed_why(self) -> str:
        if self.lost:
            return (f"arena '{self._name}' is closed: its segment shrank under this process "
                    "(another process truncated it), so its objects are gone from here")
        return f"arena '{self._name}' is closed"

    def _slot_info(self, index: int) -> Any:
        info = C.new("vfio_slot_info_t *")
        if C.slot_info(self._ptr, index, info):
            raise ArenaClosedError(self._closed_why())
        return info

    def _slot_label(self, index: int) -> str:
        info = self._slot_info(index)  # keep it alive: .label does not
        return str(C.string(info.label).decode("utf-8", "replace"))

    def _slot_state(self, index: int) -> str:
        """What the slot holds now, for use-after-free reports."""
        info = self._slot_info(index)
        if not info.gen & 1:
            return f"is free (gen {info.gen})"
        label = C.string(info.label).decode("utf-8", "replace")
        name = f" '{label}'" if label else ""
        return (f"now holds {KIND_NAMES.get(info.kind, '?')}{name} gen {info.gen} "
                f"of pid {info.owner_pid}")


def _attach_cached(name: str, incarnation: int) -> Arena:
    """Unpickle an Arena: reuse this process's mapping if it has one - of that incarnation."""
    arena = _open_arenas.get(name)
    if arena is None or arena.closed:
        arena = Arena.attach(name)
    if arena.incarnation != incarnation:
        raise ArenaNotFoundError(
            f"the arena '{name}' this was pickled from (incarnation {incarnation!r}) is gone; "
            f"a new arena has its name (incarnation {arena.incarnation:#x})")
    return arena


def _alive(pid: int, start: int) -> bool:
    return bool(start) and int(C.proc_start_time(pid)) == start

