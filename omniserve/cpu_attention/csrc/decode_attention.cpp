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
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kLanes = 16;     // positions per key tile: one 512-bit register of fp32 per query head
constexpr int64_t kMaxDim = 256;    // largest head_dim the fused kernel takes
constexpr int64_t kParallelElements = 1 << 16;  // KV elements a batch reads before it is split over threads

// Where one KV head's context lies. The pass over it (attend below) is the same for both layouts; only the scoring
// of a tile of 16 positions and the address of a position's value row differ.
//
// A request's host KV: keys in tiles transposed inside (head_dim x 16, contiguous), values as rows. A tile's scores
// are pure vertical FMAs over one contiguous block, with no horizontal sums.
template <typename scalar_t>
struct TiledKV {
  const scalar_t* k;
  const scalar_t* v;
  int64_t tile_stride;
  int64_t v_row_stride;

  // score[g][w] = q[g] . key[start + w] (unscaled) for the tile that starts at `start`; unused lanes hold the zero
  // padding of the tile.
  template <int G>
  inline void score_tile(const scalar_t* q, int64_t head_dim, int64_t start, int64_t /*valid*/,
                         scalar_t (&score)[G][kLanes]) const {
    const scalar_t* tile = k + (start / kLanes) * tile_stride;
    for (int64_t d = 0; d < head_dim; ++d) {
      const scalar_t* key = tile + d * kLanes;
      for (int g = 0; g < G; ++g) {
        const scalar_t qd = q[g * head_dim + d];
#pragma omp simd
        for (int64_t w = 0; w < kLanes; ++w) score[g][w] += qd * key[w];
      }
    }
  }

  inline const scalar_t* value(int64_t position) const { return v + position * v_row_stride; }
};

// A row of a paged pool: each position is a slot of the pool, whose key and value rows are contiguous over head_dim,
// so a score is a dot product over one gathered row.
template <typename scalar_t>
struct PagedKV {
  const scalar_t* k;
  const scalar_t* v;
  const int64_t* slots;
  int64_t slot_stride;

  template <int G>
  inline void score_tile(const scalar_t* q, int64_t head_dim, int64_t start, int64_t valid,
                         scalar_t (&score)[G][kLanes]) const {
    for (int64_t w = 0; w < valid; ++w) {
      const scalar_t* key = k + slots[start + w] * slot_stride;
      for (int g = 0; g < G; ++g) {
        scalar_t dot = 0;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < head_dim; ++d) dot += q[g * head_dim + d] * key[d];
        score[g][w] = dot;
      }
    }
  }

  inline const scalar_t* value(int64_t position) const { return v + slots[position] * slot_stride; }
};

// A row of a paged pool in another dtype than the computation's (bf16 or fp16 KV, computed in fp32): a tile's key rows
// are converted as they are scored and its value rows into a small buffer, once, so the context is read once and
// never gathered. The buffer makes the object per thread: it is built inside each parallel task.
template <typename scalar_t, typename kv_t>
struct ConvertedPagedKV {
  const kv_t* k;
  const kv_t* v;
  const int64_t* slots;
  int64_t slot_stride;
  int64_t head_dim;
  mutable scalar_t values[kLanes * kMaxDim];  // not initialised: each tile fills the rows it reads

  ConvertedPagedKV(const kv_t* k, const kv_t* v, const int64_t* slots, int64_t slot_stride, int64_t head_dim)
      : k(k), v(v), slots(slots), slot_stride(slot_stride), head_dim(head_dim) {}

  template <int G>
  inline void score_tile(const scalar_t* q, int64_t dim, int64_t start, int64_t valid,
                         scalar_t (&score)[G][kLanes]) const {
    scalar_t key[kMaxDim];
    for (int64_t w = 0; w < valid; ++w) {
      const kv_t* key_row = k + slots[start + w] * slot_stride;
      const kv_t* value_row = v + slots[start + w] * slot_stride;
      scalar_t* value = values + w * dim;
      for (int64_t d = 0; d < dim; ++d) {
        key[d] = static_cast<scalar_t>(key_row[d]);
        value[d] = static_cast<scalar_t>(value_row[d]);
      }
      for (int g = 0; g < G; ++g) {
        scalar_t dot = 0;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < dim; ++d) dot += q[g * dim + d] * key[d];
        score[g][w] = dot;
      }
    }
  }

  inline const scalar_t* value(int64_t position) const { return values + (position % kLanes) * head_dim; }
};

