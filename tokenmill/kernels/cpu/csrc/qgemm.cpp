// Quantized linears for small steps (decode): y = x W^T with W kept packed, in groups of 32 along K.
//   int4_linear: qweight uint8 [N, K/2], w = q * scale + zero, q in 0..15. In each group's 16 bytes, byte j
//     holds value j in its low nibble and value j + 16 in its high one (GGUF's Q4_0/Q4_1 layout).
//   int8_linear: qweight int8 [N, K], w = q * scale (GGUF's Q8_0).
// scales, zeros: float32 [N, K/32]. x is quantized once per call to int16 in groups of 32 (its own scale
// each), so a group's dot product is two integer multiply-adds (madd_epi16) and one float FMA: the float
// alternative (dequantize each weight, FMA) measured 1.5-2.5x slower, compute-bound. int16, not llama.cpp's
// int8 x (maddubs, measured no faster here): int8 x left 0.6% error per matmul and agreed with the float32
// model's greedy tokens on 60% of them instead of 87%; int16's rounding is below float32 accumulation's.
// Threads split the rows of W, each streaming its rows once for all M rows of x (which stay in cache).
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <vector>

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

#include "common.h"
#include "kernels.h"

namespace tokenmill {
namespace {

constexpr int64_t kGroup = 32;

// x [M, K] as int16 groups: x ~ q * scale, and each group's exact float sum (for the int4 zeros).
struct QuantizedX {
  std::vector<int16_t> q;
  std::vector<float> scale, sum;
};

QuantizedX quantize_rows(const float* x, int64_t m, int64_t k) {
  const int64_t groups = m * k / kGroup;
  constexpr float kMax = 32767.f;
  QuantizedX out{std::vector<int16_t>(m * k), std::vector<float>(groups), std::vector<float>(groups)};
  for (int64_t g = 0; g < groups; ++g) {
    const float* xs = x + g * kGroup;
    float amax = 0.f, sum = 0.f;
    for (int64_t j = 0; j < kGroup; ++j) {
      amax = std::max(amax, std::abs(xs[j]));
      sum += xs[j];
    }
    const float scale = amax / kMax, inv = amax > 0.f ? kMax / amax : 0.f;
    for (int64_t j = 0; j < kGroup; ++j) out.q[g * kGroup + j] = static_cast<int16_t>(std::nearbyint(xs[j] * inv));
    out.scale[g] = scale;
    out.sum[g] = sum;
  }
  return out;
}

// The pieces the tile loop below is written in: a group's 32 weights as int16 (`Weights`), their dot product
// with a group of x, and an accumulator of scale * dot terms (16 float lanes with AVX-512, 8 with AVX2, one
// float without).
#if defined(CPU_CAPABILITY_AVX512)
struct Weights {
  __m512i w;  // values 0..31
};
using Acc = __m512;
inline Acc acc_zero() { return _mm512_setzero_ps(); }
inline Acc acc_fma(float scale, Acc partial, Acc acc) { return _mm512_fmadd_ps(_mm512_set1_ps(scale), partial, acc); }
inline float acc_sum(Acc v) { return _mm512_reduce_add_ps(v); }
inline __m128i load16(const void* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }

// Sixteen int32 partial sums of w * x as floats, one multiply-add for the whole group (|w| <= 128,
// |x| <= 32767: each pair's sum fits int32, and float exactly).
inline Acc group_dot(const Weights& w, const int16_t* x) {
  return _mm512_cvtepi32_ps(_mm512_madd_epi16(w.w, _mm512_loadu_si512(x)));
}

struct Int4Row {
  const uint8_t* w;
  Weights load(int64_t g) const {  // low nibbles are values 0..15, high nibbles 16..31
    const __m128i b = load16(w + g * kGroup / 2), mask = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(b, mask), hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
    return {_mm512_cvtepu8_epi16(_mm256_set_m128i(hi, lo))};
  }
};

struct Int8Row {
  const int8_t* w;
  Weights load(int64_t g) const {
    return {_mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + g * kGroup)))};
  }
};
#elif defined(CPU_CAPABILITY_AVX2)
struct Weights {
  __m256i lo, hi;  // values 0..15, 16..31
};
using Acc = __m256;
inline Acc acc_zero() { return _mm256_setzero_ps(); }
inline Acc acc_fma(float scale, Acc partial, Acc acc) { return _mm256_fmadd_ps(_mm256_set1_ps(scale), partial, acc); }
inline float acc_sum(Acc v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s);
}
inline __m128i load16(const void* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }
inline __m256i load32(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// Eight int32 partial sums of w * x as floats (|w| <= 128, |x| <= 32767: each pair's sum fits int32).
inline Acc group_dot(const Weights& w, const int16_t* x) {
  const __m256i lo = _mm256_madd_epi16(w.lo, load32(x)), hi = _mm256_madd_epi16(w.hi, load32(x + 16));
  return _mm256_cvtepi32_ps(_mm256_add_epi32(lo, hi));
}

struct Int4Row {
  const uint8_t* w;
  Weights load(int64_t g) const {  // low nibbles are values 0..15, high nibbles 16..31
    const __m128i b = load16(w + g * kGroup / 2), mask = _mm_set1_epi8(0x0F);
    return {_mm256_cvtepu8_epi16(_mm_and_si128(b, mask)),
            _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(b, 4), mask))};
  }
};

