"""Reports: what the emulated kernel (or KASAN, lockdep, the watchdog, the leak check) says.

A report is data: tests assert on it, the CLI prints it.  Its text follows
the kernel's where the kernel has one.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Report:
    """One finding, with the stacks that explain it (allocation, free, call trace)."""

    kind: str  # "use-after-free", "double-free", "oops", "WARN", "hang", "leak", "info"
    title: str
    detail: str = ""
    stacks: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        lines = ["=" * 66, self.title]
        if self.detail:
            lines.append(self.detail)
        for heading, stack in self.stacks:
            lines.append(f"{heading}:")
            lines.append(stack.rstrip("\n") or "  (no Python stack)")
        lines.append("=" * 66)
        return "\n".join(lines)
