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
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from omniserve.cpu_attention.kernel import compiled_kernel, decode_attention_reference, tile_keys

SHAPES = {"smollm2-135m": (9, 3, 64), "llama-3-8b": (32, 8, 128)}  # (heads, kv_heads, head_dim) per layer


def read_bandwidth(repeats: int) -> list[float]:
    x = torch.ones(2**28, dtype=torch.float32)  # 1 GiB
    x.sum()
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum().item()
        rates.append(x.numel() * 4 / (time.perf_counter() - start) / 1e9)
    return rates


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
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    kernel = compiled_kernel()
    if kernel is None:
        sys.exit("the compiled kernel is not available here (see the warning above)")
    bandwidth = statistics.median(read_bandwidth(args.repeats))

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
                rows.append([shape, str(context), str(requests), f"{ours * 1e3:.2f}", f"{kv_bytes / ours / 1e9:.1f}",
                             f"{kv_bytes / ours / 1e9 / bandwidth:.0%}", f"{kv_bytes / ref / 1e9:.1f}",
                             f"{ref / ours:.1f}x"])
                print(" ".join(rows[-1]), file=sys.stderr, flush=True)
                del keys, values, tiles

    header = ["model shape", "context", "requests", "kernel ms", "kernel GB/s", "of bandwidth", "torch GB/s",
              "kernel/torch"]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = [header, ["-" * w for w in widths], *rows]
    info = [
        f"command: `{shlex.join(['python', *sys.argv])}`",
        f"machine: {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} thread(s) (one worker's)",
        f"measured read bandwidth ({args.threads} thread(s), sum over 1 GiB): {bandwidth:.1f} GB/s",
    ]
    print("\n".join(info) + "\n\n" + "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in lines))
    if args.markdown:
        table = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in lines]
        args.markdown.write_text("\n".join(["## CPU decode-attention kernel", ""] + [f"- {i}" for i in info] + [""]
                                           + table) + "\n")


if __name__ == "__main__":
    main()
