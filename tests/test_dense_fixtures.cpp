// DenseAttention against the shared PyTorch fixtures dense_B1_H8_L128_d64_*.
// The fixtures store [B, H, L, dh]; switchyard takes [B, T, H, D], so the
// tensors are passed as strided views (heads and tokens swapped), no copy.
// Tolerance (fixtures/README.md): max|ours - ref| <= 1e-4 * max(1, max|ref|),
// against out_f64 (torch in float64, rounded to float32).
#include <catch2/catch.hpp>
#include <cmath>
#include <string>
#include <switchyard/attention/dense.hpp>

#include "support/fixtures.hpp"

using namespace switchyard;
using namespace switchyard::attention;

namespace {

// [B, H, L, dh] contiguous, seen as [B, L, H, dh].
template <class V>
auto as_bthd(V v) {
  const Shape<4> s = v.shape(), st = v.strides();
  return decltype(v)(v.data(), {s[0], s[2], s[1], s[3]}, {st[0], st[2], st[1], st[3]});
}

void check_fixture(const std::string& file, bool causal) {
  CAPTURE(file);
  const auto st = open_fixture(file);
  const auto q = as_bthd(st.view<float, 4>("q"));
  const auto k = as_bthd(st.view<float, 4>("k"));
  const auto v = as_bthd(st.view<float, 4>("v"));
  const auto want = as_bthd(st.view<float, 4>("out_f64"));
  const auto torch_f32 = as_bthd(st.view<float, 4>("out"));
  const DenseAttention<float> attn;  // default scale 1/sqrt(64) = 0.125, as the fixture
  const auto got = causal ? attn.forward(q, k, v, CausalMask{}) : attn.forward(q, k, v);
  double max_err = 0, max_ref = 0, torch_err = 0;
  for (std::int64_t b = 0; b < q.extent(0); ++b)
    for (std::int64_t i = 0; i < q.extent(1); ++i)
      for (std::int64_t h = 0; h < q.extent(2); ++h)
        for (std::int64_t d = 0; d < q.extent(3); ++d) {
          const double r = want(b, i, h, d);
          max_err = std::max(max_err, std::abs(double(got(b, i, h, d)) - r));
          torch_err = std::max(torch_err, std::abs(double(torch_f32(b, i, h, d)) - r));
          max_ref = std::max(max_ref, std::abs(r));
        }
  // Reported so the margin is visible in the log (-s).
  INFO("max|ours - out_f64| = " << max_err << ", max|torch f32 - out_f64| = " << torch_err);
  CHECK(max_err <= 1e-4 * std::max(1.0, max_ref));
  WARN(file << ": max|ours - out_f64| = " << max_err << " (torch float32: " << torch_err << ")");
}

}  // namespace

TEST_CASE("dense attention matches the PyTorch fixture, non-causal", "[dense][fixture]") {
  check_fixture("dense_B1_H8_L128_d64_noncausal.safetensors", false);
}

TEST_CASE("dense attention matches the PyTorch fixture, causal", "[dense][fixture]") {
  check_fixture("dense_B1_H8_L128_d64_causal.safetensors", true);
}
