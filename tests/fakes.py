"""The fake executor of the scheduler tests, without a clock: every swap's copy ends with its iteration, CPU
attention results are back by the next iteration, and an offloaded token advances one layer per iteration (the
paper's pipeline, whatever the plan allows)."""

from __future__ import annotations

from omniserve.engine.scheduler import Scheduler
from omniserve.engine.scheduler.plan import IterationPlan, RunnerOutput
from omniserve.sampling.params import SampledToken


def iteration_outputs(plan: IterationPlan, num_layers: int, token: int) -> tuple[dict[str, SampledToken],
                                                                                  list[tuple[str, int]]]:
    """What executing a plan produces: a token for every chunk that samples and for every returning row that has
    passed the last layer; and the rows whose CPU attention the iteration sends to the pool, (request id, layer):
    offloaded tokens starting at layer 0, returning rows at their next layer."""
    sampled = {chunk.request_id: SampledToken(token) for chunk in plan.chunks if chunk.sample}
    cpu_rows = [(start.request_id, 0) for start in plan.offloaded_starts]
    for request_id, layer in plan.returning:
        if layer + 1 < num_layers:
            cpu_rows.append((request_id, layer + 1))
        else:
            sampled[request_id] = SampledToken(token)
    return sampled, cpu_rows


def step(scheduler: Scheduler, token: int = 7) -> IterationPlan:
    """Plans one iteration, 'runs' it and books its outputs; every sampled token is `token`."""
    plan = scheduler.schedule()
    sampled, cpu_rows = iteration_outputs(plan, scheduler.num_layers, token)
    swapped_out = [t.request_id for t in plan.swap_outs]
    swapped_in = [t.request_id for t in plan.swap_ins]
    scheduler.update(plan, RunnerOutput(sampled, swapped_out, swapped_in))
    scheduler.results_ready(cpu_rows)
    return plan
