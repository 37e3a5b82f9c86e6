// libFuzzer target: builds a layer, router or kernel from fuzzed sizes, parameters and data
// and runs one call. Every outcome must be a result or a switchyard exception
// (std::invalid_argument: shape_error / config_error; switchyard::error); a crash, a
// sanitizer report, another exception, a huge allocation or a hang is a finding.
//
// Sizes are mostly small (0..8) with a few extreme values (negative, 2^31, 2^40, 2^62,
// INT64_MAX). Inputs whose extents are small are real tensors; others are stride-0 views
// of one element, which may claim any extents. Outputs sometimes alias an input.
// SWITCHYARD_MAX_BUFFER_BYTES is 2^28 here (set by CMake), so every size the library
// accepts is also quick to run.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <deque>
#include <limits>
#include <stdexcept>
#include <switchyard/core/gemm_bf16.hpp>
#include <switchyard/switchyard.hpp>
#include <vector>

#include "fuzz_input.hpp"

using namespace switchyard;

namespace {

constexpr std::int64_t kMaxRealElems = 4096;
// Multiply-adds one call may cost. The buffer cap bounds memory, not work: routing
// attention on a stride-0 q of 33^4 allocates 4 MB but runs B*H*C*w*w*D ~ 10^9 steps
// (10 s under the sanitizers, a false "hang"). Sizes the library would reject still run.
constexpr double kMaxWork = 1 << 25;

/// Work of RoutingAttention init_state + route + execute for q of shape qs, or 0 when
/// some extent is negative or extreme (a call that must be rejected, so cheap).
double routing_work(const attention::RoutingAttention<float>& attn, const Shape<4>& qs) {
  for (const auto e : qs)
    if (e < 0 || e > 64) return 0;
  // D = 0 still costs a step per (query, key) pair: softmax and bookkeeping.
  const double B = double(qs[0]), T = double(qs[1]), H = double(qs[2]),
               D = double(std::max<std::int64_t>(qs[3], 1));
  const double C = double(attn.num_clusters(qs[1]));
  const double w = std::min(T, double(std::max<std::int64_t>(attn.config().window_size, 0)));
  return B * H * (C * T * D + C * w * w * D);
}

class Fuzz : public switchyard_fuzz::FuzzInput {
 public:
  using FuzzInput::FuzzInput;

  /// An extent or count: mostly 0..8, sometimes a value that must be rejected.
  std::int64_t extent() {
    const std::uint8_t b = byte();
    if (b < 224) return b % 9;
    static constexpr std::int64_t extreme[] = {-1,
                                               -7,
                                               16,
                                               33,
                                               std::int64_t(1) << 31,
                                               std::int64_t(1) << 40,
                                               std::int64_t(1) << 62,
                                               std::numeric_limits<std::int64_t>::max(),
                                               std::numeric_limits<std::int64_t>::min(),
                                               3};
    return extreme[b % std::size(extreme)];
  }
  /// A signed parameter (offsets, seeds of positions): small or extreme.
  std::int64_t offset() { return flag() ? pick(-10, 10) : extent(); }

  double real() {
    const std::uint8_t b = byte();
    static const double table[] = {0.0,
                                   1.0,
                                   -1.0,
                                   0.5,
                                   2.0,
                                   1e-300,
                                   1e300,
                                   -1e300,
                                   std::numeric_limits<double>::quiet_NaN(),
                                   std::numeric_limits<double>::infinity(),
                                   -std::numeric_limits<double>::infinity(),
                                   0.125};
    if (b < 128) return table[b % std::size(table)];
    return in_.ConsumeFloatingPointInRange<double>(-4.0, 4.0);
  }
  float value() {
    const std::uint8_t b = byte();
    if (b < 8) return static_cast<float>(real());  // NaN, inf, huge, ...
    return static_cast<float>(b - 128) / 32.0f;
  }

  /// A tensor argument: real data when small, a stride-0 view of one element otherwise.
  template <int R>
  View<float, R> tensor(Shape<R> shape) {
    std::int64_t n = 1;
    bool small = true;
    for (auto e : shape) {
      if (e < 0 || e > 64) small = false;
      if (small) n *= e;
    }
    if (small && n <= kMaxRealElems) {
      auto& t = arena_.emplace_back(std::span<const std::int64_t>(shape.data(), R));
      for (auto& x : t) x = value();
      return t.template view<R>();
    }
    return View<float, R>(&scalar_, shape, Shape<R>{});
  }
  template <int R>
  Shape<R> shape() {
    Shape<R> s{};
    for (auto& e : s) e = extent();
    return s;
  }
  /// An output of the given shape, or (sometimes) one of the inputs.
  template <int R>
  View<float, R> output(Shape<R> shape, std::initializer_list<View<float, R>> inputs) {
    if (inputs.size() > 0 && byte() < 24) return *(inputs.begin() + byte() % inputs.size());
    return tensor<R>(shape);
  }
  /// Usually `want`, sometimes perturbed, to reach the shape checks.
  std::int64_t near(std::int64_t want) { return byte() < 230 ? want : extent(); }
  template <std::size_t N>
  std::array<std::int64_t, N> near(std::array<std::int64_t, N> s) {
    for (auto& e : s) e = near(e);
    return s;
  }
  std::vector<std::int64_t> int_list(std::int64_t n, std::int64_t lo, std::int64_t hi) {
    std::vector<std::int64_t> v;
    for (std::int64_t i = 0; i < std::min<std::int64_t>(n, 64); ++i)
      v.push_back(byte() < 240 ? pick(lo, hi) : extent());
    return v;
  }
  std::vector<std::uint8_t> keep_list(std::int64_t n) {
    std::vector<std::uint8_t> v;
    for (std::int64_t i = 0; i < std::min<std::int64_t>(n, 256); ++i) v.push_back(byte() & 1);
    return v;
  }

