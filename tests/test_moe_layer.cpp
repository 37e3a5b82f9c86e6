// MoELayer (moe/layer.hpp) and the expert FFNs (moe/experts.hpp): against a naive
// double-precision reference on random inputs (every activation, biases, output softmax,
// drops, masked tokens, shared experts, float and double), against every MoE fixture's
// output from the fixture's own routing tensors, bit-identical for 1 and 2 threads, errors,
// T = 0, and no allocation with a caller workspace.
#include <atomic>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <random>
#include <string>
#include <vector>

#include "support/compare.hpp"
#include "support/fixtures.hpp"
#include "switchyard/core/gemm_bf16.hpp"
#include "switchyard/core/parallel_for.hpp"
#include "switchyard/core/tensor.hpp"
#include "switchyard/moe/experts.hpp"
#include "switchyard/moe/layer.hpp"
#include "switchyard/moe/plan.hpp"

// Counting operator new: the no-allocation tests read g_allocs while g_counting is set.
#include "support/alloc_counter.hpp"
#include "support/moe_experts.hpp"

namespace {

using namespace switchyard;
using Catch::Matchers::Contains;
using moe::Activation;
using test_support::max_abs;
using test_support::OwnedExperts;
using test_support::random_experts;
using test_support::random_tensor;
using test_support::ref_expert;
using test_support::to_double;

/// One (token, choice) of the reference: expert (-1 unused), weight, kept by capacity.
struct Choice {
  int expert = -1;
  double weight = 0;
  bool kept = true;
};

/// Naive MoE: y[t] = sum_s shared_s(x_t) + sum over kept choices of weight * expert(x_t);
/// masked tokens give 0.
template <class T>
std::vector<double> ref_moe(const Tensor<T>& x, const OwnedExperts<T>& routed,
                            const OwnedExperts<T>* shared, Activation act, bool out_softmax,
                            const std::vector<std::vector<Choice>>& choices,
                            const std::vector<std::uint8_t>& keep) {
  const std::int64_t tokens = x.extent(0), d = x.extent(1);
  std::vector<double> y(std::size_t(tokens * d), 0.0);
  for (std::int64_t t = 0; t < tokens; ++t) {
    if (!keep.empty() && !keep[t]) continue;
    std::vector<double> xt(static_cast<std::size_t>(d));
    for (std::int64_t p = 0; p < d; ++p) xt[p] = double(x(t, p));
    const auto add = [&](const std::vector<double>& o, double g) {
      for (std::int64_t i = 0; i < d; ++i) y[t * d + i] += g * o[i];
    };
    if (shared)
      for (std::int64_t s = 0; s < shared->w1.extent(0); ++s)
        add(ref_expert(*shared, s, act, out_softmax, xt), 1.0);
    for (const Choice& c : choices[t])
      if (c.expert >= 0 && c.kept)
        add(ref_expert(routed, c.expert, act, out_softmax, xt), c.weight);
  }
  return y;
}

/// Random token-choice routing: K distinct experts per token, some pairs dropped, every
/// seventh token masked, token 1 loses all its pairs.
struct RandomRouting {
  std::vector<std::vector<Choice>> choices;
  std::vector<std::uint8_t> keep_token;
};

RandomRouting random_routing(std::int64_t tokens, std::int64_t experts, std::int64_t k,
                             std::uint32_t seed) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<double> uw(0.1, 1.0), u01(0.0, 1.0);
  RandomRouting r;
  r.choices.resize(std::size_t(tokens));
  r.keep_token.assign(std::size_t(tokens), 1);
  std::vector<int> ids(static_cast<std::size_t>(experts));
  for (std::int64_t t = 0; t < tokens; ++t) {
    for (std::int64_t e = 0; e < experts; ++e) ids[e] = int(e);
    std::shuffle(ids.begin(), ids.end(), gen);
    const bool masked = t % 7 == 3;
    r.keep_token[t] = masked ? 0 : 1;
    for (std::int64_t s = 0; s < k; ++s) {
      Choice c;
      if (!masked) {
        c.expert = ids[s];
        c.weight = uw(gen);
        c.kept = t != 1 && u01(gen) > 0.2;
      }
      r.choices[t].push_back(c);
    }
  }
  return r;
}

template <class T>
moe::DispatchPlan<T> plan_from_routing(const RandomRouting& r, std::int64_t experts,
                                       std::int64_t k) {
  const auto tokens = std::int64_t(r.choices.size());
  moe::DispatchPlan<T> plan;
  plan.reset(tokens, experts, k);
  std::vector<std::uint8_t> keep(std::size_t(tokens * k), 1);
  for (std::int64_t t = 0; t < tokens; ++t)
    for (std::int64_t s = 0; s < k; ++s) {
      const Choice& c = r.choices[t][s];
      plan.choice_expert[t * k + s] = c.expert;
      plan.choice_weight[t * k + s] = c.expert >= 0 ? T(c.weight) : T(0);
      keep[t * k + s] = c.kept ? 1 : 0;
      if (c.expert >= 0) ++plan.stats.tokens_per_expert[c.expert];
    }
  moe::detail::build_csr_from_choices(plan, keep);
  plan.check();
  return plan;
}

// Also runs the layer on weights packed once (pack_weights): the same bits as without them
// (the panels hold the values every call would pack; decode-shaped plans ignore them).
template <class T, class Arch = simd::default_arch>
void check_against_reference(Activation act, bool biases, bool out_softmax, std::int64_t shared,
                             std::int64_t f, std::uint32_t seed, std::int64_t tokens = 37,
                             std::int64_t d = 24, std::int64_t decode_max_tokens = 64) {
  const std::int64_t experts = 5, k = act == Activation::relu ? 3 : 2;
  const Tensor<T> x = random_tensor<T>({tokens, d}, seed);
  const auto routed = random_experts<T>(experts, d, f, act, biases, seed + 10);
  const auto sh =
      random_experts<T>(std::max<std::int64_t>(shared, 1), d, f + 8, act, biases, seed + 20);
  const RandomRouting r = random_routing(tokens, experts, k, seed + 30);
  const auto plan = plan_from_routing<T>(r, experts, k);
  REQUIRE(plan.stats.dropped > 0);

  moe::MoELayer<T, Arch> layer({.d_model = d,
                                .d_ff = f,
                                .num_experts = experts,
                                .activation = act,
                                .num_shared_experts = shared,
                                .output_softmax = out_softmax,
                                .shared_d_ff = f + 8,
                                .decode_max_tokens = decode_max_tokens});
  moe::MoELayerWeights<T> w{routed.view(), shared ? sh.view() : moe::ExpertWeights<T>{}};
  const moe::TokenMask mask{r.keep_token};
  const Tensor<T> y = layer.execute(plan, x, w, mask);
  const moe::MoEPackedWeights<T> packed = layer.pack_weights(w);
  REQUIRE(packed.bytes() > 0);
  Tensor<T> y_packed({tokens, d});
  layer.execute(plan, x, w, packed, y_packed.template view<2>(), mask);
  REQUIRE(std::equal(y.begin(), y.end(), y_packed.begin()));
  const auto want =
      ref_moe<T>(x, routed, shared ? &sh : nullptr, act, out_softmax, r.choices, r.keep_token);
  const double scale = max_abs(want);
  REQUIRE(scale > 0);
  const double tol = std::is_same_v<T, float> ? 2e-5 : 1e-12;
  const auto got = to_double(y);
  double err = 0;
  for (std::size_t i = 0; i < got.size(); ++i) err = std::max(err, std::abs(got[i] - want[i]));
  REQUIRE(err <= tol * scale);
  // masked tokens and the token that lost every pair (no shared expert) output exactly 0
  for (std::int64_t j = 0; j < d; ++j) {
    REQUIRE(y(3, j) == T(0));
    if (shared == 0) REQUIRE(y(1, j) == T(0));
  }
}

}  // namespace

