"""`omniserve simulate run|regime-map|paper`: the command line of the simulator, one subcommand per kind of experiment,
each with only its own flags and defaults."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields, replace
from pathlib import Path

from omniserve.engine.scheduler.config import SCHEDULER_SETTINGS, SchedulerSettings, add_flags
from omniserve.sampling.params import ServiceClass

EXAMPLES = """examples:
  # Llama-2-70B on 4 x A100 with 4 CPU-only hosts: each policy on the paper's kind of load, 30 simulated minutes
  omniserve simulate run --profile llama-2-70b@a100x4 --cpu-hosts 4 --duration 1800 --ttft-slo 3 --tpot-slo 0.25 \\
      --ls-rate 2 --be-trace azure-code --be-rate 3.04 --be-lengths longbench --output-dir sim/llama70b
  # this machine's measured profile (run `omniserve profile` first)
  omniserve simulate run --profile smollm2-135m@this-machine --ls-rate 1 --ttft-slo 2 --tpot-slo 0.1 --duration 120
  # where offloading pays: omniserve vs sarathi over device KV per BE request x LS load x BE shape x CPU hosts
  omniserve simulate regime-map --profile llama-3-8b@h100 --be-lengths longbench,fixed:1000:4000 \\
      --ls-loads 0.25,0.5 --device-kv-requests 1,2,4,8 --cpu-hosts 0,4 --duration 300 --output-dir sim/regime
  # the Mooncake trace replayed with its prompts' shared blocks: prefix caching on against off
  omniserve simulate run --profile llama-3-8b@h100 --policies omniserve --ls-rate 0 --be-trace mooncake \
      --be-lengths mooncake --be-rate 0 --duration 600
  omniserve simulate run ... --no-enable-prefix-caching
  # the OmniServe paper's main comparisons, one table
  omniserve simulate paper
