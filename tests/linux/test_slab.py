"""Kernel memory (include/linux/slab.h, vfio_emu.linux.slab): kzalloc/kfree under KASAN.

A use-after-free or a double free raises a reported error - KasanUseAfterFree,
KasanDoubleFree - that is both the error class a caller catches
(UseAfterFreeError, DoubleFreeError) and a ReportedError carrying the very Report
the kernel recorded.  kzalloc() returns None (NULL) when failslab fails it, and
such an allocation is not tracked.
"""

from __future__ import annotations

import pytest
from _asserts import assert_clean, only_report, stack_text
from _drivers import Buf, is_freed

from vfio_emu.errors import (
    DoubleFreeError,
    InvalidArgumentError,
    KasanDoubleFree,
    KasanUseAfterFree,
    ReportedError,
    UseAfterFreeError,
)
from vfio_emu.linux.slab import Tracked, embedded, kfree, kvfree, kzalloc


class Inner(Tracked):
    """A struct embedded in another (&private->parent)."""


def allocate_a_buffer(k):
    return kzalloc(k, Buf)


def free_the_buffer(buf):
    kfree(buf)


# -- KASAN: use-after-free ---------------------------------------------------------------

def read(buf):
    return buf.len


def write(buf):
    buf.len = 1


def delete(buf):
    del buf.len


@pytest.mark.parametrize(("access", "what"), [(read, "read of Buf.len"),
                                              (write, "write of Buf.len"),
                                              (delete, "write of Buf.len")],
                         ids=["read", "write", "delete"])
def test_an_access_after_kfree_raises_kasan_use_after_free_carrying_the_recorded_report(
        make_kernel, access, what):
    k = make_kernel()
    buf = allocate_a_buffer(k)
    buf.len = 0
    free_the_buffer(buf)
    with pytest.raises(KasanUseAfterFree) as exc:
        access(buf)
    err = exc.value
    assert isinstance(err, UseAfterFreeError) and isinstance(err, ReportedError)
    rep = only_report(k, "use-after-free")
    assert err.report is rep and k.reports == [rep]
    assert rep.kind == "use-after-free"
    assert rep.title == f"BUG: KASAN: use-after-free in {what}"
    assert str(err) == str(rep)
    assert "allocate_a_buffer" in stack_text(rep, "Allocated by")
    assert "free_the_buffer" in stack_text(rep, "Freed by")


def test_a_use_after_free_is_caught_as_a_use_after_free_error(make_kernel):
    k = make_kernel()
    buf = kzalloc(k, Buf)
    kfree(buf)
    with pytest.raises(UseAfterFreeError):
        buf.len = 1
    assert [r.kind for r in k.reports] == ["use-after-free"]


def test_an_embedded_struct_is_poisoned_with_its_container(make_kernel):
    k = make_kernel()
    outer = kzalloc(k, Buf)
    inner = embedded(outer, Inner)
    with pytest.raises(InvalidArgumentError, match="free the container"):
        kfree(inner)
    kfree(outer)
    with pytest.raises(KasanUseAfterFree) as exc:
        inner.x = 1
    assert exc.value.report is only_report(k, "use-after-free")
    assert "Inner.x" in exc.value.report.title


# -- KASAN: double free --------------------------------------------------------------------

def test_a_second_kfree_raises_kasan_double_free_carrying_the_recorded_report(make_kernel):
    k = make_kernel()
    buf = allocate_a_buffer(k)
    free_the_buffer(buf)
    with pytest.raises(KasanDoubleFree) as exc:
        kvfree(buf)
    err = exc.value
    assert isinstance(err, DoubleFreeError) and isinstance(err, ReportedError)
    assert isinstance(err, UseAfterFreeError)  # a DoubleFreeError is one
    rep = only_report(k, "double-free")
    assert err.report is rep and k.reports == [rep]
    assert rep.kind == "double-free"
    assert rep.title.startswith("BUG: KASAN: double-free in kfree of Buf@")
    assert "allocate_a_buffer" in stack_text(rep, "Allocated by")
    assert "free_the_buffer" in stack_text(rep, "Freed by")
    assert k.leak_check() == []  # the first kfree freed it


