"""benchmarks/device_check.sh: every step runs and reports even when the ones before it fail."""

import os
import pathlib
import subprocess

SCRIPT = pathlib.Path(__file__).parent.parent / "benchmarks" / "device_check.sh"
STEPS = ("env", "tests", "load", "bench", "ops")


def test_failing_steps_do_not_stop_the_others(tmp_path):
    # PY=false: every Python step fails at once, so only the harness is exercised.
    env = dict(os.environ, PY="false", OUT=str(tmp_path), NO_NVIDIA_SMI="1")
    run = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True)
    assert run.returncode == 1, run.stderr
    summary = (tmp_path / "summary.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in summary] == list(STEPS)
    assert all("rc=1" in line for line in summary)
    assert all((tmp_path / f"{name}.txt").exists() for name in STEPS)
    assert run.stdout.splitlines() == summary


def test_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