"""

RUN_SETS = {"policy": "--policies", "max_model_len": "--max-input-len + --max-output-len"}
"""The scheduler settings that `simulate run` sets from flags of its own, not from a flag of the setting's name: the
policies it compares, and the window its length caps make."""


def _numbers(kind):
    """An argparse type: a comma-separated list of `kind`."""
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(item.strip()) for item in text.split(",") if item.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {text!r}") from None
    return parse


def add_simulate_command(commands) -> None:
    sim = commands.add_parser(
        "simulate", help="simulate LS + BE serving at cluster scale with the real scheduler",
        description="Runs the engine's scheduler on a simulated clock against a simulated device, CPU attention pool "
        "and network, with a measured or analytic profile: `run` compares policies on one workload, `regime-map` "
        "maps where offloading pays, `paper` runs the OmniServe paper's comparisons.", epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = sim.add_subparsers(dest="mode", required=True, metavar="{run,regime-map,paper}")
    _add_run_command(modes)
    _add_regime_command(modes)
    _add_paper_command(modes)


def _add_common_flags(parser: argparse.ArgumentParser, duration: float, drain: float) -> None:
    """The flags every subcommand has, with the subcommand's defaults of the run's length."""
    parser.add_argument("--duration", type=float, default=duration, help="simulated seconds of arrivals")
    parser.add_argument("--drain", type=float, default=drain,
                        help="simulated seconds to finish after the arrivals (then the rest count as cancelled)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default=None, help="where the results and plots go")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def _add_run_command(modes) -> None:
    from omniserve.simulator.profiles import list_profiles

    run = modes.add_parser(
        "run", help="each policy on one workload", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Runs each policy on the same workload; prints one line per policy (and a JSON line each on "
        "stdout).", epilog=EXAMPLES)
    run.add_argument("--profile", default=None, help=f"{', '.join(list_profiles())}, or MODEL@HARDWARE-FILE "
                     "(default llama-2-70b@a100x4, or smollm2-135m@this-machine with --profile-path)")
    run.add_argument("--profile-path", default=None, help="a latency profile JSON for smollm2-135m@this-machine")
    run.add_argument("--cpu-hosts", type=int, default=0, help="CPU-only hosts besides the GPU server's own CPU")
    run.add_argument("--policies", default="omniserve,sarathi,llumnix,neo,fcfs",
                     help="the scheduler's policies, and the paper's baselines as it ran them: llumnix-cpu (BE "
                          "overflow to whole-model CPU instances), neo-sync (NEO's synchronous CPU attention), "
                          "omniserve-one-layer (omniserve with the one-layer pipeline)")
    _add_slo_flags(run)
    run.add_argument("--ls-rate", type=float, default=1.0)
    run.add_argument("--ls-burstiness", type=float, default=1.0, help="gamma shape; 1 is Poisson, < 1 burstier")
    run.add_argument("--ls-rate-steps", default=None, metavar="LOW:HIGH:PERIOD")
    run.add_argument("--ls-lengths", default="sharegpt",
                     help="sharegpt, azure-code, azure-conv, mooncake, longbench, cnn or fixed:IN:OUT")
    run.add_argument("--be-trace", default="azure-code", help="BE arrivals: a trace (azure-code, azure-conv, "
                     "mooncake or a file); '' for Poisson at --be-rate")
    run.add_argument("--be-rate", type=float, default=182.6 / 60,
                     help="BE mean rate (req/s); with a trace, the trace is rescaled to it (0: the trace's own)")
    run.add_argument("--be-lengths", default="longbench", help="as --ls-lengths")
    run.add_argument("--max-input-len", type=int, default=16384, help="prompt length cap")
    run.add_argument("--max-output-len", type=int, default=2048, help="output length cap")
    run.add_argument("--latency-noise", type=float, default=0.0,
                     help="relative spread of iteration times around the prediction (0.05: 5%%)")
    run.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                     help="reuse the KV of prompt blocks an earlier request computed, where the workload has them "
                          "(a trace replayed with its own lengths: --be-trace mooncake --be-lengths mooncake)")
    run.add_argument("--kv-offloading-size", type=float, default=0.0, metavar="GIB",
                     help="the prefix cache's host tier: GiB of the local host's KV memory that keeps the pages the "
                          "device evicts (as the engine's flag; 0: none)")
    scheduler = run.add_argument_group("scheduler")
    add_flags(scheduler, [f for f in fields(SchedulerSettings) if f.name not in RUN_SETS])
    _add_common_flags(run, duration=600.0, drain=600.0)
    run.set_defaults(handler=_handler(_run_main))


def _add_slo_flags(parser: argparse.ArgumentParser, default: str = "none") -> None:
    parser.add_argument("--ttft-slo", type=float, default=None, help=f"LS TTFT SLO in seconds (default {default})")
    parser.add_argument("--tpot-slo", type=float, default=None, help=f"LS TPOT SLO in seconds (default {default})")


def _add_regime_command(modes) -> None:
    from omniserve.simulator.regime import RegimeSpec

    spec = RegimeSpec()
    regime = modes.add_parser(
        "regime-map", help="omniserve vs sarathi over a grid of cells, each told what binds",
        description="omniserve (with both pipelines) vs sarathi over a grid of device KV per BE request x LS load x "
        "BE shape x CPU hosts, in the steady state, each cell told what binds (docs/simulator.md).")
    regime.add_argument("--profile", default=spec.profile, help="a profile of `simulate run --help`")
    regime.add_argument("--be-lengths", type=_numbers(str), default=spec.be_lengths,
                        help="BE shapes, comma-separated length sources (see `simulate run --help`)")
    regime.add_argument("--ls-lengths", default=spec.ls_lengths, help="the LS length source")
    regime.add_argument("--cpu-hosts", type=_numbers(int), default=spec.cpu_hosts,
                        help="CPU-only host counts besides the GPU server's own CPU")
    regime.add_argument("--ls-loads", type=_numbers(float), default=spec.ls_loads,
                        help="LS rates as fractions of the device's LS saturation rate")
    regime.add_argument("--ls-rates", type=_numbers(float), default=spec.ls_rates,
                        help="LS rates in req/s (over --ls-loads)")
    regime.add_argument("--device-kv-requests", type=_numbers(float), default=spec.device_kv_requests,
                        help="device KV beyond the LS load's mean, in BE requests' mean KV")
    regime.add_argument("--be-load", type=float, default=spec.be_load,
                        help="BE Poisson rate as a fraction of the device's BE saturation rate")
    regime.add_argument("--be-backlog", type=float, default=spec.be_backlog,
                        help="BE requests queued at the start, as a multiple of what the device and every host hold")
    regime.add_argument("--host-kv-requests", type=float, default=spec.host_kv_requests,
                        help="each host's KV memory in BE requests' mean KV (default: the profile's host memory)")
    regime.add_argument("--warmup", type=float, default=spec.warmup,
                        help="simulated seconds at the start not counted, while the backlog fills the device and the "
                             "hosts")
    regime.add_argument("--max-input-len", type=int, default=spec.be_max[0], help="BE prompt length cap")
    regime.add_argument("--max-output-len", type=int, default=spec.be_max[1], help="BE output length cap")
    _add_slo_flags(regime, default="from the profile")
    _add_common_flags(regime, duration=spec.duration, drain=spec.drain)
    regime.set_defaults(handler=_handler(_regime_main))


def _add_paper_command(modes) -> None:
    paper = modes.add_parser(
        "paper", help="the OmniServe paper's comparisons",
        description="The OmniServe paper's comparisons (both models, LS loads, BE shapes, CPU hosts) under omniserve, "
        "sarathi and the paper's baselines, and BE throughput against CPU hosts: one table.")
    _add_common_flags(paper, duration=600.0, drain=600.0)
    paper.set_defaults(handler=_handler(_paper_main))


def _handler(body):
    """A subcommand's handler: `body(args, bar)` with a progress bar, its errors as clear exits."""
    def handler(args: argparse.Namespace) -> None:
        from tqdm import tqdm

        from omniserve.bench.workload import WorkloadError

        bar = tqdm(desc="simulated requests", unit="req", file=sys.stderr, disable=args.no_progress,
                   dynamic_ncols=True)
        try:
            body(args, bar)
        except (ValueError, WorkloadError, OSError) as exc:  # OSError: a profile or output path that cannot be used
            sys.exit(f"omniserve simulate {args.mode}: error: {exc}")
        finally:
            bar.close()
    return handler


