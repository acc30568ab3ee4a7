"""CPU decode-attention kernel: GB/s of KV read against this machine's measured memory read bandwidth.

Each configuration runs one decode step for `requests` requests of `context` tokens each, as a CPU attention worker
does (one call per request, one layer), with the worker's thread count. KV bytes read = requests x context x
2 (K and V) x kv_heads x head_dim x element size. The limit is the read bandwidth of a plain `sum` over a 1 GiB
tensor with the same thread count, measured in the same run. The torch fallback (what runs where the kernel cannot
be compiled) is measured side by side.

    python benchmarks/bench_cpu_attention.py --markdown bench.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from omniserve.bench.machine import read_bandwidth
from omniserve.bench.report import command_line, print_report, write_markdown
from omniserve.cpu_attention.kernel import compiled_kernel, decode_attention_reference, tile_keys

SHAPES = {"smollm2-135m": (9, 3, 64), "llama-3-8b": (32, 8, 128)}  # (heads, kv_heads, head_dim) per layer
COLUMNS = {key: key for key in ("model shape", "context", "requests", "kernel ms", "kernel GB/s", "of bandwidth",
                                "torch GB/s", "kernel/torch")}


def time_step(fn, queries, keys, values, repeats: int) -> list[float]:
    fn(queries[0], keys[0], values[0])
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for q, k, v in zip(queries, keys, values):
            fn(q, k, v)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--requests", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--threads", type=int, default=1, help="threads, as in one CPU attention worker")
    parser.add_argument("--max-kv-gib", type=float, default=3.0, help="skip configurations holding more KV")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bandwidth-gib", type=float, default=1.0, help="size of the bandwidth test tensor")
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--smoke", action="store_true", help="a tiny run that only checks that the script works")
    args = parser.parse_args()
    if args.smoke:
        args.contexts, args.requests, args.repeats, args.bandwidth_gib = [64], [1], 1, 0.01
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    kernel = compiled_kernel()
    if kernel is None:
        sys.exit("the compiled kernel is not available here (see the warning above)")
    bandwidth = statistics.median(read_bandwidth(args.bandwidth_gib, args.repeats))

    rows = []
    for shape in args.shapes:
        heads, kv_heads, dim = SHAPES[shape]
        for context in args.contexts:
            for requests in args.requests:
                kv_bytes = requests * context * 2 * kv_heads * dim * 4
                if kv_bytes > args.max_kv_gib * 2**30:
                    continue
                keys = [torch.randn(kv_heads, context, dim) for _ in range(requests)]
                values = [torch.randn(kv_heads, context, dim) for _ in range(requests)]
                queries = [torch.randn(heads, dim) for _ in range(requests)]
                tiles = [tile_keys(k) for k in keys]
                ours = statistics.median(time_step(kernel.decode_attention, queries, tiles, values, args.repeats))
                ref = statistics.median(time_step(decode_attention_reference, queries, keys, values, args.repeats))
                gbps = kv_bytes / ours / 1e9
                cells = [shape, str(context), str(requests), f"{ours * 1e3:.2f}", f"{gbps:.1f}",
                         f"{gbps / bandwidth:.0%}", f"{kv_bytes / ref / 1e9:.1f}", f"{ref / ours:.1f}x"]
                rows.append(dict(zip(COLUMNS, cells)))
                print(" ".join(cells), file=sys.stderr, flush=True)
                del keys, values, tiles

    info = [
        f"command: `{command_line()}`",
        f"machine: {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} thread(s) (one worker's)",
        f"measured read bandwidth ({args.threads} thread(s), sum over 1 GiB): {bandwidth:.1f} GB/s",
    ]
    print_report(info, [(COLUMNS, rows)])
    write_markdown(args.markdown, "CPU decode-attention kernel", info, [(COLUMNS, rows)])


if __name__ == "__main__":
    main()
