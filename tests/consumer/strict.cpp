// A user's program built with -Wall -Wextra -Werror (tests/consumer/CMakeLists.txt, one build
// per compiler and -march): it includes the umbrella header and instantiates most layers in
// float (a few also in double), so a warning anywhere in their templates fails the build. Small
// shapes: it runs in milliseconds; the checks are sanity checks, the unit tests do the rest.
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <string>
#include <switchyard/switchyard.hpp>
#include <vector>

using namespace switchyard;

namespace {

int failures = 0;

void check(bool ok, const char* what) {
  if (!ok) {
    std::printf("FAILED: %s\n", what);
    ++failures;
  }
}

template <class T>
Tensor<T> random(std::initializer_list<std::int64_t> shape, std::uint64_t seed, T scale = T(1)) {
  Tensor<T> t(shape);
  core::fill_normal(t, seed);
  for (auto& v : t) v *= scale;
  return t;
}

template <class T>
bool finite(const Tensor<T>& t) {
  for (const T v : t)
    if (!std::isfinite(v)) return false;
  return true;
}

// Dense attention (forward with each mask kind, decode on a KV cache) against the reference.
template <class T>
void dense_attention() {
  const std::int64_t B = 1, S = 33, H = 4, H_kv = 2, D = 16;
  const auto q = random<T>({B, S, H, D}, 1), k = random<T>({B, S, H_kv, D}, 2),
             v = random<T>({B, S, H_kv, D}, 3);
  const attention::DenseAttention<T> attn;
  const Tensor<T> out = attn.forward(q, k, v, attention::CausalMask{});
  Tensor<T> want({B, S, H, D});
  attention::ref::dense_attention<T>(q, k, v, want.template view<4>(), attention::CausalMask{});
  double err = 0;
  for (std::int64_t i = 0; i < out.numel(); ++i)
    err = std::max(err, double(std::abs(out[i] - want[i])));
  check(err < 1e-4, "DenseAttention::forward matches the reference");
  const std::vector<std::int64_t> lengths{20};
  const Tensor<T> padded = attn.forward(q, k, v, attention::KeyLengths{lengths});
  check(finite(padded), "DenseAttention::forward with KeyLengths");

  attention::KVCache<T> cache(B, H_kv, D, /*capacity=*/S);
  cache.append(k.template view<4>(), v.template view<4>());
  Tensor<T> step({B, 1, H, D});
  attn.decode(ConstView<T, 4>(q.data(), {B, 1, H, D}), cache, step.template view<4>());
  check(finite(step), "DenseAttention::decode");
}

// The GEMM, serial and tiled in parallel (same bits by contract).
template <class T>
void gemm() {
  const std::int64_t M = 37, N = 29, K = 41;
  const auto a = random<T>({M, K}, 4), b = random<T>({N, K}, 5);
  Tensor<T> c({M, N}), c2({M, N});
  core::gemm<T>(a, core::Trans::no, b, core::Trans::yes, c.template view<2>());
  core::gemm_parallel<T>(a, core::Trans::no, b, core::Trans::yes, c2.template view<2>());
  double want = 0;
  for (std::int64_t p = 0; p < K; ++p) want += double(a(3, p)) * double(b(5, p));
  check(std::abs(c(3, 5) - want) < 1e-3, "gemm");
  bool same = true;
  for (std::int64_t i = 0; i < c.numel(); ++i) same = same && c[i] == c2[i];
  check(same, "gemm_parallel == gemm bit for bit");
}

// MoE: routers to plans, the layer executes them (SwiGLU and GELU experts), plan to JSON.
template <class T>
void moe_layer() {
  const std::int64_t Tk = 40, d = 16, F = 32, E = 4, k = 2;
  const auto x = random<T>({Tk, d}, 6), router_w = random<T>({E, d}, 7, T(0.3)),
             w1 = random<T>({E, F, d}, 8, T(0.2)), w3 = random<T>({E, F, d}, 9, T(0.2)),
             w2 = random<T>({E, d, F}, 10, T(0.2));
  const auto logits = moe::router_logits<T>(x, router_w);
  const moe::MoELayer<T> layer({.d_model = d, .d_ff = F, .num_experts = E});
  // Every field, in ExpertWeights' declaration order (w1 gate, w3 up, w2 down, b1, b3, b2):
  // designators must follow it, and g++ -Wextra flags omitted fields that have no default
  // member initialiser (-Wmissing-field-initializers).
  const moe::MoELayerWeights<T> w{
      .experts = {.w1 = w1, .w3 = w3, .w2 = w2, .b1 = {}, .b3 = {}, .b2 = {}}, .shared = {}};
  const auto run = [&](const char* what, const moe::DispatchPlan<T>& plan) {
    plan.check();
    check(finite(layer.execute(plan, x, w)), what);
  };
  run("TopKRouter", moe::TopKRouter<T>({.num_experts = E, .top_k = k}).route(logits));
  run("CapacityRouter",
      moe::CapacityRouter<T>({.num_experts = E, .top_k = 1, .capacity_factor = 1.0}).route(logits));
  run("GShardTop2Router", moe::GShardTop2Router<T>({.num_experts = E}).route(logits));
  run("ExpertChoiceRouter",
      moe::ExpertChoiceRouter<T>({.num_experts = E, .capacity_factor = 2.0}).route(logits));
  run("ReluRouter", moe::ReluRouter<T>({.num_experts = E, .topk_for_target = k}).route(logits));
  run("NoisyTopKRouter", moe::NoisyTopKRouter<T>({.num_experts = E, .top_k = k}).route(logits));
  run("TopPRouter", moe::TopPRouter<T>({.num_experts = E, .threshold = 0.5}).route(logits));

  // GELU experts on the prefill path (T = 40 <= decode_max_tokens runs the decode path above).
  const moe::MoELayer<T> gelu({.d_model = d,
                               .d_ff = F,
                               .num_experts = E,
                               .activation = moe::Activation::gelu,
                               .decode_max_tokens = 0});
  moe::MoELayerWeights<T> gw;
  gw.experts.w1 = w1;
  gw.experts.w2 = w2;
  const auto plan = moe::TopKRouter<T>({.num_experts = E, .top_k = k}).route(logits);
  check(finite(gelu.execute(plan, x, gw)), "MoELayer gelu");
  check(!moe::to_json_string(plan, -1).empty(), "plan to JSON");
}

// Soft MoE over the same kind of experts.
void soft_moe() {
  const std::int64_t B = 2, m = 12, d = 16, F = 32, E = 4;
  const auto x = random<float>({B, m, d}, 11), phi = random<float>({d, E}, 12, 0.3f),
             w1 = random<float>({E, F, d}, 13, 0.2f), w3 = random<float>({E, F, d}, 14, 0.2f),
             w2 = random<float>({E, d, F}, 15, 0.2f);
  const moe::SoftMoELayer<float> layer({.d_model = d, .d_ff = F, .num_experts = E});
  moe::SoftMoEWeights<float> w;
  w.phi = phi;
  w.experts.w1 = w1;
  w.experts.w3 = w3;
  w.experts.w2 = w2;
  check(finite(layer.forward(x, w)), "SoftMoELayer");
}

// Routing Transformer k-means attention, linear attention, mixture-of-heads, bi-level routing.
void sparse_attention() {
  const std::int64_t B = 1, Tk = 64, H = 2, D = 16;
  const auto q = random<float>({B, Tk, H, D}, 16), k = random<float>({B, Tk, H, D}, 17),
             v = random<float>({B, Tk, H, D}, 18);
  const attention::RoutingAttention<float> routing(
      {.num_clusters = 8, .window_size = 8, .causal = true});
  auto state = routing.init_state(q, {}, /*seed=*/7);
  Tensor<float> out({B, Tk, H, D});
  routing.forward(q, v, state, out);
  check(finite(out), "RoutingAttention");
  routing.update_centroids(state, q);

  const attention::LinearAttention<float> linear({.chunk_size = 16});
  linear.forward_causal(q, k, v, out);
  check(finite(out), "LinearAttention");

  const std::int64_t C = 32, heads = 4, shared = 2;
  const auto x = random<float>({B, Tk, C}, 19), qkv = random<float>({3 * C, C}, 20, 0.2f),
             qkv_b = random<float>({3 * C}, 21), proj = random<float>({C, C}, 22, 0.2f),
             proj_b = random<float>({C}, 23), wg = random<float>({heads - shared, C}, 24),
             wg0 = random<float>({2, C}, 25), wg1 = random<float>({shared, C}, 26);
  const attention::MixtureOfHeadsWeights<float> mw{qkv, qkv_b, proj, proj_b, wg, wg0, wg1};
  const attention::MixtureOfHeads<float> moh(
      {.dim = C, .num_heads = heads, .shared_heads = shared, .routed_top_k = 1});
  Tensor<float> y({B, Tk, C});
  moh.execute(moh.route(x, mw), x, mw, y.view<3>());
  check(finite(y), "MixtureOfHeads");

  const std::int64_t side = 8;
  const auto img = random<float>({B, side, side, C}, 27), wo = random<float>({C, C}, 28, 0.2f),
             wo_b = random<float>({C}, 29), lepe = random<float>({C, 1, 3, 3}, 30),
             lepe_b = random<float>({C}, 31);
  const attention::BiLevelRoutingWeights<float> bw{qkv, qkv_b, wo, wo_b, lepe.view<4>(), lepe_b};
  const attention::BiLevelRoutingAttention<float> bra(
      {.dim = C, .num_heads = heads, .n_win = 4, .topk = 2, .side_dwconv = 3});
  Tensor<float> by({B, side, side, C});
  bra.execute(bra.route(img, bw), img, bw, by.view<4>());
  check(finite(by), "BiLevelRoutingAttention");
}

// ToMe merging, proportional attention, unmerge.
void token_merging() {
  const std::int64_t B = 1, N = 33, C = 16;
  const auto x = random<float>({B, N, C}, 32);
  Tensor<float> sizes({B, N});
  sizes.fill(1.0f);
  const auto plan =
      tokens::bipartite_soft_matching<float>(x, 8, /*class_token=*/true,
                                             /*distill_token=*/false, sizes.view<2>());
  const Tensor<float> merged = plan.merge_wavg(x);
  check(merged.extent(1) == N - 8, "ToMe merges r tokens");
  check(plan.unmerge(merged).extent(1) == N, "ToMe unmerge");
  const auto energy = tokens::energy_matching<float>(x, {.r = 8, .class_token = true});
  check(energy.merge_wavg(x).extent(1) == N - 8, "PiToMe merges r tokens");
}

// Safetensors: write, read back from memory, compare.
void safetensors() {
  const auto t = random<float>({3, 5}, 33);
  io::SafeTensorsWriter writer;
  writer.add("t", t);
  writer.set_metadata("format", "pt");
  const auto file = io::SafeTensors::from_bytes(writer.to_bytes());
  const Tensor<float> back = file.tensor<float>("t");
  bool same = back.numel() == t.numel();
  for (std::int64_t i = 0; same && i < t.numel(); ++i) same = back[i] == t[i];
  check(same, "safetensors round trip");
}

// Checkpoints: a two-shard Hugging Face block in bf16, memory-mapped, loaded without copies and
// run; bf16 projections through core::linear.
void checkpoints() {
  const std::int64_t E = 4, d = 16, F = 24;
  std::vector<io::SafeTensorsWriter> shards(2);
  const std::string p = "model.layers.0.block_sparse_moe";
  shards[0].add_bf16(p + ".gate.weight", random<float>({E, d}, 40));
  for (std::int64_t e = 0; e < E; ++e) {
    const std::string ep = p + ".experts." + std::to_string(e) + ".";
    auto& w = shards[std::size_t(e % 2)];
    w.add_bf16(ep + "w1.weight", random<float>({F, d}, 41 + 3 * std::uint64_t(e), 0.25f));
    w.add_bf16(ep + "w3.weight", random<float>({F, d}, 42 + 3 * std::uint64_t(e), 0.25f));
    w.add_bf16(ep + "w2.weight", random<float>({d, F}, 43 + 3 * std::uint64_t(e), 0.2f));
  }
  const auto dir = std::filesystem::temp_directory_path() / "switchyard_strict_consumer_ckpt";
  io::save_sharded_checkpoint(dir, shards, {{"model_type", "mixtral"}, {"num_experts_per_tok", 2}});
  {
    const auto ckpt = io::Checkpoint::open(dir);
    const auto block = moe::load_hf_moe_block<bf16>(ckpt, p, moe::HFFamily::mixtral);
    const auto x = random<float>({5, d}, 60);
    Tensor<float> y({5, d});
    block.forward(x, y.view<2>());
    check(finite(y), "HF MoE block from a bf16 checkpoint");
    const Tensor<float> logits = core::linear(x.view<2>(), block.router_weight);
    check(logits.extent(1) == E && finite(logits), "core::linear with bf16 weights");
  }
  std::filesystem::remove_all(dir);
}

}  // namespace

// Every member of the checkpoint-loaded models compiled under -Werror.
template class switchyard::models::MixtralModel<switchyard::bf16>;
template class switchyard::models::MixtralDecoderLayer<switchyard::bf16>;

int main() {
  dense_attention<float>();
  dense_attention<double>();
  gemm<float>();
  gemm<double>();
  moe_layer<float>();
  moe_layer<double>();
  soft_moe();
  sparse_attention();
  token_merging();
  safetensors();
  checkpoints();
  std::printf("switchyard %d.%d.%d strict consumer (%s, %d threads): %s\n",
              SWITCHYARD_VERSION_MAJOR, SWITCHYARD_VERSION_MINOR, SWITCHYARD_VERSION_PATCH,
              simd::default_arch::name(), num_threads(), failures ? "FAILED" : "ok");
  return failures ? 1 : 0;
}
