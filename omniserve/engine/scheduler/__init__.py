"""The SLO-aware scheduler and the plain data it works on. Nothing here imports torch or the models: the engine
runs it against a device, the simulator against a simulated clock.

    scheduler.py      the Scheduler: the stages of one plan in priority order, each asked of the manager below
    state.py          SchedulerState: what the managers share (queues, requests, page table, counters)
    pages.py          PageManager: device KV pages, room to grow, booking a chunk, preemption (recompute)
    admission.py      Admission: waiting requests admitted in arrival order; LS rejected when they would be late
    offload.py        OffloadManager: the BE decode stage (device or CPU pool), swap-outs, swap-ins
    piggyback.py      PiggybackManager: offloaded rows joining the device batch at their layer; the offloaded pipeline
    booking.py        ResultBooker: an iteration's results: tokens, stops, finished swaps, lost host KV
    correction.py     TimeCorrection: measured / predicted iteration time lately, scaling every prediction
    budget.py         the iteration being planned against its token and time budgets; TTFT prediction
    policy.py         the policies (omniserve's and its competitors') and the resolved OffloadMode
    config.py         SchedulerConfig: the settings and their one set of defaults
    plan.py           what crosses to the runner (IterationPlan) and back (RunnerOutput)
    request.py        a request as the scheduler sees it
    latency_model.py  the cost model the time budget is planned with (fitted by omniserve.profiler)
"""

from omniserve.engine.scheduler.config import SchedulerConfig
from omniserve.engine.scheduler.policy import OffloadMode
from omniserve.engine.scheduler.scheduler import Scheduler

__all__ = ["OffloadMode", "Scheduler", "SchedulerConfig"]
