"""`omniserve bench`: the command line of the load generator and of the policy comparison (`--compare`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from omniserve.bench.metrics import Slo
from omniserve.bench.workload import StreamSpec, WorkloadError, parse_rate_steps
from omniserve.engine.scheduler.policy import POLICIES

EXAMPLES = """examples:
  # LS chat-like traffic (ShareGPT prompts, Poisson 2 req/s) plus BE replayed from the Azure code trace, 10x slower
  omniserve bench --ls-rate 2 --ls-output-len 64:256 --ls-max-input-len 1024 \\
      --be-trace azure-code --be-time-scale 10 --be-dataset trace --be-max-input-len 2048 \\
      --ttft-slo 1.0 --tpot-slo 0.1 --duration 120 --output-dir results/run1
  # the same workload against each policy of `omniserve serve`, SLOs set from the latency profile
  omniserve bench --compare --ls-rate 2 --be-trace azure-code --be-time-scale 10 --be-dataset trace \\
      --server-args "--max-model-len 4096" --output-dir results/compare
  # the same LS traffic beside about 1,000 short BE requests sent as one batch (Batch API)
  omniserve bench --ls-rate 1 --ls-max-input-len 256 --ttft-slo 2 --tpot-slo 0.1 --duration 100 \\
      --be-rate 10 --be-max-input-len 32 --be-output-len 16:32 --be-batch --output-dir results/batch
