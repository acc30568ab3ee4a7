"""Every script in benchmarks/ parses `--help` and, at its `--smoke` size, runs to the end in a scratch folder (nothing
written into the checkout). A script without a smoke size fails here unless it is listed below with the reason.

The scripts whose engines plan with a latency model share one set of engine settings at their smoke size, so the
profile they need is measured once (two: with and without the CPU attention pool) into the profile cache, as any
engine start would, and found there afterwards. Most of the time goes into loading the built-in model, which every
script does at least once.

The smoke runs go two at a time (the machine's two cores; CI runs the suite on such a machine), except the scripts
that measure latency profiles, which run first and alone so that what they measure is the machine, not the other
script: `bench_serving` (its omniserve and sarathi servers measure the two profiles the others then find cached)
and `bench_profile` (the profile's accuracy is what it reports)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
SCRIPTS = sorted(p.name for p in BENCHMARKS.glob("bench_*.py"))

NEEDS_GPU = {"bench_cuda_decode.py": "compares two checkouts on a CUDA device"}
NEEDS_PACKAGE = {"bench_scaleout.py": ("ray", "scale-out needs Ray (pip install 'omniserve[ray]')")}
NO_SMOKE_SIZE: dict[str, str] = {}  # script -> why it has no --smoke size
MEASURE_ALONE = ("bench_serving.py", "bench_profile.py")  # run first, one at a time (see the docstring)
SMOKE_TIMEOUT_S = 300


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


def _skip_reason(script: str) -> str | None:
    if script in NEEDS_GPU:
        return f"needs a GPU: {NEEDS_GPU[script]}"
    if script in NO_SMOKE_SIZE:
        return NO_SMOKE_SIZE[script]
    package, reason = NEEDS_PACKAGE.get(script, (None, ""))
    if package is not None and importlib.util.find_spec(package) is None:
        return reason
    return None


@pytest.fixture(scope="module")
def smoke_runs(request, tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """Runs every selected script at its smoke size, each in a scratch folder of its own; checks afterwards that
    none wrote into the checkout."""
    selected = [item.callspec.params["script"] for item in request.session.items
                if item.originalname == "test_runs_at_its_smoke_size" and _skip_reason(item.callspec.params["script"])
                is None]

    def smoke(script: str) -> tuple[str, subprocess.CompletedProcess]:
        cwd = tmp_path_factory.mktemp(script.removesuffix(".py"))
        return script, run(script, "--smoke", cwd=cwd, timeout=SMOKE_TIMEOUT_S)

    before = checkout_state()
    results = dict(smoke(script) for script in selected if script in MEASURE_ALONE)
    with ThreadPoolExecutor(max_workers=2) as pool:
        results.update(pool.map(smoke, [script for script in selected if script not in MEASURE_ALONE]))
    assert checkout_state() == before, "a smoke run wrote into benchmarks/ or BENCHMARKS.md"
    return results


@pytest.mark.parametrize("script", SCRIPTS)
def test_runs_at_its_smoke_size(script, smoke_runs):
    reason = _skip_reason(script)
    if reason is not None:
        pytest.skip(reason)
    result = smoke_runs[script]
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip(), "a smoke run printed no figures"


def checkout_state() -> str:
    """What git sees changed or new in benchmarks/ and BENCHMARKS.md (ignored files such as __pycache__ aside)."""
    return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "--", "benchmarks",
                           "BENCHMARKS.md"], cwd=ROOT, capture_output=True, text=True).stdout
