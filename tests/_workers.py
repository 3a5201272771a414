"""Child-process entry points and the helpers the tests share.

They live in an importable module so that the 'spawn' start method (which
pickles the target by module and name) can run them, and so that no test
imports conftest (benchmarks/ has one too).  pytest's `pythonpath = ["tests"]`
(pyproject.toml) makes it importable as `_workers` from every test folder, and
a spawned child inherits that sys.path.
"""

from __future__ import annotations

import os
import secrets
import time
from typing import Any

from vfio_emu import Arena

BIG_TIMEOUT = 30_000_000  # jiffies: 30 s real with the tests' 1000x clock
#: The tests' emulated clock: hz=1000 sped up 1000x, so 1 jiffy = 1 us real.
FAST_CLOCK: dict[str, Any] = {"hz": 1000, "time_scale": 1000.0}


def unique_name(tag: str = "t") -> str:
    """A shared-memory name nobody else uses (the pid keeps parallel runs apart)."""
    return f"vfio-emu-test-{tag}-{os.getpid()}-{secrets.token_hex(4)}"


def wait_for_waiters(c: Any, n: int = 1, timeout_s: float = 30.0) -> int:
    """Poll (bounded) until at least n tasks sleep on c; returns the count last seen."""
    deadline = time.monotonic() + timeout_s
    seen = c.waiters
    while seen < n and time.monotonic() < deadline:
        time.sleep(0.0005)
        seen = c.waiters
    return seen


# -- completion: cross-process wake ------------------------------------------------

def wait_pickled(c: Any, timeout: int, q: Any) -> None:
    """Wait on a Completion received pickled (or inherited by fork); report the result."""
    q.put(c.wait_for_completion_timeout(timeout))


def wait_attached(name: str, token: Any, timeout: int, q: Any) -> None:
    """Attach the arena by name, reopen the completion from its token, wait, report."""
    a = Arena.attach(name)
    try:
        c = a.open(token)
        q.put(c.wait_for_completion_timeout(timeout))
    finally:
        a.close()


def complete_when_waited(c: Any, q: Any) -> None:
    """Wait until the parent sleeps on c, then complete() it once; report waiters seen."""
    seen = wait_for_waiters(c)
    c.complete()
    q.put(seen)


# -- arena ownership -----------------------------------------------------------------

def attach_use_close(name: str, token: Any, q: Any) -> None:
    """Attach by name, take and drop a reference, close: an attacher never unlinks."""
    a = Arena.attach(name)
    k = a.open(token)
    k.get()
    k.put()
    owner = a.owner
    a.close()
    q.put((owner, os.path.exists("/dev/shm/" + name)))


def use_pickled_arena_and_close(arena: Any, q: Any) -> None:
    """Receive the Arena itself pickled, allocate and free in it, close it."""
    r = arena.refcount(7, label="from-child")
    value = r.read()
    r.free()
    owner = arena.owner
    arena.close()
    q.put((owner, value, os.path.exists("/dev/shm/" + arena.name)))


# -- krefs across processes ------------------------------------------------------------

def get_put_pairs(krefs: list[Any], start: Any, pairs: int, batch: int, q: Any) -> None:
    """pairs x (get; put) singly, then the same count through get_many/put_many."""
    start.wait_for_completion_timeout(BIG_TIMEOUT)
    released = 0
    for _ in range(pairs):
        for k in krefs:
            k.get()
            released += k.put()
    for _ in range(pairs // batch):
        for k in krefs:
            k.get_many(batch)
            released += k.put_many(batch)
    q.put(released)


def drop_one_reference_each(krefs: list[Any], releases: list[Any], start: Any, q: Any) -> None:
    """Drop exactly one reference on every kref; release() completes that kref's completion."""
    start.wait_for_completion_timeout(BIG_TIMEOUT)
    results = []
    for k, done in zip(krefs, releases, strict=True):
        results.append(k.put(release=lambda _k, done=done: done.complete()))
    q.put(results)


def hold_references_and_hang(k: Any, n: int, ready: Any, never: Any) -> None:
    """Take n references, say so, then sleep on a completion nobody completes (until killed)."""
    k.get_many(n)
    ready.complete()
    never.wait_for_completion()


def warn_in_child(r: Any, q: Any) -> None:
    """Trigger one WARN (inc from 0) from another process."""
    r.inc()
    q.put(os.getpid())


def alloc_free_churn(arena: Any, start: Any, rounds: int, q: Any) -> None:
    """Allocate and free objects of every kind as fast as possible."""
    start.wait_for_completion_timeout(BIG_TIMEOUT)
    bad = 0
    for i in range(rounds):
        objs = [arena.refcount(i & 0xFFFF, label=f"churn-{os.getpid()}"), arena.kref(),
                arena.completion()]
        if objs[0].read() != i & 0xFFFF or objs[1].read() != 1 or objs[2].done != 0:
            bad += 1
        for o in objs:
            o.free()
    q.put(bad)