// A request's host KV whose first `prefix_length` positions are full pages of the prefix cache's host tier, read in
// place where every offloaded request with that prefix reads them, then the request's own tiled KV. The tier is in
// the model's dtype (bf16 beside a GPU), read as a converted paged KV. prefix_length is a multiple of 16, so a tile
// lies wholly in one part.
template <typename scalar_t, typename prefix_t>
struct PrefixedKV {
  ConvertedPagedKV<scalar_t, prefix_t> prefix;
  int64_t prefix_length;
  TiledKV<scalar_t> own;

  PrefixedKV(const prefix_t* k, const prefix_t* v, const int64_t* slots, int64_t slot_stride, int64_t prefix_length,
             int64_t head_dim, TiledKV<scalar_t> own)
      : prefix(k, v, slots, slot_stride, head_dim), prefix_length(prefix_length), own(own) {}

  template <int G>
  inline void score_tile(const scalar_t* q, int64_t dim, int64_t start, int64_t valid,
                         scalar_t (&score)[G][kLanes]) const {
    if (start >= prefix_length) {
      own.template score_tile<G>(q, dim, start - prefix_length, valid, score);
    } else {
      prefix.template score_tile<G>(q, dim, start, valid, score);
    }
  }

  inline const scalar_t* value(int64_t position) const {
    return position >= prefix_length ? own.value(position - prefix_length) : prefix.value(position);
  }
};

// The online-softmax step for one query head and one tile: folds the tile's scores into the running max and sum,
// rescales the output accumulator if the max grew, and leaves the tile's weights exp(score * scale - max) in
// `score` (0 in lanes past `valid`), ready to weight the tile's value rows.
template <typename scalar_t>
inline void online_softmax_tile(scalar_t (&score)[kLanes], int64_t valid, scalar_t scale, scalar_t& running_max,
                                scalar_t& running_sum, scalar_t* acc, int64_t head_dim) {
  scalar_t tile_max = -std::numeric_limits<scalar_t>::infinity();
  for (int64_t w = 0; w < valid; ++w) tile_max = std::max(tile_max, score[w] * scale);
  const scalar_t new_max = std::max(running_max, tile_max);
  const scalar_t correction = std::exp(running_max - new_max);
  scalar_t tile_sum = 0;
#pragma omp simd reduction(+ : tile_sum)
  for (int64_t w = 0; w < kLanes; ++w) {
    score[w] = w < valid ? std::exp(score[w] * scale - new_max) : static_cast<scalar_t>(0);
    tile_sum += score[w];
  }
  running_sum = running_sum * correction + tile_sum;
  running_max = new_max;
  if (correction != static_cast<scalar_t>(1)) {
#pragma omp simd
    for (int64_t d = 0; d < head_dim; ++d) acc[d] *= correction;
  }
}

