"""Kernel memory (include/linux/slab.h): kzalloc/kfree, watched by KASAN.

A struct the emulated kernel allocates (the driver's private struct with its
embedded vfio_device, an mdev parent, an mdev device) subclasses Tracked and
comes from kzalloc().  Freeing it poisons it: any later attribute read or
write through a stale reference is reported with the Python stacks of the
allocation and of the free, as KASAN prints them, and raises
KasanUseAfterFree (a UseAfterFreeError carrying its report).  A second free
is KASAN's double-free.  kzalloc() returns None (NULL) when failslab fails it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from vfio_emu import stack as _stack
from vfio_emu.errors import InvalidArgumentError, KasanDoubleFree, KasanUseAfterFree
from vfio_emu.stack import Stack, caller_stack, capture_stack, getpid

if TYPE_CHECKING:  # annotations only: the kernel state sits above its memory
    from vfio_emu.linux.kernel import Kernel

_T = TypeVar("_T", bound="Tracked")


_NOT_FREED = Stack()


@dataclass
class Memory:
    """One allocation: what it is, and who allocated and freed it."""

    kernel: Kernel
    what: str
    alloc_stack: Stack
    alloc_pid: int = field(default_factory=getpid)
    free_stack: Stack = _NOT_FREED  # immutable: one for every live allocation
    free_pid: int = 0
    freed: bool = False
    #: Structs embedded in this memory: their _kfree hooks run when it is freed.
    embedded: list[Any] = field(default_factory=list)
    #: A module's static memory: never freed, never a leak.
    static: bool = False
    #: The struct itself, held while allocated: a leaked struct stays in memory, as in C
    #: (and its id, the key of kernel.allocations, cannot be reused meanwhile).
    obj: Any = field(default=None, repr=False)


def mem_of(obj: object) -> Memory | None:
    """The allocation record of a kzalloc'd struct (None for untracked objects)."""
    d = object.__getattribute__(obj, "__dict__")
    return d.get("_kmem")  # type: ignore[no-any-return]


class Tracked:
    """Base of every struct the emulated kernel allocates: poisoned once freed.

    A live struct pays nothing for KASAN: kfree() switches the struct (and the structs
    embedded in it) to a poisoned twin of its class - same name, same module, a subclass,
    so isinstance() and every report read the same - whose attribute hooks report any
    access but a dunder one.
    """

    if TYPE_CHECKING:  # a struct's fields are the driver's: any attribute goes
        def __getattribute__(self, name: str) -> Any: ...
        def __setattr__(self, name: str, value: Any) -> None: ...

    def _kzalloc(self, kernel: Kernel) -> None:
        """Hook: set up what the zeroed struct holds (e.g. counters in the arena)."""

    def _kfree(self) -> None:
        """Hook: give back what the struct held."""


class _Poisoned(Tracked):
    """Freed memory: every attribute access but a dunder one is KASAN's report.  kfree()
    makes a struct's class its poisoned twin, a subclass of this and of its class."""

    __slots__ = ()

    def __getattribute__(self, name: str) -> Any:
        mem = mem_of(self)
        if mem is not None and mem.freed and not name.startswith("__"):
            use_after_free(self, f"read of {type(self).__name__}.{name}")
        return object.__getattribute__(self, name)

    def __setattr__(self, name: str, value: Any) -> None:
        mem = mem_of(self)
        if mem is not None and mem.freed:
            use_after_free(self, f"write of {type(self).__name__}.{name}")
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        mem = mem_of(self)
        if mem is not None and mem.freed:
            use_after_free(self, f"write of {type(self).__name__}.{name}")
        object.__delattr__(self, name)


#: Each struct class's poisoned twin, made on its first kfree.
_TWINS: dict[type, type] = {}


def _poison(obj: object) -> None:
    """Switch a struct being freed to its class's poisoned twin: named as its class, in its
    module, a subclass of it (isinstance() holds, reports read the same), with _Poisoned's
    hooks ahead of the class's own."""
    cls = type(obj)
    if issubclass(cls, _Poisoned):
        return
    twin = _TWINS.get(cls)
    if twin is None:
        meta: Any = type(cls)  # type, or the struct's own metaclass
        twin = _TWINS[cls] = meta(cls.__name__, (_Poisoned, cls), {
            "__slots__": (), "__module__": cls.__module__, "__qualname__": cls.__qualname__,
            "__doc__": cls.__doc__})
    object.__setattr__(obj, "__class__", twin)


def use_after_free(obj: object, access: str) -> NoReturn:
    """KASAN's report for an access to freed memory, raised as KasanUseAfterFree."""
    mem = mem_of(obj)
    assert mem is not None and mem.freed
    rep = mem.kernel.report(
        "use-after-free", f"BUG: KASAN: use-after-free in {access}",
        f"{access} of {mem.what}, already freed",
        (("Call Trace", capture_stack(internal=True)),
         (f"Allocated by task {mem.alloc_pid}", mem.alloc_stack),
         (f"Freed by task {mem.free_pid}", mem.free_stack)))
    raise KasanUseAfterFree(rep)


