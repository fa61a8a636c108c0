// The `tokenmill` op schemas, and the CPU kernels of the small per-layer ops: RMSNorm (with the residual add
// fused in), SiLU-and-mul, rotary embedding, and the KV-cache write (alone or fused with rotary). They
// compute in float32; where the reference rounds an intermediate to the activation dtype (RMSNorm, as
// Llama does), they round there too.
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "common.h"
#include "kernels.h"

namespace tokenmill {
namespace {

// One row: out = weight * round(h * rsqrt(mean(h^2) + eps)), h the float32 row.
template <typename T>
void rms_norm_row(float* h, const T* weight, float* w_buf, T* out, int64_t hidden, float eps) {
  const float mean_sq = at::vec::map_reduce_all([](Vec x) { return x * x; },
                                                [](Vec x, Vec y) { return x + y; }, h, hidden) / hidden;
  const float inv = 1.f / std::sqrt(mean_sq + eps);
  to_float(weight, w_buf, hidden);
  for (int64_t i = 0; i < hidden; ++i) h[i] = w_buf[i] * round_to<T>(h[i] * inv);
  from_float(h, out, hidden);
}

// Calls f(x_row, out_row, h, w_buf) over the rows of x [..., hidden], threaded for big batches.
template <typename T, typename F>
void for_each_row(const at::Tensor& x, const F& f) {
  const int64_t hidden = x.size(-1), rows = x.numel() / std::max<int64_t>(1, hidden);
  parallel_rows(rows, hidden, [&](int64_t begin, int64_t end) {
    std::vector<float> h(hidden), w_buf(hidden);
    for (int64_t r = begin; r < end; ++r) f(r, h.data(), w_buf.data());
  });
}

// (rms_norm(x + residual), x + residual), the sum rounded to the activation dtype first as the reference does.

// silu(gate) * up of x [..., 2 * d] = cat(gate, up), in float32.

// NeoX-style (rotate-half) rotation of `num_heads` heads of one token, in place, by cos/sin [head_dim / 2].
template <typename T>
void rotate_heads(T* x, int64_t head_stride, int64_t num_heads, int64_t head_dim, const float* cos,
                  const float* sin, float* buf) {
  const int64_t half = head_dim / 2;
  for (int64_t h = 0; h < num_heads; ++h) {
    T* head = x + h * head_stride;
    to_float(head, buf, head_dim);
    for (int64_t i = 0; i < half; ++i) {
      const float x1 = buf[i], x2 = buf[half + i];
      buf[head_dim + i] = x1 * cos[i] - x2 * sin[i];
      buf[head_dim + half + i] = x2 * cos[i] + x1 * sin[i];
    }
    from_float(buf + head_dim, head, head_dim);
  }
}

// Copies one token's [num_kv_heads, head_dim] rows into the cache slot `slot` (page * block_size + offset).
template <typename T>
void write_slot(const T* src, int64_t src_head_stride, T* cache, const at::Tensor& cache_t, int64_t slot,
                int64_t num_heads, int64_t head_dim) {
  const int64_t block_size = cache_t.size(1);
  T* dst = cache + (slot / block_size) * cache_t.stride(0) + (slot % block_size) * cache_t.stride(1);
  for (int64_t h = 0; h < num_heads; ++h) {
    std::copy_n(src + h * src_head_stride, head_dim, dst + h * cache_t.stride(2));
  }
}

void check_cache_args(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache, const at::Tensor& v_cache,
                      const at::Tensor& slot_mapping) {
  TORCH_CHECK(k.scalar_type() == k_cache.scalar_type() && v.scalar_type() == v_cache.scalar_type(),
              "write_kv_cache: k, v and the caches must share a dtype");
  TORCH_CHECK(k.stride(2) == 1 && v.stride(2) == 1 && k_cache.stride(3) == 1 && v_cache.stride(3) == 1,
              "write_kv_cache: head_dim must be contiguous");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong, "write_kv_cache: slot_mapping must be int64");
}

// The shared body of the rotary and cache-writing ops: per token, rotate q and k (when cos is defined) and
// write k, v into the caches (when the caches are defined and the slot is not -1).
void rotate_and_write(const at::Tensor& positions, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& k_cache,
                      const at::Tensor& v_cache, const at::Tensor& slot_mapping) {
  const bool rotate = cos.defined(), write = k_cache.defined();
  const int64_t num_tokens = k.size(0), num_kv_heads = k.size(1), head_dim = k.size(2);
  const int64_t num_heads = rotate ? q.size(1) : 0;
  const at::Tensor pos = rotate ? positions.to(at::kLong).contiguous() : at::Tensor();
  const at::Tensor cos_c = rotate ? cos.to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor sin_c = rotate ? sin.to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor slots = write ? slot_mapping.contiguous() : at::Tensor();
  dispatch_float(k.scalar_type(), "rotary_and_cache", [&](auto tag) {
    using T = decltype(tag);
    parallel_rows(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, [&](int64_t begin, int64_t end) {
      std::vector<float> buf(2 * head_dim);
      for (int64_t t = begin; t < end; ++t) {
        if (rotate) {
          const int64_t p = pos.const_data_ptr<int64_t>()[t];
          const float* c = cos_c.const_data_ptr<float>() + p * cos_c.stride(0);
          const float* s = sin_c.const_data_ptr<float>() + p * sin_c.stride(0);
          rotate_heads(q.data_ptr<T>() + t * q.stride(0), q.stride(1), num_heads, head_dim, c, s, buf.data());
          rotate_heads(k.data_ptr<T>() + t * k.stride(0), k.stride(1), num_kv_heads, head_dim, c, s, buf.data());
        }
        const int64_t slot = write ? slots.const_data_ptr<int64_t>()[t] : -1;
        if (slot >= 0) {
          write_slot(k.const_data_ptr<T>() + t * k.stride(0), k.stride(1), k_cache.data_ptr<T>(), k_cache, slot,
                     num_kv_heads, head_dim);
          write_slot(v.const_data_ptr<T>() + t * v.stride(0), v.stride(1), v_cache.data_ptr<T>(), v_cache, slot,
                     num_kv_heads, head_dim);
        }
      }
    });
  });
}

void rotary_embedding(const at::Tensor& positions, const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                      const at::Tensor& sin) {
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.stride(2) == 1 && k.stride(2) == 1,
              "rotary_embedding: q and k must share a dtype and have contiguous head_dim");
  rotate_and_write(positions, q, k, k, cos, sin, at::Tensor(), at::Tensor(), at::Tensor());
}