// One pass over the context with an online softmax: per tile of 16 positions, the group's scores are computed with
// the accumulators in registers, turned into weights, and the tile's value rows are accumulated right away, so K and
// V are each read exactly once and no score array is kept.
// DIM > 0 fixes head_dim at compile time (the common 64 and 128), so the accumulators can live in registers.
template <typename scalar_t, int G, int DIM, typename KV>
void attend(const scalar_t* q, const KV& kv, scalar_t* out, int64_t length, int64_t dynamic_dim, scalar_t scale) {
  const int64_t head_dim = DIM > 0 ? DIM : dynamic_dim;
  scalar_t acc[G][kMaxDim] = {};
  scalar_t running_max[G], running_sum[G];
  for (int g = 0; g < G; ++g) {
    running_max[g] = -std::numeric_limits<scalar_t>::infinity();
    running_sum[g] = 0;
  }
  for (int64_t start = 0; start < length; start += kLanes) {
    const int64_t valid = std::min(kLanes, length - start);
    scalar_t score[G][kLanes] = {};
    kv.template score_tile<G>(q, head_dim, start, valid, score);
    for (int g = 0; g < G; ++g) {
      online_softmax_tile(score[g], valid, scale, running_max[g], running_sum[g], acc[g], head_dim);
    }
    for (int64_t w = 0; w < valid; ++w) {
      const scalar_t* value = kv.value(start + w);
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

template <typename scalar_t, int DIM, typename KV>
void dispatch_group(int64_t heads, const scalar_t* q, const KV& kv, scalar_t* out, int64_t length, int64_t head_dim,
                    scalar_t scale) {
  switch (heads) {
    case 1: return attend<scalar_t, 1, DIM>(q, kv, out, length, head_dim, scale);
    case 2: return attend<scalar_t, 2, DIM>(q, kv, out, length, head_dim, scale);
    case 3: return attend<scalar_t, 3, DIM>(q, kv, out, length, head_dim, scale);
    default: return attend<scalar_t, 4, DIM>(q, kv, out, length, head_dim, scale);
  }
}

// The query heads of one GQA group (q and out: [group, head_dim]) over their KV head's context.
template <typename scalar_t, typename KV>
void attend_group(const scalar_t* q, const KV& kv, scalar_t* out, int64_t group, int64_t length, int64_t head_dim,
                  double scale) {
  const scalar_t s = static_cast<scalar_t>(scale);
  // Up to 4 query heads share one pass over the KV (their score accumulators fit the register file).
  for (int64_t g0 = 0; g0 < group; g0 += 4) {
    const scalar_t* qg = q + g0 * head_dim;
    scalar_t* og = out + g0 * head_dim;
    const int64_t heads_here = std::min<int64_t>(4, group - g0);
    if (head_dim == 64) {
      dispatch_group<scalar_t, 64>(heads_here, qg, kv, og, length, head_dim, s);
    } else if (head_dim == 128) {
      dispatch_group<scalar_t, 128>(heads_here, qg, kv, og, length, head_dim, s);
    } else {
      dispatch_group<scalar_t, 0>(heads_here, qg, kv, og, length, head_dim, s);
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
        const TiledKV<scalar_t> kv{kp + h * k.stride(0), vp + h * v.stride(0), k.stride(1), v.stride(1)};
        attend_group(qp + h * group * head_dim, kv, op + h * group * head_dim, group, length, head_dim, scale);
      }
    });
  });
  return out;
}

// decode_attention for a request whose context starts with a prefix in the prefix cache's host tier (PrefixedKV):
//
//   prefix_k, prefix_v [slots, num_kv_heads, head_dim]   one layer of the host tier (any floating dtype), contiguous
//   prefix_slots       [prefix_length] int64             the prefix's slots there, prefix_length a multiple of 16
//   k, v                                                 the request's own KV after the prefix, as decode_attention's
torch::Tensor prefixed_decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor prefix_k,
                                        torch::Tensor prefix_v, torch::Tensor prefix_slots) {
  TORCH_CHECK(q.dim() == 2 && k.dim() == 4 && v.dim() == 3 && prefix_k.dim() == 3,
              "q [heads, dim], k [kv_heads, tiles, dim, 16], v [kv_heads, len, dim], prefix_k [slots, kv_heads, dim]");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "dtypes must match");
  TORCH_CHECK(prefix_k.scalar_type() == prefix_v.scalar_type() && prefix_k.is_contiguous() &&
                  prefix_v.is_contiguous() && prefix_k.sizes() == prefix_v.sizes(),
              "the prefix's k and v must be contiguous layers of one dtype");
  TORCH_CHECK(k.stride(3) == 1 && k.stride(2) == kLanes && k.size(3) == kLanes, "k tiles must be contiguous");
  TORCH_CHECK(v.stride(2) == 1, "v rows must be contiguous");
  TORCH_CHECK(prefix_slots.scalar_type() == torch::kLong && prefix_slots.dim() == 1, "prefix_slots must be int64");
  q = q.contiguous();
  prefix_slots = prefix_slots.contiguous();
  const int64_t heads = q.size(0), head_dim = q.size(1), kv_heads = k.size(0), own_length = v.size(1);
  const int64_t prefix_length = prefix_slots.size(0);
  TORCH_CHECK(prefix_length % kLanes == 0, "the prefix's length must be a multiple of ", kLanes);
  TORCH_CHECK(heads % kv_heads == 0 && k.size(2) == head_dim && prefix_k.size(1) == kv_heads &&
                  prefix_k.size(2) == head_dim, "q, k and the prefix's shapes do not match");
  TORCH_CHECK(v.size(0) == kv_heads && v.size(2) == head_dim, "v shape does not match k");
  TORCH_CHECK(k.size(1) * kLanes >= own_length, "k has fewer tiles than v has positions");
  TORCH_CHECK(prefix_length + own_length > 0, "no context to attend to");
  TORCH_CHECK(head_dim <= kMaxDim, "head_dim above ", kMaxDim, " is not supported by the CPU kernel");
  const int64_t* sp = prefix_slots.data_ptr<int64_t>();
  for (int64_t i = 0; i < prefix_length; ++i)
    TORCH_CHECK(sp[i] >= 0 && sp[i] < prefix_k.size(0), "prefix slot ", sp[i], " is outside the host tier");
  const int64_t group = heads / kv_heads;
  auto out = torch::empty_like(q);
  const double scale = 1.0 / std::sqrt(static_cast<double>(head_dim));
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "prefixed_decode_attention", [&] {
    using own_t = scalar_t;
    const own_t* qp = q.data_ptr<own_t>();
    const own_t* kp = k.data_ptr<own_t>();
    const own_t* vp = v.data_ptr<own_t>();
    own_t* op = out.data_ptr<own_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, prefix_k.scalar_type(), "prefix", [&] {
      const scalar_t* pk = prefix_k.data_ptr<scalar_t>();
      const scalar_t* pv = prefix_v.data_ptr<scalar_t>();
      at::parallel_for(0, kv_heads, 1, [&](int64_t begin, int64_t end) {
        for (int64_t h = begin; h < end; ++h) {
          const TiledKV<own_t> own{kp + h * k.stride(0), vp + h * v.stride(0), k.stride(1), v.stride(1)};
          const PrefixedKV<own_t, scalar_t> kv{pk + h * head_dim, pv + h * head_dim, sp, kv_heads * head_dim,
                                                prefix_length, head_dim, own};
          attend_group(qp + h * group * head_dim, kv, op + h * group * head_dim, group, prefix_length + own_length,
                       head_dim, scale);
        }
      });
    });
  });
  return out;
}

