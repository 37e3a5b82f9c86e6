#pragma once
// MixtralDecoderLayer: one decoder layer of Mixtral (Hugging Face MixtralDecoderLayer,
// gpt-fast TransformerBlock), composed from the library's parts:
//   h   = x + o_proj(attention(RoPE(q_proj(xn)), RoPE(k_proj(xn)), v_proj(xn))),
//         xn = RMSNorm_input(x)
//   out = h + MoE(RMSNorm_post(h)),  MoE = top-k softmax router (renormalised, Mixtral's rule)
//         over block_sparse_moe.gate, then the SwiGLU experts w2 (silu(w1 x) * w3 x)
// Attention is causal with grouped-query heads (query head h reads KV head h / (H / H_kv))
// against the sequence's KVCache: the new keys (after RoPE) and values are appended, then
// blocks of up to attention::max_decode_queries tokens run DenseAttention::decode (split-KV)
// and longer ones DenseAttention::forward over the cached positions. With a sliding window
// (config sliding_window = W > 0), position p attends to keys p - W < j <= p: once the
// sequence is longer than W, DenseAttention::forward reads only the window's keys.
//
// Weights are views of element type W (float, or bf16 from a bf16 checkpoint) into the
// checkpoint; projections run through core::linear and the experts through moe::MoELayer,
// which widen bf16 while packing, so no weight is copied. Activations, the KV cache and all
// sums are float. Batch 1: the cache holds one sequence.
#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <string_view>
#include <utility>

#include "switchyard/attention/dense.hpp"
#include "switchyard/attention/kv_cache.hpp"
#include "switchyard/attention/mask.hpp"
#include "switchyard/core/error.hpp"
#include "switchyard/core/linear.hpp"
#include "switchyard/core/simd/arch.hpp"
#include "switchyard/core/tensor.hpp"
#include "switchyard/core/view.hpp"
#include "switchyard/io/checkpoint.hpp"
#include "switchyard/models/checkpoint_weights.hpp"
#include "switchyard/models/mixtral_config.hpp"
#include "switchyard/models/rms_norm.hpp"
#include "switchyard/models/rotary.hpp"
#include "switchyard/moe/hf_checkpoint.hpp"
#include "switchyard/moe/layer.hpp"
#include "switchyard/moe/plan.hpp"
#include "switchyard/moe/router_topk.hpp"

