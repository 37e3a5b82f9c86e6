// models/: the Mixtral decoder from a Hugging Face checkpoint against the gpt-fast reference
// run of tests/fixtures/decoder_tiny.safetensors (prefill of 12 tokens in one call, then 6
// teacher-forced decode steps): every intermediate, the router choices, the KV cache, the
// logits and the greedy tokens, for the float32 checkpoint (hf_mixtral_tiny/f32, against the
// float outputs) and the bf16 one (hf_mixtral_tiny/bf16, W = bf16, against the bf16w_*
// outputs). Also RoPE's table, token-by-token prefill against one call (decode and long
// prefill paths), greedy generate(), zero-copy weights, MixtralConfig's validation and the
// errors of loading and decoding.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <switchyard/io/checkpoint.hpp>
#include <switchyard/io/safetensors_writer.hpp>
#include <switchyard/models/mixtral_config.hpp>
#include <switchyard/models/mixtral_model.hpp>
#include <switchyard/models/rms_norm.hpp>
#include <switchyard/models/rotary.hpp>
#include <vector>

#include "support/fixtures.hpp"
#include "support/temp_dir.hpp"

using namespace switchyard;
using namespace switchyard::models;
using Catch::Contains;

namespace {

constexpr std::int64_t P = 12, S = 6, N = P + S;  // prompt, decode steps, rows (fixture)
constexpr std::int64_t d = 64, H = 4, Hkv = 2, D = 16, E = 4, K = 2, V = 32;

std::string checkpoint_dir(const char* kind) { return fixture_path("hf_mixtral_tiny/") + kind; }

const io::SafeTensors& golden() {
  static const io::SafeTensors f = open_fixture("decoder_tiny.safetensors");
  return f;
}

std::vector<std::int64_t> golden_ints(const std::string& name) {
  const Tensor<std::int64_t> t = golden().tensor<std::int64_t>(name);
  return {t.begin(), t.end()};
}

std::vector<double> golden_floats(const std::string& name) {
  const Tensor<float> t = golden().tensor<float>(name);
  return {t.begin(), t.end()};
}

// Appends the elements of a row-major tensor.
void append(std::vector<double>& dst, const Tensor<float>& t) {
  dst.insert(dst.end(), t.begin(), t.end());
}

// The fixture's rule: max |got - ref| <= rel * max(1, max |ref|). Prints the measured error
// when MODELS_PRINT_ERRORS is set (for the record of how much room the tolerance leaves).
void check_close(const std::string& what, const std::vector<double>& got,
                 const std::vector<double>& ref, double rel) {
  REQUIRE(got.size() == ref.size());
  double err = 0, scale = 1;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    err = std::max(err, std::abs(got[i] - ref[i]));
    scale = std::max(scale, std::abs(ref[i]));
  }
  const double tol = rel * scale;
  if (std::getenv("MODELS_PRINT_ERRORS"))
    std::printf("  %-28s max|diff| %.3e  tolerance %.1e  (max|ref| %.3f)\n", what.c_str(), err, tol,
                scale);
  INFO(what << ": max |ours - ref| = " << err << ", tolerance " << tol);
  CHECK(err <= tol);
}

// Every row of one teacher-forced run: prefill of the 12 prompt tokens in one call, then 6
// decode steps feeding token_ids[12 + s], as the fixture's driver did.
struct Run {
  std::map<std::string, std::vector<double>> rows;  // name -> [N, ...] flattened
  std::vector<std::int64_t> topk_idx, next_token;   // [N, K], [N]
  std::vector<double> k_prefill, v_prefill;         // [H_kv, P, D] after the prefill call
  std::vector<double> k_cache, v_cache;             // [H_kv, N, D] after the last step
  std::vector<double> embeddings;                   // [N, d]
};

// Cache rows [0, n) of every KV head as [H_kv, n, D].
std::vector<double> cache_rows(const ConstView<float, 4>& all, std::int64_t n) {
  std::vector<double> out;
  for (std::int64_t h = 0; h < all.extent(1); ++h)
    for (std::int64_t p = 0; p < n; ++p)
      for (std::int64_t j = 0; j < all.extent(3); ++j) out.push_back(all(0, h, p, j));
  return out;
}

