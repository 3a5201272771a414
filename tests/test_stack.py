"""Captured stacks (vfio_emu.stack): cheap to take, and read exactly as the frames were.

capture_stack() keeps code objects and instruction offsets; the (file, line, function)
triples it gives on reading must be what the frames said when it was taken - the line
of the call in each frame, as frame.f_lineno and the traceback module give it.
"""

from __future__ import annotations

import sys
import traceback

from vfio_emu.stack import Stack, caller_stack, capture_stack, capture_stack_py

Seen = list[tuple[Stack, tuple[tuple[str, int, str], ...]]]


def _by_frames(skip: int = 1) -> tuple[tuple[str, int, str], ...]:
    """The stack from the caller's frame as frame.f_lineno says it, outermost first."""
    frame = sys._getframe(skip)
    out = []
    while frame is not None and len(out) < 16:
        out.append((frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name))
        frame = frame.f_back
    return tuple(reversed(out))


def _take(seen: Seen) -> None:
    seen.append((capture_stack(internal=True), _by_frames()))


def _multiline(seen: Seen, a: int,
               b: int) -> tuple[None, None]:
    return (_take(seen),
            _take(
                seen))


def _gen(seen: Seen):  # type: ignore[no-untyped-def]
    yield _take(seen)
    yield [_take(seen) for _ in range(2)]


class _Ctx:
    def __init__(self, seen: Seen) -> None:
        self.seen = seen

    def __enter__(self) -> _Ctx:
        _take(self.seen)
        return self

    def __exit__(self, *exc: object) -> None:
        _take(self.seen)


def test_a_captured_stack_reads_as_the_frames_did_when_it_was_taken() -> None:
    seen: Seen = []
    _multiline(seen, 1,
               2)
    list(_gen(seen))
    (lambda: _take(seen))()
    with _Ctx(seen):
        _take(seen)
    try:
        raise ValueError
    except ValueError:
        _take(seen)
    finally:
        _take(seen)
    _ = {k: _take(seen) for k in range(1)}
    for _ in range(2):
        if seen:
            _take(
                seen)
    assert len(seen) == 14
    for stack, frames in seen:
        assert len(stack) == len(frames) == 16
        assert tuple(stack) == frames and stack == frames and stack[-1] == frames[-1]
        assert str(stack) == "".join(traceback.StackSummary.from_list(
            [(f, n, name, None) for f, n, name in frames]).format())


def test_the_emulators_own_frames_are_skipped_from_the_inner_end_and_limit_counts() -> None:
    stack = capture_stack(limit=3)
    assert len(stack) == 3
    assert stack[-1][2] == "test_the_emulators_own_frames_are_skipped_from_the_inner_end_" \
                           "and_limit_counts"
    assert capture_stack(limit=0) == Stack() == ()
    assert not Stack() and len(Stack([("f", 1, "g")])) == 1
    assert "test_the_emulators_own_frames" in caller_stack(limit=1)


def test_a_stack_is_a_read_only_sequence_of_frames_equal_to_its_tuple() -> None:
    frames = (("a.py", 1, "f"), ("b.py", 2, "g"))
    stack = Stack(frames)
    assert list(stack) == list(frames) and stack[0] == frames[0] and stack[1:] == frames[1:]
    assert stack == frames and stack == Stack(frames) and hash(stack) == hash(Stack(frames))
    assert repr(stack) == f"Stack({frames!r})"
    assert str(stack) == '  File "a.py", line 1, in f\n  File "b.py", line 2, in g\n'


def test_getpid_is_the_processes_own_and_a_forked_child_sees_its_own() -> None:
    import multiprocessing
    import os

    from vfio_emu import stack
    from vfio_emu.stack import getpid

    assert getpid() == stack.PID == os.getpid()
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    child = ctx.Process(target=_report_pids, args=(q,))
    child.start()
    theirs, their_pid, their_os = q.get(timeout=60)
    child.join(60)
    assert theirs == their_pid == their_os != os.getpid()


def _report_pids(q: object) -> None:
    import os

    from vfio_emu import stack
    from vfio_emu.stack import getpid

    q.put((getpid(), stack.PID, os.getpid()))  # type: ignore[attr-defined]


def _internal_caller(capture):  # type: ignore[no-untyped-def]
    """capture() called from two frames of a module the emulator calls its own."""
    namespace = {"__name__": "vfio_emu.linux.fake", "capture": capture}
    exec(compile("def inner(**kw):\n    return capture(**kw)\n"
                 "def outer(**kw):\n    return inner(**kw)\n", "fake.py", "exec"), namespace)
    return namespace["outer"]


def test_the_c_walk_gives_the_stack_the_python_walk_gives() -> None:
    for kw in ({}, {"internal": True}, {"limit": 2}, {"limit": 40}, {"limit": 0},
               {"limit": 3, "internal": True}):
        c, py = _internal_caller(capture_stack)(**kw), _internal_caller(capture_stack_py)(**kw)
        assert c == py, kw
    assert _internal_caller(capture_stack)()[-1][2] != "inner"
    assert _internal_caller(capture_stack)(internal=True)[-1] == ("fake.py", 2, "inner")


def test_in_a_greenlet_the_c_walk_stops_at_its_first_frame_as_the_python_walk_does() -> None:
    import greenlet

    def body() -> tuple[Stack, Stack]:
        return capture_stack(limit=40), capture_stack_py(limit=40)

    c, py = greenlet.greenlet(body).switch()
    assert c == py and [name for _, _, name in c] == ["body"]


def test_a_limit_beyond_a_c_long_is_the_whole_stack_or_none_as_in_python() -> None:
    whole = capture_stack(limit=1 << 70)
    assert len(whole) == len(capture_stack_py(limit=1 << 70)) > 2
    assert capture_stack(limit=-(1 << 70)) == capture_stack(limit=-1) == ()


def test_the_c_walk_refuses_arguments_capture_stack_does_not_take() -> None:
    for args, kwargs, what in (((1, True, 2), {}, "at most 2 arguments"),
                               ((), {"depth": 1}, "unexpected keyword argument 'depth'"),
                               ((3,), {"limit": 1}, "multiple values for argument 'limit'"),
                               (("3",), {}, "integer")):
        try:
            capture_stack(*args, **kwargs)
        except TypeError as e:
            assert what in str(e)
        else:
            raise AssertionError(f"capture_stack(*{args}, **{kwargs}) was accepted")


def test_the_c_walk_keeps_no_reference_once_its_stack_is_gone() -> None:
    code = sys._getframe().f_code
    before = sys.getrefcount(code)
    stacks = [capture_stack() for _ in range(100)]
    assert sys.getrefcount(code) >= before + 100  # each stack holds the frame's code
    del stacks
    assert sys.getrefcount(code) == before