def _paper_main(args: argparse.Namespace, bar) -> None:
    from omniserve.simulator import experiment

    rows = experiment.run_paper(args.duration, args.seed, progress=bar.update, drain=args.drain)
    sweep = experiment.run_host_sweep(args.duration, args.seed, progress=bar.update, drain=args.drain)
    bar.close()
    table = experiment.paper_table(rows) + "\n\nBE throughput against CPU hosts:\n\n" + experiment.host_sweep_table(
        sweep)
    print(table, file=sys.stderr)
    for row in rows + sweep:
        print(json.dumps({"case": row["case"], "policies": row["policies"]}, separators=(",", ":")))
    if args.output_dir:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(args.output_dir) / "paper.md").write_text(table + "\n")
        (Path(args.output_dir) / "paper.json").write_text(json.dumps({"cases": rows, "hosts": sweep}, indent=1))


def _regime_main(args: argparse.Namespace, bar) -> None:
    from omniserve.simulator import regime

    spec = regime.RegimeSpec(
        profile=args.profile, be_lengths=args.be_lengths, ls_loads=args.ls_loads, ls_rates=args.ls_rates,
        device_kv_requests=args.device_kv_requests, cpu_hosts=args.cpu_hosts, ls_lengths=args.ls_lengths,
        be_load=args.be_load, be_backlog=args.be_backlog, host_kv_requests=args.host_kv_requests,
        warmup=args.warmup, ttft_slo=args.ttft_slo, tpot_slo=args.tpot_slo, duration=args.duration,
        drain=args.drain, seed=args.seed, be_max=(args.max_input_len, args.max_output_len))
    rows = regime.run_regime_map(spec, progress=bar.update)
    bar.close()
    table = regime.write_outputs(rows, Path(args.output_dir)) if args.output_dir else regime.regime_table(rows)
    print(table, file=sys.stderr)
    for row in rows:
        print(json.dumps(row, separators=(",", ":")))


def _run_main(args: argparse.Namespace, bar) -> None:
    from omniserve.simulator import experiment

    profile, base, loads = _run_profile(args), run_config(args), _run_loads(args)
    print(f"profile: {profile.name}", file=sys.stderr)
    for policy in args.policies.split(","):
        summary, result = experiment.simulate(profile, replace(base, policy=policy.strip()), loads, args.duration,
                                              args.drain, progress=bar.update)
        bar.write(experiment.one_line(summary), file=sys.stderr)
        print(json.dumps(summary, separators=(",", ":")), flush=True)
        if args.output_dir:
            experiment.write_outputs(summary, result, Path(args.output_dir) / policy.strip())


def run_config(args: argparse.Namespace):
    """The SimConfig of `simulate run`'s flags, for its first policy (the scheduler's settings taken by name)."""
    from omniserve.simulator.sim import SimConfig

    settings = {name: getattr(args, name) for name in SCHEDULER_SETTINGS if name not in RUN_SETS}
    return SimConfig(**settings, policy=args.policies.split(",")[0].strip(),
                     max_model_len=args.max_input_len + args.max_output_len, ls_ttft_slo=args.ttft_slo,
                     ls_tpot_slo=args.tpot_slo, latency_noise=args.latency_noise, seed=args.seed,
                     prefix_caching=args.enable_prefix_caching, kv_offloading_gib=args.kv_offloading_size)


def _run_profile(args: argparse.Namespace):
    """The profile `simulate run` simulates: --profile, with the measured one's file from --profile-path."""
    from omniserve.simulator.profiles import get_profile

    measured = "smollm2-135m@this-machine"
    name = args.profile or (measured if args.profile_path else "llama-2-70b@a100x4")
    if args.profile_path and name.lower() != measured:
        raise ValueError(f"--profile-path is a measured profile of {measured}; {name} is analytic (no file)")
    kw = {"path": args.profile_path} if args.profile_path else {}
    return get_profile(name, num_cpu_hosts=1 + args.cpu_hosts, **kw)


def _run_loads(args: argparse.Namespace) -> dict:
    """The LS and BE loads of `simulate run`, from its workload flags."""
    from omniserve.bench.workload import parse_rate_steps
    from omniserve.simulator.workload import ClassLoad

    steps = parse_rate_steps(args.ls_rate_steps) if args.ls_rate_steps else None
    caps = {"max_input": args.max_input_len, "max_output": args.max_output_len}
    return {ServiceClass.LS: ClassLoad(rate=args.ls_rate, burstiness=args.ls_burstiness, rate_steps=steps,
                                       lengths=args.ls_lengths, **caps),
            ServiceClass.BE: ClassLoad(rate=args.be_rate, trace=args.be_trace or None, lengths=args.be_lengths,
                                       **caps)}
