// The ops' C++ entry points, for code that runs many of them in one call (decoder.cpp) without going through
// the dispatcher. Each is the CPU kernel registered under the same name in TORCH_LIBRARY(tokenmill).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace tokenmill {

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
std::tuple<at::Tensor, at::Tensor> fused_add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                      const at::Tensor& weight, double eps);
at::Tensor silu_and_mul(const at::Tensor& x);
void rotary_and_cache(const at::Tensor& positions, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& k_cache,
                      const at::Tensor& v_cache, const at::Tensor& slot_mapping);
at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_tables, const at::Tensor& seq_lens,
                           const at::Tensor& query_start_loc, double scale);
at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                       const at::Tensor& zeros);
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales);
at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed, int64_t n);

}  // namespace tokenmill
