// The fused dense operators of a decoder layer on the CPU: each is one pass over its rows, where plain torch takes
// 3 to 10 ops (and as many passes over memory and dispatches). Their meaning is omniserve/ops/reference.py; they are
// registered as the CPU kernels of the omniserve:: operators that omniserve/ops/__init__.py declares.
//
// Math in fp32 for fp32, bf16 and fp16 data (fp64 in fp64), as the reference does. Rows are split over threads only
// in tasks of at least kElementsPerTask elements: a decode batch stays on the calling thread, where waking the other
// threads would cost more than the rows (and, on a loaded machine, waiting for a descheduled one costs milliseconds).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

namespace {

template <typename scalar_t>
using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

constexpr int64_t kElementsPerTask = 1 << 16;

// Rows per parallel task, for rows of `width` elements.
int64_t grain(int64_t width) { return std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(width, 1)); }

void check_rows(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, name, " must be [rows, width] with contiguous rows");
}

// Row kernels: templates outside the dtype dispatch, whose macro takes neither pragmas nor template commas.
template <typename scalar_t>
void rms_norm_row(const scalar_t* row, const scalar_t* weight, scalar_t* dst, int64_t width, double eps) {
  using acc = acc_t<scalar_t>;
  acc sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < width; ++i) sum += static_cast<acc>(row[i]) * static_cast<acc>(row[i]);
  const acc scale = acc(1) / std::sqrt(sum / width + static_cast<acc>(eps));
  // The normalised value is rounded to the data's dtype before the weight multiplies it, as in the reference.
#pragma omp simd
  for (int64_t i = 0; i < width; ++i)
    dst[i] = static_cast<scalar_t>(static_cast<acc>(weight[i]) *
                                   static_cast<acc>(static_cast<scalar_t>(static_cast<acc>(row[i]) * scale)));
}

template <typename scalar_t>
void silu_and_mul_row(const scalar_t* gate, const scalar_t* up, scalar_t* dst, int64_t width) {
  using acc = acc_t<scalar_t>;
#pragma omp simd
  for (int64_t i = 0; i < width; ++i) {
    const acc g = static_cast<acc>(gate[i]);
    dst[i] = static_cast<scalar_t>(static_cast<acc>(static_cast<scalar_t>(g / (acc(1) + std::exp(-g)))) *
                                   static_cast<acc>(up[i]));
  }
}

template <typename scalar_t>
void rope_row(scalar_t* heads, const acc_t<scalar_t>* cos, const acc_t<scalar_t>* sin, int64_t num_heads,
              int64_t head_dim) {
  using acc = acc_t<scalar_t>;
  const int64_t half = head_dim / 2;
  for (int64_t h = 0; h < num_heads; ++h) {
    scalar_t* x1 = heads + h * head_dim;
    scalar_t* x2 = x1 + half;
#pragma omp simd
    for (int64_t i = 0; i < half; ++i) {
      const acc a = static_cast<acc>(x1[i]), b = static_cast<acc>(x2[i]);
      x1[i] = static_cast<scalar_t>(a * cos[i] - b * sin[i]);
      x2[i] = static_cast<scalar_t>(b * cos[i] + a * sin[i]);
    }
  }
}

template <typename scalar_t>
constexpr bool is_double() {
  return std::is_same_v<acc_t<scalar_t>, double>;
}

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, "x");
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == x.size(1) && weight.scalar_type() == x.scalar_type(),
              "weight must be a contiguous [width] of x's dtype");
  auto out = at::empty({x.size(0), x.size(1)}, x.options());
  const int64_t width = x.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, x.size(0), grain(width), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) rms_norm_row(xp + r * x.stride(0), wp, op + r * width, width, eps);
    });
  });
  return out;
}

at::Tensor silu_and_mul(const at::Tensor& gate_up) {
  check_rows(gate_up, "gate_up");
  const int64_t width = gate_up.size(1) / 2;
  auto out = at::empty({gate_up.size(0), width}, gate_up.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate_up.scalar_type(), "silu_and_mul", [&] {
    const scalar_t* ip = gate_up.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, gate_up.size(0), grain(2 * width), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* gate = ip + r * gate_up.stride(0);
        silu_and_mul_row(gate, gate + width, op + r * width, width);
      }
    });
  });
  return out;
}

