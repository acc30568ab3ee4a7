"""Scheduling policies: omniserve's, and those of the systems it is compared with, as settings of one scheduler.

Each competitor is reduced to what distinguishes it on a single engine instance, so that a comparison runs the same
model code, KV cache and sampler, and differs only in what the scheduler decides:

| policy    | classes   | iteration time budget + TTFT admission | where decode attention may run        |
|-----------|-----------|----------------------------------------|---------------------------------------|
| omniserve | LS, BE    | yes (LS rejected early if late)        | device; BE offloaded to the CPU pool  |
| sarathi   | LS, BE    | budget only (Sarathi-Serve's chunking) | device only                           |
| llumnix   | LS, BE    | no; BE capped to (1 - headroom) pages  | device only                           |
| neo       | LS, BE    | yes                                    | any request offloaded when pages run short |
| fcfs      | none      | no (plain vLLM)                        | device only                           |

`neo` runs offloaded attention through the same layer-wise piggybacking as omniserve (`offload_pipeline`), unless
that is set to `sync`, NEO's own synchronous CPU-GPU pipeline (the simulator's `neo-sync` baseline does).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


@dataclass(frozen=True)
class Policy:
    name: str
    classes: bool
    """LS requests come before BE requests at every stage (False: one arrival-ordered queue)."""
    time_budget: bool
    """Iterations are sized to the tightest LS TPOT SLO with the latency model."""
    reject_late: bool
    """LS requests whose predicted TTFT misses their SLO are rejected at admission."""
    offload: str
    """Which requests may decode in the CPU pool: `none`, `be` (as `be_decode_placement` says) or `all` (when
    device pages run short)."""
    be_page_cap: bool = False
    """BE requests may hold at most (1 - ls_headroom) of the device pages."""


POLICY_TABLE = {
    "omniserve": Policy("omniserve", classes=True, time_budget=True, reject_late=True, offload="be"),
    "sarathi": Policy("sarathi", classes=True, time_budget=True, reject_late=False, offload="none"),
    "llumnix": Policy("llumnix", classes=True, time_budget=False, reject_late=False, offload="none", be_page_cap=True),
    "neo": Policy("neo", classes=True, time_budget=True, reject_late=True, offload="all"),
    "fcfs": Policy("fcfs", classes=False, time_budget=False, reject_late=False, offload="none"),
}
POLICIES = tuple(POLICY_TABLE)


class BeDecodePlacement(enum.StrEnum):
    """Where BE requests decode under the `omniserve` policy (SchedulerSettings.be_decode_placement). A str, so that
    it compares equal to its plain name (and prints as it)."""

    AUTO = "auto"
    """In the CPU pool when device pages or iteration time run short, back on the device when both are plentiful."""
    CPU = "cpu"
    """In the CPU pool once the prefill is done."""
    DEVICE = "device"
    """Never offloaded: no CPU pool."""


class OffloadPipeline(enum.StrEnum):
    """How far an offloaded token goes in one iteration (SchedulerSettings.offload_pipeline). A str, so that it
    compares equal to its plain name (and prints as it)."""

    MULTI_LAYER = "multi-layer"
    """Through every layer whose CPU result is back in time, the device waiting within the iteration's slack."""
    ONE_LAYER = "one-layer"
    """One layer per iteration, the device never waiting (the OmniServe paper's design)."""
    SYNC = "sync"
    """Every layer, the device waiting for each (NEO's pipeline)."""


class OffloadMode(enum.Enum):
    """Which requests may decode in the CPU pool, and when: the policy's `offload` and `be_decode_placement`,
    resolved once (see offload_mode) for the scheduler, the engine (whether it has a CPU pool), the profiler (whether
    the profile covers the pool, part of its cache key) and the simulator."""

    NONE = "none"
    """Nothing leaves the device; there is no CPU pool (sarathi, llumnix, fcfs; omniserve with placement `device`)."""
    BE_WHEN_SHORT = "be-when-short"
    """BE requests, when device pages or iteration time run short; they come back when both are plentiful
    (omniserve, placement `auto`)."""
    BE_ALWAYS = "be-always"
    """Every BE request, once its prefill is done; none comes back (omniserve, placement `cpu`)."""
    ANY_WHEN_SHORT = "any-when-short"
    """Any request, BE first, when device pages run short; they come back when pages are plentiful (neo, whatever
    the BE placement says)."""

    @property
    def uses_pool(self) -> bool:
        return self is not OffloadMode.NONE

    @property
    def offloads_ls(self) -> bool:
        return self is OffloadMode.ANY_WHEN_SHORT

    @property
    def swaps_in(self) -> bool:
        return self in (OffloadMode.BE_WHEN_SHORT, OffloadMode.ANY_WHEN_SHORT)


def offload_mode(policy: str, be_decode_placement: BeDecodePlacement | str) -> OffloadMode:
    offload = POLICY_TABLE[policy].offload
    if offload == "all":
        return OffloadMode.ANY_WHEN_SHORT
    if offload == "none" or be_decode_placement == BeDecodePlacement.DEVICE:
        return OffloadMode.NONE
    return OffloadMode.BE_ALWAYS if be_decode_placement == BeDecodePlacement.CPU else OffloadMode.BE_WHEN_SHORT
