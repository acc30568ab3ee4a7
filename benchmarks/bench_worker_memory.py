"""Does a CPU attention worker's RSS follow the host KV it holds, or grow beyond it?

Builds an in-process `omniserve.LLMEngine` with the default model and `be_decode_placement="cpu"` (every BE
decode runs in the CPU attention pool) and keeps --in-flight BE requests in a closed loop (greedy, EOS ignored,
prompts of --prompt-len (32-512) random token ids, --output-len (64-384) output tokens, seeded) for --minutes. Every
--sample-every seconds it records the workers' RSS (psutil, the pool's worker processes), the host KV they hold
(`cpu_pool.host_kv_bytes()`, a blocking ping), the number of offloaded requests, and RSS minus host KV: what a
worker keeps beyond its live data. No worker is killed. At the end it prints a markdown table and the verdict: over
the last half of the run, the spread (max - min) and the least-squares trend per 10 minutes of RSS minus host KV, as a
% of its mean.

    python benchmarks/bench_worker_memory.py --minutes 8 --sample-every 30
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import psutil

from omniserve import LLMEngine, SamplingParams

GB = 1e9


def worker_rss(engine: LLMEngine) -> int:
    """Summed RSS of the pool's live local worker processes (0 before the first offload)."""
    total = 0
    for pid in engine.cpu_pool.worker_pids():
        if pid is not None:
            try:
                total += psutil.Process(pid).memory_info().rss
            except psutil.NoSuchProcess:
                pass
    return total


def sample(engine: LLMEngine, started: float, label: str = "") -> dict:
    # A worker still starting (spawn, import torch) answers late on a busy machine.
    rss, host_kv = worker_rss(engine), engine.cpu_pool.host_kv_bytes(wait_s=120.0)
    return {"t": (time.monotonic() - started) / 60, "label": label, "rss": rss, "host_kv": host_kv,
            "offloaded": engine.cpu_pool.num_requests, "beyond": rss - host_kv}


def new_request(engine: LLMEngine, args: argparse.Namespace, rng: random.Random, index: int) -> None:
    vocab = engine.model_config.vocab_size
    prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(*args.prompt_len))]
    max_tokens = rng.randint(*args.output_len)
    params = SamplingParams(service_class="be", temperature=0, ignore_eos=True, max_tokens=max_tokens)
    engine.add_request(f"be-{index}", prompt, params)


def drive(engine: LLMEngine, args: argparse.Namespace) -> tuple[list[dict], int]:
    """The closed loop; returns the samples (the last one taken once the engine has drained) and requests done."""
    rng, started = random.Random(args.seed), time.monotonic()
    samples, sent, done = [], 0, 0
    for sent in range(args.in_flight):
        new_request(engine, args, rng, sent)
    sent = args.in_flight
    end, next_sample = started + args.minutes * 60, started + args.sample_every
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                done += 1
                if time.monotonic() < end:
                    new_request(engine, args, rng, sent)
                    sent += 1
        if time.monotonic() >= next_sample and time.monotonic() < end:
            samples.append(sample(engine, started))
            print(fmt_row(samples[-1]), flush=True)
            next_sample += args.sample_every
    for _ in range(20):  # idle steps let the worker trim once it holds nothing
        engine.step()
    time.sleep(1.0)
    samples.append(sample(engine, started, "drained"))
    return samples, done


def trend(values: list[float], times: list[float]) -> float:
    """Least-squares slope per 10 minutes (times in minutes)."""
    mt, mv = statistics.fmean(times), statistics.fmean(values)
    den = sum((t - mt) ** 2 for t in times)
    return 0.0 if den == 0 else 10 * sum((t - mt) * (v - mv) for t, v in zip(times, values)) / den


def fmt_row(s: dict) -> str:
    return (f"| {s['t']:.1f} {s['label']} | {s['rss'] / GB:.3f} | {s['host_kv'] / GB:.3f} | {s['offloaded']} "
            f"| {s['beyond'] / GB:.3f} |")


def report(samples: list[dict], done: int, seconds: float) -> None:
    print("\n| t (min) | worker RSS GB | host KV GB | offloaded | RSS - host KV GB |\n|---|---|---|---|---|")
    for s in samples:
        print(fmt_row(s))
    loaded = [s for s in samples if not s["label"]]
    half = loaded[len(loaded) // 2:]
    times = [s["t"] for s in half]
    print(f"\n{done} requests finished in {seconds / 60:.1f} min; last half: {len(half)} samples, "
          f"{times[0]:.1f}-{times[-1]:.1f} min\n")
    print("| last half | mean GB | spread (max-min) % of mean | trend per 10 min % of mean |\n|---|---|---|---|")
    for key, name in (("rss", "worker RSS"), ("host_kv", "host KV"), ("beyond", "RSS - host KV")):
        values = [s[key] / GB for s in half]
        mean = statistics.fmean(values)
        if not mean:  # nothing held yet (no worker started): no share of it to give
            print(f"| {name} | {mean:.3f} | - | - |")
            continue
        print(f"| {name} | {mean:.3f} | {100 * (max(values) - min(values)) / mean:.1f}% "
              f"| {100 * trend(values, times) / mean:+.1f}% |")
    pairs = [(s["rss"], s["host_kv"]) for s in loaded]
    if len(pairs) > 2 and all(len({p[i] for p in pairs}) > 1 for i in (0, 1)):  # no correlation of a constant
        print(f"\ncorrelation of worker RSS with host KV (all loaded samples): "
              f"{statistics.correlation(*zip(*pairs)):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=8.0)
    parser.add_argument("--sample-every", type=float, default=30.0)
    parser.add_argument("--in-flight", type=int, default=20)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--prompt-len", type=int, nargs=2, default=(32, 512), metavar=("MIN", "MAX"))
    parser.add_argument("--output-len", type=int, nargs=2, default=(64, 384), metavar=("MIN", "MAX"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="a tiny run that only checks that the script works")
    args = parser.parse_args()
    if args.smoke:
        args.minutes, args.sample_every, args.in_flight = 0.25, 2.0, 2
        args.prompt_len, args.output_len, args.max_model_len = (16, 32), (4, 8), 256
    engine = LLMEngine(be_decode_placement="cpu", max_model_len=args.max_model_len)
    started = time.monotonic()
    samples, done = drive(engine, args)
    report(samples, done, time.monotonic() - started)


if __name__ == "__main__":
    main()
