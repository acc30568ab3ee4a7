// Causal prefill attention over a paged KV pool on the CPU: every prefill span of an iteration (a whole prompt, or a
// later chunk of one) in one call, each reading its context's keys and values where they lie in the pool, through
// its page table: no gather of a context into a new tensor, no mask tensor. Its meaning is paged_prefill in
// omniserve/ops/reference.py; it is registered as the CPU kernel of the omniserve::paged_prefill operator.
//
//   q             [rows, heads, head_dim]        the spans' rows back to back; each row's heads contiguous
//   k/v_cache     [slots, kv_heads, head_dim]     one layer of the pool, contiguous
//   page_table    [spans, max_pages] int64
//   query_starts  [spans + 1] int64               span s is q's rows query_starts[s] .. query_starts[s + 1] - 1
//   context_lens  [spans] int64                   the positions span s reaches; its rows are the context's last ones
//   out           [rows, heads, head_dim]
//
// A work item is one block of a span's query rows for one KV head. Its "lines" (each row's query heads of that KV
// head's GQA group) stream the keys and values up to the block's last position once, in tiles of up to 64
// positions (16 KiB of fp32 keys, and as much of values):
//   - the tile is copied from its slots into two small buffers, the keys transposed in panels of 16 positions
//     (head_dim x 16), so 6 lines' 16 scores at a time are vertical FMAs over a panel: each key and value element
//     is read from the pool once for all the block's lines (up to 96), however scattered its pages;
//   - an online softmax folds each line's scores into its running max and sum;
//   - each line accumulates the tile's weighted value rows in registers.
// Causality is a prefix per line: a line's positions in a tile past its own weigh nothing and are never read, and no
// tile past the block's last row is visited (half the work of a dense mask over a whole prompt). Work items are
// taken by the threads one at a time, the costliest first.
// Math in fp32 for fp32, bf16 and fp16 data, in fp64 for fp64.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kLanes = 16;       // key positions scored together: 2 AVX2 registers (1 AVX-512) of fp32 a line
constexpr int64_t kTile = 64;        // key positions per tile, at most: a line's softmax update per tile
constexpr int64_t kTileElements = 64 * 64;  // a tile's keys (and its values) in 16 KiB of fp32: both stay in L1
constexpr int64_t kLineGroup = 6;    // lines scored together: their 6 x 16 scores stay in the 16 AVX2 registers
constexpr int64_t kBlockLines = 96;  // lines per work item, at most: each item streams its context's KV once
constexpr int64_t kMinBlockLines = 24;  // ... and at least, where smaller items would give every thread several
constexpr int64_t kItemsPerThread = 4;
constexpr int64_t kMaxDim = 256;

template <typename scalar_t>
using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// One call's inputs, as raw pointers and sizes.
template <typename scalar_t>
struct Problem {
  const scalar_t* q;
  const scalar_t* k;
  const scalar_t* v;
  const int64_t* page_table;
  const int64_t* query_starts;
  const int64_t* context_lens;
  scalar_t* out;
  int64_t q_row_stride, table_stride, page_size, heads, kv_heads, group, head_dim;
  double scale;
};

// A block of one span's query rows, for one KV head.
struct WorkItem {
  int64_t span, first_row, end_row, kv_head;  // rows relative to the span
};

// One thread's buffers, reused across its work items. Lines are padded to a whole group.
template <typename acc>
struct Scratch {
  std::vector<acc> q, out, score, running_max, running_sum, keys, values;
  std::vector<int64_t> position;
  Scratch(int64_t lines, int64_t dim)
      : q(lines * dim), out(lines * dim), score(lines * kTile), running_max(lines), running_sum(lines),
        keys(kTile * dim), values(kTile * dim), position(lines) {}
};

// The scores of 6 lines (q: 6 rows of DIM, already scaled) against 16 keys transposed (keys: DIM x 16), into rows
// of `score` kTile apart.
template <typename acc, int DIM>
inline void score_lines(const acc* __restrict q, const acc* __restrict keys, int64_t dynamic_dim,
                        acc* __restrict score) {
  const int64_t dim = DIM > 0 ? DIM : dynamic_dim;
  acc s[kLineGroup][kLanes] = {};
  for (int64_t d = 0; d < dim; ++d) {
    const acc* key = keys + d * kLanes;
    for (int64_t i = 0; i < kLineGroup; ++i) {
      const acc qd = q[i * dim + d];
#pragma omp simd
      for (int64_t w = 0; w < kLanes; ++w) s[i][w] += qd * key[w];
    }
  }
  for (int64_t i = 0; i < kLineGroup; ++i)
    for (int64_t w = 0; w < kLanes; ++w) score[i * kTile + w] = s[i][w];
}

