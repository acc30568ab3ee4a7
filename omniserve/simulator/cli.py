"""`omniserve simulate`: the command line of the simulator."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from omniserve.engine.scheduler.config import SchedulerConfig
from omniserve.engine.scheduler.policy import OFFLOAD_PIPELINES

EXAMPLES = """examples:
  # Llama-2-70B on 4 x A100 with 4 CPU-only hosts: each policy on the paper's kind of load, 30 simulated minutes
  omniserve simulate --profile llama-2-70b@a100x4 --cpu-hosts 4 --duration 1800 --ttft-slo 3 --tpot-slo 0.25 \\
      --ls-rate 2 --be-trace azure-code --be-rate 3.04 --be-lengths longbench --output-dir sim/llama70b
  # this machine's measured profile (run `omniserve profile` first)
  omniserve simulate --profile smollm2-135m@this-machine --ls-rate 1 --ttft-slo 2 --tpot-slo 0.1 --duration 120
  # the OmniServe paper's main comparisons, one table
  omniserve simulate --experiment paper
  # where offloading pays: omniserve vs sarathi over device KV per BE request x LS load x BE shape x CPU hosts
  omniserve simulate --regime-map --profile llama-3-8b@h100 --be-lengths longbench,fixed:1000:4000 \
      --ls-loads 0.25,0.5 --device-kv-requests 1,2,4,8 --cpu-hosts 0,4 --duration 300 --output-dir sim/regime