namespace {

// The pass over every (row, KV head) of a paged batch: scalar_t, the computation's dtype; kv_t, the pool's.
template <typename scalar_t, typename kv_t>
void paged_pass(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out, const int64_t* sp,
                const int64_t* op, int64_t kv_heads, double scale) {
  const int64_t rows = q.size(0), heads = q.size(1), head_dim = q.size(2), group = heads / kv_heads;
  const int64_t slot_stride = kv_heads * head_dim;
  const scalar_t* qp = q.data_ptr<scalar_t>();
  scalar_t* outp = out.data_ptr<scalar_t>();
  const kv_t* kp = k.data_ptr<kv_t>();
  const kv_t* vp = v.data_ptr<kv_t>();
  // One task per (row, KV head) only where the batch's context is long enough to pay for waking the other
  // threads: a short decode batch stays on the calling thread.
  const int64_t context = op[rows] - op[0];
  const int64_t grain = context * kv_heads * head_dim >= kParallelElements ? 1 : rows * kv_heads;
  at::parallel_for(0, rows * kv_heads, grain, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t r = item / kv_heads, h = item % kv_heads;
      const int64_t length = op[r + 1] - op[r];
      const int64_t first = (r * heads + h * group) * head_dim;
      if constexpr (std::is_same_v<scalar_t, kv_t>) {
        const PagedKV<scalar_t> kv{kp + h * head_dim, vp + h * head_dim, sp + op[r], slot_stride};
        attend_group(qp + first, kv, outp + first, group, length, head_dim, scale);
      } else {
        const ConvertedPagedKV<scalar_t, kv_t> kv{kp + h * head_dim, vp + h * head_dim, sp + op[r], slot_stride,
                                                  head_dim};
        attend_group(qp + first, kv, outp + first, group, length, head_dim, scale);
      }
    }
  });
}

}  // namespace

