// The GEMMs of a decode step on the CPU: y = x @ weight.T (+ bias) (+ residual) for a few rows of x (one per decoding
// sequence). At one to a few rows the work is reading the weight once from memory, and what decides the speed is
// streaming it at the machine's read bandwidth with no fixed cost per call; the general GEMMs (oneDNN, torch's BLAS)
// read it at half that here (BENCHMARKS.md). Its meaning is omniserve/ops/reference.py's skinny_linear; it is the CPU
// kernel of the omniserve::skinny_linear operator, which models/linear.py calls for fp32 and bf16 decode batches.
//
// Each task takes a block of weight rows and runs every input row against it while the block is in L1, so the weight
// is read from memory once whatever the row count. The inner tile is kWeightRows x kInputRows dot products, each
// accumulated in a vector register across K and summed across lanes at the end.
//
// bf16 (x, weight, bias and residual alike): the sums are fp32 and the output is rounded to bf16 once, to nearest
// even, as oneDNN's bf16 GEMM does; or, with float_out, kept in fp32 (the logits: rounded to bf16, those near 30 would
// be 0.125 apart, and a greedy choice between two close tokens a coin toss). The weight costs half the bytes to read,
// which is all a decode GEMM's time, if the arithmetic keeps up: where the CPU has AVX-512 BF16 (this file is compiled
// for the CPU it runs on), one instruction multiplies 32 bf16 pairs into 16 fp32 sums; elsewhere each block of weight
// rows is widened to fp32 into a buffer that stays in L1 while every input row runs against it (a bf16 is the upper
// half of an fp32).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

#if defined(__AVX512F__)
constexpr int64_t kLanes = 16;
#else
constexpr int64_t kLanes = 8;  // AVX2; where the CPU has narrower vectors the compiler splits these
#endif
using vec = float __attribute__((vector_size(kLanes * sizeof(float))));

constexpr int kWeightRows = 4;
constexpr int kInputRows = 3;  // 4 x 3 accumulators and 4 weight vectors: AVX2's 16 registers
constexpr int64_t kWeightElementsPerTask = 1 << 16;  // below this a thread's wake-up costs more than its share

using bf16 = uint16_t;  // a bf16's bits (at::BFloat16's storage)

inline vec load(const float* p) {
  vec v;
  std::memcpy(&v, p, sizeof(vec));  // an unaligned vector load
  return v;
}

inline float lane_sum(vec v) {
  float sum = 0;
  for (int64_t i = 0; i < kLanes; ++i) sum += v[i];
  return sum;
}

inline float to_float(float v) { return v; }

inline float to_float(bf16 v) {
  const uint32_t w = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &w, sizeof(f));
  return f;
}

inline void store(float* p, float v) { *p = v; }

inline void store(bf16* p, float v) {
  uint32_t w;
  std::memcpy(&w, &v, sizeof(w));
  if ((w & 0x7fffffffu) > 0x7f800000u) {  // NaN (tested on the bits: -ffast-math drops isnan)
    *p = bf16(0x7fc0);
    return;
  }
  *p = bf16((w + 0x7fffu + ((w >> 16) & 1u)) >> 16);  // to nearest, ties to even
}

template <typename T, typename O = T>  // T: float or bf16; O, the output's: T or float
struct Operands {
  const T* x;
  int64_t x_stride;
  const T* weight;  // [N, K], contiguous
  int64_t K;
  const T* bias;      // [N] or null
  const T* residual;  // [rows, N] or null
  int64_t residual_stride;
  O* out;  // [rows, N], contiguous
  int64_t N;
  const float* x_fp32;  // bf16 without AVX-512 BF16: x widened once per call ([rows, K], contiguous)
};

// The sums' ends: the tail of K past the vector loop (from k), bias and residual; then the output.
template <typename T, typename O, typename W, typename X>
inline void finish(const Operands<T, O>& o, const W* w, const X* x, int64_t x_stride, int64_t k, float sum, int n,
                   int m, int64_t row, int64_t col) {
  for (int64_t kk = k; kk < o.K; ++kk) sum += to_float(w[n * o.K + kk]) * to_float(x[m * x_stride + kk]);
  if (o.bias) sum += to_float(o.bias[col + n]);
  if (o.residual) sum += to_float(o.residual[(row + m) * o.residual_stride + col + n]);
  store(o.out + (row + m) * o.N + col + n, sum);
}

