"""The lkdtm refcount catalogue (vfio_emu.check.lkdtm, `vfio-emu lkdtm`) against the C core:
the verdicts the kernel's selftest expects.

The expectations below are written from the v6.1 behaviour (refcount.h,
lib/refcount.c) and tools/testing/selftests/lkdtm/tests.txt, independently of
vfio_emu.check.lkdtm, which only supplies the sequences.
"""

from __future__ import annotations

import json

import pytest

from vfio_emu import REFCOUNT_MAX, REFCOUNT_SATURATED, Arena
from vfio_emu.check import lkdtm
from vfio_emu.cli import main

SAT = REFCOUNT_SATURATED
OVF = "refcount_t: saturated; leaking memory."
ADD_UAF = "refcount_t: addition on 0; use-after-free."
SUB_UAF = "refcount_t: underflow; use-after-free."
DEC_LEAK = "refcount_t: decrement hit 0; leaking memory."

# name: (start, final, value returned by the checked call, WARN kind, WARN text, verdict line)
EXPECTED = {
    "REFCOUNT_INC_OVERFLOW": (REFCOUNT_MAX - 1, SAT, None, "ADD_OVF", OVF,
                              "Overflow detected: saturated"),
    "REFCOUNT_ADD_OVERFLOW": (REFCOUNT_MAX - 1, SAT, None, "ADD_OVF", OVF,
                              "Overflow detected: saturated"),
    "REFCOUNT_INC_NOT_ZERO_OVERFLOW": (REFCOUNT_MAX, SAT, True, "ADD_NOT_ZERO_OVF", OVF,
                                       "Overflow detected: saturated"),
    "REFCOUNT_ADD_NOT_ZERO_OVERFLOW": (REFCOUNT_MAX, SAT, True, "ADD_NOT_ZERO_OVF", OVF,
                                       "Overflow detected: saturated"),
    "REFCOUNT_DEC_ZERO": (2, SAT, None, "DEC_LEAK", DEC_LEAK, "Zero detected: saturated"),
    "REFCOUNT_DEC_NEGATIVE": (0, SAT, None, "DEC_LEAK", DEC_LEAK,
                              "Negative detected: saturated"),
    "REFCOUNT_DEC_AND_TEST_NEGATIVE": (0, SAT, False, "SUB_UAF", SUB_UAF,
                                       "Negative detected: saturated"),
    "REFCOUNT_SUB_AND_TEST_NEGATIVE": (3, SAT, False, "SUB_UAF", SUB_UAF,
                                       "Negative detected: saturated"),
    # The checked call is the safe inc/add_not_zero from 0, which must refuse.
    "REFCOUNT_INC_ZERO": (0, SAT, False, "ADD_UAF", ADD_UAF, "Zero detected: saturated"),
    "REFCOUNT_ADD_ZERO": (0, SAT, False, "ADD_UAF", ADD_UAF, "Zero detected: saturated"),
    "REFCOUNT_INC_SATURATED": (SAT, SAT, None, "ADD_OVF", OVF,
                               "Saturation detected: still saturated"),
    "REFCOUNT_DEC_SATURATED": (SAT, SAT, None, "DEC_LEAK", DEC_LEAK,
                               "Saturation detected: still saturated"),
    "REFCOUNT_ADD_SATURATED": (SAT, SAT, None, "ADD_OVF", OVF,
                               "Saturation detected: still saturated"),
    "REFCOUNT_INC_NOT_ZERO_SATURATED": (SAT, SAT, True, "ADD_NOT_ZERO_OVF", OVF,
                                        "Saturation detected: still saturated"),
    "REFCOUNT_ADD_NOT_ZERO_SATURATED": (SAT, SAT, True, "ADD_NOT_ZERO_OVF", OVF,
                                        "Saturation detected: still saturated"),
    "REFCOUNT_DEC_AND_TEST_SATURATED": (SAT, SAT, False, "SUB_UAF", SUB_UAF,
                                        "Saturation detected: still saturated"),
    "REFCOUNT_SUB_AND_TEST_SATURATED": (SAT, SAT, False, "SUB_UAF", SUB_UAF,
                                        "Saturation detected: still saturated"),
}


@pytest.fixture(scope="module")
def lkdtm_arena():
    arena = Arena.create(capacity=4)
    try:
        yield arena
    finally:
        arena.close()


def test_catalogue_is_the_seventeen_selftest_cases():
    assert [c.name for c in lkdtm.CASES] == list(EXPECTED)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_case_gives_the_kernel_verdict(lkdtm_arena, name):
    start, final, returned, kind, text, verdict = EXPECTED[name]
    case = next(c for c in lkdtm.CASES if c.name == name)
    assert case.start == start

    outcome = lkdtm.run_case(lkdtm_arena, case)

    assert outcome.final == final
    assert outcome.returned is returned
    assert [(w.kind, w.text) for w in outcome.warns] == [(kind, text)]
    assert outcome.warns[0].new & 0xFFFFFFFF == SAT
    assert outcome.verdict == verdict
    assert not [t for _, t in outcome.log if t.startswith(("Fail:", "Weird:"))]
    assert outcome.passed
    assert lkdtm_arena.in_use == 0


def test_a_wrapping_refcount_would_be_judged_fail(lkdtm_arena):
    """The judge itself can fail: a counter that wrapped is 'Fail:', not 'saturated'."""

    def wraps(r, log):
        r.set(0x80000000)  # what a plain atomic_t would hold after INT_MAX + 1
        lkdtm.overflow_check(r, log)

    outcome = lkdtm.run_case(lkdtm_arena, lkdtm.Case("WRAP", REFCOUNT_MAX, wraps,
                                                     lkdtm.CALL_TRACE))
    assert outcome.verdict == "Fail: refcount wrapped to -2147483648"
    assert not outcome.passed


def test_cli_prints_every_verdict_and_exits_zero(capsys):
    assert main(["lkdtm"]) == 0
    out = capsys.readouterr().out
    for name, expected in EXPECTED.items():
        line = next(ln for ln in out.splitlines() if ln.startswith(name + " "))
        assert expected[5] in line and line.rstrip().endswith("ok")
    assert "17 of 17 cases gave the kernel's verdict" in out


def test_cli_json_carries_value_return_and_warn(capsys):
    assert main(["lkdtm", "--json", "REFCOUNT_DEC_AND_TEST_NEGATIVE"]) == 0
    [case] = json.loads(capsys.readouterr().out)
    assert case["final"] == SAT and case["returned"] is False and case["passed"]
    assert [w["kind"] for w in case["warns"]] == ["SUB_UAF"]


def test_cli_verbose_prints_the_warn_with_its_python_stack(capsys):
    assert main(["lkdtm", "-v", "REFCOUNT_INC_ZERO"]) == 0
    out = capsys.readouterr().out
    assert "------------[ cut here ]------------" in out
    assert ADD_UAF in out and "Call Trace (Python):" in out and "in inc_zero" in out


def test_cli_unknown_case_is_an_error(capsys):
    assert main(["lkdtm", "REFCOUNT_NO_SUCH"]) == 2
    assert "REFCOUNT_NO_SUCH" in capsys.readouterr().err
