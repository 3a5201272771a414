"""docs/plugins.md's walk-through: its driver, extracted verbatim, installed by entry point
and checked by `vfio-emu check` in all four modes - and caught when its release leaks."""

from __future__ import annotations

import re
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from vfio_emu.cli import main

DOC = Path(__file__).resolve().parents[2] / "docs" / "plugins.md"
MODES = [("v6.1", False), ("v6.1", True), ("v6.2", False), ("v6.2", True)]


def walkthrough_driver() -> str:
    """The Python block of the walk-through's first step, as a reader would copy it."""
    text = DOC.read_text()
    section = text[text.index("## Walk-through"):]
    match = re.search(r"\n( *)```python\n(.*?)\n\1```", section, re.S)
    assert match, "no python block in the walk-through"
    return textwrap.dedent(match.group(2)) + "\n"


@pytest.fixture
def install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """Install a driver module under an entry point of group vfio_emu.drivers."""
    names: list[str] = []
    monkeypatch.delenv("VFIO_EMU_PLUGINS", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))

    def install(module: str, source: str) -> None:
        (tmp_path / f"{module}.py").write_text(source)
        dist = tmp_path / f"{module}-1.0.dist-info"
        dist.mkdir()
        (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 1.0\n")
        (dist / "entry_points.txt").write_text(f"[vfio_emu.drivers]\n{module} = {module}\n")
        names.append(module)

    yield install
    for module in names:
        sys.modules.pop(module, None)


def check(driver: str, semantics: str, delayed: bool) -> int:
    return main(["check", driver, "--semantics", semantics,
                 *(["--delayed-release"] if delayed else [])])


def test_the_walkthrough_block_is_the_acme_driver():
    source = walkthrough_driver()
    assert "class AcmeDevice(VfioDevice)" in source
    assert "from vfio_emu.linux.vfio import" in source


@pytest.mark.parametrize(("semantics", "delayed"), MODES)
def test_the_walkthrough_driver_passes_check(install, capsys, semantics, delayed):
    install("acme_vfio", walkthrough_driver())
    assert check("acme_vfio", semantics, delayed) == 0
    out = capsys.readouterr().out
    assert "driver acme_vfio" in out and "FAIL" not in out
    assert re.search(r"check: (\d+) of \1 scenario runs passed", out)


def test_the_walkthrough_driver_without_its_kfree_fails_with_the_leak(install, capsys):
    source = walkthrough_driver()
    assert "    kfree(vdev.buf)\n" in source
    install("acme_vfio_leaky", source.replace("    kfree(vdev.buf)\n", "    pass\n"))
    assert check("acme_vfio_leaky", "v6.1", False) == 1
    out = capsys.readouterr().out
    assert "life cycle" in out and "FAIL" in out and "unreferenced object Buf" in out
