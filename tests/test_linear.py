"""The CPU GEMM paths: decode batches take the project's kernel (ops.skinny_linear), equal to its meaning; oneDNN
sees only a bounded set of row counts (each one a compiled kernel it keeps in memory), and padding rows changes no
result."""

import logging

import pytest
import torch
import torch.nn.functional as F

from omniserve import ops
from omniserve.models import linear as linear_module
from omniserve.models.linear import linear, onednn_supports, padded_rows
from omniserve.ops import reference


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


def _skinny_problem(rows, n, k, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=generator) for shape in ((rows, k), (n, k), (n,), (rows, n))]


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 7, 16])
@pytest.mark.parametrize("n, k", [(960, 576), (13, 67), (1, 8), (5, 3)], ids=["qkv", "ragged", "one row", "short"])
def test_the_decode_gemm_kernel_equals_its_meaning(rows, n, k):
    """ops.skinny_linear (weight-row tiles of 4, input-row tiles of 3, vector lanes across K) against fp64, with and
    without bias and residual: every tile shape and every tail."""
    x, weight, bias, residual = _skinny_problem(rows, n, k)
    exact = (x.double() @ weight.double().T)
    torch.testing.assert_close(ops.skinny_linear(x, weight, None, None).double(), exact, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ops.skinny_linear(x, weight, bias, residual).double(),
                               exact + bias.double() + residual.double(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 7, 16])
@pytest.mark.parametrize("n, k", [(960, 576), (13, 67), (1, 8), (5, 3)], ids=["qkv", "ragged", "one row", "short"])
def test_the_decode_gemm_kernel_in_bf16_sums_in_fp32_and_rounds_once(rows, n, k):
    """bf16 operands: widened as loaded, summed in fp32, the output rounded to bf16 once. Against the exact result of
    the same bf16 values: within half a bf16 step (plus fp32 summation error), with and without bias and residual."""
    x, weight, bias, residual = (t.bfloat16() for t in _skinny_problem(rows, n, k))
    exact = x.double() @ weight.double().T
    out = ops.skinny_linear(x, weight, None, None)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), exact, atol=1e-3, rtol=2 ** -8)
    torch.testing.assert_close(ops.skinny_linear(x, weight, bias, residual).double(),
                               exact + bias.double() + residual.double(), atol=1e-3, rtol=2 ** -8)
    x[0, 0] = float("nan")
    assert ops.skinny_linear(x, weight, None, None)[0].isnan().all()


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 7])
def test_the_decode_gemm_kernel_in_bf16_gives_its_fp32_sums_when_asked(rows):
    """float_out (the LM head's logits): the fp32 sums as they are, not rounded to bf16 (whose steps are 0.125 near
    30): within fp32 summation error of the exact result of the same bf16 values, with and without bias and residual."""
    x, weight, bias, residual = (t.bfloat16() for t in _skinny_problem(rows, 13, 67))
    exact = x.double() @ weight.double().T
    out = ops.skinny_linear(x, weight, None, None, True)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), exact, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ops.skinny_linear(x, weight, bias, residual, True).double(),
                               exact + bias.double() + residual.double(), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out, reference.skinny_linear(x, weight, None, None, True), atol=1e-4, rtol=1e-5)
    assert ops.skinny_linear(x.to("meta"), weight.to("meta"), None, None, True).dtype == torch.float32
    assert ops.skinny_linear(x.double(), weight.double(), None, None, True).dtype == torch.float64


def test_logits_are_fp32_sums_for_a_few_rows_and_widened_beyond(monkeypatch):
    """linear_float_out: up to FLOAT_OUT_MAX_ROWS bf16 rows take the kernel's fp32 sums; more rows take the GEMM's
    bf16 output, widened; fp32 and fp64 stay as they are."""
    if not ops.CPU_KERNELS_BUILT:
        pytest.skip("the project's extension is not built here")
    weight = torch.randn(300, 256).bfloat16()
    small, large = (torch.randn(rows, 256).bfloat16() for rows in (linear_module.FLOAT_OUT_MAX_ROWS, 9))
    exact = small.double() @ weight.double().T
    torch.testing.assert_close(linear_module.linear_float_out(small, weight).double(), exact, atol=1e-4, rtol=1e-5)
    widened = linear_module.linear_float_out(large, weight)
    assert widened.dtype == torch.float32 and torch.equal(widened, widened.bfloat16().float())
    assert linear_module.linear_float_out(small.double(), weight.double()).dtype == torch.float64