TEST_CASE("MoELayer matches a naive double reference for every activation", "[moe][layer]") {
  struct Case {
    Activation act;
    bool biases, out_softmax;
    std::int64_t shared, f;
  };
  const Case cases[] = {
      {Activation::swiglu, false, false, 0, 40},  {Activation::swiglu, true, false, 2, 40},
      {Activation::gelu, true, false, 1, 40},     {Activation::gelu, false, false, 0, 33},
      {Activation::relu, true, true, 0, 40},      {Activation::relu, true, false, 1, 40},
      {Activation::swiglu, false, false, 1, 530},  // several hidden chunks (ff_chunk = 512)
  };
  std::uint32_t seed = 100;
  for (const Case& c : cases) {
    CAPTURE(moe::activation_name(c.act), c.biases, c.out_softmax, c.shared, c.f);
    check_against_reference<float>(c.act, c.biases, c.out_softmax, c.shared, c.f, seed);
    check_against_reference<double>(c.act, c.biases, c.out_softmax, c.shared, c.f, seed);
    // the plain C++ path (SWITCHYARD_FORCE_SCALAR builds use it as the default)
    check_against_reference<float, simd::scalar>(c.act, c.biases, c.out_softmax, c.shared, c.f,
                                                 seed);
    // 37 tokens run the decode path (T <= decode_max_tokens); 101 the prefill path; d = 200
    // gives the decode path two w2 column chunks.
    check_against_reference<float>(c.act, c.biases, c.out_softmax, c.shared, c.f, seed, 101);
    check_against_reference<double>(c.act, c.biases, c.out_softmax, c.shared, c.f, seed, 101);
    check_against_reference<float>(c.act, c.biases, c.out_softmax, c.shared, c.f, seed, 5, 200);
    seed += 100;
  }
}

TEST_CASE("MoELayer with packed weights matches the reference and execute's bits",
          "[moe][layer][packed]") {
  simd::for_each_arch([](auto arch) {
    using A = decltype(arch);
    CAPTURE(A::name());
    // Prefill-shaped plans (decode_max_tokens 0): tiles below MoELayer::streamed_rows rows,
    // which stream weights when not packed, and the shared expert's tile of every token.
    check_against_reference<float, A>(Activation::swiglu, false, false, 1, 530, 500, 300, 24, 0);
    check_against_reference<float, A>(Activation::gelu, true, false, 0, 40, 510, 90, 24, 0);
    check_against_reference<float, A>(Activation::relu, true, true, 2, 33, 520, 50, 24, 0);
    check_against_reference<double, A>(Activation::swiglu, true, false, 1, 45, 530, 120, 24, 0);
  });
}

TEST_CASE("MoELayer packed weights: bf16 weights packed into float panels",
          "[moe][layer][packed]") {
  const std::int64_t experts = 4, d = 32, f = 64, tokens = 200, k = 2;
  const auto routed = random_experts<float>(experts, d, f, Activation::swiglu, false, 61);
  // The same weights rounded to bf16: the packed bf16 run equals the unpacked one bit for bit.
  std::vector<bf16> w1(std::size_t(routed.w1.numel())), w3(w1.size()), w2(w1.size());
  for (std::size_t i = 0; i < w1.size(); ++i) w1[i] = bf16::from_float(routed.w1.data()[i]);
  for (std::size_t i = 0; i < w3.size(); ++i) w3[i] = bf16::from_float(routed.w3.data()[i]);
  for (std::size_t i = 0; i < w2.size(); ++i) w2[i] = bf16::from_float(routed.w2.data()[i]);
  moe::MoELayerWeights<bf16> w;
  w.experts.w1 = ConstView<bf16, 3>(w1.data(), {experts, f, d});
  w.experts.w3 = ConstView<bf16, 3>(w3.data(), {experts, f, d});
  w.experts.w2 = ConstView<bf16, 3>(w2.data(), {experts, d, f});
  moe::MoELayer<float> layer(
      {.d_model = d, .d_ff = f, .num_experts = experts, .decode_max_tokens = 0});
  const RandomRouting r = random_routing(tokens, experts, k, 62);
  const auto plan = plan_from_routing<float>(r, experts, k);
  const Tensor<float> x = random_tensor<float>({tokens, d}, 63);
  const auto packed = layer.pack_weights(w);
  Tensor<float> y({tokens, d});
  layer.execute(plan, x, w, packed, y.view<2>());
  const Tensor<float> unpacked = layer.execute(plan, x, w);
  REQUIRE(std::equal(y.begin(), y.end(), unpacked.begin()));
}

TEST_CASE("MoELayer packed weights errors name 'packed'", "[moe][layer][packed][errors]") {
  const std::int64_t experts = 3, d = 16, f = 32, tokens = 80, k = 2;
  const auto routed = random_experts<float>(experts, d, f, Activation::swiglu, false, 71);
  const auto other = random_experts<float>(experts, d, f, Activation::swiglu, false, 72);
  const auto wider = random_experts<float>(experts, d, f + 16, Activation::swiglu, false, 73);
  moe::MoELayer<float> layer({.d_model = d, .d_ff = f, .num_experts = experts});
  moe::MoELayer<float> wide_layer({.d_model = d, .d_ff = f + 16, .num_experts = experts});
  moe::MoELayer<float> gelu_layer(
      {.d_model = d, .d_ff = f, .num_experts = experts, .activation = Activation::gelu});
  const moe::MoELayerWeights<float> w{routed.view()}, w_other{other.view()}, w_wide{wider.view()};
  const RandomRouting r = random_routing(tokens, experts, k, 74);
  const auto plan = plan_from_routing<float>(r, experts, k);
  const Tensor<float> x = random_tensor<float>({tokens, d}, 75);
  Tensor<float> y({tokens, d});
  // Packed for another d_ff: the config's shapes in the message.
  const auto wide_packed = wide_layer.pack_weights(w_wide);
  REQUIRE_THROWS_AS(layer.execute(plan, x, w, wide_packed, y.view<2>()), shape_error);
  REQUIRE_THROWS_WITH(layer.execute(plan, x, w, wide_packed, y.view<2>()),
                      Contains("'packed'") && Contains("d_ff=48") && Contains("d_ff=32"));
  // Packed from other weights of the same shapes.
  const auto other_packed = layer.pack_weights(w_other);
  REQUIRE_THROWS_WITH(layer.execute(plan, x, w, other_packed, y.view<2>()),
                      Contains("'packed'") && Contains("other weights"));
  // Another activation (w3 absent for gelu).
  const auto swiglu_packed = layer.pack_weights(w);
  moe::ExpertWeights<float> gelu_experts = routed.view();
  gelu_experts.w3 = {};
  REQUIRE_THROWS_WITH(gelu_layer.execute(plan, x, moe::MoELayerWeights<float>{gelu_experts},
                                         swiglu_packed, y.view<2>()),
                      Contains("'packed'") && Contains("activation="));
  // An empty (default) MoEPackedWeights.
  REQUIRE_THROWS_WITH(layer.execute(plan, x, w, moe::MoEPackedWeights<float>{}, y.view<2>()),
                      Contains("'packed'"));
  // Bad weights are caught by pack_weights itself.
  REQUIRE_THROWS_WITH(layer.pack_weights(w_wide), Contains("w1"));
  if (core::bf16_best_path() != core::Bf16Path::widen) {
    moe::MoELayer<float> bf16_layer(
        {.d_model = d, .d_ff = f, .num_experts = experts, .bf16_compute = true});
    std::vector<bf16> b1(std::size_t(experts * f * d)), b3(b1.size()), b2(b1.size());
    moe::MoELayerWeights<bf16> wb;
    wb.experts.w1 = ConstView<bf16, 3>(b1.data(), {experts, f, d});
    wb.experts.w3 = ConstView<bf16, 3>(b3.data(), {experts, f, d});
    wb.experts.w2 = ConstView<bf16, 3>(b2.data(), {experts, d, f});
    REQUIRE_THROWS_AS(bf16_layer.pack_weights(wb), config_error);
  }
}

