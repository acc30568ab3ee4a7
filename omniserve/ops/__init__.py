"""The operators of a decoder layer (fused dense pieces, the KV store, paged attention) as torch operators
(`torch.ops.omniserve.*`) with a kernel per device:

    operator        meaning (reference.py)                                  CPU                CUDA
    rms_norm        RMSNorm of each row                                     C++ (csrc/)        Triton
    silu_and_mul    silu(gate) * up of the fused gate-up projection         C++                Triton
    rope_           RoPE, in place, on the q and k heads of the fused QKV   C++                Triton
    store_kv        k and v rows into the page pool (negative slot: skip)   C++                Triton
    paged_decode    decode attention over page tables (attention/)          C++                Triton
    paged_prefill   causal attention of all prefill spans, over page tables C++                Triton
    skinny_linear   x @ weight.T (+ bias, + residual) for a decode batch   C++ (fp32, bf16)   - (addmm there)
                    (float_out: the output in fp32, not rounded to x's dtype)

Each is one kernel where plain torch runs 3 to 10 (RMSNorm alone is 8): on a GPU every op is a launch that the host
pays for, and on the CPU a dispatch and a pass over memory. As registered operators they are one op each to a
dispatch mode (how the ops of a step are counted), to the meta device (shapes only) and to graph capture.

The CPU kernels are the project's C++ extension (cpu_attention/kernel.py builds it at set-up). Where it could not be
built, the CPU runs the reference (plain torch, slower, same results). The CUDA kernels import Triton on first use.
The residual additions of a layer are not operators here: they ride on the GEMMs before them (models/linear.py,
which also decides when a CPU GEMM is skinny_linear's).
"""

from __future__ import annotations

import logging

import torch

from omniserve.ops import reference

logger = logging.getLogger(__name__)

_LIBRARY = torch.library.Library("omniserve", "DEF")
_SCHEMAS = {
    "rms_norm": "rms_norm(Tensor x, Tensor weight, float eps) -> Tensor",
    "silu_and_mul": "silu_and_mul(Tensor gate_up) -> Tensor",
    "rope_": "rope_(Tensor(a!) qkv, Tensor cos, Tensor sin, int num_heads, int num_kv_heads, int head_dim) -> ()",
    "store_kv": "store_kv(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slots) -> ()",
    "paged_decode": "paged_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor page_table, Tensor context_lens, "
                    "int page_size) -> Tensor",
    "paged_prefill": "paged_prefill(Tensor q, Tensor k_cache, Tensor v_cache, Tensor page_table, Tensor query_starts, "
                     "Tensor context_lens, int page_size) -> Tensor",
    "skinny_linear": "skinny_linear(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, bool float_out=False) "
                     "-> Tensor",
}
for _schema in _SCHEMAS.values():
    _LIBRARY.define(_schema)


def _meta_rms_norm(x, weight, eps):
    return x.new_empty(x.shape)


def _meta_silu_and_mul(gate_up):
    return gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)


def _meta_skinny_linear(x, weight, bias, residual, float_out=False):
    dtype = torch.float32 if float_out and x.dtype != torch.float64 else x.dtype
    return x.new_empty(x.shape[0], weight.shape[0], dtype=dtype)


def _meta_in_place(*args):
    return None


def _meta_paged_decode(q, *args):
    return q.new_empty(q.shape)


for _name, _meta in (("rms_norm", _meta_rms_norm), ("silu_and_mul", _meta_silu_and_mul), ("rope_", _meta_in_place),
                     ("store_kv", _meta_in_place), ("paged_decode", _meta_paged_decode),
                     ("paged_prefill", _meta_paged_decode), ("skinny_linear", _meta_skinny_linear)):
    _LIBRARY.impl(_name, _meta, "Meta")


def _cuda_kernel(module: str, name: str):
    def run(*args):
        import importlib  # Triton is imported only where a GPU runs these

        return getattr(importlib.import_module(module), name)(*args)

    return run


_FUSED = ("rms_norm", "silu_and_mul", "rope_", "store_kv")
for _name in _FUSED:
    _LIBRARY.impl(_name, _cuda_kernel("omniserve.ops.triton_ops", _name), "CUDA")
_LIBRARY.impl("paged_decode", _cuda_kernel("omniserve.attention.triton_decode", "paged_decode_attention"), "CUDA")
_LIBRARY.impl("paged_prefill", _cuda_kernel("omniserve.attention.triton_prefill", "paged_prefill"), "CUDA")


def _register_cpu_kernels() -> bool:
    """The C++ kernels register themselves when the extension loads; an operator it has no kernel for (no
    extension here) runs its reference on the CPU."""
    from omniserve.cpu_attention.kernel import compiled_kernel

    built = compiled_kernel() is not None
    missing = [name for name in _SCHEMAS if not torch._C._dispatch_has_kernel_for_dispatch_key(
        f"omniserve::{name}", "CPU")]
    if not built:
        logger.warning("the fused CPU operators are not built: the CPU runs them as plain torch (slower)")
    for name in missing:
        _LIBRARY.impl(name, getattr(reference, name), "CPU")
    return built


CPU_KERNELS_BUILT = _register_cpu_kernels()

# The overloads themselves: calling them skips the overload packet's Python dispatch, about 1 us an op.
rms_norm = torch.ops.omniserve.rms_norm.default
silu_and_mul = torch.ops.omniserve.silu_and_mul.default
rope_ = torch.ops.omniserve.rope_.default
store_kv = torch.ops.omniserve.store_kv.default
paged_decode = torch.ops.omniserve.paged_decode.default
paged_prefill = torch.ops.omniserve.paged_prefill.default
skinny_linear = torch.ops.omniserve.skinny_linear.default

__all__ = ["CPU_KERNELS_BUILT", "paged_decode", "paged_prefill", "reference", "rms_norm", "rope_", "silu_and_mul",
           "skinny_linear", "store_kv"]
