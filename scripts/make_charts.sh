#!/usr/bin/env bash
# Regenerates the README's performance charts (docs/*.png) in one command: builds the
# benchmarks it needs, runs them on ONE thread with JSON output into build/charts/, then
# renders every chart with scripts/bench_chart.py (matplotlib: Debian's python3-matplotlib).
#
#   scripts/make_charts.sh                  # build, run the benchmarks (~4 min on 2 cores), render
#   scripts/make_charts.sh build/avx2       # the benchmarks of another configured build dir
#   scripts/make_charts.sh --render-only    # re-render docs/*.png from build/charts/*.json
#   scripts/make_charts.sh --no-build       # run the binaries as they are
#   scripts/make_charts.sh --quick          # smoke test (~2 min): tiny min_time, 1 repetition,
#                                           # JSON and PNGs in build/charts-quick/ only
#
# What runs (the alternatives of each chart side by side in one process, so every ratio is
# measured under the same machine load; 3 repetitions, randomly interleaved, medians):
#   bench_peak               fp32 FMA peak, the denominator of "% of peak"
#   bench_gemm               ours / Eigen / OpenBLAS sgemm             -> fraction_of_peak.png
#   bench_attention          fused dense attention, T 512-4096         -> fraction_of_peak.png
#   bench_linear_attention   linear vs dense, T 32-16384               -> attention_crossover.png
#   bench_routing_attention  routing vs dense, T 32-16384              -> attention_crossover.png
#   bench_moe_layer          MoE layer vs dense GEMMs, Soft MoE        -> moe_layer_vs_dense.png
#   bench_moe_routers        every router vs naive argsort, T 4096     -> moe_routers.png
# Outputs: build/charts/<bench>[_long].json (Google Benchmark JSON) and .log (console table),
# build/charts/lscpu.txt and run_info.txt (CPU, commit, load, OpenBLAS kernels, run time),
# docs/*.png. The chart footnotes name the CPU and the thread count.
set -euo pipefail

usage() {
  sed -n '2,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
  exit "${1:-2}"
}

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
render_only=0
quick=0
build_first=1
build_dir=
for arg in "$@"; do
  case $arg in
    --render-only) render_only=1 ;;
    --quick) quick=1 ;;
    --no-build) build_first=0 ;;
    -h | --help) usage 0 ;;
    -*) echo "make_charts: unknown option $arg" >&2; usage ;;
    *)
      [[ -z $build_dir ]] || { echo "make_charts: one build dir only" >&2; usage; }
      build_dir=$arg
      ;;
  esac