// Decode attention over a paged KV pool, for a device that is the CPU itself. Each row attends to its own list of
// slots, so the cost follows the total context of the batch: nothing is gathered or padded to the longest row.
// It is the same pass as decode_attention's (attend), reading each row's slots in place (PagedKV).
//
//   q       [rows, num_heads, head_dim]                 contiguous
//   k, v    [slots, num_kv_heads, head_dim]              one layer of the pool; a slot's head row is contiguous
//   slots   [total] int64                                each row's context slots, rows back to back
//   offsets [rows + 1] int64                             row r attends to slots[offsets[r] : offsets[r + 1]]
//
// fp32 and fp64 are computed as they are; a bf16 or fp16 pool (the model's dtype) in fp32, each tile converted as it
// is read (ConvertedPagedKV), never gathered.
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor slots,
                                     torch::Tensor offsets) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "q [rows, heads, dim], k and v [slots, kv_heads, dim]");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "dtypes must match");
  TORCH_CHECK(k.is_contiguous() && v.is_contiguous() && k.sizes() == v.sizes(), "k and v must be contiguous pools");
  TORCH_CHECK(slots.scalar_type() == torch::kLong && offsets.scalar_type() == torch::kLong, "slots must be int64");
  slots = slots.contiguous();
  offsets = offsets.contiguous();
  const int64_t rows = q.size(0), heads = q.size(1), head_dim = q.size(2), kv_heads = k.size(1);
  TORCH_CHECK(heads % kv_heads == 0 && k.size(2) == head_dim, "q and k shapes do not match");
  TORCH_CHECK(offsets.size(0) == rows + 1, "offsets needs rows + 1 entries");
  TORCH_CHECK(head_dim <= kMaxDim, "head_dim above ", kMaxDim, " is not supported by the CPU kernel");
  const double scale = 1.0 / std::sqrt(static_cast<double>(head_dim));
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t* op = offsets.data_ptr<int64_t>();
  switch (k.scalar_type()) {
    case torch::kFloat:
    case torch::kDouble: {
      q = q.contiguous();
      auto out = torch::empty_like(q);
      if (q.scalar_type() == torch::kFloat) {
        paged_pass<float, float>(q, k, v, out, sp, op, kv_heads, scale);
      } else {
        paged_pass<double, double>(q, k, v, out, sp, op, kv_heads, scale);
      }
      return out;
    }
    case torch::kBFloat16:
    case torch::kHalf: {  // the model's dtype: computed in fp32, each tile converted as it is read
      const auto q32 = q.to(torch::kFloat).contiguous();
      auto out = torch::empty_like(q32);
      if (k.scalar_type() == torch::kBFloat16) {
        paged_pass<float, c10::BFloat16>(q32, k, v, out, sp, op, kv_heads, scale);
      } else {
        paged_pass<float, c10::Half>(q32, k, v, out, sp, op, kv_heads, scale);
      }
      return out.to(q.scalar_type());
    }
    default:
      TORCH_CHECK(false, "paged decode attention takes fp32, fp64, bf16 or fp16, not ", k.scalar_type());
  }
}

// The omniserve::paged_decode operator on the CPU (its meaning: omniserve/ops/reference.py): the same pass, each
// row's slots read from its page table.
//
//   page_table   [rows, max_pages] int64 or int32      a row's pages; only the first ceil(context / page_size) are read
//   context_lens [rows] int64 or int32                 at least 1
at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& page_table, const at::Tensor& context_lens, int64_t page_size) {
  TORCH_CHECK(page_table.dim() == 2 && context_lens.dim() == 1 && page_table.size(0) == context_lens.size(0) &&
                  context_lens.size(0) == q.size(0),
              "page_table [rows, max_pages] and context_lens [rows] for q's rows");
  const auto table = page_table.to(torch::kLong).contiguous();
  const auto lens = context_lens.to(torch::kLong).contiguous();
  const int64_t rows = q.size(0), max_pages = table.size(1), num_slots = k_cache.size(0);
  const int64_t* tp = table.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  auto offsets = torch::empty({rows + 1}, torch::kLong);
  int64_t* op = offsets.data_ptr<int64_t>();
  op[0] = 0;
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(lp[r] >= 1 && lp[r] <= max_pages * page_size, "row ", r, "'s context does not fit its page table");
    op[r + 1] = op[r] + lp[r];
  }
  auto slots = torch::empty({op[rows]}, torch::kLong);
  int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < lp[r]; ++i) {
      const int64_t slot = tp[r * max_pages + i / page_size] * page_size + i % page_size;
      TORCH_CHECK(slot >= 0 && slot < num_slots, "row ", r, " reads slot ", slot, ", outside the pool");
      sp[op[r] + i] = slot;
    }
  }
  return paged_decode_attention(q, k_cache, v_cache, slots, offsets);
}

TORCH_LIBRARY_IMPL(omniserve, CPU, m) { m.impl("paged_decode", &paged_decode); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention, "GQA decode attention over one request's host KV");
  m.def("prefixed_decode_attention", &prefixed_decode_attention,
        "GQA decode attention over a prefix in the prefix cache's host tier, then one request's host KV");
  m.def("paged_decode_attention", &paged_decode_attention, "GQA decode attention over a paged KV pool on the CPU");
}