def test_the_decode_gemm_kernel_reads_strided_rows_and_other_dtypes():
    x, weight, bias, residual = _skinny_problem(5, 40, 64)
    wide = torch.randn(5, 100)
    wide[:, 10:74] = x
    view = wide[:, 10:74]  # rows 100 apart, as a slice of a fused projection's output
    residual_view = torch.randn(40, 5).T  # columns contiguous: the kernel copies it
    residual_view.copy_(residual)
    torch.testing.assert_close(ops.skinny_linear(view, weight, bias, residual_view), x @ weight.T + bias + residual,
                               atol=1e-4, rtol=1e-4)
    x64, w64 = x.double(), weight.double()  # no fp64 kernel: torch's GEMM
    torch.testing.assert_close(ops.skinny_linear(x64, w64, None, residual.double()), x64 @ w64.T + residual.double())
    assert ops.skinny_linear(x.to("meta"), weight.to("meta"), None, None).shape == (5, 40)


def test_decode_batches_take_the_decode_gemm_kernel(monkeypatch):
    if not ops.CPU_KERNELS_BUILT:
        pytest.skip("the project's extension is not built here")
    calls = []
    monkeypatch.setattr(linear_module.ops, "skinny_linear",
                        lambda *args: calls.append(args[0].shape[0]) or reference.skinny_linear(*args))
    weight = torch.randn(300, 256)  # above oneDNN's minimum weight
    for rows in (1, 16, 17, 64):
        assert linear(torch.randn(rows, 256), weight).shape == (rows, 300)
    assert linear(torch.randn(4, 256, dtype=torch.float64), weight.double()).shape == (4, 300)
    for rows in (1, 4, 5):
        assert linear(torch.randn(rows, 256, dtype=torch.bfloat16), weight.bfloat16()).shape == (rows, 300)
    assert calls == [1, 16, 1, 4]  # up to SKINNY_MAX_ROWS rows of fp32 or bf16; more rows, other dtypes: the GEMMs
    cpu_kernel = [line for line in torch._C._dispatch_dump("omniserve::skinny_linear").splitlines()
                  if line.startswith("CPU:")]
    assert cpu_kernel and "skinny_linear.cpp" in cpu_kernel[0]


def test_the_decode_gemm_kernel_refuses_shapes_that_do_not_match():
    x, weight, bias, residual = _skinny_problem(3, 8, 16)
    with pytest.raises(RuntimeError, match=r"x \[rows, K\], weight \[N, K\]"):
        ops.skinny_linear(x, weight[:, :8], None, None)
    with pytest.raises(RuntimeError, match="residual must be"):
        ops.skinny_linear(x, weight, None, residual[:2])
    with pytest.raises(RuntimeError, match="bias must be"):
        ops.skinny_linear(x, weight, bias[:3], None)


def test_bf16_weights_packed_for_onednn_give_the_same_results_bit_for_bit():
    """pack_for_onednn keeps a copy of each bf16 weight in oneDNN's layout, which the GEMMs above the skinny kernel's
    rows read; the results are those of the weight as it is (decode-batch row counts), and the copy counts in the
    weights' memory."""
    from omniserve.kv_cache.page_pool import weight_bytes

    if not onednn_supports(torch.bfloat16):
        pytest.skip("oneDNN has no bf16 GEMM on this CPU")
    layer = torch.nn.Linear(256, 512, bias=False).bfloat16()
    before = weight_bytes(layer)
    x, residual = torch.randn(64, 256).bfloat16(), torch.randn(64, 512).bfloat16()
    expected = [linear(x[:rows], layer.weight, None, residual[:rows]) for rows in (9, 16, 64)]
    assert linear_module.pack_for_onednn([layer.weight]) == 512 * 256 * 2
    assert getattr(layer.weight, linear_module.PACKED) is not None
    assert linear_module.pack_for_onednn([layer.weight]) == 0  # once
    for got, want in zip([linear(x[:rows], layer.weight, None, residual[:rows]) for rows in (9, 16, 64)], expected):
        assert torch.equal(got, want)
    assert weight_bytes(layer) == 2 * before


def test_the_packed_copies_are_made_only_where_memory_allows(monkeypatch, caplog):
    """The loader doubles a bf16 CPU model's weights only if the copies take at most a quarter of the memory
    available: a large model still loads (unpacked, said in the log)."""
    from omniserve.cpu_attention import remote
    from omniserve.models import loader

    if not onednn_supports(torch.bfloat16):
        pytest.skip("oneDNN has no bf16 GEMM on this CPU")
    tight, roomy = (torch.nn.Linear(256, 512, bias=False).bfloat16() for _ in range(2))
    monkeypatch.setattr(remote, "available_memory_bytes", lambda: 3 * 512 * 256 * 2)
    with caplog.at_level(logging.INFO, logger="omniserve.models.loader"):
        loader._pack_if_room(tight)
    assert getattr(tight.weight, linear_module.PACKED, None) is None and "no copies of the weights" in caplog.text
    monkeypatch.setattr(remote, "available_memory_bytes", lambda: 4 * 512 * 256 * 2)
    loader._pack_if_room(roomy)
    assert getattr(roomy.weight, linear_module.PACKED) is not None
