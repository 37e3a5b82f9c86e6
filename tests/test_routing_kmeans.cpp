// RoutingAttention (Routing Transformer k-means attention) against the shared
// fixtures from lucidrains/routing-transformer (windows as sets, buckets, dists,
// aux loss, outputs); one cluster with window = T against dense attention;
// causality of the executed plan; the seeded initialiser and the EMA update against
// naive loops; 1 vs 2 threads; every documented error. Per-cluster memory keys /
// values, query / key keep masks and the nearest_centroid selection against a naive
// double-precision port of the reference (ref_forward below, no fixture exists for
// them), a hand-computed case, and causality by construction of nearest_centroid.
// Incremental decoding (prefill / step) against a naive double reference of the
// nearest-centroid decode rule, with ties, empty clusters, ragged prompts and full
// capacities; prefill against stepping and against forward; threads; its errors.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstring>
#include <random>
#include <set>
#include <switchyard/attention/dense.hpp>
#include <switchyard/attention/routing_kmeans.hpp>
#include <tuple>

#include "support/fixtures.hpp"

using namespace switchyard;
using namespace switchyard::attention;
using Catch::Contains;

namespace {

// [B, H, L, D] contiguous, seen as [B, L, H, D].
template <class V>
auto as_bthd(V v) {
  const Shape<4> s = v.shape(), st = v.strides();
  return decltype(v)(v.data(), {s[0], s[2], s[1], s[3]}, {st[0], st[2], st[1], st[3]});
}

core::Tensor<float> random_tensor(Shape<4> shape, std::uint32_t seed) {
  core::Tensor<float> t(shape);
  std::mt19937 rng(seed);
  std::normal_distribution<float> n(0.0f, 1.0f);
  for (auto& x : t) x = n(rng);
  return t;
}

void check_fixture(const std::string& file, bool causal) {
  CAPTURE(file);
  const auto st = open_fixture(file);
  const auto q = as_bthd(st.view<float, 4>("q"));
  const auto v = as_bthd(st.view<float, 4>("v"));
  const auto want = as_bthd(st.view<float, 4>("out"));
  const auto means = st.tensor<float>("means");
  const auto indices = st.tensor<std::int64_t>("indices");
  const auto buckets = st.tensor<std::int64_t>("buckets");
  const auto dists = st.tensor<float>("dists");
  const double aux_want = st.tensor<float>("aux_loss").data()[0];
  const std::int64_t B = q.extent(0), T = q.extent(1), H = q.extent(2), D = q.extent(3);
  const std::int64_t C = 4, w = 64;

  const RoutingAttention<float> attn({.num_clusters = C, .window_size = w, .causal = causal});
  KMeansState<float> state(H, C, D);
  std::copy(means.begin(), means.end(), state.means.begin());
  state.initialised = true;

  const auto r = attn.route(q, {}, state);
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t h = 0; h < H; ++h) {
      for (std::int64_t c = 0; c < C; ++c) {
        std::set<std::int64_t> got, ref;
        for (std::int64_t i = 0; i < w; ++i) {
          got.insert(r.indices(b, h, c * w + i));
          ref.insert(indices(b, h, c * w + i));
        }
        CAPTURE(b, h, c);
        CHECK(got == ref);
      }
      for (std::int64_t t = 0; t < T; ++t) {
        CHECK(r.buckets(b, h, t) == buckets(b, h, t));
        for (std::int64_t c = 0; c < C; ++c)
          CHECK(std::abs(r.dists(b, h, c, t) - dists(b, h, t, c)) <= 1e-6);
      }
    }
  CHECK(std::abs(r.aux_loss - aux_want) <= 1e-5 * std::abs(aux_want));

  core::Tensor<float> out({B, T, H, D});
  const double aux = attn.forward(q, v, state, out);
  CHECK(aux == r.aux_loss);
  double err = 0, mx = 0;
  std::int64_t zero_rows = 0;
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t t = 0; t < T; ++t)
      for (std::int64_t h = 0; h < H; ++h) {
        bool zero = true;
        for (std::int64_t d = 0; d < D; ++d) {
          err = std::max(err, std::abs(double(out(b, t, h, d)) - double(want(b, t, h, d))));
          mx = std::max(mx, std::abs(double(want(b, t, h, d))));
          zero = zero && want(b, t, h, d) == 0.0f;
        }
        if (zero) {
          ++zero_rows;
          for (std::int64_t d = 0; d < D; ++d) REQUIRE(out(b, t, h, d) == 0.0f);
        }
      }
  INFO("max|ours - out| = " << err << ", max|out| = " << mx);
  CHECK(err <= 1e-5 * std::max(1.0, mx));
  CHECK(zero_rows > 0);
  WARN(file << ": max|ours - out| = " << err << " (max|out| " << mx << "), rows in no window "
            << zero_rows << ", aux " << r.aux_loss << " vs " << aux_want);
}

// ---------------------------------------------------------------------------
// Naive double-precision port of lucidrains/routing-transformer @3f6c461
// routing_transformer/routing_transformer.py, KmeansAttention.forward (eval mode,
// dropout 0), written from the reference's rules (line numbers of that file):
//   routing   Kmeans.forward: xn = normalize(x); dists = xn . means (l. 339-349);
//             top_window: `distribution` = top-w per cluster over ALL tokens
//             (l. 288-291), w = min(window, T) (l. 393-394); separate QK routes
//             q and k by one Kmeans call on cat(q, k) (l. 396-400).
//             nearest_centroid (ours): token -> argmax_c dists, ties to lower c.
//   keys      shared QK: normalize(q) (l. 403); separate: k as given.
//   memory    mem_key / mem_value [H, C, M, D] (l. 379-380) are PREPENDED to each
//             cluster's gathered keys / values (torch.cat((m_k, k), dim=3),
//             l. 414-415): not normalised (even with shared QK), scaled by
//             d^-0.5 like every logit (l. 417), always visible under the padding
//             and causal masks (F.pad(..., value=True), l. 429 and 436), never a
//             self pair (F.pad(..., value=False), l. 443).
//             M = max(num_mem_kv, 1 if causal and not shared_qk) (l. 378).
//   masks     key_mask defaults to query_mask (l. 390); pair (i, j) is kept iff
//             query_mask[i] and key_mask[j] (l. 428); masked logits are
//             max_neg_value = -FLT_MAX, finite (l. 419, 430): a row with every
//             logit masked softmaxes to a uniform average of its keys' values.
//   causal    key position > query position -> -FLT_MAX (l. 433-437), after the
//             padding mask.
//   self      shared QK: same position -> -5e4 (l. 440-444), after both masks,
//             so a masked query still sees itself.
//   output    scatter_mean: sum over windows / (count + 1e-5) (l. 85-88, 452);
//             nearest_centroid: the token's one cluster output.
struct RefConfig {
  std::int64_t C = 4, w = 16;
  bool causal = false, shared = true, nearest = false;
  std::int64_t M = 0;  // memory keys per cluster
};

template <class VQ, class VK, class VV>
std::vector<double> ref_forward(const RefConfig& rc, const VQ& q, const VK& k, const VV& v,
                                const core::Tensor<float>& means, const core::Tensor<float>* mem_k,
                                const core::Tensor<float>* mem_v,
                                const std::vector<std::uint8_t>& qmask,
                                const std::vector<std::uint8_t>& kmask) {
  const std::int64_t B = q.extent(0), T = q.extent(1), H = q.extent(2), D = q.extent(3);
  const std::int64_t S = rc.shared ? T : k.extent(1), C = rc.C;
  const double scale = 1.0 / std::sqrt(double(D));
  const double lowest = std::numeric_limits<double>::lowest();
  std::vector<double> out(std::size_t(B * T * H * D), 0.0);
  const auto normalized = [&](const auto& x, std::int64_t b, std::int64_t t, std::int64_t h) {
    std::vector<double> r(static_cast<std::size_t>(D));
    double n = 0;
    for (std::int64_t d = 0; d < D; ++d) n += double(x(b, t, h, d)) * double(x(b, t, h, d));
    n = std::max(std::sqrt(n), 1e-12);
    for (std::int64_t d = 0; d < D; ++d) r[std::size_t(d)] = double(x(b, t, h, d)) / n;
    return r;
  };
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t h = 0; h < H; ++h) {
      std::vector<std::vector<double>> xq, xk, keys;
      for (std::int64_t t = 0; t < T; ++t) xq.push_back(normalized(q, b, t, h));
      for (std::int64_t s = 0; s < S; ++s) {
        xk.push_back(rc.shared ? xq[std::size_t(s)] : normalized(k, b, s, h));
        std::vector<double> kr(static_cast<std::size_t>(D));
        for (std::int64_t d = 0; d < D; ++d)
          kr[std::size_t(d)] =
              rc.shared ? xq[std::size_t(s)][std::size_t(d)] : double(k(b, s, h, d));
        keys.push_back(kr);
      }
      const auto dist = [&](const std::vector<double>& x, std::int64_t c) {
        double r = 0;
        for (std::int64_t d = 0; d < D; ++d) r += x[std::size_t(d)] * double(means(h, c, d));
        return r;
      };
      // members[c]: the cluster's tokens (window order is irrelevant to the result)
      const auto clusters = [&](const std::vector<std::vector<double>>& x, std::int64_t n) {
        std::vector<std::vector<std::int64_t>> members(static_cast<std::size_t>(C));
        if (rc.nearest) {
          for (std::int64_t t = 0; t < n; ++t) {
            std::int64_t best = 0;
            for (std::int64_t c = 1; c < C; ++c)
              if (dist(x[std::size_t(t)], c) > dist(x[std::size_t(t)], best)) best = c;
            members[std::size_t(best)].push_back(t);
          }
        } else {
          for (std::int64_t c = 0; c < C; ++c) {
            std::vector<std::int64_t> order(static_cast<std::size_t>(n));
            for (std::int64_t t = 0; t < n; ++t) order[std::size_t(t)] = t;
            std::stable_sort(order.begin(), order.end(), [&](std::int64_t a, std::int64_t z) {
              return dist(x[std::size_t(a)], c) > dist(x[std::size_t(z)], c);
            });
            order.resize(std::size_t(std::min(rc.w, n)));
            members[std::size_t(c)] = order;
          }
        }
        return members;
      };
      const auto qwin = clusters(xq, T), kwin = clusters(xk, S);
      std::vector<double> acc(std::size_t(T * D), 0.0), cnt(std::size_t(T), 0.0);
      for (std::int64_t c = 0; c < C; ++c)
        for (const std::int64_t i : qwin[std::size_t(c)]) {
          std::vector<double> logit;
          std::vector<std::vector<double>> vrow;
          for (std::int64_t m = 0; m < rc.M; ++m) {
            double l = 0;
            std::vector<double> vr(static_cast<std::size_t>(D));
            for (std::int64_t d = 0; d < D; ++d) {
              l += double(q(b, i, h, d)) * double((*mem_k)(h, c, m, d));
              vr[std::size_t(d)] = double((*mem_v)(h, c, m, d));
            }
            logit.push_back(l * scale);
            vrow.push_back(vr);
          }
          for (const std::int64_t j : kwin[std::size_t(c)]) {
            double l = 0;
            std::vector<double> vr(static_cast<std::size_t>(D));
            for (std::int64_t d = 0; d < D; ++d) {
              l += double(q(b, i, h, d)) * keys[std::size_t(j)][std::size_t(d)];
              vr[std::size_t(d)] = double(v(b, j, h, d));
            }
            l *= scale;
            const bool qk = qmask.empty() || qmask[std::size_t(b * T + i)];
            const bool kk = kmask.empty() || kmask[std::size_t(b * S + j)];
            if (!(qk && kk)) l = lowest;
            if (rc.causal && j > i) l = lowest;
            if (rc.shared && j == i) l = -5e4;
            logit.push_back(l);
            vrow.push_back(vr);
          }
          if (logit.empty()) {  // nearest_centroid, separate QK: a cluster without keys
            cnt[std::size_t(i)] += 1;
            continue;
          }
          const double mx = *std::max_element(logit.begin(), logit.end());
          double z = 0;
          std::vector<double> o(static_cast<std::size_t>(D), 0.0);
          for (std::size_t j = 0; j < logit.size(); ++j) {
            const double p = std::exp(logit[j] - mx);
            z += p;
            for (std::int64_t d = 0; d < D; ++d) o[std::size_t(d)] += p * vrow[j][std::size_t(d)];
          }
          for (std::int64_t d = 0; d < D; ++d) acc[std::size_t(i * D + d)] += o[std::size_t(d)] / z;
          cnt[std::size_t(i)] += 1;
        }
      for (std::int64_t t = 0; t < T; ++t)
        for (std::int64_t d = 0; d < D; ++d) {
          const double den = rc.nearest ? 1.0 : cnt[std::size_t(t)] + 1e-5;
          out[std::size_t(((b * T + t) * H + h) * D + d)] = acc[std::size_t(t * D + d)] / den;
        }
    }
  return out;
}

