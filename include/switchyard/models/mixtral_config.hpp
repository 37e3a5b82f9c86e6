#pragma once
// MixtralConfig: the hyperparameters of a Mixtral model, read from a Hugging Face config.json
// (transformers MixtralConfig field names) and validated field by field, so that a bad value
// fails here with the field's name rather than later as a shape error deep in a layer.
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <string_view>

#include "switchyard/core/error.hpp"
#include "switchyard/core/int_math.hpp"

namespace switchyard {
inline namespace v0 {
namespace models {

/// Field names and meanings as in transformers' MixtralConfig.
struct MixtralConfig {
  std::int64_t vocab_size = 0;               ///< V, rows of embed_tokens and lm_head
  std::int64_t hidden_size = 0;              ///< d, the residual stream width
  std::int64_t intermediate_size = 0;        ///< F, hidden width of each expert
  std::int64_t num_hidden_layers = 0;        ///< decoder layers
  std::int64_t num_attention_heads = 0;      ///< H query heads
  std::int64_t num_key_value_heads = 0;      ///< H_kv key/value heads (GQA), divides H
  std::int64_t head_dim = 0;                 ///< D; config.json's head_dim, else d / H
  std::int64_t num_local_experts = 0;        ///< E routed experts per layer
  std::int64_t num_experts_per_tok = 0;      ///< K experts per token, 1..E
  std::int64_t max_position_embeddings = 0;  ///< positions the model was trained for
  double rope_theta = 0;                     ///< RoPE base, finite and > 0
  double rms_norm_eps = 0;                   ///< RMSNorm eps, finite and > 0
  std::int64_t sliding_window = 0;           ///< 0 = none (config.json null or absent)
  bool tie_word_embeddings = false;          ///< lm_head shares embed_tokens

  static constexpr std::string_view name = "MixtralConfig";

  /// Reads the fields from a parsed config.json and validates them. Required: vocab_size,
  /// hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
  /// num_key_value_heads, num_local_experts, num_experts_per_tok, max_position_embeddings,
  /// rope_theta, rms_norm_eps. Optional: head_dim (null or absent: hidden_size /
  /// num_attention_heads), sliding_window (null or absent: none), tie_word_embeddings
  /// (false). Also checked when present: model_type "mixtral", hidden_act "silu", rope_scaling
  /// null (scaled RoPE is not supported). Throws config_error naming the field for a missing
  /// field, a value of the wrong JSON type, and every rule of validate(); `source` (e.g. the
  /// file's path) is named in the message.
  static MixtralConfig from_json(const nlohmann::json& j, std::string_view source = "config.json") {
    const std::string where = "from_json(" + std::string(source) + ")";
    if (!j.is_object())
      throw config_error(std::string(name) + "::" + where + ": expected a JSON object, got " +
                         j.type_name());
    const auto fail = [&](std::string_view field, const std::string& value, std::string_view want) {
      switchyard::detail::fail_config(name, where, field, value, want);
    };
    const auto integer = [&](const char* field, bool required, std::int64_t fallback) {
      const auto it = j.find(field);
      if (it == j.end() || it->is_null()) {
        if (required) fail(field, "<missing>", "an integer >= 1");
        return fallback;
      }
      if (!it->is_number_integer()) fail(field, it->dump(), "an integer");
      if (it->is_number_unsigned() &&
          it->get<std::uint64_t>() > std::uint64_t(std::numeric_limits<std::int64_t>::max()))
        fail(field, it->dump(), "an integer below 2^63");
      return it->get<std::int64_t>();
    };
    const auto number = [&](const char* field) {
      const auto it = j.find(field);
      if (it == j.end() || it->is_null()) fail(field, "<missing>", "a finite number > 0");
      if (!it->is_number()) fail(field, it->dump(), "a number");
      return it->get<double>();
    };
    const auto text = [&](const char* field, std::string_view want) {
      const auto it = j.find(field);
      if (it == j.end() || it->is_null()) return;
      if (!it->is_string() || it->get<std::string>() != want)
        fail(field, it->dump(), "\"" + std::string(want) + "\"");
    };
    text("model_type", "mixtral");
    text("hidden_act", "silu");
    if (const auto it = j.find("rope_scaling"); it != j.end() && !it->is_null())
      fail("rope_scaling", "{...}", "null (scaled RoPE is not supported)");

    MixtralConfig c;
    c.vocab_size = integer("vocab_size", true, 0);
    c.hidden_size = integer("hidden_size", true, 0);
    c.intermediate_size = integer("intermediate_size", true, 0);
    c.num_hidden_layers = integer("num_hidden_layers", true, 0);
    c.num_attention_heads = integer("num_attention_heads", true, 0);
    c.num_key_value_heads = integer("num_key_value_heads", true, 0);
    c.num_local_experts = integer("num_local_experts", true, 0);
    c.num_experts_per_tok = integer("num_experts_per_tok", true, 0);
    c.max_position_embeddings = integer("max_position_embeddings", true, 0);
    c.rope_theta = number("rope_theta");
    c.rms_norm_eps = number("rms_norm_eps");
    // head_dim: absent or null means d / H; if d / H is not whole, validate() names it.
    c.head_dim = integer("head_dim", false, 0);
    if (j.find("head_dim") == j.end() || j.at("head_dim").is_null()) {
      if (c.num_attention_heads > 0 && c.hidden_size % c.num_attention_heads != 0)
        fail("num_attention_heads", std::to_string(c.num_attention_heads),
             "a divisor of hidden_size = " + std::to_string(c.hidden_size) +
                 " (config.json has no head_dim)");
      c.head_dim = c.num_attention_heads > 0 ? c.hidden_size / c.num_attention_heads : 0;
    }
    c.sliding_window = integer("sliding_window", false, 0);
    if (const auto it = j.find("tie_word_embeddings"); it != j.end() && !it->is_null()) {
      if (!it->is_boolean()) fail("tie_word_embeddings", it->dump(), "true or false");
      c.tie_word_embeddings = it->get<bool>();
    }
    c.validate(where);
    return c;
  }

  /// Reads and validates a config.json file. Throws switchyard::error when the file cannot be
  /// read or is not JSON (naming the path), config_error as from_json.
  static MixtralConfig from_file(const std::filesystem::path& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in)
      throw switchyard::error(std::string(name) + "::from_file: cannot open '" + path.string() +
                              "'");
    nlohmann::json j = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded())
      throw switchyard::error(std::string(name) + "::from_file: '" + path.string() +
                              "' is not valid JSON");
    return from_json(j, path.string());
  }

  /// Throws config_error naming the first field that breaks a rule: every size >= 1,
  /// num_key_value_heads dividing num_attention_heads, head_dim even (RoPE pairs), the
  /// projection widths num_attention_heads * head_dim and hidden_size * that width within
  /// core::max_buffer_bytes as float (so no product overflows), 1 <= num_experts_per_tok <=
  /// num_local_experts, rope_theta in [1, FLT_MAX] (the RoPE table is built in float; a base
  /// below 1 would give frequencies above 1 and, far enough below, infinite angles),
  /// rms_norm_eps finite and > 0, sliding_window >= 0. `fn` names the caller in the message.
  void validate(std::string_view fn = "validate") const {
    const auto positive = [&](std::string_view field, std::int64_t v) {
      if (v < 1) switchyard::detail::fail_config(name, fn, field, v, "an integer >= 1");
    };
    positive("vocab_size", vocab_size);
    positive("hidden_size", hidden_size);
    positive("intermediate_size", intermediate_size);
    positive("num_hidden_layers", num_hidden_layers);
    positive("num_attention_heads", num_attention_heads);
    positive("num_key_value_heads", num_key_value_heads);
    positive("head_dim", head_dim);
    positive("num_local_experts", num_local_experts);
    positive("num_experts_per_tok", num_experts_per_tok);
    positive("max_position_embeddings", max_position_embeddings);
    if (num_attention_heads % num_key_value_heads != 0)
      switchyard::detail::fail_config(
          name, fn, "num_key_value_heads", num_key_value_heads,
          "a divisor of num_attention_heads = " + std::to_string(num_attention_heads) +
              " (grouped-query attention)");
    if (head_dim % 2 != 0)
      switchyard::detail::fail_config(name, fn, "head_dim", head_dim,
                                      "an even number (RoPE rotates channel pairs)");
    // q_proj is [H * D, d]; k_proj and v_proj are narrower (H_kv divides H).
    if (core::bounded_product({num_attention_heads, head_dim, hidden_size}, sizeof(float)) < 0)
      switchyard::detail::fail_config(
          name, fn, "head_dim", head_dim,
          "a size whose q_proj [num_attention_heads * head_dim, hidden_size] = [" +
              std::to_string(num_attention_heads) + " * " + std::to_string(head_dim) + ", " +
              std::to_string(hidden_size) + "] fits core::max_buffer_bytes as float");
    if (num_experts_per_tok > num_local_experts)
      switchyard::detail::fail_config(
          name, fn, "num_experts_per_tok", num_experts_per_tok,
          "at most num_local_experts = " + std::to_string(num_local_experts));
    if (!(rope_theta >= 1 && rope_theta <= std::numeric_limits<float>::max()))
      switchyard::detail::fail_config(name, fn, "rope_theta", rope_theta,
                                      "a value in [1, FLT_MAX] (the RoPE table is float)");
    if (!(std::isfinite(rms_norm_eps) && rms_norm_eps > 0))
      switchyard::detail::fail_config(name, fn, "rms_norm_eps", rms_norm_eps, "a finite value > 0");
    if (sliding_window < 0)
      switchyard::detail::fail_config(name, fn, "sliding_window", sliding_window,
                                      ">= 0 (0 or null: no window)");
  }
};

}  // namespace models
}  // namespace v0
}  // namespace switchyard
