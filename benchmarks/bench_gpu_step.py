"""The decode step on a GPU: memory-bandwidth utilisation (MBU), graphs against eager, host syncs, in one run.

Random weights of --model (default Llama-3-8B, bf16), --batches of greedy requests with --context-token prompts.
Once every request decodes, --steps engine steps are timed at each batch size, in two engines built one after the
other: decode graphs (the default) and --enforce-eager. Per step:
- MBU: bytes the step must read (every weight once, plus each row's KV) / step time / the device's copy bandwidth
  measured here (a device-to-device copy, bytes read + written / time): the share of the memory floor reached;
- host syncs: what torch's sync debug mode reports during the timed steps (one per step is the sampled ids);
- ops launched per layer: the same step on the meta device (omniserve.bench.step_ops), which needs no GPU.

    python benchmarks/bench_gpu_step.py                     (on a machine with a CUDA device; benchmarks/gpu_check.sh)
    python benchmarks/bench_gpu_step.py --smoke             (a tiny run on the CPU: the test suite's)
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
import warnings
from pathlib import Path

import torch

from omniserve.bench.report import command_line, print_report, spread, write_markdown
from omniserve.bench.step_ops import ops_per_layer, preset_config
from omniserve.models.presets import PRESETS


def copy_bandwidth(device: torch.device) -> float:
    """GB/s of a 1 GiB device-to-device copy, bytes read and written (the floor's limit)."""
    if device.type != "cuda":
        return float("nan")
    x = torch.empty(2**28, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize(device)
    return 10 * 2 * x.numel() * 4 / (time.perf_counter() - started) / 1e9


def _decoding_engine(args, batch: int, enforce_eager: bool):
    from omniserve import LLMEngine, SamplingParams

    engine = LLMEngine(model=args.model, load_format="dummy", device=args.device, dtype=args.dtype,
                       max_model_len=args.context + args.steps + 64, max_num_seqs=max(args.batches),
                       enforce_eager=enforce_eager, be_decode_placement="device")
    params = SamplingParams(max_tokens=args.steps + 32, ignore_eos=True, temperature=0.0)
    for i in range(batch):
        engine.add_request(f"r{i}", [1000 + (i * 7 + j) % 20000 for j in range(args.context)], params)
    started: set[str] = set()
    while len(started) < batch:
        started.update(out.request_id for out in engine.step() if out.outputs[0].token_ids)
    return engine


def _timed(engine, steps: int) -> tuple[list[float], int]:
    """(ms of each step, host syncs reported during them)."""
    times = []
    sync_debug = engine.device.type == "cuda"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if sync_debug:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                started = time.perf_counter()
                engine.step()
                times.append((time.perf_counter() - started) * 1e3)
        finally:
            if sync_debug:
                torch.cuda.set_sync_debug_mode("default")
    return times, sum("synchroniz" in str(w.message) for w in caught)


def step_bytes(engine, batch: int, context: int) -> int:
    weights = sum(p.numel() * p.element_size() for p in engine.runner.model.parameters() if p.dim() == 2)
    c = engine.model_config
    kv = 2 * c.num_layers * c.num_kv_heads * c.head_dim * engine.pool.k[0].element_size() * batch * context
    return weights + kv


def run(args) -> tuple[list[dict], list[str]]:
    device = torch.device(args.device)
    bandwidth = copy_bandwidth(device)
    rows = []
    for batch in args.batches:
        figures = {}
        for mode, eager in (("graphs", False), ("eager", True)):
            engine = _decoding_engine(args, batch, eager)
            times, syncs = _timed(engine, args.steps)
            figures[mode] = (statistics.median(times), times, syncs, step_bytes(engine, batch, args.context))
            engine.shutdown()
            del engine
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        graph_ms, graph_times, graph_syncs, moved = figures["graphs"]
        eager_ms, _, eager_syncs, _ = figures["eager"]
        floor_ms = moved / bandwidth / 1e6
        per_layer, _ = ops_per_layer(preset_config(args.model), batch, args.context)
        rows.append(dict(batch=batch, graph_ms=spread(graph_times, "{:.2f}"), eager_ms=f"{eager_ms:.2f}",
                         graph_over_eager=f"{graph_ms / eager_ms:.2f}", floor_ms=f"{floor_ms:.2f}",
                         mbu=f"{floor_ms / graph_ms:.0%}", syncs=f"{graph_syncs / args.steps:.1f} / "
                         f"{eager_syncs / args.steps:.1f}", layer_ops=f"{per_layer:.0f}"))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    info = [f"command: {command_line()}", f"device: {name}, torch {torch.__version__}, copy bandwidth "
            f"{bandwidth:.0f} GB/s (read + written)", f"model: random {args.model} {args.dtype}, {args.context}-token "
            f"prompts, {args.steps} timed steps per figure"]
    return rows, info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-3-8b", choices=sorted(PRESETS))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--smoke", action="store_true", help="a tiny run on the CPU (the test suite's)")
    args = parser.parse_args()
    if args.smoke:
        args.model, args.device, args.dtype, args.batches, args.context, args.steps = (
            "smollm2-135m", "cpu", "float32", [2], 32, 2)
    rows, info = run(args)
    columns = dict(batch="batch", graph_ms="graph ms", eager_ms="eager ms", graph_over_eager="graph/eager",
                   floor_ms="floor ms", mbu="MBU", syncs="syncs/step (graph / eager)", layer_ops="ops/layer")
    print_report(info, [(columns, rows)])
    write_markdown(args.markdown, "Decode step on a GPU", info, [(columns, rows)])


if __name__ == "__main__":
    main()
