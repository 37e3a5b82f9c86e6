// Linear attention in three forms: chunked causal over a whole sequence, a chunked
// prefill followed by token-by-token decoding on an explicit state, and non-causal
// with padded keys. Prints checksums and the agreement with the double reference.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "switchyard/attention/linear.hpp"
#include "switchyard/attention/linear_ref.hpp"

using namespace switchyard;

namespace {

Tensor<float> random_tensor(std::int64_t b, std::int64_t t, std::int64_t h, std::int64_t d,
                            unsigned seed) {
  Tensor<float> x({b, t, h, d});
  std::mt19937 gen(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (auto& e : x) e = nd(gen);
  return x;
}

Tensor<double> to_double(const Tensor<float>& x) {
  Tensor<double> y(x.shape());
  std::copy(x.begin(), x.end(), y.begin());
  return y;
}

double max_diff(const Tensor<float>& a, const Tensor<double>& b) {
  double m = 0;
  for (std::int64_t i = 0; i < a.numel(); ++i) m = std::max(m, std::abs(a[i] - b[i]));
  return m;
}

// Token t of a [B, T, H, D] tensor as a [B, H, D] view, the shape step() takes.
template <class T>
View<T, 3> token(Tensor<std::remove_const_t<T>>& x, std::int64_t t) {
  return View<T, 3>(x.data() + t * x.extent(2) * x.extent(3),
                    {x.extent(0), x.extent(2), x.extent(3)},
                    {x.extent(1) * x.extent(2) * x.extent(3), x.extent(3), 1});
}

}  // namespace

int main() {
  const std::int64_t nb = 2, nt = 256, nh = 4, d = 32, dv = 32, prefix = 200;
  auto q = random_tensor(nb, nt, nh, d, 1);
  auto k = random_tensor(nb, nt, nh, d, 2);
  auto v = random_tensor(nb, nt, nh, dv, 3);

  // elu(x) + 1 feature map (fast-transformers' default), chunks of 64 tokens.
  const attention::LinearAttention<float> layer({.chunk_size = 64});

  // 1. Causal attention over the whole sequence, chunked.
  Tensor<float> out({nb, nt, nh, dv});
  layer.forward_causal(q, k, v, out);
  double checksum = 0;
  for (float x : out) checksum += x;

  // 2. Prefill the first tokens in chunks, keep the state, decode the rest one by one.
  Tensor<float> dec({nb, nt, nh, dv});
  auto state = layer.make_state(nb, nh, d, dv);  // s [B, H, D', Dv], z [B, H, D']
  const View<float, 4> dec_view = dec;
  const ConstView<float, 4> qv = q, kv = k, vv = v;
  layer.forward_causal(qv.slice(1, 0, prefix), kv.slice(1, 0, prefix), vv.slice(1, 0, prefix),
                       dec_view.slice(1, 0, prefix), {}, &state);
  for (std::int64_t t = prefix; t < nt; ++t)
    layer.step(token<const float>(q, t), token<const float>(k, t), token<const float>(v, t), state,
               token<float>(dec, t));
  double chunked_vs_decoded = 0;
  for (std::int64_t i = 0; i < out.numel(); ++i)
    chunked_vs_decoded = std::max(chunked_vs_decoded, double(std::abs(out[i] - dec[i])));

  // 3. The naive double reference (masked quadratic form).
  Tensor<double> ref({nb, nt, nh, dv});
  attention::ref::linear_attention<double>(to_double(q), to_double(k), to_double(v), ref,
                                           attention::FeatureMap::elu_plus_one, 1e-6, true);

  // 4. Non-causal with padded keys: batch item 1 has only 100 valid keys.
  const std::vector<std::int64_t> key_lengths{nt, 100};
  Tensor<float> nc({nb, nt, nh, dv});
  layer.forward(q, k, v, nc, key_lengths);
  Tensor<double> nc_ref({nb, nt, nh, dv});
  attention::ref::linear_attention<double>(to_double(q), to_double(k), to_double(v), nc_ref,
                                           attention::FeatureMap::elu_plus_one, 1e-6, false,
                                           key_lengths);

  std::printf("linear attention B=%lld T=%lld H=%lld D=%lld, elu+1, chunk 64\n", (long long)nb,
              (long long)nt, (long long)nh, (long long)d);
  std::printf("  causal output checksum           %.6f\n", checksum);
  std::printf("  max |causal - reference|         %.3g\n", max_diff(out, ref));
  std::printf("  max |chunked - prefill+decode|   %.3g  (%lld prefilled, %lld decoded)\n",
              chunked_vs_decoded, (long long)prefix, (long long)(nt - prefix));
  std::printf("  max |non-causal - reference|     %.3g  (key lengths %lld, %lld)\n",
              max_diff(nc, nc_ref), (long long)key_lengths[0], (long long)key_lengths[1]);
  return 0;
}
