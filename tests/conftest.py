"""Shared fixtures: arenas whose clock runs 1000x fast (hz=1000, so 1 jiffy = 1 us real)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from _workers import FAST_CLOCK

from vfio_emu import Arena

#: pytester: the pytest plugin's tests run pytest on small test files of their own.
pytest_plugins = ["pytester"]


@pytest.fixture
def arena() -> Iterator[Arena]:
    """A 64-slot arena owned by the test; closing it unlinks the segment."""
    a = Arena.create(capacity=64, **FAST_CLOCK)
    try:
        yield a
    finally:
        a.close()


@pytest.fixture
def make_arena() -> Iterator[Callable[..., Arena]]:
    """Factory for extra arenas (other capacity, explicit name...), all closed at teardown."""
    made: list[Arena] = []

    def make(capacity: int = 64, **kwargs: object) -> Arena:
        for key, value in FAST_CLOCK.items():
            kwargs.setdefault(key, value)
        a = Arena.create(capacity=capacity, **kwargs)  # type: ignore[arg-type]
        made.append(a)
        return a

    try:
        yield make
    finally:
        for a in made:
            a.close()