// The next block of weight rows, a line of it asked for per line of this block read (the first input rows' tile
// only): the hardware prefetcher alone left a bf16 step's read bandwidth 0.71 used at one row (BENCHMARKS.md).
template <typename W>
inline void prefetch(const W* next_block, int64_t offset) {
  if (next_block) __builtin_prefetch(next_block + offset, 0, 3);
}

// out[m, n] for m in [row, row + MR) and n in [col, col + NR); w: weight rows [col, col + NR) in fp32, K apart; x:
// fp32 input rows, x_stride apart; next: the weight rows after w's, to prefetch (or null).
template <int NR, int MR, typename T, typename O>
inline void tile(const Operands<T, O>& o, const float* w, const float* x_rows, int64_t x_stride, int64_t row,
                 int64_t col, const float* next) {
  const float* x = x_rows + row * x_stride;
  vec acc[NR][MR] = {};
  int64_t k = 0;
  for (; k + kLanes <= o.K; k += kLanes) {
    vec wv[NR];
    for (int n = 0; n < NR; ++n) {
      prefetch(next, n * o.K + k);
      wv[n] = load(w + n * o.K + k);
    }
    for (int m = 0; m < MR; ++m) {
      const vec xv = load(x + m * x_stride + k);
      for (int n = 0; n < NR; ++n) acc[n][m] += wv[n] * xv;
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) finish(o, w, x, x_stride, k, lane_sum(acc[n][m]), n, m, row, col);
}

#if defined(__AVX512BF16__)
// As tile, on bf16 weight and x as they are: 32 products a vdpbf16ps, summed in fp32.
template <int NR, int MR, typename O>
inline void tile_bf16(const Operands<bf16, O>& o, int64_t row, int64_t col) {
  const bf16* w = o.weight + col * o.K;
  const bf16* x = o.x + row * o.x_stride;
  const bf16* next = row == 0 ? w + NR * o.K : nullptr;
  __m512 acc[NR][MR];
  for (int n = 0; n < NR; ++n)
    for (int m = 0; m < MR; ++m) acc[n][m] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= o.K; k += 32) {
    __m512bh wv[NR];
    for (int n = 0; n < NR; ++n) {
      prefetch(next, n * o.K + k);
      wv[n] = (__m512bh)_mm512_loadu_si512(w + n * o.K + k);
    }
    for (int m = 0; m < MR; ++m) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * o.x_stride + k);
      for (int n = 0; n < NR; ++n) acc[n][m] = _mm512_dpbf16_ps(acc[n][m], wv[n], xv);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) finish(o, w, x, o.x_stride, k, _mm512_reduce_add_ps(acc[n][m]), n, m, row, col);
}
#endif

// Every input row against weight rows [col, col + NR). `buffer`: NR x K floats for widening a bf16 block.
template <int NR>
void weight_block(const Operands<float>& o, int64_t rows, int64_t col, float*) {
  const float* w = o.weight + col * o.K;
  const float* next = w + NR * o.K;  // contiguous after this block (past the end for the last: a prefetch is a hint)
  int64_t row = 0;
  for (; row + kInputRows <= rows; row += kInputRows)
    tile<NR, kInputRows>(o, w, o.x, o.x_stride, row, col, row == 0 ? next : nullptr);
  if (rows - row == 2) tile<NR, 2>(o, w, o.x, o.x_stride, row, col, row == 0 ? next : nullptr);
  if (rows - row == 1) tile<NR, 1>(o, w, o.x, o.x_stride, row, col, row == 0 ? next : nullptr);
}

template <int NR, typename O>
void weight_block(const Operands<bf16, O>& o, int64_t rows, int64_t col, float* buffer) {
  int64_t row = 0;
#if defined(__AVX512BF16__)
  for (; row + kInputRows <= rows; row += kInputRows) tile_bf16<NR, kInputRows>(o, row, col);
  if (rows - row == 2) tile_bf16<NR, 2>(o, row, col);
  if (rows - row == 1) tile_bf16<NR, 1>(o, row, col);
#else
  const bf16* weight = o.weight + col * o.K;
  for (int64_t i = 0; i < NR * o.K; ++i) buffer[i] = to_float(weight[i]);  // vectorized: a zero-extend and a shift
  for (; row + kInputRows <= rows; row += kInputRows)
    tile<NR, kInputRows>(o, buffer, o.x_fp32, o.K, row, col, nullptr);
  if (rows - row == 2) tile<NR, 2>(o, buffer, o.x_fp32, o.K, row, col, nullptr);
  if (rows - row == 1) tile<NR, 1>(o, buffer, o.x_fp32, o.K, row, col, nullptr);
#endif
}

