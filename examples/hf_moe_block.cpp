// hf_moe_block: MoE blocks straight from Hugging Face checkpoints.
//
// Without arguments: writes a Mixtral-style and a Qwen2-MoE-style block (16 SwiGLU experts
// of width 256 over d = 128; Qwen2-MoE with its sigmoid-gated shared expert) as two-shard HF
// checkpoints with an index and config.json, once with float weights and once with the same
// weights rounded to bf16, in a temporary directory. Opens both through io::Checkpoint (the
// shards are mapped, not read), loads each block with moe::load_hf_moe_block (one view per
// expert into the mapped file: nothing is copied or stacked), runs 64 tokens through router
// and experts with the bf16 weights and with the float weights, and prints the routing
// statistics and how far the two outputs are apart. The check: the bf16 block's output
// equals a naive double computation from the bf16 values; exits 1 otherwise.
//
// With a checkpoint directory: hf_moe_block <dir> [layer] runs that checkpoint's MoE block
// of `layer` (default 1) on 8 random tokens, e.g. for a downloaded Qwen1.5-MoE-A2.7B:
//   build/default/examples/hf_moe_block ~/models/Qwen1.5-MoE-A2.7B 3
// The family comes from config.json's model_type (mixtral, olmoe, qwen2_moe, qwen3_moe,
// deepseek_v2, deepseek_v3); the weights stay bf16, mapped. The check then compares token 0
// with a naive double computation of its experts read from the same mapped weights.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <string>
#include <switchyard/core/half.hpp>
#include <switchyard/core/rng.hpp>
#include <switchyard/io/checkpoint.hpp>
#include <switchyard/io/checkpoint_writer.hpp>
#include <switchyard/moe/hf_checkpoint.hpp>
#include <vector>

using namespace switchyard;
namespace fs = std::filesystem;

namespace {

constexpr std::int64_t d = 128, F = 256, Fs = 384, E = 16, k = 2, tokens = 64;

// Reads an element of a weight view as double, whatever its stored type.
template <class W>
double at(const ConstView<W, 2>& w, std::int64_t i, std::int64_t j) {
  return double(to_float(w(i, j)));
}

// expert(x) = w2 (silu(w1 x) * (w3 x)) in double, from the views the layer reads.
template <class W>
std::vector<double> ref_expert(const moe::ExpertWeights<W>& ew, std::int64_t e,
                               const std::vector<double>& x) {
  const auto w1 = ew.w1_of(e), w3 = ew.w3_of(e), w2 = ew.w2_of(e);
  const std::int64_t f = w1.extent(0), n = w1.extent(1);
  std::vector<double> h(static_cast<std::size_t>(f)),
      y(static_cast<std::size_t>(w2.extent(0)), 0.0);
  for (std::int64_t j = 0; j < f; ++j) {
    double g = 0, u = 0;
    for (std::int64_t p = 0; p < n; ++p) {
      g += at(w1, j, p) * x[std::size_t(p)];
      u += at(w3, j, p) * x[std::size_t(p)];
    }
    h[std::size_t(j)] = g / (1 + std::exp(-g)) * u;
  }
  for (std::int64_t i = 0; i < w2.extent(0); ++i)
    for (std::int64_t j = 0; j < f; ++j) y[std::size_t(i)] += at(w2, i, j) * h[std::size_t(j)];
  return y;
}

// Token t's block output in double, given the plan's choices and weights (the router is
// checked by its own tests; this checks the experts, shared expert and gate on the weights).
template <class W>
std::vector<double> ref_token(const moe::HFMoEBlock<W>& b, const moe::DispatchPlan<float>& plan,
                              const core::Tensor<float>& x, std::int64_t t) {
  const std::int64_t n = x.extent(1);
  std::vector<double> xt(static_cast<std::size_t>(n)), y(static_cast<std::size_t>(n), 0.0);
  for (std::int64_t p = 0; p < n; ++p) xt[std::size_t(p)] = x(t, p);
  const std::int64_t kk = plan.top_k;
  for (std::int64_t s = 0; s < kk; ++s) {
    const auto o = ref_expert(b.weights.experts, plan.choice_expert[std::size_t(t * kk + s)], xt);
    for (std::int64_t i = 0; i < n; ++i)
      y[std::size_t(i)] += double(plan.choice_weight[std::size_t(t * kk + s)]) * o[std::size_t(i)];
  }
  if (b.layer_config.num_shared_experts > 0) {
    double g = 1;
    if (!b.weights.shared_gate.empty()) {
      double z = 0;
      for (std::int64_t p = 0; p < n; ++p)
        z += at(b.weights.shared_gate, 0, p) * xt[std::size_t(p)];
      g = 1 / (1 + std::exp(-z));
    }
    const auto o = ref_expert(b.weights.shared, 0, xt);
    for (std::int64_t i = 0; i < n; ++i) y[std::size_t(i)] += g * o[std::size_t(i)];
  }
  return y;
}

// Tokens per expert, as "e:n" for the experts that got any.
void print_load(const moe::DispatchPlan<float>& plan) {
  std::printf("    tokens per expert:");
  for (std::size_t e = 0; e < plan.stats.tokens_per_expert.size(); ++e)
    if (plan.stats.tokens_per_expert[e] > 0)
      std::printf(" %zu:%lld", e, static_cast<long long>(plan.stats.tokens_per_expert[e]));
  std::printf("\n    aux loss %.4f, z-loss %.4f\n", plan.stats.aux_loss, plan.stats.z_loss);
}

// Writes the block of `family` with the given weights, as float or bf16, in two shards.
void write_block(moe::HFFamily family, const fs::path& dir, bool as_bf16,
                 const std::vector<std::pair<std::string, core::Tensor<float>>>& tensors) {
  std::vector<io::SafeTensorsWriter> shards(2);
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    auto& w = shards[i < tensors.size() / 2 ? 0 : 1];
    if (as_bf16)
      w.add_bf16(tensors[i].first, tensors[i].second);
    else
      w.add(tensors[i].first, tensors[i].second);
  }
  io::save_sharded_checkpoint(dir, shards,
                              {{"model_type", std::string(moe::hf_family_name(family))},
                               {"num_experts_per_tok", k},
                               {"norm_topk_prob", family == moe::HFFamily::mixtral}});
}

