"""Decode iteration time on a CUDA device, this checkout against another (an older revision's omniserve/ folder)
in the same run: what the runner's per-iteration work on the host (decode metadata, offloaded rows' transfers)
costs next to the GPU's work.

Random weights of a known model shape (--model, bf16), --batch best-effort requests of --context prompt tokens each,
greedy, EOS ignored. Placement `device`: every request decodes on the GPU. Placement `cpu`: every request is
offloaded to the CPU attention pool after its prefill, so each iteration carries the offloaded rows re-entering
the batch at their layers (one host-to-device transfer of attention results per row before, one per iteration
now). Once every request has its first token and the placement has settled (2 x layers iterations), --steps
engine iterations are timed one by one; the figure is the median, and the ratio is this checkout / the other.

    python benchmarks/bench_cuda_decode.py --other /path/to/old/checkout   (on a machine with a CUDA device)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def measure(model: str, placement: str, batch: int, context: int, steps: int, device: str = "cuda") -> dict:
    """One configuration in this process: the median and p90 step time in ms, and how many rows ran."""
    import torch

    from omniserve import LLMEngine, SamplingParams

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    engine = LLMEngine(model=model, load_format="dummy", device=device, dtype="bfloat16", max_model_len=4096,
                       max_num_seqs=max(batch, 8), be_decode_placement=placement, cpu_attention_workers=4,
                       cpu_attention_threads=2)
    settle = 2 * engine.model_config.num_layers
    params = SamplingParams(max_tokens=settle + steps + 64, ignore_eos=True, temperature=0.0, service_class="be")
    for i in range(batch):
        engine.add_request(f"r{i}", [1000 + (i * 7 + j) % 20000 for j in range(context)], params)
    started = time.perf_counter()
    while engine.scheduler.waiting or any(r.num_output_tokens == 0 for r in engine.scheduler.requests.values()):
        engine.step()
        if time.perf_counter() - started > 300:
            raise RuntimeError("prefill did not end within 300 s")
    for _ in range(settle):
        engine.step()
    times = []
    for _ in range(steps):
        sync()
        begin = time.perf_counter()
        engine.step()
        sync()
        times.append(time.perf_counter() - begin)
    offloaded = len(engine.scheduler.offloaded)
    engine.shutdown()
    times.sort()
    return {"median_ms": 1e3 * statistics.median(times), "p90_ms": 1e3 * times[int(0.9 * (len(times) - 1))],
            "offloaded": offloaded}


def run_in(checkout: Path, config: dict) -> dict:
    """measure() in a fresh process that imports omniserve from `checkout`."""
    env = dict(os.environ, PYTHONPATH=str(checkout))
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_cuda_decode as b; "
            f"print('RESULT', json.dumps(b.measure(**{config!r})))")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"{checkout} {config} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--other", type=Path, required=True, help="root of the checkout to compare with")
    parser.add_argument("--model", default="llama-3-8b")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--placements", nargs="+", default=["device", "cpu"])
    parser.add_argument("--device", default="cuda", help="cpu: a smoke test of this script on a machine without one")
    args = parser.parse_args()
    print("| placement | batch | offloaded | this: median (p90) ms | other: median (p90) ms | this / other |")
    print("|---|---|---|---|---|---|")
    for placement in args.placements:
        for batch in args.batch:
            config = dict(model=args.model, placement=placement, batch=batch, context=args.context, steps=args.steps,
                          device=args.device)
            this, other = run_in(ROOT, config), run_in(args.other, config)
            ratio = this["median_ms"] / other["median_ms"]
            print(f"| {placement} | {batch} | {this['offloaded']} | {this['median_ms']:.2f} ({this['p90_ms']:.2f}) "
                  f"| {other['median_ms']:.2f} ({other['p90_ms']:.2f}) | {ratio:.2f} |", flush=True)


if __name__ == "__main__":
    main()
