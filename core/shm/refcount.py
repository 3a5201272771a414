"""refcount_t and kref with the exact Linux v6.1 semantics, living in an arena slot.

The methods are the kernel's names without the type prefix.  Each hot method
is one call of a C function bound once at import, then a single test of its
result: zero means a plain success, anything else (a WARN to stamp with the
caller's stack, an error to raise, a release to run) goes to the slow path.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Optional

from vfio_emu.errors import InvalidArgumentError
from vfio_emu.shm import _binding as C
from vfio_emu.shm.handle import _ARENA_ONLY, Handle, int32

if TYPE_CHECKING:
    from vfio_emu.shm.arena import Arena

REFCOUNT_MAX: int = C.REFCOUNT_MAX
#: INT_MIN / 2, as refcount_read() returns it (unsigned): 0xC0000000.
REFCOUNT_SATURATED: int = C.REFCOUNT_SATURATED

_inc = C.refcount_inc
_add = C.refcount_add
_inc_not_zero = C.refcount_inc_not_zero
_add_not_zero = C.refcount_add_not_zero
_dec_and_test = C.refcount_dec_and_test
_sub_and_test = C.refcount_sub_and_test
_dec = C.refcount_dec
_dec_if_one = C.refcount_dec_if_one
_dec_not_one = C.refcount_dec_not_one
_read = C.refcount_read
_set = C.refcount_set


#: Batches run in C in chunks of this many, so signal handlers still run between them.
BATCH_CHUNK = 1 << 20


def _batch(fn: Any, h: Any, n: object) -> int:
    """n calls of a batch entry point, chunked; folds the results as C folds them."""
    if type(n) is not int or not 0 <= n < (1 << 63):
        raise InvalidArgumentError(f"n={n!r} must be an int from 0 to 2**63 - 1")
    acc = 0
    while n > 0:
        r = fn(h, min(n, BATCH_CHUNK))
        if r < 0:
            return r  # type: ignore[no-any-return]
        if r & C.RET_WARN and not acc & C.RET_WARN:
            acc |= r & ~C.RET_TRUE  # the first WARN's sequence
        acc |= r & C.RET_TRUE
        n -= BATCH_CHUNK
    return acc


class Refcount(Handle):
    """refcount_t: saturates instead of wrapping and WARNs on every misuse (lib/refcount.c)."""

    __slots__ = ()
    KIND = C.KIND_REFCOUNT

    def set(self, n: int) -> None:
        """refcount_set(): a plain store, no checks (n may be given signed or unsigned)."""
        r = _set(self._h, int32(n, "n"))
        if r:
            self._slow(r, "refcount_set")

    def read(self) -> int:
        """refcount_read(): the value as unsigned int."""
        r = _read(self._h)
        if r < 0:
            self._slow(r, "refcount_read")
        return r  # type: ignore[no-any-return]

    def inc(self) -> None:
        """refcount_inc(): from 0 WARNs ADD_UAF, past INT_MAX WARNs ADD_OVF; both saturate."""
        r = _inc(self._h)
        if r:
            self._slow(r, "refcount_inc")

    def add(self, i: int) -> None:
        """refcount_add(i)."""
        r = _add(self._h, int32(i, "i"))
        if r:
            self._slow(r, "refcount_add")

    def inc_not_zero(self) -> bool:
        """refcount_inc_not_zero(): False (no change) on 0; True on success or saturation."""
        r = _inc_not_zero(self._h)
        if r & -2:
            return bool(self._slow(r, "refcount_inc_not_zero"))
        return r == 1  # type: ignore[no-any-return]

    def add_not_zero(self, i: int) -> bool:
        """refcount_add_not_zero(i)."""
        r = _add_not_zero(self._h, int32(i, "i"))
        if r & -2:
            return bool(self._slow(r, "refcount_add_not_zero"))
        return r == 1  # type: ignore[no-any-return]

    def dec(self) -> None:
        """refcount_dec(): any decrement to 0 or below WARNs DEC_LEAK and saturates."""
        r = _dec(self._h)
        if r:
            self._slow(r, "refcount_dec")

    def dec_and_test(self) -> bool:
        """refcount_dec_and_test(): True iff this dropped the count from 1 to 0."""
        r = _dec_and_test(self._h)
        if r & -2:
            return bool(self._slow(r, "refcount_dec_and_test"))
        return r == 1  # type: ignore[no-any-return]

    def sub_and_test(self, i: int) -> bool:
        """refcount_sub_and_test(i): True iff the count was exactly i."""
        r = _sub_and_test(self._h, int32(i, "i"))
        if r & -2:
            return bool(self._slow(r, "refcount_sub_and_test"))
        return r == 1  # type: ignore[no-any-return]

    def dec_if_one(self) -> bool:
        """refcount_dec_if_one(): 1 -> 0 or nothing, never a WARN."""
        r = _dec_if_one(self._h)
        if r & -2:
            return bool(self._slow(r, "refcount_dec_if_one"))
        return r == 1  # type: ignore[no-any-return]

    def dec_not_one(self) -> bool:
        """refcount_dec_not_one(): False on 1; on 0 WARNs but (as in v6.1) does not move."""
        r = _dec_not_one(self._h)
        if r & -2:
            return bool(self._slow(r, "refcount_dec_not_one"))
        return r == 1  # type: ignore[no-any-return]


Release = Callable[["Kref"], object]


class Kref(Handle):
    """struct kref: a refcount_t whose last put runs a release, exactly once.

    The release runs in the process (and thread) that dropped the last
    reference, as in the kernel.  Deviation: the kernel requires a release
    function; here it may be omitted when the caller acts on put()'s result.
    """

    __slots__ = ("get", "put", "release")
    KIND = C.KIND_KREF

    #: kref_get().  (Like put, a C method bound to this kref's handle: no Python frame.)
    get: Callable[[], None]
    #: kref_put(release=None): 1 if this dropped the last reference and ran release, else 0.
    put: Callable[..., int]

    def __init__(self, arena: Arena, h: Any, label: str, *, _key: object = None) -> None:
        super().__init__(arena, h, label, _key=_key)
        self.release: Optional[Release] = None  # noqa: UP045 - runtime annotation on 3.10
        self._bind()

    def _bind(self) -> None:
        """get and put: the C methods of a RefOps bound to this kref's handle.  Its slow
        paths reach this kref through a weak reference: no cycle, so a kref (and its arena)
        goes as soon as its last reference does."""
        ref = weakref.ref(self)
        ops = C.RefOps(C.address(self._h), self._h, functools.partial(_slow_of, ref),
                       functools.partial(_put_slow_of, ref))
        self.get, self.put = ops.get, ops.put

    @property
    def refcount(self) -> Refcount:
        """kref->refcount: the refcount_t inside, for code that uses it directly."""
        return Refcount(self._arena, self._h, self._label, _key=_ARENA_ONLY)

    def init(self) -> None:
        """kref_init(): count = 1."""
        r = _set(self._h, 1)
        if r:
            self._slow(r, "kref_init")

    def read(self) -> int:
        """kref_read()."""
        r = _read(self._h)
        if r < 0:
            self._slow(r, "kref_read")
        return r  # type: ignore[no-any-return]

    def get_unless_zero(self) -> int:
        """kref_get_unless_zero(): 0 if the count was already 0."""
        r = _inc_not_zero(self._h)
        if r & -2:
            return self._slow(r, "kref_get_unless_zero")
        return r  # type: ignore[no-any-return]

    def get_many(self, n: int) -> None:
        """n x kref_get() in one C call."""
        r = _batch(C.refcount_inc_many, self._h, n)
        if r:
            self._slow(r, "kref_get")

    def put_many(self, n: int, release: Release | None = None) -> int:
        """n x kref_put() in one C call; runs release (once) if one of them reached zero."""
        r = _batch(C.refcount_dec_and_test_many, self._h, n)
        if r:
            return self._put_slow(r, release, "kref_put")
        return 0

    def _put_slow(self, r: int, release: Release | None, op: str) -> int:
        if not self._slow(r, op):
            return 0
        fn = release if release is not None else self.release
        if fn is not None:
            fn(self)
        return 1


def _alive(ref: weakref.ref[Kref], op: str) -> Kref:
    kref = ref()
    if kref is None:  # `get = k.get; del k; get()` reaching the slow path
        raise InvalidArgumentError(f"{op}: the Kref this method was taken from is gone")
    return kref


def _slow_of(ref: weakref.ref[Kref], r: int, op: str) -> int:
    return _alive(ref, op)._slow(r, op)


def _put_slow_of(ref: weakref.ref[Kref], r: int, release: Release | None, op: str) -> int:
    return _alive(ref, op)._put_slow(r, release, op)


class KrefArray:
    """kref_get()/kref_put() on many krefs of one arena, in one C call each."""

    __slots__ = ("_krefs", "_ptrs")

    def __init__(self, krefs: Iterable[Kref]) -> None:
        try:
            self._krefs = tuple(krefs)
        except TypeError:
            raise InvalidArgumentError(
                f"KrefArray takes an iterable of Kref objects, not {krefs!r}") from None
        for k in self._krefs:
            if not isinstance(k, Kref):
                raise InvalidArgumentError(f"KrefArray takes Kref objects, not {k!r}")
            if k._arena is not self._krefs[0]._arena:
                raise InvalidArgumentError("KrefArray takes krefs of one arena only")
        self._ptrs = C.new("vfio_handle_t *[]", [k._h for k in self._krefs])

    def __len__(self) -> int:
        return len(self._krefs)

    def get(self) -> None:
        """kref_get() on every object (none moves if any handle is stale)."""
        bad = C.new("int64_t *")
        r = C.refcount_inc_array(self._ptrs, len(self._krefs), bad)
        if r:
            self._slow(r, bad, "kref_get")

    def put(self, release: Release | None = None) -> int:
        """kref_put() on every object; runs release for each that reached zero; returns how many.

        Every object that reached zero gets its release even if another's
        raises; the first exception is re-raised afterwards.
        """
        # Per call: the C call lets other threads run, and they may use this array too.
        hit, bad = C.new("uint8_t[]", len(self._krefs)), C.new("int64_t *")
        r = C.refcount_dec_and_test_array(self._ptrs, len(self._krefs), hit, bad)
        if not r:
            return 0
        self._slow(r, bad, "kref_put")
        released = 0
        error: BaseException | None = None
        for k, was_hit in zip(self._krefs, hit, strict=True):
            if was_hit:
                released += 1
                try:
                    k._put_slow(C.RET_TRUE, release, "kref_put")
                except BaseException as e:
                    error = error or e
        if error is not None:
            raise error
        return released

    def _slow(self, r: int, bad: Any, op: str) -> None:
        if r < 0:
            raise self._krefs[bad[0]]._error(r, op)
        self._krefs[0]._slow(r & ~C.RET_TRUE, op)