// Where a family keeps the MoE block of a layer.
std::string block_prefix(moe::HFFamily family, int layer) {
  return "model.layers." + std::to_string(layer) +
         (family == moe::HFFamily::mixtral ? ".block_sparse_moe" : ".mlp");
}

// The HF names and random values of the block of layer 1.
std::vector<std::pair<std::string, core::Tensor<float>>> random_block(moe::HFFamily family,
                                                                      std::uint64_t seed) {
  const bool mixtral = family == moe::HFFamily::mixtral;
  const std::string p = block_prefix(family, 1);
  const std::string g = mixtral ? "w1" : "gate_proj", u = mixtral ? "w3" : "up_proj",
                    dn = mixtral ? "w2" : "down_proj";
  std::vector<std::pair<std::string, core::Tensor<float>>> out;
  const auto add = [&](std::string name, std::int64_t rows, std::int64_t cols) {
    core::Tensor<float> t({rows, cols});
    core::fill_normal(t, {.mean = 0.0, .stddev = 1.0 / std::sqrt(double(cols))}, seed++);
    out.emplace_back(p + name, std::move(t));
  };
  add(".gate.weight", E, d);
  for (std::int64_t e = 0; e < E; ++e) {
    const std::string ep = ".experts." + std::to_string(e) + ".";
    add(ep + g + ".weight", F, d);
    add(ep + u + ".weight", F, d);
    add(ep + dn + ".weight", d, F);
  }
  if (family == moe::HFFamily::qwen2_moe) {
    add(".shared_expert.gate_proj.weight", Fs, d);
    add(".shared_expert.up_proj.weight", Fs, d);
    add(".shared_expert.down_proj.weight", d, Fs);
    add(".shared_expert_gate.weight", 1, d);
  }
  return out;
}

// Runs one block of a checkpoint on x; returns the output and fills plan.
template <class W>
core::Tensor<float> run(const moe::HFMoEBlock<W>& b, const core::Tensor<float>& x,
                        moe::DispatchPlan<float>& plan, double& ms) {
  core::Tensor<float> y({x.extent(0), x.extent(1)});
  const auto t0 = std::chrono::steady_clock::now();
  b.forward(x, y.view<2>(), &plan);
  ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  return y;
}

double max_abs(const core::Tensor<float>& a) {
  double m = 0;
  for (float v : a) m = std::max(m, double(std::abs(v)));
  return m;
}

// A user's checkpoint: its MoE block of `layer`, bf16 / f16 / float as stored.
template <class W>
int run_user_checkpoint(const io::Checkpoint& ckpt, moe::HFFamily family, const std::string& p) {
  const auto b = moe::load_hf_moe_block<W>(ckpt, p, family);
  const std::int64_t n = b.layer_config.d_model;
  std::printf("%s: %lld experts of width %lld over d = %lld, top-%lld, %lld shared\n", p.c_str(),
              static_cast<long long>(b.layer_config.num_experts),
              static_cast<long long>(b.layer_config.d_ff), static_cast<long long>(n),
              static_cast<long long>(b.routing.top_k),
              static_cast<long long>(b.layer_config.num_shared_experts));
  core::Tensor<float> x({8, n});
  core::fill_normal(x, {.mean = 0.0, .stddev = 1.0}, 7);
  moe::DispatchPlan<float> plan;
  double ms = 0;
  const auto y = run(b, x, plan, ms);
  std::printf("  8 tokens in %.1f ms\n", ms);
  print_load(plan);
  const auto want = ref_token(b, plan, x, 0);
  double err = 0, scale = 1;
  for (std::int64_t i = 0; i < n; ++i) {
    err = std::max(err, std::abs(double(y(0, i)) - want[std::size_t(i)]));
    scale = std::max(scale, std::abs(want[std::size_t(i)]));
  }
  const double tolerance = 1e-4;
  const bool ok = err <= tolerance * scale;
  std::printf(
      "token 0 vs a naive double computation: max |diff| %.2e (tolerance %.0e x %.3g): %s\n", err,
      tolerance, scale, ok ? "OK" : "FAILED");
  return ok ? 0 : 1;
}