TEST_CASE("MoELayer: a token's output does not depend on its batch (decode and prefill paths)",
          "[moe][layer][decode]") {
  // One token with fixed routing, alone (decode path), among 7 random tokens (decode path) and
  // among 300 (prefill path): its output row is the same, bit for bit, also across threads.
  const std::int64_t d = 40, f = 600, experts = 6, k = 2;
  using Layer = moe::MoELayer<float>;
  REQUIRE(moe::MoELayerConfig{}.decode_max_tokens == 64);
  for (Activation act : {Activation::swiglu, Activation::gelu}) {
    CAPTURE(moe::activation_name(act));
    const auto routed = random_experts<float>(experts, d, f, act, true, 41);
    const auto sh = random_experts<float>(1, d, f, act, true, 42);
    Layer layer({.d_model = d,
                 .d_ff = f,
                 .num_experts = experts,
                 .activation = act,
                 .num_shared_experts = 1});
    moe::MoELayerWeights<float> w{routed.view(), sh.view()};
    const Tensor<float> token = random_tensor<float>({1, d}, 43);
    std::vector<float> first;
    for (std::int64_t batch : {1, 7, 300}) {
      for (int threads : {1, 2}) {
        CAPTURE(batch, threads);
        ScopedNumThreads scope(threads);
        const std::int64_t at = batch / 2;  // the token's row
        Tensor<float> x = random_tensor<float>({batch, d}, 44 + std::uint32_t(batch));
        Tensor<float> combine({batch, experts});
        std::mt19937 gen(45);
        for (std::int64_t t = 0; t < batch; ++t) {
          for (std::int64_t j = 0; j < k; ++j) combine(t, (t + 2 * j + gen() % 2) % experts) = 0.3f;
        }
        for (std::int64_t e = 0; e < experts; ++e) combine(at, e) = 0.0f;
        combine(at, 1) = 0.7f;
        combine(at, 4) = 0.3f;
        for (std::int64_t j = 0; j < d; ++j) x(at, j) = token(0, j);
        const auto plan = moe::make_plan_from_combine_weights<float>(combine.view<2>());
        const Tensor<float> y = layer.execute(plan, x.view<2>(), w);
        const std::vector<float> row(y.data() + at * d, y.data() + (at + 1) * d);
        // The whole batch through the other path: the same bits.
        Layer other({.d_model = d,
                     .d_ff = f,
                     .num_experts = experts,
                     .activation = act,
                     .num_shared_experts = 1,
                     .decode_max_tokens = batch <= 64 ? 0 : 300});
        const Tensor<float> y_other = other.execute(plan, x.view<2>(), w);
        REQUIRE(std::equal(y.begin(), y.end(), y_other.begin()));
        if (first.empty()) {
          first = row;
        } else {
          REQUIRE(row == first);
        }
      }
    }
  }
}

TEST_CASE("MoELayer accepts strided x, y and weights, and y aliasing x", "[moe][layer]") {
  const std::int64_t tokens = 29, d = 20, f = 40, experts = 3, k = 2;
  const Tensor<float> wide = random_tensor<float>({tokens, d + 5}, 7);
  const ConstView<float, 2> x = wide.view<2>().slice(1, 2, 2 + d);
  const auto routed = random_experts<float>(experts, d, f, Activation::swiglu, false, 8);
  const auto plan = plan_from_routing<float>(random_routing(tokens, experts, k, 9), experts, k);
  moe::MoELayer<float> layer({.d_model = d, .d_ff = f, .num_experts = experts});
  const moe::MoELayerWeights<float> w{routed.view(), {}};

  Tensor<float> xc({tokens, d});
  for (std::int64_t t = 0; t < tokens; ++t)
    for (std::int64_t j = 0; j < d; ++j) xc(t, j) = x(t, j);
  const Tensor<float> want = layer.execute(plan, xc, w);

  Tensor<float> ywide({d, tokens});  // y transposed: column stride tokens
  const View<float, 2> yt(ywide.data(), {tokens, d}, {1, tokens});
  layer.execute(plan, x, w, yt);
  for (std::int64_t t = 0; t < tokens; ++t)
    for (std::int64_t j = 0; j < d; ++j) REQUIRE(yt(t, j) == Approx(want(t, j)).margin(1e-6));

  Tensor<float> inplace = xc;
  layer.execute(plan, inplace, w, inplace.view<2>());
  REQUIRE(std::memcmp(inplace.data(), want.data(), sizeof(float) * std::size_t(tokens * d)) == 0);

  // Weights stored transposed ([E, d, F] / [E, F, d] in memory) and passed as strided views:
  // packing copies exactly, so the result has the same bits.
  Tensor<float> w1t({experts, d, f}), w3t({experts, d, f}), w2t({experts, f, d});
  for (std::int64_t e = 0; e < experts; ++e)
    for (std::int64_t i = 0; i < f; ++i)
      for (std::int64_t j = 0; j < d; ++j) {
        w1t(e, j, i) = routed.w1(e, i, j);
        w3t(e, j, i) = routed.w3(e, i, j);
        w2t(e, i, j) = routed.w2(e, j, i);
      }
  moe::MoELayerWeights<float> ws{};
  ws.experts.w1 = ConstView<float, 3>(w1t.data(), {experts, f, d}, {d * f, 1, f});
  ws.experts.w3 = ConstView<float, 3>(w3t.data(), {experts, f, d}, {d * f, 1, f});
  ws.experts.w2 = ConstView<float, 3>(w2t.data(), {experts, d, f}, {d * f, 1, d});
  const Tensor<float> ystrided = layer.execute(plan, xc, ws);
  REQUIRE(std::memcmp(ystrided.data(), want.data(), sizeof(float) * std::size_t(tokens * d)) == 0);
}

