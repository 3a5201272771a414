"""vfio_emu.bench: what `vfio-emu bench` measures and writes, and its regression gate.
No timing is asserted: only that figures exist, have the layout pytest-benchmark reads, and
that the comparison flags a run that is significantly slower."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from vfio_emu import bench
from vfio_emu.cli import main


@pytest.fixture(scope="module")
def figures() -> list[bench.Figure]:
    return bench.primitives(per=20, rounds=3) + bench.release_paths(per=20, rounds=3)


def test_every_figure_is_measured_or_says_why_not(figures):
    for f in figures:
        assert f.samples or f.note, f.key
        assert all(x > 0 for x in f.samples)
    keys = {f.key for f in figures}
    assert {"noop", "noop_last", "kref_pair", "lock_pair", "mp_value_pair", "kref_last_put",
            "cycle_pci", "cycle_ccw", "cycle_pci_10_observers"} <= keys


def test_the_json_has_pytest_benchmarks_layout_with_ratios(figures):
    data = bench.to_json(figures)
    assert {"machine_info", "datetime", "version", "benchmarks"} <= set(data)
    kref = next(b for b in data["benchmarks"] if b["name"] == "kref_pair")
    assert set(kref["stats"]) >= {"min", "max", "mean", "median", "stddev", "rounds", "data"}
    assert kref["extra_info"]["ratio_to_noop"] > 0
    assert json.loads(json.dumps(data)) == data


def test_a_run_compared_with_itself_is_not_slower(figures):
    data = bench.to_json(figures)
    lines, worse = bench.compare(data, data, fail_above=10)
    assert lines and not worse


def test_a_significantly_slower_run_fails_the_gate(figures):
    data = bench.to_json(figures)
    slower = json.loads(json.dumps(data))
    for b in slower["benchmarks"]:
        if b["stats"] and b["name"] == "kref_pair":
            b["stats"]["data"] = [x * 3 for x in b["stats"]["data"]] * 5
            b["stats"]["median"] *= 3
            b["extra_info"]["ratio_to_noop"] *= 3
    saved = json.loads(json.dumps(data))
    for b in saved["benchmarks"]:
        if b["stats"] and b["name"] == "kref_pair":
            b["stats"]["data"] = b["stats"]["data"] * 5
    lines, worse = bench.compare(slower, saved, fail_above=10)
    assert worse and any(line.startswith("kref_pair") and "SLOWER" in line for line in lines)


def test_mann_whitney_separates_two_distinct_samples_and_not_two_equal_ones():
    a, b = [1.0 + i / 100 for i in range(15)], [2.0 + i / 100 for i in range(15)]
    assert bench.mann_whitney_p(a, b) < 0.001
    assert bench.mann_whitney_p(a, list(a)) == pytest.approx(1.0)
    assert math.isclose(bench.mann_whitney_p([], b), 1.0)


def test_measure_and_baseline_are_a_users_api():
    samples = bench.measure(lambda: None, per=10, rounds=3)
    assert len(samples) == 3 and all(x > 0 for x in samples)
    assert len(bench.baseline(per=10, rounds=2)) == 2


def test_the_cli_writes_json_and_a_chart_and_compares(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench, "run", lambda quick=False: bench.primitives(per=10, rounds=2))
    out_json, out_svg = tmp_path / "run.json", tmp_path / "run.svg"
    assert main(["bench", "--quick", "--json", str(out_json), "--svg", str(out_svg)]) == 0
    assert json.loads(out_json.read_text())["benchmarks"]
    assert out_svg.read_text().lstrip().startswith("<?xml")
    assert main(["bench", "--quick", "--compare", str(out_json), "--fail-above", "1000"]) == 0
    assert "against" in capsys.readouterr().out
    assert main(["bench", "--compare", str(tmp_path / "missing.json")]) == 2


def test_targets_are_ratios_of_figures_of_the_same_run():
    def fig(key: str, ns: float) -> bench.Figure:
        return bench.Figure(key, key, "g", "pair", [ns, ns, ns])

    met = bench.targets([fig("kref_pair", 90), fig("atomicx_pair", 100),
                         fig("mp_value_pair", 1000), fig("live_1", 90), fig("live_1000", 99)])
    assert "atomicx pair: 0.90 (target <= 1: met)" in met
    assert "multiprocessing.Value pair: 0.09 (target <= 0.1: met)" in met
    assert "slowest / fastest: 1.10 (target <= 1.3: met)" in met
    missed = bench.targets([fig("kref_pair", 130), fig("atomicx_pair", 100),
                            fig("live_1", 90), fig("live_1000", 200)])
    assert "1.30 (target <= 1: not met)" in missed
    assert "multiprocessing.Value" not in missed  # a peer not measured gives no line
    assert "2.22 (target <= 1.3: not met)" in missed
    assert "cycle" not in met + missed  # no cycle measured, no cycle line


def test_the_cycle_target_is_stated_per_cycle_figure_as_a_ratio_to_the_no_op():
    def fig(key: str, ns: float) -> bench.Figure:
        return bench.Figure(key, key, "g", "cycle", [ns, ns, ns])

    lines = bench.targets([fig("noop", 100), fig("noop_last", 110), fig("cycle_direct", 65_000),
                           fig("cycle_pci", 72_000), fig("cycle_pci_10_observers", 90_000)
                           ]).splitlines()
    assert lines == [
        "probe -> open -> close -> remove -> release -> free, ops called directly / the cffi "
        "no-op: 650 (target <= 700: met)",
        "probe -> open -> close -> remove -> release -> free, through pci / the cffi no-op: "
        "720 (target <= 700: not met)"]
    assert bench.targets([fig("cycle_direct", 65_000)]) == ""  # no no-op, no ratio


def test_the_driver_benchmark_in_docs_bench_md_runs_and_records_its_ratio(pytester):
    doc = (Path(__file__).resolve().parents[2] / "docs" / "bench.md").read_text()
    example = doc.split("```python\n", 1)[1].split("```", 1)[0]
    pytester.makepyfile(test_example=example)
    result = pytester.runpytest("-p", "vfio_emu", "-q", "--benchmark-json=out.json")
    result.assert_outcomes(passed=1)
    bench_json = json.loads((pytester.path / "out.json").read_text())
    assert bench_json["benchmarks"][0]["extra_info"]["ratio_to_noop"] > 0


def test_svg_without_pygal_is_refused_before_anything_is_measured(tmp_path, capsys,
                                                                  monkeypatch):
    ran = []
    monkeypatch.setattr(bench, "run", lambda quick=False: ran.append(quick) or [])
    monkeypatch.setattr("importlib.util.find_spec",
                        lambda name, *a: None if name == "pygal" else object())
    assert main(["bench", "--svg", str(tmp_path / "run.svg")]) == 2
    assert "needs pygal" in capsys.readouterr().err
    assert ran == [] and not (tmp_path / "run.svg").exists()


def test_the_chart_as_png_where_cairo_is_there_and_a_clear_refusal_where_it_is_not(
        tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench, "run", lambda quick=False: bench.primitives(per=10, rounds=2))
    out = tmp_path / "run.png"
    code = main(["bench", "--quick", "--png", str(out)])
    if bench.png_unavailable():
        assert code == 2 and "--png needs pygal and cairosvg" in capsys.readouterr().err
        assert not out.exists()
    else:
        assert code == 0
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_png_without_cairo_is_refused_before_anything_is_measured(tmp_path, capsys,
                                                                  monkeypatch):
    ran = []
    monkeypatch.setattr(bench, "run", lambda quick=False: ran.append(quick) or [])
    monkeypatch.setattr(bench, "png_unavailable", lambda: "OSError: no library called cairo")
    assert main(["bench", "--png", str(tmp_path / "run.png")]) == 2
    assert "no library called cairo" in capsys.readouterr().err
    assert ran == []