std::vector<std::uint8_t> random_mask(std::int64_t n, std::uint32_t seed, double keep = 0.75) {
  std::mt19937 rng(seed);
  std::bernoulli_distribution bern(keep);
  std::vector<std::uint8_t> m(static_cast<std::size_t>(n));
  for (auto& x : m) x = bern(rng) ? 1 : 0;
  return m;
}

// max |ours - ref| / max(1, max |ref|)
template <class O>
double rel_error(const O& out, const std::vector<double>& ref) {
  double err = 0, mx = 0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    err = std::max(err, std::abs(double(out.data()[i]) - ref[i]));
    mx = std::max(mx, std::abs(ref[i]));
  }
  return err / std::max(1.0, mx);
}

// Runs RoutingAttention<float> and the naive reference on random inputs.
double compare_with_ref(RoutingAttentionConfig cfg, std::int64_t S, bool with_masks,
                        std::uint32_t seed, bool separate_key_mask = false) {
  const std::int64_t B = 2, T = 48, H = 2, D = 16;
  if (cfg.shared_qk) S = T;
  const auto q = random_tensor({B, T, H, D}, seed);
  const auto k = random_tensor({B, S, H, D}, seed + 1);
  const auto v = random_tensor({B, S, H, D}, seed + 2);
  const RoutingAttention<float> attn(cfg);
  const auto state = attn.init_state(q, cfg.shared_qk ? ConstView<float, 4>{} : k, seed + 3);
  const std::int64_t C = state.means.extent(1), M = attn.memory_kv();
  const auto mem_k = random_tensor({H, C, std::max<std::int64_t>(M, 1), D}, seed + 4);
  const auto mem_v = random_tensor({H, C, std::max<std::int64_t>(M, 1), D}, seed + 5);
  RoutingExtras<float> ex;
  if (M > 0) {
    ex.mem_key = mem_k;
    ex.mem_value = mem_v;
  }
  std::vector<std::uint8_t> qm, km;
  if (with_masks) {
    qm = random_mask(B * T, seed + 6);
    km = separate_key_mask ? random_mask(B * S, seed + 7, 0.5) : qm;
    ex.query_mask = qm;
    if (separate_key_mask) ex.key_mask = km;
  }
  core::Tensor<float> out({B, T, H, D});
  if (cfg.shared_qk) {
    attn.forward(q, v, state, out, ex);
  } else {
    attn.forward(q, k, v, state, out, ex);
  }
  const RefConfig rc{.C = C,
                     .w = cfg.window_size,
                     .causal = cfg.causal,
                     .shared = cfg.shared_qk,
                     .nearest = cfg.selection == RoutingSelection::nearest_centroid,
                     .M = M};
  const auto ref = ref_forward(rc, q, k, v, state.means, &mem_k, &mem_v, qm, km);
  return rel_error(out, ref);
}

}  // namespace

TEST_CASE("routing attention matches the fixture, non-causal", "[routing][fixture]") {
  check_fixture("rt_kmeans_shared_b2_T256_h2_d32_c4_w64_noncausal.safetensors", false);
}

TEST_CASE("routing attention matches the fixture, causal", "[routing][fixture]") {
  check_fixture("rt_kmeans_shared_b2_T256_h2_d32_c4_w64_causal.safetensors", true);
}

TEST_CASE("one cluster with window = T equals dense attention", "[routing][dense]") {
  const std::int64_t B = 2, T = 70, H = 3, D = 16;
  const auto q = random_tensor({B, T, H, D}, 1);
  const auto k = random_tensor({B, T, H, D}, 2);
  const auto v = random_tensor({B, T, H, D}, 3);
  // Causal separate QK has one memory key/value (the reference's rule): dense
  // attention over [memory; keys] with CausalMask{offset = 1} is the same thing.
  const auto mk = random_tensor({H, 1, 1, D}, 4);
  const auto mv = random_tensor({H, 1, 1, D}, 5);
  core::Tensor<float> kc({B, T + 1, H, D}), vc({B, T + 1, H, D});
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t t = 0; t <= T; ++t)
      for (std::int64_t h = 0; h < H; ++h)
        for (std::int64_t d = 0; d < D; ++d) {
          kc(b, t, h, d) = t == 0 ? mk(h, 0, 0, d) : k(b, t - 1, h, d);
          vc(b, t, h, d) = t == 0 ? mv(h, 0, 0, d) : v(b, t - 1, h, d);
        }
  for (const bool causal : {false, true}) {
    CAPTURE(causal);
    const RoutingAttention<float> attn(
        {.num_clusters = 1, .window_size = T, .causal = causal, .shared_qk = false});
    REQUIRE(attn.memory_kv() == (causal ? 1 : 0));
    const auto state = attn.init_state(q, k, 5);
    core::Tensor<float> out({B, T, H, D});
    RoutingExtras<float> ex;
    if (causal) ex.mem_key = mk, ex.mem_value = mv;
    attn.forward(q, k, v, state, out, ex);
    const auto dense = causal ? DenseAttention<float>().forward(q, kc, vc, CausalMask{1})
                              : DenseAttention<float>().forward(q, k, v);
    double err = 0;
    for (std::int64_t i = 0; i < out.numel(); ++i)
      err = std::max(err, std::abs(double(out.data()[i]) - double(dense.data()[i]) / (1 + 1e-5)));
    CHECK(err <= 2e-6);
  }
}

TEST_CASE("causal routing: a future token never changes an earlier output", "[routing][causal]") {
  const std::int64_t B = 1, T = 96, H = 2, D = 16;
  auto q = random_tensor({B, T, H, D}, 7);
  auto v = random_tensor({B, T, H, D}, 8);
  const RoutingAttention<float> attn({.num_clusters = 4, .window_size = 32, .causal = true});
  const auto state = attn.init_state(q, {}, 3);
  // Windows are chosen from all tokens (as in the reference), so the property holds
  // for a fixed routing plan: execute the same plan on perturbed future tokens.
  const auto r = attn.route(q, {}, state);
  core::Tensor<float> kn(q.shape());
  for (std::int64_t t = 0; t < T; ++t)
    for (std::int64_t h = 0; h < H; ++h) {
      double n = 0;
      for (std::int64_t d = 0; d < D; ++d) n += double(q(0, t, h, d)) * q(0, t, h, d);
      for (std::int64_t d = 0; d < D; ++d) kn(0, t, h, d) = float(q(0, t, h, d) / std::sqrt(n));
    }
  core::Tensor<float> o1(q.shape()), o2(q.shape());
  attn.execute(r.plan, q, kn, v, o1);
  const std::int64_t t0 = 50;
  for (std::int64_t t = t0; t < T; ++t)
    for (std::int64_t h = 0; h < H; ++h)
      for (std::int64_t d = 0; d < D; ++d) {
        q(0, t, h, d) += 3.0f;
        kn(0, t, h, d) -= 1.0f;
        v(0, t, h, d) *= -5.0f;
      }
  attn.execute(r.plan, q, kn, v, o2);
  for (std::int64_t t = 0; t < t0; ++t)
    for (std::int64_t h = 0; h < H; ++h)
      REQUIRE(std::memcmp(&o1(0, t, h, 0), &o2(0, t, h, 0), sizeof(float) * D) == 0);
  // With every token in every window, the whole layer is causal (up to rounding: the
  // order of keys inside a window follows their similarity, so sums may reorder).
  auto q2 = random_tensor({B, T, H, D}, 9);
  const RoutingAttention<float> all({.num_clusters = 3, .window_size = T, .causal = true});
  const auto s2 = all.init_state(q2, {}, 4);
  const auto a = all.forward(q2, v, s2);
  for (std::int64_t d = 0; d < D; ++d) q2(0, T - 1, 1, d) = 7.0f;
  const auto b = all.forward(q2, v, s2);
  double diff = 0;
  for (std::int64_t t = 0; t + 1 < T; ++t)
    for (std::int64_t h = 0; h < H; ++h)
      for (std::int64_t d = 0; d < D; ++d)
        diff = std::max(diff, std::abs(double(a(0, t, h, d)) - double(b(0, t, h, d))));
  CHECK(diff <= 1e-6);
}

