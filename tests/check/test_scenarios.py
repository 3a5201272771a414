"""`vfio-emu run` (vfio_emu.check.scenarios): well-behaved scenarios report nothing under
every mode; buggy ones report what names their bug."""

from __future__ import annotations

import itertools
import json

import pytest

from vfio_emu.check.scenarios import SCENARIOS
from vfio_emu.cli import main
from vfio_emu.linux.kernel import Kernel

GOOD = [s.name for s in SCENARIOS.values() if not s.buggy]
MODES = [("v6.1", False), ("v6.1", True), ("v6.2", False), ("v6.2", True)]

# scenario: {(semantics, delayed_release): the report kinds it must produce}
BUGGY = {
    "assume-sync-release": {("v6.1", False): set(), ("v6.1", True): {"use-after-free", "leak"},
                            ("v6.2", False): set(), ("v6.2", True): {"use-after-free", "leak"}},
    "uaf-after-put": {mode: {"use-after-free"} for mode in MODES},
    "fd-held-forever": {mode: {"hang", "leak"} for mode in MODES},
    "missing-release": {("v6.1", False): {"oops", "leak"}, ("v6.1", True): {"oops", "leak"},
                        ("v6.2", False): set(), ("v6.2", True): set()},
}


def run_json(capsys, *args):
    rc = main(["run", *args, "--json", "--seed", "1"])
    return rc, json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("name", GOOD)
@pytest.mark.parametrize(("semantics", "delayed"), MODES)
def test_well_behaved_scenario_reports_nothing(capsys, name, semantics, delayed):
    args = [name, "--semantics", semantics] + (["--delayed-release"] if delayed else [])
    rc, out = run_json(capsys, *args)
    assert [r for r in out["reports"] if r["kind"] != "info"] == []
    assert rc == 0 and out["stopped_by"] is None
    assert any(e["op"] == "vfio_device_release" for e in out["events"])


@pytest.mark.parametrize("name", sorted(BUGGY))
@pytest.mark.parametrize(("semantics", "delayed"), MODES)
def test_buggy_scenario_reports_what_names_its_bug(capsys, name, semantics, delayed):
    args = [name, "--semantics", semantics] + (["--delayed-release"] if delayed else [])
    rc, out = run_json(capsys, *args)
    kinds = {r["kind"] for r in out["reports"]} - {"info"}
    assert kinds == BUGGY[name][(semantics, delayed)]
    assert rc == (1 if kinds else 0)


def test_every_scenario_is_classified():
    assert set(BUGGY) == {s.name for s in SCENARIOS.values() if s.buggy}


def test_remove_with_open_fd_calls_request_every_ten_seconds(capsys):
    rc, out = run_json(capsys, "remove-with-open-fd")
    assert rc == 0
    requests = [e for e in out["events"] if e["op"] == "ops->request"]
    assert [e["detail"] for e in requests] == ["count 0", "count 1", "count 2"]
    hz = 250
    gaps = [b["jiffies"] - a["jiffies"] for a, b in itertools.pairwise(requests)]
    assert all(gap >= 10 * hz for gap in gaps)  # emulated time: at least 10 s apart


@pytest.mark.parametrize(("order", "reopened"), [("v6.1", True), ("unlink-first", False)])
def test_open_during_unregister_succeeds_only_in_the_v61_order(capsys, order, reopened):
    rc, out = run_json(capsys, "open-during-unregister", "--unregister-order", order)
    opens = [e for e in out["events"] if e["op"] == "fd open"]
    assert len(opens) == (2 if reopened else 1)
    assert rc == 0


def test_fd_held_forever_names_the_open_fd_and_its_opener(capsys):
    rc, out = run_json(capsys, "fd-held-forever")
    assert rc == 1
    [hang] = [r for r in out["reports"] if r["kind"] == "hang"]
    assert "blocked for more than 120 seconds" in hang["title"]
    assert "vfio-device fd of vfio0" in hang["detail"]
    assert any("fd_held_forever" in s["stack"] for s in hang["stacks"])


def test_run_prints_a_timeline_and_the_reports(capsys):
    assert main(["run", "missing-release"]) == 1
    out = capsys.readouterr().out
    assert "vfio_register_group_dev" in out and "BUG: kernel NULL pointer dereference" in out
    assert out.rstrip().endswith("2 report(s): leak, oops")


def test_the_buggy_assume_sync_release_scenario_reports_its_uaf_every_time():
    """The scenario frees state right after the final put; the delayed release then writes
    it.  Whether the release ran first once depended on the machine's load; now the
    workqueue runs only when the kernel waits, so it never can."""
    for run in range(20):
        with Kernel(delayed_release=True, seed=run) as k:
            SCENARIOS["assume-sync-release"].run(k)
            assert [r.kind for r in k.reports] == ["use-after-free"], run