template <class W>
Run run_fixture_protocol(MixtralModel<W>& model) {
  const std::vector<std::int64_t> tokens = golden_ints("token_ids");
  Run r;
  const auto record = [&](MixtralTrace& t) {
    const MixtralLayerTrace& l = t.layers.at(0);
    append(r.rows["attn_norm_out"], l.attn_norm_out);
    append(r.rows["q_rope"], l.q_rope);
    append(r.rows["attn_core_out"], l.attn_core_out);
    append(r.rows["attn_out"], l.attn_out);
    append(r.rows["ffn_norm_out"], l.ffn_norm_out);
    append(r.rows["router_logits"], l.router_logits);
    append(r.rows["moe_out"], l.moe_out);
    append(r.rows["block_out"], l.block_out);
    append(r.rows["final_norm_out"], t.final_norm_out);
    append(r.rows["logits"], t.logits);
    const auto idx = l.plan.expert_indices();
    const auto w = l.plan.expert_weights();
    for (std::int64_t i = 0; i < idx.extent(0); ++i) {
      for (std::int64_t j = 0; j < idx.extent(1); ++j) {
        r.topk_idx.push_back(idx(i, j));
        r.rows["router_topk_weights"].push_back(w(i, j));
      }
      r.next_token.push_back(greedy_token(t.logits.view<2>()[i]));
    }
  };
  MixtralTrace trace;
  model.prefill(std::span(tokens).first(P), &trace);
  record(trace);
  r.k_prefill = cache_rows(model.cache(0).keys(), P);
  r.v_prefill = cache_rows(model.cache(0).values(), P);
  for (std::int64_t s = 0; s < S; ++s) {
    MixtralTrace step;
    model.decode_step(tokens[std::size_t(P + s)], &step);
    record(step);
  }
  r.k_cache = cache_rows(model.cache(0).keys(), N);
  r.v_cache = cache_rows(model.cache(0).values(), N);
  append(r.embeddings, model.embed(tokens));
  return r;
}

// Feeds `tokens` one at a time (prefill of the first, then decode steps): one trace per token.
template <class W>
std::vector<MixtralTrace> token_by_token(MixtralModel<W>& model,
                                         std::span<const std::int64_t> tokens) {
  std::vector<MixtralTrace> traces(tokens.size());
  for (std::size_t t = 0; t < tokens.size(); ++t) {
    if (t == 0)
      model.prefill(tokens.first(1), &traces[t]);
    else
      model.decode_step(tokens[t], &traces[t]);
  }
  return traces;
}

nlohmann::json tiny_config() {
  std::ifstream in(checkpoint_dir("f32") + "/config.json");
  return nlohmann::json::parse(in);
}

// A one-file checkpoint in `dir` with the f32 weights of decoder_tiny and `config`;
// `replace` swaps one tensor for zeros of another shape.
void write_checkpoint(const std::filesystem::path& dir, const nlohmann::json& config,
                      const std::string& replace = {}, std::vector<std::int64_t> shape = {}) {
  io::SafeTensorsWriter w;
  for (const std::string& name : golden().names()) {
    if (name.rfind("model.", 0) != 0 && name != "lm_head.weight") continue;  // weights only
    if (name == replace) {
      std::int64_t n = 1;
      for (auto e : shape) n *= e;
      const std::vector<float> zeros(std::size_t(n), 0.0f);
      w.add(name, zeros.data(), shape);
    } else {
      w.add(name, golden().tensor<float>(name));
    }
  }
  w.save((dir / "model.safetensors").string());
  std::ofstream(dir / "config.json") << config.dump(2);
}

}  // namespace

TEST_CASE("RotaryEmbedding: the float32 table of the fixture, rotate_half pairs",
          "[models][rope]") {
  const RotaryEmbedding rope({.head_dim = D, .theta = 10000.0, .max_positions = N});
  const std::vector<double> cos_ref = golden_floats("rope_cos"),
                            sin_ref = golden_floats("rope_sin");
  std::vector<double> c, s;
  for (std::int64_t p = 0; p < N; ++p)
    for (std::int64_t i = 0; i < D / 2; ++i) {
      c.push_back(rope.cos()(p, i));
      s.push_back(rope.sin()(p, i));
    }
  // The same float32 recipe as the reference; cos/sin of the float angle are correctly
  // rounded here, so at most the last bit may differ from torch's float cos/sin.
  check_close("rope_cos", c, cos_ref, 2e-7);
  check_close("rope_sin", s, sin_ref, 2e-7);

  // Pairs (i, i + D/2) rotate by pos * theta_i: hand-checked on one vector.
  Tensor<float> x({1, 1, D});
  for (std::int64_t j = 0; j < D; ++j) x(0, 0, j) = float(j + 1);
  rope.apply(x.view<3>(), 5);
  for (std::int64_t i = 0; i < D / 2; ++i) {
    const double cc = rope.cos()(5, i), ss = rope.sin()(5, i);
    CHECK(x(0, 0, i) == Approx((i + 1) * cc - (i + 1 + D / 2) * ss).margin(1e-5));
    CHECK(x(0, 0, i + D / 2) == Approx((i + 1 + D / 2) * cc + (i + 1) * ss).margin(1e-5));
  }
  CHECK_THROWS_AS(rope.apply(x.view<3>(), N), config_error);
  CHECK_THROWS_AS(RotaryEmbedding({.head_dim = 15, .theta = 1e4, .max_positions = 4}),
                  config_error);
  CHECK_THROWS_AS(RotaryEmbedding({.head_dim = 16, .theta = -1, .max_positions = 4}), config_error);
}