namespace {

struct FixtureExperts {
  Tensor<float> w1, w2, w3, b1, b2;
  moe::ExpertWeights<float> view() const {
    moe::ExpertWeights<float> w;
    w.w1 = w1;
    w.w2 = w2;
    if (!w3.empty()) w.w3 = w3;
    if (!b1.empty()) w.b1 = b1;
    if (!b2.empty()) w.b2 = b2;
    return w;
  }
};

FixtureExperts swiglu_experts(const io::SafeTensors& f, const std::string& prefix = "") {
  return {f.tensor<float>(prefix + "w1"),
          f.tensor<float>(prefix + "w2"),
          f.tensor<float>(prefix + "w3"),
          {},
          {}};
}

/// |got - want| <= 1e-5 * max(|want|, 1e-2 * max|want|) elementwise.
void require_close(const Tensor<float>& got, const Tensor<float>& want) {
  REQUIRE(got.numel() == want.numel());
  const auto g = to_double(got), w = to_double(want);
  const double floor = 1e-2 * max_abs(w);
  REQUIRE(test_support::max_rel_err(g, w, floor) <= 1e-5);
}

Tensor<float> run_fixture_layer(const moe::DispatchPlan<float>& plan, const Tensor<float>& x,
                                const FixtureExperts& ex, const FixtureExperts* shared,
                                Activation act = Activation::swiglu, bool out_softmax = false) {
  const std::int64_t d = x.extent(1), f = ex.w1.extent(1), experts = ex.w1.extent(0);
  moe::MoELayer<float> layer({.d_model = d,
                              .d_ff = f,
                              .num_experts = experts,
                              .activation = act,
                              .num_shared_experts = shared ? shared->w1.extent(0) : 0,
                              .output_softmax = out_softmax});
  plan.check();
  return layer.execute(plan, x, {ex.view(), shared ? shared->view() : moe::ExpertWeights<float>{}});
}

moe::DispatchPlan<float> plan_from_topk(const io::SafeTensors& f, std::int64_t experts) {
  const auto idx = f.tensor<std::int64_t>("topk_idx");
  const auto wts = f.tensor<float>("topk_weights");
  return moe::make_token_choice_plan<float, std::int64_t>(experts, idx, wts);
}

}  // namespace

TEST_CASE("MoELayer reproduces the token-choice fixtures", "[moe][layer][fixtures]") {
  for (const char* file : {"mixtral_topk_tiny.safetensors", "olmoe_topk_tiny.safetensors"}) {
    CAPTURE(file);
    const auto f = open_fixture(file);
    const auto ex = swiglu_experts(f);
    const auto plan = plan_from_topk(f, ex.w1.extent(0));
    require_close(run_fixture_layer(plan, f.tensor<float>("x"), ex, nullptr), f.tensor<float>("y"));
  }
  const auto f = open_fixture("shared_expert_topk_tiny.safetensors");
  const auto ex = swiglu_experts(f), sh = swiglu_experts(f, "shared_");
  const auto plan = plan_from_topk(f, ex.w1.extent(0));
  require_close(run_fixture_layer(plan, f.tensor<float>("x"), ex, &sh), f.tensor<float>("y"));
}

TEST_CASE("MoELayer reproduces the capacity, expert-choice and ReLU-routing fixtures",
          "[moe][layer][fixtures]") {
  for (const char* file : {"switch_top1_capacity_tiny.safetensors",
                           "topk_capacity_tiny.safetensors", "expert_choice_tiny.safetensors"}) {
    CAPTURE(file);
    const auto f = open_fixture(file);
    const auto plan =
        moe::make_plan_from_combine_weights<float>(f.tensor<float>("combine_weights"));
    const auto y = run_fixture_layer(plan, f.tensor<float>("x"), swiglu_experts(f), nullptr);
    require_close(y, f.tensor<float>("y"));
  }
  {
    // gshard: [T, E, C] combine weights, one non-zero slot per kept (t, e): sum over C.
    const auto f = open_fixture("gshard_top2_tiny.safetensors");
    const auto cw = f.tensor<float>("combine_weights");
    Tensor<float> c2({cw.extent(0), cw.extent(1)});
    for (std::int64_t t = 0; t < cw.extent(0); ++t)
      for (std::int64_t e = 0; e < cw.extent(1); ++e)
        for (std::int64_t c = 0; c < cw.extent(2); ++c) c2(t, e) += cw(t, e, c);
    const auto plan = moe::make_plan_from_combine_weights<float>(c2);
    require_close(run_fixture_layer(plan, f.tensor<float>("x"), swiglu_experts(f), nullptr),
                  f.tensor<float>("y"));
  }
  {
    const auto f = open_fixture("remoe_relu_tiny.safetensors");
    const auto plan = moe::make_plan_from_combine_weights<float>(f.tensor<float>("gates"));
    require_close(run_fixture_layer(plan, f.tensor<float>("x"), swiglu_experts(f), nullptr),
                  f.tensor<float>("y"));
  }
}

TEST_CASE("MoELayer reproduces the noisy top-k fixture (ReLU experts, biases, output softmax)",
          "[moe][layer][fixtures]") {
  const auto f = open_fixture("noisy_topk_tiny.safetensors");
  FixtureExperts ex;
  ex.w1 = f.tensor<float>("fc1_w");
  ex.b1 = f.tensor<float>("fc1_b");
  ex.w2 = f.tensor<float>("fc2_w");
  ex.b2 = f.tensor<float>("fc2_b");
  const auto x = f.tensor<float>("x");
  for (const auto& [gates, y] : {std::pair{"gates", "y"}, std::pair{"train_gates", "train_y"}}) {
    CAPTURE(gates);
    const auto plan = moe::make_plan_from_combine_weights<float>(f.tensor<float>(gates));
    require_close(run_fixture_layer(plan, x, ex, nullptr, Activation::relu, true),
                  f.tensor<float>(y));
  }
}

TEST_CASE("make_plan_from_combine_weights numbers slots in expert order", "[moe][layer]") {
  const float c[] = {0, 0.5f, 0, 0.25f,  //
                     0, 0,    0, 0,      //
                     1, 0,    0, 0};
  const auto plan = moe::make_plan_from_combine_weights<float>(ConstView<float, 2>(c, {3, 4}));
  plan.check();
  REQUIRE(plan.top_k == 2);
  REQUIRE(plan.nnz() == 3);
  REQUIRE(plan.expert_offsets == std::vector<std::int64_t>{0, 1, 2, 2, 3});
  REQUIRE(plan.token_index == std::vector<std::int32_t>{2, 0, 0});
  REQUIRE(plan.slot == std::vector<std::int32_t>{0, 0, 1});
  REQUIRE(plan.gate == std::vector<float>{1.0f, 0.5f, 0.25f});
  const float bad[] = {0, NAN};
  REQUIRE_THROWS_AS(moe::make_plan_from_combine_weights<float>(ConstView<float, 2>(bad, {1, 2})),
                    config_error);
}

