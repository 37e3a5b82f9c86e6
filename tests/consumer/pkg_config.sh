#!/usr/bin/env bash
# A user's Makefile-style build through pkg-config against the installed tree. With OpenMP on
# (5th argument ON) the .pc file must carry -fopenmp in Cflags and Libs, and a program built with
# `pkg-config --cflags --libs` must see OpenMP; with it off, neither.
set -euo pipefail
prefix=$1; src=$2; out=$3; cxx=${4:-c++}; openmp=${5:-}
export PKG_CONFIG_PATH="$prefix/share/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"
pkg-config --modversion switchyard
cflags=$(pkg-config --cflags switchyard)
libs=$(pkg-config --libs switchyard)
echo "cflags: $cflags"
echo "libs: $libs"
case "$openmp" in
  ON | on | TRUE | true | 1) want=1 ;;
  *) want=0 ;;
esac
has() { [[ " $1 " == *" -fopenmp "* ]] && echo 1 || echo 0; }
if [[ $(has "$cflags") != "$want" || $(has "$libs") != "$want" ]]; then
  echo "FAILED: switchyard.pc should have -fopenmp in Cflags and Libs exactly when the build" \
    "used OpenMP (here: $openmp)" >&2
  exit 1
fi
# shellcheck disable=SC2086  # pkg-config output is meant to be word-split
echo "#include <switchyard/config.hpp>
static_assert(SWITCHYARD_HAS_OPENMP == $want, \"pkg-config flags: OpenMP should be $want\");" |
  "$cxx" $cflags -x c++ -fsyntax-only -
# shellcheck disable=SC2086
"$cxx" $cflags -O1 "$src" -o "$out" $libs
"$out"
