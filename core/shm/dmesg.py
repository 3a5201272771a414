"""The WARN log: records read back from the arena's ring, printed the way the kernel prints them.

The C core writes a record the moment a WARN fires (kind, text, object, pid,
values); the Python caller then attaches its own stack.  Capturing the
stack costs nothing on the non-warning path: it happens only after C
reported a WARN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vfio_emu.shm import _binding as C
from vfio_emu.stack import caller_stack


@dataclass(frozen=True)
class WarnRecord:
    """One WARN as the kernel would log it, with the Python stack that triggered it."""

    seq: int
    kind: str
    text: str
    pid: int
    tid: int
    time_ns: int
    object_kind: str
    object_index: int
    object_gen: int
    label: str
    old: int
    new: int
    stack: str

    @property
    def object(self) -> str:
        """The object the WARN is about, as reports name it."""
        if not self.object_kind:
            return "-"
        label = f" '{self.label}'" if self.label else ""
        return f"{self.object_kind}{label} (slot {self.object_index}, gen {self.object_gen})"

    def __str__(self) -> str:
        lines = [
            "------------[ cut here ]------------",
            self.text,
            f"WARNING: PID: {self.pid} TID: {self.tid} seq {self.seq} on {self.object}",
        ]
        if self.kind != "WARN":
            lines.append(f"refcount {self.old & 0xFFFFFFFF:#x} -> {self.new & 0xFFFFFFFF:#x}")
        if self.stack:
            lines.append("Call Trace (Python):")
            lines.append(self.stack.rstrip("\n"))
        lines.append("---[ end trace ]---")
        return "\n".join(lines)


def _decode(buf: Any) -> str:
    return C.string(buf).decode("utf-8", "replace")  # type: ignore[no-any-return]


def read(arena_ptr: Any, since: int, head: int, capacity: int) -> list[WarnRecord]:
    """Records with seq > since that are still in the ring, oldest first."""
    first = max(since + 1, head - capacity + 1, 1)
    entry = C.new("vfio_warn_entry_t *")
    out = []
    for seq in range(first, head + 1):
        if C.warn_read(arena_ptr, seq, entry) != 0:
            continue  # overwritten, or its writer died mid-record
        out.append(
            WarnRecord(
                seq=seq,
                kind=C.WARN_KINDS.get(entry.kind, str(entry.kind)),
                text=_decode(entry.text),
                pid=entry.pid,
                tid=entry.tid,
                time_ns=entry.time_ns,
                object_kind=C.KIND_NAMES.get(entry.obj_kind, ""),
                object_index=entry.obj_index,
                object_gen=entry.obj_gen,
                label=_decode(entry.label),
                old=entry.old,
                new=entry.new,
                stack=_decode(entry.stack),
            )
        )
    return out


def attach_stack(arena_ptr: Any, first_seq: int) -> None:
    """Give the caller's stack to the WARNs this thread just recorded from first_seq on.

    Sequence 0 means the ring dropped the WARN (warn_dropped counts it): nothing to stamp.
    """
    if first_seq:
        stack = caller_stack(max_bytes=C.WARN_STACK_MAX)
        C.warn_set_stack(arena_ptr, first_seq, stack.encode("utf-8", "replace"))