def kzalloc(kernel: Kernel, cls: type[_T]) -> _T | None:
    """kzalloc(sizeof(struct ...)): a zeroed struct of this kernel, tracked until kfree;
    None (NULL) when an injected allocation failure is due, as failslab makes it."""
    if not (isinstance(cls, type) and issubclass(cls, Tracked)):
        raise InvalidArgumentError(f"kzalloc: {cls!r} is not a kernel struct (Tracked)")
    if kernel.should_fail_alloc(cls.__name__):
        return None
    obj = object.__new__(cls)
    key = id(obj)
    object.__getattribute__(obj, "__dict__")["_kmem"] = kernel.allocations[key] = Memory(
        kernel, f"{cls.__name__}@{key:#x}", capture_stack(), _stack.PID, obj=obj)
    obj._kzalloc(kernel)
    sched = kernel.sched  # kernel.preempt(), without its call when there is none
    if sched is not None:
        sched.preempt(f"kzalloc {cls.__name__}")
    return obj


def module_static(kernel: Kernel, cls: type[_T]) -> _T:
    """A driver module's static memory (its file-scope structs, e.g. mtty_dev): zeroed and
    watched by KASAN like kzalloc'd memory, but never failing and never freed - it lives
    as long as the emulated kernel.  (The kernel frees it at module unload; the checker
    never races module unload against work still queued on it: see docs/semantics.md.)"""
    if not (isinstance(cls, type) and issubclass(cls, Tracked)):
        raise InvalidArgumentError(f"module_static: {cls!r} is not a kernel struct (Tracked)")
    obj = object.__new__(cls)
    d = object.__getattribute__(obj, "__dict__")
    d["_kmem"] = Memory(kernel, f"static {cls.__name__}@{id(obj):#x}", capture_stack(),
                        static=True)
    obj._kzalloc(kernel)
    return obj


def kfree(obj: Tracked) -> None:
    """kfree()/kvfree(): poison the struct; freeing it again is a double-free."""
    d = object.__getattribute__(obj, "__dict__") if isinstance(obj, Tracked) else {}
    mem: Memory | None = d.get("_kmem")  # mem_of(obj)
    if mem is None or mem.static:
        raise InvalidArgumentError(f"kfree: {obj!r} was not allocated by kzalloc()")
    container = d.get("_kembedded_in")
    if container is not None:
        raise InvalidArgumentError(f"kfree: invalid-free of a {type(obj).__name__} embedded in "
                                   f"{container}: free the container")
    if mem.freed:
        rep = mem.kernel.report(
            "double-free", f"BUG: KASAN: double-free in kfree of {mem.what}",
            stacks=(("Call Trace", caller_stack()),
                    (f"Allocated by task {mem.alloc_pid}", mem.alloc_stack),
                    (f"Freed by task {mem.free_pid}", mem.free_stack)))
        raise KasanDoubleFree(rep)
    sched = mem.kernel.sched
    if sched is not None:
        sched.atomic += 1  # kfree() never sleeps: no task sees the struct half freed
    try:
        object.__getattribute__(obj, "_kfree")()
        for inner in mem.embedded:
            object.__getattribute__(inner, "_kfree")()
        mem.freed = True
        _poison(obj)
        for inner in mem.embedded:
            _poison(inner)
    finally:
        if sched is not None:
            sched.atomic -= 1
    mem.free_stack = capture_stack()
    mem.free_pid = _stack.PID  # getpid()
    mem.obj = None
    mem.kernel.allocations.pop(id(obj), None)
    sched = mem.kernel.sched
    if sched is not None:
        sched.preempt(f"kfree {mem.what}")


kvfree = kfree


def embedded(container: Tracked, cls: type[_T]) -> _T:
    """A struct embedded in another (e.g. &private->parent): it shares the container's
    memory, so it is freed - and poisoned - with it."""
    mem = mem_of(container) if isinstance(container, Tracked) else None
    if mem is None:
        raise InvalidArgumentError(f"embedded: {container!r} was not allocated by kzalloc()")
    if not (isinstance(cls, type) and issubclass(cls, Tracked)):
        raise InvalidArgumentError(f"embedded: {cls!r} is not a kernel struct (Tracked)")
    if mem.freed:
        use_after_free(container, f"&{type(container).__name__}->{cls.__name__}")
    obj = object.__new__(cls)
    d = object.__getattribute__(obj, "__dict__")
    d["_kmem"] = mem
    d["_kembedded_in"] = mem.what
    obj._kzalloc(mem.kernel)
    mem.embedded.append(obj)
    return obj
