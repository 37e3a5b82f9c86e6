#!/usr/bin/env bash
# Installs the Debian 12 packages switchyard builds with. Idempotent: packages
# already present are skipped, and apt runs only when something is missing.
#   scripts/install_deps.sh         build, tests, benchmarks, examples
#   scripts/install_deps.sh --dev   also clang 14 + sanitizer runtime + clang-format (CI legs)
#                                   and matplotlib (the benchmark chart script)
set -euo pipefail

packages=(g++ cmake ninja-build pkg-config
          libeigen3-dev libxsimd-dev nlohmann-json3-dev   # the library
          catch2                                          # tests
          libbenchmark-dev libopenblas-dev                # benchmarks (OpenBLAS: comparison only)
          libopenmpi-dev openmpi-bin)                     # optional switchyard::mpi (expert parallelism)
if [[ "${1:-}" == "--dev" ]]; then
  packages+=(clang-14 libclang-rt-14-dev libomp-14-dev clang-format
            python3-matplotlib)  # scripts/bench_chart.py
fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]} == 0)); then
  echo "install_deps: all ${#packages[@]} packages present"
  exit 0
fi

sudo=()
if [[ $(id -u) -ne 0 ]]; then sudo=(sudo); fi
echo "install_deps: installing ${missing[*]}"
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