done
build_dir=${build_dir:-$root/build/default}
[[ $build_dir = /* ]] || build_dir=$PWD/$build_dir
out_json=$root/build/charts
out_png=$root/docs
if ((quick)); then  # a smoke test never overwrites the real JSON or the committed charts
  out_json=$root/build/charts-quick
  out_png=$out_json
fi
# A Python with matplotlib: $PYTHON, else python3 if it has it, else Debian's /usr/bin/python3.
python=${PYTHON:-}
if [[ -z $python ]]; then
  for candidate in python3 /usr/bin/python3; do
    if "$candidate" -c 'import matplotlib' 2>/dev/null; then python=$candidate; break; fi
  done
  if [[ -z $python ]]; then
    echo "make_charts: no python3 with matplotlib (Debian: apt install python3-matplotlib," \
      "or scripts/install_deps.sh --dev)" >&2
    exit 2
  fi
fi

render() {
  "$python" "$root/scripts/bench_chart.py" --json-dir "$out_json" --out-dir "$out_png"
}

if ((render_only)); then
  render
  exit
fi

if [[ ! -f $build_dir/CMakeCache.txt ]]; then
  echo "make_charts: $build_dir is not a configured build dir; run: cmake --preset default" >&2
  exit 2
fi
bench=$build_dir/bench
targets=(bench_peak bench_gemm bench_attention bench_linear_attention bench_routing_attention
         bench_moe_layer bench_moe_routers)
if ((build_first)); then
  for t in "${targets[@]}"; do  # one at a time: the machine may be small and shared
    echo "== building $t"
    if ! log=$(cmake --build "$build_dir" --target "$t" -j 1 2>&1); then
      echo "$log" | tail -n 30 >&2
      echo "make_charts: building $t failed" >&2
      exit 1
    fi
  done
fi
for t in "${targets[@]}"; do
  [[ -x $bench/$t ]] || { echo "make_charts: $bench/$t is missing (build it first)" >&2; exit 2; }
done

mkdir -p "$out_json"
start=$(date +%s)
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "build_dir: $build_dir"
  echo "commit: $(git -C "$root" describe --always --dirty 2>/dev/null || echo unknown)"
  echo "load_start: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "quick: $quick"
} >"$out_json/run_info.txt"
lscpu >"$out_json/lscpu.txt" 2>/dev/null || grep -m1 'model name' /proc/cpuinfo >"$out_json/lscpu.txt" || true

# One thread everywhere (the benchmarks also pin themselves to 1 thread; this keeps OpenBLAS
# and OpenMP from starting pools that would compete for the two cores).
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1

# OpenBLAS 0.3.21 (Debian 12) does not know every CPU model: on an Emerald Rapids Xeon it falls
# back to its SSE3 "Prescott" kernels (a fifth of its AVX-512 speed), which would make the
# GEMM comparison meaningless. If it picked a pre-AVX core on a CPU with AVX2 or AVX-512, name
# the right kernels (unless OPENBLAS_CORETYPE is already set).
if [[ -z ${OPENBLAS_CORETYPE+set} ]]; then
  detected=$("$bench/bench_gemm" --benchmark_filter='^BM_OpenBLAS/M:256/' --benchmark_min_time=0.001 \
    --benchmark_format=json 2>/dev/null | sed -n 's/.*"label": "core=\([A-Za-z0-9_]*\)".*/\1/p' | head -n 1) ||
    true  # built without OpenBLAS: nothing to correct
  flags=$(grep -m1 '^flags' /proc/cpuinfo || true)
  case $detected in
    Prescott | Core2 | Penryn | Dunnington | Nehalem | Katmai | Coppermine | Northwood | Banias | Atom)
      coretype=
      if [[ $flags == *" avx512_bf16"* ]]; then coretype=Cooperlake
      elif [[ $flags == *" avx512f"* ]]; then coretype=SkylakeX
      elif [[ $flags == *" avx2"* ]]; then coretype=Haswell
      fi
      if [[ -n $coretype ]]; then
        echo "make_charts: OpenBLAS picked its '$detected' kernels on this CPU; using OPENBLAS_CORETYPE=$coretype"
        export OPENBLAS_CORETYPE=$coretype
        { echo "openblas_coretype: $coretype"; echo "openblas_detected: $detected"; } >>"$out_json/run_info.txt"
      fi
      ;;
  esac
fi

# run NAME MIN_TIME REPETITIONS [FILTER [OUT]]: one binary, JSON to build/charts/OUT.json
# (OUT defaults to NAME; NAME_<suffix>.json files are read together with NAME.json).
run() {
  local name=$1 min_time=$2 reps=$3 filter=${4:-.} out=${5:-$1}
  if ((quick)); then min_time=0.01 reps=1; fi
  local t0=$(date +%s)
  echo "== $name (filter '$filter', min_time $min_time s, $reps repetitions) -> $out.json"
  local args=(--benchmark_filter="$filter" --benchmark_min_time="$min_time"
              --benchmark_out="$out_json/$out.json.tmp" --benchmark_out_format=json)
  if ((reps > 1)); then
    args+=(--benchmark_repetitions="$reps" --benchmark_enable_random_interleaving=true
           --benchmark_display_aggregates_only=true)
  fi
  # The console table goes to NAME.log (Debian's Google Benchmark 1.7.1 also prints a warning
  # there that the library itself was built as DEBUG: that does not affect our timings).
  if ! "$bench/$name" "${args[@]}" >"$out_json/$out.log" 2>&1; then
    tail -n 20 "$out_json/$out.log" >&2
    echo "make_charts: $name failed (log: $out_json/$out.log)" >&2
    exit 1
  fi
  mv "$out_json/$out.json.tmp" "$out_json/$out.json"
  echo "   $(grep -c '"run_type": "iteration"' "$out_json/$out.json") runs in $(($(date +%s) - t0)) s"
}

rm -f "$out_json"/bench_*.json "$out_json"/bench_*.log
run bench_peak 0.2 3
run bench_gemm 0.2 3
run bench_attention 0.2 3 '^fused/T:[0-9]+/causal:[01]/threads:1$'
# Linear and routing attention: T <= 4096 three times, interleaved; T 16384 once (one dense
# forward there takes seconds), in a second process whose ratios are again side by side.
run bench_linear_attention 0.1 3 '/(32|64|128|256|512|1024|2048|4096)$'
run bench_linear_attention 0.1 1 '/16384$' bench_linear_attention_long
run bench_routing_attention 0.1 3 '^(dense|routing|routing_nearest)/(32|64|128|256|512|1024|2048|4096)$'
# At T 16384 the routing rows' x_dense counter (one dense forward timed in the same process)
# is the reference: running dense/16384 as well would cost another 10 s or more.
run bench_routing_attention 0.1 1 '^(routing|routing_nearest)/16384$' bench_routing_attention_long
run bench_moe_layer 0.1 3
run bench_moe_routers 0.05 3 '^route/[^/]+/T:4096/E:(64|256)/'

{
  echo "load_end: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "run_seconds: $(($(date +%s) - start))"
} >>"$out_json/run_info.txt"
echo "== benchmarks took $(($(date +%s) - start)) s; JSON in $out_json"
render
