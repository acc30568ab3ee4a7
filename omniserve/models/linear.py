"""The dense layers' GEMM, with a faster CPU path.

On the CPU, fp32 and bf16 GEMMs go through oneDNN (the kernels torch.compile's CPU backend uses) rather than the
default BLAS: on the machines we measured it is about twice as fast for every batch size from 1 row to 2,048
(BENCHMARKS.md). Anything else (CUDA, fp64, a torch build without oneDNN) takes F.linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias, for x [rows, in] and weight [out, in]."""
    if _ONEDNN and x.device.type == "cpu" and x.dtype in _ONEDNN_DTYPES and x.dim() == 2:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
