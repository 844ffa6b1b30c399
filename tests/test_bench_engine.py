"""Smoke test of benchmarks/bench_engine.py: it runs at --quick sizes and prints its table.

No timing is asserted: the benchmark's numbers are for people, not for the test suite.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_engine.py"


def run(*args: str) -> subprocess.CompletedProcess:
    """Run the benchmark script with `args`, capturing its output."""
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120
    )


def test_quick_run_prints_the_table():
    """Engine and numpy on A, C and a big-chain Gradient: exit 0, the table, the check."""
    done = run("--quick", "--repeats", "1", "--only", "A,C,BG", "--sides", "engine,numpy")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| workload" in done.stdout and "engine/numpy" in done.stdout
    for label in ("A: ||Wx||^2 n=256", "C: chain 100 ops", "BG: 5,000-node chain Gradient"):
        assert label in done.stdout
    assert "agree with hand-written numpy" in done.stdout


@pytest.mark.parametrize("side", ["torch", "jax"])
def test_torch_and_jax_workers(side, tmp_path):
    """The PyTorch and JAX sides of workload A run (or report that they are skipped)."""
    done = run("--worker", "A", side, "--quick", "--repeats", "1", "--out", str(tmp_path))
    if done.returncode == 3:
        assert done.stdout.startswith("SKIP")
        pytest.skip(done.stdout.strip())
    assert done.returncode == 0, done.stdout + done.stderr
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    report = json.loads(line.removeprefix("RESULT "))
    assert report["peak_rss"] >= report["baseline_rss"] > 0
    saved = np.load(tmp_path / f"A-{side}.npz")
    assert sorted(saved.files) == ["d_W", "d_x", "value"]