// Adds a line's weighted value rows (values: kTile x DIM) to its output accumulator, rescaled first. Not inlined: on
// its own the compiler keeps the accumulator in registers across the rows (inlined, it spilled it to the stack).
template <typename acc, int DIM>
__attribute__((noinline)) void accumulate_values(const acc* __restrict weight, int64_t valid,
                                                 const acc* __restrict values, int64_t dynamic_dim, acc correction,
                                                 acc* __restrict out) {
  const int64_t dim = DIM > 0 ? DIM : dynamic_dim;
  acc local[DIM > 0 ? DIM : kMaxDim];
#pragma omp simd
  for (int64_t d = 0; d < dim; ++d) local[d] = out[d] * correction;
  for (int64_t w = 0; w < valid; ++w) {
    const acc p = weight[w];
#pragma omp simd
    for (int64_t d = 0; d < dim; ++d) local[d] += p * values[w * dim + d];
  }
#pragma omp simd
  for (int64_t d = 0; d < dim; ++d) out[d] = local[d];
}

// exp(x) for x <= 0, with x floored where exp is still a normal number too small to count: the vector exp of the
// C library takes a slow scalar path for every lane that underflows (an empty running max, a masked lane, a far
// lower score), and the weight it would give is far below what a sum that holds a 1 can register anyway.
template <typename acc>
inline acc exp_nonpositive(acc x) {
  constexpr acc floor = std::is_same_v<acc, double> ? acc(-700) : acc(-80);
  return std::exp(x > floor ? x : floor);
}

// Folds one line's tile of scores (the first `valid` of `width`) into its online softmax, leaving the weights in
// score, and adds the tile's weighted value rows to its output accumulator, rescaled first if the running max grew.
template <typename acc, int DIM>
inline void accumulate_line(acc* __restrict score, int64_t valid, int64_t width, const acc* __restrict values,
                            int64_t dim, acc& running_max, acc& running_sum, acc* __restrict out) {
  acc tile_max = running_max;  // a plain conditional: GCC vectorizes it, but not std::max under an omp reduction
  for (int64_t w = 0; w < width; ++w) tile_max = w < valid && score[w] > tile_max ? score[w] : tile_max;
  acc tile_sum = 0;
#pragma omp simd reduction(+ : tile_sum)
  for (int64_t w = 0; w < width; ++w) {
    score[w] = w < valid ? exp_nonpositive(score[w] - tile_max) : acc(0);
    tile_sum += score[w];
  }
  const acc correction = exp_nonpositive(running_max - tile_max);
  running_sum = running_sum * correction + tile_sum;
  running_max = tile_max;
  accumulate_values<acc, DIM>(score, valid, values, dim, correction, out);
}

// The slot of a span's position, through its page table row.
inline int64_t slot_of(const int64_t* table, int64_t position, int64_t page_size) {
  return table[position / page_size] * page_size + position % page_size;
}

// Copies the keys of positions start .. start + count - 1 into keys, transposed by panels of 16 positions
// (panels of dim x 16; lanes past count zero), and their value rows into values (count x dim). Copied
// once for all the block's lines, the tile is then read at fixed strides, in plain vector loads (value rows read
// through a pointer per position are not: the compiler gathers them lane by lane).
template <typename scalar_t, typename acc>
void gather_tile(const Problem<scalar_t>& p, const int64_t* table, int64_t kv_head, int64_t start, int64_t count,
                 acc* keys, acc* values) {
  const int64_t dim = p.head_dim, slot_stride = p.kv_heads * dim;
  if (count % kLanes) std::fill(keys, keys + kTile * dim, acc(0));
  for (int64_t w = 0; w < count; ++w) {
    const int64_t offset = slot_of(table, start + w, p.page_size) * slot_stride + kv_head * dim;
    const scalar_t* key = p.k + offset;
    const scalar_t* value = p.v + offset;
    acc* panel = keys + (w / kLanes) * dim * kLanes + w % kLanes;
    for (int64_t d = 0; d < dim; ++d) panel[d * kLanes] = static_cast<acc>(key[d]);
    for (int64_t d = 0; d < dim; ++d) values[w * dim + d] = static_cast<acc>(value[d]);
  }
}