 private:
  std::deque<Tensor<float>> arena_;
  float scalar_ = 1.0f;
};

template <int R>
ConstView<float, R> c(View<float, R> v) {
  return v;
}

void fuzz_dense(Fuzz& f) {
  attention::DenseAttentionConfig cfg;
  if (f.flag()) cfg.scale = f.real();
  attention::DenseAttention<float> attn(cfg);
  const auto qs = f.shape<4>();
  const Shape<4> ks = f.near(Shape<4>{qs[0], f.extent(), f.flag() ? qs[2] : 1, qs[3]});
  auto q = f.tensor<4>(qs);
  auto k = f.tensor<4>(ks);
  auto v = f.tensor<4>(f.near(ks));
  auto out = f.output<4>(f.near(qs), {q, k, v});
  attention::Mask<float> mask;
  if (f.flag()) mask.causal = attention::CausalMask{f.offset()};
  std::vector<std::int64_t> lengths =
      f.int_list(f.near(qs[0]), -1, std::clamp<std::int64_t>(ks[1], 0, 64) + 1);
  if (f.flag()) mask.key_lengths = attention::KeyLengths{lengths};
  if (f.flag())
    mask.bias = attention::AdditiveBias<float>{f.tensor<2>(f.near(Shape<2>{qs[1], ks[1]}))};
  attn.forward(q, k, v, out, mask);
}

void fuzz_linear(Fuzz& f) {
  attention::LinearAttentionConfig cfg;
  cfg.feature_map = static_cast<attention::FeatureMap>(f.pick(0, 3));
  cfg.eps = f.flag() ? f.real() : 1e-6;
  cfg.chunk_size = f.flag() ? f.extent() : 4;
  cfg.num_features = f.flag() ? f.extent() : 8;
  cfg.orthogonal = f.flag();
  cfg.head_dim = f.flag() ? f.extent() : 0;
  attention::LinearAttention<float> lin(cfg);
  const auto qs = f.shape<4>();
  const std::int64_t dv = f.extent();
  const std::int64_t mode = f.pick(0, 2);
  if (mode == 2) {
    auto q = f.tensor<3>({qs[0], qs[2], qs[3]});
    auto k = f.tensor<3>(f.near(Shape<3>{qs[0], qs[2], qs[3]}));
    auto v = f.tensor<3>(f.near(Shape<3>{qs[0], qs[2], dv}));
    auto out = f.output<3>(f.near(Shape<3>{qs[0], qs[2], dv}), {q, k, v});
    auto state = lin.make_state(f.near(qs[0]), f.near(qs[2]), f.near(qs[3]), f.near(dv));
    lin.step(q, k, v, state, out);
    return;
  }
  const std::int64_t s = mode == 1 ? qs[1] : f.extent();
  auto q = f.tensor<4>(qs);
  auto k = f.tensor<4>(f.near(Shape<4>{qs[0], s, qs[2], qs[3]}));
  auto v = f.tensor<4>(f.near(Shape<4>{qs[0], s, qs[2], dv}));
  auto out = f.output<4>(f.near(Shape<4>{qs[0], qs[1], qs[2], dv}), {q, k, v});
  std::vector<std::int64_t> lengths;
  if (f.flag()) lengths = f.int_list(f.near(qs[0]), -1, std::clamp<std::int64_t>(s, 0, 64) + 1);
  if (mode == 0) {
    lin.forward(q, k, v, out, lengths);
  } else if (f.flag()) {
    auto state = lin.make_state(f.near(qs[0]), f.near(qs[2]), f.near(qs[3]), f.near(dv));
    lin.forward_causal(q, k, v, out, lengths, &state);
  } else {
    lin.forward_causal(q, k, v, out, lengths);
  }
}

void fuzz_plan_executor(Fuzz& f) {
  const auto qs = f.shape<4>();
  const std::int64_t S = f.extent();
  attention::AttentionPlan plan(f.near(qs[0]), f.near(qs[2]), f.near(qs[1]), f.near(S));
  const std::int64_t groups = f.pick(0, 6);
  for (std::int64_t g = 0; g < groups; ++g) {
    const auto qi = f.int_list(f.pick(0, 6), -1, std::max<std::int64_t>(qs[1], 0));
    const auto ki = f.int_list(f.pick(0, 6), -1, std::max<std::int64_t>(S, 0));
    const std::int64_t head = f.flag() ? attention::AttentionPlan::all_heads : f.pick(-1, 3);
    plan.add_group(f.pick(-1, 2), head, qi, ki, f.flag() ? f.pick(-2, 2) : -1);
  }
  plan.rule.causal = f.flag();
  if (f.flag()) plan.rule.self_value = f.real();
  plan.rule.finite_mask = f.flag();
  plan.output = f.flag() ? attention::PlanOutput::accumulate : attention::PlanOutput::write;
  plan.memory_keys = f.flag() ? f.extent() : 0;
  if (f.flag()) {  // corrupt the CSR arrays
    plan.query_offsets.push_back(f.extent());
  }
  attention::PlanExecutor<float> exec;
  const Shape<4> ks{qs[0], S, f.flag() ? qs[2] : 1, qs[3]};
  auto q = f.tensor<4>(qs);
  auto k = f.tensor<4>(f.near(ks));
  auto v = f.tensor<4>(f.near(ks));
  auto out = f.output<4>(f.near(qs), {q, k, v});
  attention::PlanExtras<float> ex;
  if (plan.memory_keys != 0 || f.flag()) {
    auto m = f.tensor<3>({f.extent(), f.near(plan.memory_keys), f.near(qs[3])});
    ex.memory_k = m;
    ex.memory_v = m;
  }
  const auto qkeep = f.keep_list(f.near(std::clamp<std::int64_t>(qs[0], 0, 64) * 4));
  if (f.flag()) ex.query_keep = qkeep;
  View<float, 3> counts{};
  if (f.flag()) counts = f.tensor<3>(f.near(Shape<3>{qs[0], qs[2], qs[1]}));
  exec.execute(plan, q, k, v, out, counts, ex);
}

void fuzz_decode(Fuzz& f) {
  attention::KVCache<float> cache(f.extent(), f.extent(), f.extent(), f.extent());
  const std::int64_t B = cache.batch(), Hkv = cache.kv_heads(), D = cache.head_dim();
  for (int i = 0, n = int(f.pick(0, 3)); i < n; ++i) {
    if (f.flag()) {
      const Shape<4> s = f.near(Shape<4>{B, f.extent(), Hkv, D});
      cache.append(f.tensor<4>(s), f.tensor<4>(f.near(s)));
    } else {
      const Shape<3> s = f.near(Shape<3>{f.extent(), Hkv, D});
      cache.append(f.offset(), f.tensor<3>(s), f.tensor<3>(f.near(s)));
    }
  }
  if (f.flag()) {
    attention::KVKeepPlan plan;
    plan.offsets = f.int_list(f.near(B * Hkv + 1), -2, 6);
    plan.positions = f.int_list(f.extent(), -2, 9);
    cache.keep(plan);
  }
  attention::DenseAttentionConfig cfg;
  if (f.flag()) cfg.scale = f.real();
  attention::DenseAttention<float> attn(cfg);
  const Shape<4> qs = f.near(Shape<4>{B, f.extent(), Hkv * f.pick(1, 3), D});
  auto q = f.tensor<4>(qs);
  auto out = f.output<4>(f.near(qs), {q});
  attention::DecodeOptions<float> opts;
  if (f.flag()) opts.bias = f.tensor<3>(f.near(Shape<3>{qs[2], qs[1], cache.capacity()}));
  if (f.flag()) opts.key_mass = f.tensor<3>(f.near(Shape<3>{B, Hkv, cache.capacity()}));
  opts.accumulate_key_mass = f.flag();
  std::int64_t flags = 1;  // B * T_new * H, each clamped so the product cannot overflow
  for (int i = 0; i < 3; ++i) flags *= std::clamp<std::int64_t>(qs[i], 0, 64);
  const std::vector<std::uint8_t> active = f.keep_list(f.near(flags));
  if (f.flag()) opts.active_heads = active;
  attn.decode(q, cache, out, opts);
}

// Token selection and the other decode paths: eviction policies, PiToMe, SpAtten pruning,
// prefill key mass / active heads, routing attention and mixture-of-heads decoding.
void fuzz_selection(Fuzz& f) {
  switch (f.pick(0, 6)) {
    case 0: {  // eviction policies on a small cache
      attention::KVCache<float> cache(f.pick(1, 3), f.pick(1, 3), f.pick(1, 9), f.pick(1, 12));
      const std::int64_t B = cache.batch(), Hkv = cache.kv_heads(), D = cache.head_dim();
      for (int i = 0, n = int(f.pick(0, 3)); i < n; ++i)
        cache.append(f.offset(), f.tensor<3>(f.near(Shape<3>{f.extent(), Hkv, D})),
                     f.tensor<3>(f.near(Shape<3>{f.extent(), Hkv, D})));
      auto mass = f.tensor<3>(f.near(Shape<3>{B, Hkv, cache.capacity()}));
      attention::KVKeepPlan plan;
      switch (f.pick(0, 3)) {
        case 0:
          plan = attention::StreamingLLMPolicy({.sinks = f.offset(), .recent = f.offset()})
                     .plan(cache);
          break;
        case 1: {
          attention::H2OState<float> state(cache);
          if (f.flag()) state.scores().data()[0] = f.value();
          plan =
              attention::H2OPolicy({.heavy = f.offset(), .recent = f.offset()}).plan(cache, state);
          break;
        }
        case 2:
          plan = attention::TOVAPolicy({.budget = f.offset()}).plan(cache, mass);
          break;
        default:
          plan = attention::SnapKVPolicy({.budget = f.offset(),
                                          .window = f.offset(),
                                          .kernel = f.offset(),
                                          .pooling = f.flag() ? attention::SnapKVPooling::max
                                                              : attention::SnapKVPooling::avg})
                     .plan(cache, mass);
          break;
      }
      if (f.flag() && !plan.positions.empty()) plan.positions[0] = f.offset();
      if (f.flag()) cache.append(0, f.tensor<3>({1, Hkv, D}), f.tensor<3>({1, Hkv, D}));
      cache.keep(plan);
      plan.apply(f.tensor<3>(f.near(Shape<3>{B, Hkv, cache.capacity()})));
      break;
    }
    case 1: {  // PiToMe
      auto metric = f.tensor<3>(f.shape<3>());
      tokens::EnergyMatchingConfig cfg{.r = f.offset(),
                                       .margin = f.real(),
                                       .alpha = f.real(),
                                       .class_token = f.flag(),
                                       .bsm = f.flag()};
      if (f.flag()) cfg.kernel = tokens::EnergyKernel::gaussian;
      if (f.flag()) cfg.split = tokens::EnergySplit::halves;
      std::optional<ConstView<float, 2>> sizes;
      if (f.flag()) sizes = c(f.tensor<2>(f.near(Shape<2>{metric.extent(0), metric.extent(1)})));
      const auto plan = tokens::energy_matching<float>(metric, cfg, sizes);
      auto x = f.tensor<3>(f.near(Shape<3>{plan.batch, plan.num_tokens, f.extent()}));
      auto out = f.output<3>(f.near(Shape<3>{plan.batch, plan.num_out, x.extent(2)}), {x});
      plan.merge(x, out, static_cast<tokens::MergeMode>(f.pick(0, 3)));
      break;
    }
    case 2: {  // SpAtten token pruning over two layers
      tokens::CascadeTokenPruner<float> pruner({.keep_ratio = f.real(), .class_token = f.flag()});
      auto state = tokens::TokenImportance<float>::start(f.extent(), f.extent());
      auto plan = pruner.prune(
          state, f.tensor<3>(f.near(Shape<3>{state.batch, f.extent(), state.num_tokens})));
      auto plan2 =
          pruner.prune(state, f.tensor<3>(f.near(Shape<3>{state.batch, 1, state.num_tokens})));
      const auto chained = plan.then(plan2);
      (void)chained.gather<float>(
          c(f.tensor<3>(f.near(Shape<3>{chained.batch, chained.num_tokens, f.extent()}))));
      break;
    }
    case 3: {  // SpAtten head pruning
      tokens::CascadeHeadPruner<float> pruner({.keep_ratio = f.real()});
      auto state = tokens::HeadImportance<float>::start(f.extent(), f.extent());
      (void)pruner.prune(
          state,
          f.tensor<4>(f.near(Shape<4>{state.batch, f.extent(), state.num_heads, f.extent()})));
      break;
    }
    case 4: {  // prefill key mass and active heads
      attention::DenseAttention<float> attn;
      const auto qs = f.shape<4>();
      const Shape<4> ks = f.near(Shape<4>{qs[0], f.extent(), f.flag() ? qs[2] : 1, qs[3]});
      auto q = f.tensor<4>(qs);
      auto k = f.tensor<4>(ks);
      auto out = f.output<4>(f.near(qs), {q, k});
      attention::ForwardOptions<float> opts;
      if (f.flag()) opts.key_mass = f.tensor<3>(f.near(Shape<3>{ks[0], ks[2], ks[1]}));
      opts.accumulate_key_mass = f.flag();
      const auto active = f.keep_list(f.pick(0, 70));
      if (f.flag()) opts.active_heads = active;
      attention::Mask<float> mask;
      if (f.flag()) mask.causal = attention::CausalMask{f.offset()};
      attn.forward(q, k, k, out, mask, opts);
      break;
    }
    case 5: {  // routing attention decoding
      attention::RoutingAttention<float> attn({.num_clusters = f.pick(1, 4),
                                               .window_size = f.pick(1, 8),
                                               .causal = true,
                                               .shared_qk = f.flag()});
      const std::int64_t H = f.pick(1, 3), D = f.pick(1, 8);
      auto q = f.tensor<4>({1, 8, H, D});
      auto state = attn.init_state(q, attn.config().shared_qk ? ConstView<float, 4>{} : c(q), 1);
      auto dec = attn.make_decode_state(state, f.extent(), f.extent());
      const Shape<4> s = f.near(Shape<4>{dec.batch(), f.extent(), H, D});
      auto x = f.tensor<4>(s);
      auto out = f.output<4>(f.near(s), {x});
      attn.prefill(x, attn.config().shared_qk ? ConstView<float, 4>{} : c(x), x, state, dec, out);
      break;
    }
    default: {  // mixture-of-heads decoding
      attention::MixtureOfHeads<float> moh(
          {.dim = 8, .num_heads = 2, .shared_heads = 0, .routed_top_k = 1, .causal = f.flag()});
      attention::MixtureOfHeadsWeights<float> w;
      w.qkv_weight = f.tensor<2>({24, 8});
      w.proj_weight = f.tensor<2>({8, 8});
      w.wg = f.tensor<2>({2, 8});
      attention::KVCache<float> cache(f.pick(1, 3), f.near(2), f.near(4), f.pick(1, 70));
      auto x = f.tensor<3>(f.near(Shape<3>{cache.batch(), f.extent(), 8}));
      auto out = f.output<3>(f.near(x.shape()), {x});
      moh.decode(x, w, cache, out);
      break;
    }
  }
}

void fuzz_routing(Fuzz& f) {
  attention::RoutingAttentionConfig cfg;
  cfg.num_clusters = f.extent();
  cfg.window_size = f.extent();
  cfg.causal = f.flag();
  cfg.shared_qk = f.flag();
  if (f.flag()) cfg.ema_decay = f.real();
  if (f.flag()) cfg.commitment = f.real();
  if (f.flag()) cfg.scatter_eps = f.real();
  cfg.num_mem_kv = f.flag() ? f.extent() : 0;
  cfg.selection = f.flag() ? attention::RoutingSelection::nearest_centroid
                           : attention::RoutingSelection::top_window;
  attention::RoutingAttention<float> attn(cfg);
  const auto qs = f.shape<4>();
  // Up to 3 k-means iterations over q and k (2 T samples), then the forward.
  if (8 * routing_work(attn, qs) > kMaxWork) return;
  auto q = f.tensor<4>(qs);
  auto k = f.tensor<4>(f.near(qs));
  auto v = f.tensor<4>(f.near(qs));
  auto state =
      attn.init_state(q, cfg.shared_qk ? ConstView<float, 4>{} : c(k),
                      static_cast<std::uint64_t>(f.pick(0, 9)), static_cast<int>(f.pick(0, 3)));
  if (f.flag()) state.means.fill(f.value());
  auto out = f.output<4>(f.near(qs), {q, k, v});
  attention::RoutingExtras<float> ex;
  const std::int64_t C = attn.num_clusters(qs[1]), M = attn.memory_kv();
  if (M > 0 || f.flag()) {
    auto m = f.tensor<4>(f.near(Shape<4>{qs[2], C, M, qs[3]}));
    ex.mem_key = m;
    ex.mem_value = m;
  }
  const auto mask = f.keep_list(
      f.near(std::clamp<std::int64_t>(qs[0], 0, 64) * std::clamp<std::int64_t>(qs[1], 0, 64)));
  if (f.flag()) ex.query_mask = mask;
  if (cfg.shared_qk)
    attn.forward(q, v, state, out, ex);
  else
    attn.forward(q, k, v, state, out, ex);
  if (f.flag()) attn.update_centroids(state, q, cfg.shared_qk ? ConstView<float, 4>{} : c(k));
}

void fuzz_bilevel(Fuzz& f) {
  attention::BiLevelRoutingConfig cfg;
  cfg.dim = f.extent();
  cfg.num_heads = f.extent();
  cfg.n_win = f.extent();
  cfg.topk = f.extent();
  cfg.side_dwconv = f.pick(-1, 5);
  cfg.auto_pad = f.flag();
  if (f.flag()) cfg.qk_scale = f.real();
  attention::BiLevelRoutingAttention<float> bra(cfg);
  const std::int64_t C = cfg.dim, k = std::max<std::int64_t>(cfg.side_dwconv, 0);
  attention::BiLevelRoutingWeights<float> w;
  w.qkv_weight = f.tensor<2>(f.near(Shape<2>{3 * C, C}));
  w.wo_weight = f.tensor<2>(f.near(Shape<2>{C, C}));
  if (f.flag()) w.qkv_bias = f.tensor<1>(f.near(Shape<1>{3 * C}));
  if (k > 0) w.lepe_weight = f.tensor<4>(f.near(Shape<4>{C, 1, k, k}));
  auto x = f.tensor<4>(f.near(Shape<4>{f.extent(), f.extent(), f.extent(), C}));
  // Projections (4 C^2 per token) plus at most every key of the image per query: a stride-0
  // x of 33^4 costs ~10^9 steps under the sanitizers (see kMaxWork).
  const auto xs = x.shape();
  if (std::all_of(xs.begin(), xs.end(), [](std::int64_t e) { return e >= 0 && e <= 64; })) {
    const double tokens = double(xs[0]) * double(xs[1]) * double(xs[2]), c = double(xs[3]);
    if (tokens * std::max(c, 1.0) * (4 * c + double(xs[1]) * double(xs[2])) > kMaxWork) return;
  }
  auto out = f.output<4>(f.near(x.shape()), {x});
  if (f.flag()) {
    bra.forward(x, w, out);
  } else {
    auto plan = bra.route(x, w);
    if (f.flag() && !plan.r_idx.empty()) plan.r_idx[0] = f.offset();
    bra.execute(plan, x, w, out);
  }
}

void fuzz_moh(Fuzz& f) {
  attention::MixtureOfHeadsConfig cfg;
  cfg.dim = f.extent();
  cfg.num_heads = f.extent();
  cfg.shared_heads = f.extent();
  cfg.routed_top_k = f.extent();
  if (f.flag()) cfg.scale = f.real();
  attention::MixtureOfHeads<float> moh(cfg);
  const std::int64_t C = cfg.dim, H = cfg.num_heads, S = cfg.shared_heads;
  attention::MixtureOfHeadsWeights<float> w;
  w.qkv_weight = f.tensor<2>(f.near(Shape<2>{3 * C, C}));
  w.proj_weight = f.tensor<2>(f.near(Shape<2>{C, C}));
  w.wg = f.tensor<2>(f.near(Shape<2>{H - S, C}));
  w.wg0 = f.tensor<2>(f.near(Shape<2>{2, C}));
  w.wg1 = f.tensor<2>(f.near(Shape<2>{S, C}));
  auto x = f.tensor<3>(f.near(Shape<3>{f.extent(), f.extent(), C}));
  auto out = f.output<3>(f.near(x.shape()), {x});
  moh.forward(x, w, out);
}

void fuzz_routers(Fuzz& f) {
  const std::int64_t E = f.extent(), K = f.extent();
  auto logits = f.tensor<2>({f.extent(), f.near(E)});
  const auto keep = f.keep_list(f.near(std::max<std::int64_t>(logits.extent(0), 0)));
  moe::TokenMask mask;
  if (f.flag()) mask.keep = keep;
  moe::DispatchPlan<float> plan;
  switch (f.pick(0, 10)) {
    case 0: {
      const moe::TopKRouter<float> r({.num_experts = E, .top_k = K, .renormalize = f.flag()});
      if (f.flag())  // a scores buffer: wrong shapes, or logits itself, must be rejected
        r.route(logits, plan, mask, f.output<2>(f.near(logits.shape()), {logits}));
      else
        r.route(logits, plan, mask);
      break;
    }
    case 1:
      moe::CapacityRouter<float>(
          {.num_experts = E,
           .top_k = K,
           .capacity_factor = f.real(),
           .min_capacity = f.extent(),
           .capacity = f.flag() ? f.offset() : -1,
           .pre_softmax = f.flag(),
           .drop_policy = f.flag() ? moe::DropPolicy::probs : moe::DropPolicy::position})
          .route(logits, plan, mask);
      break;
    case 2: {
      moe::GShardTop2Router<float> r({.num_experts = E,
                                      .capacity_factor = f.real(),
                                      .min_capacity = f.extent(),
                                      .capacity = f.flag() ? f.offset() : -1});
      if (f.flag())
        r.route_with_noise(logits, f.tensor<2>(f.near(logits.shape())), plan, mask);
      else
        r.route(logits, plan, mask);
      break;
    }
    case 3:
      moe::ExpertChoiceRouter<float>({.num_experts = E,
                                      .capacity_factor = f.real(),
                                      .min_capacity = f.extent(),
                                      .capacity = f.flag() ? f.offset() : -1})
          .route(logits, plan, mask);
      break;
    case 4:
      moe::ReluRouter<float>({.num_experts = E, .topk_for_target = K}).route(logits, plan, mask);
      break;
    case 5:
      moe::NoisyTopKRouter<float>({.num_experts = E,
                                   .top_k = K,
                                   .noise_epsilon = f.real(),
                                   .loss_coef = f.real(),
                                   .noisy_gating = f.flag()})
          .route(logits, plan, mask);
      break;
    case 6:
      moe::TopPRouter<float>({.num_experts = E,
                              .threshold = f.real(),
                              .min_experts = f.extent(),
                              .max_experts = f.extent(),
                              .renormalize = f.flag()})
          .route(logits, plan, mask);
      break;
    case 7: {
      const auto ids = f.int_list(f.extent(), -5, 100);
      moe::HashRouter<float>({.num_experts = E, .top_k = K, .seed = std::uint64_t(f.pick(0, 9))})
          .route(ids, plan);
      break;
    }
    case 8: {  // logits are [T, E + N]; the constructor has checked E + N
      const moe::NullExpertRouter<float> r(
          {.num_experts = E, .null_experts = f.extent(), .top_k = K, .renormalize = f.flag()});
      auto wide = f.tensor<2>({logits.extent(0), f.near(r.router_width())});
      if (f.flag())
        r.route(wide, plan, mask, f.output<2>(f.near(wide.shape()), {wide}));
      else
        r.route(wide, plan, mask);
      break;
    }
    case 9: {  // DeepSeek-V3 gate: groups, sigmoid, selection bias
      const moe::GroupedTopKRouter<float> r(
          {.num_experts = E,
           .top_k = K,
           .n_group = f.extent(),
           .topk_group = f.extent(),
           .score_func = f.flag() ? moe::ScoreFunc::sigmoid : moe::ScoreFunc::softmax,
           .norm_topk_prob = f.flag(),
           .routed_scaling_factor = f.flag() ? f.real() : 1.0});
      std::vector<float> bias(static_cast<std::size_t>(std::clamp<std::int64_t>(f.near(E), 0, 64)));
      for (auto& b : bias) b = f.value();
      View<float, 2> scores;
      if (f.flag()) scores = f.output<2>(f.near(logits.shape()), {logits});
      if (f.flag())
        r.route(logits, bias, plan, mask, scores);
      else
        r.route(logits, plan, mask, scores);
      break;
    }
    default: {
      const std::int64_t T = f.extent();
      std::vector<std::int32_t> ids;
      std::vector<float> weights;
      const std::int64_t n = std::clamp<std::int64_t>(T, 0, 16) * std::clamp<std::int64_t>(K, 0, 4);
      for (std::int64_t i = 0; i < n; ++i) {
        ids.push_back(static_cast<std::int32_t>(f.pick(-2, 9)));
        weights.push_back(f.value());
      }
      const std::int64_t rows = std::clamp<std::int64_t>(T, 0, 16),
                         cols = std::clamp<std::int64_t>(K, 0, 4);
      plan = moe::make_token_choice_plan<float, std::int32_t>(
          E, ConstView<std::int32_t, 2>(ids.data(), {rows, cols}),
          ConstView<float, 2>(weights.data(), f.near(Shape<2>{rows, cols})));
      break;
    }
  }
  plan.check();
}

void fuzz_moe_layer(Fuzz& f) {
  moe::MoELayerConfig cfg;
  cfg.d_model = f.extent();
  cfg.d_ff = f.extent();
  cfg.num_experts = f.extent();
  cfg.activation = static_cast<moe::Activation>(f.pick(0, 3));
  cfg.num_shared_experts = f.flag() ? f.extent() : 0;
  cfg.shared_d_ff = f.flag() ? f.extent() : 0;
  cfg.decode_max_tokens = f.flag() ? f.extent() : 64;
  moe::MoELayer<float> layer(cfg);
  const auto& cf = layer.config();
  const std::int64_t E = cf.num_experts, d = cf.d_model, F = cf.d_ff, S = cf.num_shared_experts;
  moe::MoELayerWeights<float> w;
  w.experts.w1 = f.tensor<3>(f.near(Shape<3>{E, F, d}));
  w.experts.w2 = f.tensor<3>(f.near(Shape<3>{E, d, F}));
  if (cf.activation == moe::Activation::swiglu)
    w.experts.w3 = f.tensor<3>(f.near(Shape<3>{E, F, d}));
  if (f.flag()) w.experts.b1 = f.tensor<2>(f.near(Shape<2>{E, F}));
  if (S > 0) {
    const std::int64_t Fs = cf.shared_d_ff;
    w.shared.w1 = f.tensor<3>(f.near(Shape<3>{S, Fs, d}));
    w.shared.w2 = f.tensor<3>(f.near(Shape<3>{S, d, Fs}));
    if (cf.activation == moe::Activation::swiglu)
      w.shared.w3 = f.tensor<3>(f.near(Shape<3>{S, Fs, d}));
  }
  const std::int64_t T = f.extent();
  auto x = f.tensor<2>(f.near(Shape<2>{T, d}));
  auto logits = f.tensor<2>(f.near(Shape<2>{T, E}));
  auto plan = moe::TopKRouter<float>({.num_experts = E, .top_k = std::min<std::int64_t>(2, E)})
                  .route(logits);
  switch (f.pick(0, 3)) {  // corrupt the plan
    case 0:
      if (!plan.token_index.empty()) plan.token_index[0] = static_cast<std::int32_t>(f.offset());
      break;
    case 1:
      if (!plan.expert_offsets.empty()) plan.expert_offsets.back() = f.offset();
      break;
    case 2:
      plan.num_tokens = f.near(plan.num_tokens);
      break;
    default:
      break;
  }
  auto y = f.output<2>(f.near(Shape<2>{T, d}), {x});
  if (f.flag()) {
    std::vector<std::byte> ws(static_cast<std::size_t>(f.pick(0, 1 << 16)));
    layer.execute(plan, x, w, y, ws);
  } else {
    layer.execute(plan, x, w, y);
  }
}

void fuzz_tokens(Fuzz& f) {
  auto metric = f.tensor<3>(f.shape<3>());
  std::optional<ConstView<float, 2>> sizes;
  if (f.flag()) sizes = c(f.tensor<2>(f.near(Shape<2>{metric.extent(0), metric.extent(1)})));
  const auto plan =
      tokens::bipartite_soft_matching<float>(metric, f.offset(), f.flag(), f.flag(), sizes);
  const std::int64_t C = f.extent();
  auto x = f.tensor<3>(f.near(Shape<3>{plan.batch, plan.num_tokens, C}));
  switch (f.pick(0, 4)) {
    case 0: {
      auto out = f.output<3>(f.near(Shape<3>{plan.batch, plan.num_out, C}), {x});
      plan.merge(x, out, static_cast<tokens::MergeMode>(f.pick(0, 2)));
      break;
    }
    case 1: {
      auto out = f.output<3>(f.near(Shape<3>{plan.batch, plan.num_out, C}), {x});
      plan.merge_wavg(x, out);
      break;
    }
    case 2: {
      auto xm = f.tensor<3>(f.near(Shape<3>{plan.batch, plan.num_out, C}));
      auto out = f.output<3>(f.near(Shape<3>{plan.batch, plan.num_tokens, C}), {xm});
      plan.unmerge(xm, out,
                   f.flag() ? tokens::UnmergeOrder::reference : tokens::UnmergeOrder::inverse);
      break;
    }
    case 3:
      (void)plan.source(f.tensor<3>(f.near(Shape<3>{plan.batch, plan.num_tokens, f.extent()})));
      break;
    default: {
      const auto qs = f.shape<4>();
      auto q = f.tensor<4>(qs);
      auto k = f.tensor<4>(f.near(qs));
      auto out = f.output<4>(f.near(qs), {q, k});
      tokens::proportional_attention<float>(q, k, k, f.tensor<2>(f.near(Shape<2>{qs[0], qs[1]})),
                                            out);
      break;
    }
  }
}

void fuzz_core(Fuzz& f) {
  switch (f.pick(0, 3)) {
    case 0: {
      auto x = f.tensor<2>(f.shape<2>());
      const std::int64_t k = f.extent();
      auto idx_owner = std::vector<std::int64_t>(static_cast<std::size_t>(std::clamp<std::int64_t>(
          std::clamp<std::int64_t>(x.extent(0), 0, 64) * std::clamp<std::int64_t>(k, 0, 64), 0,
          4096)));
      const std::int64_t rows = std::clamp<std::int64_t>(x.extent(0), 0, 64);
      const std::int64_t cols = std::clamp<std::int64_t>(k, 0, 64);
      if (idx_owner.size() < std::size_t(rows * cols)) return;
      View<std::int64_t, 2> idx(idx_owner.data(), {rows, cols});
      auto vals = f.output<2>(f.near(Shape<2>{rows, cols}), {x});
      core::topk<float>(x, k, idx, vals);
      break;
    }
    case 1: {
      const std::int64_t m = f.extent(), n = f.extent(), k = f.extent();
      const auto ta = f.flag() ? core::Trans::yes : core::Trans::no;
      const auto tb = f.flag() ? core::Trans::yes : core::Trans::no;
      auto a = f.tensor<2>(ta == core::Trans::no ? Shape<2>{m, k} : Shape<2>{k, m});
      auto b = f.tensor<2>(f.near(tb == core::Trans::no ? Shape<2>{k, n} : Shape<2>{n, k}));
      auto cc = f.output<2>(f.near(Shape<2>{m, n}), {a, b});
      if (f.flag())
        core::gemm_parallel<float>(a, ta, b, tb, cc, f.value(), f.value());
      else
        core::gemm<float>(a, ta, b, tb, cc, f.value(), f.value());
      break;
    }
    case 2: {
      const int rank = static_cast<int>(f.pick(0, 5));
      std::vector<std::int64_t> shape;
      for (int i = 0; i < rank; ++i) shape.push_back(f.extent());
      // Only shapes the library accepts are allocated; the limit is 2^28 bytes here.
      Tensor<float> t(shape);
      (void)t;
      break;
    }
    default: {
      auto x = f.tensor<2>(f.shape<2>());
      core::softmax_rows<float>(x);
      break;
    }
  }
}

// Public calls not covered above: size-taking factories, second entry points of the
// routers and layers, losses and controllers.
void fuzz_misc(Fuzz& f) {
  switch (f.pick(0, 9)) {
    case 0:
      (void)attention::full_plan(f.extent(), f.extent(), f.extent(), f.extent(), f.flag());
      break;
    case 1:
      (void)attention::make_favor_projection<float>(f.extent(), f.extent(), 1, f.flag());
      break;
    case 2: {
      auto combine = f.tensor<2>(f.shape<2>());
      moe::make_plan_from_combine_weights<float>(combine).check();
      break;
    }
    case 3:
      (void)core::topk<float>(f.tensor<2>(f.shape<2>()), f.extent());
      break;
    case 4: {
      moe::NoisyTopKRouter<float> r({.num_experts = f.extent(), .top_k = f.extent()});
      const std::int64_t E = r.config().num_experts, d = f.extent();
      moe::NoisyTopKWeights<float> w;
      w.w_gate = f.tensor<2>(f.near(Shape<2>{d, E}));
      w.w_noise = f.tensor<2>(f.near(Shape<2>{d, E}));
      auto x = f.tensor<2>(f.near(Shape<2>{f.extent(), d}));
      moe::NoisyTopKNoise<float> noise;
      if (f.flag()) noise.normal = f.tensor<2>(f.near(Shape<2>{x.extent(0), E}));
      moe::DispatchPlan<float> plan;
      r.route(x, w, plan, {}, f.flag() ? moe::NoisyMode::train : moe::NoisyMode::eval, noise);
      plan.check();
      break;
    }
    case 5: {
      moe::GShardTop2Router<float> r({.num_experts = f.extent(), .capacity_factor = f.real()});
      moe::DispatchPlan<float> plan;
      r.route_sampled(f.tensor<2>({f.extent(), f.near(r.config().num_experts)}), core::Rng(3),
                      plan);
      plan.check();
      break;
    }
    case 6: {
      const moe::ReluRouterConfig rc{.num_experts = f.extent(), .topk_for_target = f.extent()};
      moe::L1Controller ctl(rc, {.initial_coeff = f.real(), .multiplier = f.real()});
      auto state = ctl.initial_state();
      ctl.update(state, f.real());
      break;
    }
    case 7: {
      std::vector<std::int64_t> counts = f.int_list(f.extent(), -3, 9);
      std::vector<double> probs(counts.size());
      for (auto& p : probs) p = f.real();
      (void)moe::switch_load_balancing_loss(counts, probs, f.extent(), f.extent());
      (void)moe::cv_squared(probs);
      break;
    }
    case 8: {
      attention::MixtureOfHeads<float> moh(
          {.dim = 8, .num_heads = 2, .shared_heads = 0, .routed_top_k = 1});
      attention::MixtureOfHeadsWeights<float> w;
      w.qkv_weight = f.tensor<2>({24, 8});
      w.proj_weight = f.tensor<2>({8, 8});
      w.wg = f.tensor<2>({2, 8});
      auto x = f.tensor<3>({f.pick(0, 2), f.pick(0, 4), 8});
      auto plan = moh.route(x, w);
      if (f.flag() && !plan.token_index.empty()) plan.token_index[0] = f.offset();
      if (f.flag() && !plan.head_offsets.empty()) plan.head_offsets.back() = f.offset();
      if (f.flag()) plan.num_tokens = f.offset();
      auto out = f.output<3>(x.shape(), {x});
      moh.execute(plan, x, w, out);
      break;
    }
    default: {
      attention::RoutingAttention<float> attn(
          {.num_clusters = f.extent(), .window_size = f.extent()});
      const auto qs = f.shape<4>();
      if (routing_work(attn, qs) > kMaxWork) break;
      auto q = f.tensor<4>(qs);
      auto state = attn.init_state(q, {}, 1);
      auto r = attn.route(q, {}, state);
      if (f.flag() && !r.plan.key_index.empty()) r.plan.key_index[0] = f.offset();
      auto out = f.output<4>(f.near(qs), {q});
      attn.execute(r.plan, q, q, q, out);
      break;
    }
  }
}

/// Multiply-adds of a structured-attention call on q [B, T, H, D] with at most `keys` keys per
/// query, or 0 when an extent is negative or extreme (a call that must be rejected, so cheap).
double structured_work(const Shape<4>& qs, double keys) {
  for (const auto e : qs)
    if (e < 0 || e > 4096) return 0;
  return double(qs[0]) * double(qs[1]) * double(qs[2]) * double(std::max<std::int64_t>(qs[3], 1)) *
         std::max(keys, 1.0);
}

/// Neighbourhood attention on a Rank-D grid: NATTEN's arguments (some invalid), q/k/v/out of
/// [B, tokens, H, D] (sometimes of the wrong token count or head count), key lengths.
template <int Rank>
void fuzz_neighborhood(Fuzz& f) {
  attention::NeighborhoodConfig<Rank> cfg;
  double window = 1;
  for (auto& ax : cfg.axes) {
    ax.kernel_size = f.flag() ? 2 * f.pick(0, 3) + 1 : f.extent();
    ax.dilation = f.flag() ? f.pick(1, 3) : f.extent();
    ax.stride = f.flag() ? 1 : f.extent();
    ax.is_causal = f.byte() < 64;
    window *= double(std::clamp<std::int64_t>(ax.kernel_size, 1, 64));
  }
  if (f.flag()) cfg.scale = f.real();
  const attention::NeighborhoodAttention<Rank, float> na(cfg);
  std::array<std::int64_t, Rank> ext{};
  std::int64_t tokens = 1;
  for (auto& e : ext) {
    e = f.byte() < 200 ? f.pick(1, 12) : f.extent();
    tokens = std::clamp<std::int64_t>(tokens * std::clamp<std::int64_t>(e, 0, 4096), 0, 4096);
  }
  const Shape<4> qs{f.pick(0, 2), f.near(tokens), f.pick(1, 4),
                    f.byte() < 240 ? f.pick(0, 20) : f.extent()};
  if (structured_work(qs, window) > kMaxWork) return;
  const std::int64_t hkv = f.flag() ? qs[2] : 1;
  auto q = f.tensor<4>(qs);
  auto k = f.tensor<4>(f.near(Shape<4>{qs[0], tokens, hkv, qs[3]}));
  auto v = f.tensor<4>(f.near(Shape<4>{qs[0], tokens, hkv, qs[3]}));
  auto out = f.output<4>(f.near(qs), {q, k, v});
  std::vector<std::int64_t> lengths;
  if (f.flag()) lengths = f.int_list(f.near(qs[0]), -1, tokens + 1);
  if (f.flag()) (void)na.pairs(ext, lengths);
  na.forward(ext, q, k, v, out, lengths);
}

/// q of shape qs and k, v of S keys (H_kv = H or 1; shapes sometimes perturbed), in that
/// order from the input.
struct AttentionInputs {
  View<float, 4> q, k, v;
};
AttentionInputs attention_inputs(Fuzz& f, const Shape<4>& qs, std::int64_t S) {
  const Shape<4> ks = f.near(Shape<4>{qs[0], S, f.flag() ? qs[2] : 1, qs[3]});
  auto q = f.tensor<4>(qs);
  auto k = f.tensor<4>(ks);
  auto v = f.tensor<4>(f.near(ks));
  return {q, k, v};
}

/// Sliding-window / chunked attention with sinks, block-sparse attention over a (sometimes
/// corrupted) CSR block mask, and MoBA / VMoBA routing and execution.
void fuzz_structured(Fuzz& f) {
  switch (f.pick(0, 5)) {
    case 0:
      fuzz_neighborhood<1>(f);
      break;
    case 1:
      fuzz_neighborhood<2>(f);
      break;
    case 2:
      fuzz_neighborhood<3>(f);
      break;
    case 3: {  // sliding window: forward or decode over a cache
      attention::SlidingWindowConfig cfg;
      cfg.window = f.flag() ? f.pick(0, 9) : f.extent();
      cfg.chunk = f.flag() ? f.pick(0, 9) : f.extent();
      cfg.sinks = f.flag() ? f.pick(0, 4) : f.extent();
      cfg.causal = f.flag();
      if (f.flag()) cfg.scale = f.real();
      const attention::SlidingWindowAttention<float> sw(cfg);
      const auto qs = f.shape<4>();
      if (structured_work(qs, 4096) > kMaxWork) return;
      if (f.flag()) {
        attention::KVCache<float> cache(f.pick(1, 2), f.pick(1, 2), qs[3], f.pick(1, 12));
        cache.append(f.tensor<4>(f.near(Shape<4>{cache.batch(), f.pick(1, 8), cache.kv_heads(),
                                                 cache.head_dim()})),
                     f.tensor<4>(f.near(Shape<4>{cache.batch(), f.pick(1, 8), cache.kv_heads(),
                                                 cache.head_dim()})));
        auto q = f.tensor<4>(f.near(Shape<4>{cache.batch(), qs[1], cache.kv_heads(), qs[3]}));
        sw.decode(q, cache, f.output<4>(f.near(q.shape()), {q}));
        return;
      }
      const std::int64_t S = qs[1] >= 0 && qs[1] <= 64 ? qs[1] + f.pick(0, 3) : qs[1];  // S >= T
      auto [q, k, v] = attention_inputs(f, qs, S);
      std::vector<std::int64_t> lengths;
      if (f.flag())
        lengths = f.int_list(f.near(qs[0]), -1, std::clamp<std::int64_t>(k.extent(1), 0, 64) + 1);
      sw.forward(q, k, v, f.output<4>(f.near(qs), {q, k, v}), lengths);
      if (f.flag()) {  // counts, up to the largest sequences pairs() takes (closed form)
        const std::int64_t top = (std::int64_t(1) << 31) - 1;
        const std::int64_t Sp = f.flag() ? top - f.pick(0, 2) : f.near(S);
        const std::int64_t Tp = f.flag() ? Sp - f.pick(0, 2) : f.near(qs[1]);
        for (auto& len : lengths)
          if (f.flag()) len = Sp - f.pick(0, 3);
        (void)sw.pairs(f.near(qs[0]), Tp, Sp, lengths);
      }
      break;
    }
    case 4: {  // block-sparse
      attention::BlockSparseConfig cfg;
      cfg.causal = f.flag();
      if (f.flag()) cfg.scale = f.real();
      const attention::BlockSparseAttention<float> bs(cfg);
      const auto qs = f.shape<4>();
      if (structured_work(qs, 4096) > kMaxWork) return;
      const std::int64_t S = f.flag() ? qs[1] : f.extent();
      attention::BlockMask mask;
      mask.batch = f.near(qs[0]);
      mask.heads = f.flag() ? 1 : f.near(qs[2]);
      mask.num_queries = f.near(qs[1]);
      mask.num_keys = f.near(S);
      mask.query_block = f.flag() ? f.pick(1, 5) : f.extent();
      mask.key_block = f.flag() ? f.pick(1, 5) : f.extent();
      // A well-formed mask (random key blocks per row) when the sizes are small, then maybe
      // corrupted.
      const std::int64_t rows = std::clamp<std::int64_t>(mask.batch, 0, 8) *
                                std::clamp<std::int64_t>(mask.heads, 0, 8) *
                                std::clamp<std::int64_t>(mask.query_blocks(), 0, 64);
      const std::int64_t kb = std::clamp<std::int64_t>(mask.key_blocks(), 0, 64);
      mask.offsets.push_back(0);
      for (std::int64_t r = 0; r < std::min<std::int64_t>(rows, 512); ++r) {
        for (std::int64_t b = 0; b < kb; ++b)
          if (f.flag()) mask.indices.push_back(std::int32_t(b));
        mask.offsets.push_back(std::int64_t(mask.indices.size()));
      }
      if (f.byte() < 32 && !mask.indices.empty())
        mask.indices[std::size_t(f.pick(0, std::int64_t(mask.indices.size()) - 1))] =
            std::int32_t(f.offset());
      if (f.byte() < 32)
        mask.offsets[std::size_t(f.pick(0, std::int64_t(mask.offsets.size()) - 1))] = f.offset();
      if (f.flag()) (void)bs.pairs(mask, qs[2]);
      auto [q, k, v] = attention_inputs(f, qs, S);
      bs.forward(q, k, v, mask, f.output<4>(f.near(qs), {q, k, v}));
      break;
    }
    default: {  // MoBA / VMoBA: route, maybe corrupt the selection, execute
      attention::MobaAttentionConfig cfg;
      cfg.block_size = f.flag() ? f.pick(1, 6) : f.extent();
      cfg.top_k = f.flag() ? f.pick(1, 4) : f.extent();
      cfg.threshold = f.byte() < 64 ? f.real() : 0.0;
      cfg.causal = f.flag();
      if (f.flag()) cfg.scale = f.real();
      const attention::MobaAttention<float> moba(cfg);
      const auto qs = f.shape<4>();
      if (structured_work(qs, 4096) > kMaxWork) return;
      const std::int64_t S = f.flag() ? qs[1] : f.extent();
      auto [q, k, v] = attention_inputs(f, qs, S);
      auto out = f.output<4>(f.near(qs), {q, k, v});
      attention::MobaPartition part = moba.partition(k.extent(1));
      if (f.flag()) {  // a grid partition of S keys (sometimes not S)
        const int rank = int(f.pick(0, 3));
        part.extents.clear();
        part.block.clear();
        std::int64_t rest = std::clamp<std::int64_t>(k.extent(1), 0, 64);
        for (int a = 0; a < rank; ++a) {
          const std::int64_t e = a + 1 == rank ? rest : (rest > 0 && rest % 2 == 0 ? 2 : 1);
          part.extents.push_back(f.near(e));
          rest = e > 0 ? rest / e : rest;
          part.block.push_back(f.flag() ? f.pick(1, 3) : f.extent());
        }
      }
      attention::MobaSelection sel;
      moba.route(q, k, part, sel);
      if (f.byte() < 48 && !sel.blocks.empty())
        sel.blocks[std::size_t(f.pick(0, std::int64_t(sel.blocks.size()) - 1))] =
            std::int32_t(f.offset());
      if (f.byte() < 32 && !sel.offsets.empty())
        sel.offsets[std::size_t(f.pick(0, std::int64_t(sel.offsets.size()) - 1))] = f.offset();
      moba.execute(sel, part, q, k, v, out);
      break;
    }
  }
}

/// bf16 copies of a float view's elements (real tensors only; stride-0 views become one
/// element seen through stride 0).
template <int R>
View<bf16, R> to_bf16(View<float, R> v, std::deque<std::vector<bf16>>& keep) {
  bool real = true;  // a contiguous tensor, not a stride-0 view (which may claim any extents)
  for (int i = 0; i < R; ++i)
    real = real && v.extent(i) >= 0 && (v.stride(i) != 0 || v.extent(i) <= 1);
  auto& buf = keep.emplace_back();
  if (!real || v.numel() == 0) {
    buf.push_back(bf16::from_float(v.numel() ? *v.data() : 0.0f));
    return View<bf16, R>(buf.data(), v.shape(), Shape<R>{});
  }
  for (std::int64_t i = 0; i < v.numel(); ++i) buf.push_back(bf16::from_float(v.data()[i]));
  return View<bf16, R>(buf.data(), v.shape(), v.strides());
}

/// Soft MoE, Mixture-of-Depths, the MoE layer's packed weights, bf16 GEMM on every path the
/// build and CPU allow, RMSNorm and rotary embeddings.
void fuzz_more(Fuzz& f) {
  std::deque<std::vector<bf16>> keep;
  switch (f.pick(0, 5)) {
    case 0: {  // Soft MoE
      moe::SoftMoEConfig cfg;
      cfg.d_model = f.extent();
      cfg.d_ff = f.extent();
      cfg.num_experts = f.extent();
      cfg.slots_per_expert = f.flag() ? 1 : f.extent();
      cfg.activation = static_cast<moe::Activation>(f.pick(0, 3));
      cfg.normalize = f.flag();
      const moe::SoftMoELayer<float> layer(cfg);
      const std::int64_t E = cfg.num_experts, d = cfg.d_model, F = cfg.d_ff;
      const std::int64_t n = E * cfg.slots_per_expert;
      moe::SoftMoEWeights<float> w;
      w.phi = f.tensor<2>(f.near(Shape<2>{d, n}));
      w.experts.w1 = f.tensor<3>(f.near(Shape<3>{E, F, d}));
      w.experts.w2 = f.tensor<3>(f.near(Shape<3>{E, d, F}));
      if (cfg.activation == moe::Activation::swiglu)
        w.experts.w3 = f.tensor<3>(f.near(Shape<3>{E, F, d}));
      w.scale = f.value();
      auto x = f.tensor<3>(f.near(Shape<3>{f.extent(), f.extent(), d}));
      if (double(x.numel()) * double(n) * double(std::max<std::int64_t>(F, 1)) > kMaxWork) return;
      moe::SoftMoERouting<float> routing;
      layer.forward(x, w, f.output<3>(f.near(x.shape()), {x}), f.flag() ? &routing : nullptr);
      break;
    }
    case 1: {  // Mixture-of-Depths: route (expert choice or threshold) and apply a block
      moe::MixtureOfDepthsConfig cfg;
      cfg.capacity_fraction = f.flag() ? 0.5 : f.real();
      cfg.activation = static_cast<moe::ScoreActivation>(f.pick(0, 2));
      cfg.threshold = f.real();
      const moe::MixtureOfDepthsRouter<float> router(cfg);
      auto x = f.tensor<3>(f.shape<3>());
      auto scores = f.tensor<2>(f.near(Shape<2>{x.extent(0), x.extent(1)}));
      std::vector<std::int64_t> lengths;
      if (f.flag())
        lengths =
            f.int_list(f.near(x.extent(0)), -1, std::clamp<std::int64_t>(x.extent(1), 0, 64) + 1);
      auto plan =
          f.flag() ? router.route(scores, lengths) : router.route_threshold(scores, lengths);
      if (f.byte() < 32 && !plan.token_index.empty())
        plan.token_index[std::size_t(f.pick(0, std::int64_t(plan.token_index.size()) - 1))] =
            f.offset();
      // A ragged block that doubles its rows (any plan).
      const auto block = [](ConstView<float, 2> rows, std::span<const std::int64_t>,
                            View<float, 2> out) {
        for (std::int64_t i = 0; i < rows.extent(0); ++i)
          for (std::int64_t j = 0; j < rows.extent(1); ++j) out(i, j) = 2.0f * rows(i, j);
      };
      router.apply(plan, x, block, f.flag() ? x : f.output<3>(f.near(x.shape()), {x}));
      break;
    }
    case 2: {  // MoE layer with packed weights (sometimes packed from other weights)
      moe::MoELayerConfig cfg;
      cfg.d_model = f.extent();
      cfg.d_ff = f.extent();
      cfg.num_experts = f.extent();
      cfg.activation = static_cast<moe::Activation>(f.pick(0, 3));
      cfg.decode_max_tokens = f.flag() ? f.extent() : 0;
      const moe::MoELayer<float> layer(cfg);
      const std::int64_t E = cfg.num_experts, d = cfg.d_model, F = cfg.d_ff;
      moe::MoELayerWeights<float> w, other;
      for (auto* ws : {&w, &other}) {
        ws->experts.w1 = f.tensor<3>(f.near(Shape<3>{E, F, d}));
        ws->experts.w2 = f.tensor<3>(f.near(Shape<3>{E, d, F}));
        if (cfg.activation == moe::Activation::swiglu)
          ws->experts.w3 = f.tensor<3>(f.near(Shape<3>{E, F, d}));
      }
      const auto packed = layer.pack_weights(f.byte() < 32 ? other : w);
      const std::int64_t T = f.extent();
      auto x = f.tensor<2>(f.near(Shape<2>{T, d}));
      auto logits = f.tensor<2>(f.near(Shape<2>{T, E}));
      const auto plan =
          moe::TopKRouter<float>({.num_experts = E, .top_k = std::min<std::int64_t>(2, E)})
              .route(logits);
      layer.execute(plan, x, w, packed, f.output<2>(f.near(Shape<2>{T, d}), {x}));
      break;
    }
    case 3: {  // bf16 GEMM on a fuzzed path
      const Shape<2> as = f.shape<2>();
      const auto ta = f.flag() ? core::Trans::yes : core::Trans::no;
      const auto tb = f.flag() ? core::Trans::yes : core::Trans::no;
      const std::int64_t m = ta == core::Trans::no ? as[0] : as[1];
      const std::int64_t k = ta == core::Trans::no ? as[1] : as[0];
      const std::int64_t n = f.extent();
      auto a = to_bf16(f.tensor<2>(as), keep);
      auto b = to_bf16(f.tensor<2>(f.near(tb == core::Trans::no ? Shape<2>{k, n} : Shape<2>{n, k})),
                       keep);
      auto c = f.tensor<2>(f.near(Shape<2>{m, n}));
      const auto path = static_cast<core::Bf16Path>(f.pick(0, 2));
      core::gemm_bf16(a, ta, b, tb, c, f.flag() ? 0.0f : f.value(), path);
      break;
    }
    case 4: {  // RMSNorm, float or bf16 weights, in place or not
      const models::RMSNorm norm({.eps = f.flag() ? 1e-5 : f.real()});
      auto x = f.tensor<2>(f.shape<2>());
      auto weight = f.tensor<1>(f.near(Shape<1>{x.extent(1)}));
      auto y = f.flag() ? x : f.output<2>(f.near(x.shape()), {x});
      if (f.flag())
        norm.forward(c(x), c(weight), y);
      else
        norm.forward(c(x), ConstView<bf16, 1>(to_bf16(weight, keep)), y);
      break;
    }
    default: {  // rotary embeddings from a position
      const models::RotaryEmbedding rope({.head_dim = f.extent(),
                                          .theta = f.flag() ? 1e4 : f.real(),
                                          .max_positions = f.extent()});
      rope.apply(f.tensor<3>(f.shape<3>()), f.offset());
      break;
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  Fuzz f(data, size);
  set_num_threads(1 + static_cast<int>(f.pick(0, 2)));
  try {
    switch (f.pick(0, 14)) {
      case 0:
        fuzz_dense(f);
        break;
      case 1:
        fuzz_linear(f);
        break;
      case 2:
        fuzz_plan_executor(f);
        break;
      case 3:
        fuzz_routing(f);
        break;
      case 4:
        fuzz_bilevel(f);
        break;
      case 5:
        fuzz_moh(f);
        break;
      case 6:
        fuzz_routers(f);
        break;
      case 7:
        fuzz_moe_layer(f);
        break;
      case 8:
        fuzz_tokens(f);
        break;
      case 9:
        fuzz_decode(f);
        break;
      case 10:
        fuzz_misc(f);
        break;
      case 11:
        fuzz_selection(f);
        break;
      case 12:
        fuzz_structured(f);
        break;
      case 13:
        fuzz_core(f);
        break;
      default:
        fuzz_more(f);
        break;
    }
  } catch (const std::invalid_argument&) {  // shape_error, config_error: a clear rejection
  } catch (const switchyard::error&) {      // malformed plan or document
  }
  return 0;
}
