"""The Kernel itself: the configurations it accepts, the trace of every transition
with its counters, and what its delayed-release worker reports.
"""

from __future__ import annotations

from typing import Any

import pytest
from _asserts import BOTH, assert_clean, in_order, ops_of
from _drivers import NAME, Driver, probe, remove

from vfio_emu.errors import InvalidArgumentError
from vfio_emu.linux.kernel import Kernel
from vfio_emu.linux.vfio import DeviceFile, vfio_free_device, vfio_group_get_device_fd
from vfio_emu.shm.arena import Arena

# -- configuration -------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [{"semantics": "v5"}, {"unregister_order": "v6.6"},
                                    {"watchdog_s": 0}, {"watchdog_s": 1.5}],
                         ids=["semantics", "order", "watchdog0", "watchdog-float"])
def test_kernel_rejects_unknown_configuration(kwargs):
    with pytest.raises(InvalidArgumentError):
        Kernel(**kwargs)


# -- the trace -----------------------------------------------------------------------------

@BOTH
def test_trace_records_every_transition_in_order_with_its_counters(make_kernel, semantics):
    k = make_kernel(semantics=semantics)
    vdev, _ = probe(k)
    fd = vfio_group_get_device_fd(k, NAME)
    assert isinstance(fd, DeviceFile)
    fd.close()
    remove(vdev)
    expected = ["vfio_init_device", "vfio_assign_device_set", "vfio_register_group_dev",
                "try_get_registration", "fd open", "fd close", "put_registration",
                "put_registration", "unlink: group list, device_del",
                "vfio_unregister_group_dev", "vfio_put_device", "vfio_device_release", "kfree"]
    assert in_order(ops_of(k), expected), k.trace.timeline()
    by_op: dict[str, list[Any]] = {}
    for e in k.trace.events:
        by_op.setdefault(e.op, []).append(e)
    assert by_op["vfio_init_device"][0].kref == (0, 1)
    assert by_op["vfio_register_group_dev"][0].refcount == (0, 1)
    assert by_op["try_get_registration"][0].refcount == (1, 2)
    assert [e.refcount for e in by_op["put_registration"]] == [(2, 1), (1, 0)]
    assert by_op["vfio_put_device"][0].kref == (1, 0)
    assert [e.open_count for e in by_op["fd open"]] == [1]
    assert_clean(k)


def test_an_event_is_made_as_its_frozen_dataclass_would_make_it():
    """Event's __init__ stores its fields directly (speed): same parameters, defaults,
    errors, equality, hash and immutability as the dataclass' own - for any fields."""
    import dataclasses
    import inspect

    from vfio_emu.linux.trace import Event, _direct_init

    @dataclasses.dataclass(frozen=True)
    class Generated:
        jiffies: int
        pid: int
        device: str
        op: str
        kref: tuple[int, int] | None = None
        refcount: tuple[int, int] | None = None
        open_count: int | None = None
        detail: str = ""
        actor: str = "-"  # a field added later is picked up

    @dataclasses.dataclass(frozen=True)
    class Direct(Generated):
        pass

    _direct_init(Direct)
    assert Direct.__init__ is not Generated.__init__
    assert inspect.signature(Direct) == inspect.signature(Generated)
    assert [p.name for p in inspect.signature(Event).parameters.values()][:4] == [
        "jiffies", "pid", "device", "op"]
    for args, kwargs in (((1, 2, "vfio0", "op"), {}),
                         ((1, 2, "vfio0", "op"), {"kref": (0, 1), "detail": "x"}),
                         ((1, 2, "vfio0", "op", None, (1, 0), 3, "d", "me"), {})):
        a, b = Generated(*args, **kwargs), Direct(*args, **kwargs)
        assert dataclasses.asdict(a) == dataclasses.asdict(b) and hash(a) == hash(b)
        assert repr(a).replace("Generated", "Direct") == repr(b)
        with pytest.raises(dataclasses.FrozenInstanceError):
            b.op = "changed"  # type: ignore[misc]
    for bad_args, bad_kwargs in (((1, 2, "vfio0"), {}), ((1, 2, "vfio0", "op"), {"x": 1})):
        with pytest.raises(TypeError) as gen_err:
            Generated(*bad_args, **bad_kwargs)
        with pytest.raises(TypeError) as dir_err:
            Direct(*bad_args, **bad_kwargs)
        assert str(dir_err.value) == str(gen_err.value).replace("Generated", "Direct")