struct Int8Row {
  const int8_t* w;
  Weights load(int64_t g) const {
    return {_mm256_cvtepi8_epi16(load16(w + g * kGroup)), _mm256_cvtepi8_epi16(load16(w + g * kGroup + 16))};
  }
};
#else
using Weights = std::array<int32_t, kGroup>;
using Acc = float;
inline Acc acc_zero() { return 0.f; }
inline Acc acc_fma(float scale, Acc partial, Acc acc) { return acc + scale * partial; }
inline float acc_sum(Acc v) { return v; }
inline Acc group_dot(const Weights& w, const int16_t* x) {
  int32_t sum = 0;
  for (int64_t j = 0; j < kGroup; ++j) sum += w[j] * x[j];
  return static_cast<float>(sum);
}

struct Int4Row {
  const uint8_t* w;
  Weights load(int64_t g) const {
    Weights out;
    for (int64_t j = 0; j < kGroup / 2; ++j) {
      out[j] = w[g * kGroup / 2 + j] & 0x0F;
      out[j + kGroup / 2] = w[g * kGroup / 2 + j] >> 4;
    }
    return out;
  }
};

struct Int8Row {
  const int8_t* w;
  Weights load(int64_t g) const {
    Weights out;
    for (int64_t j = 0; j < kGroup; ++j) out[j] = w[g * kGroup + j];
    return out;
  }
};
#endif

// out[t] = sum_g scale[g] * xscale_t[g] * <w_g, x_t,g> for T rows of quantized x (one weight row, loaded
// once per group for all T).
template <int T, typename Row>
void tile_dots(const Row& row, const float* scale, const QuantizedX& x, int64_t i0, int64_t k, float* out) {
  const int64_t groups = k / kGroup;
  Acc acc[T];
  for (int t = 0; t < T; ++t) acc[t] = acc_zero();
  for (int64_t g = 0; g < groups; ++g) {
    const Weights w = row.load(g);
    for (int t = 0; t < T; ++t) {
      const int64_t xg = (i0 + t) * groups + g;
      acc[t] = acc_fma(scale[g] * x.scale[xg], group_dot(w, x.q.data() + xg * kGroup), acc[t]);
    }
  }
  for (int t = 0; t < T; ++t) out[t] = acc_sum(acc[t]);
}

// tile_dots over rows i0 .. i0 + count of x, count <= 4 (four accumulator chains hide the FMA latency).
template <typename Row>
void dots(const Row& row, const float* scale, const QuantizedX& x, int64_t i0, int64_t count, int64_t k, float* out) {
  switch (count) {
    case 1: tile_dots<1>(row, scale, x, i0, k, out); break;
    case 2: tile_dots<2>(row, scale, x, i0, k, out); break;
    case 3: tile_dots<3>(row, scale, x, i0, k, out); break;
    default: tile_dots<4>(row, scale, x, i0, k, out);
  }
}

