// The GEMMs of a decode step on the CPU: y = x @ weight.T (+ bias) (+ residual) for a few rows of x (one per decoding
// sequence). At one to a few rows the work is reading the weight once from memory, and what decides the speed is
// streaming it at the machine's read bandwidth with no fixed cost per call; the general GEMMs (oneDNN, torch's BLAS)
// read it at half that here (BENCHMARKS.md). Its meaning is omniserve/ops/reference.py's skinny_linear; it is the CPU
// kernel of the omniserve::skinny_linear operator, which models/linear.py calls for fp32 decode batches.
//
// Each task takes a block of weight rows and runs every input row against it while the block is in L1, so the weight
// is read from memory once whatever the row count. The inner tile is kWeightRows x kInputRows dot products, each
// accumulated in a vector register across K and summed across lanes at the end.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>

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

struct Operands {
  const float* x;
  int64_t x_stride;
  const float* weight;  // [N, K], contiguous
  int64_t K;
  const float* bias;      // [N] or null
  const float* residual;  // [rows, N] or null
  int64_t residual_stride;
  float* out;  // [rows, N], contiguous
  int64_t N;
};

// out[m, n] for m in [row, row + MR) and n in [col, col + NR).
template <int NR, int MR>
inline void tile(const Operands& o, int64_t row, int64_t col) {
  const float* w = o.weight + col * o.K;
  const float* x = o.x + row * o.x_stride;
  vec acc[NR][MR] = {};
  int64_t k = 0;
  for (; k + kLanes <= o.K; k += kLanes) {
    vec wv[NR];
    for (int n = 0; n < NR; ++n) wv[n] = load(w + n * o.K + k);
    for (int m = 0; m < MR; ++m) {
      const vec xv = load(x + m * o.x_stride + k);
      for (int n = 0; n < NR; ++n) acc[n][m] += wv[n] * xv;
    }
  }
  for (int m = 0; m < MR; ++m) {
    for (int n = 0; n < NR; ++n) {
      float sum = lane_sum(acc[n][m]);
      for (int64_t kk = k; kk < o.K; ++kk) sum += w[n * o.K + kk] * x[m * o.x_stride + kk];
      if (o.bias) sum += o.bias[col + n];
      if (o.residual) sum += o.residual[(row + m) * o.residual_stride + col + n];
      o.out[(row + m) * o.N + col + n] = sum;
    }
  }
}

// Every input row against weight rows [col, col + NR).
template <int NR>
void weight_block(const Operands& o, int64_t rows, int64_t col) {
  int64_t row = 0;
  for (; row + kInputRows <= rows; row += kInputRows) tile<NR, kInputRows>(o, row, col);
  if (rows - row == 2) tile<NR, 2>(o, row, col);
  if (rows - row == 1) tile<NR, 1>(o, row, col);
}

}  // namespace

at::Tensor skinny_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                         const c10::optional<at::Tensor>& residual) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1), "x [rows, K], weight [N, K]");
  const int64_t rows = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(!bias || (bias->dim() == 1 && bias->size(0) == N), "bias must be [N]");
  TORCH_CHECK(!residual || (residual->dim() == 2 && residual->size(0) == rows && residual->size(1) == N),
              "residual must be [rows, N]");
  if (x.scalar_type() != at::kFloat || weight.scalar_type() != at::kFloat) {  // other dtypes: torch's GEMM
    auto out = bias ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
    return residual ? out.add_(*residual) : out;
  }
  const auto xc = x.stride(1) == 1 ? x : x.contiguous();
  const auto wc = weight.contiguous();
  const auto bc = bias ? bias->contiguous() : at::Tensor();
  const auto rc = residual && residual->stride(1) != 1 ? residual->contiguous() : (residual ? *residual : at::Tensor());
  TORCH_CHECK((!bias || bc.scalar_type() == at::kFloat) && (!residual || rc.scalar_type() == at::kFloat),
              "bias and residual must be fp32 like x");
  auto out = at::empty({rows, N}, x.options());
  const Operands o{xc.data_ptr<float>(), xc.stride(0), wc.data_ptr<float>(), K, bias ? bc.data_ptr<float>() : nullptr,
                   residual ? rc.data_ptr<float>() : nullptr, residual ? rc.stride(0) : 0, out.data_ptr<float>(), N};
  const int64_t blocks = (N + kWeightRows - 1) / kWeightRows;
  const int64_t grain = std::max<int64_t>(1, kWeightElementsPerTask / std::max<int64_t>(kWeightRows * K, 1));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const int64_t col = block * kWeightRows;
      if (col + kWeightRows <= N) {
        weight_block<kWeightRows>(o, rows, col);
      } else {
        for (int64_t n = col; n < N; ++n) weight_block<1>(o, rows, n);
      }
    }
  });
  return out;
}

TORCH_LIBRARY_IMPL(omniserve, CPU, m) { m.impl("skinny_linear", &skinny_linear); }
