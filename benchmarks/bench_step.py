"""The decode step against its floors, fused against eager, in one run.

1. The GPU path at Llama-3-8B's shapes, on the meta device (omniserve.bench.step_ops): kernels launched per layer
   and per step, copies in from the host, waits for the device. No GPU needed.
2. Host time per step: a 32-layer model of tiny width on the CPU, where the arithmetic is nothing and the step is
   the dispatch and Python overhead a GPU step pays on its host: fused operators against the same model with the
   operators' plain-torch meaning (ops/reference.py) and the residual added after each GEMM (the eager path); and
   the graph's forward run eagerly (the CPU engine's decode path: each layer's tensors fetched once, no per-layer
   bookkeeping); and the host work around a decode graph's replay (its inputs filled, its rows sampled), the replay
   itself being one launch on a GPU, which cannot be timed here.
3. A decode graph's inputs at batch 16, 64 and 256 of 2k tokens each: every row written whole, the steady state
   (page tables updated in place) and one request finished (later rows moved).
4. This machine, the default model (SmolLM2-135M, fp32): engine decode steps at --batches, the engine's decode
   path (fused operators, engine/graphs.py's forward) and eager (plain-torch operators, --enforce-eager)
   interleaved, against the weight-read floor (weight bytes / read bandwidth measured here) and, where larger, the
   compute floor (the step's GEMM FLOPs / the GEMM peak measured here with the engine's GEMM).

    python benchmarks/bench_step.py --batches 1 16 --markdown step.md
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import torch

from omniserve.bench.machine import read_bandwidth
from omniserve.bench.report import command_line, cpu_model, print_report, spread, write_markdown
from omniserve.bench.step_ops import decode_plan, ops_per_layer, preset_config
from omniserve.config import ModelConfig
from omniserve.engine.graphs import DecodeGraphs
from omniserve.engine.runner import ModelRunner
from omniserve.kv_cache import page_pool
from omniserve.models import llama
from omniserve.models.linear import linear
from omniserve.ops import reference

TENTHS = "{:.1f}"


@contextlib.contextmanager
def eager_path(runner: ModelRunner | None = None):
    """The model with each fused operator as its plain-torch meaning and each residual added after its GEMM; with a
    runner, also without its decode path (as --enforce-eager runs)."""
    eager = SimpleNamespace(**{name: getattr(reference, name) for name in
                               ("rms_norm", "rope_", "silu_and_mul", "store_kv")})

    def linear_then_add(x, weight, bias=None, residual=None):
        out = linear(x, weight, bias)
        return out if residual is None else out + residual

    graphs = None if runner is None else runner.graphs
    with mock.patch.object(llama, "ops", eager), mock.patch.object(page_pool, "ops", eager), \
            mock.patch.object(llama, "linear", linear_then_add):
        if runner is not None:
            runner.graphs = None
        try:
            yield
        finally:
            if runner is not None:
                runner.graphs = graphs


def gpu_path_rows(batches: list[int], context: int) -> list[dict]:
    rows = []
    for batch in batches:
        per_layer, step = ops_per_layer(preset_config("llama-3-8b"), batch, context)
        rows.append(dict(batch=batch, layer_ops=f"{per_layer:.0f}", limit="12", step_ops_2_layers=step.ops,
                         copies_in=step.host_copies, waits=step.device_waits))
    return rows


def _timed_steps(step, count: int) -> list[float]:
    times = []
    for _ in range(count):
        started = time.perf_counter()
        step()
        times.append((time.perf_counter() - started) * 1e3)
    return times


@torch.inference_mode()
def host_time_rows(batch: int, steps: int, repeats: int) -> list[dict]:
    config = ModelConfig(architecture="LlamaForCausalLM", hidden_size=64, intermediate_size=128, num_layers=32,
                         num_heads=4, num_kv_heads=2, head_dim=16, vocab_size=256)
    context, page_size = 64, 16
    model = llama.LlamaForCausalLM(config, max_positions=context + 1)
    pool = page_pool.PagePool(config, batch * (context // page_size + 1), page_size, torch.device("cpu"),
                              torch.float32)
    for layer in pool.k + pool.v:
        layer.zero_()
    runner = ModelRunner(model, pool, torch.device("cpu"))
    plan = decode_plan(batch, context, page_size)
    graphs = DecodeGraphs(model, pool, torch.device("cpu"), batch, context + 1, capture=False)
    decode_path = DecodeGraphs(model, pool, torch.device("cpu"), batch, context + 1, capture=False, pad=False)
    fused, eager, around_replay, eager_forward = [], [], [], []
    for _ in range(repeats):  # interleaved, so that a change in the machine's load reaches both alike
        fused.append(statistics.median(_timed_steps(lambda: runner.execute(plan), steps)))
        with eager_path():
            eager.append(statistics.median(_timed_steps(lambda: runner.execute(plan), steps)))
        # A replayed step's host work: its inputs filled (one copy) and its rows sampled; the replay is one launch.
        graphs._fill(plan.chunks, batch)
        hidden = graphs.forward(batch)
        around_replay.append(statistics.median(_timed_steps(
            lambda: (graphs._fill(plan.chunks, batch), runner._sample(plan, hidden, [], None)), steps)))
        # The graph's forward run eagerly (the CPU's decode path; a GPU with --enforce-eager runs the runner's).
        eager_forward.append(statistics.median(_timed_steps(
            lambda: runner._sample(plan, decode_path.run(plan.chunks), [], None), steps)))
    return [dict(batch=batch, path="fused, eager", ms=spread(fused, "{:.2f}"), eager_ms=spread(eager, "{:.2f}"),
                 over_eager=spread([f / e for f, e in zip(fused, eager)]), goal="<= 0.33"),
            dict(batch=batch, path="graph's forward, eager", ms=spread(eager_forward, "{:.2f}"),
                 eager_ms=spread(eager, "{:.2f}"), over_eager=spread([f / e for f, e in zip(eager_forward, eager)]),
                 goal="<= 0.33"),
            dict(batch=batch, path="around a graph replay", ms=spread(around_replay, "{:.2f}"),
                 eager_ms=spread(eager, "{:.2f}"), over_eager=spread([a / e for a, e in zip(around_replay, eager)]),
                 goal="<= 0.33")]


@torch.inference_mode()
def input_fill_rows(batches: list[int], context: int, repeats: int) -> list[dict]:
    """Host time of a decode graph's inputs (token ids, positions, slots, page tables) for a batch at `context`
    tokens each: every row written whole (a new batch) against the steady state (rows unchanged or one page more)
    and one request finished (every later row moves up)."""
    config = ModelConfig(architecture="LlamaForCausalLM", hidden_size=64, intermediate_size=128, num_layers=1,
                         num_heads=4, num_kv_heads=2, head_dim=16, vocab_size=256)
    page_size, rows = 16, []
    for batch in batches:
        model = llama.LlamaForCausalLM(config, max_positions=context + 1)
        pool = page_pool.PagePool(config, batch * (context // page_size + 1), page_size, torch.device("cpu"),
                                  torch.float32)
        graphs = DecodeGraphs(model, pool, torch.device("cpu"), batch, context + 1, capture=False, pad=False)
        chunks = decode_plan(batch, context, page_size).chunks
        whole, steady, moved = [], [], []
        for _ in range(repeats):
            whole.append(statistics.median(_timed_steps(
                lambda: (graphs.__setattr__("_placed", {}), graphs._fill(chunks, batch)), 5)))
            steady.append(statistics.median(_timed_steps(lambda: graphs._fill(chunks, batch), 20)))
            times = []
            for _ in range(5):
                graphs._fill(chunks, batch)
                times += _timed_steps(lambda: graphs._fill(chunks[1:], batch), 1)
            moved.append(statistics.median(times))
        rows.append(dict(batch=batch, context=context, whole=spread(whole, "{:.2f}"),
                         steady=spread(steady, "{:.2f}"), moved=spread(moved, "{:.2f}"),
                         ratio=spread([st / w for st, w in zip(steady, whole)])))
    return rows


def _engine_with_decodes(batch: int, prompt_len: int, output_len: int, dtype: str = "float32"):
    from omniserve import LLM, SamplingParams

    llm = LLM(max_num_seqs=max(batch, 1), dtype=dtype)
    engine = llm.engine
    params = SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=0.0)
    for i in range(batch):
        engine.add_request(f"r{i}", list(range(100 + i, 100 + i + prompt_len)), params)
    started: set[str] = set()  # requests past their prompt: every later step decodes them all
    while len(started) < batch:
        started.update(out.request_id for out in engine.step() if out.outputs[0].token_ids)
    return llm, engine


def floors(model: torch.nn.Module) -> tuple[int, int, float, float]:
    """(weight bytes read per step, GEMM parameters, read GB/s, GEMM peak GFLOP/s), measured here."""
    weights = [p for p in model.parameters() if p.dim() == 2]
    weight_bytes = sum(p.numel() * p.element_size() for p in weights)
    gemm_params = sum(p.numel() for p in weights)  # the tied embedding is read once, as the LM head
    bandwidth = statistics.median(read_bandwidth(1.0, 5))
    x, w = torch.randn(512, 1536, dtype=weights[0].dtype), torch.randn(1536, 1536, dtype=weights[0].dtype)
    linear(x, w)
    started = time.perf_counter()
    for _ in range(10):
        linear(x, w)
    peak = 10 * 2 * 512 * 1536 * 1536 / (time.perf_counter() - started) / 1e9
    return weight_bytes, gemm_params, bandwidth, peak


def cpu_step_rows(batches: list[int], steps: int, repeats: int, dtype: str = "float32"
                  ) -> tuple[list[dict], list[str]]:
    rows, info = [], []
    for batch in batches:
        llm, engine = _engine_with_decodes(batch, prompt_len=64, output_len=steps * repeats * 2 + 8, dtype=dtype)
        weight_bytes, gemm_params, bandwidth, peak = floors(engine.runner.model)
        read_floor = weight_bytes / bandwidth / 1e6
        compute_floor = 2 * batch * gemm_params / peak / 1e6
        floor = max(read_floor, compute_floor)
        fused, eager = [], []
        for _ in range(repeats):
            fused.append(statistics.median(_timed_steps(engine.step, steps)))
            with eager_path(engine.runner):
                eager.append(statistics.median(_timed_steps(engine.step, steps)))
        rows.append(dict(batch=batch, step_ms=spread(fused, TENTHS), eager_ms=spread(eager, TENTHS),
                         fused_over_eager=spread([f / e for f, e in zip(fused, eager)]),
                         floor_ms=f"{floor:.1f} ({'read' if read_floor >= compute_floor else 'compute'})",
                         step_over_floor=f"{statistics.median(fused) / floor:.2f}", goal="<= 1.3"))
        info.append(f"batch {batch} ({dtype}): weights {weight_bytes / 1e6:.0f} MB read at {bandwidth:.1f} GB/s -> "
                    f"{read_floor:.1f} ms; {2 * batch * gemm_params / 1e9:.2f} GFLOP at a GEMM peak of "
                    f"{peak:.0f} GFLOP/s -> {compute_floor:.1f} ms")
        del llm, engine
    return rows, info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--steps", type=int, default=20, help="engine steps per timed run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each path, interleaved")
    parser.add_argument("--context", type=int, default=1024, help="context of the meta-device steps")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="the default model's dtype in the CPU step rows")
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--smoke", action="store_true", help="a tiny run (the test suite's)")
    args = parser.parse_args()
    if args.smoke:
        args.batches, args.steps, args.repeats = [1], 2, 1
    gpu_rows = gpu_path_rows([1, 16, 64], args.context)
    host_rows = host_time_rows(1, args.steps * 5, args.repeats)
    fill_rows = input_fill_rows([16] if args.smoke else [16, 64, 256], 2048, args.repeats)
    cpu_rows, info = cpu_step_rows(args.batches, args.steps, args.repeats, args.dtype)
    info = [f"command: {command_line()}", f"CPU: {cpu_model()}, torch threads {torch.get_num_threads()}", *info]
    tables = [
        (dict(batch="batch", layer_ops="ops/layer", limit="goal", step_ops_2_layers="ops (2-layer step)",
              copies_in="copies in", waits="waits for device"), gpu_rows),
        (dict(batch="batch", path="host work of a step", ms="ms", eager_ms="eager ms", over_eager="/ eager",
              goal="goal"), host_rows),
        (dict(batch="batch", context="context", whole="every row whole ms", steady="steady ms",
              moved="one finished ms", ratio="steady / whole"), fill_rows),
        (dict(batch="batch", step_ms="step ms", eager_ms="eager ms", fused_over_eager="fused/eager",
              floor_ms="floor ms", step_over_floor="step/floor", goal="goal"), cpu_rows),
    ]
    print_report(info, tables)
    write_markdown(args.markdown, "Decode step against its floors", info, tables)


if __name__ == "__main__":
    main()
