"""The timeline as Chrome trace-event JSON: valid for the Trace Event Format (what
ui.perfetto.dev and chrome://tracing read), one track per task, slices for kernel
operations, counters for the kref and registration counts, instants for reports."""

from __future__ import annotations

import json
from numbers import Number
from typing import Any

from vfio_emu.check import Mode
from vfio_emu.explore import RACES, run_race
from vfio_emu.explore.chrome import MAIN, chrome_trace, write_chrome_trace
from vfio_emu.plugins.manager import Plugins

PHASES = {"X", "B", "E", "i", "I", "C", "M"}
METADATA = {"process_name": "name", "thread_name": "name", "process_sort_index": "sort_index",
            "thread_sort_index": "sort_index", "process_labels": "labels"}


def trace_event_format_errors(doc: Any) -> list[str]:
    """What breaks the Trace Event Format's JSON Object Format in doc (empty: valid)."""
    errors: list[str] = []
    if not isinstance(doc, dict) or not isinstance(doc.get("traceEvents"), list):
        return ["not an object with a traceEvents array"]
    if doc.get("displayTimeUnit", "ms") not in ("ms", "ns"):
        errors.append("displayTimeUnit must be ms or ns")
    open_slices: dict[tuple[int, int], list[str]] = {}
    last_end: dict[tuple[int, int], float] = {}
    for n, e in enumerate(doc["traceEvents"]):
        where = f"event {n} ({e.get('name')!r})"
        ph = e.get("ph")
        if ph not in PHASES:
            errors.append(f"{where}: phase {ph!r}")
            continue
        if not isinstance(e.get("name"), str) or not isinstance(e.get("pid"), int):
            errors.append(f"{where}: name and pid are required")
        if ph != "C" and not isinstance(e.get("tid"), int):
            errors.append(f"{where}: tid is required")
        if ph == "M":
            key = METADATA.get(e["name"])
            if key is None or key not in e.get("args", {}):
                errors.append(f"{where}: metadata needs args.{key or '?'}")
            continue
        ts = e.get("ts")
        if not isinstance(ts, Number) or ts < 0:
            errors.append(f"{where}: ts must be a non-negative number")
            continue
        track = (e["pid"], e.get("tid", 0))
        if ph == "X":
            dur = e.get("dur")
            if not isinstance(dur, Number) or dur < 0:
                errors.append(f"{where}: a complete event needs dur >= 0")
            elif ts < last_end.get(track, 0):
                errors.append(f"{where}: overlaps the previous slice of its track")
            else:
                last_end[track] = ts + dur
        elif ph == "B":
            open_slices.setdefault(track, []).append(e["name"])
        elif ph == "E" and not open_slices.get(track):
            errors.append(f"{where}: E without a B")
        elif ph == "E":
            open_slices[track].pop()
        elif ph in ("i", "I") and e.get("s", "t") not in ("g", "p", "t"):
            errors.append(f"{where}: instant scope must be g, p or t")
        elif ph == "C" and not (isinstance(e.get("args"), dict) and e["args"] and all(
                isinstance(v, Number) for v in e["args"].values())):
            errors.append(f"{where}: a counter needs numeric args")
    errors += [f"track {t}: B without E" for t, names in open_slices.items() if names]
    return errors


def found_race() -> Any:
    pci = Plugins(load_entrypoints=False).driver("pci")
    return run_race(pci, RACES["reopen on request"], Mode("v6.1"))


def test_the_trace_of_a_found_race_is_valid_trace_event_json(tmp_path):
    outcome = found_race()
    path = tmp_path / "race.json"
    write_chrome_trace(str(path), outcome.events, "reopen on request")
    doc = json.loads(path.read_text())
    assert trace_event_format_errors(doc) == []


def slices_of(doc):
    return [e for e in doc["traceEvents"] if e["ph"] == "X"]


def test_each_task_has_its_own_track_and_each_operation_is_a_slice_on_it():
    outcome = found_race()
    doc = chrome_trace(outcome.events)
    threads = {e["tid"]: e["args"]["name"] for e in doc["traceEvents"]
               if e["ph"] == "M" and e["name"] == "thread_name"}
    assert set(threads.values()) == {MAIN, "remove", "vmm"}
    # A viewer folds tid 0 and a tid equal to the pid into the process's main thread.
    assert all(tid not in (0, 1) for tid in threads) and {e["pid"] for e in slices_of(doc)} == {1}
    slices = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    assert len(slices) == sum(1 for e in outcome.events if not e.op.startswith("report: "))
    by_task = {threads[s["tid"]] for s in slices if s["name"] == "fd open"}
    assert by_task == {MAIN, "vmm"}  # the setup's open, then the VMM's reopens


def test_counts_are_counters_and_reports_are_instants():
    doc = chrome_trace(found_race().events)
    counters = {e["name"] for e in doc["traceEvents"] if e["ph"] == "C"}
    assert {"vfio0 object count (kref)", "vfio0 registration count",
            "vfio0 open count"} <= counters
    instants = [e for e in doc["traceEvents"] if e["ph"] == "i"]
    assert [(i["name"].split(":")[0], i["s"]) for i in instants] == [
        ("info", "t"), ("hang", "g")]  # pci's dev_notice on its task; the hang on every track


def test_the_validator_rejects_what_the_format_does_not_allow():
    assert trace_event_format_errors({"traceEvents": [{"ph": "Q"}]})
    assert trace_event_format_errors({"traceEvents": [
        {"ph": "X", "name": "a", "pid": 1, "tid": 0, "ts": 0, "dur": 10},
        {"ph": "X", "name": "b", "pid": 1, "tid": 0, "ts": 5, "dur": 1}]})
    assert trace_event_format_errors({"traceEvents": [
        {"ph": "C", "name": "c", "pid": 1, "ts": 0, "args": {"v": "x"}}]})
    assert trace_event_format_errors([])