# -- kzalloc and failslab ---------------------------------------------------------------------

def test_kzalloc_returns_none_when_an_allocation_failure_is_due_and_tracks_nothing(
        make_kernel):
    k = make_kernel()
    k.fail_next_allocs(1)
    assert kzalloc(k, Buf) is None  # NULL, not -ENOMEM
    assert k.allocations == {}
    assert k.leak_check() == []
    buf = kzalloc(k, Buf)  # only the next allocation failed
    assert isinstance(buf, Buf) and not is_freed(buf)
    kfree(buf)
    assert is_freed(buf)
    assert_clean(k)


def test_fail_next_allocs_skips_then_fails_n_allocations(make_kernel):
    k = make_kernel()
    k.fail_next_allocs(2, skip=1)
    got = [kzalloc(k, Buf) for _ in range(4)]
    assert [b is None for b in got] == [False, True, True, False]
    for b in got:
        if b is not None:
            kfree(b)
    assert_clean(k)


def test_a_kzallocd_struct_never_freed_is_a_leak_naming_its_allocator(make_kernel):
    k = make_kernel()
    allocate_a_buffer(k)
    [leak] = k.leak_check()
    assert leak.kind == "leak" and "unreferenced object Buf@" in leak.title
    assert "allocate_a_buffer" in stack_text(leak, "allocated by")


@pytest.mark.parametrize("cls", [object, int, "Buf"], ids=["object", "int", "str"])
def test_kzalloc_of_something_that_is_not_a_kernel_struct_is_invalid(make_kernel, cls):
    k = make_kernel()
    with pytest.raises(InvalidArgumentError, match="not a kernel struct"):
        kzalloc(k, cls)
    assert k.allocations == {}


def test_kfree_of_memory_kzalloc_did_not_allocate_is_invalid(make_kernel):
    k = make_kernel()
    for obj in (object(), None, Buf()):
        with pytest.raises(InvalidArgumentError, match="was not allocated by kzalloc"):
            kfree(obj)
    assert k.reports == []


# -- the poisoned twin: a freed struct's class ------------------------------------------------

class WithMeta(Tracked, metaclass=type("Meta", (type,), {})):
    """A struct whose class has a metaclass of its own."""


def test_a_freed_struct_keeps_its_class_name_module_isinstance_and_repr(make_kernel):
    k = make_kernel()
    buf = kzalloc(k, Buf)
    buf.len = 3
    live = type(buf)
    assert live is Buf and "__getattribute__" not in vars(Tracked)  # live: no hook at all
    kfree(buf)
    freed = type(buf)
    assert freed is not Buf and issubclass(freed, Buf) and isinstance(buf, Buf)
    assert (freed.__name__, freed.__qualname__, freed.__module__) == (
        Buf.__name__, Buf.__qualname__, Buf.__module__)
    assert repr(buf).startswith(f"<{Buf.__module__}.{Buf.__qualname__} object at ")
    assert buf.__dict__["len"] == 3  # a dunder read is not a use (nor is the memory lost)
    other = kzalloc(k, Buf)
    kfree(other)
    assert type(other) is freed  # one twin per class
    with pytest.raises(KasanUseAfterFree, match=r"read of Buf\.len"):
        _ = buf.len
    assert [r.title for r in k.reports] == ["BUG: KASAN: use-after-free in read of Buf.len"]


def test_a_struct_with_its_own_metaclass_is_poisoned_too(make_kernel):
    k = make_kernel()
    obj = kzalloc(k, WithMeta)
    inner = embedded(obj, Inner)
    kfree(obj)
    assert type(type(obj)) is type(WithMeta) and isinstance(obj, WithMeta)
    with pytest.raises(KasanUseAfterFree, match=r"write of WithMeta\.x"):
        obj.x = 1
    with pytest.raises(KasanUseAfterFree, match=r"read of Inner\.y"):
        _ = inner.y


def test_a_struct_never_kzallocd_is_never_checked(make_kernel):
    buf = Buf()
    buf.len = 1
    del buf.len
    assert type(buf) is Buf
