# Flags for switchyard's own tests, benchmarks and examples (never for consumers).
set(SWITCHYARD_ARCH "native" CACHE STRING
    "-march value for switchyard's own tests/bench/examples (e.g. native, x86-64, x86-64-v3); empty = compiler default")

add_library(switchyard_dev_flags INTERFACE)
target_link_libraries(switchyard_dev_flags INTERFACE switchyard::switchyard)
target_compile_options(switchyard_dev_flags INTERFACE -Wall -Wextra)
if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
  # gcc 12 false positives: '__Y' "may be used uninitialized" inside its own
  # avx512fintrin.h (the _mm512_undefined_* idiom, reached through Eigen and
  # xsimd), and -Wrestrict inside libstdc++'s string concatenation. The clang
  # (sanitize) build keeps these warnings on for our own code.
  target_compile_options(switchyard_dev_flags INTERFACE -Wno-maybe-uninitialized
                         -Wno-uninitialized -Wno-restrict)
  # gcc 12.2 (Debian 12) miscompiles with AVX-512 targets (-march=native on this
  # machine, x86-64-v4): its SLP vectoriser turned `std::vector<std::int64_t> w{2, 2, 0, 0}`
  # into {2, 2, 2, 2} in a test. Our kernels vectorise explicitly (xsimd), so turning
  # the SLP pass off costs them nothing. Consumers get it from the switchyard target
  # (cmake/switchyardGcc12Workaround.cmake); our own builds keep it even when that option is OFF.
  if(CMAKE_CXX_COMPILER_VERSION VERSION_LESS 13)
    target_compile_options(switchyard_dev_flags INTERFACE -fno-tree-slp-vectorize)
  endif()
endif()
if(SWITCHYARD_ARCH)
  target_compile_options(switchyard_dev_flags INTERFACE -march=${SWITCHYARD_ARCH})
endif()
# Eigen's own OpenMP GEMM gives different bits for different thread counts; we
# parallelise at our own level, so keep Eigen serial in everything we build.
target_compile_definitions(switchyard_dev_flags INTERFACE EIGEN_DONT_PARALLELIZE)
if(NOT CMAKE_BUILD_TYPE AND NOT CMAKE_CONFIGURATION_TYPES)
  set(CMAKE_BUILD_TYPE Release CACHE STRING "Build type" FORCE)
endif()

# Golden vectors from the reference implementations (safetensors), kept in the repository
# (scripts/sync_fixtures.sh copies new ones in from the shared folder).
set(SWITCHYARD_FIXTURE_DIR "${PROJECT_SOURCE_DIR}/tests/fixtures" CACHE PATH
    "Folder of the golden fixtures (safetensors)")
