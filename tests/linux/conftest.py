"""Fixtures of the emulated-kernel tests: kernels that are flushed and closed at teardown."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from vfio_emu.linux.kernel import Kernel


@pytest.fixture
def make_kernel() -> Iterator[Callable[..., Kernel]]:
    """Kernel(...) factory; every kernel made is flushed and closed at teardown."""
    made: list[Kernel] = []

    def make(**kwargs: Any) -> Kernel:
        k = Kernel(**kwargs)
        made.append(k)
        return k

    try:
        yield make
    finally:
        for k in made:
            k.close()