TEST_CASE("memory keys/values: a hand-computed case", "[routing][memory]") {
  // T = 2, D = 1, one cluster holding both tokens, scale 1, separate QK, causal, so
  // one memory key (0) / value (10) is added automatically (M = 1):
  //   q = (1, 1), k = (0, ln 3), v = (2, 4)
  //   token 0 sees [mem, k0]     logits (0, 0)         -> (10 + 2) / 2          = 6
  //   token 1 sees [mem, k0, k1] logits (0, 0, ln 3)   -> (10 + 2 + 3 * 4) / 5  = 4.8
  // each divided by (1 + 1e-5) (scatter_mean of one window).
  core::Tensor<double> q({1, 2, 1, 1}), k({1, 2, 1, 1}), v({1, 2, 1, 1});
  q(0, 0, 0, 0) = 1, q(0, 1, 0, 0) = 1;
  k(0, 0, 0, 0) = 0, k(0, 1, 0, 0) = std::log(3.0);
  v(0, 0, 0, 0) = 2, v(0, 1, 0, 0) = 4;
  core::Tensor<double> mk({1, 1, 1, 1}), mv({1, 1, 1, 1});
  mk(0, 0, 0, 0) = 0, mv(0, 0, 0, 0) = 10;
  const RoutingAttention<double> attn(
      {.num_clusters = 1, .window_size = 2, .causal = true, .shared_qk = false, .scale = 1.0});
  KMeansState<double> st(1, 1, 1);
  st.means(0, 0, 0) = 1;
  st.initialised = true;
  core::Tensor<double> out({1, 2, 1, 1});
  attn.forward(q, k, v, st, out, {.mem_key = mk, .mem_value = mv});
  CHECK(out(0, 0, 0, 0) == Approx(6.0 / (1 + 1e-5)).epsilon(1e-14));
  CHECK(out(0, 1, 0, 0) == Approx(4.8 / (1 + 1e-5)).epsilon(1e-14));
  // A masked key 0 (key_mask) leaves token 0 only the memory: 10; token 1 sees
  // [mem, k1] with logits (0, ln 3): (10 + 3 * 4) / 4 = 5.5.
  const std::vector<std::uint8_t> keep_q{1, 1}, keep_k{0, 1};
  attn.forward(q, k, v, st, out,
               {.mem_key = mk, .mem_value = mv, .query_mask = keep_q, .key_mask = keep_k});
  CHECK(out(0, 0, 0, 0) == Approx(10.0 / (1 + 1e-5)).epsilon(1e-14));
  CHECK(out(0, 1, 0, 0) == Approx(5.5 / (1 + 1e-5)).epsilon(1e-14));
}

TEST_CASE("memory keys/values match the naive reference", "[routing][memory]") {
  for (const std::uint32_t seed : {11u, 12u}) {
    CAPTURE(seed);
    // Separate QK, causal: M = max(0, 1) = 1 automatically, and M = 3 explicitly.
    for (const std::int64_t M : {0, 3}) {
      CAPTURE(M);
      const double e = compare_with_ref({.num_clusters = 4,
                                         .window_size = 16,
                                         .causal = true,
                                         .shared_qk = false,
                                         .num_mem_kv = M},
                                        48, false, seed);
      WARN("separate QK causal, num_mem_kv " << M << ": rel err " << e);
      CHECK(e <= 1e-5);
    }
    // Separate QK, non-causal, S != T, memory requested; shared QK with memory
    // (not normalised, never a self pair), causal and not.
    CHECK(compare_with_ref(
              {.num_clusters = 3, .window_size = 20, .shared_qk = false, .num_mem_kv = 2}, 40,
              false, seed) <= 1e-5);
    for (const bool causal : {false, true})
      CHECK(compare_with_ref(
                {.num_clusters = 4, .window_size = 16, .causal = causal, .num_mem_kv = 2}, 48,
                false, seed) <= 1e-5);
  }
}

TEST_CASE("query/key keep masks match the naive reference", "[routing][masks]") {
  for (const std::uint32_t seed : {21u, 22u}) {
    CAPTURE(seed);
    for (const bool causal : {false, true}) {
      CAPTURE(causal);
      // shared QK (a masked query still sees itself at -5e4)
      CHECK(compare_with_ref({.num_clusters = 4, .window_size = 16, .causal = causal}, 48, true,
                             seed) <= 1e-5);
      CHECK(compare_with_ref({.num_clusters = 4, .window_size = 16, .causal = causal}, 48, true,
                             seed, true) <= 1e-5);
      // separate QK (causal: with its memory key)
      const double e = compare_with_ref(
          {.num_clusters = 4, .window_size = 16, .causal = causal, .shared_qk = false}, 48, true,
          seed, true);
      WARN("separate QK masks, causal " << causal << ": rel err " << e);
      CHECK(e <= 1e-5);
    }
    // Separate QK without memory, half the keys masked: rows whose every key is masked
    // average their window's values uniformly (finite -FLT_MAX mask, as the reference).
    CHECK(compare_with_ref({.num_clusters = 4, .window_size = 6, .shared_qk = false}, 48, true,
                           seed, true) <= 1e-5);
  }
  // Shared QK, no memory: a masked query sees only itself, so its output is v_i times
  // count / (count + 1e-5).
  const std::int64_t B = 1, T = 40, H = 1, D = 8;
  const auto q = random_tensor({B, T, H, D}, 5);
  const auto v = random_tensor({B, T, H, D}, 6);
  const RoutingAttention<float> attn({.num_clusters = 4, .window_size = 12});
  const auto st = attn.init_state(q, {}, 1);
  const auto keep = random_mask(T, 9, 0.5);
  core::Tensor<float> out({B, T, H, D});
  attn.forward(q, v, st, out, {.query_mask = keep});
  const auto r = attn.route(q, {}, st);
  for (std::int64_t t = 0; t < T; ++t) {
    if (keep[std::size_t(t)]) continue;
    double cnt = 0;
    for (std::int64_t i = 0; i < r.indices.extent(2); ++i) cnt += r.indices(0, 0, i) == t;
    for (std::int64_t d = 0; d < D; ++d)
      CHECK(out(0, t, 0, d) == Approx(v(0, t, 0, d) * cnt / (cnt + 1e-5)).epsilon(1e-6));
  }
}

TEST_CASE("nearest_centroid selection matches the naive reference", "[routing][nearest]") {
  const auto nc = RoutingSelection::nearest_centroid;
  for (const std::uint32_t seed : {31u, 32u}) {
    CAPTURE(seed);
    for (const bool causal : {false, true}) {
      CAPTURE(causal);
      const double e =
          compare_with_ref({.num_clusters = 4, .causal = causal, .selection = nc}, 48, false, seed);
      WARN("nearest_centroid shared QK, causal " << causal << ": rel err " << e);
      CHECK(e <= 1e-5);
      CHECK(compare_with_ref(
                {.num_clusters = 4, .causal = causal, .shared_qk = false, .selection = nc}, 48,
                false, seed) <= 1e-5);
      CHECK(
          compare_with_ref({.num_clusters = 3, .causal = causal, .num_mem_kv = 2, .selection = nc},
                           48, true, seed) <= 1e-5);
    }
    CHECK(compare_with_ref({.num_clusters = 5, .shared_qk = false, .selection = nc}, 30, true, seed,
                           true) <= 1e-5);
  }
  // Every token lies in exactly one cluster of the plan.
  const auto q = random_tensor({2, 33, 2, 8}, 3);
  const RoutingAttention<float> attn({.num_clusters = 4, .selection = nc});
  const auto r = attn.route(q, {}, attn.init_state(q, {}, 2));
  CHECK(r.plan.output == PlanOutput::write);
  CHECK_NOTHROW(r.plan.check());
  CHECK(std::int64_t(r.plan.query_index.size()) == 2 * 2 * 33);
}

