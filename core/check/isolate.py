"""Run a piece of the check in a child process, with a wall-clock budget.

A driver can block on something the emulator cannot see (a plain lock, a
threading.Event, an endless loop) or crash the interpreter (a C extension of
its own).  Each scenario therefore runs in a forked child: its result comes
back pickled; when the budget runs out, faulthandler writes every thread's
stack and ends the child, and the parent turns that into a hang; a child
killed by a signal is reported with the stack faulthandler wrote.  Arena
segments a dead child left behind are unlinked.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import pickle
import select
import signal
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vfio_emu.shm.arena import close_owned

#: Real seconds one scenario may take before it is called a hang of the driver.
BUDGET_S = 60.0
_SHM = "/dev/shm"


@dataclass
class ChildFailure:
    """The child did not hand back a result: it hung, or died."""

    hung: bool
    detail: str  # what happened, in one line
    stacks: str  # every thread's stack, as faulthandler wrote it


def run_isolated(fn: Callable[[], Any], budget_s: float = BUDGET_S) -> Any:
    """fn() in a forked child; its (picklable) result, or a ChildFailure.

    An exception fn raises comes back as a ChildFailure too (fn is expected to turn the
    driver's own exceptions into results itself)."""
    with tempfile.TemporaryFile() as stacks:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            os.close(r)
            code = 0
            try:
                faulthandler.enable(file=stacks, all_threads=True)
                faulthandler.dump_traceback_later(budget_s, exit=True, file=stacks)
                data = pickle.dumps(("ok", fn()))
            except BaseException:
                data = pickle.dumps(("raised", traceback.format_exc()))
                code = 3
            try:
                close_owned()  # what fn left open: os._exit() runs no finalizer
                with os.fdopen(w, "wb") as out:
                    out.write(data)
            finally:
                os._exit(code)
        os.close(w)
        started = time.monotonic()
        data = _read_all(r, pid, budget_s + 30)
        elapsed = time.monotonic() - started
        _, status = os.waitpid(pid, 0)
        unlink_segments_of(pid)
        if data:
            kind, value = pickle.loads(data)
            if kind == "ok":
                return value
            return ChildFailure(False, "the check itself raised in the child", str(value))
        stacks.seek(0)
        text = stacks.read().decode("utf-8", "replace")
        if os.WIFSIGNALED(status):
            sig = signal.Signals(os.WTERMSIG(status)).name
            return ChildFailure(False, f"the driver's process died of {sig}", text)
        if elapsed < budget_s:  # it exited on its own: a runtime (a sanitizer) ended it
            return ChildFailure(False, "the driver's process died (exit status "
                                       f"{os.WEXITSTATUS(status)}) without a result", text)
        return ChildFailure(True, f"the scenario did not finish in {budget_s:g} s (real "
                                  "time): something waits on what the emulated kernel cannot "
                                  "see (a plain lock, an event, a loop)", text)


def _read_all(fd: int, pid: int, timeout_s: float) -> bytes:
    """Everything the child writes, until it closes the pipe; a child that outlives even
    faulthandler's exit is killed."""
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    with os.fdopen(fd, "rb", buffering=0) as pipe:
        while True:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([pipe], [], [], max(0.0, left))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                return b""
            chunk = pipe.read(1 << 16)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


def unlink_segments_of(pid: int) -> None:
    """Arena segments a child created and could not close (it hung or died): by the
    default name Arena.create gives them."""
    try:
        names = os.listdir(_SHM)
    except OSError:
        return
    for name in names:
        if name.startswith(f"vfio-emu-{pid}-"):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(_SHM, name))