TEST_CASE("RMSNorm: hand-computed rows, float and bf16 weights", "[models][rms_norm]") {
  const RMSNorm norm({.eps = 1e-5});
  Tensor<float> x({2, 4});
  const float vals[8] = {1, 2, 3, 4, -2, 0, 2, 0};
  std::copy(vals, vals + 8, x.data());
  const float wf[4] = {1.0f, 0.5f, 2.0f, -1.0f};
  bf16 wb[4];
  for (int i = 0; i < 4; ++i) wb[i] = bf16::from_float(wf[i]);  // exact in bf16
  Tensor<float> yf({2, 4}), yb({2, 4});
  norm.forward(x.view<2>(), ConstView<float, 1>(wf, {4}), yf.view<2>());
  norm.forward(x.view<2>(), ConstView<bf16, 1>(wb, {4}), yb.view<2>());
  for (std::int64_t t = 0; t < 2; ++t) {
    double ms = 0;
    for (std::int64_t j = 0; j < 4; ++j) ms += double(x(t, j)) * x(t, j) / 4;
    for (std::int64_t j = 0; j < 4; ++j) {
      const double want = x(t, j) / std::sqrt(ms + 1e-5) * wf[j];
      CHECK(yf(t, j) == Approx(want).epsilon(1e-6));
      CHECK(yb(t, j) == yf(t, j));
    }
  }
  norm.forward(x.view<2>(), ConstView<float, 1>(wf, {4}), x.view<2>());  // in place
  CHECK(x(1, 2) == yf(1, 2));
  CHECK_THROWS_WITH(norm.forward(x.view<2>(), ConstView<float, 1>(wf, {3}), yf.view<2>()),
                    Contains("RMSNorm::forward") && Contains("weight"));
  CHECK_THROWS_AS(RMSNorm({.eps = 0}), config_error);
}

TEST_CASE("MixtralConfig reads the tiny checkpoint's config.json", "[models][config]") {
  const MixtralConfig c = MixtralConfig::from_file(checkpoint_dir("bf16") + "/config.json");
  CHECK(c.vocab_size == V);
  CHECK(c.hidden_size == d);
  CHECK(c.intermediate_size == 128);
  CHECK(c.num_hidden_layers == 1);
  CHECK(c.num_attention_heads == H);
  CHECK(c.num_key_value_heads == Hkv);
  CHECK(c.head_dim == D);  // hidden_size / num_attention_heads: config.json has no head_dim
  CHECK(c.num_local_experts == E);
  CHECK(c.num_experts_per_tok == K);
  CHECK(c.max_position_embeddings == 32);
  CHECK(c.rope_theta == 10000.0);
  CHECK(c.rms_norm_eps == 1e-5);
  CHECK(c.sliding_window == 0);
  CHECK_FALSE(c.tie_word_embeddings);

  nlohmann::json j = tiny_config();
  j["head_dim"] = 8;  // an explicit head_dim wins over hidden_size / heads
  CHECK(MixtralConfig::from_json(j).head_dim == 8);
}

TEST_CASE("MixtralConfig: every missing or invalid field is named", "[models][config][errors]") {
  struct Case {
    const char* field;
    nlohmann::json value;  // null: remove the field
    const char* says;
  };
  const Case cases[] = {
      {"hidden_size", nullptr, "<missing>"},
      {"num_local_experts", nullptr, "<missing>"},
      {"rope_theta", nullptr, "<missing>"},
      {"rms_norm_eps", nullptr, "<missing>"},
      {"vocab_size", 0, "an integer >= 1"},
      {"intermediate_size", -5, "an integer >= 1"},
      {"num_hidden_layers", 0, "an integer >= 1"},
      {"max_position_embeddings", 0, "an integer >= 1"},
      {"hidden_size", "64", "an integer"},
      {"num_key_value_heads", 3, "a divisor of num_attention_heads = 4"},
      {"num_attention_heads", 5, "a divisor of hidden_size = 64"},
      {"num_experts_per_tok", 5, "at most num_local_experts = 4"},
      {"num_experts_per_tok", 0, "an integer >= 1"},
      {"rms_norm_eps", 0.0, "a finite value > 0"},
      {"rms_norm_eps", -1e-6, "a finite value > 0"},
      {"rope_theta", -10000.0, "a value in [1, FLT_MAX]"},
      {"rope_theta", "1e4", "a number"},
      {"head_dim", 15, "an even number"},
      {"sliding_window", -1, ">= 0"},
      {"tie_word_embeddings", 1, "true or false"},
      {"model_type", "qwen2_moe", "\"mixtral\""},
      {"hidden_act", "gelu", "\"silu\""},
      {"rope_scaling", {{"type", "linear"}, {"factor", 2.0}}, "not supported"},
  };
  for (const Case& c : cases) {
    nlohmann::json j = tiny_config();
    if (c.value.is_null()) {
      j.erase(c.field);
    } else {
      j[c.field] = c.value;
    }
    INFO(c.field << " = " << c.value.dump());
    CHECK_THROWS_AS(MixtralConfig::from_json(j, "my/config.json"), config_error);
    CHECK_THROWS_WITH(MixtralConfig::from_json(j, "my/config.json"),
                      Contains("MixtralConfig::from_json(my/config.json)") &&
                          Contains(std::string("'") + c.field + "'") && Contains(c.says));
  }
  CHECK_THROWS_AS(MixtralConfig::from_json(nlohmann::json::array()), config_error);
  CHECK_THROWS_AS(MixtralConfig::from_file("/nonexistent/config.json"), switchyard::error);
}

