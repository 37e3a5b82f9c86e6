#pragma once
// MixtralModel: a whole Mixtral causal language model (Hugging Face MixtralForCausalLM) from a
// checkpoint directory: token embedding, the decoder layers (models/mixtral_layer.hpp), the
// final RMSNorm and the LM head, with one KV cache per layer for autoregressive decoding and
// greedy generation.
//
// The model owns the opened checkpoint (every weight is a view into it, float or bf16: nothing
// is copied) and the KV caches of the one sequence it decodes. prefill() starts a sequence,
// decode_step() / append() continue it; each returns the logits of the sequence's last
// position. Positions count from 0 at prefill; the cache holds max_seq_len positions.
#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "switchyard/attention/kv_cache.hpp"
#include "switchyard/core/error.hpp"
#include "switchyard/core/linear.hpp"
#include "switchyard/core/simd/arch.hpp"
#include "switchyard/core/tensor.hpp"
#include "switchyard/core/view.hpp"
#include "switchyard/io/checkpoint.hpp"
#include "switchyard/models/checkpoint_weights.hpp"
#include "switchyard/models/mixtral_config.hpp"
#include "switchyard/models/mixtral_layer.hpp"
#include "switchyard/models/rms_norm.hpp"
#include "switchyard/models/rotary.hpp"

