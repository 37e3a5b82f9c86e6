// quickstart: build a tensor, run a switchyard kernel, print what it computed.
#include <cmath>
#include <cstdio>
#include <switchyard/switchyard.hpp>

int main() {
  using namespace switchyard;
  Tensor<float> x({4});
  for (int i = 0; i < 4; ++i) x[i] = -2.0f + float(i);
  std::printf("switchyard %d.%d.%d, SIMD architecture: %s\n", SWITCHYARD_VERSION_MAJOR,
              SWITCHYARD_VERSION_MINOR, SWITCHYARD_VERSION_PATCH, simd::default_arch::name());
  for (int i = 0; i < 4; ++i) {
    std::printf("exp(%g) = %.7g (std::exp %.7g)\n", double(x[i]), double(simd::exp(x[i])),
                std::exp(double(x[i])));
  }
  return 0;
}