void write_kv_cache(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache, const at::Tensor& v_cache,
                    const at::Tensor& slot_mapping) {
  check_cache_args(k, v, k_cache, v_cache, slot_mapping);
  rotate_and_write(at::Tensor(), at::Tensor(), k, v, at::Tensor(), at::Tensor(), k_cache, v_cache, slot_mapping);
}

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "rms_norm: x and weight must share a dtype");
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  at::Tensor out = at::empty_like(xc);
  const int64_t hidden = x.size(-1);
  dispatch_float(x.scalar_type(), "rms_norm", [&](auto tag) {
    using T = decltype(tag);
    const T* src = xc.const_data_ptr<T>();
    T* dst = out.data_ptr<T>();
    for_each_row<T>(xc, [&](int64_t r, float* h, float* w_buf) {
      to_float(src + r * hidden, h, hidden);
      rms_norm_row(h, wc.const_data_ptr<T>(), w_buf, dst + r * hidden, hidden, static_cast<float>(eps));
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> fused_add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                      const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.scalar_type() == residual.scalar_type() && x.scalar_type() == weight.scalar_type(),
              "fused_add_rms_norm: x, residual and weight must share a dtype");
  TORCH_CHECK(x.sizes() == residual.sizes(), "fused_add_rms_norm: x and residual must have the same shape");
  const at::Tensor xc = x.contiguous(), rc = residual.contiguous(), wc = weight.contiguous();
  at::Tensor out = at::empty_like(xc), sum = at::empty_like(xc);
  const int64_t hidden = x.size(-1);
  dispatch_float(x.scalar_type(), "fused_add_rms_norm", [&](auto tag) {
    using T = decltype(tag);
    const T *xs = xc.const_data_ptr<T>(), *rs = rc.const_data_ptr<T>();
    T *dst = out.data_ptr<T>(), *sums = sum.data_ptr<T>();
    for_each_row<T>(xc, [&](int64_t r, float* h, float* w_buf) {
      to_float(xs + r * hidden, h, hidden);
      to_float(rs + r * hidden, w_buf, hidden);
      for (int64_t i = 0; i < hidden; ++i) h[i] += w_buf[i];
      from_float(h, sums + r * hidden, hidden);
      to_float(sums + r * hidden, h, hidden);  // continue from the rounded sum, as the reference does
      rms_norm_row(h, wc.const_data_ptr<T>(), w_buf, dst + r * hidden, hidden, static_cast<float>(eps));
    });
  });
  return {out, sum};
}

at::Tensor silu_and_mul(const at::Tensor& x) {
  const at::Tensor xc = x.contiguous();
  const int64_t d = x.size(-1) / 2;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = d;
  at::Tensor out = at::empty(shape, x.options());
  dispatch_float(x.scalar_type(), "silu_and_mul", [&](auto tag) {
    using T = decltype(tag);
    const T* src = xc.const_data_ptr<T>();
    T* dst = out.data_ptr<T>();
    for_each_row<T>(out, [&](int64_t r, float* gate, float* up) {
      to_float(src + r * 2 * d, gate, d);
      to_float(src + r * 2 * d + d, up, d);
      at::vec::map2([](Vec g, Vec u) { return g / (Vec(1.f) + g.neg().exp()) * u; }, gate, gate, up, d);
      from_float(gate, dst + r * d, d);
    });
  });
  return out;
}

void rotary_and_cache(const at::Tensor& positions, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& k_cache,
                      const at::Tensor& v_cache, const at::Tensor& slot_mapping) {
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.stride(2) == 1,
              "rotary_and_cache: q and k must share a dtype and have contiguous head_dim");
  check_cache_args(k, v, k_cache, v_cache, slot_mapping);
  rotate_and_write(positions, q, k, v, cos, sin, k_cache, v_cache, slot_mapping);
}

TORCH_LIBRARY(tokenmill, m) {
  m.def("paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_lens, "
        "Tensor query_start_loc, float scale) -> Tensor");
  m.def("write_kv_cache(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) -> ()");
  m.def("rotary_embedding(Tensor positions, Tensor(a!) q, Tensor(b!) k, Tensor cos, Tensor sin) -> ()");
  m.def("rotary_and_cache(Tensor positions, Tensor(a!) q, Tensor(b!) k, Tensor v, Tensor cos, Tensor sin, "
        "Tensor(c!) k_cache, Tensor(d!) v_cache, Tensor slot_mapping) -> ()");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("fused_add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("silu_and_mul(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(tokenmill, CPU, m) {
  m.impl("write_kv_cache", &write_kv_cache);
  m.impl("rotary_embedding", &rotary_embedding);
  m.impl("rotary_and_cache", &rotary_and_cache);
  m.impl("rms_norm", &rms_norm);
  m.impl("fused_add_rms_norm", &fused_add_rms_norm);
  m.impl("silu_and_mul", &silu_and_mul);
}

}  // namespace tokenmill