namespace switchyard {
inline namespace v0 {
namespace models {

struct MixtralModelOptions {
  /// Positions the KV caches hold (prompt + generated tokens); 0 = the config's
  /// max_position_embeddings. The caches take 2 * layers * H_kv * max_seq_len * D floats
  /// (D padded to 16), allocated at load: set it for long-context checkpoints.
  std::int64_t max_seq_len = 0;
};

/// What one prefill / append / decode_step computed (rows = its T new positions).
struct MixtralTrace {
  std::vector<MixtralLayerTrace> layers;  ///< one per decoder layer
  Tensor<float> final_norm_out;           ///< [T, d] model.norm of the last layer's output
  Tensor<float> logits;                   ///< [T, V] every row (the call returns the last)
};

/// Index of the largest logit; ties go to the lower index (the first maximum). NaN never
/// wins over a number. Throws shape_error for an empty view.
inline std::int64_t greedy_token(ConstView<float, 1> logits) {
  if (logits.extent(0) < 1)
    switchyard::detail::fail_shape("models", "greedy_token", "logits",
                                   switchyard::detail::format_shape({"V"}, logits.shape()),
                                   "[V >= 1]");
  std::int64_t best = 0;
  for (std::int64_t i = 1; i < logits.extent(0); ++i)
    if (logits(i) > logits(best) || (logits(best) != logits(best) && logits(i) == logits(i)))
      best = i;
  return best;
}

template <class W, class Arch = simd::default_arch>
class MixtralModel {
 public:
  using layer_type = MixtralDecoderLayer<W, Arch>;
  static constexpr std::string_view name = "MixtralModel";

  /// Opens a Hugging Face checkpoint through io::Checkpoint::open (a directory with
  /// config.json and model.safetensors or model.safetensors.index.json and its shards; or the
  /// index or .safetensors file itself, config.json beside it) and loads the model. W must
  /// match the stored weights: float for F32, bf16 for BF16. Throws what io::Checkpoint::open
  /// throws, and as the constructor.
  static MixtralModel load(const std::filesystem::path& path, MixtralModelOptions opts = {}) {
    return MixtralModel(io::Checkpoint::open(path), opts);
  }

  /// Loads from an opened checkpoint, which the model keeps (its weights are views into it).
  /// Throws switchyard::error when config.json is missing or not JSON (io::Checkpoint::config),
  /// config_error naming the field for an invalid config.json (MixtralConfig::from_json)
  /// or option (max_seq_len < 0); switchyard::error for a missing tensor; shape_error naming the
  /// tensor and both shapes for a tensor whose shape disagrees with config.json or whose
  /// dtype is not W.
  explicit MixtralModel(io::Checkpoint checkpoint, MixtralModelOptions opts = {})
      : ckpt_(std::make_unique<io::Checkpoint>(std::move(checkpoint))),
        cfg_(MixtralConfig::from_json(ckpt_->config(),
                                      (ckpt_->directory() / "config.json").string())),
        capacity_(checked_capacity(cfg_, opts)),
        final_norm_({.eps = cfg_.rms_norm_eps}) {
    constexpr std::string_view fn = "load";
    const std::int64_t V = cfg_.vocab_size, d = cfg_.hidden_size;
    // Every weight is checked against config.json before anything sized by it (the RoPE
    // table, the KV caches) is allocated, so a bad config.json fails on a tensor's shape and
    // never on an allocation. A layer has several tensors: the checkpoint's tensor count
    // bounds the reservation whatever num_hidden_layers claims.
    embed_ = weight_view<W, 2>(*ckpt_, name, fn, "model.embed_tokens.weight", {V, d},
                               "[vocab_size, hidden_size]");
    layers_.reserve(
        std::size_t(std::min<std::int64_t>(cfg_.num_hidden_layers, std::int64_t(ckpt_->size()))));
    for (std::int64_t l = 0; l < cfg_.num_hidden_layers; ++l)
      layers_.emplace_back(cfg_, load_mixtral_layer_weights<W>(*ckpt_, cfg_, l));
    norm_ = weight_view<W, 1>(*ckpt_, name, fn, "model.norm.weight", {d}, "[hidden_size]");
    lm_head_ = cfg_.tie_word_embeddings ? embed_
                                        : weight_view<W, 2>(*ckpt_, name, fn, "lm_head.weight",
                                                            {V, d}, "[vocab_size, hidden_size]");
    rope_.emplace(RotaryConfig{
        .head_dim = cfg_.head_dim, .theta = cfg_.rope_theta, .max_positions = capacity_});
    caches_.reserve(layers_.size());
    for (std::size_t l = 0; l < layers_.size(); ++l)
      caches_.emplace_back(1, cfg_.num_key_value_heads, cfg_.head_dim, capacity_);
  }

  /// Movable (the checkpoint is held by pointer, so the weight views stay valid); not copyable.
  MixtralModel(MixtralModel&&) noexcept = default;
  MixtralModel& operator=(MixtralModel&&) noexcept = default;

  /// The validated config.json.
  const MixtralConfig& config() const noexcept { return cfg_; }
  /// The checkpoint the weights point into.
  const io::Checkpoint& checkpoint() const noexcept { return *ckpt_; }
  /// Positions the KV caches hold.
  std::int64_t max_seq_len() const noexcept { return capacity_; }
  /// Positions of the current sequence (0 before prefill).
  std::int64_t length() const noexcept { return caches_.empty() ? 0 : caches_[0].lengths()[0]; }
  /// Decoder layers (num_hidden_layers).
  std::int64_t num_layers() const noexcept { return std::int64_t(layers_.size()); }
  /// Decoder layer l (0 <= l < num_layers(); config_error otherwise).
  const layer_type& layer(std::int64_t l) const { return layers_[std::size_t(check_layer(l))]; }
  /// Layer l's KV cache: keys after RoPE and values, HF channel order, [1, H_kv, cap, D].
  const attention::KVCache<float>& cache(std::int64_t l) const {
    return caches_[std::size_t(check_layer(l))];
  }
  /// The RoPE table shared by the layers, [max_seq_len, head_dim / 2].
  const RotaryEmbedding& rope() const noexcept { return *rope_; }
  /// model.embed_tokens.weight, [V, d], a view into the checkpoint.
  ConstView<W, 2> embed_tokens() const noexcept { return embed_; }
  /// lm_head.weight (embed_tokens when tie_word_embeddings), [V, d], a view into the checkpoint.
  ConstView<W, 2> lm_head() const noexcept { return lm_head_; }

  /// Forgets the sequence (the caches keep their memory).
  void reset() noexcept {
    for (auto& c : caches_) c.reset();
  }

  /// Starts a new sequence with `tokens` (positions 0 .. T - 1, one causal forward) and
  /// returns the logits of its last position, [V]. trace: optional intermediates of every row.
  /// Throws config_error, before changing anything, for no tokens, a token id outside
  /// [0, vocab_size) or T > max_seq_len.
  Tensor<float> prefill(std::span<const std::int64_t> tokens, MixtralTrace* trace = nullptr) {
    check_tokens("prefill", tokens, 0);
    reset();
    return run(tokens, trace);
  }

  /// Continues the sequence with `tokens` (positions length() .. length() + T - 1): chunked
  /// prefill, or several tokens at once. Returns the logits of the last position, [V].
  /// Throws config_error, before changing anything, for no tokens, a token id outside
  /// [0, vocab_size) or positions past max_seq_len.
  Tensor<float> append(std::span<const std::int64_t> tokens, MixtralTrace* trace = nullptr) {
    check_tokens("append", tokens, length());
    return run(tokens, trace);
  }

  /// One decoding step: `token` at position length(). Returns its logits, [V]. Throws
  /// config_error, before changing anything, for a token id outside [0, vocab_size) or when
  /// the cache is full (length() == max_seq_len).
  Tensor<float> decode_step(std::int64_t token, MixtralTrace* trace = nullptr) {
    check_tokens("decode_step", std::span<const std::int64_t>(&token, 1), length());
    return run(std::span<const std::int64_t>(&token, 1), trace);
  }

  /// Greedy decoding: prefill(prompt), then `steps` times the argmax token (greedy_token), each
  /// but the last fed back with decode_step. Returns the `steps` tokens. Throws config_error,
  /// before changing anything, for an invalid prompt, steps < 0, or prompt + steps - 1 >
  /// max_seq_len.
  std::vector<std::int64_t> generate(std::span<const std::int64_t> prompt, std::int64_t steps) {
    if (steps < 0) switchyard::detail::fail_config(name, "generate", "steps", steps, ">= 0");
    check_tokens("generate", prompt, 0);
    const std::int64_t need = std::int64_t(prompt.size()) + std::max<std::int64_t>(steps, 1) - 1;
    if (need > capacity_)
      switchyard::detail::fail_config(
          name, "generate", "steps", steps,
          "prompt (" + std::to_string(prompt.size()) +
              ") + steps - 1 <= max_seq_len = " + std::to_string(capacity_));
    std::vector<std::int64_t> out;
    if (steps == 0) return out;
    Tensor<float> logits = prefill(prompt);
    for (std::int64_t s = 0; s < steps; ++s) {
      out.push_back(greedy_token(logits.view<1>()));
      if (s + 1 < steps) logits = decode_step(out.back());
    }
    return out;
  }

  /// The embedding rows of `tokens`, [T, d] in float. Throws config_error for a token id
  /// outside [0, vocab_size).
  Tensor<float> embed(std::span<const std::int64_t> tokens) const {
    const std::int64_t d = cfg_.hidden_size;
    Tensor<float> x({std::int64_t(tokens.size()), d});
    for (std::size_t t = 0; t < tokens.size(); ++t) {
      check_token("embed", tokens, t);
      for (std::int64_t j = 0; j < d; ++j) x(std::int64_t(t), j) = to_float(embed_(tokens[t], j));
    }
    return x;
  }

 private:
  // Positions the caches hold: opts.max_seq_len, or the config's when 0.
  static std::int64_t checked_capacity(const MixtralConfig& cfg, const MixtralModelOptions& opts) {
    if (opts.max_seq_len < 0)
      switchyard::detail::fail_config(name, "load", "max_seq_len", opts.max_seq_len,
                                      ">= 0 (0 = max_position_embeddings)");
    return opts.max_seq_len == 0 ? cfg.max_position_embeddings : opts.max_seq_len;
  }

  std::int64_t check_layer(std::int64_t l) const {
    if (l < 0 || l >= num_layers())
      switchyard::detail::fail_config(name, "layer", "l", l,
                                      "in [0, num_layers=" + std::to_string(num_layers()) + ")");
    return l;
  }

  void check_token(std::string_view fn, std::span<const std::int64_t> tokens, std::size_t i) const {
    if (tokens[i] < 0 || tokens[i] >= cfg_.vocab_size)
      switchyard::detail::fail_config(
          name, fn, "tokens[" + std::to_string(i) + "]", tokens[i],
          "a token id in [0, vocab_size=" + std::to_string(cfg_.vocab_size) + ")");
  }

  // No tokens, bad ids, or positions first .. first + T - 1 past the cache.
  void check_tokens(std::string_view fn, std::span<const std::int64_t> tokens,
                    std::int64_t first) const {
    const std::int64_t T = std::int64_t(tokens.size());
    if (T < 1) switchyard::detail::fail_config(name, fn, "tokens", "[]", "at least one token");
    for (std::size_t i = 0; i < tokens.size(); ++i) check_token(fn, tokens, i);
    if (T > capacity_ - first)
      switchyard::detail::fail_config(name, fn, "tokens", "[T=" + std::to_string(T) + "]",
                                      "at most " + std::to_string(capacity_ - first) +
                                          " tokens: the sequence holds " + std::to_string(first) +
                                          " of max_seq_len = " + std::to_string(capacity_) +
                                          " positions");
  }

  // The checked tokens through the layers; logits of the last row (every row when traced).
  Tensor<float> run(std::span<const std::int64_t> tokens, MixtralTrace* trace) {
    const std::int64_t T = std::int64_t(tokens.size()), d = cfg_.hidden_size, V = cfg_.vocab_size;
    Tensor<float> x = embed(tokens);
    if (trace) {
      trace->layers.clear();  // resize, not assign: copying an empty Tensor throws
      trace->layers.resize(layers_.size());
    }
    for (std::size_t l = 0; l < layers_.size(); ++l)
      layers_[l].forward(x.view<2>(), caches_[l], *rope_, trace ? &trace->layers[l] : nullptr);
    // Only the rows whose logits are wanted go through the final norm and the LM head.
    const std::int64_t first = trace ? 0 : T - 1;
    Tensor<float> xn({T - first, d});
    final_norm_.forward(x.view<2>().slice(0, first, T), norm_, xn.view<2>());
    Tensor<float> logits({T - first, V});
    core::linear<Arch>(xn.view<2>(), lm_head_, logits.view<2>());
    Tensor<float> last({V});
    for (std::int64_t j = 0; j < V; ++j) last(j) = logits(T - first - 1, j);
    if (trace) {
      trace->final_norm_out = std::move(xn);
      trace->logits = std::move(logits);
    }
    return last;
  }

  std::unique_ptr<io::Checkpoint> ckpt_;  // stable address: the views below point into it
  MixtralConfig cfg_;
  std::int64_t capacity_;
  RMSNorm final_norm_;
  std::optional<RotaryEmbedding> rope_;  // built once the weights have been checked
  ConstView<W, 2> embed_{}, lm_head_{};
  ConstView<W, 1> norm_{};
  std::vector<layer_type> layers_;
  std::vector<attention::KVCache<float>> caches_;
};

}  // namespace models
}  // namespace v0
}  // namespace switchyard
