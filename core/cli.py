"""The vfio-emu command line.  `vfio-emu lkdtm` runs the refcount misuse catalogue."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from vfio_emu import __version__, lkdtm
from vfio_emu.arena import Arena


def _hex(value: int) -> str:
    return f"{value:#010x}"


def _table(outcomes: list[lkdtm.Outcome]) -> str:
    rows = [("TEST", "START", "FINAL", "WARN", "LKDTM VERDICT", "SELFTEST")]
    for o in outcomes:
        warn = ", ".join(sorted({w.kind for w in o.warns})) or "-"
        rows.append((o.case.name, _hex(o.case.start), _hex(o.final), warn, o.verdict,
                     "ok" if o.passed else "FAIL"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _verbose(o: lkdtm.Outcome) -> str:
    prefix = {"info": "", "warn": "(warn) ", "err": "(err) "}
    lines = [f"lkdtm: Performing direct entry {o.case.name}"]
    lines += [f"lkdtm: {prefix[level]}{text}" for level, text in o.log]
    return "\n".join(lines + [str(w) for w in o.warns])


def _as_json(outcomes: list[lkdtm.Outcome]) -> str:
    return json.dumps(
        [{
            "test": o.case.name,
            "start": o.case.start,
            "final": o.final,
            "returned": o.returned,
            "expect": o.case.expect,
            "verdict": o.verdict,
            "passed": o.passed,
            "log": [{"level": level, "text": text} for level, text in o.log],
            "warns": [{"seq": w.seq, "kind": w.kind, "text": w.text, "pid": w.pid,
                       "old": w.old, "new": w.new, "stack": w.stack} for w in o.warns],
        } for o in outcomes],
        indent=2,
    )


def cmd_lkdtm(args: argparse.Namespace) -> int:
    with Arena.create(capacity=8) as arena:
        try:
            outcomes = lkdtm.run_all(arena, args.case)
        except KeyError as e:
            print(f"vfio-emu lkdtm: {e.args[0]}", file=sys.stderr)
            return 2
    failed = [o for o in outcomes if not o.passed]
    if args.json:
        print(_as_json(outcomes))
        return 1 if failed else 0
    if args.verbose:
        for o in outcomes:
            print(_verbose(o), end="\n\n")
    print(_table(outcomes))
    print()
    print(f"lkdtm refcount: {len(outcomes) - len(failed)} of {len(outcomes)} cases "
          "gave the kernel's verdict" + (f"; FAILED: {', '.join(o.case.name for o in failed)}"
                                         if failed else ""))
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vfio-emu", description="Emulate the Linux VFIO device life cycle in userspace.")
    parser.add_argument("--version", action="version", version=f"vfio-emu {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("lkdtm", help="run the lkdtm refcount misuse catalogue against the C core",
                       description="Replay drivers/misc/lkdtm/refcount.c and judge each case "
                                   "as the kernel selftest does. Exit status 1 if any fails.")
    p.add_argument("case", nargs="*", help="run only these cases (e.g. REFCOUNT_INC_OVERFLOW)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="print each case's lkdtm log and WARN reports (dmesg style)")
    p.set_defaults(func=cmd_lkdtm)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
