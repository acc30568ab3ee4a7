// Decode attention for one request over its host KV cache, streaming K once and V once.
//
//   q   [num_heads, head_dim]                       contiguous
//   k   [num_kv_heads, tiles, head_dim, 16]         keys in tiles of 16 positions, transposed inside a tile
//   v   [num_kv_heads, length, head_dim]            each position's row contiguous over head_dim
//   out [num_heads, head_dim]
//
// The query heads that share a KV head (GQA group) are handled together, so each key and value element is loaded
// from memory once for the whole group. With keys transposed inside each tile, a tile's scores are pure vertical FMAs
// (score[t] += q[d] * k[tile][d][t]) over one contiguous 16 x head_dim block, and so is the value pass
// (out[d] += p[t] * v[t][d]): no horizontal sums, few memory streams, loops at full SIMD width. Work is split over
// KV heads.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kLanes = 16;     // positions per key tile: one 512-bit register of fp32 per query head
constexpr int64_t kMaxDim = 256;    // largest head_dim the fused kernel takes

// One pass over the context with an online softmax: per tile of 16 positions, the group's scores are computed with
// the accumulators in registers (the key tile, head_dim x 16, is contiguous), exponentiated, and the tile's value
// rows are accumulated right away, so K and V are each read exactly once and no score array is kept.
// DIM > 0 fixes head_dim at compile time (the common 64 and 128), so the accumulators can live in registers.
template <typename scalar_t, int G, int DIM>
void attend_tiles(const scalar_t* q, const scalar_t* k, const scalar_t* v, scalar_t* out, int64_t length,
                  int64_t dynamic_dim, int64_t tile_stride, int64_t v_row_stride, scalar_t scale) {
  const int64_t head_dim = DIM > 0 ? DIM : dynamic_dim;
  scalar_t acc[G][kMaxDim] = {};
  scalar_t running_max[G], running_sum[G];
  for (int g = 0; g < G; ++g) {
    running_max[g] = -std::numeric_limits<scalar_t>::infinity();
    running_sum[g] = 0;
  }
  for (int64_t start = 0; start < length; start += kLanes) {
    const scalar_t* tile = k + (start / kLanes) * tile_stride;
    const int64_t valid = std::min(kLanes, length - start);
    scalar_t score[G][kLanes] = {};
    for (int64_t d = 0; d < head_dim; ++d) {
      const scalar_t* key = tile + d * kLanes;
      for (int g = 0; g < G; ++g) {
        const scalar_t qd = q[g * head_dim + d];
#pragma omp simd
        for (int64_t w = 0; w < kLanes; ++w) score[g][w] += qd * key[w];
      }
    }
    for (int g = 0; g < G; ++g) {
      scalar_t tile_max = -std::numeric_limits<scalar_t>::infinity();
      for (int64_t w = 0; w < valid; ++w) tile_max = std::max(tile_max, score[g][w] * scale);
      const scalar_t new_max = std::max(running_max[g], tile_max);
      const scalar_t correction = std::exp(running_max[g] - new_max);
      scalar_t tile_sum = 0;
#pragma omp simd reduction(+ : tile_sum)
      for (int64_t w = 0; w < kLanes; ++w) {
        score[g][w] = w < valid ? std::exp(score[g][w] * scale - new_max) : static_cast<scalar_t>(0);
        tile_sum += score[g][w];
      }
      running_sum[g] = running_sum[g] * correction + tile_sum;
      running_max[g] = new_max;
      if (correction != static_cast<scalar_t>(1)) {
#pragma omp simd
        for (int64_t d = 0; d < head_dim; ++d) acc[g][d] *= correction;
      }
    }
    for (int64_t w = 0; w < valid; ++w) {
      const scalar_t* value = v + (start + w) * v_row_stride;
      for (int g = 0; g < G; ++g) {
        const scalar_t weight = score[g][w];
#pragma omp simd
        for (int64_t d = 0; d < head_dim; ++d) acc[g][d] += weight * value[d];
      }
    }
  }
  for (int g = 0; g < G; ++g) {
    const scalar_t inverse = static_cast<scalar_t>(1) / running_sum[g];
    for (int64_t d = 0; d < head_dim; ++d) out[g * head_dim + d] = acc[g][d] * inverse;
  }
}

template <typename scalar_t, int DIM>
void dispatch_group(int64_t heads, const scalar_t* q, const scalar_t* k, const scalar_t* v, scalar_t* out,
                    int64_t length, int64_t head_dim, int64_t tile_stride, int64_t v_row_stride, scalar_t scale) {
  switch (heads) {
    case 1: return attend_tiles<scalar_t, 1, DIM>(q, k, v, out, length, head_dim, tile_stride, v_row_stride, scale);
    case 2: return attend_tiles<scalar_t, 2, DIM>(q, k, v, out, length, head_dim, tile_stride, v_row_stride, scale);
    case 3: return attend_tiles<scalar_t, 3, DIM>(q, k, v, out, length, head_dim, tile_stride, v_row_stride, scale);
    default: return attend_tiles<scalar_t, 4, DIM>(q, k, v, out, length, head_dim, tile_stride, v_row_stride, scale);
  }
}