void rope_(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, int64_t num_heads,
           int64_t num_kv_heads, int64_t head_dim) {
  check_rows(qkv, "qkv");
  const int64_t rows = qkv.size(0), half = head_dim / 2, rotated_heads = num_heads + num_kv_heads;
  TORCH_CHECK(qkv.size(1) >= rotated_heads * head_dim, "qkv is narrower than its query and key heads");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.sizes() == sin.sizes() && cos.dim() == 2 &&
                  cos.size(0) == rows && cos.size(1) == half && cos.scalar_type() == sin.scalar_type(),
              "cos and sin must be contiguous [rows, head_dim / 2] of one dtype");
  const bool wide = cos.scalar_type() == at::kDouble;
  TORCH_CHECK(wide || cos.scalar_type() == at::kFloat, "cos and sin must be fp32 (fp64 for fp64 data)");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(), "rope_", [&] {
    TORCH_CHECK(wide == is_double<scalar_t>(), "cos and sin must be fp64 exactly when qkv is");
    using angle_t = acc_t<scalar_t>;
    scalar_t* base = qkv.data_ptr<scalar_t>();
    const angle_t* cp = cos.data_ptr<angle_t>();
    const angle_t* sp = sin.data_ptr<angle_t>();
    at::parallel_for(0, rows, grain(rotated_heads * head_dim), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        rope_row(base + r * qkv.stride(0), cp + r * half, sp + r * half, rotated_heads, head_dim);
    });
  });
}

void store_kv(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache, const at::Tensor& v_cache,
              const at::Tensor& slots) {
  // k and v are usually views of the fused QKV output: rows apart by its width, each row's heads contiguous.
  TORCH_CHECK(k.dim() == 3 && k.sizes() == v.sizes() && k.size(0) == slots.numel(), "k, v [rows, kv_heads, dim]");
  TORCH_CHECK(k.stride(2) == 1 && v.stride(2) == 1 && k.stride(1) == k.size(2) && v.stride(1) == v.size(2),
              "each row of k and v must be contiguous");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.sizes() == v_cache.sizes() &&
                  k_cache.size(1) * k_cache.size(2) == k.size(1) * k.size(2),
              "k_cache, v_cache must be contiguous [slots, kv_heads, dim] pools");
  TORCH_CHECK(k.scalar_type() == k_cache.scalar_type() && v.scalar_type() == k_cache.scalar_type(),
              "k and v must have the pool's dtype");
  TORCH_CHECK(slots.scalar_type() == at::kLong, "slots must be int64");
  const auto slot_list = slots.contiguous();
  const int64_t rows = k.size(0), num_slots = k_cache.size(0), element = k.element_size();
  const int64_t bytes = k.size(1) * k.size(2) * element;
  const int64_t* sp = slot_list.data_ptr<int64_t>();
  const auto* kp = static_cast<const char*>(k.data_ptr());
  const auto* vp = static_cast<const char*>(v.data_ptr());
  auto* kc = static_cast<char*>(k_cache.data_ptr());
  auto* vc = static_cast<char*>(v_cache.data_ptr());
  for (int64_t r = 0; r < rows; ++r) TORCH_CHECK(sp[r] < num_slots, "slot ", sp[r], " is outside the pool");
  at::parallel_for(0, rows, grain(2 * k.size(1) * k.size(2)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (sp[r] < 0) continue;  // a row whose KV is not kept here
      std::memcpy(kc + sp[r] * bytes, kp + r * k.stride(0) * element, bytes);
      std::memcpy(vc + sp[r] * bytes, vp + r * v.stride(0) * element, bytes);
    }
  });
}

TORCH_LIBRARY_IMPL(omniserve, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("silu_and_mul", &silu_and_mul);
  m.impl("rope_", &rope_);
  m.impl("store_kv", &store_kv);
}
