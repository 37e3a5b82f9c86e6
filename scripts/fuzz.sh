#!/usr/bin/env bash
# Builds switchyard's libFuzzer targets with clang++-14 in build/fuzz and runs each one
# for N seconds (default 60) on a copy of its committed seed corpus, so the corpus in
# tests/fuzz/corpus/ never grows. Exits non-zero when a target reports a finding (a
# crash, a sanitizer report, an uncaught exception, a leak, a timeout or a huge
# allocation); the input that caused it is left in build/fuzz/findings/<target>/.
#
#   scripts/fuzz.sh          # 60 s per target
#   scripts/fuzz.sh 600      # 10 min per target
#   CXX=clang++-15 JOBS=4 scripts/fuzz.sh 120
#
# Replay one finding: build/fuzz/tests/fuzz/fuzz_<target> build/fuzz/findings/<target>/crash-...
set -euo pipefail

seconds=${1:-60}
if ! [[ $seconds =~ ^[0-9]+$ ]] || ((seconds < 1)); then
  echo "usage: $0 [seconds_per_target]  (default 60)" >&2
  exit 2
fi
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=$root/build/fuzz
cxx=${CXX:-clang++-14}
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)

cmake -S "$root" -B "$build" "${generator[@]}" -DCMAKE_CXX_COMPILER="$cxx" \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSWITCHYARD_BUILD_FUZZ=ON -DSWITCHYARD_BUILD_TESTS=OFF \
  -DSWITCHYARD_BUILD_BENCH=OFF -DSWITCHYARD_BUILD_EXAMPLES=OFF -DSWITCHYARD_INSTALL=OFF \
  -DSWITCHYARD_OPENMP=OFF >/dev/null
cmake --build "$build" --target fuzz_safetensors fuzz_plan_json fuzz_layers fuzz_models -j "${JOBS:-2}"

status=0
for target in safetensors plan_json layers models; do
  corpus=$build/corpus/$target
  findings=$build/findings/$target
  rm -rf "$corpus"
  mkdir -p "$corpus" "$findings"
  cp "$root/tests/fuzz/corpus/$target/"* "$corpus/"
  echo "== fuzz_$target: ${seconds} s on a copy of tests/fuzz/corpus/$target ($(ls "$corpus" | wc -l) seeds)"
  # -timeout: one input taking 10 s is a finding (a hang); -rss_limit_mb also caps a
  # single allocation (libFuzzer's malloc limit), so a size taken from the input that
  # asks for gigabytes is reported rather than attempted.
  dict=()
  [[ -f $root/tests/fuzz/$target.dict ]] && dict=(-dict="$root/tests/fuzz/$target.dict")
  # libFuzzer prints a line per new input; the whole log goes to a file, and only its end
  # (the statistics, or the report and stack of a finding) is shown.
  log=$build/logs/fuzz_$target.log
  mkdir -p "$build/logs"
  if ! "$build/tests/fuzz/fuzz_$target" "$corpus" -max_total_time="$seconds" \
    "${dict[@]}" -timeout=10 -rss_limit_mb=2048 \
    -artifact_prefix="$findings/" -print_final_stats=1 >"$log" 2>&1; then
    tail -n 80 "$log"
    echo "== fuzz_$target: FINDING, see $findings/ and $log" >&2
    status=1
  else
    grep -E '^(Done|stat::number_of_executed_units|stat::peak_rss_mb)' "$log" || true
    echo "== fuzz_$target: no findings (log: $log)"
  fi
done
exit $status
