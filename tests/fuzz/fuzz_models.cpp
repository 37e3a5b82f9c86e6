// libFuzzer target: Hugging Face checkpoints as a user downloads them, with fuzzed
// config.json fields and tensors. Each input writes a small checkpoint (one or two shards,
// an index and config.json) to a per-process folder, then loads and runs either a whole
// MixtralModel (prefill, decode steps, greedy generation) or one MoE block of any family
// through load_hf_moe_block (routing from config.json or given). The tensors usually have the
// shapes the config implies; sometimes one is missing, stored with another shape or dtype,
// and any config.json field may be absent, null, of the wrong JSON type or extreme.
//
// Every outcome must be a result or a switchyard exception; a crash, a sanitizer report,
// another exception, a huge allocation or a hang is a finding. The reader of the files
// themselves is fuzzed by fuzz_safetensors; here the files are well formed and their
// contents hostile. SWITCHYARD_MAX_BUFFER_BYTES is 2^28 (set by CMake).
#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>
#include <switchyard/io/checkpoint.hpp>
#include <switchyard/io/checkpoint_writer.hpp>
#include <switchyard/models/mixtral_model.hpp>
#include <switchyard/moe/hf_checkpoint.hpp>
#include <vector>

#include "fuzz_input.hpp"

using namespace switchyard;

namespace {

class Fuzz : public switchyard_fuzz::FuzzInput {
 public:
  using FuzzInput::FuzzInput;
  // Inputs usually run out before the tensors are filled, and an exhausted provider gives
  // zeros: each choice below maps 0 to its sound value (a kept field, a finite weight).

  /// A weight or activation: small multiples of 1/32, sometimes NaN, inf or huge.
  float value() {
    const std::uint8_t b = byte();
    static constexpr float special[] = {std::numeric_limits<float>::quiet_NaN(),
                                        std::numeric_limits<float>::infinity(),
                                        -std::numeric_limits<float>::infinity(), 3e38f, 0.0f};
    if (b >= 251) return special[b - 251];
    return static_cast<float>(b - 128) / 32.0f;
  }
  /// config.json's value for a field whose sound value is `want`: usually `want`, sometimes
  /// an extreme integer, a real, another JSON type or null.
  nlohmann::json field(const nlohmann::json& want) {
    const std::uint8_t b = byte();
    if (b < 240) return want;
    static const nlohmann::json odd[] = {0,
                                         -1,
                                         std::int64_t(1) << 31,
                                         std::int64_t(1) << 40,
                                         std::int64_t(1) << 62,
                                         std::numeric_limits<std::int64_t>::max(),
                                         std::numeric_limits<std::uint64_t>::max(),
                                         0.5,
                                         1e300,
                                         -1e300,
                                         1e-300,
                                         "2",
                                         nullptr,
                                         true,
                                         nlohmann::json::array({1}),
                                         nlohmann::json::object()};
    return odd[b % std::size(odd)];
  }
  /// Sets config[key] = field(want), or (rarely) leaves the key out.
  void set(nlohmann::json& config, const char* key, const nlohmann::json& want) {
    if (byte() >= 252) return;
    config[key] = field(want);
  }
};

/// The checkpoint under construction: tensors spread over one or two shards, each usually
/// as the config implies, sometimes left out, reshaped or stored as the other dtype.
class CheckpointBuilder {
 public:
  CheckpointBuilder(Fuzz& f, bool bf16) : f_(f), bf16_(bf16), shards_(f.flag() ? 2 : 1) {}

  void add(const std::string& name, std::vector<std::int64_t> shape) {
    // Rarely (b < 8): missing, the last extent off by one, an extra axis, the other dtype.
    const std::uint8_t b = f_.byte() < 248 ? 255 : f_.byte();
    if (b < 3) return;
    if (b < 6 && !shape.empty()) shape.back() += b == 3 ? 1 : -1;
    if (b == 6) shape.push_back(1);  // another rank
    std::int64_t n = 1;
    for (auto& e : shape) {
      e = std::max<std::int64_t>(e, 0);
      n *= e;
    }
    std::vector<float> data(static_cast<std::size_t>(n));
    for (auto& x : data) x = f_.value();
    io::SafeTensorsWriter& w = shards_[std::size_t(f_.pick(0, std::int64_t(shards_.size()) - 1))];
    if (bf16_ != (b == 7))
      w.add_bf16(name, data.data(), shape);
    else
      w.add(name, data.data(), shape);
  }

  /// Writes the shards, the index and config.json into `dir`; rarely, the index is then
  /// corrupted (an entry dropped, a missing or outside shard, a non-string, no object).
  void save(const std::filesystem::path& dir, const nlohmann::json& config) {
    const std::filesystem::path index = io::save_sharded_checkpoint(dir, shards_, config);
    if (f_.byte() < 250) return;
    nlohmann::json j = nlohmann::json::parse(std::ifstream(index));
    nlohmann::json& map = j["weight_map"];
    if (map.empty()) return;
    auto entry = map.begin();
    std::advance(entry, f_.pick(0, std::int64_t(map.size()) - 1));
    static const nlohmann::json odd[] = {"missing.safetensors", 7,  "../outside.safetensors",
                                         "/etc/hostname",       "", nullptr};
    switch (f_.pick(0, 7)) {
      case 6:
        map.erase(entry);
        break;
      case 7:
        j["weight_map"] = nlohmann::json::array();
        break;
      default:
        *entry = odd[f_.pick(0, 5)];
        break;
    }
    std::ofstream(index) << j.dump();
  }

