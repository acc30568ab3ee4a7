"""The CPU GEMM's row padding (omniserve/models/linear.py) against oneDNN on the exact row count, in one run.

Two cases, each on the default model's dense shapes (SmolLM2-135M: 576 -> 576, 576 -> 1536, 1536 -> 576, fp32):
- varying rows: a new row count every step, drawn from 1..--max-rows (a serving engine's batches), where the exact
  path compiles a kernel for each new count and the padded one reuses a few;
- fixed rows: the same count every step, just past a padding boundary (the worst case for padding: up to 1/8 more
  rows and nothing to compile either way).
Prints each case's median seconds per step over --repeats runs and the padded/exact ratio. Decode batches (up to
16 fp32 rows) take the project's own kernel in the engine (bench_decode_gemm.py); here every row count takes oneDNN.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from omniserve.models import linear as linear_module
from omniserve.models.linear import _onednn_linear, linear, onednn_supports, padded_rows

SHAPES = [(576, 576), (1536, 576), (576, 1536)]  # (out, in) of q/o, gate/up, down


def time_steps(gemm, rows_per_step: list[int], weights) -> float:
    """Median seconds of one step (every weight shape once) over the given row counts."""
    times = []
    for rows in rows_per_step:
        xs = [torch.randn(rows, w.shape[1]) for w in weights]
        started = time.perf_counter()
        for x, w in zip(xs, weights):
            gemm(x, w, None)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-rows", type=int, default=600)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="a tiny run that only checks that the script works")
    args = parser.parse_args()
    if args.smoke:
        args.max_rows, args.steps, args.repeats = 8, 2, 1
    if not onednn_supports(torch.float32):
        raise SystemExit("oneDNN has no fp32 GEMM on this CPU: nothing is padded here")
    torch.set_num_threads(1)
    linear_module.SKINNY_MAX_ROWS = {}  # oneDNN padded against oneDNN exact, at every row count
    weights = [torch.randn(out, inp) for out, inp in SHAPES]
    rng = random.Random(args.seed)
    cases = {"varying 1..%d" % args.max_rows: lambda: [rng.randint(1, args.max_rows) for _ in range(args.steps)]}
    for rows in (17, 129, 257):  # each just past a boundary: padded to 18, 144, 288
        cases[f"fixed {rows} (padded to {padded_rows(rows)})"] = lambda rows=rows: [rows] * args.steps
    print("| case | exact ms/step | padded ms/step | padded / exact |\n|---|---|---|---|")
    for name, make_rows in cases.items():
        exact, padded = [], []
        for _ in range(args.repeats):  # alternate, so that drift on a shared machine hits both
            exact.append(time_steps(_onednn_linear, make_rows(), weights))
            padded.append(time_steps(linear, make_rows(), weights))
        e, p = statistics.median(exact), statistics.median(padded)
        print(f"| {name} | {e * 1e3:.3f} | {p * 1e3:.3f} | {p / e:.2f}x |")


if __name__ == "__main__":
    main()
