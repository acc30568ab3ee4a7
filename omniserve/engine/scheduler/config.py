"""The scheduler's settings: one frozen dataclass, validated when built, and the one place their defaults are
written (EngineArgs and the simulator's SimConfig read them as class attributes, e.g. SchedulerConfig.max_num_seqs)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from omniserve.config import ConfigError
from omniserve.engine.scheduler.policy import (
    BE_DECODE_PLACEMENTS, OFFLOAD_PIPELINES, POLICIES, OffloadMode, offload_mode,
)


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits of one engine iteration."""

    max_num_batched_tokens: int = 2048
    """Token budget of one iteration; longer prefills are chunked."""
    max_num_seqs: int = 256
    """Most requests running at once."""
    max_model_len: int = 32768
    """Longest prompt + output a request may reach."""
    be_decode_placement: str = "auto"
    """Where BE requests decode under the `omniserve` policy (see offload_mode): `cpu` offloads each to the CPU pool
    once its prefill is done, `device` never offloads, `auto` offloads when device pages or iteration time run short
    and brings them back when both are plentiful."""
    policy: str = "omniserve"
    """The scheduling policy (see omniserve.engine.scheduler.policy): omniserve, or a competitor's for comparison."""
    ls_headroom: float = 0.2
    """`llumnix` policy: the share of device KV pages that BE requests may never hold."""
    iteration_budget_share: float = 0.85
    """The share of the TPOT SLO an iteration is planned to fill; the rest absorbs the latency model's error."""
    offload_pipeline: str = "multi-layer"
    """How far an offloaded token goes in one iteration (OffloadedPipeline): `multi-layer`, through every layer whose
    CPU result is back in time, the device waiting for results within the iteration's slack; `one-layer`, one layer
    per iteration and never waiting (the OmniServe paper's design); `sync`, every layer, the device waiting for each
    (NEO's pipeline), with admission keeping the CPU's time within the budget."""

    def __post_init__(self) -> None:
        for name in ("max_num_batched_tokens", "max_num_seqs", "max_model_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.policy not in POLICIES:
            raise ConfigError(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if not 0.0 < self.iteration_budget_share <= 1.0:
            raise ConfigError(f"iteration_budget_share must be in (0, 1], got {self.iteration_budget_share}")
        if not 0.0 <= self.ls_headroom < 1.0:
            raise ConfigError(f"ls_headroom must be in [0, 1), got {self.ls_headroom}")
        if self.offload_pipeline not in OFFLOAD_PIPELINES:
            raise ConfigError(f"offload_pipeline must be one of {', '.join(OFFLOAD_PIPELINES)}, "
                              f"got {self.offload_pipeline!r}")
        if self.be_decode_placement not in BE_DECODE_PLACEMENTS:
            raise ConfigError(f"be_decode_placement must be one of {', '.join(BE_DECODE_PLACEMENTS)}, "
                              f"got {self.be_decode_placement!r}")

    @cached_property  # read for every offload candidate of every plan; the config is frozen
    def offload_mode(self) -> OffloadMode:
        return offload_mode(self.policy, self.be_decode_placement)

