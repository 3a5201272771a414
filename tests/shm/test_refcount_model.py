"""vfio_emu.shm.refcount's Refcount against an independent pure-Python model of the v6.1
rules (include/linux/refcount.h, lib/refcount.c).

The model works on a signed 32-bit int with wrapping arithmetic.  After every
operation the machine compares the return value, read() and the list of WARN
kinds the operation emitted.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from vfio_emu import Arena

INT_MAX = 0x7FFFFFFF
SATURATED = -0x40000000  # INT_MIN / 2, as a signed int


def s32(x: int) -> int:
    """Wrap to a signed 32-bit int."""
    x &= 0xFFFFFFFF
    return x - (1 << 32) if x & 0x80000000 else x


class RefcountModel:
    """refcount_t per include/linux/refcount.h + lib/refcount.c at v6.1."""

    def __init__(self, value: int) -> None:
        self.v = s32(value)

    @property
    def unsigned(self) -> int:
        return self.v & 0xFFFFFFFF

    def set(self, value: int) -> tuple[None, list[str]]:
        self.v = s32(value)
        return None, []

    def _saturate(self, kind: str) -> list[str]:
        self.v = SATURATED
        return [kind]

    def add(self, i: int) -> tuple[None, list[str]]:
        old = self.v
        self.v = s32(old + i)
        if old == 0:
            return None, self._saturate("ADD_UAF")
        if old < 0 or s32(old + i) < 0:
            return None, self._saturate("ADD_OVF")
        return None, []

    def add_not_zero(self, i: int) -> tuple[bool, list[str]]:
        old = self.v
        if old != 0:
            self.v = s32(old + i)
        warns = []
        if old < 0 or s32(old + i) < 0:
            warns = self._saturate("ADD_NOT_ZERO_OVF")
        return old != 0, warns

    def sub_and_test(self, i: int) -> tuple[bool, list[str]]:
        old = self.v
        self.v = s32(old - i)
        if old == i:
            return True, []
        if old < 0 or s32(old - i) < 0:
            return False, self._saturate("SUB_UAF")
        return False, []

    def dec(self) -> tuple[None, list[str]]:
        old = self.v
        self.v = s32(old - 1)
        if old <= 1:
            return None, self._saturate("DEC_LEAK")
        return None, []

    def dec_if_one(self) -> tuple[bool, list[str]]:
        if self.v == 1:
            self.v = 0
            return True, []
        return False, []

    def dec_not_one(self) -> tuple[bool, list[str]]:
        val = self.unsigned
        if val == SATURATED & 0xFFFFFFFF:
            return True, []
        if val == 1:
            return False, []
        new = (val - 1) & 0xFFFFFFFF
        if new > val:  # only from 0: WARN, but neither move nor saturate (v6.1)
            return True, ["SUB_UAF"]
        self.v = s32(new)
        return True, []


INTERESTING = [0, 1, 2, 3, INT_MAX - 1, INT_MAX, 0x80000000, 0x80000001, 0xC0000000,
               0xBFFFFFFF, 0xC0000001, 0xFFFFFFFE, 0xFFFFFFFF, -1, -2, SATURATED,
               -(1 << 31), 0x40000000]
values = st.one_of(st.sampled_from(INTERESTING), st.integers(-(1 << 31), (1 << 32) - 1))
amounts = st.one_of(
    st.sampled_from(INTERESTING),
    st.integers(-4, 4),
    st.integers(-(1 << 31), (1 << 32) - 1),
)


class RefcountMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.arena = Arena.create(capacity=2, hz=1000, time_scale=1000.0, warn_capacity=16)
        self.r = self.arena.refcount(1, label="model")
        self.model = RefcountModel(1)

    def teardown(self) -> None:
        self.arena.close()

    def _step(self, real, expected) -> None:
        seq = self.arena.warn_seq
        got = real()
        kinds = [w.kind for w in self.arena.dmesg(since=seq)]
        exp_ret, exp_kinds = expected()
        assert got == exp_ret
        assert type(got) is type(exp_ret)
        assert kinds == exp_kinds
        assert self.r.read() == self.model.unsigned

    @initialize(v=values)
    def start_at(self, v: int) -> None:
        self.r.set(v)
        self.model = RefcountModel(v)

    @rule(v=values)
    def set(self, v: int) -> None:
        self._step(lambda: self.r.set(v), lambda: self.model.set(v))

    @rule()
    def inc(self) -> None:
        self._step(self.r.inc, lambda: self.model.add(1))

    @rule(i=amounts)
    def add(self, i: int) -> None:
        self._step(lambda: self.r.add(i), lambda: self.model.add(s32(i)))

    @rule()
    def inc_not_zero(self) -> None:
        self._step(self.r.inc_not_zero, lambda: self.model.add_not_zero(1))

    @rule(i=amounts)
    def add_not_zero(self, i: int) -> None:
        self._step(lambda: self.r.add_not_zero(i), lambda: self.model.add_not_zero(s32(i)))

    @rule()
    def dec(self) -> None:
        self._step(self.r.dec, self.model.dec)

    @rule()
    def dec_and_test(self) -> None:
        self._step(self.r.dec_and_test, lambda: self.model.sub_and_test(1))

    @rule(i=amounts)
    def sub_and_test(self, i: int) -> None:
        self._step(lambda: self.r.sub_and_test(i), lambda: self.model.sub_and_test(s32(i)))

    @rule()
    def dec_if_one(self) -> None:
        self._step(self.r.dec_if_one, self.model.dec_if_one)

    @rule()
    def dec_not_one(self) -> None:
        self._step(self.r.dec_not_one, self.model.dec_not_one)

    @invariant()
    def read_matches_model(self) -> None:
        assert self.r.read() == self.model.unsigned


RefcountMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=30,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestRefcountMatchesV61Model = RefcountMachine.TestCase


def test_model_self_check_matches_refcount_h_rows():
    """The model itself encodes the refcount.h rows the table tests pin (guards the oracle)."""
    m = RefcountModel(0)
    assert m.add(1) == (None, ["ADD_UAF"]) and m.v == SATURATED
    m = RefcountModel(0)
    assert m.dec_not_one() == (True, ["SUB_UAF"]) and m.v == 0
    m = RefcountModel(1)
    assert m.sub_and_test(1) == (True, []) and m.v == 0
    m = RefcountModel(0)
    assert m.add_not_zero(-1) == (False, ["ADD_NOT_ZERO_OVF"]) and m.v == SATURATED
    m = RefcountModel(INT_MAX)
    assert m.add_not_zero(1) == (True, ["ADD_NOT_ZERO_OVF"])