TEST_CASE("MoELayer gives the same bits for 1 and 2 threads", "[moe][layer][threads]") {
  // Experts of ~1500 rows and a shared expert over 1500 tokens: several row tiles each.
  const std::int64_t tokens = 1500, d = 16, f = 24, experts = 2, k = 2;
  for (Activation act : {Activation::swiglu, Activation::gelu}) {
    CAPTURE(moe::activation_name(act));
    const Tensor<float> x = random_tensor<float>({tokens, d}, 11);
    const auto routed = random_experts<float>(experts, d, f, act, true, 12);
    const auto sh = random_experts<float>(1, d, f, act, true, 13);
    const RandomRouting r = random_routing(tokens, experts, k, 14);
    const auto plan = plan_from_routing<float>(r, experts, k);
    REQUIRE(plan.expert_size(0) > moe::MoELayer<float>::row_tile);
    moe::MoELayer<float> layer({.d_model = d,
                                .d_ff = f,
                                .num_experts = experts,
                                .activation = act,
                                .num_shared_experts = 1});
    const moe::MoELayerWeights<float> w{routed.view(), sh.view()};
    Tensor<float> y1, y2, y2small({tokens, d});
    {
      ScopedNumThreads one(1);
      y1 = layer.execute(plan, x, w);
    }
    {
      ScopedNumThreads two(2);
      y2 = layer.execute(plan, x, w);
      // a workspace sized for one thread still works with two (it runs one slot)
      std::vector<std::byte> ws(layer.workspace_bytes(plan, 1));
      layer.execute(plan, x, w, y2small, ws);
    }
    const std::size_t bytes = sizeof(float) * std::size_t(tokens * d);
    REQUIRE(std::memcmp(y1.data(), y2.data(), bytes) == 0);
    REQUIRE(std::memcmp(y1.data(), y2small.data(), bytes) == 0);
    REQUIRE(max_abs(to_double(y1)) > 0);
  }
}

TEST_CASE("MoELayer: expert_outputs then combine_outputs gives execute's bits",
          "[moe][layer][split]") {
  // Both paths (decode for 20 tokens, prefill for 300), shared experts with and without their
  // sigmoid gate, a keep-mask: the pieces a caller runs elsewhere must sum to the same bits.
  const std::int64_t d = 16, f = 24, experts = 5, k = 2;
  for (std::int64_t tokens : {20, 300}) {
    for (bool gated : {false, true}) {
      CAPTURE(tokens, gated);
      const Tensor<float> x = random_tensor<float>({tokens, d}, 21);
      const auto routed = random_experts<float>(experts, d, f, Activation::swiglu, false, 22);
      const auto sh = random_experts<float>(2, d, f, Activation::swiglu, false, 23);
      const Tensor<float> gate = random_tensor<float>({2, d}, 24);
      const RandomRouting r = random_routing(tokens, experts, k, 25);
      const auto plan = plan_from_routing<float>(r, experts, k);
      moe::MoELayer<float> layer(
          {.d_model = d, .d_ff = f, .num_experts = experts, .num_shared_experts = 2});
      moe::MoELayerWeights<float> w{routed.view(), sh.view()};
      if (gated) w.shared_gate = gate.view<2>();
      const moe::TokenMask mask{r.keep_token};
      const Tensor<float> want = layer.execute(plan, x, w, mask);
      REQUIRE(layer.output_rows(plan) == plan.nnz() + 2 * tokens);
      Tensor<float> out({layer.output_rows(plan), d}), y({tokens, d});
      layer.expert_outputs(plan, x, w, out.view<2>());
      layer.combine_outputs(plan, out.view<2>(), y.view<2>(), mask);
      REQUIRE(std::memcmp(y.data(), want.data(), sizeof(float) * std::size_t(tokens * d)) == 0);
      // Row p is entry p's ungated expert output: check one entry against the double reference.
      const std::int64_t p = plan.expert_offsets[3], t = plan.token_index[p];
      std::vector<double> xt(static_cast<std::size_t>(d));
      for (std::int64_t j = 0; j < d; ++j) xt[j] = x(t, j);
      const auto o = ref_expert(routed, 3, Activation::swiglu, false, xt);
      for (std::int64_t j = 0; j < d; ++j) REQUIRE(std::abs(out(p, j) - o[j]) <= 1e-5);
    }
  }
}

TEST_CASE("MoELayer: expert_outputs / combine_outputs errors name the argument",
          "[moe][layer][split][errors]") {
  const std::int64_t d = 8, tokens = 6, experts = 4, k = 2;
  const Tensor<float> x = random_tensor<float>({tokens, d}, 31);
  const auto routed = random_experts<float>(experts, d, 16, Activation::swiglu, false, 32);
  const RandomRouting r = random_routing(tokens, experts, k, 33);
  const auto plan = plan_from_routing<float>(r, experts, k);
  moe::MoELayer<float> layer({.d_model = d, .d_ff = 16, .num_experts = experts});
  const moe::MoELayerWeights<float> w{routed.view(), {}};
  Tensor<float> short_out({plan.nnz() - 1, d}), out({plan.nnz(), d}), y({tokens, d});
  REQUIRE_THROWS_WITH(layer.expert_outputs(plan, x, w, short_out.view<2>()),
                      Contains("MoELayer::expert_outputs") && Contains("'out'"));
  REQUIRE_THROWS_WITH(
      layer.expert_outputs(plan, x, w, View<float, 2>(out.data(), {plan.nnz(), d}, {1, 1})),
      Contains("'out'") && Contains("contiguous rows"));
  layer.expert_outputs(plan, x, w, out.view<2>());
  REQUIRE_THROWS_WITH(layer.combine_outputs(plan, short_out.view<2>(), y.view<2>()),
                      Contains("MoELayer::combine_outputs") && Contains("'outputs'"));
  REQUIRE_THROWS_WITH(layer.combine_outputs(plan, out.view<2>(), out.view<2>()),
                      Contains("combine_outputs") && Contains("'y'"));
  auto broken = plan;
  broken.token_index[0] = 99;
  REQUIRE_THROWS_WITH(layer.combine_outputs(broken, out.view<2>(), y.view<2>()),
                      Contains("combine_outputs") && Contains("out of range"));
  const std::vector<std::uint8_t> keep(3, 1);
  REQUIRE_THROWS_WITH(layer.combine_outputs(plan, out.view<2>(), y.view<2>(), {keep}),
                      Contains("'mask'"));
}

TEST_CASE("MoELayer with T = 0 returns an empty output", "[moe][layer]") {
  const std::int64_t d = 8;
  moe::MoELayer<float> layer({.d_model = d, .d_ff = 16, .num_experts = 4});
  const auto routed = random_experts<float>(4, d, 16, Activation::swiglu, false, 1);
  const auto plan = moe::make_token_choice_plan<float, std::int32_t>(
      4, ConstView<std::int32_t, 2>(nullptr, {0, 2}), ConstView<float, 2>(nullptr, {0, 2}));
  const Tensor<float> x({0, d});
  REQUIRE(layer.workspace_bytes(plan) == 0);
  const Tensor<float> y = layer.execute(plan, x, {routed.view(), {}});
  REQUIRE(y.extent(0) == 0);
  REQUIRE(y.extent(1) == d);
  Tensor<float> y2({0, d});
  layer.execute(plan, x, {routed.view(), {}}, y2, std::span<std::byte>{});
}

