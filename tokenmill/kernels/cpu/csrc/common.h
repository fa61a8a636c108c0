// Shared helpers of the CPU ops: the float types they take, and float conversion of rows.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace tokenmill {

using Vec = at::vec::Vectorized<float>;

// Registers of the register-tiled micro-kernels: raw intrinsics, since GCC spills arrays of
// at::vec::Vectorized to the stack.
#if defined(CPU_CAPABILITY_AVX512)
using Reg = __m512;
inline Reg reg_load(const float* p) { return _mm512_loadu_ps(p); }
inline Reg reg_set1(float v) { return _mm512_set1_ps(v); }
inline Reg reg_fma(Reg a, Reg b, Reg c) { return _mm512_fmadd_ps(a, b, c); }
inline void reg_store(float* p, Reg v) { _mm512_storeu_ps(p, v); }
inline Reg reg_add(Reg a, Reg b) { return _mm512_add_ps(a, b); }
inline Reg reg_mul(Reg a, Reg b) { return _mm512_mul_ps(a, b); }
#elif defined(CPU_CAPABILITY_AVX2)
using Reg = __m256;
inline Reg reg_load(const float* p) { return _mm256_loadu_ps(p); }
inline Reg reg_set1(float v) { return _mm256_set1_ps(v); }
inline Reg reg_fma(Reg a, Reg b, Reg c) { return _mm256_fmadd_ps(a, b, c); }
inline void reg_store(float* p, Reg v) { _mm256_storeu_ps(p, v); }
inline Reg reg_add(Reg a, Reg b) { return _mm256_add_ps(a, b); }
inline Reg reg_mul(Reg a, Reg b) { return _mm256_mul_ps(a, b); }
#else
using Reg = Vec;
inline Reg reg_load(const float* p) { return Vec::loadu(p); }
inline Reg reg_set1(float v) { return Vec(v); }
inline Reg reg_fma(Reg a, Reg b, Reg c) { return at::vec::fmadd(a, b, c); }
inline void reg_store(float* p, Reg v) { v.store(p); }
inline Reg reg_add(Reg a, Reg b) { return a + b; }
inline Reg reg_mul(Reg a, Reg b) { return a * b; }
#endif

// Calls f(scalar_t{}) for the activation and cache dtypes the engine runs: float32, bfloat16, float16.
template <typename F>
void dispatch_float(at::ScalarType type, const char* op, F&& f) {
  switch (type) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    case at::kHalf: f(c10::Half{}); break;
    default: TORCH_CHECK(false, op, ": dtype ", type, " is not supported (float32, bfloat16, float16)");
  }
}

template <typename T>
inline void to_float(const T* src, float* dst, int64_t n) {
  at::vec::convert(src, dst, n);
}

template <typename T>
inline void from_float(const float* src, T* dst, int64_t n) {
  at::vec::convert(src, dst, n);
}

// x rounded to T and back: reproduces the reference's intermediate roundings in low precision.
template <typename T>
inline float round_to(float x) {
  return static_cast<float>(static_cast<T>(x));
}

inline float dot(const float* a, const float* b, int64_t n) {
  constexpr int64_t V = Vec::size();
  Vec s0(0.f), s1(0.f), s2(0.f), s3(0.f);  // independent sums: long rows are not one chain of FMA latencies
  int64_t i = 0;
  for (; i + 4 * V <= n; i += 4 * V) {
    s0 = at::vec::fmadd(Vec::loadu(a + i), Vec::loadu(b + i), s0);
    s1 = at::vec::fmadd(Vec::loadu(a + i + V), Vec::loadu(b + i + V), s1);
    s2 = at::vec::fmadd(Vec::loadu(a + i + 2 * V), Vec::loadu(b + i + 2 * V), s2);
    s3 = at::vec::fmadd(Vec::loadu(a + i + 3 * V), Vec::loadu(b + i + 3 * V), s3);
  }
  for (; i + V <= n; i += V) s0 = at::vec::fmadd(Vec::loadu(a + i), Vec::loadu(b + i), s0);
  float s = ((s0 + s1) + (s2 + s3)).reduce_add();
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// Rows [begin, end) of a loop over `n` rows of `row_cost` elements each, threaded when big enough that
// the pool's wake-up pays off (small decode batches run inline on the calling thread).
template <typename F>
void parallel_rows(int64_t n, int64_t row_cost, const F& f) {
  constexpr int64_t kMinElementsPerTask = 1 << 15;
  const int64_t grain = std::max<int64_t>(1, kMinElementsPerTask / std::max<int64_t>(1, row_cost));
  at::parallel_for(0, n, grain, f);
}

}  // namespace tokenmill
