// A user's program: includes the umbrella header and runs fused causal attention.
#include <cmath>
#include <cstdio>
#include <switchyard/switchyard.hpp>

int main() {
  using namespace switchyard;
  const std::int64_t B = 1, T = 5, H = 2, D = 8;
  Tensor<float> q({B, T, H, D}), k({B, T, H, D}), v({B, T, H, D});
  core::fill_normal(q, 1);
  core::fill_normal(k, 2);
  core::fill_normal(v, 3);
  attention::DenseAttention<float> attn;
  Tensor<float> out = attn.forward(q, k, v, attention::CausalMask{});
  // The first query sees only the first key, so its output is v[0] exactly.
  const bool ok = std::fabs(out(0, 0, 1, 3) - v(0, 0, 1, 3)) < 1e-6f;
  std::printf("switchyard %d.%d.%d consumer (%s): out[0,0,1,3] = %g, %s\n",
              SWITCHYARD_VERSION_MAJOR, SWITCHYARD_VERSION_MINOR, SWITCHYARD_VERSION_PATCH,
              simd::default_arch::name(), double(out(0, 0, 1, 3)), ok ? "ok" : "WRONG");
  return ok ? 0 : 1;
}
