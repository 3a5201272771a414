"""The C core under ThreadSanitizer: a WARN storm (writers, stack attachers and readers on
one ring at once) shows no data race.  (AddressSanitizer and UBSan run the whole suite:
`make sanitize`, and CI.)"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
SOURCES = ["arena.c", "refcount.c", "completion.c", "warn.c"]


def test_a_warn_storm_has_no_data_race_under_tsan(tmp_path):
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    assert cc, "building vfio-emu needs a C compiler; so does this test"
    exe = tmp_path / "warn_storm"
    # Not under the AddressSanitizer runtime `make sanitize` preloads: TSan has its own.
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "ASAN_OPTIONS")}
    subprocess.run([cc, "-std=gnu11", "-O1", "-g", "-fsanitize=thread", "-Wno-tsan",
                    f"-I{CSRC}", str(Path(__file__).with_name("warn_storm.c")),
                    *(str(CSRC / s) for s in SOURCES), "-o", str(exe), "-lrt", "-lpthread"],
                   check=True, capture_output=True, text=True, env=env)
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300,
                         env={**env, "TSAN_OPTIONS": "halt_on_error=1"})
    assert run.returncode == 0, run.stderr[-4000:]
    assert run.stdout.strip() == "storm done"
    assert "ThreadSanitizer" not in run.stderr