// Asks for the key and value rows of positions start .. start + count - 1 ahead of their use: a context's rows are
// scattered over the pool's pages, beyond what the hardware prefetcher foresees, and a tile's arithmetic is long
// enough to hide the next tile's memory latency entirely.
template <typename scalar_t>
void prefetch_tile(const Problem<scalar_t>& p, const int64_t* table, int64_t kv_head, int64_t start, int64_t count) {
  const int64_t dim = p.head_dim, slot_stride = p.kv_heads * dim, bytes = dim * sizeof(scalar_t);
  for (int64_t w = 0; w < count; ++w) {
    const int64_t offset = slot_of(table, start + w, p.page_size) * slot_stride + kv_head * dim;
    const char* key = reinterpret_cast<const char*>(p.k + offset);
    const char* value = reinterpret_cast<const char*>(p.v + offset);
    for (int64_t byte = 0; byte < bytes; byte += 64) {
      __builtin_prefetch(key + byte, 0, 2);
      __builtin_prefetch(value + byte, 0, 2);
    }
  }
}

// Loads one work item's lines: their queries (scaled) and positions, empty accumulators.
template <typename scalar_t, typename acc>
int64_t load_lines(const Problem<scalar_t>& p, const WorkItem& item, Scratch<acc>& s) {
  const int64_t dim = p.head_dim, span_first = p.query_starts[item.span];
  const int64_t span_rows = p.query_starts[item.span + 1] - span_first;
  const int64_t first_position = p.context_lens[item.span] - span_rows;
  const int64_t lines = (item.end_row - item.first_row) * p.group;
  const acc scale = static_cast<acc>(p.scale);
  for (int64_t line = 0; line < lines; ++line) {
    const int64_t row = item.first_row + line / p.group, head = item.kv_head * p.group + line % p.group;
    const scalar_t* query = p.q + (span_first + row) * p.q_row_stride + head * dim;
    for (int64_t d = 0; d < dim; ++d) s.q[line * dim + d] = static_cast<acc>(query[d]) * scale;
    s.position[line] = first_position + row;
    s.running_max[line] = std::numeric_limits<acc>::lowest();
    s.running_sum[line] = 0;
  }
  // Lines up to a whole group are scored too (and ignored): zero queries, never a NaN from stale memory.
  const int64_t padded = (lines + kLineGroup - 1) / kLineGroup * kLineGroup;
  std::fill(s.q.begin() + lines * dim, s.q.begin() + padded * dim, acc(0));
  std::fill(s.position.begin() + lines, s.position.begin() + padded, s.position[lines - 1]);
  std::fill(s.out.begin(), s.out.begin() + lines * dim, acc(0));
  return lines;
}

// One tile of keys for every line of the work item. A group of lines scores only the panels its last line (the
// furthest position) reaches; a line only the positions up to its own.
template <typename acc, int DIM>
void attend_tile(Scratch<acc>& s, int64_t lines, int64_t start, int64_t tile, int64_t dim) {
  for (int64_t first = 0; first < lines; first += kLineGroup) {
    const int64_t reach = s.position[first + kLineGroup - 1] - start + 1;
    for (int64_t panel = 0; panel * kLanes < std::min(reach, tile); ++panel)
      score_lines<acc, DIM>(s.q.data() + first * dim, s.keys.data() + panel * dim * kLanes, dim,
                            s.score.data() + first * kTile + panel * kLanes);
  }
  for (int64_t line = 0; line < lines; ++line) {
    const int64_t valid = std::min(tile, s.position[line] - start + 1);
    if (valid <= 0) continue;  // a line before this tile (the diagonal)
    accumulate_line<acc, DIM>(s.score.data() + line * kTile, valid, tile, s.values.data(), dim, s.running_max[line],
                              s.running_sum[line], s.out.data() + line * dim);
  }
}

