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
#include <vector>

namespace {

constexpr int64_t kLanes = 16;  // positions per key tile: one 512-bit register of fp32 per query head

// Scores of `G` query heads against positions [0, length): per tile the G accumulators stay in registers while the
// tile (head_dim x 16, contiguous) streams past once. Lanes past `length` in the last tile are computed and dropped.
template <typename scalar_t, int G>
void score_tiles(const scalar_t* q, const scalar_t* k, scalar_t* scores, int64_t length, int64_t head_dim,
                 int64_t tile_stride, scalar_t scale) {
  for (int64_t start = 0; start < length; start += kLanes) {
    const scalar_t* tile = k + (start / kLanes) * tile_stride;
    scalar_t acc[G][kLanes] = {};
    for (int64_t d = 0; d < head_dim; ++d) {
      const scalar_t* key = tile + d * kLanes;
      for (int g = 0; g < G; ++g) {
        const scalar_t qd = q[g * head_dim + d];
#pragma omp simd
        for (int64_t w = 0; w < kLanes; ++w) acc[g][w] += qd * key[w];
      }
    }
    const int64_t valid = std::min(kLanes, length - start);
    for (int g = 0; g < G; ++g)
      for (int64_t w = 0; w < valid; ++w) scores[g * length + start + w] = acc[g][w] * scale;
  }
}

constexpr int64_t kDimChunk = 32;  // head dims accumulated at once in the value pass (G x 32 values in registers)

// out[g][:] = sum_t p[g][t] * v[t][:], with the accumulators of a chunk of head dims held in registers.
template <typename scalar_t, int G>
void weigh_values(const scalar_t* p, const scalar_t* v, scalar_t* out, int64_t length, int64_t head_dim,
                  int64_t v_row_stride) {
  for (int64_t d0 = 0; d0 < head_dim; d0 += kDimChunk) {
    const int64_t width = std::min(kDimChunk, head_dim - d0);
    scalar_t acc[G][kDimChunk] = {};
    if (width == kDimChunk) {
      for (int64_t t = 0; t < length; ++t) {
        const scalar_t* value = v + t * v_row_stride + d0;
        for (int g = 0; g < G; ++g) {
          const scalar_t weight = p[g * length + t];
#pragma omp simd
          for (int64_t d = 0; d < kDimChunk; ++d) acc[g][d] += weight * value[d];
        }
      }
    } else {
      for (int64_t t = 0; t < length; ++t)
        for (int g = 0; g < G; ++g)
          for (int64_t d = 0; d < width; ++d) acc[g][d] += p[g * length + t] * v[t * v_row_stride + d0 + d];
    }
    for (int g = 0; g < G; ++g)
      for (int64_t d = 0; d < width; ++d) out[g * head_dim + d0 + d] = acc[g][d];
  }
}

template <typename scalar_t>
void attend_group(const scalar_t* q, const scalar_t* k, const scalar_t* v, scalar_t* out, int64_t group,
                  int64_t length, int64_t head_dim, int64_t tile_stride, int64_t v_row_stride, double scale) {
  std::vector<scalar_t> scores(group * length);
  const scalar_t s = static_cast<scalar_t>(scale);
  // Groups of up to 4 heads share one pass over the keys (4 accumulators x 16 lanes fit the register file).
  for (int64_t g0 = 0; g0 < group; g0 += 4) {
    const scalar_t* qg = q + g0 * head_dim;
    scalar_t* sg = scores.data() + g0 * length;
    switch (std::min<int64_t>(4, group - g0)) {
      case 1: score_tiles<scalar_t, 1>(qg, k, sg, length, head_dim, tile_stride, s); break;
      case 2: score_tiles<scalar_t, 2>(qg, k, sg, length, head_dim, tile_stride, s); break;
      case 3: score_tiles<scalar_t, 3>(qg, k, sg, length, head_dim, tile_stride, s); break;
      default: score_tiles<scalar_t, 4>(qg, k, sg, length, head_dim, tile_stride, s); break;
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    scalar_t* row = scores.data() + g * length;
    const scalar_t peak = *std::max_element(row, row + length);
    scalar_t total = 0;
#pragma omp simd reduction(+ : total)
    for (int64_t t = 0; t < length; ++t) {
      row[t] = std::exp(row[t] - peak);
      total += row[t];
    }
    const scalar_t inverse = static_cast<scalar_t>(1) / total;
#pragma omp simd
    for (int64_t t = 0; t < length; ++t) row[t] *= inverse;
  }
  for (int64_t g0 = 0; g0 < group; g0 += 4) {
    const scalar_t* pg = scores.data() + g0 * length;
    scalar_t* og = out + g0 * head_dim;
    switch (std::min<int64_t>(4, group - g0)) {
      case 1: weigh_values<scalar_t, 1>(pg, v, og, length, head_dim, v_row_stride); break;
      case 2: weigh_values<scalar_t, 2>(pg, v, og, length, head_dim, v_row_stride); break;
      case 3: weigh_values<scalar_t, 3>(pg, v, og, length, head_dim, v_row_stride); break;
      default: weigh_values<scalar_t, 4>(pg, v, og, length, head_dim, v_row_stride); break;
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention, "GQA decode attention over one request's host KV");
}
