"""The scheduler's settings are declared once (SchedulerSettings): the engine's args, the simulator's config and the
flags of `omniserve serve`, `generate` and `simulate run` are made from that declaration, converted to a
SchedulerConfig by field name, and must not drift from it."""

from __future__ import annotations

import argparse
import re
from dataclasses import fields
from pathlib import Path

import pytest

from omniserve.config import ConfigError
from omniserve.engine.args import EngineArgs
from omniserve.engine.scheduler.config import SCHEDULER_SETTINGS, SchedulerConfig, SchedulerSettings
from omniserve.engine.scheduler.policy import BeDecodePlacement, OffloadPipeline
from omniserve.entrypoints.cli import build_parser
from omniserve.simulator.cli import RUN_SETS, run_config
from omniserve.simulator.sim import SimConfig

DECLARED = {f.name: f for f in fields(SchedulerSettings)}
ENGINE_DEFAULTS = {"max_model_len": None}
"""The engine's own defaults: the longest context is the model's, known once it is loaded."""
OTHER_VALUES = {"max_num_batched_tokens": 512, "max_num_seqs": 7, "max_model_len": 1000, "be_decode_placement": "cpu",
                "policy": "neo", "ls_headroom": 0.3, "iteration_budget_share": 0.5, "offload_pipeline": "sync"}
"""A value other than the default for every setting (a new setting must be added here)."""
LIBRARY = Path(__file__).resolve().parent.parent / "omniserve"


def _flags(*command: str) -> dict[str, argparse.Action]:
    parser = build_parser()
    for name in command:
        parser = next(action.choices[name] for action in parser._actions
                      if isinstance(action, argparse._SubParsersAction))
    return {option: action for action in parser._actions for option in action.option_strings}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def test_the_declaration_is_complete():
    assert tuple(f.name for f in fields(SchedulerConfig)) == SCHEDULER_SETTINGS == tuple(OTHER_VALUES)
    for f in DECLARED.values():
        assert f.metadata["help"] and f.default != OTHER_VALUES[f.name], f.name
    assert DECLARED["offload_pipeline"].metadata["choices"] == ("multi-layer", "one-layer", "sync")
    assert DECLARED["be_decode_placement"].metadata["choices"] == ("auto", "cpu", "device")


@pytest.mark.parametrize("settings", [EngineArgs, SimConfig])
def test_engine_args_and_sim_config_have_every_setting_with_its_default(settings):
    own = {f.name: f for f in fields(settings)}
    for name, declared in DECLARED.items():
        if settings is EngineArgs and name in ENGINE_DEFAULTS:
            assert own[name].default == ENGINE_DEFAULTS[name]
            continue
        assert own[name].default == declared.default and own[name].metadata == declared.metadata, name


@pytest.mark.parametrize("command", [("serve",), ("generate",), ("run-batch",), ("simulate", "run")])
def test_every_setting_has_its_flag_as_declared(command):
    flags = _flags(*command)
    for name, declared in DECLARED.items():
        if command == ("simulate", "run") and name in RUN_SETS:
            assert _flag(name) not in flags
            assert all(flag in flags for flag in re.findall(r"--[a-z-]+", RUN_SETS[name])), name
            continue
        action = flags[_flag(name)]
        if command != ("simulate", "run") and name in ENGINE_DEFAULTS:
            assert action.default == ENGINE_DEFAULTS[name]
            continue
        assert action.default == declared.default, name
        assert action.choices == declared.metadata["choices"] and action.help == declared.metadata["help"], name
        assert action.type is type(declared.default) or (action.type is str and isinstance(declared.default, str))


def test_engine_args_and_flags_become_the_scheduler_config_by_name():
    expected = SchedulerConfig(**OTHER_VALUES)
    assert SchedulerConfig.of(EngineArgs(**OTHER_VALUES)) == expected
    assert SimConfig(**OTHER_VALUES).scheduler_config() == expected
    argv = [f"{_flag(name)}={value}" for name, value in OTHER_VALUES.items()]
    parsed = build_parser().parse_args(["serve", *argv])
    assert SchedulerConfig.of(EngineArgs.from_cli_args(parsed)) == expected
    run = build_parser().parse_args(["simulate", "run", "--policies", "neo,fcfs", "--max-input-len", "600",
                                     "--max-output-len", "400", *(flag for flag in argv if "policy" not in flag
                                                                  and "max-model-len" not in flag)])
    assert run_config(run).scheduler_config() == expected
    assert SchedulerConfig.of(EngineArgs(), max_model_len=1000) == SchedulerConfig(max_model_len=1000)


def test_nothing_maps_the_settings_by_hand():
    """No `policy=args.policy`: a setting copied by name, one at a time, where settings become others (an override
    passed to SchedulerConfig.of aside)."""
    by_hand = re.compile(rf"\b({'|'.join(SCHEDULER_SETTINGS)})=\w+\.\1\b")
    modules = [*LIBRARY.glob("engine/*.py"), *LIBRARY.glob("simulator/*.py"), *LIBRARY.glob("scaleout/*.py"),
               LIBRARY / "entrypoints" / "cli.py"]
    found = [f"{path.name}: {line.strip()}" for path in modules for line in path.read_text().splitlines()
             if by_hand.search(line) and "SchedulerConfig.of(" not in line]
    assert not found


def test_choices_become_enums_that_compare_as_their_names():
    config = SchedulerConfig(offload_pipeline="one-layer", be_decode_placement="device")
    assert config.offload_pipeline is OffloadPipeline.ONE_LAYER and config.offload_pipeline == "one-layer"
    assert config.be_decode_placement is BeDecodePlacement.DEVICE and f"{config.be_decode_placement}" == "device"
    assert SchedulerConfig() == SchedulerConfig(offload_pipeline="multi-layer", be_decode_placement="auto")
    with pytest.raises(ConfigError, match="offload_pipeline must be one of multi-layer, one-layer, sync, got 'two'"):
        SchedulerConfig(offload_pipeline="two")
    with pytest.raises(ConfigError, match="be_decode_placement must be one of auto, cpu, device, got 'gpu'"):
        SchedulerConfig(be_decode_placement="gpu")


def test_a_bool_setting_is_a_flag_and_its_negation():
    import argparse

    from omniserve.engine.args import EngineArgs

    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    assert EngineArgs.from_cli_args(parser.parse_args([])).enforce_eager is False
    assert EngineArgs.from_cli_args(parser.parse_args(["--enforce-eager"])).enforce_eager is True
    assert EngineArgs.from_cli_args(parser.parse_args(["--no-enforce-eager"])).enforce_eager is False