TEST_CASE("MoELayer errors name the argument and both shapes", "[moe][layer][errors]") {
  const std::int64_t tokens = 16, d = 8, f = 16, experts = 4, k = 2;
  const auto routed = random_experts<float>(experts, d, f, Activation::swiglu, false, 1);
  const auto sh = random_experts<float>(1, d, f, Activation::swiglu, false, 2);
  const Tensor<float> x = random_tensor<float>({tokens, d}, 3);
  const auto plan = plan_from_routing<float>(random_routing(tokens, experts, k, 4), experts, k);
  moe::MoELayer<float> layer({.d_model = d, .d_ff = f, .num_experts = experts});
  const moe::MoELayerWeights<float> w{routed.view(), {}};

  SECTION("config") {
    REQUIRE_THROWS_AS(moe::MoELayer<float>({.d_model = 0, .d_ff = f, .num_experts = 4}),
                      config_error);
    REQUIRE_THROWS_WITH(moe::MoELayer<float>({.d_model = d, .d_ff = 0, .num_experts = 4}),
                        Contains("MoELayer") && Contains("d_ff"));
    REQUIRE_THROWS_WITH(moe::MoELayer<float>({.d_model = d, .d_ff = f, .num_experts = 0}),
                        Contains("num_experts"));
    REQUIRE_THROWS_WITH(
        moe::MoELayer<float>({.d_model = d, .d_ff = f, .num_experts = 4, .num_shared_experts = -1}),
        Contains("num_shared_experts"));
    REQUIRE_THROWS_AS(
        moe::MoELayer<float>({.d_model = d, .d_ff = f, .num_experts = 4, .shared_d_ff = -2}),
        config_error);
    REQUIRE_THROWS_WITH(
        moe::MoELayer<float>({.d_model = d, .d_ff = f, .num_experts = 4, .decode_max_tokens = -1}),
        Contains("decode_max_tokens"));
  }
  SECTION("w1 in the wrong layout") {
    const Tensor<float> w1t({experts, d, f});  // [E, d, F] instead of [E, F, d]
    moe::MoELayerWeights<float> bad = w;
    bad.experts.w1 = w1t;
    REQUIRE_THROWS_AS(layer.execute(plan, x, bad), shape_error);
    REQUIRE_THROWS_WITH(layer.execute(plan, x, bad),
                        Contains("MoELayer::execute") && Contains("'w1'") &&
                            Contains("[E=4, F=8, D=16]") && Contains("[E=4, F=16, D=8]"));
  }
  SECTION("other weights") {
    moe::MoELayerWeights<float> bad = w;
    bad.experts.w3 = {};
    REQUIRE_THROWS_WITH(layer.execute(plan, x, bad), Contains("'w3'"));
    bad = w;
    bad.experts.w2 = routed.w1;
    REQUIRE_THROWS_WITH(layer.execute(plan, x, bad),
                        Contains("'w2'") && Contains("[E=4, D=16, F=8]"));
    bad = w;
    const Tensor<float> b1({experts, f + 1});
    bad.experts.b1 = b1;
    REQUIRE_THROWS_WITH(layer.execute(plan, x, bad), Contains("'b1'"));
    const auto gelu = random_experts<float>(experts, d, f, Activation::gelu, false, 5);
    moe::MoELayer<float> gl(
        {.d_model = d, .d_ff = f, .num_experts = experts, .activation = Activation::gelu});
    moe::MoELayerWeights<float> gw{gelu.view(), {}};
    gw.experts.w3 = routed.w3;  // only swiglu has w3
    REQUIRE_THROWS_WITH(gl.execute(plan, x, gw), Contains("'w3'"));
    moe::MoELayer<float> with_shared(
        {.d_model = d, .d_ff = f, .num_experts = experts, .num_shared_experts = 2});
    moe::MoELayerWeights<float> sw{routed.view(), sh.view()};  // holds 1 shared expert, not 2
    REQUIRE_THROWS_WITH(with_shared.execute(plan, x, sw),
                        Contains("'shared.w1'") && Contains("[E=1, F=16, D=8]"));
  }
  SECTION("x, y, plan, mask, workspace") {
    const Tensor<float> x7({tokens, d - 1});
    REQUIRE_THROWS_WITH(layer.execute(plan, x7, w),
                        Contains("'x'") && Contains("[T=16, D=7]") && Contains("[T=16, D=8]"));
    const Tensor<float> x15({tokens - 1, d});
    REQUIRE_THROWS_WITH(layer.execute(plan, x15, w), Contains("'x'") && Contains("[T=15, D=8]"));
    Tensor<float> y({tokens, d + 1});
    REQUIRE_THROWS_WITH(layer.execute(plan, x, w, y.view<2>()),
                        Contains("'y'") && Contains("[T=16, D=9]"));
    auto other =
        plan_from_routing<float>(random_routing(tokens, experts + 1, k, 4), experts + 1, k);
    REQUIRE_THROWS_WITH(layer.execute(other, x, w), Contains("'plan'") && Contains("E=5"));
    const std::vector<std::uint8_t> keep(5, 1);
    REQUIRE_THROWS_WITH(layer.execute(plan, x, w, moe::TokenMask{keep}), Contains("'mask'"));
    Tensor<float> y2({tokens, d});
    std::vector<std::byte> ws(layer.workspace_bytes(plan, 1) - 1);
    REQUIRE_THROWS_WITH(layer.execute(plan, x, w, y2.view<2>(), ws), Contains("'workspace'"));
    auto broken = plan;
    broken.token_index[0] = 99;
    REQUIRE_THROWS_AS(layer.execute(broken, x, w), switchyard::error);
    broken = plan;
    broken.expert_offsets.pop_back();
    REQUIRE_THROWS_WITH(layer.execute(broken, x, w), Contains("expert_offsets"));
  }
}

TEST_CASE("MoELayer::execute with a workspace does not allocate", "[moe][layer][alloc]") {
  const std::int64_t tokens = 300, d = 16, f = 24, experts = 3, k = 2;
  const Tensor<float> x = random_tensor<float>({tokens, d}, 21);
  const auto routed = random_experts<float>(experts, d, f, Activation::swiglu, true, 22);
  const auto sh = random_experts<float>(1, d, f, Activation::swiglu, true, 23);
  const auto plan = plan_from_routing<float>(random_routing(tokens, experts, k, 24), experts, k);
  moe::MoELayer<float> layer(
      {.d_model = d, .d_ff = f, .num_experts = experts, .num_shared_experts = 1});
  const moe::MoELayerWeights<float> w{routed.view(), sh.view()};
  Tensor<float> y({tokens, d});
  for (int threads : {1, 2}) {
    CAPTURE(threads);
    ScopedNumThreads nt(threads);
    std::vector<std::byte> ws(layer.workspace_bytes(plan));
    layer.execute(plan, x, w, y.view<2>(), ws);  // warm-up (thread pool start-up)
    g_allocs = 0;
    g_counting = true;
    layer.execute(plan, x, w, y.view<2>(), ws);
    g_counting = false;
    REQUIRE(g_allocs.load() == 0);
  }
}

namespace {

/// The experts of `w` as one separate [rows, cols] tensor per expert and projection (each in
/// its own allocation, as a checkpoint stores them), of element type S (float, or bf16).
template <class S>
struct PerExpert {
  std::vector<std::vector<S>> store;  // one buffer per matrix
  moe::ExpertWeights<S> view;

