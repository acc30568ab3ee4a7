"""The dense layers' GEMM, with faster CPU paths.

On the CPU, an fp32 GEMM of up to 16 rows (a decode batch) is the project's own kernel (ops.skinny_linear): at
those row counts the work is reading the weight once, and that kernel streams it at the machine's read bandwidth at
one row (it asks for the next weight rows ahead of the reads), 1.2-1.6x as fast as oneDNN from 1 to 16 rows
(BENCHMARKS.md). Above 16 rows oneDNN's blocked GEMM is as fast or faster. A bf16 GEMM of up to 4 rows is the same
kernel (where the CPU has AVX-512 BF16); above, oneDNN's (with AMX where the CPU has it), on a copy of the weight in
its own layout: given the weight as it is, oneDNN reorders it on every call, which cost a step of 16 rows 23 ms of
GEMMs against 14.8 on the copy (pack_for_onednn).

Other CPU GEMMs (fp32 above 16 rows, bf16 above 4) go through oneDNN (the kernels torch.compile's CPU backend uses)
rather than the default BLAS: on the machines we measured it is about twice as fast for every batch size from 1 row to
2,048 (BENCHMARKS.md). Anything else (CUDA, fp64, a torch build without oneDNN, weights under 64K elements) takes
F.linear.

Whether oneDNN has a kernel for a dtype depends on the CPU, not on torch: its bf16 inner product needs AVX-512
(an AVX2-only CPU has none, and every call would fail). So each dtype is tried once on a tiny GEMM, and where oneDNN
cannot run it, F.linear (torch's own GEMM, which works on any CPU) does instead.

oneDNN builds (JIT-compiles) a kernel for every GEMM shape, and keeps the latest 1,024 in a cache, about 0.6 MB each
on this model whatever the shape. A serving engine's row count changes every iteration (decode rows plus prefill
chunks), so without care the cache fills with one-off shapes: 600 MB of host memory, then a steady churn of
evictions and ~1 ms compilations that fragments the heap, so that a server's RSS kept growing under load
(BENCHMARKS.md, soak). Rows are therefore padded to a few sizes: exact up to 16, then 8 sizes per power of two
(at most 1/8 more rows). That bounds the kernels to about 70 per weight shape for 2,048 rows, which the cache
keeps for good.

Where the project's extension is not built, the small fp32 GEMMs go to oneDNN as well.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from omniserve import ops

logger = logging.getLogger(__name__)

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@functools.cache
def onednn_supports(dtype: torch.dtype) -> bool:
    """Whether oneDNN runs a `dtype` GEMM on this CPU: tried once, since it depends on the CPU's instruction set."""
    if not _ONEDNN or dtype not in _ONEDNN_DTYPES:
        return False
    try:
        _onednn_linear(torch.ones(2, 16, dtype=dtype), torch.ones(8, 16, dtype=dtype), None)
    except RuntimeError as exc:  # "could not create a primitive descriptor": no kernel for this CPU
        logger.info("oneDNN has no %s GEMM on this CPU (%s); the dense layers use torch's GEMM", dtype,
                    str(exc).splitlines()[0])
        return False
    return True


_ONEDNN_MIN_WEIGHT = 1 << 16
"""Smaller weights (tiny models) take torch's GEMM: oneDNN's fixed cost per call (about 40 us here, its threads
woken) is then most of the call, against about 9 us."""
SKINNY_MAX_ROWS = {torch.float32: 16, torch.bfloat16: 4}
"""GEMMs of up to this many rows run ops.skinny_linear on the CPU, by dtype. Measured over a decode step's weights
(benchmarks/bench_decode_gemm.py): fp32 1.19x oneDNN at 16 rows, 0.93x at 32; bf16, against oneDNN on the weights'
copies in its layout (pack_for_onednn, which the engine keeps): 1.32x at one row, 1.11x at 3, 1.03x at 4, 0.71x at
8."""
_EXACT_ROWS = 16  # row counts up to this run as they are
_SIZES_PER_DOUBLING = 8  # above it, padded to one of this many sizes per power of two


