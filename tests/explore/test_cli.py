"""`vfio-emu explore` and `check --explore`: what a driver author types, and what they get."""

from __future__ import annotations

import json

import pytest

from vfio_emu.cli import main
from vfio_emu.explore import model_id


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_explore_prints_each_race_with_its_throughput_and_findings(capsys):
    code, out, err = run(capsys, "explore", "pci", "--budget", "5")
    assert code == 0  # the v6.1 reopen wait is the core's known finding, not pci's
    lines = out.splitlines()
    assert any(line.startswith("pci: close vs remove [v6.1; random]: 5 schedule(s) in")
               and "/s)" in line and "distinct timeline(s); 0 failure(s)" in line
               for line in lines)
    assert "pci: reopen on request [v6.1; random]: 5 schedule(s)" in out
    assert "0 failure(s), 1 known" in out
    assert "pci: unload vs close: n/a (its devices are not mdevs" in out
    assert "schedules" in err  # progress on stderr


def test_a_known_finding_shows_its_schedule_and_replay_command_with_v(capsys):
    code, out, _ = run(capsys, "explore", "pci", "--scenario", "reopen on request",
                       "--budget", "2", "-v")
    assert code == 0
    assert f"schedule: {model_id()}:0: (0 preemption(s)" in out
    assert ("replay: vfio-emu explore pci --scenario 'reopen on request' --semantics v6.1 "
            f"--replay {model_id()}:0:") in out
    assert "timeline:" in out and "vmm" in out


def test_replay_runs_the_schedule_again_and_writes_its_trace(capsys, tmp_path):
    trace = tmp_path / "t.json"
    code, out, _ = run(capsys, "explore", "pci", "--scenario", "reopen on request",
                       "--replay", f"{model_id()}:0:", "--trace", str(trace))
    assert code == 0  # known
    assert out.startswith("reopen on request: known")
    assert "INFO: task python:" in out
    assert json.loads(trace.read_text())["traceEvents"]


def test_a_schedule_from_another_model_is_refused_with_exit_2(capsys):
    code, _, err = run(capsys, "explore", "pci", "--scenario", "reopen on request",
                       "--replay", "0.0.1+deadbeef:0:1=1")
    assert code == 2
    assert "was made by vfio-emu 0.0.1+deadbeef" in err


def test_usage_errors_name_what_was_wrong(capsys):
    assert run(capsys, "explore", "nope")[0] == 2
    code, _, err = run(capsys, "explore", "pci", "--scenario", "nope")
    assert code == 2 and "no concurrent scenario 'nope'" in err
    code, _, err = run(capsys, "explore", "pci", "--replay", f"{model_id()}:0:")
    assert code == 2 and "--replay needs --scenario" in err
    code, _, err = run(capsys, "explore", "pci", "--jobs", "0")
    assert code == 2 and "jobs=0" in err


def test_json_output_is_one_document_with_every_race(capsys):
    code, out, _ = run(capsys, "explore", "mtty", "--budget", "3", "--json", "--jobs", "2")
    doc = json.loads(out)
    assert code == 0
    assert [r["race"] for r in doc["races"]] == ["close vs remove", "open vs remove",
                                                "reopen on request", "failed bind, then bind",
                                                "unload vs close"]
    reopen = doc["races"][2]
    assert reopen["runs"] == 3 and reopen["known"][0]["status"] == "known"
    assert reopen["known"][0]["schedule"].startswith(model_id())


def test_check_explore_adds_one_verdict_per_race_to_the_table(capsys):
    code, out, _ = run(capsys, "check", "pci", "--scenario", "life cycle", "--explore", "3")
    assert code == 0
    assert "explore: close vs remove" in out and "3 schedules" in out
    assert "explore: reopen on request" in out
    assert "explore: unload vs close" in out and "n/a" in out


def test_the_replay_check_explore_prints_for_a_failure_runs(capsys):
    import shlex

    from vfio_emu.check.verdict import Mode, Verdict
    from vfio_emu.explore import Schedule
    v = Verdict("pci", "explore: reopen on request", Mode("v6.1"), schedule=str(Schedule(0)))
    argv = shlex.split(v.replay())[1:]
    code, out, _ = run(capsys, *argv)
    assert code == 0 and out.startswith("reopen on request: known")
