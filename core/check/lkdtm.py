"""The lkdtm refcount catalogue (drivers/misc/lkdtm/refcount.c), run against the C core.

Each case replays the kernel test's sequence on a Refcount in an arena and
prints what lkdtm prints.  The verdict is judged the way the kernel's
selftest (tools/testing/selftests/lkdtm) judges it: a case passes when the
line tests.txt names appears, or, where it names none, when a WARN fired.
REFCOUNT_TIMING and ATOMIC_TIMING are left out, as tests.txt leaves them out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from vfio_emu.shm.arena import Arena
from vfio_emu.shm.dmesg import WarnRecord
from vfio_emu.shm.handle import int32
from vfio_emu.shm.refcount import REFCOUNT_MAX, REFCOUNT_SATURATED, Refcount

#: tests.txt's default expectation: the WARN's "call trace" appeared.
CALL_TRACE = "call trace"


@dataclass
class Log:
    """What a case printed, as (level, text) lines: pr_info / pr_warn / pr_err."""

    lines: list[tuple[str, str]] = field(default_factory=list)
    #: What the case's checked call returned (None where the kernel API is void).
    returned: bool | None = None

    def info(self, text: str) -> None:
        self.lines.append(("info", text))

    def warn(self, text: str) -> None:
        self.lines.append(("warn", text))

    def err(self, text: str) -> None:
        self.lines.append(("err", text))


def overflow_check(r: Refcount, log: Log) -> None:
    v = r.read()
    if v == REFCOUNT_SATURATED:
        log.info("Overflow detected: saturated")
    elif v == REFCOUNT_MAX:
        log.warn("Overflow detected: unsafely reset to max")
    else:
        log.err(f"Fail: refcount wrapped to {int32(v, 'value')}")


def check_zero(r: Refcount, log: Log) -> None:
    v = r.read()
    if v == REFCOUNT_SATURATED:
        log.info("Zero detected: saturated")
    elif v == REFCOUNT_MAX:
        log.warn("Zero detected: unsafely reset to max")
    elif v == 0:
        log.warn("Still at zero: refcount_inc/add() must not inc-from-0")
    else:
        log.err(f"Fail: refcount went crazy: {int32(v, 'value')}")


def check_negative(r: Refcount, log: Log, start: int) -> None:
    v = r.read()
    if v == start:
        log.warn(f"Still at {start}: refcount_inc/add() must not inc-from-0")
    elif v == REFCOUNT_SATURATED:
        log.info("Negative detected: saturated")
    elif v == REFCOUNT_MAX:
        log.warn("Negative detected: unsafely reset to max")
    else:
        log.err(f"Fail: refcount went crazy: {int32(v, 'value')}")


def check_from_zero(r: Refcount, log: Log) -> None:
    v = r.read()
    if v == 0:
        log.info("Zero detected: stayed at zero")
    elif v == REFCOUNT_SATURATED:
        log.info("Zero detected: saturated")
    elif v == REFCOUNT_MAX:
        log.warn("Zero detected: unsafely reset to max")
    else:
        log.info(f"Fail: zero not detected, incremented to {int32(v, 'value')}")


def check_saturated(r: Refcount, log: Log) -> None:
    v = r.read()
    if v == REFCOUNT_SATURATED:
        log.info("Saturation detected: still saturated")
    elif v == REFCOUNT_MAX:
        log.warn("Saturation detected: unsafely reset to max")
    else:
        log.err(f"Fail: refcount went crazy: {int32(v, 'value')}")


def _weird_if(result: bool, expected: bool, what: str, log: Log) -> None:
    log.returned = result
    if result != expected:
        log.warn(f"Weird: {what} reported zero")


# -- the cases, in the order of lkdtm's source ---------------------------------

def inc_overflow(r: Refcount, log: Log) -> None:
    log.info("attempting good refcount_inc() without overflow")
    r.dec()
    r.inc()
    log.info("attempting bad refcount_inc() overflow")
    r.inc()
    r.inc()
    overflow_check(r, log)


def add_overflow(r: Refcount, log: Log) -> None:
    log.info("attempting good refcount_add() without overflow")
    for _ in range(4):
        r.dec()
    r.add(4)
    log.info("attempting bad refcount_add() overflow")
    r.add(4)
    overflow_check(r, log)


def inc_not_zero_overflow(r: Refcount, log: Log) -> None:
    log.info("attempting bad refcount_inc_not_zero() overflow")
    _weird_if(r.inc_not_zero(), True, "refcount_inc_not_zero()", log)
    overflow_check(r, log)


def add_not_zero_overflow(r: Refcount, log: Log) -> None:
    log.info("attempting bad refcount_add_not_zero() overflow")
    _weird_if(r.add_not_zero(6), True, "refcount_add_not_zero()", log)
    overflow_check(r, log)


def dec_zero(r: Refcount, log: Log) -> None:
    log.info("attempting good refcount_dec()")
    r.dec()
    log.info("attempting bad refcount_dec() to zero")
    r.dec()
    check_zero(r, log)


def dec_negative(r: Refcount, log: Log) -> None:
    log.info("attempting bad refcount_dec() below zero")
    r.dec()
    check_negative(r, log, 0)


def dec_and_test_negative(r: Refcount, log: Log) -> None:
    log.info("attempting bad refcount_dec_and_test() below zero")
    _weird_if(r.dec_and_test(), False, "refcount_dec_and_test()", log)
    check_negative(r, log, 0)


def sub_and_test_negative(r: Refcount, log: Log) -> None:
    log.info("attempting bad refcount_sub_and_test() below zero")
    _weird_if(r.sub_and_test(5), False, "refcount_sub_and_test()", log)
    check_negative(r, log, 3)


def _safe_from_zero(r: Refcount, log: Log, api: str, ok: bool) -> None:
    log.info(f"attempting safe {api}() from zero")
    log.returned = ok
    if not ok:
        log.info("Good: zero detected")
        if r.read() == 0:
            log.info("Correctly stayed at zero")
        else:
            log.err("Fail: refcount went past zero!")
    else:
        log.err("Fail: Zero not detected!?")


def inc_zero(r: Refcount, log: Log) -> None:
    _safe_from_zero(r, log, "refcount_inc_not_zero", r.inc_not_zero())
    log.info("attempting bad refcount_inc() from zero")
    r.inc()
    check_from_zero(r, log)


def add_zero(r: Refcount, log: Log) -> None:
    _safe_from_zero(r, log, "refcount_add_not_zero", r.add_not_zero(3))
    log.info("attempting bad refcount_add() from zero")
    r.add(3)
    check_from_zero(r, log)


def inc_saturated(r: Refcount, log: Log) -> None:
    log.info("attempting bad refcount_inc() from saturated")
    r.inc()
    check_saturated(r, log)


def dec_saturated(r: Refcount, log: Log) -> None:
    log.info("attempting bad refcount_dec() from saturated")
    r.dec()
    check_saturated(r, log)


def add_saturated(r: Refcount, log: Log) -> None:
    log.info("attempting bad refcount_dec() from saturated")  # sic: lkdtm's own text
    r.add(8)
    check_saturated(r, log)


def inc_not_zero_saturated(r: Refcount, log: Log) -> None:
    log.info("attempting bad refcount_inc_not_zero() from saturated")
    _weird_if(r.inc_not_zero(), True, "refcount_inc_not_zero()", log)
    check_saturated(r, log)


def add_not_zero_saturated(r: Refcount, log: Log) -> None:
    log.info("attempting bad refcount_add_not_zero() from saturated")
    _weird_if(r.add_not_zero(7), True, "refcount_add_not_zero()", log)
    check_saturated(r, log)


def dec_and_test_saturated(r: Refcount, log: Log) -> None:
    log.info("attempting bad refcount_dec_and_test() from saturated")
    _weird_if(r.dec_and_test(), False, "refcount_dec_and_test()", log)
    check_saturated(r, log)


def sub_and_test_saturated(r: Refcount, log: Log) -> None:
    log.info("attempting bad refcount_sub_and_test() from saturated")
    _weird_if(r.sub_and_test(8), False, "refcount_sub_and_test()", log)
    check_saturated(r, log)


@dataclass(frozen=True)
class Case:
    """One lkdtm test: its start value, its sequence, and what tests.txt expects."""

    name: str
    start: int
    run: Callable[[Refcount, Log], None]
    expect: str


_NEGATIVE = "Negative detected: saturated"
_STILL = "Saturation detected: still saturated"

CASES: tuple[Case, ...] = (
    Case("REFCOUNT_INC_OVERFLOW", REFCOUNT_MAX - 1, inc_overflow, CALL_TRACE),
    Case("REFCOUNT_ADD_OVERFLOW", REFCOUNT_MAX - 1, add_overflow, CALL_TRACE),
    Case("REFCOUNT_INC_NOT_ZERO_OVERFLOW", REFCOUNT_MAX, inc_not_zero_overflow, CALL_TRACE),
    Case("REFCOUNT_ADD_NOT_ZERO_OVERFLOW", REFCOUNT_MAX, add_not_zero_overflow, CALL_TRACE),
    Case("REFCOUNT_DEC_ZERO", 2, dec_zero, CALL_TRACE),
    Case("REFCOUNT_DEC_NEGATIVE", 0, dec_negative, _NEGATIVE),
    Case("REFCOUNT_DEC_AND_TEST_NEGATIVE", 0, dec_and_test_negative, _NEGATIVE),
    Case("REFCOUNT_SUB_AND_TEST_NEGATIVE", 3, sub_and_test_negative, _NEGATIVE),
    Case("REFCOUNT_INC_ZERO", 0, inc_zero, CALL_TRACE),
    Case("REFCOUNT_ADD_ZERO", 0, add_zero, CALL_TRACE),
    Case("REFCOUNT_INC_SATURATED", REFCOUNT_SATURATED, inc_saturated, _STILL),
    Case("REFCOUNT_DEC_SATURATED", REFCOUNT_SATURATED, dec_saturated, _STILL),
    Case("REFCOUNT_ADD_SATURATED", REFCOUNT_SATURATED, add_saturated, _STILL),
    Case("REFCOUNT_INC_NOT_ZERO_SATURATED", REFCOUNT_SATURATED, inc_not_zero_saturated,
         CALL_TRACE),
    Case("REFCOUNT_ADD_NOT_ZERO_SATURATED", REFCOUNT_SATURATED, add_not_zero_saturated,
         CALL_TRACE),
    Case("REFCOUNT_DEC_AND_TEST_SATURATED", REFCOUNT_SATURATED, dec_and_test_saturated, _STILL),
    Case("REFCOUNT_SUB_AND_TEST_SATURATED", REFCOUNT_SATURATED, sub_and_test_saturated, _STILL),
)


@dataclass(frozen=True)
class Outcome:
    """What one case did: its log, its WARNs, the final value, and the selftest's verdict."""

    case: Case
    final: int
    returned: bool | None
    log: tuple[tuple[str, str], ...]
    warns: tuple[WarnRecord, ...]

    @property
    def verdict(self) -> str:
        """The checker's last line: what lkdtm concluded."""
        return self.log[-1][1] if self.log else ""

    @property
    def passed(self) -> bool:
        """The selftest's verdict: the line tests.txt expects, or else a WARN's call trace.

        Stricter than run.sh, which only looks for that text: any 'Fail:' line fails too.
        """
        if any(text.startswith("Fail:") for _, text in self.log):
            return False
        if self.case.expect == CALL_TRACE:
            return bool(self.warns)
        return any(text == self.case.expect for _, text in self.log)


def run_case(arena: Arena, case: Case) -> Outcome:
    """Run one case on a fresh refcount of arena, and free it afterwards."""
    r = arena.refcount(case.start, label=case.name.lower())
    try:
        since = arena.warn_seq
        log = Log()
        case.run(r, log)
        final = r.read()
        warns = tuple(w for w in arena.dmesg(since) if w.object_index == r.index)
    finally:
        r.free()
    return Outcome(case, final, log.returned, tuple(log.lines), warns)


def run_all(arena: Arena, names: list[str] | None = None) -> list[Outcome]:
    """Run the catalogue (or the named cases, in catalogue order)."""
    known = {c.name for c in CASES}
    unknown = sorted(set(names or ()) - known)
    if unknown:
        raise KeyError(f"unknown lkdtm case(s): {', '.join(unknown)}")
    return [run_case(arena, c) for c in CASES if not names or c.name in names]