TEST_CASE("nearest_centroid + causal: a future token never changes an earlier output",
          "[routing][nearest][causal]") {
  const std::int64_t B = 2, T = 80, H = 2, D = 16;
  bool top_window_changed = false;
  for (const std::uint32_t seed : {41u, 42u, 43u, 44u}) {
    std::mt19937 rng(seed);
    for (const bool shared : {true, false}) {
      CAPTURE(seed, shared);
      auto q = random_tensor({B, T, H, D}, seed);
      auto k = random_tensor({B, T, H, D}, seed + 100);
      auto v = random_tensor({B, T, H, D}, seed + 200);
      const auto mk = random_tensor({H, 5, 1, D}, seed + 300);
      const auto mv = random_tensor({H, 5, 1, D}, seed + 400);
      RoutingAttentionConfig cfg{.num_clusters = 5,
                                 .window_size = 16,
                                 .causal = true,
                                 .shared_qk = shared,
                                 .selection = RoutingSelection::nearest_centroid};
      const RoutingAttention<float> attn(cfg);
      cfg.selection = RoutingSelection::top_window;
      const RoutingAttention<float> topw(cfg);
      const auto st = attn.init_state(q, shared ? ConstView<float, 4>{} : k, seed);
      RoutingExtras<float> ex;
      if (!shared) ex.mem_key = mk, ex.mem_value = mv;
      const auto run = [&](const RoutingAttention<float>& a, core::Tensor<float>& out) {
        if (shared) {
          a.forward(q, v, st, out, ex);
        } else {
          a.forward(q, k, v, st, out, ex);
        }
      };
      core::Tensor<float> o1({B, T, H, D}), o2({B, T, H, D}), t1({B, T, H, D}), t2({B, T, H, D});
      // one random future token, then every token from a random position on
      std::normal_distribution<float> n(0.0f, 3.0f);
      const std::int64_t p = 1 + std::int64_t(rng() % std::uint32_t(T - 1));
      const std::int64_t from = 1 + std::int64_t(rng() % std::uint32_t(T - 1));
      for (const auto& [lo, hi] : {std::pair{p, p + 1}, std::pair{from, T}}) {
        CAPTURE(lo, hi);
        run(attn, o1);
        run(topw, t1);
        for (std::int64_t b = 0; b < B; ++b)
          for (std::int64_t t = lo; t < hi; ++t)
            for (std::int64_t h = 0; h < H; ++h)
              for (std::int64_t d = 0; d < D; ++d) {
                q(b, t, h, d) = n(rng);
                k(b, t, h, d) = n(rng);
                v(b, t, h, d) = n(rng);
              }
        run(attn, o2);
        run(topw, t2);
        for (std::int64_t b = 0; b < B; ++b)
          for (std::int64_t t = 0; t < lo; ++t)
            for (std::int64_t h = 0; h < H; ++h) {
              REQUIRE(std::memcmp(&o1(b, t, h, 0), &o2(b, t, h, 0), sizeof(float) * D) == 0);
              top_window_changed =
                  top_window_changed ||
                  std::memcmp(&t1(b, t, h, 0), &t2(b, t, h, 0), sizeof(float) * D) != 0;
            }
      }
    }
  }
  // The reference's top_window selection is not causal by construction.
  CHECK(top_window_changed);
}

TEST_CASE("seeded initialiser and EMA update", "[routing][kmeans]") {
  const std::int64_t B = 2, T = 50, H = 2, D = 8;
  const auto q = random_tensor({B, T, H, D}, 21);
  const RoutingAttention<float> attn({.num_clusters = 5, .window_size = 10});
  const auto s1 = attn.init_state(q, {}, 9);
  const auto s2 = attn.init_state(q, {}, 9);
  REQUIRE(s1.initialised);
  REQUIRE(std::memcmp(s1.means.data(), s2.means.data(), sizeof(float) * 5 * H * D) == 0);
  for (std::int64_t h = 0; h < H; ++h)
    for (std::int64_t c = 0; c < 5; ++c) {
      double n = 0;
      for (std::int64_t d = 0; d < D; ++d) n += double(s1.means(h, c, d)) * s1.means(h, c, d);
      CHECK(std::sqrt(n) == Approx(1.0).epsilon(1e-5));
    }
  // EMA step against naive loops.
  auto st = s1;
  attn.update_centroids(st, q);
  for (std::int64_t h = 0; h < H; ++h) {
    std::vector<double> sum(std::size_t(5 * D), 0.0);
    std::vector<int> cnt(5, 0);
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t t = 0; t < T; ++t) {
        std::vector<double> x(static_cast<std::size_t>(D));
        double n = 0;
        for (std::int64_t d = 0; d < D; ++d) n += double(q(b, t, h, d)) * q(b, t, h, d);
        for (std::int64_t d = 0; d < D; ++d) x[std::size_t(d)] = q(b, t, h, d) / std::sqrt(n);
        int best = 0;
        double bv = -1e300;
        for (int c = 0; c < 5; ++c) {
          double s = 0;
          for (std::int64_t d = 0; d < D; ++d) s += x[std::size_t(d)] * s1.means(h, c, d);
          if (s > bv) bv = s, best = c;
        }
        ++cnt[std::size_t(best)];
        for (std::int64_t d = 0; d < D; ++d) sum[std::size_t(best * D + d)] += x[std::size_t(d)];
      }
    for (int c = 0; c < 5; ++c) {
      double n = 0;
      for (std::int64_t d = 0; d < D; ++d)
        n += sum[std::size_t(c * D + d)] * sum[std::size_t(c * D + d)];
      for (std::int64_t d = 0; d < D; ++d) {
        const double nw = cnt[std::size_t(c)] ? sum[std::size_t(c * D + d)] / std::sqrt(n)
                                              : double(s1.means(h, c, d));
        const double want = 0.999 * s1.means(h, c, d) + 0.001 * nw;
        CHECK(std::abs(st.means(h, c, d) - want) <= 1e-6);
      }
    }
  }
}

TEST_CASE("routing attention: 1 and 2 threads are bit-identical", "[routing][threads]") {
  const std::int64_t B = 2, T = 256, H = 4, D = 32;
  const auto q = random_tensor({B, T, H, D}, 31);
  const auto v = random_tensor({B, T, H, D}, 32);
  const auto keep = random_mask(B * T, 33);
  for (const auto sel : {RoutingSelection::top_window, RoutingSelection::nearest_centroid}) {
    CAPTURE(int(sel));
    const RoutingAttention<float> attn(
        {.window_size = 24, .causal = true, .num_mem_kv = 1, .selection = sel});
    const auto st = attn.init_state(q, {}, 1);
    const auto mk = random_tensor({H, st.means.extent(1), 1, D}, 34);
    const RoutingExtras<float> ex{.mem_key = mk, .mem_value = mk, .query_mask = keep};
    core::Tensor<float> o1(q.shape()), o2(q.shape());
    double l1, l2;
    {
      ScopedNumThreads t(1);
      l1 = attn.forward(q, v, st, o1, ex);
    }
    {
      ScopedNumThreads t(2);
      l2 = attn.forward(q, v, st, o2, ex);
    }
    CHECK(l1 == l2);
    CHECK(std::memcmp(o1.data(), o2.data(), sizeof(float) * std::size_t(o1.numel())) == 0);
  }
}

TEST_CASE("routing attention errors name the layer, argument and shapes", "[routing][errors]") {
  REQUIRE_THROWS_WITH(RoutingAttention<float>({.window_size = 0}),
                      Contains("RoutingAttention::RoutingAttention") &&
                          Contains("'window_size' = 0") && Contains(">= 1"));
  REQUIRE_THROWS_AS(RoutingAttention<float>({.window_size = 0}), config_error);
  const std::int64_t B = 1, T = 16, H = 2, D = 8;
  const auto q = random_tensor({B, T, H, D}, 1);
  core::Tensor<float> out({B, T, H, D});
  {
    const RoutingAttention<float> attn({.num_clusters = 17, .window_size = 4});
    KMeansState<float> st(H, 17, D);
    st.initialised = true;
    REQUIRE_THROWS_WITH(attn.forward(q, q, st, out), Contains("RoutingAttention::route") &&
                                                         Contains("'num_clusters' = 17") &&
                                                         Contains("T = 16"));
    REQUIRE_THROWS_AS(attn.forward(q, q, st, out), config_error);
  }
  const RoutingAttention<float> attn({.num_clusters = 4, .window_size = 4});
  {
    KMeansState<float> st(H, 3, D);
    st.initialised = true;
    REQUIRE_THROWS_WITH(attn.forward(q, q, st, out),
                        Contains("RoutingAttention::route") && Contains("'state.means'") &&
                            Contains("[H=2, C=3, D=8]") && Contains("[H=2, C=4, D=8]"));
    REQUIRE_THROWS_AS(attn.forward(q, q, st, out), shape_error);
  }
  {
    KMeansState<float> st(H, 4, D);
    REQUIRE_THROWS_WITH(attn.forward(q, q, st, out), Contains("RoutingAttention::route") &&
                                                         Contains("'state'") &&
                                                         Contains("uninitialised"));
    REQUIRE_THROWS_WITH(attn.update_centroids(st, q),
                        Contains("RoutingAttention::update_centroids") && Contains("'state'"));
  }
  {
    auto st = attn.init_state(q, {}, 1);
    core::Tensor<float> bad({B, T, H, D + 1});
    REQUIRE_THROWS_WITH(attn.forward(q, q, st, bad), Contains("RoutingAttention::forward") &&
                                                         Contains("'out'") && Contains("D=9"));
    auto qn = q;
    qn(0, 3, 1, 2) = std::numeric_limits<float>::quiet_NaN();
    REQUIRE_THROWS_WITH(attn.forward(qn, q, st, out),
                        Contains("RoutingAttention::route") && Contains("'q' = NaN"));
  }
  REQUIRE_THROWS_WITH(RoutingAttention<float>({.num_mem_kv = -1}),
                      Contains("'num_mem_kv' = -1") && Contains(">= 0"));
  {
    // memory: missing when required (causal, separate QK), wrong shapes, given when
    // not used
    const RoutingAttention<float> sep(
        {.num_clusters = 4, .window_size = 4, .causal = true, .shared_qk = false});
    const auto st = sep.init_state(q, q, 1);
    const auto mk = random_tensor({H, 4, 1, D}, 2);
    const auto bad = random_tensor({H, 3, 1, D}, 2);
    REQUIRE_THROWS_WITH(sep.forward(q, q, q, st, out), Contains("RoutingAttention::forward") &&
                                                           Contains("'mem_key' = missing") &&
                                                           Contains("M=1"));
    REQUIRE_THROWS_AS(sep.forward(q, q, q, st, out), config_error);
    REQUIRE_THROWS_WITH(sep.forward(q, q, q, st, out, {.mem_key = mk}),
                        Contains("'mem_value' = missing"));
    REQUIRE_THROWS_WITH(sep.forward(q, q, q, st, out, {.mem_key = bad, .mem_value = mk}),
                        Contains("RoutingAttention::forward") && Contains("'mem_key'") &&
                            Contains("C=3") && Contains("[H=2, C=4, M=1, D=8]"));
    REQUIRE_THROWS_AS(sep.forward(q, q, q, st, out, {.mem_key = bad, .mem_value = mk}),
                      shape_error);
    REQUIRE_THROWS_WITH(sep.forward(q, q, q, st, out, {.mem_key = mk, .mem_value = bad}),
                        Contains("'mem_value'") && Contains("C=3"));
    REQUIRE_THROWS_AS(sep.forward(q, q, q, st, out, {.mem_key = mk, .mem_value = bad}),
                      shape_error);
    const auto st2 = attn.init_state(q, {}, 1);
    REQUIRE_THROWS_WITH(attn.forward(q, q, st2, out, {.mem_key = mk, .mem_value = mk}),
                        Contains("'mem_key' = given") && Contains("memory_kv() = 0"));
    REQUIRE_THROWS_AS(attn.forward(q, q, st2, out, {.mem_key = mk, .mem_value = mk}), config_error);
    // masks: wrong sizes; key_mask defaulting to a query_mask of another length
    const std::vector<std::uint8_t> m15(15, 1), m16(16, 1), m12(12, 1);
    REQUIRE_THROWS_WITH(attn.forward(q, q, st2, out, {.query_mask = m15}),
                        Contains("RoutingAttention::forward") && Contains("'query_mask'") &&
                            Contains("[15 entries]") && Contains("16 entries"));
    REQUIRE_THROWS_AS(attn.forward(q, q, st2, out, {.query_mask = m15}), shape_error);
    REQUIRE_THROWS_WITH(attn.forward(q, q, st2, out, {.query_mask = m16, .key_mask = m15}),
                        Contains("'key_mask'") && Contains("[15 entries]"));
    const RoutingAttention<float> nc({.num_clusters = 4, .window_size = 4, .shared_qk = false});
    const auto k12 = random_tensor({B, 12, H, D}, 3);
    const auto st3 = nc.init_state(q, k12, 1);
    REQUIRE_THROWS_WITH(nc.forward(q, k12, k12, st3, out, {.query_mask = m16}),
                        Contains("'key_mask'") && Contains("defaults to query_mask"));
    REQUIRE_THROWS_AS(nc.forward(q, k12, k12, st3, out, {.query_mask = m16}), shape_error);
    CHECK_NOTHROW(nc.forward(q, k12, k12, st3, out, {.query_mask = m16, .key_mask = m12}));
  }
}

