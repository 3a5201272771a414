"""The tools that drive the emulated kernel: the check battery, named scenarios, lkdtm.

They use drivers only through their plugin hooks and the emulated kernel's
public API, and turn what the kernel reports into verdicts.
"""

from vfio_emu.check.battery import (
    BATTERY,
    Scenario,
    check_driver,
    run_scenario,
    scenario_names,
)
from vfio_emu.check.verdict import ALL_MODES, FAIL, KNOWN, NOT_APPLICABLE, OK, Mode, Verdict
from vfio_emu.plugins.manager import KnownFinding

__all__ = ["ALL_MODES", "BATTERY", "FAIL", "KNOWN", "NOT_APPLICABLE", "OK", "KnownFinding",
           "Mode", "Scenario", "Verdict", "check_driver", "run_scenario", "scenario_names"]
