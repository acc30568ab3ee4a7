"""The dense layers' GEMM, with a faster CPU path.

On the CPU, fp32 and bf16 GEMMs go through oneDNN (the kernels torch.compile's CPU backend uses) rather than the
default BLAS: on the machines we measured it is about twice as fast for every batch size from 1 row to 2,048
(BENCHMARKS.md). Anything else (CUDA, fp64, a torch build without oneDNN) takes F.linear.

Whether oneDNN has a kernel for a dtype depends on the CPU, not on torch: its bf16 inner product needs AVX-512
(an AVX2-only CPU has none, and every call would fail). So each dtype is tried once on a tiny GEMM, and where oneDNN
cannot run it, F.linear (torch's own GEMM, which works on any CPU) does instead.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

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


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias, for x [rows, in] and weight [out, in]."""
    if x.device.type == "cpu" and x.dim() == 2 and onednn_supports(x.dtype):
        return _onednn_linear(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