int user_checkpoint(const fs::path& dir, int layer) {
  const auto ckpt = io::Checkpoint::open(dir);
  const auto config = ckpt.config();
  const std::string type = config.value("model_type", std::string());
  const auto family = moe::parse_hf_family(type);
  if (!family) {
    std::fprintf(stderr, "model_type '%s' is not an MoE family this loader knows\n", type.c_str());
    return 1;
  }
  const std::string p = block_prefix(*family, layer);
  switch (ckpt.info(p + ".gate.weight").dtype) {
    case io::DType::BF16:
      return run_user_checkpoint<bf16>(ckpt, *family, p);
    case io::DType::F16:
      return run_user_checkpoint<f16>(ckpt, *family, p);
    default:
      return run_user_checkpoint<float>(ckpt, *family, p);
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1) return user_checkpoint(argv[1], argc > 2 ? std::atoi(argv[2]) : 1);

  const fs::path root = fs::temp_directory_path() / "switchyard_hf_moe_block";
  fs::remove_all(root);
  core::Tensor<float> x({tokens, d});
  core::fill_normal(x, {.mean = 0.0, .stddev = 1.0}, 1);
  bool ok = true;
  std::uint64_t seed = 100;
  for (const auto family : {moe::HFFamily::mixtral, moe::HFFamily::qwen2_moe}) {
    const auto tensors = random_block(family, seed += 1000);
    const fs::path f32_dir = root / (std::string(moe::hf_family_name(family)) + "_f32");
    const fs::path bf16_dir = root / (std::string(moe::hf_family_name(family)) + "_bf16");
    write_block(family, f32_dir, false, tensors);
    write_block(family, bf16_dir, true, tensors);
    const auto ckpt32 = io::Checkpoint::open(f32_dir);
    const auto ckpt16 = io::Checkpoint::open(bf16_dir);
    const std::string p = block_prefix(family, 1);
    const auto b32 = moe::load_hf_moe_block<float>(ckpt32, p, family);
    const auto b16 = moe::load_hf_moe_block<bf16>(ckpt16, p, family);

    std::printf("%s block (%s, %zu tensors in 2 shards): %lld experts, top-%lld%s\n",
                std::string(moe::hf_family_name(family)).c_str(), p.c_str(), ckpt16.size(),
                static_cast<long long>(E), static_cast<long long>(k),
                family == moe::HFFamily::qwen2_moe ? ", gated shared expert" : "");
    moe::DispatchPlan<float> plan32, plan16;
    double ms32 = 0, ms16 = 0;
    const auto y32 = run(b32, x, plan32, ms32);
    const auto y16 = run(b16, x, plan16, ms16);
    // Compare outputs on the tokens both weight sets route alike; count the others.
    std::int64_t moved = 0;
    double diff = 0;
    for (std::int64_t t = 0; t < tokens; ++t) {
      bool alike = true;
      for (std::int64_t s = 0; s < k; ++s)
        alike = alike && plan16.choice_expert[std::size_t(t * k + s)] ==
                             plan32.choice_expert[std::size_t(t * k + s)];
      if (!alike) {
        ++moved;
        continue;
      }
      for (std::int64_t i = 0; i < d; ++i)
        diff = std::max(diff, double(std::abs(y16(t, i) - y32(t, i))));
    }
    std::printf("  bf16 weights (%.2f ms):\n", ms16);
    print_load(plan16);
    std::printf(
        "  float weights (%.2f ms): %lld of %lld tokens routed differently (bf16 rounding "
        "moved a near tie); on the others the outputs differ by at most %.3g (max |y| "
        "%.3g)\n",
        ms32, static_cast<long long>(moved), static_cast<long long>(tokens), diff, max_abs(y32));
    // The check: every token of the bf16 block against a naive double computation.
    double err = 0, scale = 1;
    for (std::int64_t t = 0; t < tokens; ++t) {
      const auto want = ref_token(b16, plan16, x, t);
      for (std::int64_t i = 0; i < d; ++i) {
        err = std::max(err, std::abs(double(y16(t, i)) - want[std::size_t(i)]));
        scale = std::max(scale, std::abs(want[std::size_t(i)]));
      }
    }
    const double tolerance = 1e-5;
    const bool block_ok = err <= tolerance * scale;
    ok = ok && block_ok;
    std::printf("  bf16 block vs naive double: max |diff| %.2e (tolerance %.0e x %.3g): %s\n\n",
                err, tolerance, scale, block_ok ? "OK" : "FAILED");
  }
  fs::remove_all(root);
  std::printf("hf_moe_block: %s\n", ok ? "OK" : "FAILED");
  return ok ? 0 : 1;
}