def padded_rows(rows: int) -> int:
    """The row count a oneDNN GEMM of `rows` rows runs with (see the module docstring): `rows` up to _EXACT_ROWS,
    else the next multiple of 1/_SIZES_PER_DOUBLING of the power of two below it."""
    if rows <= _EXACT_ROWS:
        return rows
    step = max(1, (1 << (rows.bit_length() - 1)) // _SIZES_PER_DOUBLING)
    return -(-rows // step) * step


PACKED = "onednn_packed"
"""The attribute of a bf16 CPU weight that holds its copy in oneDNN's blocked layout (pack_for_onednn)."""
_PACK_FOR_ROWS = 128  # the row count oneDNN picks the blocked layout for; any row count runs on it


def pack_for_onednn(weights: Iterable[torch.Tensor]) -> int:
    """Gives each bf16 CPU weight a copy in oneDNN's blocked layout (its PACKED attribute), which `linear` takes for the
    GEMMs above the skinny kernel's rows; returns the bytes the copies take. Given the weight as it is, oneDNN
    reorders it into that layout on every call: a decode step's GEMMs of 16 rows took 24-25 ms that way, against a
    read floor of 11 (BENCHMARKS.md). The skinny kernel reads the weight as it is, so both stay: twice the weights'
    memory, counted where the KV cache is sized (page_pool.weight_bytes). The same results, bit for bit, up to 64
    rows on the default model's shapes; at 512 some shapes sum in another order (one bf16 rounding apart). Nothing is
    done where oneDNN has no bf16 GEMM on this CPU."""
    if not onednn_supports(torch.bfloat16):
        return 0
    added = 0
    for weight in weights:
        if weight.is_cpu and weight.dtype == torch.bfloat16 and weight.dim() == 2 and \
                weight.numel() >= _ONEDNN_MIN_WEIGHT and getattr(weight, PACKED, None) is None:
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _PACK_FOR_ROWS)
            setattr(weight, PACKED, packed)
            added += packed.numel() * packed.element_size()
    return added


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           residual: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias (+ residual), for x [rows, in], weight [out, in] and residual [rows, out]. The residual is
    added by the GEMM itself (oneDNN's binary post-op on the CPU, addmm's accumulate elsewhere): a decoder layer's
    residual additions cost no op of their own."""
    if x.is_cpu and x.dim() == 2 and x.shape[0] <= SKINNY_MAX_ROWS.get(x.dtype, -1) and \
            ops.CPU_KERNELS_BUILT:  # the decode step's GEMMs: checked first and cheaply, 4 per layer
        return ops.skinny_linear(x, weight, bias, residual)
    if x.device.type == "cpu" and x.dim() == 2 and weight.numel() >= _ONEDNN_MIN_WEIGHT and onednn_supports(x.dtype):
        rows = x.shape[0]
        padded = padded_rows(rows)
        if padded != rows:
            x = F.pad(x, (0, 0, 0, padded - rows))
            residual = None if residual is None else F.pad(residual, (0, 0, 0, padded - rows))
        packed = getattr(weight, PACKED, None)
        weight = weight if packed is None else packed
        out = (_onednn_linear(x, weight, bias) if residual is None
               else torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add"))
        return out if padded == rows else out[:rows]
    if residual is None:
        return F.linear(x, weight, bias)
    if bias is None:
        return torch.addmm(residual, x, weight.t())
    return torch.addmm(residual + bias, x, weight.t())


FLOAT_OUT_MAX_ROWS = 8
"""bf16 GEMMs of up to this many rows give fp32 outputs straight from the kernel's sums (linear_float_out). The LM head
in it takes 0.46-0.63x oneDNN's time up to 4 rows, 1.05x at 8, 1.6x at 16 (benchmarks/bench_decode_gemm.py --dtype
bfloat16)."""


def linear_float_out(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T in fp32 whatever x's dtype (fp64 stays fp64): the LM head, whose logits, rounded to bf16, would be
    0.125 apart near 30, making a greedy choice between two close tokens a coin toss. On the CPU, a bf16 GEMM of up to
    FLOAT_OUT_MAX_ROWS rows keeps the project's kernel's fp32 sums; elsewhere the GEMM's output is widened after its
    rounding (as transformers' and vLLM's bf16 logits are)."""
    if x.is_cpu and x.dim() == 2 and x.dtype == torch.bfloat16 and x.shape[0] <= FLOAT_OUT_MAX_ROWS and \
            ops.CPU_KERNELS_BUILT:
        return ops.skinny_linear(x, weight, None, None, True)
    out = linear(x, weight)
    return out if out.dtype == torch.float64 else out.float()


_BF16_INSTRUCTIONS = ("amx_bf16", "avx512_bf16")
_BF16_MIN_SPEEDUP = 1.3


@functools.cache
def preferred_cpu_dtype() -> torch.dtype:
    """The CPU's default model dtype: bf16 where the CPU has bf16 instructions (AMX or AVX-512 BF16) and a GEMV, the
    work of a decode step, measured here runs at least 1.3x faster in bf16 than in fp32 (half the bytes to read: 2.2x
    for this GEMV, 1.5x over a decode step's weights, on a CPU with AVX-512 BF16); fp32 elsewhere (without those
    instructions, bf16 is converted in software and slower). Decided at run time, once."""
    from omniserve.cpu_attention.kernel import cpu_isa

    flags = cpu_isa().split()
    if not any(flag in flags for flag in _BF16_INSTRUCTIONS) or not onednn_supports(torch.bfloat16):
        return torch.float32
    seconds = {dtype: _gemv_seconds(dtype) for dtype in (torch.float32, torch.bfloat16)}
    speedup = seconds[torch.float32] / seconds[torch.bfloat16]
    chosen = torch.bfloat16 if speedup >= _BF16_MIN_SPEEDUP else torch.float32
    logger.info("this CPU has bf16 instructions; a bf16 GEMV ran %.2fx as fast as fp32: the model runs in %s",
                speedup, str(chosen).removeprefix("torch."))
    return chosen


def _gemv_seconds(dtype: torch.dtype, size: int = 4096, repeats: int = 20) -> float:
    """Best seconds of one row times a size x size matrix with the engine's GEMM."""
    x, weight = torch.randn(1, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    linear(x, weight)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        linear(x, weight)
        best = min(best, time.perf_counter() - started)
    return best


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
