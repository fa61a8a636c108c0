// Structured outputs' token bitmask applied to logits in place: bit j of word w of a row's int32 mask
// allows token 32 * w + j; a forbidden token's logit becomes -inf. Grammar masks are long runs of words
// that are all ones (free text) or all zeros (a JSON punctuation state), so whole words are skipped or
// overwritten and only the mixed words go bit by bit.
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "common.h"

namespace tokenmill {
namespace {

constexpr int64_t kMinElementsPerTask = 1 << 21;

template <typename T>
T neg_inf() {
  return static_cast<T>(-std::numeric_limits<float>::infinity());
}

// The logits [0, n) of one mixed word whose bit is clear in `allowed` (n <= 32) become -inf.
template <typename T>
inline void mask_word(T* x, uint32_t allowed, int64_t n) {
  uint32_t forbidden = ~allowed;
  if (n < 32) forbidden &= (1u << n) - 1;
#if defined(CPU_CAPABILITY_AVX512)
  if (n == 32) {  // masked stores: the forbidden bits are the store mask
    if constexpr (std::is_same_v<T, float>) {
      const __m512 inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
      _mm512_mask_storeu_ps(x, static_cast<__mmask16>(forbidden), inf);
      _mm512_mask_storeu_ps(x + 16, static_cast<__mmask16>(forbidden >> 16), inf);
    } else {  // bfloat16 and float16: 32 two-byte lanes in one register
      _mm512_mask_storeu_epi16(x, static_cast<__mmask32>(forbidden),
                               _mm512_set1_epi16(static_cast<short>(neg_inf<T>().x)));
    }
    return;
  }
#endif
  const T v = neg_inf<T>();
  for (; forbidden; forbidden &= forbidden - 1) x[__builtin_ctz(forbidden)] = v;
}

template <typename T>
void mask_row(T* x, const int32_t* words, int64_t vocab) {
  const T v = neg_inf<T>();
  for (int64_t w = 0; w * 32 < vocab; ++w) {
    const uint32_t allowed = static_cast<uint32_t>(words[w]);
    const int64_t n = std::min<int64_t>(32, vocab - w * 32);
    if (allowed == 0xffffffffu) continue;
    if (allowed == 0) {
      std::fill_n(x + w * 32, n, v);  // vectorized by the compiler
    } else {
      mask_word(x + w * 32, allowed, n);
    }
  }
}

// logits [batch, width] and bitmask [batch, words]: rows `indices` of both (all rows if none given), over the
// first min(width, 32 * words) tokens, as xgrammar's apply_token_bitmask_inplace.
void apply_token_bitmask(const at::Tensor& logits, const at::Tensor& bitmask, const c10::optional<at::Tensor>& indices) {
  TORCH_CHECK(logits.dim() == 2 && bitmask.dim() == 2 && logits.size(0) == bitmask.size(0),
              "apply_token_bitmask: logits [batch, vocab] and bitmask [batch, words] must share their rows");
  TORCH_CHECK(bitmask.scalar_type() == at::kInt, "apply_token_bitmask: bitmask must be int32");
  TORCH_CHECK(logits.stride(1) == 1, "apply_token_bitmask: logits rows must be contiguous");
  const at::Tensor mask = bitmask.contiguous();
  const int64_t batch = logits.size(0), words = mask.size(1);
  const int64_t vocab = std::min(logits.size(1), 32 * words);
  std::vector<int64_t> rows;
  if (indices.has_value()) {
    const at::Tensor idx = indices->to(at::kLong).contiguous();
    rows.assign(idx.const_data_ptr<int64_t>(), idx.const_data_ptr<int64_t>() + idx.numel());
    for (const int64_t r : rows) TORCH_CHECK(0 <= r && r < batch, "apply_token_bitmask: row ", r, " out of range");
  } else {
    for (int64_t r = 0; r < batch; ++r) rows.push_back(r);
  }
  dispatch_float(logits.scalar_type(), "apply_token_bitmask", [&](auto tag) {
    using T = decltype(tag);
    T* x = logits.data_ptr<T>();
    const int32_t* m = mask.const_data_ptr<int32_t>();
    // Threaded only for big batches: a step's 16 rows of 50k logits take ~0.2 ms on one core, less than
    // what waiting on a busy second core can cost.
    const int64_t grain = std::max<int64_t>(1, kMinElementsPerTask / std::max<int64_t>(1, vocab));
    at::parallel_for(0, static_cast<int64_t>(rows.size()), grain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) mask_row(x + rows[i] * logits.stride(0), m + rows[i] * words, vocab);
    });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tokenmill, m) {
  m.def("apply_token_bitmask(Tensor(a!) logits, Tensor bitmask, Tensor? indices) -> ()");
}

TORCH_LIBRARY_IMPL(tokenmill, CPU, m) {
  m.impl("apply_token_bitmask", &apply_token_bitmask);
}

}  // namespace tokenmill