TEST_CASE("Mixtral f32 checkpoint: prefill and 6 decode steps match decoder_tiny",
          "[models][fixture]") {
  MixtralModel<float> model = MixtralModel<float>::load(checkpoint_dir("f32"));
  CHECK(model.max_seq_len() == 32);  // max_position_embeddings
  const Run r = run_fixture_protocol(model);
  CHECK(model.length() == N);

  // The issue asks 1e-5 relative for float weights; it holds for every tensor here (the
  // fixture README's general rule is 1e-4).
  const double rel = 1e-5;
  check_close("x (embeddings)", r.embeddings, golden_floats("x"), 0.0);
  for (const char* name :
       {"attn_norm_out", "q_rope", "attn_core_out", "attn_out", "ffn_norm_out", "router_logits",
        "router_topk_weights", "moe_out", "block_out", "final_norm_out", "logits"})
    check_close(name, r.rows.at(name), golden_floats(name), rel);
  CHECK(r.topk_idx == golden_ints("router_topk_idx"));
  CHECK(r.next_token == golden_ints("next_token"));
  check_close("k_cache_prefill", r.k_prefill, golden_floats("k_cache_prefill"), rel);
  check_close("v_cache_prefill", r.v_prefill, golden_floats("v_cache_prefill"), rel);
  check_close("k_cache", r.k_cache, golden_floats("k_cache"), rel);
  check_close("v_cache", r.v_cache, golden_floats("v_cache"), rel);
  // Cache rows of the prompt are not touched by the decode steps.
  for (std::int64_t h = 0; h < Hkv; ++h)
    for (std::int64_t p = 0; p < P; ++p)
      for (std::int64_t j = 0; j < D; ++j) {
        CHECK(r.k_cache[std::size_t((h * N + p) * D + j)] ==
              r.k_prefill[std::size_t((h * P + p) * D + j)]);
      }
}

TEST_CASE("Mixtral bf16 checkpoint (W = bf16): prefill and 6 decode steps match bf16w_*",
          "[models][fixture][bf16]") {
  MixtralModel<bf16> model = MixtralModel<bf16>::load(checkpoint_dir("bf16"));
  const Run r = run_fixture_protocol(model);

  // Same arithmetic as the reference run on the bf16 weights (upcast exactly, float32
  // everything else), so the float-weights bound holds here as well.
  const double rel = 1e-5;
  check_close("bf16w_x", r.embeddings, golden_floats("bf16w_x"), 0.0);
  for (const char* name : {"attn_out", "block_out", "router_logits", "router_topk_weights",
                           "final_norm_out", "logits"})
    check_close(std::string("bf16w_") + name, r.rows.at(name),
                golden_floats(std::string("bf16w_") + name), rel);
  CHECK(r.topk_idx == golden_ints("bf16w_router_topk_idx"));
  CHECK(r.next_token == golden_ints("bf16w_next_token"));
  check_close("bf16w_k_cache", r.k_cache, golden_floats("bf16w_k_cache"), rel);
  check_close("bf16w_v_cache", r.v_cache, golden_floats("bf16w_v_cache"), rel);
  // And the bf16 run is not secretly the float one: its logits differ from the f32 outputs
  // by about the 1.3e-2 the fixture's cross_check records.
  double diff = 0;
  const std::vector<double> f32_logits = golden_floats("logits");
  for (std::size_t i = 0; i < f32_logits.size(); ++i)
    diff = std::max(diff, std::abs(r.rows.at("logits")[i] - f32_logits[i]));
  CHECK(diff > 1e-3);
}

