"""vfio_emu.pytest_plugin: kernel findings fail tests (a leak alone: LEAKED), expected
findings are strict, and `--vfio-check` runs the battery as test items - under plain pytest
and under pytest-xdist."""

from __future__ import annotations

import pytest

CLEAN = """
    from vfio_emu.check.scenarios import PciOps, probe, remove

    def test_probe_and_remove(vfio_kernel):
        vdev = probe(vfio_kernel, PciOps(vfio_kernel))
        remove(vdev)
"""

WARNS = """
    from vfio_emu.check.scenarios import PciOps, probe, remove
    from vfio_emu.linux.vfio import vfio_put_device

    def test_put_once_too_often(vfio_kernel):
        vdev = probe(vfio_kernel, PciOps(vfio_kernel))
        remove(vdev)
        try:
            vfio_put_device(vdev)  # BUG: one put too many (a use-after-free)
        except Exception:
            pass  # the test swallows it: the kernel's report still fails it
"""

LEAKS = """
    from vfio_emu.linux.slab import Tracked, kzalloc

    class Buf(Tracked):
        pass

    def test_forgets_a_buffer(vfio_kernel):
        kzalloc(vfio_kernel, Buf)  # BUG: never freed
"""

EXPECTS = """
    import pytest
    from vfio_emu.linux.slab import Tracked, kzalloc

    class Buf(Tracked):
        pass

    @pytest.mark.vfio_expect("leak", match="Buf")
    def test_the_leak_is_the_point(vfio_kernel):
        kzalloc(vfio_kernel, Buf)

    @pytest.mark.vfio_expect("leak", match="Buf")
    def test_an_expected_leak_that_does_not_happen(vfio_kernel):
        pass
"""

HANGS = """
    from vfio_emu.check.scenarios import PCI_NAME, PciOps, probe, remove
    from vfio_emu.linux.vfio import vfio_group_get_device_fd

    def test_remove_with_an_fd_nobody_closes(vfio_kernel):
        vdev = probe(vfio_kernel, PciOps(vfio_kernel))
        vfio_group_get_device_fd(vfio_kernel, PCI_NAME)  # held forever
        remove(vdev)
"""

DRIVER = """
    import pytest
    from vfio_emu.linux.mdev import mdev_device_create, mdev_device_remove

    @pytest.mark.vfio_driver("mtty")
    @pytest.mark.vfio_semantics("v6.2")
    def test_an_mtty_instance(vfio_kernel, vfio_driver):
        assert vfio_kernel.semantics == "v6.2"
        statics = vfio_kernel.module_data["mtty"]
        mdev = mdev_device_create(statics.types[0], "uuid-1")
        assert mdev_device_remove(mdev) == 0
"""


@pytest.fixture
def isolated(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    monkeypatch.setenv("VFIO_EMU_PLUGINS", "ap,ccw,mtty,pci")  # nothing else installed
    return pytester


def test_a_clean_test_passes(isolated):
    isolated.makepyfile(CLEAN)
    isolated.runpytest_subprocess().assert_outcomes(passed=1)


def test_a_finding_the_test_swallowed_still_fails_it_with_the_report(isolated):
    isolated.makepyfile(WARNS)
    result = isolated.runpytest_subprocess()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*vfio-emu: the emulated kernel reported:*",
                                 "*vfio-emu findings*",
                                 "*test_put_once_too_often*use-after-free*"])


def test_a_leak_alone_is_leaked_and_fails_the_session(isolated):
    isolated.makepyfile(LEAKS)
    result = isolated.runpytest_subprocess("-v")
    result.stdout.fnmatch_lines(["*test_forgets_a_buffer LEAKED*", "*1 leaked*"])
    assert result.ret == pytest.ExitCode.TESTS_FAILED


def test_expected_findings_are_strict(isolated):
    isolated.makepyfile(EXPECTS)
    result = isolated.runpytest_subprocess()
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*vfio_expect: the kernel did not report leak matching 'Buf'*"])


def test_a_hanging_test_fails_with_the_hang_report_and_its_holders(isolated):
    isolated.makepyfile(HANGS)
    result = isolated.runpytest_subprocess()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*HangError*", "*blocked for more than 120 seconds*",
                                 "*opened by pid*"])


def test_the_driver_fixture_loads_the_marked_driver_in_the_marked_mode(isolated):
    isolated.makepyfile(DRIVER)
    isolated.runpytest_subprocess().assert_outcomes(passed=1)


