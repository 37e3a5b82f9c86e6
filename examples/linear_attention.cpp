// linear_attention: kernelised attention, softmax(q . k) replaced by phi(q) . phi(k) with
// phi(x) = elu(x) + 1 (fast-transformers' default), so the cost grows linearly with T. Runs it
// in three forms: causal over a whole sequence (chunked), a chunked prefill followed by
// token-by-token decoding on an explicit state, and non-causal with padded keys. The check:
// each form against the naive double reference (the masked quadratic form, computed in double
// from the same inputs); exits 1 if any differs by more than the tolerance.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
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

  std::printf(
      "linear_attention: elu(x)+1 feature map, q, k, v [B=%lld, T=%lld, H=%lld, "
      "D=%lld], chunks of 64\n",
      (long long)nb, (long long)nt, (long long)nh, (long long)d);
  const double causal = max_diff(out, ref), decoded = max_diff(dec, ref),
               non_causal = max_diff(nc, nc_ref);
  const std::string decoded_label = "causal, " + std::to_string(prefix) + " prefilled + " +
                                    std::to_string(nt - prefix) + " decoded by step()";
  const std::string padded_label = "non-causal, key lengths " + std::to_string(key_lengths[0]) +
                                   " and " + std::to_string(key_lengths[1]);
  std::printf("  %-44s max |out - reference| %.2g\n", "causal, chunked", causal);
  std::printf("  %-44s max |out - reference| %.2g\n", decoded_label.c_str(), decoded);
  std::printf("  %-44s max |out - reference| %.2g\n", padded_label.c_str(), non_causal);
  const double max_err = std::max({causal, decoded, non_causal}), tolerance = 1e-5;
  const bool ok = max_err <= tolerance;
  std::printf("max error of all three vs naive double reference %.2g (tolerance %.0e): %s\n",
              max_err, tolerance, ok ? "OK" : "FAILED");
  return ok ? 0 : 1;
}