  void add(std::vector<ConstView<S, 2>>& list, const Tensor<float>& stacked, std::int64_t e) {
    const std::int64_t r = stacked.extent(1), c = stacked.extent(2);
    auto& buf = store.emplace_back(std::size_t(r * c));
    for (std::int64_t i = 0; i < r; ++i)
      for (std::int64_t j = 0; j < c; ++j) {
        if constexpr (std::is_same_v<S, bf16>)
          buf[std::size_t(i * c + j)] = bf16::from_float(stacked(e, i, j));
        else
          buf[std::size_t(i * c + j)] = stacked(e, i, j);
      }
    list.push_back(ConstView<S, 2>(buf.data(), {r, c}));
  }
  explicit PerExpert(const OwnedExperts<float>& w) {
    store.reserve(std::size_t(3 * w.w1.extent(0)));  // views point into the buffers: no moves
    for (std::int64_t e = 0; e < w.w1.extent(0); ++e) {
      add(view.w1_each, w.w1, e);
      add(view.w3_each, w.w3, e);
      add(view.w2_each, w.w2, e);
    }
  }
};

/// w with every weight rounded to bf16 (the values a bf16 checkpoint holds), as float.
OwnedExperts<float> rounded_to_bf16(OwnedExperts<float> w) {
  for (Tensor<float>* t : {&w.w1, &w.w3, &w.w2})
    for (float& v : *t) v = to_float(bf16::from_float(v));
  return w;
}

}  // namespace

TEST_CASE(
    "MoELayer: per-expert views, bf16 weights and gated shared experts match a naive "
    "double reference",
    "[moe][layer][bf16]") {
  const std::int64_t experts = 5, k = 2, d = 40, f = 72, fs = 48;
  for (const std::int64_t tokens : {std::int64_t(5), std::int64_t(101)}) {  // decode, prefill
    CAPTURE(tokens);
    const Tensor<float> x = random_tensor<float>({tokens, d}, 7);
    // Values exactly representable in bf16, so the float and bf16 forms hold the same weights.
    const auto routed =
        rounded_to_bf16(random_experts<float>(experts, d, f, Activation::swiglu, false, 17));
    const auto shared =
        rounded_to_bf16(random_experts<float>(2, d, fs, Activation::swiglu, false, 27));
    Tensor<float> gate = random_tensor<float>({2, d}, 37, 0.5);
    for (float& v : gate) v = to_float(bf16::from_float(v));
    std::vector<bf16> gate16(std::size_t(2 * d));
    for (std::int64_t i = 0; i < 2 * d; ++i)
      gate16[std::size_t(i)] = bf16::from_float(gate.data()[i]);

    const RandomRouting r = random_routing(tokens, experts, k, 47);
    const auto plan = plan_from_routing<float>(r, experts, k);
    // Reference: sum_s sigmoid(x . gate_s) shared_s(x) + sum of kept gate * expert(x).
    std::vector<double> want(std::size_t(tokens * d), 0.0);
    for (std::int64_t t = 0; t < tokens; ++t) {
      if (!r.keep_token[t]) continue;
      std::vector<double> xt(static_cast<std::size_t>(d));
      for (std::int64_t p = 0; p < d; ++p) xt[p] = x(t, p);
      for (std::int64_t s = 0; s < 2; ++s) {
        double z = 0;
        for (std::int64_t p = 0; p < d; ++p) z += xt[p] * double(gate(s, p));
        const auto o = ref_expert(shared, s, Activation::swiglu, false, xt);
        for (std::int64_t i = 0; i < d; ++i) want[t * d + i] += o[i] / (1 + std::exp(-z));
      }
      for (const Choice& c : r.choices[t])
        if (c.expert >= 0 && c.kept) {
          const auto o = ref_expert(routed, c.expert, Activation::swiglu, false, xt);
          for (std::int64_t i = 0; i < d; ++i) want[t * d + i] += c.weight * o[i];
        }
    }
    const double scale = max_abs(want);
    REQUIRE(scale > 0);
    moe::MoELayer<float> layer({.d_model = d,
                                .d_ff = f,
                                .num_experts = experts,
                                .num_shared_experts = 2,
                                .shared_d_ff = fs});
    const moe::TokenMask mask{r.keep_token};
    const auto check = [&](const Tensor<float>& y) {
      const auto got = to_double(y);
      double err = 0;
      for (std::size_t i = 0; i < got.size(); ++i) err = std::max(err, std::abs(got[i] - want[i]));
      REQUIRE(err <= 2e-5 * scale);
    };
    // stacked float weights
    const moe::MoELayerWeights<float> stacked{routed.view(), shared.view(), gate};
    const Tensor<float> y_stacked = layer.execute(plan, x, stacked, mask);
    check(y_stacked);
    // one float view per expert: the same packing reads them, the same bits come out
    PerExpert<float> routed_f(routed), shared_f(shared);
    const Tensor<float> y_each = layer.execute(
        plan, x, moe::MoELayerWeights<float>{routed_f.view, shared_f.view, gate}, mask);
    check(y_each);
    REQUIRE(std::equal(y_each.begin(), y_each.end(), y_stacked.begin()));
    // bf16 weights, one view per expert, widened while packing
    PerExpert<bf16> routed_b(routed), shared_b(shared);
    const moe::MoELayerWeights<bf16> w16{routed_b.view, shared_b.view,
                                         ConstView<bf16, 2>(gate16.data(), {2, d})};
    const Tensor<float> y16 = layer.execute(plan, x, w16, mask);
    check(y16);
    REQUIRE(std::equal(y16.begin(), y16.end(), y_stacked.begin()));
  }
}

TEST_CASE("MoELayer: per-expert view and bf16 errors name the argument", "[moe][layer][errors]") {
  const std::int64_t experts = 3, d = 8, f = 16;
  const auto routed = random_experts<float>(experts, d, f, Activation::swiglu, true, 5);
  const Tensor<float> x = random_tensor<float>({4, d}, 6);
  const RandomRouting r = random_routing(4, experts, 1, 7);
  const auto plan = plan_from_routing<float>(r, experts, 1);
  moe::MoELayer<float> layer({.d_model = d, .d_ff = f, .num_experts = experts});

  PerExpert<float> each(routed);
  auto both = each.view;  // stacked and per-expert at once
  both.w1 = routed.w1;
  REQUIRE_THROWS_WITH(layer.execute(plan, x, moe::MoELayerWeights<float>{both, {}}),
                      Contains("'w1_each'") && Contains("not both"));
  auto short_list = each.view;
  short_list.w2_each.pop_back();
  REQUIRE_THROWS_WITH(layer.execute(plan, x, moe::MoELayerWeights<float>{short_list, {}}),
                      Contains("'w2_each'") && Contains("[2 views]") && Contains("[3 views]"));
  auto wrong = each.view;
  wrong.w3_each[1] = each.view.w2_each[1];  // [d, f] where [f, d] belongs
  REQUIRE_THROWS_WITH(layer.execute(plan, x, moe::MoELayerWeights<float>{wrong, {}}),
                      Contains("'w3_each[1]'") && Contains("[F=16, D=8]"));

  PerExpert<bf16> each16(routed);
  std::vector<bf16> bias(std::size_t(experts * f));
  auto biased = each16.view;
  biased.b1 = ConstView<bf16, 2>(bias.data(), {experts, f});
  REQUIRE_THROWS_WITH(layer.execute(plan, x, moe::MoELayerWeights<bf16>{biased, {}}),
                      Contains("'b1'") && Contains("no biases"));
  const Tensor<float> g = random_tensor<float>({2, d}, 8);
  REQUIRE_THROWS_WITH(layer.execute(plan, x, moe::MoELayerWeights<float>{routed.view(), {}, g}),
                      Contains("'shared_gate'"));
}