TEST_CASE("window selection equals core::topk, ties toward the lower index", "[routing][topk]") {
  std::mt19937 rng(3);
  std::vector<std::pair<float, std::int64_t>> scratch;
  for (const std::int64_t n : {1, 5, 64, 300, 2000})
    for (const std::int64_t k : {std::int64_t(1), std::min<std::int64_t>(n, 7), n / 2 + 1, n}) {
      core::Tensor<float> x({1, n});
      for (auto& v : x) v = float(int(rng() % 9));  // many ties
      const auto want = core::topk<float>(x, k);
      std::vector<std::int64_t> got(static_cast<std::size_t>(k));
      attention::detail::top_window(x.data(), n, k, got.data(), scratch);
      CAPTURE(n, k);
      for (std::int64_t i = 0; i < k; ++i) REQUIRE(got[std::size_t(i)] == want.indices(0, i));
    }
}

// ---------------------------------------------------------------------------
// Incremental decoding (prefill / step, routing_decode.hpp) against a naive double-precision
// reference written from the rules alone: per sequence, token t's key joins
// argmax_c means[h, c] . normalize(key_t) (explicit argmax, ties toward the lower c), its
// query picks argmax_c means[h, c] . normalize(q_t) (shared QK: the same), and it attends
// with a two-pass softmax to that cluster's memory and to the keys of positions <= t in that
// cluster (shared QK: keys normalize(q), its own key at self_value). No key and no memory:
// zeros.
namespace {

struct DecodeRefConfig {
  bool shared = true;
  std::int64_t M = 0;  // memory keys per cluster
  double scale = 0;    // 0: D^-0.5
  double self_value = -5e4;
};

struct DecodeRef {
  std::vector<double> out;                 // [T, H, D]
  std::vector<std::int64_t> key_clusters;  // [H, T]
  std::int64_t empty_rows = 0;             // queries whose cluster had nothing to attend to
};

// Sequence b of q, k, v [B, *, H, D] (any T), its first T tokens; means [H, C, D];
// mem_k / mem_v [H, C, M, D].
template <class V, class W>
DecodeRef ref_decode(const DecodeRefConfig& rc, const V& q, const V& k, const V& v, std::int64_t b,
                     std::int64_t T, const W& means, const W* mem_k, const W* mem_v) {
  const std::int64_t H = q.extent(2), D = q.extent(3), C = means.extent(1);
  const double scale = rc.scale > 0 ? rc.scale : 1.0 / std::sqrt(double(D));
  DecodeRef r;
  r.out.assign(std::size_t(T * H * D), 0.0);
  r.key_clusters.assign(std::size_t(H * T), 0);
  const auto normalized = [&](const V& x, std::int64_t t, std::int64_t h) {
    std::vector<double> n(static_cast<std::size_t>(D));
    double ss = 0;
    for (std::int64_t d = 0; d < D; ++d) ss += double(x(b, t, h, d)) * double(x(b, t, h, d));
    const double inv = 1.0 / std::max(std::sqrt(ss), 1e-12);
    for (std::int64_t d = 0; d < D; ++d) n[std::size_t(d)] = double(x(b, t, h, d)) * inv;
    return n;
  };
  const auto nearest = [&](const std::vector<double>& x, std::int64_t h) {
    std::vector<double> dots(static_cast<std::size_t>(C), 0.0);
    for (std::int64_t c = 0; c < C; ++c)
      for (std::int64_t d = 0; d < D; ++d)
        dots[std::size_t(c)] += x[std::size_t(d)] * double(means(h, c, d));
    std::int64_t best = 0;
    for (std::int64_t c = 1; c < C; ++c)
      if (dots[std::size_t(c)] > dots[std::size_t(best)]) best = c;
    return best;
  };
  for (std::int64_t h = 0; h < H; ++h) {
    std::vector<std::vector<double>> keys;
    std::vector<std::int64_t> kc;
    for (std::int64_t t = 0; t < T; ++t) {
      const auto qn = normalized(q, t, h);
      if (rc.shared) {
        keys.push_back(qn);
        kc.push_back(nearest(qn, h));
      } else {
        std::vector<double> kr(static_cast<std::size_t>(D));
        for (std::int64_t d = 0; d < D; ++d) kr[std::size_t(d)] = double(k(b, t, h, d));
        keys.push_back(kr);
        kc.push_back(nearest(normalized(k, t, h), h));
      }
      r.key_clusters[std::size_t(h * T + t)] = kc.back();
      const std::int64_t cq = rc.shared ? kc.back() : nearest(qn, h);
      const auto qdot = [&](const auto& key) {
        double s = 0;
        for (std::int64_t d = 0; d < D; ++d) s += double(q(b, t, h, d)) * double(key(d));
        return s;
      };
      std::vector<double> logit;
      std::vector<std::vector<double>> vals;
      for (std::int64_t m = 0; m < rc.M; ++m) {
        logit.push_back(qdot([&](std::int64_t d) { return (*mem_k)(h, cq, m, d); }) * scale);
        std::vector<double> vr(static_cast<std::size_t>(D));
        for (std::int64_t d = 0; d < D; ++d) vr[std::size_t(d)] = double((*mem_v)(h, cq, m, d));
        vals.push_back(vr);
      }
      for (std::int64_t j = 0; j <= t; ++j) {
        if (kc[std::size_t(j)] != cq) continue;
        const auto& kj = keys[std::size_t(j)];
        logit.push_back(rc.shared && j == t ? rc.self_value : qdot([&](std::int64_t d) {
                                                                return kj[std::size_t(d)];
                                                              }) * scale);
        std::vector<double> vr(static_cast<std::size_t>(D));
        for (std::int64_t d = 0; d < D; ++d) vr[std::size_t(d)] = double(v(b, j, h, d));
        vals.push_back(vr);
      }
      if (logit.empty()) {
        ++r.empty_rows;
        continue;
      }
      const double mx = *std::max_element(logit.begin(), logit.end());
      double z = 0;
      for (const double l : logit) z += std::exp(l - mx);
      for (std::size_t i = 0; i < logit.size(); ++i) {
        const double p = std::exp(logit[i] - mx) / z;
        for (std::int64_t d = 0; d < D; ++d)
          r.out[std::size_t((t * H + h) * D + d)] += p * vals[i][std::size_t(d)];
      }
    }
  }
  return r;
}

template <class T>
core::Tensor<T> tensor_as(const core::Tensor<float>& x) {
  core::Tensor<T> r(x.template view<4>().shape());
  std::copy(x.begin(), x.end(), r.begin());
  return r;
}

// Random unit centroids [H, C, D]; dup: centroid 2j + 1 repeats 2j (exact ties).
template <class T>
KMeansState<T> unit_centroids(std::int64_t H, std::int64_t C, std::int64_t D, std::uint32_t seed,
                              bool dup = false) {
  KMeansState<T> st(H, C, D);
  std::mt19937 rng(seed);
  std::normal_distribution<double> n(0.0, 1.0);
  for (std::int64_t h = 0; h < H; ++h)
    for (std::int64_t c = 0; c < C; ++c) {
      if (dup && c % 2 == 1) {
        for (std::int64_t d = 0; d < D; ++d) st.means(h, c, d) = st.means(h, c - 1, d);
        continue;
      }
      double ss = 0;
      std::vector<double> x(static_cast<std::size_t>(D));
      for (auto& e : x) e = n(rng), ss += e * e;
      for (std::int64_t d = 0; d < D; ++d) st.means(h, c, d) = T(x[std::size_t(d)] / std::sqrt(ss));
    }
  st.initialised = true;
  return st;
}

struct DecodeCase {
  std::int64_t B = 2, H = 2, D = 8, C = 4;
  bool shared = true, causal = true;
  std::int64_t num_mem_kv = 0;
  std::vector<std::int64_t> prompt;  // per sequence; 0 = no prefill
  std::int64_t steps = 5;
  std::int64_t extra_capacity = 0;  // capacity = max(prompt) + steps + extra
  std::uint32_t seed = 1;
  bool dup_centroids = false;
};

// Everything a decode run leaves behind, for bit-for-bit comparisons.
template <class T>
struct DecodeSnapshot {
  std::vector<T> keys, values;
  std::vector<std::int64_t> lengths, clusters;
  std::vector<std::vector<std::int64_t>> members;
  bool operator==(const DecodeSnapshot&) const = default;
};

template <class T>
DecodeSnapshot<T> snapshot(const RoutingDecodeState<T>& st) {
  DecodeSnapshot<T> s;
  const auto ks = st.key_storage(), vs = st.value_storage();
  s.keys.assign(ks.data(), ks.data() + ks.numel());
  s.values.assign(vs.data(), vs.data() + vs.numel());
  s.lengths.assign(st.lengths().begin(), st.lengths().end());
  for (std::int64_t b = 0; b < st.batch(); ++b)
    for (std::int64_t h = 0; h < st.heads(); ++h) {
      const auto c = st.clusters(b, h);
      s.clusters.insert(s.clusters.end(), c.begin(), c.end());
      for (std::int64_t j = 0; j < st.num_clusters(); ++j) s.members.push_back(st.members(b, h, j));
    }
  return s;
}

// Runs a case through RoutingAttention<T>: each sequence's prompt by prefill(b, ...) (or
// steps only, step_only), then `steps` steps over all sequences. Returns the outputs
// [B, Tmax, H, D] (NaN where no token was fed) and leaves the state in *state_out.
template <class T>
core::Tensor<T> run_decode(const DecodeCase& dc, const core::Tensor<T>& q, const core::Tensor<T>& k,
                           const core::Tensor<T>& v, const KMeansState<T>& cent,
                           const RoutingExtras<T>& ex, bool step_only,
                           RoutingDecodeState<T>* state_out = nullptr) {
  const std::int64_t B = dc.B, H = dc.H, D = dc.D, Tmax = q.extent(1);
  const RoutingAttention<T> attn({.num_clusters = dc.C,
                                  .causal = dc.causal,
                                  .shared_qk = dc.shared,
                                  .num_mem_kv = dc.num_mem_kv});
  const std::int64_t cap =
      *std::max_element(dc.prompt.begin(), dc.prompt.end()) + dc.steps + dc.extra_capacity;
  auto st = attn.make_decode_state(cent, B, cap);
  core::Tensor<T> out({B, Tmax, H, D});
  for (auto& x : out) x = std::numeric_limits<T>::quiet_NaN();
  const auto tok3 = [&](const core::Tensor<T>& x, std::int64_t b, std::int64_t t0, std::int64_t n) {
    return ConstView<T, 3>(x.data() + (b * Tmax + t0) * H * D, {n, H, D}, {H * D, D, 1});
  };
  core::Tensor<T> qt({B, H, D}), kt({B, H, D}), vt({B, H, D}), ot({B, H, D});
  const auto one_step = [&](const std::vector<std::int64_t>& pos) {
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t h = 0; h < H; ++h)
        for (std::int64_t d = 0; d < D; ++d) {
          qt(b, h, d) = q(b, pos[std::size_t(b)], h, d);
          kt(b, h, d) = k(b, pos[std::size_t(b)], h, d);
          vt(b, h, d) = v(b, pos[std::size_t(b)], h, d);
        }
    attn.step(qt, dc.shared ? ConstView<T, 3>{} : ConstView<T, 3>(kt), vt, cent, st, ot, ex);
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t h = 0; h < H; ++h)
        for (std::int64_t d = 0; d < D; ++d) out(b, pos[std::size_t(b)], h, d) = ot(b, h, d);
  };
  if (step_only) {
    // sequences with shorter prompts wait: feed prompt tokens one step at a time by
    // prefilling the others one token at a time too (prefill(b) of a single token = step)
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t t = 0; t < dc.prompt[std::size_t(b)]; ++t) {
        View<T, 3> o(&out(b, t, 0, 0), {1, H, D}, {H * D, D, 1});
        attn.prefill(b, tok3(q, b, t, 1), dc.shared ? ConstView<T, 3>{} : tok3(k, b, t, 1),
                     tok3(v, b, t, 1), cent, st, o, ex);
      }
  } else {
    for (std::int64_t b = 0; b < B; ++b) {
      const std::int64_t n = dc.prompt[std::size_t(b)];
      View<T, 3> o(&out(b, 0, 0, 0), {n, H, D}, {H * D, D, 1});
      attn.prefill(b, tok3(q, b, 0, n), dc.shared ? ConstView<T, 3>{} : tok3(k, b, 0, n),
                   tok3(v, b, 0, n), cent, st, o, ex);
    }
  }
  for (std::int64_t s = 0; s < dc.steps; ++s) {
    std::vector<std::int64_t> pos(static_cast<std::size_t>(B));
    for (std::int64_t b = 0; b < B; ++b) pos[std::size_t(b)] = st.length(b);
    one_step(pos);
  }
  if (state_out) *state_out = st;
  return out;
}

