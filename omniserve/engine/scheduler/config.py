"""The scheduler's settings, declared once: SchedulerSettings' fields, each with its default, type, help and choices.

Everything else is made from that declaration: EngineArgs (the engine's keywords, and the flags of `omniserve serve`,
`generate`, ...) and the simulator's SimConfig (and the flags of `omniserve simulate run`) inherit its fields, their
flags come from `add_flags`, and SchedulerConfig (the validated settings the scheduler reads) is built from either by
field name (`SchedulerConfig.of`)."""

from __future__ import annotations

import argparse
import enum
from dataclasses import Field, dataclass, field, fields
from functools import cached_property
from typing import Iterable

from omniserve.config import ConfigError
from omniserve.engine.scheduler.policy import POLICIES, BeDecodePlacement, OffloadMode, OffloadPipeline, offload_mode


def setting(default, help: str, choices: type[enum.Enum] | tuple[str, ...] | None = None):
    """A declared setting: `help` documents it and is its flag's help (argparse's format: `%%` for a percent sign);
    `choices` are its allowed values, or the enum whose values they are."""
    if isinstance(choices, type) and issubclass(choices, enum.Enum):
        choices = tuple(member.value for member in choices)
    return field(default=default, metadata={"help": help, "choices": choices})


_FLAG_TYPES = {"int": int, "int | None": int, "float": float, "float | None": float}


def add_flags(parser: argparse.ArgumentParser, settings: Iterable[Field]) -> None:
    """One flag per declared setting, on a parser or an argument group (`max_num_seqs`: `--max-num-seqs`), with its
    default, type, help and choices. The type is read from the annotation's text (every module declaring settings
    defers its annotations)."""
    for f in settings:
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":  # --flag / --no-flag
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=f.metadata["help"])
            continue
        parser.add_argument(flag, type=_FLAG_TYPES.get(f.type, str), default=f.default,
                            help=f.metadata["help"], choices=f.metadata["choices"])


@dataclass(frozen=True)
class SchedulerSettings:
    """Every setting of the scheduler, with its default: the limits of one engine iteration, the policy and how
    offloading runs. Unchecked here (SchedulerConfig checks them)."""

    max_num_batched_tokens: int = setting(2048, "token budget of one iteration; longer prefills are chunked")
    max_num_seqs: int = setting(256, "most requests running at once")
    max_model_len: int = setting(32768, "longest prompt + output a request may reach, in tokens")
    be_decode_placement: BeDecodePlacement = setting(
        BeDecodePlacement.AUTO, "where best-effort requests decode under the omniserve policy: auto (in the CPU "
        "attention pool when device KV pages or iteration time run short, back on the device when both are "
        "plentiful), cpu (in the pool once their prefill is done), device (never offload: no CPU pool); neo offloads "
        "any request, whatever this says", choices=BeDecodePlacement)
    policy: str = setting(
        "omniserve", "scheduling policy: omniserve, or a competitor's on the same engine for comparison (sarathi, "
        "llumnix, neo, fcfs; see omniserve/engine/scheduler/policy.py)", choices=POLICIES)
    ls_headroom: float = setting(
        0.2, "llumnix policy: share of device KV pages reserved for latency-sensitive requests (best-effort requests "
        "may never hold them)")
    iteration_budget_share: float = setting(
        0.85, "share of the TPOT SLO an iteration is planned to fill (the rest absorbs the latency model's error)")
    offload_pipeline: OffloadPipeline = setting(
        OffloadPipeline.MULTI_LAYER, "how far an offloaded token goes per iteration: multi-layer (every layer whose "
        "CPU result is back in time; the device may wait for results within the iteration's slack under the TPOT "
        "budget), one-layer (one layer per iteration, the device never waits: the OmniServe paper's design), sync "
        "(every layer, the device waiting for each: NEO's pipeline, admission keeping the CPU's time within the "
        "budget)", choices=OffloadPipeline)


SCHEDULER_SETTINGS = tuple(f.name for f in fields(SchedulerSettings))


@dataclass(frozen=True)
class SchedulerConfig(SchedulerSettings):
    """The scheduler's settings, validated when built: the choices become their enums (a name that is none of them is
    a ConfigError naming them)."""

    @classmethod
    def of(cls, settings, **overrides) -> SchedulerConfig:
        """The scheduler's settings that `settings` (EngineArgs, SimConfig: anything with SchedulerSettings' fields)
        holds, taken by field name; `overrides` replace some of them."""
        return cls(**{name: getattr(settings, name) for name in SCHEDULER_SETTINGS} | overrides)

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
        self._choose("offload_pipeline", OffloadPipeline)
        self._choose("be_decode_placement", BeDecodePlacement)

    def _choose(self, name: str, choices: type[enum.Enum]) -> None:
        """Turns the setting's name of a choice into its enum member."""
        value = getattr(self, name)
        try:
            object.__setattr__(self, name, choices(value))  # frozen: set once, while being built
        except ValueError:
            raise ConfigError(f"{name} must be one of {', '.join(member.value for member in choices)}, "
                              f"got {value!r}") from None

    @cached_property  # read for every offload candidate of every plan; the config is frozen
    def offload_mode(self) -> OffloadMode:
        return offload_mode(self.policy, self.be_decode_placement)