template <typename scalar_t>
void attend_group(const scalar_t* q, const scalar_t* k, const scalar_t* v, scalar_t* out, int64_t group,
                  int64_t length, int64_t head_dim, int64_t tile_stride, int64_t v_row_stride, double scale) {
  const scalar_t s = static_cast<scalar_t>(scale);
  // Up to 4 query heads share one pass over the KV (their score accumulators fit the register file).
  for (int64_t g0 = 0; g0 < group; g0 += 4) {
    const scalar_t* qg = q + g0 * head_dim;
    scalar_t* og = out + g0 * head_dim;
    const int64_t heads_here = std::min<int64_t>(4, group - g0);
    if (head_dim == 64) {
      dispatch_group<scalar_t, 64>(heads_here, qg, k, v, og, length, head_dim, tile_stride, v_row_stride, s);
    } else if (head_dim == 128) {
      dispatch_group<scalar_t, 128>(heads_here, qg, k, v, og, length, head_dim, tile_stride, v_row_stride, s);
    } else {
      dispatch_group<scalar_t, 0>(heads_here, qg, k, v, og, length, head_dim, tile_stride, v_row_stride, s);
    }
  }
}

}  // namespace

torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v) {
  TORCH_CHECK(q.dim() == 2 && k.dim() == 4 && v.dim() == 3,
              "q [heads, dim], k [kv_heads, tiles, dim, 16], v [kv_heads, len, dim]");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "dtypes must match");
  TORCH_CHECK(k.stride(3) == 1 && k.stride(2) == kLanes && k.size(3) == kLanes, "k tiles must be contiguous");
  TORCH_CHECK(v.stride(2) == 1, "v rows must be contiguous");
  q = q.contiguous();
  const int64_t heads = q.size(0), head_dim = q.size(1), kv_heads = k.size(0), length = v.size(1);
  TORCH_CHECK(heads % kv_heads == 0 && k.size(2) == head_dim, "q and k shapes do not match");
  TORCH_CHECK(v.size(0) == kv_heads && v.size(2) == head_dim, "v shape does not match k");
  TORCH_CHECK(length > 0 && k.size(1) * kLanes >= length, "k has fewer tiles than v has positions");
  TORCH_CHECK(head_dim <= kMaxDim, "head_dim above ", kMaxDim, " is not supported by the CPU kernel");
  const int64_t group = heads / kv_heads;
  auto out = torch::empty_like(q);
  const double scale = 1.0 / std::sqrt(static_cast<double>(head_dim));
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "decode_attention", [&] {
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = k.data_ptr<scalar_t>();
    const scalar_t* vp = v.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, kv_heads, 1, [&](int64_t begin, int64_t end) {
      for (int64_t h = begin; h < end; ++h) {
        attend_group<scalar_t>(qp + h * group * head_dim, kp + h * k.stride(0), vp + h * v.stride(0),
                               op + h * group * head_dim, group, length, head_dim, k.stride(1), v.stride(1), scale);
      }
    });
  });
  return out;
}

