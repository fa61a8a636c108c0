// Paged attention on the CPU: one call for decode, chunked prefill and prefix-cached prefill.
//
// The work is cut into items: a tile of a few queries of one sequence, all heads, over a range of that
// sequence's keys. An item walks the cache pages its block table names (each page's slots hold every KV head
// side by side, so it streams whole pages, prefetching the next keys), and uses each KV head's keys for all
// the query rows of its GQA group, with an online softmax in float32. Decode-sized tiles take one dot product
// per key; prefill-sized ones gather a block of keys (transposed) and values to float32 once per KV head and
// compute the scores and the P.V product as register-tiled matrix products over all the tile's rows of that
// head, as a flash-attention kernel does. When there are too few items to keep
// every thread busy (small decode batches), each tile's keys are split across several items whose
// unnormalised partial results are merged afterwards (flash-decoding). Threads pull items, longest first,
// from a shared counter.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "common.h"
#include "kernels.h"

namespace tokenmill {
namespace {

// A tile holds up to kQueriesPerTile queries, fewer when the model has many heads (the tile's float32
// queries and accumulators should stay in the L2 cache).
constexpr int64_t kQueriesPerTile = 64;
constexpr int64_t kMaxTileRows = 1024;
// Splitting aims at this many items per thread, never cutting a key range below kMinKeysPerSplit.
constexpr int64_t kItemsPerThread = 4;
constexpr int64_t kMinKeysPerSplit = 128;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Item {
  int32_t seq;
  int32_t q_begin, q_end;  // the sequence's own query indices
  int32_t key_begin, key_end;
  int64_t partial;  // first row of its partial results; -1: it writes the output itself
};

// A tile whose keys were split: its items are items[first, first + count), merged into the output.
struct SplitTile {
  int64_t first, count;
};

template <typename T>
struct Args {
  const T* q;
  int64_t q_stride_t, q_stride_h;
  const T* k_cache;
  const T* v_cache;
  int64_t k_stride_block, k_stride_slot, k_stride_head;
  int64_t v_stride_block, v_stride_slot, v_stride_head;
  const int32_t* block_tables;
  int64_t table_stride;
  const int32_t* seq_lens;
  const int32_t* query_start_loc;
  T* out;
  int64_t out_stride_t, out_stride_h;
  float* part_acc;  // [partial rows, head_dim]: unnormalised sum of p * v
  float* part_ml;   // [partial rows, 2]: running max and softmax denominator
  int64_t head_dim, group, num_kv_heads, block_size;
  float scale;
};

// The decode path takes keys a page at a time, up to kKeyTile: fewer rescales of the running softmax than
// a key at a time.
constexpr int64_t kKeyTile = 16;
// The prefill path's register tiles: kRowTile query rows by kTileVecs vectors (of keys for the scores, of
// head_dim for P.V), 24 accumulators of the 32 AVX-512 registers, 12 of AVX2's 16. A key block is one
// tile's width of keys, gathered across pages.
constexpr int kRowTile = 6;
constexpr int kTileVecs = Vec::size() >= 16 ? 4 : 2;
constexpr int64_t kKeyBlock = kTileVecs * Vec::size();
// Tiles with at least this many rows per KV head take the prefill path.
constexpr int64_t kTiledMinRows = kRowTile;

// One thread's buffers, sized for the largest tile.
struct Scratch {
  std::vector<float> q, acc, m, l, alpha, scores, kt, k, v;
  Scratch(int64_t rows, int64_t head_dim)
      : q(rows * head_dim), acc(rows * head_dim), m(rows), l(rows), alpha(rows),
        scores(rows * std::max(kKeyBlock, kKeyTile)), kt(head_dim * kKeyBlock), k(kKeyTile * head_dim),
        v(std::max(kKeyBlock, kKeyTile) * head_dim) {}
};

// `n` cache rows as float32: the rows themselves for a float32 cache, else converted into `buf`.
template <typename T>
const float* rows_as_float(const T* rows, int64_t stride, int64_t n, int64_t head_dim, float* buf,
                           int64_t* float_stride) {
  if constexpr (std::is_same_v<T, float>) {
    *float_stride = stride;
    return rows;
  } else {
    for (int64_t i = 0; i < n; ++i) to_float(rows + i * stride, buf + i * head_dim, head_dim);
    *float_stride = head_dim;
    return buf;
  }
}

// Calls f(std::integral_constant<int, R>{}, first) over `rows` rows in tiles of R = kRowTile, then the rest.
template <typename F>
void by_row_tiles(int64_t rows, const F& f) {
  int64_t r = 0;
  for (; r + kRowTile <= rows; r += kRowTile) f(std::integral_constant<int, kRowTile>{}, r);
  switch (rows - r) {
    case 1: f(std::integral_constant<int, 1>{}, r); break;
    case 2: f(std::integral_constant<int, 2>{}, r); break;
    case 3: f(std::integral_constant<int, 3>{}, r); break;
    case 4: f(std::integral_constant<int, 4>{}, r); break;
    case 5: f(std::integral_constant<int, 5>{}, r); break;
    default: break;
  }
  static_assert(kRowTile == 6);
}

// scores[j][i] = q[j] . k[i] for R rows and a key block given transposed, kt[d][i]: a broadcast element
// of each row against each vector of keys.
template <int R>
void block_scores(const float* q, int64_t head_dim, const float* kt, float* scores) {
  Reg s[R][kTileVecs];
  for (int j = 0; j < R; ++j) {
    for (int c = 0; c < kTileVecs; ++c) s[j][c] = reg_set1(0.f);
  }
  for (int64_t d = 0; d < head_dim; ++d) {
    Reg k[kTileVecs];
    for (int c = 0; c < kTileVecs; ++c) k[c] = reg_load(kt + d * kKeyBlock + c * Vec::size());
    for (int j = 0; j < R; ++j) {
      const Reg qd = reg_set1(q[j * head_dim + d]);
      for (int c = 0; c < kTileVecs; ++c) s[j][c] = reg_fma(qd, k[c], s[j][c]);
    }
  }
  for (int j = 0; j < R; ++j) {
    for (int c = 0; c < kTileVecs; ++c) reg_store(scores + j * kKeyBlock + c * Vec::size(), s[j][c]);
  }
}

// acc[j][d:d + W vectors] = alpha[j] * acc[j][...] + sum_i p[j][i] v[i][...] for R rows and n keys.
template <int R, int W>
void block_pv(const float* p, int64_t p_stride, const float* alpha, int64_t n, const float* v, int64_t v_stride,
              int64_t head_dim, int64_t d, float* acc) {
  Reg o[R][W];
  for (int j = 0; j < R; ++j) {
    const Reg a = reg_set1(alpha[j]);
    for (int c = 0; c < W; ++c) o[j][c] = reg_mul(a, reg_load(acc + j * head_dim + d + c * Vec::size()));
  }
  for (int64_t i = 0; i < n; ++i) {
    Reg vi[W];
    for (int c = 0; c < W; ++c) vi[c] = reg_load(v + i * v_stride + d + c * Vec::size());
    for (int j = 0; j < R; ++j) {
      const Reg pj = reg_set1(p[j * p_stride + i]);
      for (int c = 0; c < W; ++c) o[j][c] = reg_fma(pj, vi[c], o[j][c]);
    }
  }
  for (int j = 0; j < R; ++j) {
    for (int c = 0; c < W; ++c) reg_store(acc + j * head_dim + d + c * Vec::size(), o[j][c]);
  }
}

// acc[j] = alpha[j] * acc[j] + sum_i p[j][i] v[i] over all of head_dim, for R rows and n keys.
template <int R>
void rows_pv(const float* p, int64_t p_stride, const float* alpha, int64_t n, const float* v, int64_t v_stride,
             int64_t head_dim, float* acc) {
  constexpr int64_t V = Vec::size();
  int64_t d = 0;
  for (; d + kTileVecs * V <= head_dim; d += kTileVecs * V) {
    block_pv<R, kTileVecs>(p, p_stride, alpha, n, v, v_stride, head_dim, d, acc);
  }
  for (; d + V <= head_dim; d += V) block_pv<R, 1>(p, p_stride, alpha, n, v, v_stride, head_dim, d, acc);
  for (; d < head_dim; ++d) {
    for (int j = 0; j < R; ++j) {
      float o = acc[j * head_dim + d] * alpha[j];
      for (int64_t i = 0; i < n; ++i) o += p[j * p_stride + i] * v[i * v_stride + d];
      acc[j * head_dim + d] = o;
    }
  }
}

// Turns one row's scores of n keys into exp(score - new max) in place and folds them into its running max
// m and denominator l. Returns the factor that rescales the row's earlier accumulator.
float softmax_block(float* p, int64_t n, float& m, float& l) {
  const float block_max = at::vec::reduce_all([](Vec x, Vec y) { return at::vec::maximum(x, y); }, p, n);
  const float m_new = std::max(m, block_max);
  const float alpha = m == kNegInf ? 0.f : std::exp(m - m_new);
  at::vec::map([m_new](Vec s) { return (s - Vec(m_new)).exp_u20(); }, p, p, n);
  const float block_sum = at::vec::reduce_all([](Vec x, Vec y) { return x + y; }, p, n);
  l = l * alpha + block_sum;
  m = m_new;
  return alpha;
}

// Hints the cache lines of slots [offset, offset + n) of a page (every KV head) into the cache.
template <typename T>
void prefetch_slots(const T* cache, int64_t stride_block, int64_t stride_slot, int64_t page, int64_t offset,
                    int64_t n, int64_t slot_elems) {
  const char* first = reinterpret_cast<const char*>(cache + page * stride_block + offset * stride_slot);
  const int64_t bytes = ((n - 1) * stride_slot + slot_elems) * static_cast<int64_t>(sizeof(T));
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(first + b);
}

// The decode path: a page of keys at a time, a dot product per key and query row, the next keys prefetched.
template <typename T>
void attend_by_dot(const Args<T>& a, const Item& it, Scratch& s, int64_t head_rows, int64_t context) {
  const int64_t D = a.head_dim, G = a.group, B = a.block_size;
  const int32_t* table = a.block_tables + it.seq * a.table_stride;
  for (int64_t key = it.key_begin; key < it.key_end;) {
    const int64_t offset = key % B;
    const int64_t n = std::min({B - offset, it.key_end - key, kKeyTile});
    const int64_t page = table[key / B];
    const int64_t next = key + n;
    if (next < it.key_end) {  // the next keys load while these compute
      const int64_t next_n = std::min({B - next % B, it.key_end - next, kKeyTile}), next_page = table[next / B];
      const int64_t slot_elems = a.num_kv_heads * D;
      prefetch_slots(a.k_cache, a.k_stride_block, a.k_stride_slot, next_page, next % B, next_n, slot_elems);
      prefetch_slots(a.v_cache, a.v_stride_block, a.v_stride_slot, next_page, next % B, next_n, slot_elems);
    }
    for (int64_t h = 0; h < a.num_kv_heads; ++h) {
      const T* k_rows = a.k_cache + page * a.k_stride_block + offset * a.k_stride_slot + h * a.k_stride_head;
      const T* v_rows = a.v_cache + page * a.v_stride_block + offset * a.v_stride_slot + h * a.v_stride_head;
      int64_t k_stride = 0, v_stride = 0;
      const float* k = rows_as_float(k_rows, a.k_stride_slot, n, D, s.k.data(), &k_stride);
      const float* v = rows_as_float(v_rows, a.v_stride_slot, n, D, s.v.data(), &v_stride);
      for (int64_t j = 0; j < head_rows; ++j) {
        const int64_t r = h * head_rows + j;
        // Causal: the query at position context + q sees keys up to its own position.
        const int64_t visible = std::min(n, context + it.q_begin + j / G + 1 - key);
        if (visible <= 0) continue;
        float* p = s.scores.data();
        for (int64_t i = 0; i < visible; ++i) p[i] = dot(s.q.data() + r * D, k + i * k_stride, D);
        const float alpha = softmax_block(p, visible, s.m[r], s.l[r]);
        rows_pv<1>(p, 0, &alpha, visible, v, v_stride, D, s.acc.data() + r * D);
      }
    }
    key += n;
  }
}

// The prefill path (head_dim a whole number of vectors): per block of kKeyBlock keys and KV head, the keys
// transposed and the values gathered to float32 once, then register-tiled scores and P.V over the rows.
template <typename T>
void attend_tiled(const Args<T>& a, const Item& it, Scratch& s, int64_t head_rows, int64_t context) {
  const int64_t D = a.head_dim, G = a.group, B = a.block_size;
  const int32_t* table = a.block_tables + it.seq * a.table_stride;
  float *kt = s.kt.data(), *v = s.v.data(), *scores = s.scores.data();
  for (int64_t key = it.key_begin; key < it.key_end; key += kKeyBlock) {
    const int64_t n = std::min(kKeyBlock, it.key_end - key);
    // Rows go by query, so the rows that see any of these keys are a suffix: from the first query whose
    // position (context + q) reaches `key`. Each of them sees at least one key of the block.
    const int64_t first_row = std::max<int64_t>(0, key - context - it.q_begin) * G, tile_rows = head_rows - first_row;
    if (n < kKeyBlock) std::fill(s.kt.begin(), s.kt.end(), 0.f);
    for (int64_t h = 0; h < a.num_kv_heads; ++h) {
      for (int64_t i = 0; i < n; ++i) {
        const int64_t page = table[(key + i) / B], slot = (key + i) % B;
        const T* k_row = a.k_cache + page * a.k_stride_block + slot * a.k_stride_slot + h * a.k_stride_head;
        for (int64_t d = 0; d < D; ++d) kt[d * kKeyBlock + i] = static_cast<float>(k_row[d]);
        to_float(a.v_cache + page * a.v_stride_block + slot * a.v_stride_slot + h * a.v_stride_head, v + i * D, D);
      }
      const float* q = s.q.data() + (h * head_rows + first_row) * D;
      by_row_tiles(tile_rows, [&](auto tile, int64_t j) {
        block_scores<decltype(tile)::value>(q + j * D, D, kt, scores + j * kKeyBlock);
      });
      for (int64_t j = 0; j < tile_rows; ++j) {
        const int64_t r = h * head_rows + first_row + j;
        const int64_t visible = std::min(n, context + it.q_begin + (first_row + j) / G + 1 - key);
        float* p = scores + j * kKeyBlock;
        s.alpha[j] = softmax_block(p, visible, s.m[r], s.l[r]);
        std::fill(p + visible, p + n, 0.f);  // causal: the keys past the query's own position
      }
      float* acc = s.acc.data() + (h * head_rows + first_row) * D;
      by_row_tiles(tile_rows, [&](auto tile, int64_t j) {
        rows_pv<decltype(tile)::value>(scores + j * kKeyBlock, kKeyBlock, s.alpha.data() + j, n, v, D, D,
                                       acc + j * D);
      });
    }
  }
}

template <typename T>
void run_item(const Args<T>& a, const Item& it, Scratch& s) {
  const int64_t D = a.head_dim, G = a.group;
  // Rows are grouped by KV head: row r is KV head r / head_rows's query q_begin + (r % head_rows) / G, at
  // query head (r / head_rows) * G + r % G.
  const int64_t head_rows = (it.q_end - it.q_begin) * G, rows = head_rows * a.num_kv_heads;
  auto query_of = [&](int64_t r) { return it.q_begin + (r % head_rows) / G; };
  auto head_of = [&](int64_t r) { return (r / head_rows) * G + r % G; };
  const int64_t q_start = a.query_start_loc[it.seq];
  const int64_t context = a.seq_lens[it.seq] - (a.query_start_loc[it.seq + 1] - q_start);
  for (int64_t r = 0; r < rows; ++r) {
    float* dst = s.q.data() + r * D;
    to_float(a.q + (q_start + query_of(r)) * a.q_stride_t + head_of(r) * a.q_stride_h, dst, D);
    at::vec::map([&](Vec x) { return x * Vec(a.scale); }, dst, dst, D);
  }
  std::fill_n(s.m.begin(), rows, kNegInf);
  std::fill_n(s.l.begin(), rows, 0.f);
  std::fill_n(s.acc.begin(), rows * D, 0.f);
  if (head_rows >= kTiledMinRows && D % Vec::size() == 0) {
    attend_tiled(a, it, s, head_rows, context);
  } else {
    attend_by_dot(a, it, s, head_rows, context);
  }

  for (int64_t r = 0; r < rows; ++r) {
    float* acc = s.acc.data() + r * D;
    if (it.partial >= 0) {
      std::copy_n(acc, D, a.part_acc + (it.partial + r) * D);
      a.part_ml[(it.partial + r) * 2] = s.m[r];
      a.part_ml[(it.partial + r) * 2 + 1] = s.l[r];
    } else {
      // Every query sees key 0, so l > 0 for a tile that was not split.
      const float inv = 1.f / s.l[r];
      at::vec::map([inv](Vec x) { return x * Vec(inv); }, acc, acc, D);
      from_float(acc, a.out + (q_start + query_of(r)) * a.out_stride_t + head_of(r) * a.out_stride_h, D);
    }
  }
}

// Rescales each split's partial result to the common max and normalises their sum into the output.
template <typename T>
void merge_split(const Args<T>& a, const std::vector<Item>& items, const SplitTile& tile, std::vector<float>& acc) {
  const int64_t D = a.head_dim, G = a.group;
  const Item& first = items[tile.first];
  const int64_t head_rows = (first.q_end - first.q_begin) * G, rows = head_rows * a.num_kv_heads;
  const int64_t q_start = a.query_start_loc[first.seq];
  for (int64_t r = 0; r < rows; ++r) {
    float m = kNegInf;
    for (int64_t i = 0; i < tile.count; ++i) m = std::max(m, a.part_ml[(items[tile.first + i].partial + r) * 2]);
    std::fill(acc.begin(), acc.end(), 0.f);
    float l = 0.f;
    for (int64_t i = 0; i < tile.count; ++i) {
      const int64_t p = items[tile.first + i].partial + r;
      const float mi = a.part_ml[p * 2];
      if (mi == kNegInf) continue;  // this split held no key the query sees
      const float w = std::exp(mi - m);
      l += w * a.part_ml[p * 2 + 1];
      at::vec::map2([w](Vec x, Vec y) { return at::vec::fmadd(Vec(w), y, x); }, acc.data(), acc.data(),
                    a.part_acc + p * D, D);
    }
    const float inv = 1.f / l;
    at::vec::map([inv](Vec x) { return x * Vec(inv); }, acc.data(), acc.data(), D);
    const int64_t query = first.q_begin + (r % head_rows) / G, head = (r / head_rows) * G + r % G;
    from_float(acc.data(), a.out + (q_start + query) * a.out_stride_t + head * a.out_stride_h, D);
  }
}

// Tiles every sequence's queries, splits the key ranges when the tiles are too few for the threads, and
// numbers the partial-result rows of split items. Returns the number of partial rows.
int64_t plan_items(const int32_t* seq_lens, const int32_t* query_start_loc, int64_t num_seqs, int64_t num_heads,
                   int64_t num_threads, std::vector<Item>& items, std::vector<SplitTile>& splits) {
  const int32_t tile_queries = std::clamp<int64_t>(kMaxTileRows / num_heads, 1, kQueriesPerTile);
  std::vector<Item> tiles;
  for (int32_t seq = 0; seq < num_seqs; ++seq) {
    const int32_t q_len = query_start_loc[seq + 1] - query_start_loc[seq];
    const int32_t context = seq_lens[seq] - q_len;
    for (int32_t q = 0; q < q_len; q += tile_queries) {
      const int32_t q_end = std::min(q_len, q + tile_queries);
      tiles.push_back({seq, q, q_end, 0, context + q_end, -1});
    }
  }
  const int64_t wanted = kItemsPerThread * num_threads;
  const int64_t max_splits = num_threads > 1 && !tiles.empty() ? (wanted + tiles.size() - 1) / tiles.size() : 1;
  int64_t partial_rows = 0;
  for (const Item& tile : tiles) {
    const int64_t num_keys = tile.key_end;
    const int64_t num_splits = std::min(max_splits, std::max<int64_t>(1, num_keys / kMinKeysPerSplit));
    if (num_splits == 1) {
      items.push_back(tile);
      continue;
    }
    splits.push_back({static_cast<int64_t>(items.size()), num_splits});
    const int64_t rows = (tile.q_end - tile.q_begin) * num_heads;
    for (int64_t i = 0; i < num_splits; ++i) {
      Item part = tile;
      part.key_begin = static_cast<int32_t>(num_keys * i / num_splits);
      part.key_end = static_cast<int32_t>(num_keys * (i + 1) / num_splits);
      part.partial = partial_rows;
      partial_rows += rows;
      items.push_back(part);
    }
  }
  return partial_rows;
}

}  // namespace

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_tables, const at::Tensor& seq_lens,
                           const at::Tensor& query_start_loc, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.dim() == 4,
              "paged_attention: q is [tokens, heads, head_dim], caches [blocks, block_size, kv_heads, head_dim]");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(),
              "paged_attention: q and the caches must share a dtype");
  TORCH_CHECK(q.stride(2) == 1 && k_cache.stride(3) == 1 && v_cache.stride(3) == 1,
              "paged_attention: head_dim must be contiguous");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt &&
                  query_start_loc.scalar_type() == at::kInt,
              "paged_attention: block_tables, seq_lens and query_start_loc must be int32");
  const int64_t num_heads = q.size(1), head_dim = q.size(2), num_kv_heads = k_cache.size(2);
  TORCH_CHECK(num_heads % num_kv_heads == 0, "paged_attention: query heads must be a multiple of KV heads");
  const at::Tensor tables = block_tables.contiguous(), lens = seq_lens.contiguous(),
                   starts = query_start_loc.contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options());
  if (q.size(0) == 0) return out;

  const int64_t group = num_heads / num_kv_heads;
  const int64_t num_threads = at::get_num_threads();
  std::vector<Item> items;
  std::vector<SplitTile> splits;
  const int64_t partial_rows = plan_items(lens.data_ptr<int32_t>(), starts.data_ptr<int32_t>(), lens.size(0),
                                          num_heads, num_threads, items, splits);
  at::Tensor part_acc = at::empty({partial_rows, head_dim}, q.options().dtype(at::kFloat));
  at::Tensor part_ml = at::empty({partial_rows, 2}, q.options().dtype(at::kFloat));
  // Longest first, so the last items handed out are short and the threads finish together.
  std::vector<int64_t> order(items.size());
  std::iota(order.begin(), order.end(), 0);
  auto cost = [&](const Item& it) { return int64_t{it.q_end - it.q_begin} * (it.key_end - it.key_begin); };
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return cost(items[x]) > cost(items[y]); });
  int64_t max_rows = 0;
  for (const Item& it : items) max_rows = std::max<int64_t>(max_rows, (it.q_end - it.q_begin) * num_heads);

  dispatch_float(q.scalar_type(), "paged_attention", [&](auto tag) {
    using T = decltype(tag);
    const Args<T> a{
        q.const_data_ptr<T>(), q.stride(0), q.stride(1),
        k_cache.const_data_ptr<T>(), v_cache.const_data_ptr<T>(),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        tables.const_data_ptr<int32_t>(), tables.stride(0),
        lens.const_data_ptr<int32_t>(), starts.const_data_ptr<int32_t>(),
        out.data_ptr<T>(), out.stride(0), out.stride(1),
        part_acc.data_ptr<float>(), part_ml.data_ptr<float>(),
        head_dim, group, num_kv_heads, k_cache.size(1), static_cast<float>(scale)};
    std::atomic<int64_t> next{0};
    const int64_t workers = std::min<int64_t>(num_threads, items.size());
    at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
      Scratch s(max_rows, head_dim);
      for (int64_t i = next++; i < static_cast<int64_t>(items.size()); i = next++) run_item(a, items[order[i]], s);
    });
    at::parallel_for(0, splits.size(), 1, [&](int64_t begin, int64_t end) {
      std::vector<float> acc(head_dim);
      for (int64_t i = begin; i < end; ++i) merge_split(a, items, splits[i], acc);
    });
  });
  return out;
}

TORCH_LIBRARY_IMPL(tokenmill, CPU, m) {
  m.impl("paged_attention", &paged_attention);
}

}  // namespace tokenmill