def test_the_trace_makes_its_events_when_read_in_order_into_one_list():
    """add() keeps a tuple and record() an Event; reading `events` makes the Events of
    both, in the order recorded, into the one list every reader holds."""
    from vfio_emu.linux.trace import Event, Trace
    from vfio_emu.stack import getpid

    t = Trace()
    first = t.events
    t.add(1, "vfio0", "a", (0, 1), None, 0)
    made = t.record(2, "vfio0", "b", detail="x")
    t.add(3, "-", "c", detail="y")
    assert t.events is first and first[1] is made
    assert first == [Event(1, getpid(), "vfio0", "a", kref=(0, 1), open_count=0),
                     Event(2, getpid(), "vfio0", "b", detail="x"),
                     Event(3, getpid(), "-", "c", detail="y")]
    first.clear()  # a reader may clear it (keeping memory flat over many rounds)
    t.add(4, "vfio0", "d")
    assert t.events is first and [e.op for e in first] == ["d"]
    assert t.timeline() == str(first[0])


def test_the_trace_loses_no_event_to_a_reader_while_threads_record():
    import threading

    from vfio_emu.linux.trace import Trace

    t, n = Trace(), 20000
    start = threading.Barrier(3)

    def writer(name: str) -> None:
        start.wait()
        for i in range(n):
            t.add(i, name, "op")

    threads = [threading.Thread(target=writer, args=(w,)) for w in ("w1", "w2")]
    for th in threads:
        th.start()
    start.wait()
    seen = 0
    while any(th.is_alive() for th in threads):
        seen = len(t.events)  # reads race the appends
    for th in threads:
        th.join()
    events = t.events
    assert len(events) == 2 * n and seen <= len(events)
    for name in ("w1", "w2"):
        assert [e.jiffies for e in events if e.device == name] == list(range(n))


# -- the delayed-release worker ------------------------------------------------------------

def test_a_delayed_release_that_raises_an_unreported_error_is_reported(make_kernel):
    k = make_kernel(semantics="v6.2", delayed_release=True, seed=0)

    class V61Release(Driver):
        def release(self, vdev):
            vfio_free_device(vdev)  # a v6.1 driver built against v6.2

    vdev, _ = probe(k, driver=V61Release(k))
    remove(vdev)
    k.flush()
    assert any("vfio_free_device" in r.title or "v6.2" in r.title for r in k.reports)


# -- the workqueue: delayed work on its own clock, never on the wall clock -----------------

def test_delayed_work_waits_for_the_kernel_to_wait_not_for_the_wall_clock(make_kernel):
    k = make_kernel(delayed_release=True)
    ran: list[str] = []
    k.schedule_delayed(1, lambda: ran.append("work"), "work")
    for _ in range(1000):  # however long the caller takes, no kernel wait: nothing runs
        k.trace.record(k.jiffies(), "-", "busy")
    assert ran == [] and k.jiffies() == 0
    k.flush()
    assert ran == ["work"] and k.jiffies() == 1


def test_delayed_work_runs_in_the_order_it_falls_due_and_ties_in_queue_order(make_kernel):
    k = make_kernel(delayed_release=True)
    ran: list[str] = []
    for name, delay in (("late", 3), ("early", 1), ("tie-first", 2), ("tie-second", 2)):
        k.schedule_delayed(delay, lambda n=name: ran.append(n), name)
    k.advance(2)  # two jiffies pass: what falls due by then runs, in due order
    assert ran == ["early", "tie-first", "tie-second"]
    k.flush()
    assert ran[-1] == "late"


def test_the_release_delays_follow_from_the_seed(make_kernel):
    def delays(seed: int) -> list[str]:
        k = make_kernel(delayed_release=True, seed=seed)
        for name in "abcd":
            k.kobject_release(lambda: None, name)
        return [e.detail for e in k.trace.events if e.op == "kobject_release: delayed"]

    assert delays(7) == delays(7)
    assert len({tuple(delays(s)) for s in range(8)}) > 1



def test_a_kernel_on_a_given_arena_reports_only_the_warns_logged_after_it_started():
    with Arena.create(capacity=64, hz=250, time_scale=1000) as arena:
        arena.refcount(0).inc()  # refcount_t: addition on 0 - an earlier user's WARN
        kernel = Kernel(arena=arena)
        assert kernel.findings() == []
        arena.refcount(0).inc()
        assert [(f.kind, f.title) for f in kernel.findings()] == [
            ("WARN", "refcount_t: addition on 0; use-after-free.")]
        kernel.close()
        assert not arena.closed  # a given arena stays its owner's