"""


def _numbers(kind):
    """An argparse type: a comma-separated list of `kind`."""
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(item) for item in text.split(",") if item.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {text!r}") from None
    return parse


def add_simulate_command(commands) -> None:
    from omniserve.simulator.profiles import list_profiles

    sim = commands.add_parser(
        "simulate", help="simulate LS + BE serving at cluster scale with the real scheduler",
        description="Runs the engine's scheduler, under each policy, on a simulated clock against a simulated "
        "device, CPU attention pool and network, with a measured or analytic profile; prints one line per policy "
        "(and a JSON line each on stdout).", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sim.add_argument("--profile", default=None, help=f"{', '.join(list_profiles())}, or MODEL@HARDWARE-FILE "
                     "(default llama-2-70b@a100x4; with --regime-map llama-3-8b@h100)")
    sim.add_argument("--profile-path", default=None, help="a latency profile JSON for smollm2-135m@this-machine")
    sim.add_argument("--cpu-hosts", type=_numbers(int), default=None,
                     help="CPU-only hosts besides the GPU server's own CPU (default 0; with --regime-map a list, 0,4)")
    sim.add_argument("--policies", default="omniserve,sarathi,llumnix,neo,fcfs",
                     help="the scheduler's policies, and the paper's baselines as it ran them: llumnix-cpu (BE "
                          "overflow to whole-model CPU instances), neo-sync (NEO's synchronous CPU attention)")
    sim.add_argument("--offload-pipeline", choices=OFFLOAD_PIPELINES, default=None,
                     help="how far an offloaded token goes per iteration, for every policy that offloads (default "
                          f"{SchedulerConfig.offload_pipeline}; the omniserve-one-layer policy is omniserve with "
                          "one-layer); not with --regime-map, which runs omniserve with both, nor --experiment paper")
    sim.add_argument("--duration", type=float, default=None,
                     help="simulated seconds of arrivals (default 600; with --regime-map 200)")
    sim.add_argument("--drain", type=float, default=None,
                     help="simulated seconds to finish after the arrivals (default 600; with --regime-map 30)")
    sim.add_argument("--ttft-slo", type=float, default=None)
    sim.add_argument("--tpot-slo", type=float, default=None)
    sim.add_argument("--ls-rate", type=float, default=1.0)
    sim.add_argument("--ls-burstiness", type=float, default=1.0, help="gamma shape; 1 is Poisson, < 1 burstier")
    sim.add_argument("--ls-rate-steps", default=None, metavar="LOW:HIGH:PERIOD")
    sim.add_argument("--ls-lengths", default="sharegpt",
                     help="sharegpt, azure-code, azure-conv, mooncake, longbench, cnn or fixed:IN:OUT")
    sim.add_argument("--be-trace", default="azure-code", help="BE arrivals: a trace (azure-code, azure-conv, "
                     "mooncake or a file); '' for Poisson at --be-rate")
    sim.add_argument("--be-rate", type=float, default=182.6 / 60,
                     help="BE mean rate (req/s); with a trace, the trace is rescaled to it (0: the trace's own)")
    sim.add_argument("--be-lengths", default=None,
                     help="as --ls-lengths (default longbench; with --regime-map a list, longbench,reasoning)")
    sim.add_argument("--max-input-len", type=int, default=None,
                     help="length caps (default 16384; with --regime-map, BE's only)")
    sim.add_argument("--max-output-len", type=int, default=None,
                     help="length caps (default 2048; with --regime-map, BE's only, default 8192)")
    sim.add_argument("--max-num-batched-tokens", type=int, default=SchedulerConfig.max_num_batched_tokens)
    sim.add_argument("--max-num-seqs", type=int, default=SchedulerConfig.max_num_seqs)
    sim.add_argument("--latency-noise", type=float, default=0.0,
                     help="relative spread of iteration times around the prediction (0.05: 5%%)")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--output-dir", default=None, help="result.json and plots per policy")
    sim.add_argument("--experiment", choices=("paper",), default=None,
                     help="paper: the OmniServe paper's comparisons (other workload flags are ignored)")
    _add_regime_arguments(sim)
    sim.add_argument("--no-progress", action="store_true")
    sim.set_defaults(handler=simulate_main)


def _add_regime_arguments(sim: argparse.ArgumentParser) -> None:
    regime = sim.add_argument_group("--regime-map", "omniserve vs sarathi over a grid of cells, each told what binds "
                                    "(docs/simulator.md); also reads --profile, --be-lengths, --cpu-hosts, --duration, "
                                    "--drain, --ttft-slo, --tpot-slo (default: from the profile), --seed, --output-dir")
    regime.add_argument("--regime-map", action="store_true", help="run the regime map (other workload flags ignored)")
    regime.add_argument("--ls-loads", type=_numbers(float), default=(0.25, 0.5),
                        help="LS rates as fractions of the device's LS saturation rate")
    regime.add_argument("--ls-rates", type=_numbers(float), default=(), help="LS rates in req/s (over --ls-loads)")
    regime.add_argument("--device-kv-requests", type=_numbers(float), default=(1.0, 4.0, 16.0),
                        help="device KV beyond the LS load's mean, in BE requests' mean KV")
    regime.add_argument("--be-load", type=float, default=1.5,
                        help="BE Poisson rate as a fraction of the device's BE saturation rate")
    regime.add_argument("--be-backlog", type=float, default=None,
                        help="BE requests queued at the start, as a multiple of what the device and every host hold "
                             "(default 1)")
    regime.add_argument("--host-kv-requests", type=float, default=None,
                        help="each host's KV memory in BE requests' mean KV (default: the profile's host memory)")
    regime.add_argument("--warmup", type=float, default=None,
                        help="simulated seconds at the start not counted, while the backlog fills the device and the "
                             "hosts (default 100)")


def simulate_main(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from omniserve.bench.workload import WorkloadError

    if args.offload_pipeline is not None and (args.regime_map or args.experiment == "paper"):
        sys.exit("omniserve simulate: error: --offload-pipeline is for plain runs: --regime-map runs omniserve with "
                 "both pipelines (omniserve and omniserve-one-layer), and --experiment paper runs the paper's")
    bar = tqdm(desc="simulated requests", unit="req", file=sys.stderr, disable=args.no_progress, dynamic_ncols=True)
    try:
        if args.regime_map:
            _regime_main(args, bar)
        elif args.experiment == "paper":
            _paper_main(args, bar)
        else:
            _policies_main(args, bar)
    except (ValueError, WorkloadError, OSError) as exc:  # OSError: a profile or output path that cannot be used
        sys.exit(f"omniserve simulate: error: {exc}")
    finally:
        bar.close()


def _or(value, default):
    return default if value is None else value


def _paper_main(args: argparse.Namespace, bar) -> None:
    from omniserve.simulator import experiment

    duration, drain = _or(args.duration, 600.0), _or(args.drain, 600.0)
    rows = experiment.run_paper(duration, args.seed, progress=bar.update, drain=drain)
    sweep = experiment.run_host_sweep(duration, args.seed, progress=bar.update, drain=drain)
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

    defaults = regime.RegimeSpec()
    spec = regime.RegimeSpec(
        profile=_or(args.profile, defaults.profile),
        be_lengths=tuple(args.be_lengths.split(",")) if args.be_lengths else defaults.be_lengths,
        ls_loads=args.ls_loads, ls_rates=args.ls_rates, device_kv_requests=args.device_kv_requests,
        cpu_hosts=_or(args.cpu_hosts, defaults.cpu_hosts), ls_lengths=args.ls_lengths, be_load=args.be_load,
        be_backlog=_or(args.be_backlog, defaults.be_backlog), host_kv_requests=args.host_kv_requests,
        warmup=_or(args.warmup, defaults.warmup),
        ttft_slo=args.ttft_slo, tpot_slo=args.tpot_slo, duration=_or(args.duration, defaults.duration),
        drain=_or(args.drain, defaults.drain), seed=args.seed,
        be_max=(_or(args.max_input_len, defaults.be_max[0]), _or(args.max_output_len, defaults.be_max[1])))
    rows = regime.run_regime_map(spec, progress=bar.update)
    bar.close()
    table = regime.write_outputs(rows, Path(args.output_dir)) if args.output_dir else regime.regime_table(rows)
    print(table, file=sys.stderr)
    for row in rows:
        print(json.dumps(row, separators=(",", ":")))


def _policies_main(args: argparse.Namespace, bar) -> None:
    from omniserve.bench.workload import parse_rate_steps
    from omniserve.simulator import experiment
    from omniserve.simulator.profiles import get_profile
    from omniserve.simulator.sim import SimConfig
    from omniserve.simulator.workload import ClassLoad

    hosts = _or(args.cpu_hosts, (0,))
    if len(hosts) != 1:
        raise ValueError("--cpu-hosts takes one number (a list only with --regime-map)")
    duration, drain = _or(args.duration, 600.0), _or(args.drain, 600.0)
    max_input, max_output = _or(args.max_input_len, 16384), _or(args.max_output_len, 2048)
    measured = "smollm2-135m@this-machine"
    name = _or(args.profile, measured if args.profile_path else "llama-2-70b@a100x4")
    if args.profile_path and name.lower() != measured:
        raise ValueError(f"--profile-path is a measured profile of {measured}; {name} is analytic (no file)")
    kw = {"path": args.profile_path} if args.profile_path else {}
    profile = get_profile(name, num_cpu_hosts=1 + hosts[0], **kw)
    steps = parse_rate_steps(args.ls_rate_steps) if args.ls_rate_steps else None
    loads = {"ls": ClassLoad(rate=args.ls_rate, burstiness=args.ls_burstiness, rate_steps=steps,
                             lengths=args.ls_lengths, max_input=max_input, max_output=max_output),
             "be": ClassLoad(rate=args.be_rate, trace=args.be_trace or None, lengths=args.be_lengths or "longbench",
                             max_input=max_input, max_output=max_output)}
    base = SimConfig(ls_ttft_slo=args.ttft_slo, ls_tpot_slo=args.tpot_slo, seed=args.seed,
                     max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
                     max_model_len=max_input + max_output, latency_noise=args.latency_noise,
                     offload_pipeline=args.offload_pipeline or SchedulerConfig.offload_pipeline)
    print(f"profile: {profile.name}", file=sys.stderr)
    for policy in args.policies.split(","):
        summary, result = experiment.simulate(profile, replace(base, policy=policy.strip()), loads, duration, drain,
                                              progress=bar.update)
        bar.write(experiment.one_line(summary), file=sys.stderr)
        print(json.dumps(summary, separators=(",", ":")), flush=True)
        if args.output_dir:
            experiment.write_outputs(summary, result, Path(args.output_dir) / policy.strip())
