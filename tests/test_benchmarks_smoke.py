"""Every script in benchmarks/ parses `--help` and, at its `--smoke` size, runs to the end in a scratch folder (nothing
written into the checkout). A script without a smoke size fails here unless it is listed below with the reason.

The scripts whose engines plan with a latency model share one set of engine settings at their smoke size, so the
profile they need is measured once (two: with and without the CPU attention pool) into the profile cache, as any
engine start would, and found there afterwards. Most of the time goes into loading the built-in model, which every
script does at least once."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
SCRIPTS = sorted(p.name for p in BENCHMARKS.glob("bench_*.py"))

NEEDS_GPU = {"bench_cuda_decode.py": "compares two checkouts on a CUDA device"}
NEEDS_PACKAGE = {"bench_scaleout.py": ("ray", "scale-out needs Ray (pip install 'omniserve[ray]')")}
NO_SMOKE_SIZE: dict[str, str] = {}  # script -> why it has no --smoke size


def run(script: str, *args: str, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCHMARKS / script), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def test_the_scripts_are_found():
    assert "bench_generate.py" in SCRIPTS


def test_helper_modules_are_used_by_a_script():
    """The folder holds scripts, and modules only one of them imports (the shared parts live in omniserve.bench)."""
    scripts = "".join((BENCHMARKS / name).read_text() for name in SCRIPTS)
    for helper in BENCHMARKS.glob("*.py"):
        if not helper.name.startswith("bench_"):
            assert f"from {helper.stem} import" in scripts, f"{helper.name} is used by no script"


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_parses(script, tmp_path):
    result = run(script, "--help", cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    if script not in NEEDS_GPU and script not in NO_SMOKE_SIZE:
        assert "--smoke" in result.stdout, f"{script} has no --smoke size"


@pytest.mark.parametrize("script", SCRIPTS)
def test_runs_at_its_smoke_size(script, tmp_path):
    if script in NEEDS_GPU:
        pytest.skip(f"needs a GPU: {NEEDS_GPU[script]}")
    if script in NO_SMOKE_SIZE:
        pytest.skip(NO_SMOKE_SIZE[script])
    package, reason = NEEDS_PACKAGE.get(script, (None, ""))
    if package is not None and importlib.util.find_spec(package) is None:
        pytest.skip(reason)
    before = checkout_state()
    result = run(script, "--smoke", cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip(), "a smoke run printed no figures"
    assert checkout_state() == before, "a smoke run wrote into benchmarks/ or BENCHMARKS.md"


def checkout_state() -> str:
    """What git sees changed or new in benchmarks/ and BENCHMARKS.md (ignored files such as __pycache__ aside)."""
    return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "--", "benchmarks",
                           "BENCHMARKS.md"], cwd=ROOT, capture_output=True, text=True).stdout
