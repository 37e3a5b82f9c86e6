// A user's program: includes the umbrella header and runs fused attention.
#include <cstdio>
#include <switchyard/switchyard.hpp>

int main() {
  switchyard::Tensor<float> x({2, 3});
  x(1, 2) = 1.5f;
  std::printf("switchyard %d.%d.%d consumer ok: %g\n", SWITCHYARD_VERSION_MAJOR,
              SWITCHYARD_VERSION_MINOR, SWITCHYARD_VERSION_PATCH, double(x(1, 2)));
  return x(1, 2) == 1.5f ? 0 : 1;
}