namespace switchyard {
inline namespace v0 {
namespace models {

/// The weights of one Mixtral decoder layer, views of element type W (float or bf16),
/// nn.Linear layout [out, in]. d = hidden_size, H / H_kv / D the heads and head_dim.
template <class W>
struct MixtralLayerWeights {
  ConstView<W, 1> input_layernorm{};           ///< [d]
  ConstView<W, 2> q_proj{};                    ///< [H * D, d], HF rotate_half row order
  ConstView<W, 2> k_proj{};                    ///< [H_kv * D, d], HF rotate_half row order
  ConstView<W, 2> v_proj{};                    ///< [H_kv * D, d]
  ConstView<W, 2> o_proj{};                    ///< [d, H * D]
  ConstView<W, 1> post_attention_layernorm{};  ///< [d]
  moe::HFMoEBlock<W> moe{};                    ///< router [E, d] and the E experts
};

/// Layer `layer` of a Hugging Face Mixtral checkpoint (names model.layers.{layer}.*), as views
/// into it (valid while it lives). Throws config_error when cfg is invalid
/// (MixtralConfig::validate), switchyard::error for a missing tensor and
/// shape_error naming the tensor and both shapes when a tensor disagrees with cfg or is not
/// stored as W (the MoE block's errors come from moe::load_hf_moe_block).
template <class W>
MixtralLayerWeights<W> load_mixtral_layer_weights(const io::Checkpoint& ckpt,
                                                  const MixtralConfig& cfg, std::int64_t layer) {
  constexpr std::string_view who = "MixtralDecoderLayer", fn = "load";
  cfg.validate(fn);  // the widths below are products of its sizes
  const std::string p = "model.layers." + std::to_string(layer) + ".";
  const std::int64_t d = cfg.hidden_size, q = cfg.num_attention_heads * cfg.head_dim,
                     kv = cfg.num_key_value_heads * cfg.head_dim;
  MixtralLayerWeights<W> w;
  w.input_layernorm =
      weight_view<W, 1>(ckpt, who, fn, p + "input_layernorm.weight", {d}, "[hidden_size]");
  w.q_proj = weight_view<W, 2>(ckpt, who, fn, p + "self_attn.q_proj.weight", {q, d},
                               "[num_attention_heads * head_dim, hidden_size]");
  w.k_proj = weight_view<W, 2>(ckpt, who, fn, p + "self_attn.k_proj.weight", {kv, d},
                               "[num_key_value_heads * head_dim, hidden_size]");
  w.v_proj = weight_view<W, 2>(ckpt, who, fn, p + "self_attn.v_proj.weight", {kv, d},
                               "[num_key_value_heads * head_dim, hidden_size]");
  w.o_proj = weight_view<W, 2>(ckpt, who, fn, p + "self_attn.o_proj.weight", {d, q},
                               "[hidden_size, num_attention_heads * head_dim]");
  w.post_attention_layernorm =
      weight_view<W, 1>(ckpt, who, fn, p + "post_attention_layernorm.weight", {d}, "[hidden_size]");
  // The loader takes E from the router's rows; here it is checked against config.json.
  weight_view<W, 2>(ckpt, who, fn, p + "block_sparse_moe.gate.weight", {cfg.num_local_experts, d},
                    "[num_local_experts, hidden_size]");
  // Routing from cfg (already validated) rather than config.json again for every layer.
  w.moe = moe::load_hf_moe_block<W>(ckpt, p + "block_sparse_moe", moe::HFFamily::mixtral,
                                    {.top_k = cfg.num_experts_per_tok, .norm_topk_prob = true});
  return w;
}

/// What one forward call of a layer computed, for tests and inspection (rows = the T new
/// positions). Filled only when a trace is passed; the buffers are moved in, not copied.
struct MixtralLayerTrace {
  Tensor<float> attn_norm_out;    ///< [T, d] input_layernorm(x)
  Tensor<float> q_rope;           ///< [T, H, D] queries after RoPE, HF channel order
  Tensor<float> attn_core_out;    ///< [T, H, D] attention output before o_proj
  Tensor<float> attn_out;         ///< [T, d] after o_proj, before the residual add
  Tensor<float> ffn_norm_out;     ///< [T, d] post_attention_layernorm(h)
  Tensor<float> router_logits;    ///< [T, E]
  moe::DispatchPlan<float> plan;  ///< routing: expert_indices() / expert_weights(), [T, K]
  Tensor<float> moe_out;          ///< [T, d] before the residual add
  Tensor<float> block_out;        ///< [T, d] the layer's output
};

template <class W, class Arch = simd::default_arch>
class MixtralDecoderLayer {
 public:
  using weights_type = MixtralLayerWeights<W>;
  static constexpr std::string_view name = "MixtralDecoderLayer";

  /// Throws config_error when cfg is invalid (MixtralConfig::validate) and shape_error naming
  /// the weight when a view's shape disagrees with cfg, or when the MoE block is not a
  /// Mixtral block of hidden_size, intermediate_size and num_local_experts.
  MixtralDecoderLayer(const MixtralConfig& cfg, weights_type weights)
      : cfg_((cfg.validate(name), cfg)),
        w_(std::move(weights)),
        norm_({.eps = cfg.rms_norm_eps}),
        router_({.num_experts = cfg.num_local_experts,
                 .top_k = cfg.num_experts_per_tok,
                 .renormalize = true}),
        moe_(checked_moe_config(cfg, w_)) {
    const std::string_view fn = "MixtralDecoderLayer";
    const std::int64_t d = cfg.hidden_size, q = cfg.num_attention_heads * cfg.head_dim,
                       kv = cfg.num_key_value_heads * cfg.head_dim;
    core::detail::check_shape(name, fn, "input_layernorm", w_.input_layernorm, {"d"}, {d});
    core::detail::check_shape(name, fn, "q_proj", w_.q_proj, {"H*D", "d"}, {q, d});
    core::detail::check_shape(name, fn, "k_proj", w_.k_proj, {"H_kv*D", "d"}, {kv, d});
    core::detail::check_shape(name, fn, "v_proj", w_.v_proj, {"H_kv*D", "d"}, {kv, d});
    core::detail::check_shape(name, fn, "o_proj", w_.o_proj, {"d", "H*D"}, {d, q});
    core::detail::check_shape(name, fn, "post_attention_layernorm", w_.post_attention_layernorm,
                              {"d"}, {d});
    core::detail::check_shape(name, fn, "moe.router_weight", w_.moe.router_weight, {"E", "d"},
                              {cfg.num_local_experts, d});
  }

  /// The validated config the layer was built for.
  const MixtralConfig& config() const noexcept { return cfg_; }
  /// The layer's weight views.
  const weights_type& weights() const noexcept { return w_; }

  /// x: [T, d], the hidden states of the next T >= 1 positions of the sequence held in
  /// `cache`, overwritten with the layer's output (any strides). Positions are
  /// cache.length(0) .. + T - 1; their keys (after RoPE) and values are appended to the cache.
  /// cache: batch 1, num_key_value_heads heads of head_dim; rope: head_dim's table.
  /// trace: when not null, receives the intermediates (MixtralLayerTrace).
  /// Throws, before changing x or the cache: shape_error for a wrong x, cache or rope shape;
  /// config_error when the positions would pass the cache capacity or the RoPE table.
  void forward(View<float, 2> x, attention::KVCache<float>& cache, const RotaryEmbedding& rope,
               MixtralLayerTrace* trace = nullptr) const {
    const std::string_view fn = "forward";
    const std::int64_t d = cfg_.hidden_size, H = cfg_.num_attention_heads,
                       Hkv = cfg_.num_key_value_heads, D = cfg_.head_dim,
                       E = cfg_.num_local_experts;
    core::detail::check_shape(name, fn, "x", x, {"T", "d"}, {-1, d}, "d = hidden_size");
    const std::int64_t T = x.extent(0);
    if (T < 1)
      switchyard::detail::fail_shape(name, fn, "x", switchyard::detail::format_shape(x.shape()),
                                     "[T >= 1, d]", "at least one new position");
    if (cache.batch() != 1 || cache.kv_heads() != Hkv || cache.head_dim() != D) {
      const std::int64_t got[3] = {cache.batch(), cache.kv_heads(), cache.head_dim()};
      switchyard::detail::fail_shape(
          name, fn, "cache", switchyard::detail::format_shape({"B", "H_kv", "D"}, got),
          "[B=1, H_kv=" + std::to_string(Hkv) + ", D=" + std::to_string(D) + "]",
          "one sequence, num_key_value_heads heads of head_dim");
    }
    if (rope.config().head_dim != D) {
      const std::int64_t got[1] = {rope.config().head_dim};
      switchyard::detail::fail_shape(name, fn, "rope", switchyard::detail::format_shape({"D"}, got),
                                     "[D=" + std::to_string(D) + "]", "a table for head_dim");
    }
    const std::int64_t pos0 = cache.length(0);
    if (T > cache.capacity() - pos0)
      switchyard::detail::fail_config(name, fn, "x", "[T=" + std::to_string(T) + "]",
                                      "at most " + std::to_string(cache.capacity() - pos0) +
                                          " new positions: the cache holds " +
                                          std::to_string(pos0) + " of its capacity " +
                                          std::to_string(cache.capacity()));
    if (T > rope.config().max_positions - pos0)
      switchyard::detail::fail_config(name, fn, "x", "[T=" + std::to_string(T) + "]",
                                      "positions below the RoPE table's max_positions = " +
                                          std::to_string(rope.config().max_positions));

    // Attention: q, k, v of the new rows, RoPE, append to the cache, attend.
    Tensor<float> xn({T, d});
    norm_.forward(x, w_.input_layernorm, xn.view<2>());
    Tensor<float> q({T, H, D}), k({1, T, Hkv, D}), v({1, T, Hkv, D});
    core::linear<Arch>(xn.view<2>(), w_.q_proj, View<float, 2>(q.data(), {T, H * D}));
    core::linear<Arch>(xn.view<2>(), w_.k_proj, View<float, 2>(k.data(), {T, Hkv * D}));
    core::linear<Arch>(xn.view<2>(), w_.v_proj, View<float, 2>(v.data(), {T, Hkv * D}));
    rope.apply(q.view<3>(), pos0);
    rope.apply(View<float, 3>(k.data(), {T, Hkv, D}), pos0);
    cache.append(k.view<4>(), v.view<4>());
    Tensor<float> core_out({T, H, D});
    const ConstView<float, 4> q4(q.data(), {1, T, H, D});
    const View<float, 4> o4(core_out.data(), {1, T, H, D});
    const std::int64_t len = pos0 + T, window = cfg_.sliding_window;
    if (window > 0 && len > window) {
      // Sliding window (Mistral / HF): position p sees keys j with p - W < j <= p. Only keys
      // from s = first query's lowest on are read; the causal mask bounds them from above and
      // a bias of -inf from below for the later queries of the block.
      const std::int64_t s = std::max<std::int64_t>(0, pos0 - window + 1), n = len - s;
      Tensor<float> bias({T, n});
      for (std::int64_t t = 0; t < T; ++t)
        for (std::int64_t j = 0; j + s <= pos0 + t - window; ++j)
          bias(t, j) = -std::numeric_limits<float>::infinity();
      attn_.forward(q4, cache.keys_as_sequence(len).slice(1, s, len),
                    cache.values_as_sequence(len).slice(1, s, len), o4,
                    attention::Mask<float>(attention::CausalMask{pos0 - s},
                                           attention::AdditiveBias<float>{bias.view<2>()}));
    } else if (T <= attention::max_decode_queries) {
      attn_.decode(q4, cache, o4);
    } else {
      attn_.forward(q4, cache.keys_as_sequence(len), cache.values_as_sequence(len), o4,
                    attention::CausalMask{pos0});
    }
    Tensor<float> attn_out({T, d});
    core::linear<Arch>(ConstView<float, 2>(core_out.data(), {T, H * D}), w_.o_proj,
                       attn_out.view<2>());
    add_rows(x, attn_out);

    // MoE: route the normalised rows, run the experts, add.
    Tensor<float> hn({T, d});
    norm_.forward(x, w_.post_attention_layernorm, hn.view<2>());
    Tensor<float> logits({T, E});
    core::linear<Arch>(hn.view<2>(), w_.moe.router_weight, logits.view<2>());
    moe::DispatchPlan<float> plan;
    router_.route(logits.view<2>(), plan);
    Tensor<float> moe_out({T, d});
    moe_.execute(plan, hn.view<2>(), w_.moe.weights, moe_out.view<2>());
    add_rows(x, moe_out);

    if (!trace) return;
    trace->attn_norm_out = std::move(xn);
    trace->q_rope = std::move(q);
    trace->attn_core_out = std::move(core_out);
    trace->attn_out = std::move(attn_out);
    trace->ffn_norm_out = std::move(hn);
    trace->router_logits = std::move(logits);
    trace->plan = std::move(plan);
    trace->moe_out = std::move(moe_out);
    trace->block_out = Tensor<float>({T, d});
    for (std::int64_t t = 0; t < T; ++t)
      for (std::int64_t j = 0; j < d; ++j) trace->block_out(t, j) = x(t, j);
  }

 private:
  static moe::MoELayerConfig checked_moe_config(const MixtralConfig& cfg, const weights_type& w) {
    const moe::MoELayerConfig& c = w.moe.layer_config;
    const std::int64_t got[3] = {c.d_model, c.d_ff, c.num_experts};
    if (w.moe.family != moe::HFFamily::mixtral || c.d_model != cfg.hidden_size ||
        c.d_ff != cfg.intermediate_size || c.num_experts != cfg.num_local_experts ||
        c.num_shared_experts != 0 || c.activation != moe::Activation::swiglu)
      switchyard::detail::fail_shape(
          name, "MixtralDecoderLayer", "moe",
          switchyard::detail::format_shape({"d", "F", "E"}, got),
          "[d=" + std::to_string(cfg.hidden_size) + ", F=" + std::to_string(cfg.intermediate_size) +
              ", E=" + std::to_string(cfg.num_local_experts) + "]",
          "a Mixtral block (SwiGLU experts, no shared expert) of hidden_size, intermediate_size "
          "and num_local_experts");
    return c;
  }

  // x[t] += add[t] for every row.
  static void add_rows(const View<float, 2>& x, const Tensor<float>& add) {
    for (std::int64_t t = 0; t < x.extent(0); ++t)
      for (std::int64_t j = 0; j < x.extent(1); ++j) x(t, j) += add(t, j);
  }

  MixtralConfig cfg_;
  weights_type w_;
  RMSNorm norm_;
  attention::DenseAttention<float, Arch> attn_;
  moe::TopKRouter<float, Arch> router_;
  moe::MoELayer<float, Arch> moe_;
};

}  // namespace models
}  // namespace v0
}  // namespace switchyard
