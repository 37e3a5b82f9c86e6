// Autoregressive decoding with a KV cache: a small decoder block (grouped-query attention over a
// KVCache, then a Mixtral-style MoE FFN with a top-2 router; random weights, residual
// connections) prefills a 200-token prompt in two chunks of 100, then decodes 64 tokens one at a
// time. Prints tokens/s of the decode steps and checks the last step against one full causal
// forward over all 264 tokens (exit code 1 if they differ by more than float rounding).
//
// Prefill chunks go through DenseAttention::forward over the cache's positions
// (KVCache::keys_as_sequence, CausalMask{offset}); decode steps through DenseAttention::decode
// (split-KV); the MoE layer picks its decode path for small T by itself.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <switchyard/attention/dense.hpp>
#include <switchyard/attention/kv_cache.hpp>
#include <switchyard/core/gemm.hpp>
#include <switchyard/core/rng.hpp>
#include <switchyard/moe/layer.hpp>
#include <switchyard/moe/router.hpp>
#include <switchyard/moe/router_topk.hpp>

using namespace switchyard;
using core::Tensor;
using core::Trans;

namespace {

constexpr std::int64_t d = 512, H = 8, Hkv = 2, D = d / H, E = 8, k = 2, F = 1024;

Tensor<float> random(std::initializer_list<std::int64_t> shape, std::uint64_t seed, float scale) {
  Tensor<float> t(shape);
  core::fill_normal(t, seed);
  for (auto& v : t) v *= scale;
  return t;
}

struct DecoderBlock {
  const float s = 1.0f / std::sqrt(float(d));
  Tensor<float> wq = random({H * D, d}, 1, s), wk = random({Hkv * D, d}, 2, s),
                wv = random({Hkv * D, d}, 3, s), wo = random({d, H*D}, 4, s),
                router_w = random({E, d}, 5, s), w1 = random({E, F, d}, 6, s),
                w3 = random({E, F, d}, 7, s), w2 = random({E, d, F}, 8, 1.0f / std::sqrt(float(F)));
  attention::DenseAttention<float> attn;
  moe::TopKRouter<float> router{{.num_experts = E, .top_k = k}};
  moe::MoELayer<float> moe{{.d_model = d, .d_ff = F, .num_experts = E}};
  moe::MoELayerWeights<float> experts;

  DecoderBlock() {
    experts.experts.w1 = w1;
    experts.experts.w3 = w3;
    experts.experts.w2 = w2;
  }

  // y = h + MoE(h), h = x + attention_out wo^T, for the T rows of x (one sequence).
  Tensor<float> finish(ConstView<float, 2> x, const Tensor<float>& attn_out) const {
    const std::int64_t T = x.extent(0);
    Tensor<float> h({T, d});
    core::gemm<float>(ConstView<float, 2>(attn_out.data(), {T, H * D}), Trans::no, wo, Trans::yes,
                      h);
    for (std::int64_t t = 0; t < T; ++t)
      for (std::int64_t j = 0; j < d; ++j) h(t, j) += x(t, j);
    const auto plan = router.route(moe::router_logits<float>(h, router_w));
    Tensor<float> y = moe.execute(plan, h, experts);
    for (std::int64_t i = 0; i < y.numel(); ++i) y.data()[i] += h.data()[i];
    return y;
  }

  // q, k, v of the T rows of x, as [1, T, heads, D].
  Tensor<float> project(ConstView<float, 2> x, const Tensor<float>& w, std::int64_t heads) const {
    Tensor<float> out({1, x.extent(0), heads, D});
    core::gemm<float>(x, Trans::no, w, Trans::yes,
                      View<float, 2>(out.data(), {x.extent(0), heads * D}));
    return out;
  }

  // The next T tokens of the sequence: their keys and values join the cache, their queries
  // attend to everything cached (causal). T <= 64 runs decode, longer chunks forward.
  Tensor<float> step(ConstView<float, 2> x, attention::KVCache<float>& cache) const {
    const std::int64_t T = x.extent(0);
    const Tensor<float> q = project(x, wq, H), kx = project(x, wk, Hkv), vx = project(x, wv, Hkv);
    cache.append(kx.view<4>(), vx.view<4>());
    Tensor<float> o({1, T, H, D});
    const std::int64_t len = cache.length(0);
    if (T <= attention::max_decode_queries) {
      attn.decode(q.view<4>(), cache, o.view<4>());
    } else {
      attn.forward(q.view<4>(), cache.keys_as_sequence(len), cache.values_as_sequence(len),
                   o.view<4>(), attention::CausalMask{len - T});
    }
    return finish(x, o);
  }

  // All T tokens at once, without a cache: the reference the steps must reproduce.
  Tensor<float> full_forward(ConstView<float, 2> x) const {
    const Tensor<float> q = project(x, wq, H), kx = project(x, wk, Hkv), vx = project(x, wv, Hkv);
    Tensor<float> o({1, x.extent(0), H, D});
    attn.forward(q.view<4>(), kx.view<4>(), vx.view<4>(), o.view<4>(), attention::CausalMask{});
    return finish(x, o);
  }
};

}  // namespace

int main() {
  const std::int64_t prompt = 200, chunk = 100, steps = 64, total = prompt + steps;
  const DecoderBlock block;
  const Tensor<float> x = random({total, d}, 9, 1.0f);  // the input embeddings, teacher-forced
  attention::KVCache<float> cache(/*batch=*/1, Hkv, D, /*capacity=*/total);

  for (std::int64_t t0 = 0; t0 < prompt; t0 += chunk)
    block.step(x.view<2>().slice(0, t0, t0 + chunk), cache);
  Tensor<float> last;
  const auto start = std::chrono::steady_clock::now();
  for (std::int64_t t = prompt; t < total; ++t)
    last = block.step(x.view<2>().slice(0, t, t + 1), cache);
  const double sec =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

  const Tensor<float> full = block.full_forward(x);
  double err = 0, scale = 0;
  for (std::int64_t j = 0; j < d; ++j) {
    err = std::max(err, double(std::abs(last(0, j) - full(total - 1, j))));
    scale = std::max(scale, double(std::abs(full(total - 1, j))));
  }
  std::printf("decoder block: d %lld, %lld heads (%lld KV heads), %lld experts top-%lld, F %lld\n",
              (long long)d, (long long)H, (long long)Hkv, (long long)E, (long long)k, (long long)F);
  std::printf("prefilled %lld tokens in chunks of %lld, decoded %lld: %.0f tokens/s (%d threads)\n",
              (long long)prompt, (long long)chunk, (long long)steps, double(steps) / sec,
              num_threads());
  const bool ok = err <= 1e-4 * scale;
  std::printf("last step vs one full causal forward: max |diff| %.2e (tolerance %.1e): %s\n", err,
              1e-4 * scale, ok ? "OK" : "MISMATCH");
  return ok ? 0 : 1;
}