// Compares a case's decode outputs and cluster lists with ref_decode; returns the relative
// error max |ours - ref| / max(1, max |ref|) and adds the reference's empty rows to *empty.
template <class T>
double check_decode_case(const DecodeCase& dc, std::int64_t* empty = nullptr) {
  const std::int64_t B = dc.B, H = dc.H, D = dc.D, C = dc.C;
  const std::int64_t Tmax = *std::max_element(dc.prompt.begin(), dc.prompt.end()) + dc.steps;
  const auto q = tensor_as<T>(random_tensor({B, Tmax, H, D}, dc.seed));
  const auto k = tensor_as<T>(random_tensor({B, Tmax, H, D}, dc.seed + 1));
  const auto v = tensor_as<T>(random_tensor({B, Tmax, H, D}, dc.seed + 2));
  const auto cent = unit_centroids<T>(H, C, D, dc.seed + 3, dc.dup_centroids);
  const RoutingAttention<T> attn({.num_clusters = C,
                                  .causal = dc.causal,
                                  .shared_qk = dc.shared,
                                  .num_mem_kv = dc.num_mem_kv});
  const std::int64_t M = attn.memory_kv();
  const auto mk = tensor_as<T>(random_tensor({H, C, std::max<std::int64_t>(M, 1), D}, dc.seed + 4));
  const auto mv = tensor_as<T>(random_tensor({H, C, std::max<std::int64_t>(M, 1), D}, dc.seed + 5));
  RoutingExtras<T> ex;
  if (M > 0) ex.mem_key = mk, ex.mem_value = mv;
  RoutingDecodeState<T> st(1, 1, 1, 1, 1);
  const auto out = run_decode<T>(dc, q, k, v, cent, ex, false, &st);
  const DecodeRefConfig rc{.shared = dc.shared, .M = M};
  double err = 0, mx = 0;
  for (std::int64_t b = 0; b < B; ++b) {
    const std::int64_t L = dc.prompt[std::size_t(b)] + dc.steps;
    REQUIRE(st.length(b) == L);
    const auto ref = ref_decode(rc, q, k, v, b, L, cent.means, &mk, &mv);
    if (empty) *empty += ref.empty_rows;
    for (std::int64_t t = 0; t < L; ++t)
      for (std::int64_t h = 0; h < H; ++h)
        for (std::int64_t d = 0; d < D; ++d) {
          const double r = ref.out[std::size_t((t * H + h) * D + d)];
          err = std::max(err, std::abs(double(out(b, t, h, d)) - r));
          mx = std::max(mx, std::abs(r));
        }
    // cluster membership: each key's cluster, and per cluster its positions ascending
    for (std::int64_t h = 0; h < H; ++h) {
      const auto got = st.clusters(b, h);
      REQUIRE(std::int64_t(got.size()) == L);
      std::int64_t total = 0;
      for (std::int64_t c = 0; c < C; ++c) {
        std::vector<std::int64_t> want;
        for (std::int64_t t = 0; t < L; ++t) {
          CAPTURE(b, h, t);
          REQUIRE(got[std::size_t(t)] == ref.key_clusters[std::size_t(h * L + t)]);
          if (got[std::size_t(t)] == c) want.push_back(t);
        }
        CHECK(st.members(b, h, c) == want);
        CHECK(st.cluster_size(b, h, c) == std::int64_t(want.size()));
        total += st.cluster_size(b, h, c);
      }
      CHECK(total == L);
    }
  }
  return err / std::max(1.0, mx);
}

}  // namespace

TEST_CASE("routing decode matches the naive reference", "[routing][decode]") {
  // (shared QK?, config causal?, num_mem_kv, clusters, prompts, steps, extra capacity, D)
  std::int64_t empty = 0;
  std::uint32_t seed = 100;
  double max_ef = 0, max_ed = 0;
  for (const bool shared : {true, false})
    for (const bool causal : {true, false})
      for (const std::int64_t mem : {0, 2})
        for (const auto& [C, prompt, steps, extra, D] :
             {std::tuple{std::int64_t(1), std::vector<std::int64_t>{3, 0}, std::int64_t(4),
                         std::int64_t(0), std::int64_t(4)},
              std::tuple{std::int64_t(4), std::vector<std::int64_t>{9, 2}, std::int64_t(6),
                         std::int64_t(3), std::int64_t(8)},
              std::tuple{std::int64_t(7), std::vector<std::int64_t>{1, 13}, std::int64_t(2),
                         std::int64_t(0), std::int64_t(16)}}) {
          const DecodeCase dc{.B = 2,
                              .H = 3,
                              .D = D,
                              .C = C,
                              .shared = shared,
                              .causal = causal,
                              .num_mem_kv = mem,
                              .prompt = prompt,
                              .steps = steps,
                              .extra_capacity = extra,
                              .seed = seed += 10};
          CAPTURE(shared, causal, mem, C, D, seed);
          const double ef = check_decode_case<float>(dc, &empty);
          const double ed = check_decode_case<double>(dc);
          // float: inputs and outputs rounded to float, keys normalised in float (~1e-7);
          // double: the same arithmetic as the reference up to summation order.
          CHECK(ef <= 1e-6);
          CHECK(ed <= 1e-12);
          max_ef = std::max(max_ef, ef), max_ed = std::max(max_ed, ed);
        }
  WARN("decode vs naive reference: max rel err float "
       << max_ef << ", double " << max_ed << "; queries with nothing to attend " << empty);
  // Separate QK without memory (non-causal config, num_mem_kv 0) leaves some queries alone
  // in their cluster: the reference gives zeros there and so must the decode step.
  CHECK(empty > 0);
}

