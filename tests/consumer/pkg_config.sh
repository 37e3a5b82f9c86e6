#!/usr/bin/env bash
# A user's Makefile-style build through pkg-config against the installed tree.
set -euo pipefail
prefix=$1; src=$2; out=$3; cxx=${4:-c++}
export PKG_CONFIG_PATH="$prefix/share/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"
pkg-config --modversion switchyard
# shellcheck disable=SC2046  # pkg-config output is meant to be word-split
"$cxx" $(pkg-config --cflags switchyard) -O1 "$src" -o "$out"
"$out"
