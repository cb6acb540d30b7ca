"""The README's main-job command, end to end: it must end with a verified checkpoint v1."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def test_main_job_ends_with_verified_v1(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if request.config.getoption("--cluster") != "local":
        pytest.skip("the main job starts its own local control plane")
    # scripts/demo.sh is setup.sh (already done by the test command) followed by exactly this.
    proc = subprocess.run([sys.executable, "-m", "privatefm_testing.demo", "--dir", str(tmp_path / "demo")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = proc.stdout.split("==> kubectl get lns,am -A", 1)[1]
    lns_row = next(line.split() for line in table.splitlines() if "learner-bo" in line)
    assert lns_row[1:5] == ["bo", "Ready", "1", "0"]
    am_row = next(line.split() for line in table.splitlines() if "manual-1" in line)
    assert am_row[2:6] == ["Manual", "Succeeded", "1", "Verified"]
    assert "sha256-verified" in proc.stdout
    assert not list((tmp_path / "demo").glob("cluster.json")), "the demo must stop what it started"