namespace {

/// One SwiGLU expert on a bf16-rounded x row, in double: out[i] and sum_j |h_j w2[i][j]|
/// (the scale of the error that rounding h to bf16 may add).
void ref_swiglu_bf16_input(const OwnedExperts<float>& w, std::int64_t e,
                           const std::vector<double>& x, std::vector<double>& out,
                           std::vector<double>& mag) {
  const std::int64_t d = w.w1.extent(2), f = w.w1.extent(1);
  std::vector<double> h(static_cast<std::size_t>(f));
  for (std::int64_t j = 0; j < f; ++j) {
    double a = 0, b = 0;
    for (std::int64_t p = 0; p < d; ++p) {
      a += x[std::size_t(p)] * w.w1(e, j, p);
      b += x[std::size_t(p)] * w.w3(e, j, p);
    }
    h[std::size_t(j)] = a / (1 + std::exp(-a)) * b;
  }
  out.assign(std::size_t(d), 0.0);
  mag.assign(std::size_t(d), 0.0);
  for (std::int64_t i = 0; i < d; ++i)
    for (std::int64_t j = 0; j < f; ++j) {
      out[std::size_t(i)] += h[std::size_t(j)] * w.w2(e, i, j);
      mag[std::size_t(i)] += std::abs(h[std::size_t(j)] * w.w2(e, i, j));
    }
}

}  // namespace

TEST_CASE("MoELayer bf16_compute matches a double reference on bf16-rounded activations",
          "[moe][layer][bf16]") {
  if (core::bf16_best_path() == core::Bf16Path::widen) {
    WARN("bf16_compute skipped: no bf16 tile path (AMX or AVX512-BF16) in this build and CPU");
    CHECK_THROWS_WITH(
        moe::MoELayer<float>({.d_model = 8, .d_ff = 8, .num_experts = 2, .bf16_compute = true}),
        Catch::Contains("MoELayer") && Catch::Contains("bf16_compute"));
    return;
  }
  // d and F not multiples of 32; F over one hidden chunk (512), so chunks accumulate; 101
  // tokens run the prefill path.
  const std::int64_t experts = 3, k = 2, d = 40, f = 530, tokens = 101;
  const Tensor<float> x = random_tensor<float>({tokens, d}, 5);
  const auto routed =
      rounded_to_bf16(random_experts<float>(experts, d, f, Activation::swiglu, false, 15));
  const auto shared =
      rounded_to_bf16(random_experts<float>(1, d, f, Activation::swiglu, false, 25));
  const RandomRouting r = random_routing(tokens, experts, k, 35);
  const auto plan = plan_from_routing<float>(r, experts, k);
  // Reference: x rounded to bf16 as the layer rounds it, everything else exact. The layer also
  // rounds each hidden value to bf16 (relative error <= 2^-9) and sums in float, so each output
  // is within 2^-8 * sum |gate h_j w2_ij| of the reference.
  std::vector<double> want(std::size_t(tokens * d), 0.0), bound(std::size_t(tokens * d), 0.0);
  std::vector<double> xt(static_cast<std::size_t>(d)), o, mag;
  for (std::int64_t t = 0; t < tokens; ++t) {
    if (!r.keep_token[t]) continue;
    for (std::int64_t p = 0; p < d; ++p) xt[std::size_t(p)] = to_float(bf16::from_float(x(t, p)));
    const auto add = [&](double gate) {
      for (std::int64_t i = 0; i < d; ++i) {
        want[std::size_t(t * d + i)] += gate * o[std::size_t(i)];
        bound[std::size_t(t * d + i)] += std::abs(gate) * mag[std::size_t(i)] * std::ldexp(1.0, -8);
      }
    };
    ref_swiglu_bf16_input(shared, 0, xt, o, mag);
    add(1.0);
    for (const Choice& c : r.choices[t])
      if (c.expert >= 0 && c.kept) {
        ref_swiglu_bf16_input(routed, c.expert, xt, o, mag);
        add(c.weight);
      }
  }
  moe::MoELayer<float> layer({.d_model = d,
                              .d_ff = f,
                              .num_experts = experts,
                              .num_shared_experts = 1,
                              .bf16_compute = true});
  PerExpert<bf16> routed_b(routed), shared_b(shared);
  const moe::MoELayerWeights<bf16> w16{routed_b.view, shared_b.view};
  const moe::TokenMask mask{r.keep_token};
  Tensor<float> y1({tokens, d}), y2({tokens, d});
  {
    ScopedNumThreads one(1);
    layer.execute(plan, x, w16, y1.view<2>(), mask);
  }
  {
    ScopedNumThreads two(2);
    layer.execute(plan, x, w16, y2.view<2>(), mask);
  }
  REQUIRE(std::equal(y1.begin(), y1.end(), y2.begin()));
  std::int64_t bad = 0;
  double worst = 0;  // largest error as a fraction of its bound
  for (std::int64_t i = 0; i < tokens * d; ++i) {
    const double err = std::abs(double(y1.data()[i]) - want[std::size_t(i)]);
    bad += err > bound[std::size_t(i)] + 1e-7;
    if (bound[std::size_t(i)] > 0) worst = std::max(worst, err / bound[std::size_t(i)]);
  }
  CAPTURE(worst);
  CHECK(bad == 0);
  // Not the float path: rounding the activations must show somewhere.
  const moe::MoELayer<float> float_layer(
      {.d_model = d, .d_ff = f, .num_experts = experts, .num_shared_experts = 1});
  const Tensor<float> y_float = float_layer.execute(plan, x, w16, mask);
  CHECK(!std::equal(y1.begin(), y1.end(), y_float.begin()));
}

TEST_CASE("MoELayer bf16_compute with float or f16 weights is a config_error",
          "[moe][layer][bf16][errors]") {
  if (core::bf16_best_path() == core::Bf16Path::widen) return;  // construction throws (above)
  const std::int64_t d = 8, f = 8, tokens = 100;
  const auto routed = random_experts<float>(2, d, f, Activation::swiglu, false, 3);
  const Tensor<float> x = random_tensor<float>({tokens, d}, 4);
  const RandomRouting r = random_routing(tokens, 2, 1, 5);
  const auto plan = plan_from_routing<float>(r, 2, 1);
  const moe::MoELayer<float> layer(
      {.d_model = d, .d_ff = f, .num_experts = 2, .bf16_compute = true});
  CHECK_THROWS_WITH(layer.execute(plan, x, moe::MoELayerWeights<float>{routed.view()}),
                    Catch::Contains("MoELayer") && Catch::Contains("bf16_compute") &&
                        Catch::Contains("bf16 weights"));
}
