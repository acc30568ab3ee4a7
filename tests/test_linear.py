"""The CPU GEMM path: oneDNN sees only a bounded set of row counts (each one a compiled kernel it keeps in memory),
and padding rows changes no result."""

import pytest
import torch
import torch.nn.functional as F

from omniserve.models import linear as linear_module
from omniserve.models.linear import linear, onednn_supports, padded_rows


def test_padded_rows_are_few_and_close():
    sizes = [padded_rows(rows) for rows in range(1, 2049)]
    assert sizes[:16] == list(range(1, 17))  # small batches (decode) run as they are
    assert all(rows <= size <= rows * 9 / 8 for rows, size in zip(range(1, 2049), sizes))
    assert len(set(sizes)) <= 72  # vs 2,048 kernels, of ~0.6 MB each, without padding
    assert padded_rows(2048) == 2048 and padded_rows(1025) == 1152


def test_onednn_gets_bounded_shapes_whatever_the_row_counts(monkeypatch):
    if not onednn_supports(torch.float32):
        pytest.skip("no oneDNN fp32 GEMM on this CPU")
    seen = set()
    real = linear_module._onednn_linear

    def recording(x, weight, bias):
        seen.add(x.shape[0])
        return real(x, weight, bias)

    monkeypatch.setattr(linear_module, "_onednn_linear", recording)
    weight = torch.randn(24, 8)
    for rows in range(1, 600):
        assert linear(torch.randn(rows, 8), weight).shape == (rows, 24)
    assert len(seen) <= 16 + 8 * 6  # exact up to 16, then 8 sizes per doubling up to 1,024


@pytest.mark.parametrize("rows", [1, 16, 17, 33, 100, 1025])
def test_padding_changes_no_result(rows):
    torch.manual_seed(rows)
    x, weight, bias = torch.randn(rows, 64), torch.randn(48, 64), torch.randn(48)
    out = linear(x, weight, bias)
    assert out.shape == (rows, 48) and out.is_contiguous()
    torch.testing.assert_close(out, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(linear(x[-1:], weight, bias)[0], out[-1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("flags, speedup, expected", [
    ("fpu sse2 avx2 fma", 2.0, torch.float32),  # no bf16 instructions: never measured, fp32
    ("avx2 avx512f avx512_bf16", 2.0, torch.bfloat16),
    ("avx2 avx512f amx_bf16 amx_tile", 1.1, torch.float32),  # has them, but not faster enough here
])
def test_the_cpu_default_dtype_is_bf16_only_where_the_cpu_runs_it_faster(monkeypatch, flags, speedup, expected):
    from omniserve.cpu_attention import kernel

    monkeypatch.setattr(kernel, "cpu_isa", lambda: flags)
    monkeypatch.setattr(linear_module, "onednn_supports", lambda dtype: True)
    measured = []
    monkeypatch.setattr(linear_module, "_gemv_seconds",
                        lambda dtype: measured.append(dtype) or (1.0 if dtype == torch.float32 else 1.0 / speedup))
    assert linear_module.preferred_cpu_dtype.__wrapped__() == expected
    assert bool(measured) == ("bf16" in flags)