TEST_CASE("Mixtral bf16 weights are views into the mapped checkpoint, never copies",
          "[models][bf16]") {
  const MixtralModel<bf16> model = MixtralModel<bf16>::load(checkpoint_dir("bf16"));
  const io::Checkpoint& ck = model.checkpoint();
  // The model's view is the checkpoint's own, and lies in the memory mapping of its shard.
  const auto same = [&](const void* p, const std::string& name) {
    INFO(name);
    CHECK(p == static_cast<const void*>(ck.view<bf16, 2>(name).data()));
    const io::SafeTensors& shard = ck.shard(name);
    CHECK(shard.load_mode() == io::LoadMode::map);
    const auto* b = reinterpret_cast<const std::byte*>(p);
    CHECK(b >= shard.data_section().data());
    CHECK(b + ck.info(name).nbytes() <= shard.data_section().data() + shard.data_section().size());
  };
  same(model.embed_tokens().data(), "model.embed_tokens.weight");
  same(model.lm_head().data(), "lm_head.weight");
  const MixtralLayerWeights<bf16>& w = model.layer(0).weights();
  same(w.q_proj.data(), "model.layers.0.self_attn.q_proj.weight");
  same(w.o_proj.data(), "model.layers.0.self_attn.o_proj.weight");
  same(w.moe.router_weight.data(), "model.layers.0.block_sparse_moe.gate.weight");
  const moe::ExpertWeights<bf16>& ex = w.moe.weights.experts;
  for (std::int64_t e = 0; e < E; ++e) {
    const std::string p = "model.layers.0.block_sparse_moe.experts." + std::to_string(e);
    same(ex.w1_of(e).data(), p + ".w1.weight");
    same(ex.w3_of(e).data(), p + ".w3.weight");
    same(ex.w2_of(e).data(), p + ".w2.weight");
  }
}

TEST_CASE("Mixtral greedy generate() reproduces the fixture's greedy tokens",
          "[models][generate]") {
  const std::vector<std::int64_t> tokens = golden_ints("token_ids");
  const std::vector<std::int64_t> next = golden_ints("next_token");
  const std::vector<std::int64_t> next_bf16 = golden_ints("bf16w_next_token");
  // The fixture fed its own greedy tokens: token_ids[12..17], then next_token[17].
  std::vector<std::int64_t> want(tokens.begin() + P, tokens.end());
  want.push_back(next[N - 1]);
  REQUIRE(std::vector<std::int64_t>(next.begin() + P - 1, next.end()) == want);

  MixtralModel<float> f32 = MixtralModel<float>::load(checkpoint_dir("f32"));
  CHECK(f32.generate(std::span(tokens).first(P), S + 1) == want);
  CHECK(f32.length() == N);  // the last token is returned, not fed
  CHECK(f32.generate(std::span(tokens).first(P), 0).empty());

  // bf16 weights: the teacher-forced tokens are the float run's, and bf16w_next_token says
  // the bf16 model picks the same greedy token at every row.
  MixtralModel<bf16> b = MixtralModel<bf16>::load(checkpoint_dir("bf16"));
  CHECK(b.generate(std::span(tokens).first(P), S + 1) ==
        std::vector<std::int64_t>(next_bf16.begin() + P - 1, next_bf16.end()));
}

TEST_CASE("Mixtral: token-by-token prefill equals one-call prefill", "[models][decode]") {
  const std::vector<std::int64_t> tokens = golden_ints("token_ids");
  MixtralModel<float> one = MixtralModel<float>::load(checkpoint_dir("f32"));
  MixtralModel<float> steps = MixtralModel<float>::load(checkpoint_dir("f32"));
  MixtralTrace all;
  one.prefill(std::span(tokens).first(P), &all);
  std::vector<double> by_step;
  for (const MixtralTrace& tr : token_by_token(steps, std::span(tokens).first(P)))
    append(by_step, tr.logits);
  std::vector<double> at_once;
  append(at_once, all.logits);
  // The causal mask makes each row see exactly keys 0..t both ways; only the summation order
  // of the attention kernels may differ.
  check_close("logits, token by token", by_step, at_once, 1e-6);
  check_close("k cache, token by token", cache_rows(steps.cache(0).keys(), P),
              cache_rows(one.cache(0).keys(), P), 1e-6);
}

TEST_CASE("Mixtral: a prompt longer than a decode block (DenseAttention::forward path)",
          "[models][decode]") {
  // 70 tokens > attention::max_decode_queries: one call runs the forward path; token by token
  // runs decode. max_seq_len past max_position_embeddings is allowed (RoPE extends).
  const std::int64_t T = 70;
  REQUIRE(T > attention::max_decode_queries);
  std::vector<std::int64_t> tokens(T);
  for (std::int64_t t = 0; t < T; ++t) tokens[std::size_t(t)] = (7 * t + 3) % V;
  MixtralModel<bf16> one = MixtralModel<bf16>::load(checkpoint_dir("bf16"), {.max_seq_len = 80});
  MixtralModel<bf16> steps = MixtralModel<bf16>::load(checkpoint_dir("bf16"), {.max_seq_len = 80});
  MixtralTrace all;
  const Tensor<float> last = one.prefill(tokens, &all);
  std::vector<double> by_step, at_once;
  append(at_once, all.logits);
  for (const MixtralTrace& tr : token_by_token(steps, std::span<const std::int64_t>(tokens)))
    append(by_step, tr.logits);
  check_close("logits, 70 tokens", by_step, at_once, 1e-5);
  // prefill returns the last row of the traced logits.
  for (std::int64_t j = 0; j < V; ++j) CHECK(last(j) == all.logits(T - 1, j));
  // Chunked: 40 then 30 tokens through append() gives the same last row.
  MixtralModel<bf16> chunks = MixtralModel<bf16>::load(checkpoint_dir("bf16"), {.max_seq_len = 80});
  chunks.prefill(std::span(tokens).first(40));
  const Tensor<float> last2 = chunks.append(std::span(tokens).subspan(40));
  std::vector<double> a(last.begin(), last.end()), b(last2.begin(), last2.end());
  check_close("logits, chunked prefill", b, a, 1e-5);
}

