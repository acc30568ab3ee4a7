"""A decode step's GEMMs on the CPU: the project's kernel (ops.skinny_linear) against oneDNN and torch's GEMM, in
one run, over a whole step's weights, so that every weight comes from memory as it does in the engine.

The weights are the default model's shapes (SmolLM2-135M: 30 layers of QKV 576->960, O 576->576, gate-up 576->3072, down
1536->576, then the LM head 576->49152), random, 538 MB in fp32 (--dtype; 269 MB in bf16). For each row count, each GEMM
runs the whole step --repeats times, interleaved with the others (so that drift on a shared machine hits all alike); the
best step is kept. Printed: ms per step, the read bandwidth it reached as a share of the machine's (a 1 GiB sum), the
GEMM throughput as a share of the GEMM peak (oneDNN at 512 rows), and skinny_linear against oneDNN. In bf16, oneDNN
also on the weights' copies in its own layout (what the engine keeps: models/linear.py's pack_for_onednn), and
the LM head alone with fp32 logits (skinny_linear's float_out, models/linear.py's linear_float_out) against oneDNN's
bf16 output widened to fp32.

    python benchmarks/bench_decode_gemm.py --rows 1 4 16 32 [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from omniserve import ops
from omniserve.bench.machine import read_bandwidth
from omniserve.bench.report import command_line, cpu_model, print_report
from omniserve.models.linear import PACKED, _onednn_linear, onednn_supports, pack_for_onednn

LAYER_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # (out, in): QKV, O, gate-up, down
LM_HEAD = (49152, 576)


def step_weights(layers: int, dtype: torch.dtype) -> list[torch.Tensor]:
    return [torch.randn(*shape, dtype=dtype) for shape in LAYER_SHAPES * layers + [LM_HEAD]]


def best_step_seconds(gemm, weights: list[torch.Tensor], rows: int) -> float:
    inputs = {width: torch.randn(rows, width, dtype=weights[0].dtype) for width in {w.shape[1] for w in weights}}
    started = time.perf_counter()
    for weight in weights:
        gemm(inputs[weight.shape[1]], weight)
    return time.perf_counter() - started


def gemm_peak(dtype: torch.dtype = torch.float32) -> float:
    """GFLOP/s of oneDNN's GEMM at 512 x 1536 x 1536 (the figure bench_step.py's compute floor uses)."""
    x, w = torch.randn(512, 1536, dtype=dtype), torch.randn(1536, 1536, dtype=dtype)
    _onednn_linear(x, w, None)
    started = time.perf_counter()
    for _ in range(10):
        _onednn_linear(x, w, None)
    return 10 * 2 * 512 * 1536 * 1536 / (time.perf_counter() - started) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--smoke", action="store_true", help="a tiny run (the test suite's)")
    args = parser.parse_args()
    if args.smoke:
        args.rows, args.layers, args.repeats = [1, 3], 1, 1
    dtype = getattr(torch, args.dtype)
    if not ops.CPU_KERNELS_BUILT or not onednn_supports(dtype):
        print(f"nothing to compare: this needs the project's extension and oneDNN's {args.dtype} GEMM")
        return
    torch.manual_seed(0)
    weights = step_weights(args.layers, dtype)
    weight_bytes = sum(w.numel() * w.element_size() for w in weights)
    bandwidth = statistics.median(read_bandwidth(1.0, 5))
    peak = gemm_peak(dtype)
    gemms = {"skinny_linear": lambda x, w: ops.skinny_linear(x, w, None, None),
             "oneDNN": lambda x, w: _onednn_linear(x, w, None), "torch": F.linear}
    if dtype == torch.bfloat16:  # the copies in oneDNN's layout that the engine keeps (linear.pack_for_onednn)
        pack_for_onednn(weights)
        gemms["oneDNN packed"] = lambda x, w: _onednn_linear(x, getattr(w, PACKED), None)
    rows_out = []
    with torch.inference_mode():
        for rows in args.rows:
            best = {name: float("inf") for name in gemms}
            for _ in range(args.repeats + 1):  # the first round warms up (oneDNN compiles its kernels)
                for name, gemm in gemms.items():
                    best[name] = min(best[name], best_step_seconds(gemm, weights, rows))
            flops = 2 * rows * sum(w.numel() for w in weights)
            for name, seconds in best.items():
                rows_out.append(dict(rows=rows, gemm=name, ms=f"{seconds * 1e3:.1f}",
                                     read=f"{weight_bytes / seconds / 1e9 / bandwidth:.2f}",
                                     compute=f"{flops / seconds / 1e9 / peak:.2f}",
                                     vs_onednn=f"{best['oneDNN'] / seconds:.2f}"))
    sections = [(dict(rows="rows", gemm="GEMM", ms="ms/step", read="of read bandwidth", compute="of GEMM peak",
                      vs_onednn="speed vs oneDNN"), rows_out)]
    if dtype == torch.bfloat16:
        sections.append((dict(rows="rows", float_out="LM head, fp32 logits: ms", onednn="oneDNN bf16 + widen: ms",
                              ratio="time vs oneDNN"), lm_head_rows(weights[-1], args.rows, args.repeats)))
    info = [f"command: {command_line()}", f"CPU: {cpu_model()}, torch threads {torch.get_num_threads()}",
            f"weights {weight_bytes / 1e6:.0f} MB ({args.dtype}); read bandwidth {bandwidth:.1f} GB/s; "
            f"GEMM peak {peak:.0f} GFLOP/s"]
    print_report(info, sections)


def lm_head_rows(weight: torch.Tensor, row_counts: list[int], repeats: int) -> list[dict]:
    """The LM head's best time with fp32 logits straight from skinny_linear's sums, against oneDNN's bf16 output
    widened, by row count."""
    out = []
    for rows in row_counts:
        x = torch.randn(rows, weight.shape[1], dtype=weight.dtype)
        gemms = {"float_out": lambda: ops.skinny_linear(x, weight, None, None, True),
                 "onednn": lambda: _onednn_linear(x, weight, None).float()}
        best = {name: float("inf") for name in gemms}
        for _ in range(3 * repeats + 1):
            for name, gemm in gemms.items():
                started = time.perf_counter()
                gemm()
                best[name] = min(best[name], time.perf_counter() - started)
        out.append(dict(rows=rows, float_out=f"{best['float_out'] * 1e3:.2f}", onednn=f"{best['onednn'] * 1e3:.2f}",
                        ratio=f"{best['float_out'] / best['onednn']:.2f}"))
    return out


if __name__ == "__main__":
    main()