TEST_CASE("routing decode: ties go to the lower cluster, duplicate centroids stay empty",
          "[routing][decode]") {
  for (const bool shared : {true, false}) {
    CAPTURE(shared);
    // Centroids 2j + 1 repeat 2j: every vector ties between them and takes 2j.
    const DecodeCase dc{.B = 2,
                        .H = 2,
                        .D = 8,
                        .C = 6,
                        .shared = shared,
                        .num_mem_kv = 1,
                        .prompt = {5, 3},
                        .steps = 4,
                        .seed = 7,
                        .dup_centroids = true};
    CHECK(check_decode_case<float>(dc) <= 1e-6);
    CHECK(check_decode_case<double>(dc) <= 1e-12);
  }
  // Hand-made exact ties: means e0, e1 (D = 2); a key (1, 1) ties and joins cluster 0, a key
  // (-1, 2) joins cluster 1; separate QK, no memory.
  const RoutingAttention<double> attn({.num_clusters = 2, .shared_qk = false});
  KMeansState<double> cent(1, 2, 2);
  cent.means(0, 0, 0) = 1, cent.means(0, 1, 1) = 1;
  cent.initialised = true;
  auto st = attn.make_decode_state(cent, 1, 3);
  core::Tensor<double> q({1, 1, 2}), k({1, 1, 2}), v({1, 1, 2}), o({1, 1, 2});
  const auto put = [](core::Tensor<double>& x, double a, double b) {
    x(0, 0, 0) = a, x(0, 0, 1) = b;
  };
  // token 0: key (1, 1) -> cluster 0; query (0, 1) -> cluster 1, which is empty: zeros
  put(q, 0, 1), put(k, 1, 1), put(v, 3, 4);
  attn.step(q, k, v, cent, st, o);
  CHECK(st.clusters(0, 0)[0] == 0);
  CHECK(o(0, 0, 0) == 0.0);
  CHECK(o(0, 0, 1) == 0.0);
  // token 1: key (-1, 2) -> cluster 1; query (2, 2) ties -> cluster 0: sees token 0 only
  put(q, 2, 2), put(k, -1, 2), put(v, 5, 6);
  attn.step(q, k, v, cent, st, o);
  CHECK(st.clusters(0, 0)[1] == 1);
  CHECK(o(0, 0, 0) == 3.0);
  CHECK(o(0, 0, 1) == 4.0);
  // token 2: key (0, 1) -> cluster 1; query (0, 1) -> cluster 1: tokens 1 and 2 with logits
  // 2 / sqrt(2) and 1 / sqrt(2)
  put(q, 0, 1), put(k, 0, 1), put(v, 7, 8);
  attn.step(q, k, v, cent, st, o);
  const double p1 = 1.0 / (1.0 + std::exp(-1.0 / std::sqrt(2.0)));
  CHECK(o(0, 0, 0) == Approx(p1 * 5 + (1 - p1) * 7).epsilon(1e-14));
  CHECK(o(0, 0, 1) == Approx(p1 * 6 + (1 - p1) * 8).epsilon(1e-14));
  CHECK(st.members(0, 0, 0) == std::vector<std::int64_t>{0});
  CHECK(st.members(0, 0, 1) == std::vector<std::int64_t>{1, 2});
}

TEST_CASE("routing decode: prefill equals step by step, bit for bit", "[routing][decode]") {
  for (const bool shared : {true, false}) {
    CAPTURE(shared);
    const DecodeCase dc{.B = 3,
                        .H = 2,
                        .D = 16,
                        .C = 5,
                        .shared = shared,
                        .num_mem_kv = 1,
                        .prompt = {11, 4, 0},
                        .steps = 6,
                        .seed = 21};
    const std::int64_t Tmax = 17;
    const auto q = random_tensor({3, Tmax, 2, 16}, 1);
    const auto k = random_tensor({3, Tmax, 2, 16}, 2);
    const auto v = random_tensor({3, Tmax, 2, 16}, 3);
    const auto cent = unit_centroids<float>(2, 5, 16, 4);
    const auto mk = random_tensor({2, 5, 1, 16}, 5);
    const RoutingExtras<float> ex{.mem_key = mk, .mem_value = mk};
    RoutingDecodeState<float> s1(1, 1, 1, 1, 1), s2 = s1;
    const auto o1 = run_decode<float>(dc, q, k, v, cent, ex, false, &s1);
    const auto o2 = run_decode<float>(dc, q, k, v, cent, ex, true, &s2);
    CHECK(std::memcmp(o1.data(), o2.data(), sizeof(float) * std::size_t(o1.numel())) == 0);
    CHECK(snapshot(s1) == snapshot(s2));
    // the batched prefill of equal-length prompts, in two chunks, equals it too
    const RoutingAttention<float> attn({.num_clusters = 5, .shared_qk = shared, .num_mem_kv = 1});
    auto s3 = attn.make_decode_state(cent, 3, 20);
    core::Tensor<float> o3({3, Tmax, 2, 16});
    const auto chunk = [&](const core::Tensor<float>& x, std::int64_t t0, std::int64_t n) {
      return ConstView<float, 4>(&x(0, t0, 0, 0), {3, n, 2, 16}, x.template view<4>().strides());
    };
    for (const auto& [t0, n] : {std::pair<std::int64_t, std::int64_t>{0, 6}, {6, 11}}) {
      View<float, 4> o(&o3(0, t0, 0, 0), {3, n, 2, 16}, o3.template view<4>().strides());
      attn.prefill(chunk(q, t0, n), shared ? ConstView<float, 4>{} : chunk(k, t0, n),
                   chunk(v, t0, n), cent, s3, o, ex);
    }
    DecodeCase all = dc;
    all.prompt = {0, 0, 0}, all.steps = Tmax;
    RoutingDecodeState<float> s4(1, 1, 1, 1, 1);
    const auto o4 = run_decode<float>(all, q, k, v, cent, ex, false, &s4);
    CHECK(std::memcmp(o3.data(), o4.data(), sizeof(float) * std::size_t(o3.numel())) == 0);
    for (std::int64_t b = 0; b < 3; ++b)
      for (std::int64_t h = 0; h < 2; ++h) {
        CHECK(std::equal(s3.clusters(b, h).begin(), s3.clusters(b, h).end(),
                         s4.clusters(b, h).begin(), s4.clusters(b, h).end()));
        const auto k3 = s3.keys(b, h), k4 = s4.keys(b, h);
        CHECK(std::memcmp(k3.data(), k4.data(), sizeof(float) * std::size_t(k3.numel())) == 0);
      }
  }
}

TEST_CASE("routing decode equals forward with nearest_centroid and causal",
          "[routing][decode][nearest]") {
  // An independent path (route + PlanExecutor) that computes the same thing for a whole
  // sequence; routing there uses float GEMM dots, so a near-tie could route differently
  // (none in these seeds: the buckets are compared first).
  const std::int64_t B = 2, T = 40, H = 2, D = 16;
  for (const bool shared : {true, false}) {
    CAPTURE(shared);
    const auto q = random_tensor({B, T, H, D}, 51);
    const auto k = random_tensor({B, T, H, D}, 52);
    const auto v = random_tensor({B, T, H, D}, 53);
    const RoutingAttention<float> attn({.num_clusters = 4,
                                        .causal = true,
                                        .shared_qk = shared,
                                        .num_mem_kv = 1,
                                        .selection = RoutingSelection::nearest_centroid});
    const ConstView<float, 4> kk = shared ? ConstView<float, 4>{} : ConstView<float, 4>(k);
    const auto cent = attn.init_state(q, kk, 3);
    const auto mk = random_tensor({H, 4, 1, D}, 54), mv = random_tensor({H, 4, 1, D}, 55);
    const RoutingExtras<float> ex{.mem_key = mk, .mem_value = mv};
    core::Tensor<float> want({B, T, H, D}), got({B, T, H, D});
    if (shared) {
      attn.forward(q, v, cent, want, ex);
    } else {
      attn.forward(q, k, v, cent, want, ex);
    }
    auto st = attn.make_decode_state(cent, B, T);
    attn.prefill(q, kk, v, cent, st, got, ex);
    const auto r = attn.route(q, kk, cent);
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t h = 0; h < H; ++h)
        for (std::int64_t t = 0; t < T; ++t)
          REQUIRE(st.clusters(b, h)[std::size_t(t)] == r.buckets(b, h, shared ? t : T + t));
    double err = 0;
    for (std::int64_t i = 0; i < want.numel(); ++i)
      err = std::max(err, std::abs(double(want.data()[i]) - double(got.data()[i])));
    CHECK(err <= 1e-5);
  }
}

