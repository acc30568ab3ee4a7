"""The scheduler, the simulator and `omniserve simulate` need no torch: each test runs a fresh interpreter in which
importing torch fails as it does where torch is not installed, and asks it to import, simulate or run tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from omniserve.bench.workload import SHAREGPT

ROOT = Path(__file__).resolve().parents[1]

NO_TORCH = '''
import importlib.abc
import sys


class NoTorch(importlib.abc.MetaPathFinder):
    """Every import of torch (or of a part of it) fails, as where torch is not installed."""

    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, NoTorch())
'''


def run_without_torch(code: str, env: dict[str, str] | None = None, ok: bool = True) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh interpreter that cannot import torch; with `ok`, fails the test unless it exits 0."""
    done = subprocess.run([sys.executable, "-c", NO_TORCH + code], cwd=ROOT, env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=300)
    if ok:
        assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def test_the_scheduler_the_simulator_and_the_cli_import_without_torch():
    run_without_torch('''
import omniserve.engine.args
import omniserve.engine.scheduler
import omniserve.simulator.baselines, omniserve.simulator.cli, omniserve.simulator.experiment
import omniserve.simulator.regime, omniserve.simulator.sim, omniserve.simulator.workload
from omniserve.entrypoints.cli import build_parser

build_parser()  # every command's flags, the simulator's included
assert "torch" not in sys.modules
''')


@pytest.fixture
def cached_sharegpt_lengths(tmp_path, monkeypatch) -> Path:
    """A cache folder holding the ShareGPT prompts' lengths (made-up ones: counting the real ones needs torch)."""
    if not SHAREGPT.is_file():
        pytest.skip(f"no ShareGPT prompts at {SHAREGPT}")
    from omniserve.simulator.workload import sharegpt_lengths_cache_path

    monkeypatch.setenv("OMNISERVE_CACHE_DIR", str(tmp_path))
    path = sharegpt_lengths_cache_path()
    path.write_text(json.dumps([120, 340, 56, 800]))
    return tmp_path


SIMULATE = ["simulate", "run", "--duration", "10", "--drain", "10", "--policies", "omniserve", "--no-progress"]
"""A short simulation with the default profile and workload (LS lengths from ShareGPT): seconds of wall time."""


def test_simulate_runs_without_torch(cached_sharegpt_lengths):
    done = run_without_torch(f'''
from omniserve.entrypoints.cli import main

main({SIMULATE!r})
assert "torch" not in sys.modules
''', env={"OMNISERVE_CACHE_DIR": str(cached_sharegpt_lengths)})
    summary = json.loads(done.stdout.splitlines()[-1])
    assert summary["policy"] == "omniserve" and summary["summary"]["ls"]["requests"] > 0


def test_uncounted_sharegpt_lengths_without_torch_are_a_clear_error(tmp_path):
    if not SHAREGPT.is_file():
        pytest.skip(f"no ShareGPT prompts at {SHAREGPT}")
    done = run_without_torch(f"from omniserve.entrypoints.cli import main; main({SIMULATE!r})",
                             env={"OMNISERVE_CACHE_DIR": str(tmp_path)}, ok=False)
    assert done.returncode != 0
    assert "ShareGPT prompt lengths are not cached" in done.stderr and "needs torch" in done.stderr


def test_the_scheduler_tests_run_without_torch():
    """conftest.py imports torch only in the fixtures that build models, so the scheduler's tests run without it."""
    run_without_torch('''
import pytest

sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "tests/test_scheduler.py"]))
''')
