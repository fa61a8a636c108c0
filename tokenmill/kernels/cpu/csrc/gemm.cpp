// Float32 linear over a prepacked weight: y = x W^T, W [N, K] packed once at load into panels of kPanel rows
// stored k-major ([N / kPanel][K][kPanel], zero rows padding the last panel), so the kernel streams each
// panel contiguously and computes a tile of up to kTile rows of x by kPanel outputs in registers (broadcast
// x[t, k], two vector loads of the panel, 2 * kTile FMAs per k: the classic GEMM micro-kernel).
// torch's matmul runs SmolLM2's shapes far below this machine's peak (2 threads, AVX2: 21 GFLOP/s for the
// LM head at M = 32, 48 for 576 -> 3072; about 150 is reachable), and MKL's own packed sgemm no better.
// Every output is one FMA chain over k = 0 .. K-1 in order, whatever M or the tile it fell in: a row's result
// is the same alone or in any batch.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>

#include "common.h"
#include "kernels.h"

namespace tokenmill {
namespace {

constexpr int64_t V = Vec::size();
constexpr int64_t kPanel = 2 * V;    // weight rows per panel: two vectors
constexpr int kTile = 6;             // x rows per tile: 12 accumulators + 2 weight vectors + 1 broadcast
constexpr int64_t kRowBlock = 96;    // x rows per pass over W: their K floats stay in L2 while W streams

// y[t * ldy + j] = sum_k panel[k][j] * x[t * k_dim + k] for t < T and j < width (<= kPanel). Each run of kChunk
// k's is summed in registers and added to the total after it, which keeps float32's rounding error near that
// of a blocked BLAS sum rather than growing along one chain of K terms.
template <int T>
void micro(const float* panel, const float* x, int64_t k_dim, float* y, int64_t ldy, int64_t width) {
  constexpr int64_t kChunk = 64;
  Reg sum0[T], sum1[T];
  for (int t = 0; t < T; ++t) sum0[t] = sum1[t] = reg_set1(0.f);
  for (int64_t k0 = 0; k0 < k_dim; k0 += kChunk) {
    Reg acc0[T], acc1[T];
    for (int t = 0; t < T; ++t) acc0[t] = acc1[t] = reg_set1(0.f);
    for (int64_t k = k0; k < std::min(k_dim, k0 + kChunk); ++k) {
      const Reg w0 = reg_load(panel + k * kPanel), w1 = reg_load(panel + k * kPanel + V);
      for (int t = 0; t < T; ++t) {
        const Reg xv = reg_set1(x[t * k_dim + k]);
        acc0[t] = reg_fma(w0, xv, acc0[t]);
        acc1[t] = reg_fma(w1, xv, acc1[t]);
      }
    }
    for (int t = 0; t < T; ++t) {
      sum0[t] = reg_add(sum0[t], acc0[t]);
      sum1[t] = reg_add(sum1[t], acc1[t]);
    }
  }
  float buf[T][kPanel];
  for (int t = 0; t < T; ++t) {
    reg_store(buf[t], sum0[t]);
    reg_store(buf[t] + V, sum1[t]);
  }
  for (int t = 0; t < T; ++t) std::copy_n(buf[t], width, y + t * ldy);  // width < kPanel: the padded last panel
}

void micro_any(const float* panel, const float* x, int64_t k_dim, float* y, int64_t ldy, int64_t width, int64_t rows) {
  switch (rows) {
    case 1: micro<1>(panel, x, k_dim, y, ldy, width); break;
    case 2: micro<2>(panel, x, k_dim, y, ldy, width); break;
    case 3: micro<3>(panel, x, k_dim, y, ldy, width); break;
    case 4: micro<4>(panel, x, k_dim, y, ldy, width); break;
    case 5: micro<5>(panel, x, k_dim, y, ldy, width); break;
    default: micro<kTile>(panel, x, k_dim, y, ldy, width);
  }
}

at::Tensor pack_linear_weight(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat, "pack_linear_weight: float32 [N, K] expected");
  const at::Tensor wc = weight.contiguous();
  const int64_t n = weight.size(0), k = weight.size(1), panels = (n + kPanel - 1) / kPanel;
  at::Tensor packed = at::zeros({panels, k, kPanel}, weight.options());
  const float* src = wc.const_data_ptr<float>();
  float* dst = packed.data_ptr<float>();
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      for (int64_t j = 0; j < std::min(kPanel, n - p * kPanel); ++j) {
        const float* row = src + (p * kPanel + j) * k;
        for (int64_t i = 0; i < k; ++i) dst[(p * k + i) * kPanel + j] = row[i];
      }
    }
  });
  return packed;
}

}  // namespace

at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed, int64_t n) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "packed_linear: float32 x [M, K] expected");
  const int64_t m = x.size(0), k = x.size(1), panels = (n + kPanel - 1) / kPanel;
  TORCH_CHECK(packed.scalar_type() == at::kFloat && packed.is_contiguous() &&
              packed.sizes() == at::IntArrayRef({panels, k, kPanel}),
              "packed_linear: weight must come from pack_linear_weight for this build, N and K");
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({m, n}, x.options());
  const float *xs = xc.const_data_ptr<float>(), *ws = packed.const_data_ptr<float>();
  float* ys = y.data_ptr<float>();
  for (int64_t m0 = 0; m0 < m; m0 += kRowBlock) {
    const int64_t m1 = std::min(m, m0 + kRowBlock);
    parallel_rows(panels, kPanel * k * (m1 - m0), [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const int64_t width = std::min(kPanel, n - p * kPanel);
        for (int64_t t0 = m0; t0 < m1; t0 += kTile) {
          micro_any(ws + p * k * kPanel, xs + t0 * k, k, ys + t0 * n + p * kPanel, n, width,
                    std::min<int64_t>(kTile, m1 - t0));
        }
      }
    });
  }
  return y;
}

TORCH_LIBRARY_FRAGMENT(tokenmill, m) {
  m.def("pack_linear_weight(Tensor weight) -> Tensor");
  m.def("packed_linear(Tensor x, Tensor packed, int n) -> Tensor");
}

TORCH_LIBRARY_IMPL(tokenmill, CPU, m) {
  m.impl("pack_linear_weight", &pack_linear_weight);
  m.impl("packed_linear", &packed_linear);
}

}  // namespace tokenmill
