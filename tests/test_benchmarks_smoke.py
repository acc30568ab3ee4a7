"""Every script in benchmarks/ parses `--help` and, at its `--smoke` size, runs to the end in a scratch folder (nothing
written into the checkout). A script without a smoke size fails here unless it is listed below with the reason."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(p.name for p in BENCHMARKS.glob("bench_*.py"))

NEEDS_GPU = {"bench_cuda_decode.py": "compares two checkouts on a CUDA device"}
NO_SMOKE_SIZE_YET = {  # each starts servers, profiles the machine or runs for minutes even at its smallest
    name: "no --smoke size yet" for name in (
        "bench_batch.py", "bench_multi_layer.py", "bench_piggyback.py", "bench_policies.py", "bench_profile.py",
        "bench_scaleout.py", "bench_server.py", "bench_serving.py", "bench_simulator.py", "bench_soak.py",
        "bench_worker_memory.py")
}


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
    if script not in NEEDS_GPU and script not in NO_SMOKE_SIZE_YET:
        assert "--smoke" in result.stdout, f"{script} has no --smoke size"


@pytest.mark.parametrize("script", SCRIPTS)
def test_runs_at_its_smoke_size(script, tmp_path):
    if script in NEEDS_GPU:
        pytest.skip(f"needs a GPU: {NEEDS_GPU[script]}")
    if script in NO_SMOKE_SIZE_YET:
        pytest.skip(NO_SMOKE_SIZE_YET[script])
    result = run(script, "--smoke", cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip(), "a smoke run printed no figures"