"""


def _add_stream_args(parser: argparse.ArgumentParser, service_class: str, name: str) -> None:
    group = parser.add_argument_group(f"{name} stream (--{service_class}-*)")
    flag = f"--{service_class}-"
    group.add_argument(flag + "rate", type=float, default=0.0, help="requests/s (0: no such stream, unless another "
                       "arrival source is given)")
    group.add_argument(flag + "burstiness", type=float, default=1.0,
                       help="gamma shape of the inter-arrival times: 1 is Poisson, below 1 burstier")
    group.add_argument(flag + "rate-steps", default=None, metavar="LOW:HIGH:PERIOD",
                       help="a rate drawn uniformly in [LOW, HIGH] every PERIOD seconds (e.g. 1:8:5)")
    group.add_argument(flag + "concurrency", type=int, default=0, help="closed loop: keep N requests in flight")
    group.add_argument(flag + "trace", default=None, help="replay a trace's arrival times: an Azure LLM 2023 CSV, a "
                       "Mooncake JSONL, or azure-code / azure-conv / mooncake (the copies in shared/data)")
    group.add_argument(flag + "time-scale", type=float, default=1.0,
                       help="stretch the trace's time by this factor (10: ten times fewer requests per second)")
    group.add_argument(flag + "trace-offset", type=float, default=0.0,
                       help="start the replay this far into the trace (s)")
    group.add_argument(flag + "dataset", choices=("sharegpt", "random", "trace"), default=None,
                       help="lengths and prompts: ShareGPT prompts (real text), random token ids of --*-input-len, "
                       "or the trace's lengths (random token ids); default: trace with a trace, else sharegpt")
    group.add_argument(flag + "input-len", default="512", metavar="N|LOW:HIGH", help="random dataset's prompt tokens")
    group.add_argument(flag + "output-len", default="128", metavar="N|LOW:HIGH",
                       help="output tokens (max_tokens, EOS ignored) for the sharegpt and random datasets")
    group.add_argument(flag + "max-input-len", type=int, default=None, help="cut prompts to this many tokens")
    group.add_argument(flag + "max-output-len", type=int, default=None, help="cap output lengths (e.g. a trace's)")
    group.add_argument(flag + "model", default=None, help="model name for this stream (default: --model)")
    group.add_argument(flag + "service-tier", default="flex" if service_class == "be" else None,
                       help="service_tier to send ('' for none)" + (" (default: flex, best effort)"
                                                                     if service_class == "be" else ""))
    group.add_argument(flag + "extra-body", default=None, metavar="JSON",
                       help="more request fields, e.g. '{\"priority\": 1}' for vLLM's priority scheduling")


def _stream_spec(args: argparse.Namespace, service_class: str) -> StreamSpec:
    get = lambda name: getattr(args, f"{service_class}_{name}")  # noqa: E731
    steps = parse_rate_steps(get("rate_steps")) if get("rate_steps") else None
    return StreamSpec(
        rate=get("rate"), burstiness=get("burstiness"), rate_steps=steps, concurrency=get("concurrency"),
        trace=get("trace"), time_scale=get("time_scale"), trace_offset=get("trace_offset"),
        dataset=get("dataset"), input_len=get("input_len"),
        output_len=get("output_len"), max_input_len=get("max_input_len"), max_output_len=get("max_output_len"))


def add_bench_command(commands) -> None:
    bench = commands.add_parser(
        "bench", help="benchmark an OpenAI-compatible server with LS and BE traffic (or compare policies)",
        description="Runs a latency-sensitive and a best-effort stream at the same time against a server and "
        "reports per-class latency, SLO attainment, goodput and throughput (JSON line on stdout, summary on "
        "stderr, result.json and plots with --output-dir).", epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server (ignored with --compare)")
    bench.add_argument("--model", default=None, help="model name to send (default: the first of GET /v1/models)")
    bench.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    bench.add_argument("--api-key", default=None)
    bench.add_argument("--tokenizer", default=None, help="HF folder or GGUF file whose tokenizer measures and makes "
                       "prompts (default: the built-in SmolLM2's); use the served model's")
    bench.add_argument("--duration", type=float, default=60.0, help="seconds during which requests arrive")
    bench.add_argument("--drain-timeout", type=float, default=120.0,
                       help="after the arrivals, seconds to wait for open LS requests (all, without LS); then "
                       "whatever is open is cancelled")
    bench.add_argument("--request-timeout", type=float, default=300.0,
                       help="longest wait for the server's next byte before a request counts as failed")
    bench.add_argument("--ttft-slo", type=float, default=None, help="LS time-to-first-token SLO, seconds")
    bench.add_argument("--tpot-slo", type=float, default=None, help="LS time-per-output-token SLO, seconds")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--output-dir", default=None, help="write result.json, latency_cdf.png and timeline.png here")
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_stream_args(bench, "ls", "latency-sensitive")
    _add_stream_args(bench, "be", "best-effort")
    bench.add_argument("--be-batch", action="store_true",
                       help="send the BE stream as one OpenAI batch (POST /v1/files, then /v1/batches) instead of "
                       "HTTP requests: the requests its arrival source gives in the window become the lines (same "
                       "bodies, not streamed); their arrival times do not apply: the batch is created when the run "
                       "starts and polled until it ends or the drain timeout does (then cancelled). BE figures: "
                       "lines completed/failed, the batch's wall time, lines/s and output tokens/s")
    group = bench.add_argument_group("policy comparison")
    group.add_argument("--compare", action="store_true",
                       help="start `omniserve serve` once per policy and run the workload against each")
    group.add_argument("--policies", default=",".join(POLICIES))
    group.add_argument("--server-args", default="", help="more `omniserve serve` arguments for every server")
    group.add_argument("--tpot-factor", type=float, default=3.0,
                       help="without --tpot-slo: TPOT SLO = this x a lone LS decode step (from the profile)")
    group.add_argument("--ttft-factor", type=float, default=3.0,
                       help="without --ttft-slo: TTFT SLO = this x the budgeted prefill of the longest LS prompt")
    bench.set_defaults(handler=bench_main)


def bench_main(args: argparse.Namespace) -> None:
    from omniserve.bench import runner
    from omniserve.models.loader import resolve_model
    from omniserve.tokenizer import load_tokenizer

    try:
        streams = {c: _stream_spec(args, c) for c in runner.CLASSES}
    except WorkloadError as exc:
        sys.exit(f"omniserve bench: error: {exc}")
    if not any(s.enabled for s in streams.values()):
        sys.exit("omniserve bench: error: no stream: give --ls-rate, --be-rate, a --*-trace, --*-rate-steps or "
                 "--*-concurrency")
    if args.be_batch and not streams["be"].enabled:
        sys.exit("omniserve bench: error: --be-batch sends the BE stream as one batch: give it one (--be-rate, "
                 "--be-trace or --be-rate-steps)")
    if args.be_batch and streams["be"].concurrency:
        sys.exit("omniserve bench: error: --be-batch needs a fixed set of BE requests (a rate, rate steps or a "
                 "trace); a closed loop (--be-concurrency) has none")
    extra_bodies = {}
    for c in runner.CLASSES:
        text = getattr(args, f"{c}_extra_body")
        try:
            extra_bodies[c] = json.loads(text) if text else {}
        except ValueError as exc:
            sys.exit(f"omniserve bench: error: --{c}-extra-body is not JSON: {exc}")
        if not isinstance(extra_bodies[c], dict):
            sys.exit(f"omniserve bench: error: --{c}-extra-body must be a JSON object")
    tokenizer = load_tokenizer(*resolve_model(args.tokenizer, "auto"))
    config = runner.BenchConfig(
        base_url=args.base_url, model=args.model, endpoint=args.endpoint, api_key=args.api_key, streams=streams,
        models={"ls": args.ls_model, "be": args.be_model},
        service_tiers={"ls": args.ls_service_tier or None, "be": args.be_service_tier or None},
        extra_bodies=extra_bodies,
        slo=Slo(args.ttft_slo, args.tpot_slo), duration=args.duration, drain_timeout=args.drain_timeout,
        request_timeout=args.request_timeout, seed=args.seed, be_batch=args.be_batch)
    try:
        if args.compare:
            _compare(args, config, tokenizer)
            return
        result, records = runner.run(config, runner.build_workload(config, tokenizer), tokenizer,
                                     progress=not args.no_progress)
    except WorkloadError as exc:
        sys.exit(f"omniserve bench: error: {exc}")
    print(runner.report(result), file=sys.stderr)
    print(runner.one_line(result), flush=True)
    if args.output_dir:
        for path in runner.write_outputs(result, records, args.output_dir, config.slo):
            print(f"wrote {path}", file=sys.stderr)


def _compare(args: argparse.Namespace, config, tokenizer) -> None:
    import shlex
    from dataclasses import replace

    from omniserve.bench import compare, runner, slos

    policies = tuple(p.strip() for p in args.policies.split(",") if p.strip())
    unknown = set(policies) - set(POLICIES)
    if unknown:
        sys.exit(f"omniserve bench: error: unknown policies {sorted(unknown)}; known: {', '.join(POLICIES)}")
    if config.slo.ttft is None or config.slo.tpot is None:
        ls = config.streams["ls"]
        max_prompt = ls.max_input_len or max(
            (r.input_len for r in runner.build_workload(config, tokenizer).get("ls", [])), default=512)
        derived = slos.slos_from_profile(shlex.split(args.server_args), max_prompt, args.tpot_factor,
                                         args.ttft_factor)
        config = replace(config, slo=Slo(config.slo.ttft or derived.ttft, config.slo.tpot or derived.tpot))
        print(f"LS SLOs from the latency profile: TTFT {config.slo.ttft * 1e3:.0f} ms, TPOT "
              f"{config.slo.tpot * 1e3:.1f} ms (longest LS prompt {max_prompt} tokens)", file=sys.stderr)
    output_dir = Path(args.output_dir or "bench-compare")
    results = compare.compare(config, args.server_args, policies, output_dir, tokenizer)
    table = compare.comparison_table(results)
    print(table, file=sys.stderr)
    (output_dir / "comparison.md").write_text(table + "\n")
    (output_dir / "comparison.json").write_text(json.dumps(
        [{k: v for k, v in r.items() if k != "timeline"} for r in results], indent=1))
    print(f"wrote {output_dir}/comparison.md, comparison.json and a folder per policy", file=sys.stderr)