// Decode attention over a paged KV pool, for a device that is the CPU itself. Each row attends to its own list of
// slots, so the cost follows the total context of the batch: nothing is gathered or padded to the longest row.
//
//   q       [rows, num_heads, head_dim]                 contiguous
//   k, v    [slots, num_kv_heads, head_dim]              one layer of the pool; a slot's head row is contiguous
//   slots   [total] int64                                each row's context slots, rows back to back
//   offsets [rows + 1] int64                             row r attends to slots[offsets[r] : offsets[r + 1]]
namespace {

template <typename scalar_t, int G>
void attend_paged(const scalar_t* q, const scalar_t* k, const scalar_t* v, scalar_t* out, const int64_t* slots,
                  int64_t length, int64_t head_dim, int64_t slot_stride, scalar_t scale) {
  scalar_t acc[G][kMaxDim] = {};
  scalar_t running_max[G], running_sum[G];
  for (int g = 0; g < G; ++g) {
    running_max[g] = -std::numeric_limits<scalar_t>::infinity();
    running_sum[g] = 0;
  }
  for (int64_t start = 0; start < length; start += kLanes) {
    const int64_t valid = std::min(kLanes, length - start);
    scalar_t score[G][kLanes];
    for (int64_t w = 0; w < valid; ++w) {
      const scalar_t* key = k + slots[start + w] * slot_stride;
      for (int g = 0; g < G; ++g) {
        scalar_t dot = 0;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < head_dim; ++d) dot += q[g * head_dim + d] * key[d];
        score[g][w] = dot * scale;
      }
    }
    for (int g = 0; g < G; ++g) {
      scalar_t tile_max = -std::numeric_limits<scalar_t>::infinity();
      for (int64_t w = 0; w < valid; ++w) tile_max = std::max(tile_max, score[g][w]);
      const scalar_t new_max = std::max(running_max[g], tile_max);
      const scalar_t correction = std::exp(running_max[g] - new_max);
      scalar_t tile_sum = 0;
      for (int64_t w = 0; w < valid; ++w) {
        score[g][w] = std::exp(score[g][w] - new_max);
        tile_sum += score[g][w];
      }
      running_sum[g] = running_sum[g] * correction + tile_sum;
      running_max[g] = new_max;
      if (correction != static_cast<scalar_t>(1)) {
#pragma omp simd
        for (int64_t d = 0; d < head_dim; ++d) acc[g][d] *= correction;
      }
    }
    for (int64_t w = 0; w < valid; ++w) {
      const scalar_t* value = v + slots[start + w] * slot_stride;
      for (int g = 0; g < G; ++g) {
        const scalar_t weight = score[g][w];
#pragma omp simd
        for (int64_t d = 0; d < head_dim; ++d) acc[g][d] += weight * value[d];
      }
    }
  }
  for (int g = 0; g < G; ++g) {
    const scalar_t inverse = static_cast<scalar_t>(1) / running_sum[g];
    for (int64_t d = 0; d < head_dim; ++d) out[g * head_dim + d] = acc[g][d] * inverse;
  }
}

}  // namespace

torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor slots,
                                     torch::Tensor offsets) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "q [rows, heads, dim], k and v [slots, kv_heads, dim]");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "dtypes must match");
  TORCH_CHECK(k.is_contiguous() && v.is_contiguous() && k.sizes() == v.sizes(), "k and v must be contiguous pools");
  TORCH_CHECK(slots.scalar_type() == torch::kLong && offsets.scalar_type() == torch::kLong, "slots must be int64");
  q = q.contiguous();
  slots = slots.contiguous();
  offsets = offsets.contiguous();
  const int64_t rows = q.size(0), heads = q.size(1), head_dim = q.size(2), kv_heads = k.size(1);
  TORCH_CHECK(heads % kv_heads == 0 && k.size(2) == head_dim, "q and k shapes do not match");
  TORCH_CHECK(offsets.size(0) == rows + 1, "offsets needs rows + 1 entries");
  TORCH_CHECK(head_dim <= kMaxDim, "head_dim above ", kMaxDim, " is not supported by the CPU kernel");
  const int64_t group = heads / kv_heads;
  auto out = torch::empty_like(q);
  const double scale = 1.0 / std::sqrt(static_cast<double>(head_dim));
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "paged_decode_attention", [&] {
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = k.data_ptr<scalar_t>();
    const scalar_t* vp = v.data_ptr<scalar_t>();
    const int64_t* sp = slots.data_ptr<int64_t>();
    const int64_t* op = offsets.data_ptr<int64_t>();
    scalar_t* outp = out.data_ptr<scalar_t>();
    const scalar_t s = static_cast<scalar_t>(scale);
    const int64_t slot_stride = kv_heads * head_dim;
    at::parallel_for(0, rows * kv_heads, 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t r = item / kv_heads, h = item % kv_heads;
        const int64_t length = op[r + 1] - op[r];
        for (int64_t g0 = 0; g0 < group; g0 += 4) {  // up to 4 query heads share one pass over the KV
          const scalar_t* qg = qp + (r * heads + h * group + g0) * head_dim;
          scalar_t* og = outp + (r * heads + h * group + g0) * head_dim;
          const scalar_t* kh = kp + h * head_dim;
          const scalar_t* vh = vp + h * head_dim;
          switch (std::min<int64_t>(4, group - g0)) {
            case 1: attend_paged<scalar_t, 1>(qg, kh, vh, og, sp + op[r], length, head_dim, slot_stride, s); break;
            case 2: attend_paged<scalar_t, 2>(qg, kh, vh, og, sp + op[r], length, head_dim, slot_stride, s); break;
            case 3: attend_paged<scalar_t, 3>(qg, kh, vh, og, sp + op[r], length, head_dim, slot_stride, s); break;
            default: attend_paged<scalar_t, 4>(qg, kh, vh, og, sp + op[r], length, head_dim, slot_stride, s);
          }
        }
      }
    });
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention, "GQA decode attention over one request's host KV");
  m.def("paged_decode_attention", &paged_decode_attention, "GQA decode attention over a paged KV pool on the CPU");
}
