"""One offload mode, resolved once from the policy and the BE placement, and every user of it agreeing: the scheduler,
the engine (whether it has a CPU pool) and `omniserve profile` (whose profile the engine must then find in the cache,
the pool being part of the cache key)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from fakes import MODEL  # a latency model of chosen numbers

from omniserve.engine.llm_engine import LLMEngine
from omniserve.engine.scheduler import OffloadMode, SchedulerConfig
from omniserve.engine.scheduler.policy import POLICIES, BeDecodePlacement
from omniserve.entrypoints import cli
from omniserve.profiler import profiler

BE_DECODE_PLACEMENTS = tuple(placement.value for placement in BeDecodePlacement)
EXPECTED = {
    ("omniserve", "auto"): OffloadMode.BE_WHEN_SHORT,
    ("omniserve", "cpu"): OffloadMode.BE_ALWAYS,
    ("omniserve", "device"): OffloadMode.NONE,
    **{("neo", placement): OffloadMode.ANY_WHEN_SHORT for placement in BE_DECODE_PLACEMENTS},
    **{(policy, placement): OffloadMode.NONE
       for policy in ("sarathi", "llumnix", "fcfs") for placement in BE_DECODE_PLACEMENTS},
}


def test_every_policy_and_placement_resolves_to_one_mode():
    assert set(EXPECTED) == {(p, b) for p in POLICIES for b in BE_DECODE_PLACEMENTS}
    for (policy, placement), mode in EXPECTED.items():
        assert SchedulerConfig(policy=policy, be_decode_placement=placement).offload_mode is mode


@pytest.mark.parametrize("policy,placement", [("sarathi", "auto"), ("neo", "device"), ("omniserve", "auto"),
                                              ("omniserve", "device")])
def test_profile_command_and_engine_profile_the_same_setup(policy, placement, tiny_model_dirs, monkeypatch,
                                                           tmp_path):
    """`omniserve profile --policy P` and an engine with policy P ask for the profile of the same setup (with or
    without the CPU pool), so the engine finds the profile the command wrote instead of profiling again."""
    asked = []
    model = replace(MODEL, num_layers=2)

    def load_or_profile(*args, pool_config, **kwargs):
        asked.append(pool_config)
        return model

    monkeypatch.setattr(profiler, "load_or_profile", load_or_profile)
    common = ["--model", tiny_model_dirs["llama"][0], "--policy", policy, "--be-decode-placement", placement]
    cli.main(["profile", *common, "--output", str(tmp_path / "profile.json")])
    engine = LLMEngine(model=tiny_model_dirs["llama"][0], policy=policy, be_decode_placement=placement,
                       ls_ttft_slo=10.0, ls_tpot_slo=1.0, latency_model=profiler.profiled_latency_model)
    try:
        uses_pool = EXPECTED[(policy, placement)].uses_pool
        assert [config is not None for config in asked] == [uses_pool, uses_pool]
        assert (engine.cpu_pool is not None) == uses_pool
    finally:
        engine.shutdown()