def test_vfio_modes_all_runs_a_kernel_test_in_the_four_modes(isolated):
    isolated.makepyfile(CLEAN)
    result = isolated.runpytest_subprocess("--vfio-modes", "all", "-v")
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(["*test_probe_and_remove?v6.2-delayed? PASSED*"])


def test_the_battery_runs_as_test_items_with_readable_ids(isolated):
    result = isolated.runpytest_subprocess("--vfio-check", "mtty", "-v", "-k",
                                           "life or request or mdev_register_parent")
    result.stdout.fnmatch_lines(["*vfio-check::mtty?v6.1?::life cycle PASSED*",
                                 "*vfio-check::mtty?v6.1?::FD given back on request PASSED*",
                                 "*mdev_register_parent fails SKIPPED*"])
    assert result.ret == pytest.ExitCode.OK


def test_the_battery_and_a_leak_under_xdist(isolated):
    isolated.makepyfile(LEAKS)
    result = isolated.runpytest_subprocess("-n", "2", "--vfio-check", "pci", "-k",
                                           "life or forgets")
    outcomes = result.parseoutcomes()
    assert (outcomes.get("passed"), outcomes.get("leaked"), outcomes.get("failed")) == (1, 1, None)
    assert result.ret == pytest.ExitCode.TESTS_FAILED


def test_the_plugin_can_be_turned_off(isolated):
    isolated.makepyfile(CLEAN)
    result = isolated.runpytest_subprocess("-p", "no:vfio_emu")
    result.stdout.fnmatch_lines(["*fixture 'vfio_kernel' not found*"])


def test_every_outcome_reaches_the_controller_under_xdist(isolated):
    isolated.makepyfile(test_clean=CLEAN, test_warns=WARNS, test_leaks=LEAKS,
                        test_expects=EXPECTS, test_hangs=HANGS)
    result = isolated.runpytest_subprocess("-n", "2")
    outcomes = result.parseoutcomes()
    # clean + the expected leak pass; the swallowed UAF, the unmet expectation and the hang
    # fail; the leak alone is LEAKED.
    assert (outcomes.get("passed"), outcomes.get("failed"), outcomes.get("leaked")) == (2, 3, 1)
    result.stdout.fnmatch_lines(["*vfio-emu findings*"])


STUCK = """
    import threading
    from vfio_emu.check.scenarios import PCI_NAME, PciOps, probe, remove
    from vfio_emu.linux.vfio import vfio_group_get_device_fd

    def test_stuck_outside_the_emulated_kernel(vfio_kernel):
        vdev = probe(vfio_kernel, PciOps(vfio_kernel))
        fd = vfio_group_get_device_fd(vfio_kernel, PCI_NAME)
        threading.Event().wait(60)  # BUG: waits on what the kernel cannot see
        fd.close()
        remove(vdev)
"""


def test_a_pytest_timeout_shows_who_holds_which_device(isolated):
    isolated.makepyfile(STUCK)
    result = isolated.runpytest_subprocess("--timeout", "2", "--timeout-method", "signal")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*vfio-emu: who holds what at the timeout*",
                                 "vfio0 (registered): object count 1, registration count 2, open 1",
                                 "*opened by pid*"])


INDIRECT = """
    import pytest

    @pytest.mark.parametrize("vfio_driver", ["mtty", "ap"], indirect=True)
    def test_each_driver_loads(vfio_kernel, vfio_driver):
        assert vfio_driver.name in ("mtty", "ap")
"""


def test_the_driver_fixture_takes_an_indirect_parameter(isolated):
    isolated.makepyfile(INDIRECT)
    isolated.runpytest_subprocess().assert_outcomes(passed=2)


def test_vfio_noop_ns_turns_a_pytest_benchmark_figure_into_a_ratio(pytester):
    pytester.makepyfile("""
        def test_ratio(benchmark, vfio_noop_ns):
            benchmark(lambda: None)
            assert vfio_noop_ns > 0
            if benchmark.stats is not None:
                ratio = benchmark.stats.stats.median * 1e9 / vfio_noop_ns
                benchmark.extra_info["ratio_to_noop"] = ratio
                assert ratio > 0
    """)
    pytester.runpytest("-p", "vfio_emu", "-q").assert_outcomes(passed=1)
