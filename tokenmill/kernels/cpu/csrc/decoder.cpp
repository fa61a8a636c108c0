// The decoder's layers in one call: tokenmill.Decoder holds every layer's weights and KV cache and runs the
// layer loop of engine/models/llama.py in C++, calling the ops' kernels directly (kernels.h). A decode step of
// SmolLM2-135M runs about 25 small ops per layer; from Python each costs microseconds of interpreter, module
// and dispatcher time, more than the op itself at batch 1. Every call here is the one the Python layers
// make, with the same arguments in the same order, so the result is bit-identical to theirs.
#include <ATen/ops/_weight_int8pack_mm.h>
#include <ATen/ops/add.h>
#include <ATen/ops/linear.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "kernels.h"

namespace tokenmill {
namespace {

// The linear modules of engine/weights/quantization.py (and nn.Linear), by what their forward computes.
enum LinearKind : int64_t {
  kInt4 = 0,         // Int4Linear (native): int4_linear(x, a = qweight, b = scales, c = zeros)
  kInt8Groups = 1,   // Int8GroupLinear: int8_linear(x, a = q, b = scales)
  kInt8Channel = 2,  // Int8Linear: _weight_int8pack_mm(x.bfloat16(), a = q, b = scale)
  kPackedFloat = 3,  // DenseLinear: packed_linear(x.float(), a = packed, n)
  kTorch = 4,        // nn.Linear: linear(x, a = weight, bias)
};

struct Linear {
  int64_t kind;
  at::Tensor a, b, c, bias;
  int64_t n;

  // y = x W^T + bias in x's dtype, as the module's forward computes it (bias added to the kernel's output in
  // its dtype, then the sum cast).
  at::Tensor operator()(const at::Tensor& x) const {
    at::Tensor y;
    switch (kind) {
      case kInt4: y = int4_linear(x, a, b, c); break;
      case kInt8Groups: y = int8_linear(x, a, b); break;
      case kInt8Channel: y = at::_weight_int8pack_mm(x.to(at::kBFloat16), a, b); break;
      case kPackedFloat: y = packed_linear(x.to(at::kFloat), a, n); break;
      case kTorch: return at::linear(x, a, bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt);
      default: TORCH_CHECK(false, "Decoder: unknown linear kind ", kind);
    }
    if (bias.defined()) y = at::add(y, bias);
    return y.to(x.scalar_type());
  }
};

struct Layer {
  at::Tensor input_norm, post_norm, q_norm, k_norm;  // q_norm, k_norm undefined unless the model has them
  at::Tensor k_cache, v_cache;
  Linear qkv, o, gate_up, down;
};

class Decoder : public torch::CustomClassHolder {
 public:
  Decoder(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double eps, double scale, at::Tensor cos,
          at::Tensor sin, at::Tensor final_norm)
      : num_heads_(num_heads), num_kv_heads_(num_kv_heads), head_dim_(head_dim), eps_(eps), scale_(scale),
        cos_(std::move(cos)), sin_(std::move(sin)), final_norm_(std::move(final_norm)) {}

  // One layer, in order. `linears` are qkv, o, gate_up, down: kinds[i] and, per linear, four tensors
  // (a, b, c, bias; None where the kind has none) and its output features.
  void add_layer(at::Tensor input_norm, at::Tensor post_norm, std::optional<at::Tensor> q_norm,
                 std::optional<at::Tensor> k_norm, at::Tensor k_cache, at::Tensor v_cache, std::vector<int64_t> kinds,
                 std::vector<std::optional<at::Tensor>> tensors, std::vector<int64_t> out_features) {
    TORCH_CHECK(kinds.size() == 4 && tensors.size() == 16 && out_features.size() == 4,
                "Decoder.add_layer: four linears (qkv, o, gate_up, down), four tensors each");
    Linear linears[4];
    for (size_t i = 0; i < 4; ++i) {
      auto get = [&](size_t j) { return tensors[4 * i + j].value_or(at::Tensor()); };
      linears[i] = {kinds[i], get(0), get(1), get(2), get(3), out_features[i]};
    }
    layers_.push_back({std::move(input_norm), std::move(post_norm), q_norm.value_or(at::Tensor()),
                       k_norm.value_or(at::Tensor()), std::move(k_cache), std::move(v_cache), linears[0], linears[1],
                       linears[2], linears[3]});
  }

  // The final norm's output for the embedded tokens h [num_tokens, hidden]: LlamaForCausalLM.forward after
  // its embedding, on the same step inputs.
  at::Tensor forward(at::Tensor h, at::Tensor positions, at::Tensor slot_mapping, at::Tensor block_tables,
                     at::Tensor seq_lens, at::Tensor query_start_loc) const {
    const int64_t q_size = num_heads_ * head_dim_, kv_size = num_kv_heads_ * head_dim_;
    at::Tensor residual;
    for (const Layer& layer : layers_) {
      if (!residual.defined()) {
        residual = h;
        h = rms_norm(h, layer.input_norm, eps_);
      } else {
        std::tie(h, residual) = fused_add_rms_norm(h, residual, layer.input_norm, eps_);
      }
      const at::Tensor qkv = layer.qkv(h);
      at::Tensor q = qkv.narrow(-1, 0, q_size).view({-1, num_heads_, head_dim_});
      at::Tensor k = qkv.narrow(-1, q_size, kv_size).view({-1, num_kv_heads_, head_dim_});
      const at::Tensor v = qkv.narrow(-1, q_size + kv_size, kv_size).view({-1, num_kv_heads_, head_dim_});
      if (layer.q_norm.defined()) {
        q = rms_norm(q, layer.q_norm, eps_);
        k = rms_norm(k, layer.k_norm, eps_);
      }
      rotary_and_cache(positions, q, k, v, cos_, sin_, layer.k_cache, layer.v_cache, slot_mapping);
      const at::Tensor o = paged_attention(q, layer.k_cache, layer.v_cache, block_tables, seq_lens, query_start_loc,
                                           scale_);
      h = layer.o(o.view({-1, q_size}));
      std::tie(h, residual) = fused_add_rms_norm(h, residual, layer.post_norm, eps_);
      h = layer.down(silu_and_mul(layer.gate_up(h)));
    }
    return std::get<0>(fused_add_rms_norm(h, residual, final_norm_, eps_));
  }

 private:
  int64_t num_heads_, num_kv_heads_, head_dim_;
  double eps_, scale_;
  at::Tensor cos_, sin_, final_norm_;
  std::vector<Layer> layers_;
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(tokenmill, m) {
  m.class_<Decoder>("Decoder")
      .def(torch::init<int64_t, int64_t, int64_t, double, double, at::Tensor, at::Tensor, at::Tensor>())
      .def("add_layer", &Decoder::add_layer)
      .def("forward", &Decoder::forward);
}

}  // namespace tokenmill
