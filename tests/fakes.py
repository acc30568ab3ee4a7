"""The fake executor of the scheduler tests, without a clock: every swap's copy ends with its iteration, CPU
attention results are back by the next iteration, and an offloaded token advances one layer per iteration (the
paper's pipeline, whatever the plan allows)."""

from __future__ import annotations

from omniserve.engine.scheduler import Scheduler
from omniserve.engine.scheduler.plan import IterationPlan, RunnerOutput
from omniserve.simulator.sim import one_layer_outputs


def step(scheduler: Scheduler, token: int = 7) -> IterationPlan:
    """Plans one iteration, 'runs' it and books its outputs; every sampled token is `token`."""
    plan = scheduler.schedule()
    sampled, cpu_rows = one_layer_outputs(plan, scheduler.state.num_layers, token)
    swapped_out = [t.request_id for t in plan.swap_outs]
    swapped_in = [t.request_id for t in plan.swap_ins]
    scheduler.update(plan, RunnerOutput(sampled, swapped_out, swapped_in))
    scheduler.results_ready(cpu_rows)
    return plan