template <typename scalar_t, int DIM>
void attend_item(const Problem<scalar_t>& p, const WorkItem& item, Scratch<acc_t<scalar_t>>& s) {
  using acc = acc_t<scalar_t>;
  const int64_t dim = p.head_dim;
  const int64_t lines = load_lines(p, item, s);
  const int64_t key_end = s.position[lines - 1] + 1;  // the block's last row sees the most
  const int64_t* table = p.page_table + item.span * p.table_stride;
  const int64_t tile = std::clamp(kTileElements / dim / kLanes * kLanes, kLanes, kTile);
  for (int64_t start = 0; start < key_end; start += tile) {
    gather_tile(p, table, item.kv_head, start, std::min(tile, key_end - start), s.keys.data(), s.values.data());
    prefetch_tile(p, table, item.kv_head, start + tile, std::clamp<int64_t>(key_end - start - tile, 0, tile));
    attend_tile<acc, DIM>(s, lines, start, tile, dim);
  }
  const int64_t span_first = p.query_starts[item.span];
  for (int64_t line = 0; line < lines; ++line) {
    const int64_t row = item.first_row + line / p.group, head = item.kv_head * p.group + line % p.group;
    scalar_t* out = p.out + ((span_first + row) * p.heads + head) * dim;
    const acc inverse = acc(1) / s.running_sum[line];
    for (int64_t d = 0; d < dim; ++d) out[d] = static_cast<scalar_t>(s.out[line * dim + d] * inverse);
  }
}

// The rows of a work item: as many as kBlockLines allows (the fewer items, the fewer passes over the context's KV),
// fewer where that would leave a thread without several items to balance the causal triangle's uneven costs.
int64_t rows_per_item(int64_t rows, int64_t kv_heads, int64_t group) {
  const int64_t wanted_items = kItemsPerThread * at::get_num_threads();
  const int64_t for_threads = (rows * kv_heads + wanted_items - 1) / wanted_items;
  const int64_t fewest = std::max<int64_t>(1, kMinBlockLines / group), most = std::max<int64_t>(1, kBlockLines / group);
  return std::clamp(for_threads, fewest, most);
}

// Every span's blocks of rows, for every KV head, the costliest first (a block costs its rows times the positions
// it reaches), so that threads taking the next item as they finish end together.
std::vector<WorkItem> work_items(const int64_t* query_starts, const int64_t* context_lens, int64_t spans,
                                 int64_t kv_heads, int64_t block_rows) {
  std::vector<WorkItem> items;
  for (int64_t span = 0; span < spans; ++span) {
    const int64_t rows = query_starts[span + 1] - query_starts[span];
    for (int64_t first = 0; first < rows; first += block_rows)
      for (int64_t h = 0; h < kv_heads; ++h) items.push_back({span, first, std::min(rows, first + block_rows), h});
  }
  auto cost = [&](const WorkItem& item) {
    const int64_t span_rows = query_starts[item.span + 1] - query_starts[item.span];
    return (item.end_row - item.first_row) * (context_lens[item.span] - span_rows + item.end_row);
  };
  std::stable_sort(items.begin(), items.end(), [&](const WorkItem& a, const WorkItem& b) { return cost(a) > cost(b); });
  return items;
}

template <typename scalar_t>
void run_items(const Problem<scalar_t>& p, const std::vector<WorkItem>& items, int64_t block_rows) {
  std::atomic<int64_t> next{0};
  const int64_t count = static_cast<int64_t>(items.size());
  // One task per thread, each taking the next item when it is done with one: items differ in cost (the causal
  // triangle), which a static split of the list would not balance.
  at::parallel_for(0, std::min<int64_t>(count, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    Scratch<acc_t<scalar_t>> scratch(block_rows * p.group + kLineGroup - 1, p.head_dim);
    for (int64_t i = next++; i < count; i = next++) {
      if (p.head_dim == 64) {
        attend_item<scalar_t, 64>(p, items[i], scratch);
      } else if (p.head_dim == 128) {
        attend_item<scalar_t, 128>(p, items[i], scratch);
      } else {
        attend_item<scalar_t, 0>(p, items[i], scratch);
      }
    }
  });
}