TEST_CASE("routing decode: 1 and 2 threads are bit-identical", "[routing][decode][threads]") {
  for (const bool shared : {true, false}) {
    CAPTURE(shared);
    const DecodeCase dc{.B = 3,
                        .H = 4,
                        .D = 32,
                        .C = 6,
                        .shared = shared,
                        .num_mem_kv = 1,
                        .prompt = {60, 17, 33},
                        .steps = 20,
                        .seed = 61};
    const std::int64_t Tmax = 80;
    const auto q = random_tensor({3, Tmax, 4, 32}, 1);
    const auto k = random_tensor({3, Tmax, 4, 32}, 2);
    const auto v = random_tensor({3, Tmax, 4, 32}, 3);
    const auto cent = unit_centroids<float>(4, 6, 32, 4);
    const auto mk = random_tensor({4, 6, 1, 32}, 5);
    const RoutingExtras<float> ex{.mem_key = mk, .mem_value = mk};
    RoutingDecodeState<float> s1(1, 1, 1, 1, 1), s2 = s1;
    core::Tensor<float> o1, o2;
    {
      ScopedNumThreads t(1);
      o1 = run_decode<float>(dc, q, k, v, cent, ex, false, &s1);
    }
    {
      ScopedNumThreads t(2);
      o2 = run_decode<float>(dc, q, k, v, cent, ex, false, &s2);
    }
    CHECK(std::memcmp(o1.data(), o2.data(), sizeof(float) * std::size_t(o1.numel())) == 0);
    CHECK(snapshot(s1) == snapshot(s2));
  }
}

TEST_CASE(
    "routing decode errors name the layer, argument and shapes; a failed call changes "
    "nothing",
    "[routing][decode][errors]") {
  const std::int64_t B = 2, H = 2, D = 4, C = 3;
  const RoutingAttention<float> attn({.num_clusters = C});
  const auto cent = unit_centroids<float>(H, C, D, 1);
  auto st = attn.make_decode_state(cent, B, 4);
  const auto q = random_tensor({B, 3, H, D}, 2);
  core::Tensor<float> out({B, 3, H, D});
  // sequence 0 holds 3 positions, sequence 1 holds 1
  {
    const ConstView<float, 4> q1(q.data(), {B, 1, H, D}, q.template view<4>().strides());
    attn.prefill(q1, {}, q1, cent, st,
                 View<float, 4>(out.data(), {B, 1, H, D}, out.template view<4>().strides()));
    attn.prefill(0, ConstView<float, 3>(&q(0, 1, 0, 0), {2, H, D}), {},
                 ConstView<float, 3>(&q(0, 1, 0, 0), {2, H, D}), cent, st,
                 View<float, 3>(&out(0, 1, 0, 0), {2, H, D}));
    REQUIRE(st.length(0) == 3);
    REQUIRE(st.length(1) == 1);
  }
  const auto before = snapshot(st);
  const auto qt = random_tensor({1, B, H, D}, 3);
  const ConstView<float, 3> q_t(qt.data(), {B, H, D});
  core::Tensor<float> ot({B, H, D});
  const auto unchanged = [&] { CHECK(snapshot(st) == before); };
  {
    core::Tensor<float> bad({B, H, D + 1});
    REQUIRE_THROWS_WITH(attn.step(bad, {}, q_t, cent, st, ot),
                        Contains("RoutingAttention::step") && Contains("'q_t'") &&
                            Contains("[B=2, H=2, D=5]") && Contains("[B=2, H=2, D=4]"));
    REQUIRE_THROWS_AS(attn.step(q_t, {}, bad, cent, st, ot), shape_error);
    REQUIRE_THROWS_WITH(attn.step(q_t, {}, q_t, cent, st, bad),
                        Contains("'out_t'") && Contains("D=5"));
    core::Tensor<float> b3({3, H, D});
    REQUIRE_THROWS_WITH(attn.step(b3, {}, b3, cent, st, ot),
                        Contains("'q_t'") && Contains("[B=3, H=2, D=4]"));
    unchanged();
  }
  // k given with shared QK; missing with separate QK
  REQUIRE_THROWS_WITH(attn.step(q_t, q_t, q_t, cent, st, ot),
                      Contains("RoutingAttention::step") && Contains("'k_t' = given"));
  REQUIRE_THROWS_AS(attn.step(q_t, q_t, q_t, cent, st, ot), config_error);
  {
    const RoutingAttention<float> sep({.num_clusters = C, .shared_qk = false});
    REQUIRE_THROWS_WITH(sep.step(q_t, {}, q_t, cent, st, ot), Contains("'k_t' = missing"));
    // causal separate QK needs memory (M = 1)
    const RoutingAttention<float> sepc({.num_clusters = C, .causal = true, .shared_qk = false});
    REQUIRE_THROWS_WITH(sepc.step(q_t, q_t, q_t, cent, st, ot),
                        Contains("RoutingAttention::step") && Contains("'mem_key' = missing"));
    const auto mk = random_tensor({H, C + 1, 1, D}, 4);
    REQUIRE_THROWS_WITH(sepc.step(q_t, q_t, q_t, cent, st, ot, {.mem_key = mk, .mem_value = mk}),
                        Contains("'mem_key'") && Contains("[H=2, C=3, M=1, D=4]"));
    REQUIRE_THROWS_AS(sepc.step(q_t, q_t, q_t, cent, st, ot, {.mem_key = mk, .mem_value = mk}),
                      shape_error);
  }
  unchanged();
  // capacity: sequence 0 holds 3 of 4, so a step fits but a 2-token prefill does not; the
  // batched prefill fails for sequence 0 before anything is written to sequence 1
  {
    const ConstView<float, 4> q2(q.data(), {B, 2, H, D}, q.template view<4>().strides());
    View<float, 4> o2(out.data(), {B, 2, H, D}, out.template view<4>().strides());
    REQUIRE_THROWS_WITH(attn.prefill(q2, {}, q2, cent, st, o2),
                        Contains("RoutingAttention::prefill") && Contains("sequence 0 holds 3") &&
                            Contains("appending 2") && Contains("capacity 4"));
    REQUIRE_THROWS_AS(attn.prefill(q2, {}, q2, cent, st, o2), config_error);
    unchanged();
    auto full = st;
    attn.step(q_t, {}, q_t, cent, full, ot);
    const auto full_before = snapshot(full);
    REQUIRE_THROWS_WITH(attn.step(q_t, {}, q_t, cent, full, ot),
                        Contains("RoutingAttention::step") && Contains("sequence 0 holds 4") &&
                            Contains("appending 1") && Contains("capacity 4"));
    CHECK(snapshot(full) == full_before);
    // sequence 1 still has room for 2
    CHECK_NOTHROW(attn.prefill(1, ConstView<float, 3>(q.data(), {2, H, D}), {},
                               ConstView<float, 3>(q.data(), {2, H, D}), cent, full,
                               View<float, 3>(out.data(), {2, H, D})));
    CHECK(full.length(1) == 4);
  }
  // aliasing: the output over an input
  {
    core::Tensor<float> buf({B, H, D});
    REQUIRE_THROWS_WITH(attn.step(buf, {}, q_t, cent, st, buf),
                        Contains("RoutingAttention::step") && Contains("'out_t'") &&
                            Contains("memory shared with argument 'q_t'"));
    REQUIRE_THROWS_AS(attn.step(q_t, {}, buf, cent, st, buf), shape_error);
    unchanged();
  }
  // bad sequence index
  {
    const ConstView<float, 3> q1(q.data(), {1, H, D});
    View<float, 3> o1(out.data(), {1, H, D});
    REQUIRE_THROWS_WITH(
        attn.prefill(2, q1, {}, q1, cent, st, o1),
        Contains("RoutingAttention::prefill") && Contains("'b' = 2") && Contains("[0, B=2)"));
    REQUIRE_THROWS_AS(attn.prefill(-1, q1, {}, q1, cent, st, o1), config_error);
    REQUIRE_THROWS_WITH(st.keys(2, 0), Contains("RoutingDecodeState::keys") && Contains("'b' = 2"));
    REQUIRE_THROWS_WITH(st.members(0, 0, 3), Contains("'c' = 3") && Contains("[0, C=3)"));
    unchanged();
  }
  // centroids: uninitialised, wrong shape, NaN; NaN in q_t; masks
  {
    auto c2 = cent;
    c2.initialised = false;
    REQUIRE_THROWS_WITH(attn.step(q_t, {}, q_t, c2, st, ot),
                        Contains("'centroids' = uninitialised"));
    const auto c4 = unit_centroids<float>(H, C + 1, D, 1);
    REQUIRE_THROWS_WITH(attn.step(q_t, {}, q_t, c4, st, ot),
                        Contains("RoutingAttention::step") && Contains("'centroids.means'") &&
                            Contains("[H=2, C=4, D=4]") && Contains("[H=2, C=3, D=4]"));
    REQUIRE_THROWS_AS(attn.step(q_t, {}, q_t, c4, st, ot), shape_error);
    REQUIRE_THROWS_WITH(attn.make_decode_state(c4, 1, 4), Contains("make_decode_state"));
    c2 = cent;
    c2.means(1, 2, 3) = std::numeric_limits<float>::quiet_NaN();
    REQUIRE_THROWS_WITH(attn.step(q_t, {}, q_t, c2, st, ot), Contains("'centroids.means' = NaN"));
    auto qn = qt;
    qn(0, 1, 1, 2) = std::numeric_limits<float>::quiet_NaN();
    REQUIRE_THROWS_WITH(attn.step(ConstView<float, 3>(qn.data(), {B, H, D}), {}, q_t, cent, st, ot),
                        Contains("'q_t' = NaN"));
    const std::vector<std::uint8_t> m(2, 1);
    REQUIRE_THROWS_WITH(attn.step(q_t, {}, q_t, cent, st, ot, {.query_mask = m}),
                        Contains("'query_mask' = given") && Contains("no masks"));
    unchanged();
  }
  REQUIRE_THROWS_WITH(
      RoutingDecodeState<float>(1, 1, 4, 2, 0),
      Contains("RoutingDecodeState::RoutingDecodeState") && Contains("'capacity' = 0"));
  REQUIRE_THROWS_AS(RoutingDecodeState<float>(1, 1, 4, 0, 8), config_error);
  // reset: one sequence, then all
  st.reset(0);
  CHECK(st.length(0) == 0);
  CHECK(st.length(1) == 1);
  CHECK(st.cluster_size(0, 1, st.clusters(1, 1)[0]) == 0);
  CHECK(st.members(1, 1, st.clusters(1, 1)[0]) == std::vector<std::int64_t>{0});
  st.reset();
  CHECK(st.length(1) == 0);
  for (std::int64_t c = 0; c < C; ++c) CHECK(st.members(1, 0, c).empty());
}
