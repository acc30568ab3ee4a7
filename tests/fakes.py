"""Torch-free stand-ins shared by the tests: the fake executor of the scheduler tests, without a clock (every swap's
copy ends with its iteration, CPU attention results are back by the next iteration, and an offloaded token advances
one layer per iteration: the paper's pipeline, whatever the plan allows), a latency model of chosen numbers, and the
piggybacking tests' workload."""

from __future__ import annotations

from omniserve.engine.scheduler import Scheduler
from omniserve.engine.scheduler.latency_model import LatencyModel, LinearModel, PiecewiseLinear
from omniserve.engine.scheduler.plan import IterationPlan, RunnerOutput
from omniserve.sampling.params import SamplingParams
from omniserve.simulator.sim import one_layer_outputs

LAYERS = 4
MS = 1e-3
# One layer's dense work: 1 ms + 0.1 ms per row; the head: 1 ms + 0.1 ms per sampled row; attention is cheap.
MODEL = LatencyModel(
    num_layers=LAYERS,
    dense=PiecewiseLinear((0.0, 1000.0), (1 * MS, 101 * MS)),
    prefill_attention=LinearModel(0.0, (1e-7, 0.0)),
    decode_attention=LinearModel(0.0, (1e-6, 0.0)),
    head=LinearModel(1 * MS, (0.1 * MS,)),
    cpu_attention=LinearModel(0.0, (1e-6, 0.0)),
)
"""The SLO scheduler tests' latency model of chosen numbers, which the engine and server tests also schedule with."""

PROMPTS = [[7, 8, 9], list(range(100, 141)), [500 + i for i in range(17)], [3] * 29, [42, 43]]
"""The piggybacking tests' prompts (token ids), whose device-only tokens the `reference` fixture gives."""


def greedy(service_class: str = "ls", max_tokens: int = 16) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, service_class=service_class)


def tokens(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def step(scheduler: Scheduler, token: int = 7) -> IterationPlan:
    """Plans one iteration, 'runs' it and books its outputs; every sampled token is `token`."""
    plan = scheduler.schedule()
    sampled, cpu_rows = one_layer_outputs(plan, scheduler.state.num_layers, token)
    swapped_out = [t.request_id for t in plan.swap_outs]
    swapped_in = [t.request_id for t in plan.swap_ins]
    scheduler.update(plan, RunnerOutput(sampled, swapped_out, swapped_in))
    scheduler.results_ready(cpu_rows)
    return plan