TEST_CASE("Mixtral: token ids, capacity and generate() errors leave the sequence unchanged",
          "[models][errors]") {
  const std::vector<std::int64_t> tokens = golden_ints("token_ids");
  MixtralModel<float> model = MixtralModel<float>::load(checkpoint_dir("f32"), {.max_seq_len = 14});
  CHECK(model.max_seq_len() == 14);
  std::vector<std::int64_t> bad(tokens.begin(), tokens.begin() + P);
  bad[3] = V;
  CHECK_THROWS_AS(model.prefill(bad), config_error);
  CHECK_THROWS_WITH(model.prefill(bad), Contains("MixtralModel::prefill") &&
                                            Contains("tokens[3]") && Contains("= 32") &&
                                            Contains("vocab_size=32"));
  CHECK_THROWS_WITH(model.prefill(std::vector<std::int64_t>{}), Contains("at least one token"));
  CHECK(model.length() == 0);

  model.prefill(std::span(tokens).first(P));
  CHECK_THROWS_WITH(model.decode_step(-1), Contains("MixtralModel::decode_step") &&
                                               Contains("tokens[0]") && Contains("vocab_size"));
  model.decode_step(tokens[P]);
  model.decode_step(tokens[P + 1]);
  CHECK(model.length() == 14);
  // Full: the next step would pass the cache.
  CHECK_THROWS_AS(model.decode_step(tokens[P + 2]), config_error);
  CHECK_THROWS_WITH(model.decode_step(tokens[P + 2]),
                    Contains("MixtralModel::decode_step") && Contains("max_seq_len = 14"));
  CHECK(model.length() == 14);
  CHECK(model.cache(0).length(0) == 14);
  CHECK_THROWS_AS(model.append(std::span(tokens).first(1)), config_error);

  CHECK_THROWS_AS(model.prefill(std::vector<std::int64_t>(15, 1)), config_error);
  CHECK(model.length() == 14);  // nothing reset: the check came first
  CHECK_THROWS_WITH(model.generate(std::span(tokens).first(P), 4),
                    Contains("MixtralModel::generate") && Contains("'steps'"));
  CHECK_THROWS_AS(model.generate(std::span(tokens).first(P), -1), config_error);
  CHECK(model.generate(std::span(tokens).first(P), 3).size() == 3);  // 12 + 3 - 1 = 14 fits
  CHECK_THROWS_AS(model.layer(1), config_error);
  CHECK_THROWS_AS(MixtralModel<float>::load(checkpoint_dir("f32"), {.max_seq_len = -1}),
                  config_error);
}

