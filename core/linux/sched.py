"""The emulated kernel's scheduler: tasks that take turns at the kernel's own operations.

Under a Scheduler, every actor of a life-cycle run - a driver's remove, a
process opening FDs, a delayed release on the workqueue - is a Task.  Tasks
are greenlets of the caller's thread, so exactly one runs at a time and a
switch costs a microsecond, not a thread hand-off: a task gives the CPU up
only at a switch point (every traced kernel transition, every lock and
unlock, allocation and free, every wait).  There a Policy picks which enabled task
runs next, so an interleaving is the short list of those picks - independent
of the machine's speed - and the same picks give the same run.

Time: emulated time passes only when no task can run.  Then the earliest
timed wait (an unregister loop's 10 s, a watchdog) times out; a task blocked
with no timeout and nothing that can wake it is a deadlock, reported as a
hang.  A task that only waits for events (userspace waiting for a request)
is idle, not hung: it is cancelled when nothing else is left.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from greenlet import getcurrent, greenlet

from vfio_emu.errors import EmulatorError, HangError, InvalidArgumentError
from vfio_emu.report import Report

if TYPE_CHECKING:  # annotations only: the kernel holds its scheduler
    from vfio_emu.linux.kernel import Kernel

RUNNABLE, BLOCKED, DONE = "runnable", "blocked", "done"
#: Switch points one run may take before it is called a livelock.
MAX_STEPS = 200_000


class Cancelled(BaseException):
    """Raised in an idle task the scheduler ends because nothing is left to wake it."""


@dataclass
class Task:
    """One actor: a greenlet that runs only when the scheduler switches to it."""

    tid: int
    name: str
    fn: Callable[[], object]
    state: str = RUNNABLE
    until: Callable[[], bool] | None = None  # what a blocked task waits for
    deadline: int | None = None  # the jiffies its timed wait times out at
    idle: bool = False  # waits for events only: cancelled, not hung, when nothing is left
    work: bool = False  # a workqueue item (flush_scheduled_work() waits for these)
    waiting_on: str = ""
    timed_out: bool = False
    error: BaseException | None = None
    glet: greenlet | None = None

    def __repr__(self) -> str:
        return f"<Task {self.tid} {self.name} {self.state}>"


@dataclass(frozen=True)
class Decision:
    """A switch point with a choice: which tasks could run, which ran before, the op."""

    index: int  # how many decisions came before it
    enabled: tuple[int, ...]  # task ids, ascending
    current: int | None  # the task that reached the point, if it can go on
    op: str


class Policy(Protocol):
    """What picks the next task at each decision (explore's strategies)."""

    def choose(self, decision: Decision) -> int:
        """A task id from decision.enabled."""
        ...


class FirstPolicy:
    """The default: the running task goes on; when it blocks, the lowest-numbered one."""

    def choose(self, decision: Decision) -> int:
        if decision.current is not None:
            return decision.current
        return decision.enabled[0]


class Scheduler:
    """Runs tasks one at a time on a kernel; the policy decides every switch."""

    def __init__(self, kernel: Kernel, policy: Policy | None = None,
                 max_steps: int = MAX_STEPS) -> None:
        self.kernel = kernel
        self.policy: Policy = policy or FirstPolicy()
        self.max_steps = max_steps
        self.tasks: list[Task] = []
        self.current: Task | None = None
        self.decisions: list[Decision] = []
        self.picks: list[int] = []  # the task chosen at each decision
        self.steps = 0  # switch points passed
        self._home: greenlet | None = None  # where run() waits: every task's parent
        self._interrupt: BaseException | None = None  # Ctrl-C in a task: run() raises it
        self._aborting = False  # the run is being ended: tasks unwind, nobody switches
        self._hang: Report | None = None  # why, when it is a hang
        self._policy_error: BaseException | None = None  # the policy failed: run() raises it
        self._running = False
        #: preempt_disable() depth: while > 0 the running task is not switched out at
        #: switch points (the model's own atomic steps, e.g. kfree()).
        self.atomic = 0

    # -- setting up -----------------------------------------------------------------

    def spawn(self, fn: Callable[[], object], name: str, work: bool = False) -> Task:
        """A new task, runnable at once (from the outside before run(), or by a task:
        a work item queued, a process started)."""
        if not callable(fn):
            raise InvalidArgumentError(f"spawn: {fn!r} is not callable")
        task = Task(len(self.tasks), name, fn, work=work)
        task.glet = greenlet(lambda: self._body(task), parent=self._home or getcurrent())
        self.tasks.append(task)
        return task

    def run(self) -> None:
        """Run every task to its end (the caller is not a task: it waits).  A task that
        ends hands back the task to run next; each switch at a switch point goes straight
        from task to task."""
        if self._running or self.kernel.sched is not None:
            raise EmulatorError("the kernel already runs a scheduler")
        self._running = True
        self._home = getcurrent()
        for task in self.tasks:
            if task.glet is not None:
                task.glet.parent = self._home
        self.kernel.sched = self.kernel.trace.sched = self
        try:
            nxt = self._next(None, "start")
            while nxt is not None:
                self.current = nxt
                assert nxt.glet is not None
                nxt = nxt.glet.switch()
        finally:
            self.current = None
            self.kernel.sched = self.kernel.trace.sched = None
        if self._interrupt is not None:
            raise self._interrupt
        if self._policy_error is not None:
            raise self._policy_error

    @property
    def hang(self) -> Report | None:
        """The deadlock or livelock that ended the run, if one did."""
        return self._hang

    # -- what tasks call --------------------------------------------------------------

    def pending_work(self) -> bool:
        """Whether a work item other than the running task has yet to end."""
        return any(t.work and t.state != DONE and t is not self.current for t in self.tasks)

    def current_name(self) -> str:
        task = self.current
        return task.name if task is not None else ""

    def task(self) -> Task | None:
        """The task running now, if the caller is one (not setup or another greenlet)."""
        return self._me()

    def _me(self) -> Task | None:
        me = self.current
        if me is None or me.glet is not getcurrent():
            return None  # not a task of this run (setup, or another greenlet)
        return me

    def preempt(self, op: str) -> None:
        """A switch point: the policy may let another task run before this one goes on."""
        me = self._me()
        if me is None:
            return
        if self._aborting:
            if self._hang is not None:
                raise HangError(self._hang)
            return
        if self.atomic:
            return
        self._step()
        nxt = self._next(me, op)
        if nxt is not None and nxt is not me:
            self._switch(me, nxt)

    def block(self, until: Callable[[], bool], what: str, timeout: int | None = None,
              idle: bool = False) -> bool:
        """Sleep until until() holds: True; or, after `timeout` jiffies of emulated time,
        False.  idle: the task only waits for events (see the module docstring)."""
        me = self._me()
        if me is None:
            raise EmulatorError(f"{what}: only a task of the running scheduler can block")
        if until():
            self.preempt(what)
            return True
        if self._aborting:
            raise HangError(self._hang) if self._hang is not None else Cancelled(what)
        self._step()  # a loop of timed waits is a livelock too
        me.state, me.until, me.waiting_on, me.idle = BLOCKED, until, what, idle
        me.deadline = None if timeout is None else self.kernel.jiffies() + timeout
        me.timed_out = False
        nxt = self._next(me, what)
        if nxt is None:  # nobody can run, this task included: a deadlock
            self._deadlock()
        elif nxt is not me:
            self._switch(me, nxt)
        if me.state == BLOCKED:  # woken only to unwind
            me.state, me.until = RUNNABLE, None
            if me.idle or self._hang is None:
                raise Cancelled(what)
            raise HangError(self._hang)
        return not me.timed_out

    # -- the machinery ------------------------------------------------------------------

    def _step(self) -> None:
        """Count a switch point or a wait; past max_steps the run is a livelock."""
        self.steps += 1
        if self.steps > self.max_steps:
            self._end(f"INFO: no progress: {self.max_steps} switch points and waits without "
                      "the run ending (a livelock)", "the tasks kept running or waiting; "
                      "none finished")
            raise HangError(self._hang)  # type: ignore[arg-type]

    def _body(self, task: Task) -> Task | None:
        """A task's greenlet: its function, then the task to run next (None: the run is
        over), returned to run()."""
        try:
            task.fn()
        except Cancelled:
            pass
        except (KeyboardInterrupt, SystemExit) as e:  # not the task's: the run's caller's
            self._interrupt = e
            self._aborting = True
            task.state, task.until = DONE, None
            return None
        except BaseException as e:  # the run's verdict reads it; the task just ends
            task.error = e
        task.state, task.until = DONE, None
        if self._interrupt is not None:
            return None
        nxt = self._next(None, f"{task.name} ends")
        if nxt is None and any(t.state == BLOCKED for t in self.tasks):
            self._deadlock()
            nxt = self._next(None, "unwind")
        return nxt

    def _switch(self, me: Task, nxt: Task) -> None:
        self.current = nxt
        assert nxt.glet is not None
        nxt.glet.switch()  # until someone switches back to me
        self.current = me

    def _next(self, me: Task | None, op: str) -> Task | None:
        """The task to run next (me included), or None when none can."""
        if self._aborting:  # the running task goes on; then each other, in turn, to unwind
            if me is not None and me.state == RUNNABLE:
                return me
            return next((t for t in self.tasks if t.state == RUNNABLE), None) or next(
                (t for t in self.tasks if t.state == BLOCKED), None)
        # the task that reached this point can go on (a pick of another is a preemption)
        # only if it did not just block, even when its wait times out at once
        going_on = me is not None and me.state == RUNNABLE
        enabled = [t for t in self.tasks if t.state == RUNNABLE
                   or (t.state == BLOCKED and t.until is not None and t.until())]
        if not enabled:
            timed = [t for t in self.tasks if t.state == BLOCKED and t.deadline is not None]
            if not timed:
                return None
            now = min(t.deadline for t in timed if t.deadline is not None)
            self.kernel.set_jiffies(now)  # time passes only when nobody can run
            enabled = [t for t in timed if t.deadline == now]
            for t in enabled:
                t.state, t.until, t.deadline, t.timed_out = RUNNABLE, None, None, True
        if len(enabled) == 1:
            chosen = enabled[0]
        else:
            current = me.tid if going_on and me in enabled else None
            decision = Decision(len(self.decisions), tuple(t.tid for t in enabled), current, op)
            try:
                tid = self.policy.choose(decision)
                if tid not in decision.enabled:
                    raise EmulatorError(f"the policy chose task {tid}, not one of "
                                        f"{decision.enabled} at decision {decision.index}")
            except Exception as e:  # the run cannot follow its policy: end it, run() raises
                self._policy_error = e
                self._aborting = True
                return self._next(me, op)
            self.decisions.append(decision)
            self.picks.append(tid)
            chosen = self.tasks[tid]
        if chosen.state == BLOCKED:
            chosen.state, chosen.until, chosen.deadline = RUNNABLE, None, None
        return chosen

    def _deadlock(self) -> None:
        """No task can run and no timed wait is left.  Idle tasks (userspace waiting for
        events) are cancelled; any other blocked task is a hang."""
        stuck = [t for t in self.tasks if t.state == BLOCKED and not t.idle]
        if not stuck:
            self._aborting = True
            return
        self._end(f"INFO: task {stuck[0].name!r} blocked forever: {stuck[0].waiting_on}",
                  "no task can run and no timed wait is left. Blocked:\n" + "\n".join(
                      f"  {t.name}: {t.waiting_on}" for t in self.tasks if t.state == BLOCKED))

    def _end(self, title: str, detail: str) -> None:
        self._aborting = True  # first: the report is a switch point too
        self._hang = self.kernel.report("hang", title, detail)


__all__ = ["BLOCKED", "DONE", "RUNNABLE", "Cancelled", "Decision", "FirstPolicy", "Policy",
           "Scheduler", "Task"]
