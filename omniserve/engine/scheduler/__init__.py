"""The SLO-aware scheduler and the plain data it works on. Nothing here imports torch or the models: the engine
runs it against a device, the simulator against a simulated clock.

    scheduler.py      the Scheduler: its state, the stages of one plan in priority order, the time correction
    budget.py         the iteration being planned against its token and time budgets; TTFT prediction
    pages.py          device KV pages: room, making room (preemption), pages wanted
    offload.py        which requests may decode in the CPU pool; swap-outs and swap-ins
    piggyback.py      offloaded rows joining the device batch at their layer
    booking.py        an iteration's results: tokens, stops, finished copies, lost host KV
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