TEST_CASE("Mixtral load errors: config.json, tensor shapes and dtypes are named",
          "[models][errors]") {
  SECTION("a config.json field missing or invalid") {
    TempDir dir("models");
    nlohmann::json c = tiny_config();
    c.erase("num_key_value_heads");
    write_checkpoint(dir.path, c);
    CHECK_THROWS_AS(MixtralModel<float>::load(dir.path), config_error);
    CHECK_THROWS_WITH(MixtralModel<float>::load(dir.path),
                      Contains("'num_key_value_heads'") && Contains("config.json"));
    c = tiny_config();
    c["num_experts_per_tok"] = 8;
    write_checkpoint(dir.path, c);
    CHECK_THROWS_WITH(MixtralModel<float>::load(dir.path),
                      Contains("'num_experts_per_tok' = 8") && Contains("num_local_experts = 4"));
  }
  SECTION("config.json disagreeing with the tensors") {
    TempDir dir("models");
    nlohmann::json c = tiny_config();
    c["intermediate_size"] = 96;  // the experts are 128 wide
    write_checkpoint(dir.path, c);
    CHECK_THROWS_AS(MixtralModel<float>::load(dir.path), shape_error);
    c = tiny_config();
    c["vocab_size"] = 40;
    write_checkpoint(dir.path, c);
    CHECK_THROWS_WITH(
        MixtralModel<float>::load(dir.path),
        Contains("'model.embed_tokens.weight'") && Contains("[32, 64]") && Contains("[40, 64]"));
  }
  SECTION("a tensor of the wrong shape") {
    TempDir dir("models");
    write_checkpoint(dir.path, tiny_config(), "model.layers.0.self_attn.q_proj.weight", {60, 64});
    CHECK_THROWS_AS(MixtralModel<float>::load(dir.path), shape_error);
    CHECK_THROWS_WITH(MixtralModel<float>::load(dir.path),
                      Contains("'model.layers.0.self_attn.q_proj.weight'") &&
                          Contains("[60, 64]") && Contains("[64, 64]"));
    write_checkpoint(dir.path, tiny_config(), "model.norm.weight", {63});
    CHECK_THROWS_WITH(MixtralModel<float>::load(dir.path),
                      Contains("'model.norm.weight'") && Contains("[63]") && Contains("[64]"));
    write_checkpoint(dir.path, tiny_config(), "model.layers.0.block_sparse_moe.gate.weight",
                     {5, 64});
    CHECK_THROWS_WITH(MixtralModel<float>::load(dir.path),
                      Contains("'model.layers.0.block_sparse_moe.gate.weight'") &&
                          Contains("[5, 64]") && Contains("[4, 64]"));
  }
  SECTION("an expert tensor of the wrong shape (moe::load_hf_moe_block)") {
    TempDir dir("models");
    write_checkpoint(dir.path, tiny_config(), "model.layers.0.block_sparse_moe.experts.2.w1.weight",
                     {127, 64});
    CHECK_THROWS_AS(MixtralModel<float>::load(dir.path), shape_error);
    CHECK_THROWS_WITH(MixtralModel<float>::load(dir.path),
                      Contains("experts.2.w1.weight") && Contains("127"));
  }
  SECTION("a missing tensor") {
    TempDir dir("models");
    nlohmann::json c = tiny_config();
    write_checkpoint(dir.path, c);
    c["num_hidden_layers"] = 2;  // layer 1 is not stored
    std::ofstream(dir.path / "config.json") << c.dump(2);
    CHECK_THROWS_AS(MixtralModel<float>::load(dir.path), switchyard::error);
    CHECK_THROWS_WITH(MixtralModel<float>::load(dir.path),
                      Contains("model.layers.1.input_layernorm.weight"));
  }
  SECTION("weights stored as another dtype than W") {
    CHECK_THROWS_AS(MixtralModel<float>::load(checkpoint_dir("bf16")), shape_error);
    CHECK_THROWS_WITH(
        MixtralModel<float>::load(checkpoint_dir("bf16")),
        Contains("'model.embed_tokens.weight'") && Contains("BF16") && Contains("F32"));
    CHECK_THROWS_AS(MixtralModel<bf16>::load(checkpoint_dir("f32")), shape_error);
  }
}

TEST_CASE("Mixtral load: hostile config.json sizes fail on a field or a tensor, not an allocation",
          "[models][errors]") {
  TempDir dir("models");
  const auto load_with = [&](const nlohmann::json& c) {
    std::ofstream(dir.path / "config.json") << c.dump(2);
    return MixtralModel<float>::load(dir.path);
  };
  write_checkpoint(dir.path, tiny_config());
  SECTION("num_hidden_layers far beyond the checkpoint: the first missing layer is named") {
    nlohmann::json c = tiny_config();
    c["num_hidden_layers"] = std::int64_t(1) << 40;  // reserving that many layers: 2^40 objects
    CHECK_THROWS_AS(load_with(c), switchyard::error);
    CHECK_THROWS_WITH(load_with(c), Contains("'model.layers.1.input_layernorm.weight'"));
  }
  SECTION("num_attention_heads * head_dim overflowing, or past core::max_buffer_bytes") {
    nlohmann::json c = tiny_config();
    c["num_attention_heads"] = std::int64_t(1) << 32;
    c["num_key_value_heads"] = 1;
    c["head_dim"] = std::int64_t(1) << 32;  // H * D = 2^64
    CHECK_THROWS_AS(load_with(c), config_error);
    CHECK_THROWS_WITH(load_with(c), Contains("'head_dim' = 4294967296") && Contains("q_proj"));
    c["num_attention_heads"] = 4;
    c["num_key_value_heads"] = 2;
    c["head_dim"] = std::int64_t(1) << 36;  // [4 * 2^36, 64] floats = 2^46 bytes
    CHECK_THROWS_WITH(load_with(c), Contains("'head_dim'") && Contains("max_buffer_bytes"));
  }
  SECTION("tensors are checked before the RoPE table and the caches are allocated") {
    // head_dim 2^28 with one head passes the config's rules, but its RoPE table for 512
    // positions would take 2^39 bytes: q_proj's shape must fail first.
    nlohmann::json c = tiny_config();
    c["num_attention_heads"] = 1;
    c["num_key_value_heads"] = 1;
    c["head_dim"] = std::int64_t(1) << 28;
    c["max_position_embeddings"] = 512;
    CHECK_THROWS_AS(load_with(c), shape_error);
    CHECK_THROWS_WITH(load_with(c), Contains("'model.layers.0.self_attn.q_proj.weight'") &&
                                        Contains("[268435456, 64]"));
  }
  SECTION("rope_theta outside [1, FLT_MAX] (the float table would hold inf or NaN)") {
    for (const double theta : {1e-300, 0.5, 1e39, 1e300}) {
      nlohmann::json c = tiny_config();
      c["rope_theta"] = theta;
      INFO("rope_theta = " << theta);
      CHECK_THROWS_AS(load_with(c), config_error);
      CHECK_THROWS_WITH(load_with(c), Contains("'rope_theta'") && Contains("[1, FLT_MAX]"));
      CHECK_THROWS_WITH(RotaryEmbedding({.head_dim = 16, .theta = theta, .max_positions = 4}),
                        Contains("'theta'") && Contains("[1, FLT_MAX]"));
    }
    // The bounds themselves are accepted, and their tables are finite.
    for (const double theta : {1.0, double(std::numeric_limits<float>::max())}) {
      const RotaryEmbedding rope({.head_dim = 16, .theta = theta, .max_positions = 64});
      for (std::int64_t p = 0; p < 64; ++p)
        for (std::int64_t i = 0; i < 8; ++i) {
          CHECK(std::isfinite(rope.cos()(p, i)));
          CHECK(std::isfinite(rope.sin()(p, i)));
        }
    }
  }
}

