"""BE throughput with the local CPU attention pool only vs the local pool plus one remote host (a Ray actor in a
process group of its own, standing in for a CPU-only server), and the traffic the remote host costs.

Workload (built-in SmolLM2-135M-Instruct, fp32): --requests best-effort requests queued at once, prompts of exactly
--prompt-len ShareGPT tokens, outputs of exactly --output-len tokens (EOS ignored), every one offloaded after its
prefill (`be_decode_placement=cpu`). Setups:

- `local`: one local worker process holds every request's host KV;
- `local+remote`: the same local worker, whose memory budget (--cpu-attention-memory-gib) is set to hold half the
  requests, plus one remote host (`--cpu-attention-hosts 1` on a local Ray instance), which takes the other half.

Per setup: BE output tokens/s (all output tokens / wall time of the run), and for the remote host the messages and
bytes per iteration that sent it rows (engine -> host: q, k, v rows and swap-outs; host -> engine: attention outputs),
median over --repeats interleaved runs after a warm-up. Greedy tokens must be the same in both setups. On this
machine both pools share two cores with the engine, so the remote host adds processes, not cores: the figure shows
the cost of the remote path, not the gain of a real extra server (the simulator gives that: bench_simulator.py
--hosts).

    python benchmarks/bench_scaleout.py --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from omniserve.bench.report import git_revision, spread
from omniserve.bench.workload import load_prompts


def run_once(llm, prompts: list[list[int]], output_len: int) -> dict:
    from omniserve.sampling.params import SamplingParams

    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True, service_class="be")
    for index, prompt in enumerate(prompts):
        engine.add_request(f"r{index}", prompt, params)
    pool = engine.cpu_pool
    before = pool.remote_traffic()
    iterations = remote_iterations = 0
    tokens: dict[str, list[int]] = {}
    started = time.perf_counter()
    while engine.has_unfinished_requests():
        sent_before = pool.remote_traffic()["messages"]
        for output in engine.step():
            if output.finished:
                tokens[output.request_id] = output.outputs[0].token_ids
        iterations += 1
        remote_iterations += pool.remote_traffic()["messages"] > sent_before
    seconds = time.perf_counter() - started
    after = pool.remote_traffic()
    per = max(1, remote_iterations)
    return {
        "be_tok_s": len(prompts) * output_len / seconds, "seconds": seconds, "iterations": iterations,
        "remote_iterations": remote_iterations,
        "messages_per_iteration": (after["messages"] - before["messages"]) / per,
        "kib_sent_per_iteration": (after["bytes_sent"] - before["bytes_sent"]) / per / 1024,
        "kib_received_per_iteration": (after["bytes_received"] - before["bytes_received"]) / per / 1024,
        "tokens": [tokens[f"r{i}"] for i in range(len(prompts))],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    parser.add_argument("--smoke", action="store_true", help="a tiny run that only checks that the script works")
    args = parser.parse_args()
    if args.smoke:
        args.requests, args.prompt_len, args.output_len, args.repeats = 2, 16, 4, 1

    import ray

    from omniserve.cpu_attention.pool import CPUAttentionPool
    from omniserve.entrypoints.llm import LLM

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    common = dict(be_decode_placement="cpu", max_model_len=1024, cpu_attention_workers=1, threads=1)
    local = LLM(None, **common)
    config = local.engine.model_config
    prompts = load_prompts(local.engine.tokenizer, args.requests, args.prompt_len, config.vocab_size, seed=0)
    per_request = CPUAttentionPool.host_bytes_per_token(config.num_layers, config.num_kv_heads, config.head_dim) * (
        args.prompt_len + 1)
    half = (args.requests // 2) * per_request / 2**30
    remote = LLM(None, **common, cpu_attention_hosts="1", cpu_attention_memory_gib=half)

    setups = {"local": local, "local+remote": remote}
    for llm in setups.values():  # warm-up: starts the workers and the actor, builds the kernel
        run_once(llm, prompts[:2], 4)
    runs: dict[str, list[dict]] = {name: [] for name in setups}
    for repeat in range(args.repeats):
        order = list(setups) if repeat % 2 == 0 else list(reversed(setups))
        for name in order:
            runs[name].append(run_once(setups[name], prompts, args.output_len))
            print(f"repeat {repeat + 1} {name}: {runs[name][-1]['be_tok_s']:.1f} BE tok/s", file=sys.stderr)
    identical = all(r["tokens"] == runs["local"][0]["tokens"] for rs in runs.values() for r in rs)
    hosts_alive = len(remote.engine.cpu_pool.remote_hosts)

    base = statistics.median(r["be_tok_s"] for r in runs["local"])
    lines = [f"- command: `python benchmarks/bench_scaleout.py --requests {args.requests} --prompt-len "
             f"{args.prompt_len} --output-len {args.output_len} --repeats {args.repeats}` at {git_revision()}",
             f"- greedy tokens identical in both setups: {identical}; remote hosts alive: {hosts_alive}",
             "",
             "| setup | BE tok/s | vs local | remote messages / iteration | KiB sent / iteration | "
             "KiB received / iteration |",
             "|---|---|---|---|---|---|"]
    for name, rs in runs.items():
        tok_s = [r["be_tok_s"] for r in rs]
        ratio = statistics.median(tok_s) / base
        if name == "local":
            traffic = "- | - | -"
        else:
            traffic = " | ".join(spread([r[k] for r in rs], "{:.1f}") for k in (
                "messages_per_iteration", "kib_sent_per_iteration", "kib_received_per_iteration"))
        lines.append(f"| {name} | {spread(tok_s, '{:.1f}')} | {ratio:.2f}x | {traffic} |")
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    ray.shutdown()


if __name__ == "__main__":
    main()