void check_args(const char* op, const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                int64_t k_per_row) {
  TORCH_CHECK(x.dim() == 2 && qweight.dim() == 2, op, ": x and qweight must be 2-D");
  const int64_t n = qweight.size(0), k = x.size(1);
  TORCH_CHECK(k % kGroup == 0 && qweight.size(1) == k_per_row, op, ": K must be a multiple of 32 and match "
              "qweight's row length");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.sizes() == at::IntArrayRef({n, k / kGroup}),
              op, ": scales must be float32 [N, K/32]");
}

constexpr int64_t kTile = 4;

// y [M, N] = x W^T in x's dtype; row_dots(r, x, i0, count, out) gives out[t] = W[r] . x[i0 + t], count <= kTile.
template <typename F>
at::Tensor linear(const at::Tensor& x, int64_t n, const F& row_dots) {
  const int64_t m = x.size(0), k = x.size(1);
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const QuantizedX xq = quantize_rows(xf.const_data_ptr<float>(), m, k);
  at::Tensor y = at::empty({m, n}, xf.options());
  float* ys = y.data_ptr<float>();
  parallel_rows(n, k, [&](int64_t begin, int64_t end) {
    float out[kTile];
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t i0 = 0; i0 < m; i0 += kTile) {
        const int64_t count = std::min(kTile, m - i0);
        row_dots(r, xq, i0, count, out);
        for (int64_t t = 0; t < count; ++t) ys[(i0 + t) * n + r] = out[t];
      }
    }
  });
  return y.to(x.scalar_type());
}

}  // namespace

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                       const at::Tensor& zeros) {
  check_args("int4_linear", x, qweight, scales, x.size(1) / 2);
  TORCH_CHECK(qweight.scalar_type() == at::kByte && zeros.sizes() == scales.sizes() &&
              zeros.scalar_type() == at::kFloat, "int4_linear: qweight must be uint8, zeros like scales");
  const at::Tensor qc = qweight.contiguous(), sc = scales.contiguous(), zc = zeros.contiguous();
  const int64_t k = x.size(1), groups = scales.size(1);
  const uint8_t* q = qc.const_data_ptr<uint8_t>();
  const float *s = sc.const_data_ptr<float>(), *z = zc.const_data_ptr<float>();
  return linear(x, qweight.size(0), [&](int64_t r, const QuantizedX& xq, int64_t i0, int64_t count, float* out) {
    dots(Int4Row{q + r * k / 2}, s + r * groups, xq, i0, count, k, out);
    // + sum_g zero_g * sum(x_g): the zeros taken exactly, against x's float sums
    for (int64_t t = 0; t < count; ++t) out[t] += dot(z + r * groups, xq.sum.data() + (i0 + t) * groups, groups);
  });
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales) {
  check_args("int8_linear", x, qweight, scales, x.size(1));
  TORCH_CHECK(qweight.scalar_type() == at::kChar, "int8_linear: qweight must be int8");
  const at::Tensor qc = qweight.contiguous(), sc = scales.contiguous();
  const int64_t k = x.size(1), groups = scales.size(1);
  const int8_t* q = qc.const_data_ptr<int8_t>();
  const float* s = sc.const_data_ptr<float>();
  return linear(x, qweight.size(0), [&](int64_t r, const QuantizedX& xq, int64_t i0, int64_t count, float* out) {
    dots(Int8Row{q + r * k}, s + r * groups, xq, i0, count, k, out);
  });
}

TORCH_LIBRARY_FRAGMENT(tokenmill, m) {
  m.def("int4_linear(Tensor x, Tensor qweight, Tensor scales, Tensor zeros) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor qweight, Tensor scales) -> Tensor");
}

TORCH_LIBRARY_IMPL(tokenmill, CPU, m) {
  m.impl("int4_linear", &int4_linear);
  m.impl("int8_linear", &int8_linear);
}

}  // namespace tokenmill