 private:
  Fuzz& f_;
  bool bf16_;
  std::vector<io::SafeTensorsWriter> shards_;
};

/// This process's checkpoint folder, emptied; removed when the process exits.
std::filesystem::path fresh_dir() {
  struct Folder {
    std::filesystem::path path = std::filesystem::temp_directory_path() /
                                 ("switchyard_fuzz_models." + std::to_string(::getpid()));
    ~Folder() {
      std::error_code ec;
      std::filesystem::remove_all(path, ec);
    }
  };
  static const Folder dir;
  std::filesystem::remove_all(dir.path);
  return dir.path;
}

/// A token id: usually in [0, vocab), sometimes just outside.
std::int64_t token(Fuzz& f, std::int64_t vocab) {
  return f.byte() < 248 ? f.pick(0, vocab - 1) : f.pick(-2, vocab + 2);
}
std::vector<std::int64_t> tokens(Fuzz& f, std::int64_t vocab) {
  std::vector<std::int64_t> t(std::size_t(f.byte() < 250 ? f.pick(1, 5) : 0));
  for (auto& x : t) x = token(f, vocab);
  return t;
}

// A tiny Mixtral: config.json and every tensor of MixtralForCausalLM, loaded as float or bf16,
// then prefill, decode steps and greedy generation.
template <class W>
void fuzz_mixtral(Fuzz& f) {
  const std::int64_t V = f.pick(1, 12), d = 2 * f.pick(1, 4), H = f.pick(1, 3),
                     Hkv = f.flag() ? H : 1, D = 2 * f.pick(1, 3), F = f.pick(1, 6),
                     E = f.pick(1, 4), K = f.pick(1, E), L = f.pick(1, 2), P = f.pick(1, 24);
  nlohmann::json config = nlohmann::json::object();
  f.set(config, "model_type", "mixtral");
  f.set(config, "hidden_act", "silu");
  f.set(config, "vocab_size", V);
  f.set(config, "hidden_size", d);
  f.set(config, "intermediate_size", F);
  f.set(config, "num_hidden_layers", L);
  f.set(config, "num_attention_heads", H);
  f.set(config, "num_key_value_heads", Hkv);
  f.set(config, "head_dim", D);
  f.set(config, "num_local_experts", E);
  f.set(config, "num_experts_per_tok", K);
  f.set(config, "max_position_embeddings", P);
  f.set(config, "rope_theta", f.flag() ? 1e4 : 1e6);
  f.set(config, "rms_norm_eps", 1e-5);
  if (f.flag()) f.set(config, "sliding_window", f.pick(0, 8));
  const bool tied = f.flag();
  if (tied || f.flag()) f.set(config, "tie_word_embeddings", tied);
  if (f.byte() >= 252) config["rope_scaling"] = {{"type", "linear"}, {"factor", 2.0}};

  CheckpointBuilder ckpt(f, std::is_same_v<W, bf16>);
  ckpt.add("model.embed_tokens.weight", {V, d});
  for (std::int64_t l = 0; l < L; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    ckpt.add(p + "input_layernorm.weight", {d});
    ckpt.add(p + "self_attn.q_proj.weight", {H * D, d});
    ckpt.add(p + "self_attn.k_proj.weight", {Hkv * D, d});
    ckpt.add(p + "self_attn.v_proj.weight", {Hkv * D, d});
    ckpt.add(p + "self_attn.o_proj.weight", {d, H * D});
    ckpt.add(p + "post_attention_layernorm.weight", {d});
    ckpt.add(p + "block_sparse_moe.gate.weight", {E, d});
    for (std::int64_t e = 0; e < E; ++e) {
      const std::string x = p + "block_sparse_moe.experts." + std::to_string(e) + ".";
      ckpt.add(x + "w1.weight", {F, d});
      ckpt.add(x + "w3.weight", {F, d});
      ckpt.add(x + "w2.weight", {d, F});
    }
  }
  ckpt.add("model.norm.weight", {d});
  if (!tied) ckpt.add("lm_head.weight", {V, d});
  const std::filesystem::path dir = fresh_dir();
  ckpt.save(dir, config);

  models::MixtralModelOptions opts;
  if (f.byte() >= 224) opts.max_seq_len = f.pick(-2, 32);
  auto model = models::MixtralModel<W>::load(dir, opts);
  switch (f.pick(0, 2)) {
    case 0: {  // prefill, then decode steps
      model.prefill(tokens(f, V));
      for (std::int64_t s = f.pick(0, 3); s > 0; --s) model.decode_step(token(f, V));
      break;
    }
    case 1: {  // chunked prefill, traced
      models::MixtralTrace trace;
      model.prefill(tokens(f, V), &trace);
      model.append(tokens(f, V), &trace);
      break;
    }
    default:
      model.generate(tokens(f, V), f.pick(-1, 6));
      break;
  }
}

// One MoE block of any family, routing from config.json or given, then a forward.
template <class W>
void fuzz_hf_block(Fuzz& f) {
  const auto family = static_cast<moe::HFFamily>(f.pick(0, 5));
  const bool mixtral = family == moe::HFFamily::mixtral;
  const bool deepseek =
      family == moe::HFFamily::deepseek_v2 || family == moe::HFFamily::deepseek_v3;
  const std::int64_t E = f.pick(1, 8), d = f.pick(1, 6), F = f.pick(1, 6), Fs = f.pick(1, 6);
  nlohmann::json config = nlohmann::json::object();
  f.set(config, "num_experts_per_tok", f.pick(1, E));
  f.set(config, "norm_topk_prob", f.flag());
  if (deepseek) {
    static const char* const scoring[] = {"softmax", "sigmoid", "softplus"};
    static const char* const methods[] = {"greedy", "group_limited_greedy", "noaux_tc", "top_p"};
    if (f.flag()) f.set(config, "scoring_func", scoring[f.pick(0, 2)]);
    if (f.flag()) f.set(config, "topk_method", methods[f.pick(0, 3)]);
    f.set(config, "n_group", f.pick(1, E));
    f.set(config, "topk_group", f.pick(1, E));
    f.set(config, "routed_scaling_factor", 2.5);
  }

  const std::string p = "model.layers.0." + std::string(mixtral ? "block_sparse_moe" : "mlp");
  CheckpointBuilder ckpt(f, std::is_same_v<W, bf16>);
  ckpt.add(p + ".gate.weight", {E, d});
  const char* gate = mixtral ? "w1" : "gate_proj";
  const char* up = mixtral ? "w3" : "up_proj";
  const char* down = mixtral ? "w2" : "down_proj";
  for (std::int64_t e = 0; e < E; ++e) {
    const std::string x = p + ".experts." + std::to_string(e) + ".";
    ckpt.add(x + gate + ".weight", {F, d});
    ckpt.add(x + up + ".weight", {F, d});
    ckpt.add(x + down + ".weight", {d, F});
  }
  if (family == moe::HFFamily::qwen2_moe || deepseek) {
    const std::string s = p + (deepseek ? ".shared_experts" : ".shared_expert");
    ckpt.add(s + ".gate_proj.weight", {Fs, d});
    ckpt.add(s + ".up_proj.weight", {Fs, d});
    ckpt.add(s + ".down_proj.weight", {d, Fs});
  }
  if (family == moe::HFFamily::qwen2_moe) ckpt.add(p + ".shared_expert_gate.weight", {1, d});
  if (family == moe::HFFamily::deepseek_v3) ckpt.add(p + ".gate.e_score_correction_bias", {E});
  const std::filesystem::path dir = fresh_dir();
  ckpt.save(dir, config);

  const io::Checkpoint checkpoint = io::Checkpoint::open(dir);
  const moe::HFMoEBlock<W> block =
      f.flag() ? moe::load_hf_moe_block<W>(checkpoint, p, family)
               : moe::load_hf_moe_block<W>(
                     checkpoint, p, family,
                     {.top_k = f.byte() < 240 ? f.pick(1, E) : f.pick(-1, E + 1),
                      .norm_topk_prob = f.flag(),
                      .score_func = f.flag() ? moe::ScoreFunc::softmax : moe::ScoreFunc::sigmoid,
                      .n_group = f.byte() < 240 ? 1 : f.pick(0, E + 1),
                      .topk_group = f.byte() < 240 ? 1 : f.pick(0, E + 1),
                      .routed_scaling_factor = f.flag() ? 1.0 : f.value()});
  const std::int64_t T = f.pick(0, 6), xd = f.byte() < 240 ? d : f.pick(0, d + 1);
  Tensor<float> x({T, xd}), y({T, f.byte() < 240 ? d : f.pick(0, d + 1)});
  for (auto& v : x) v = f.value();
  moe::DispatchPlan<float> plan;
  block.forward(x.view<2>(), y.view<2>(), f.flag() ? &plan : nullptr);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  Fuzz f(data, size);
  set_num_threads(1 + static_cast<int>(f.pick(0, 1)));
  try {
    switch (f.pick(0, 3)) {
      case 0:
        fuzz_mixtral<float>(f);
        break;
      case 1:
        fuzz_mixtral<bf16>(f);
        break;
      case 2:
        fuzz_hf_block<float>(f);
        break;
      default:
        fuzz_hf_block<bf16>(f);
        break;
    }
  } catch (const std::invalid_argument&) {  // shape_error, config_error: a clear rejection
  } catch (const switchyard::error&) {      // a missing tensor, an unreadable checkpoint
  }
  return 0;
}