TEST_CASE("Mixtral with a sliding window attends to the last W positions only",
          "[models][sliding_window]") {
  // The tiny checkpoint with sliding_window = 5: each row's attention output equals naive
  // double attention of its q (after RoPE) over the cached keys p - 5 < j <= p, prefill in one
  // call (the windowed forward path) and token by token (windowed decode) alike; rows before
  // the window fills equal the model without a window.
  constexpr std::int64_t W = 5;
  TempDir dir("models_window");
  nlohmann::json c = tiny_config();
  c["sliding_window"] = W;
  write_checkpoint(dir.path, c);
  const std::vector<std::int64_t> tokens = golden_ints("token_ids");
  const auto run = [&](const std::filesystem::path& path, bool one_call) {
    MixtralModel<float> m = MixtralModel<float>::load(path);
    std::vector<MixtralTrace> traces;
    if (one_call) {
      traces.emplace_back();
      m.prefill(tokens, &traces.back());
    } else {
      traces = token_by_token(m, std::span<const std::int64_t>(tokens));
    }
    // rows of q after RoPE and of the attention output, [N, H, D] each, and the cache
    std::vector<double> q, out;
    for (const auto& tr : traces) {
      append(q, tr.layers[0].q_rope);
      append(out, tr.layers[0].attn_core_out);
    }
    return std::tuple(q, out, cache_rows(m.cache(0).keys(), N), cache_rows(m.cache(0).values(), N));
  };
  for (const bool one_call : {true, false}) {
    CAPTURE(one_call);
    const auto [q, out, keys, values] = run(dir.path, one_call);
    // keys / values: [H_kv, N, D] (cache_rows order)
    std::vector<double> want(out.size(), 0.0);
    for (std::int64_t p = 0; p < N; ++p)
      for (std::int64_t h = 0; h < H; ++h) {
        const std::int64_t g = h / (H / Hkv), j0 = std::max<std::int64_t>(0, p - W + 1);
        std::vector<double> score;
        double m = -1e300;
        for (std::int64_t j = j0; j <= p; ++j) {
          double sdot = 0;
          for (std::int64_t i = 0; i < D; ++i)
            sdot += q[std::size_t((p * H + h) * D + i)] * keys[std::size_t((g * N + j) * D + i)];
          score.push_back(sdot / std::sqrt(double(D)));
          m = std::max(m, score.back());
        }
        double z = 0;
        for (double& v : score) z += (v = std::exp(v - m));
        for (std::int64_t j = j0; j <= p; ++j)
          for (std::int64_t i = 0; i < D; ++i)
            want[std::size_t((p * H + h) * D + i)] +=
                score[std::size_t(j - j0)] / z * values[std::size_t((g * N + j) * D + i)];
      }
    check_close("windowed attention", out, want, 1e-5);
  }
  // Before the window fills (rows p < W) the windowed model computes what the plain one does.
  const auto [q0, out0, k0, v0] = run(checkpoint_dir("f32"), true);
  const auto [q1, out1, k1, v1] = run(dir.path, true);
  const std::size_t rows = std::size_t(W * H * D);
  check_close("rows before the window fills",
              std::vector<double>(out1.begin(), out1.begin() + rows),
              std::vector<double>(out0.begin(), out0.begin() + rows), 1e-6);
  // and after it, the window changes the output (the test above is not vacuous)
  double diff = 0;
  for (std::size_t i = rows; i < out0.size(); ++i)
    diff = std::max(diff, std::abs(out1[i] - out0[i]));
  CHECK(diff > 1e-3);
}