void check_inputs(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const at::Tensor& page_table, const at::Tensor& query_starts, const at::Tensor& context_lens) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3, "q [rows, heads, dim], k_cache and v_cache [slots, kv_heads, dim]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.sizes() == v_cache.sizes(),
              "k_cache and v_cache must be contiguous pools of one shape");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(),
              "q and the pool must have one dtype");
  TORCH_CHECK(q.size(2) == k_cache.size(2) && q.size(1) % k_cache.size(1) == 0, "q and the pool's heads differ");
  TORCH_CHECK(q.size(2) <= kMaxDim, "head_dim above ", kMaxDim, " is not supported by the CPU kernel");
  for (const auto* index : {&page_table, &query_starts, &context_lens})
    TORCH_CHECK(index->scalar_type() == at::kLong && index->device().is_cpu(), "indexes must be int64 on the CPU");
  const int64_t spans = context_lens.numel();
  TORCH_CHECK(page_table.dim() == 2 && page_table.size(0) == spans && query_starts.numel() == spans + 1,
              "page_table [spans, max_pages] and query_starts [spans + 1] must match context_lens [spans]");
}

// The spans and their pages must be well formed: read through raw pointers, a bad index would read outside the pool.
void check_spans(const int64_t* query_starts, const int64_t* context_lens, const int64_t* page_table, int64_t spans,
                 int64_t rows, int64_t max_pages, int64_t page_size, int64_t num_slots) {
  TORCH_CHECK(query_starts[0] == 0 && query_starts[spans] == rows, "query_starts must run from 0 to q's rows");
  for (int64_t s = 0; s < spans; ++s) {
    const int64_t span_rows = query_starts[s + 1] - query_starts[s], context = context_lens[s];
    TORCH_CHECK(span_rows >= 0 && context >= span_rows && context <= max_pages * page_size,
                "span ", s, ": ", span_rows, " rows with a context of ", context, " positions");
    for (int64_t i = 0; i * page_size < context; ++i) {
      const int64_t page = page_table[s * max_pages + i], used = std::min(page_size, context - i * page_size);
      TORCH_CHECK(page >= 0 && page * page_size + used <= num_slots, "span ", s, ": page ", page,
                  " is outside the pool");
    }
  }
}

}  // namespace

at::Tensor paged_prefill(const at::Tensor& q_in, const at::Tensor& k_cache, const at::Tensor& v_cache,
                         const at::Tensor& page_table_in, const at::Tensor& query_starts_in,
                         const at::Tensor& context_lens_in, int64_t page_size) {
  check_inputs(q_in, k_cache, v_cache, page_table_in, query_starts_in, context_lens_in);
  TORCH_CHECK(page_size > 0, "page_size must be positive");
  // Rows of a QKV view are apart by more than their heads: taken as they are when each row's heads are contiguous.
  const bool rows_dense = q_in.stride(2) == 1 && q_in.stride(1) == q_in.size(2);
  const at::Tensor q = rows_dense ? q_in : q_in.contiguous();
  const at::Tensor page_table = page_table_in.contiguous(), query_starts = query_starts_in.contiguous();
  const at::Tensor context_lens = context_lens_in.contiguous();
  const int64_t rows = q.size(0), heads = q.size(1), head_dim = q.size(2), kv_heads = k_cache.size(1);
  const int64_t spans = context_lens.numel();
  check_spans(query_starts.data_ptr<int64_t>(), context_lens.data_ptr<int64_t>(), page_table.data_ptr<int64_t>(),
              spans, rows, page_table.size(1), page_size, k_cache.size(0));
  auto out = at::empty({rows, heads, head_dim}, q.options());
  if (rows == 0) return out;
  const int64_t group = heads / kv_heads;
  const int64_t block_rows = rows_per_item(rows, kv_heads, group);
  const auto items = work_items(query_starts.data_ptr<int64_t>(), context_lens.data_ptr<int64_t>(), spans, kv_heads,
                                block_rows);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_prefill", [&] {
    const Problem<scalar_t> problem{q.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(),
                                    v_cache.data_ptr<scalar_t>(), page_table.data_ptr<int64_t>(),
                                    query_starts.data_ptr<int64_t>(), context_lens.data_ptr<int64_t>(),
                                    out.data_ptr<scalar_t>(), q.stride(0), page_table.size(1), page_size, heads,
                                    kv_heads, group, head_dim, 1.0 / std::sqrt(static_cast<double>(head_dim))};
    run_items(problem, items, block_rows);
  });
  return out;
}

TORCH_LIBRARY_IMPL(omniserve, CPU, m) {
  m.impl("paged_prefill", &paged_prefill);
}
