"""The scheduler and the simulator are plain Python (numpy for the latency model): they import, and a simulation
runs, in an interpreter where torch, httpx and the models cannot be imported."""

from __future__ import annotations

import subprocess
import sys

_BLOCKED_RUN = """
import importlib.abc, sys

BLOCKED = ("torch", "httpx", "omniserve.models.llama", "omniserve.models.loader", "omniserve.cpu_attention.pool")

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ImportError(f"{name} is blocked in this test")
        return None

sys.meta_path.insert(0, Block())

import omniserve.engine.scheduler
import omniserve.simulator.cli
from omniserve.simulator.profiles import analytic_profile
from omniserve.simulator.sim import SimConfig, SimRequest, Simulation

profile = analytic_profile("llama-3-8b", "h100-80gb")
workload = [SimRequest(0.0, "ls", 200, 8), SimRequest(0.1, "be", 3000, 16)]
result = Simulation(profile, SimConfig(ls_ttft_slo=2.0, ls_tpot_slo=0.2)).run(workload)
assert [r.status for r in result.records] == ["ok", "ok"], result.records
print("ok")
"""


def test_scheduler_and_simulator_work_without_torch():
    done = subprocess.run([sys.executable, "-c", _BLOCKED_RUN], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