template <typename T, typename O>
void run(const Operands<T, O>& o, int64_t rows) {
  const int64_t blocks = (o.N + kWeightRows - 1) / kWeightRows;
  const int64_t grain = std::max<int64_t>(1, kWeightElementsPerTask / std::max<int64_t>(kWeightRows * o.K, 1));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> buffer(o.x_fp32 == nullptr ? 0 : kWeightRows * o.K);
    for (int64_t block = begin; block < end; ++block) {
      const int64_t col = block * kWeightRows;
      if (col + kWeightRows <= o.N) {
        weight_block<kWeightRows>(o, rows, col, buffer.data());
      } else {
        for (int64_t n = col; n < o.N; ++n) weight_block<1>(o, rows, n, buffer.data());
      }
    }
  });
}

template <typename T, typename S>  // S: how the tensors hold T (float, at::BFloat16)
const T* pointer(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<const T*>(t.data_ptr<S>()) : nullptr;
}

}  // namespace

at::Tensor skinny_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                         const c10::optional<at::Tensor>& residual, bool float_out) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1), "x [rows, K], weight [N, K]");
  const int64_t rows = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(!bias || (bias->dim() == 1 && bias->size(0) == N), "bias must be [N]");
  TORCH_CHECK(!residual || (residual->dim() == 2 && residual->size(0) == rows && residual->size(1) == N),
              "residual must be [rows, N]");
  const auto dtype = x.scalar_type();
  if ((dtype != at::kFloat && dtype != at::kBFloat16) || weight.scalar_type() != dtype) {  // others: torch's GEMM
    auto out = bias ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
    out = residual ? out.add_(*residual) : out;
    return float_out && out.scalar_type() != at::kDouble ? out.to(at::kFloat) : out;
  }
  const auto xc = x.stride(1) == 1 ? x : x.contiguous();
  const auto wc = weight.contiguous();
  const auto bc = bias ? bias->contiguous() : at::Tensor();
  const auto rc = residual && residual->stride(1) != 1 ? residual->contiguous() : (residual ? *residual : at::Tensor());
  TORCH_CHECK((!bias || bc.scalar_type() == dtype) && (!residual || rc.scalar_type() == dtype),
              "bias and residual must have x's dtype");
  auto out = at::empty({rows, N}, x.options().dtype(float_out ? at::kFloat : dtype));
  const int64_t residual_stride = residual ? rc.stride(0) : 0;
  if (dtype == at::kFloat) {
    using F = float;
    run(Operands<F>{pointer<F, F>(xc), xc.stride(0), pointer<F, F>(wc), K, pointer<F, F>(bc), pointer<F, F>(rc),
                    residual_stride, out.data_ptr<F>(), N, nullptr}, rows);
    return out;
  }
  using B = at::BFloat16;
#if defined(__AVX512BF16__)
  const float* x_fp32 = nullptr;
#else
  // x is read once per block of weight rows: widened once here, not in every block.
  const auto widened = xc.to(at::kFloat).contiguous();
  const float* x_fp32 = widened.data_ptr<float>();
#endif
  const auto* xb = pointer<bf16, B>(xc);
  const auto* wb = pointer<bf16, B>(wc);
  if (float_out) {
    run(Operands<bf16, float>{xb, xc.stride(0), wb, K, pointer<bf16, B>(bc), pointer<bf16, B>(rc), residual_stride,
                              out.data_ptr<float>(), N, x_fp32}, rows);
  } else {
    run(Operands<bf16>{xb, xc.stride(0), wb, K, pointer<bf16, B>(bc), pointer<bf16, B>(rc), residual_stride,
                       reinterpret_cast<bf16*>(out.data_ptr<B>()), N, x_fp32}, rows);
  }
  return out;
}

TORCH_LIBRARY_IMPL(omniserve, CPU, m) { m.impl("skinny_linear", &skinny_linear); }
