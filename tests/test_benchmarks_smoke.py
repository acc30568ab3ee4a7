"""Every script in benchmarks/ parses `--help` and, at its `--smoke` size, runs to the end in a scratch folder (nothing
written into the checkout). A script without a smoke size fails here unless it is listed below with the reason.

The scripts whose engines plan with a latency model share one set of engine settings at their smoke size, so the
profile they need is measured once (two: with and without the CPU attention pool) into the profile cache, as any
engine start would, and found there afterwards. Most of the time goes into loading the built-in model, which every
script does at least once.

The smoke runs go two at a time (the machine's two cores; CI runs the suite on such a machine), the slowest first so
that both lanes end together, except `bench_serving`, which runs first and alone: its omniserve and sarathi servers
measure the two profiles the others then find cached, and a profile measured beside another script would measure
that script (implausible, measured again, or wrong for every later run). `bench_profile` measures a profile too,
but only reports its accuracy, which a smoke run does not check: it goes two at a time with the rest."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
SCRIPT_PREFIXES = ("bench_", "check_")  # measurements, and checks of the server against a specification
SCRIPTS = sorted(p.name for p in BENCHMARKS.glob("*.py") if p.name.startswith(SCRIPT_PREFIXES))

NEEDS_GPU = {"bench_cuda_decode.py": "compares two checkouts on a CUDA device"}
NEEDS_PACKAGE = {"bench_scaleout.py": ("ray", "scale-out needs Ray (pip install 'omniserve[ray]')"),
                 "check_openapi.py": ("schemathesis", "generates its requests with schemathesis (pip install "
                                      "schemathesis)")}
NO_SMOKE_SIZE: dict[str, str] = {  # script -> why it has no --smoke size
    "bench_drain.py": "starts Ray and two engines for a minute; test_ray_scaleout drains one behind the router",
    "bench_busy_profile.py": "profiles the built-in model beside spinning processes (minutes); test_slo_engine "
                             "serves with a profile far off the device",
    "bench_request_limits.py": "a server beside one stream, each refusal once: no smaller size says more",
    "bench_router_batch.py": "starts Ray and two engines twice, for minutes; test_router_batches runs the Batch API "
                             "tests behind the router",
}
MEASURE_ALONE = ("bench_serving.py",)  # run first, alone (see the docstring)
SLOWEST_FIRST = ("bench_batch.py", "bench_policies.py", "bench_multi_layer.py", "bench_soak.py", "bench_profile.py",
                 "bench_server.py", "bench_scaleout.py", "bench_piggyback.py", "bench_worker_memory.py",
                 "bench_generate.py")
"""The order the others start in (their smoke runs' times on two cores, longest first); a script not named here
starts after these."""
SMOKE_TIMEOUT_S = 300
MEASURE_ALONE_TIMEOUT_S = 600
"""bench_serving measures two profiles, each up to three times on a busy machine."""


def run(script: str, *args: str, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCHMARKS / script), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def test_the_scripts_are_found():
    assert "bench_generate.py" in SCRIPTS
    assert set(MEASURE_ALONE + SLOWEST_FIRST) <= set(SCRIPTS), "a script named above is gone"


def test_helper_modules_are_used_by_a_script():
    """The folder holds scripts, and modules only one of them imports (the shared parts live in omniserve.bench)."""
    scripts = "".join((BENCHMARKS / name).read_text() for name in SCRIPTS)
    for helper in BENCHMARKS.glob("*.py"):
        if not helper.name.startswith(SCRIPT_PREFIXES):
            assert f"from {helper.stem} import" in scripts, f"{helper.name} is used by no script"


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_parses(script, script_runs):
    result = script_runs[script, "--help"]
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
def script_runs(request, tmp_path_factory) -> dict[tuple[str, str], subprocess.CompletedProcess]:
    """(script, flag) -> its run with --help or --smoke, for every selected test, each in a scratch folder of its
    own; checks afterwards that none wrote into the checkout. The --help runs (an import each) go last, two at a
    time beside the slowest smoke runs' ends."""
    selected = [(item.originalname, item.callspec.params["script"]) for item in request.session.items
                if item.module is request.module and hasattr(item, "callspec")]
    smoke = [script for test, script in selected if test == "test_runs_at_its_smoke_size" and
             _skip_reason(script) is None]
    helps = [(script, "--help") for test, script in selected if test == "test_help_parses"]

    def execute(key: tuple[str, str]) -> tuple[tuple[str, str], subprocess.CompletedProcess]:
        script, flag = key
        cwd = tmp_path_factory.mktemp(script.removesuffix(".py"))
        timeout = 120 if flag == "--help" else MEASURE_ALONE_TIMEOUT_S if script in MEASURE_ALONE else SMOKE_TIMEOUT_S
        return key, run(script, flag, cwd=cwd, timeout=timeout)

    def start_order(script: str) -> tuple[int, str]:
        return (SLOWEST_FIRST.index(script) if script in SLOWEST_FIRST else len(SLOWEST_FIRST), script)

    before = checkout_state()
    results = dict(execute((script, "--smoke")) for script in smoke if script in MEASURE_ALONE)
    rest = [(script, "--smoke") for script in sorted(set(smoke) - set(MEASURE_ALONE), key=start_order)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results.update(pool.map(execute, rest + helps))
    assert checkout_state() == before, "a smoke run wrote into benchmarks/ or BENCHMARKS.md"
    return results


@pytest.mark.parametrize("script", SCRIPTS)
def test_runs_at_its_smoke_size(script, script_runs):
    reason = _skip_reason(script)
    if reason is not None:
        pytest.skip(reason)
    result = script_runs[script, "--smoke"]
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip(), "a smoke run printed no figures"


def checkout_state() -> str:
    """What git sees changed or new in benchmarks/ and BENCHMARKS.md (ignored files such as __pycache__ aside)."""
    return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "--", "benchmarks",
                           "BENCHMARKS.md"], cwd=ROOT, capture_output=True, text=True).stdout
