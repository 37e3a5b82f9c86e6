// quickstart: causal multi-head attention with switchyard's fused kernel,
//   out[b, i, h] = sum_{j <= i} softmax_j(q[b, i, h] . k[b, j, h'] / sqrt(D)) v[b, j, h'],
// on random q, k, v with grouped-query attention (8 query heads share 2 K/V heads, h' = h / 4).
// How we know it is right: the same attention written as plain loops in double precision
// below, compared element by element. Prints the max error against that naive reference and
// how much faster the fused kernel is on this machine; exits 1 if the error is too large.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <switchyard/attention/dense.hpp>
#include <vector>

using namespace switchyard;

namespace {

// The naive reference: every score, softmax and weighted sum in double, one query at a time.
std::vector<double> naive_causal_attention(const Tensor<float>& q, const Tensor<float>& k,
                                           const Tensor<float>& v) {
  const std::int64_t B = q.extent(0), T = q.extent(1), H = q.extent(2), D = q.extent(3);
  const std::int64_t group = H / k.extent(2);  // query heads per K/V head
  const double scale = 1.0 / std::sqrt(double(D));
  std::vector<double> out(static_cast<std::size_t>(q.numel())), p(static_cast<std::size_t>(T));
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t h = 0; h < H; ++h)
      for (std::int64_t i = 0; i < T; ++i) {
        double max_s = -INFINITY, sum = 0;
        for (std::int64_t j = 0; j <= i; ++j) {  // causal: keys up to the query's position
          double s = 0;
          for (std::int64_t d = 0; d < D; ++d) s += double(q(b, i, h, d)) * k(b, j, h / group, d);
          p[std::size_t(j)] = s * scale;
          max_s = std::max(max_s, p[std::size_t(j)]);
        }
        for (std::int64_t j = 0; j <= i; ++j) {
          double& pj = p[std::size_t(j)];
          sum += pj = std::exp(pj - max_s);
        }
        for (std::int64_t d = 0; d < D; ++d) {
          double o = 0;
          for (std::int64_t j = 0; j <= i; ++j) o += p[std::size_t(j)] * v(b, j, h / group, d);
          out[std::size_t(((b * T + i) * H + h) * D + d)] = o / sum;
        }
      }
  return out;
}

template <class F>
double milliseconds(F&& f) {
  const auto start = std::chrono::steady_clock::now();
  f();
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
      .count();
}

}  // namespace

int main() {
  // Layout [B, T, H, D]: batch, tokens, heads, head dim.
  const std::int64_t B = 2, T = 256, H = 8, H_kv = 2, D = 64;
  Tensor<float> q({B, T, H, D}), k({B, T, H_kv, D}), v({B, T, H_kv, D});
  std::mt19937 rng(42);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (auto* t : {&q, &k, &v})
    for (float& x : *t) x = normal(rng);

  std::printf(
      "quickstart: causal attention, q [B=%lld, T=%lld, H=%lld, D=%lld], k and v "
      "[%lld, %lld, H_kv=%lld, %lld]\n",
      (long long)B, (long long)T, (long long)H, (long long)D, (long long)B, (long long)T,
      (long long)H_kv, (long long)D);
  std::printf("SIMD architecture: %s, threads: %d\n", simd::default_arch::name(), num_threads());

  const attention::DenseAttention<float> attn;  // scale = 1/sqrt(D)
  Tensor<float> out({B, T, H, D});
  attn.forward(q, k, v, out, attention::CausalMask{});  // also warms up

  // Timings: the fused kernel as the best of 5 runs, on all threads and on one; the naive
  // reference once (single-threaded, double).
  double fused_ms = 1e30, fused_1t_ms = 1e30;
  for (int rep = 0; rep < 5; ++rep) {
    fused_ms = std::min(fused_ms,
                        milliseconds([&] { attn.forward(q, k, v, out, attention::CausalMask{}); }));
    const ScopedNumThreads one_thread(1);
    fused_1t_ms = std::min(
        fused_1t_ms, milliseconds([&] { attn.forward(q, k, v, out, attention::CausalMask{}); }));
  }
  std::vector<double> want;
  const double naive_ms = milliseconds([&] { want = naive_causal_attention(q, k, v); });

  double max_err = 0, max_abs = 0;
  for (std::int64_t i = 0; i < out.numel(); ++i) {
    max_err = std::max(max_err, std::abs(double(out[i]) - want[std::size_t(i)]));
    max_abs = std::max(max_abs, std::abs(want[std::size_t(i)]));
  }
  std::printf("out[0, 5, 0, 0..3] = %.4f %.4f %.4f %.4f (largest |out| %.2f)\n", out(0, 5, 0, 0),
              out(0, 5, 0, 1), out(0, 5, 0, 2), out(0, 5, 0, 3), max_abs);
  std::printf(
      "time on one thread: fused %.2f ms, naive double loops %.1f ms: %.0fx faster "
      "(fused on all %d threads: %.2f ms)\n",
      fused_1t_ms, naive_ms, naive_ms / fused_1t_ms, num_threads(), fused_ms);
  const double tolerance = 1e-5;
  const bool ok = max_err <= tolerance;
  std::printf("max error vs naive double reference %.2g (tolerance %.0e): %s\n", max_err, tolerance,
              ok ? "OK" : "FAILED");
  return ok ? 0 : 1;
}
