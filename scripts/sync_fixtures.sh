#!/usr/bin/env bash
# Copies the golden fixtures from the shared folder (where new ones arrive) into
# tests/fixtures/, which the tests read, so a clone alone passes its own tests.
#   scripts/sync_fixtures.sh [SOURCE]    SOURCE defaults to ../shared/fixtures
#   scripts/sync_fixtures.sh --check     exit 1 if tests/fixtures differs from SOURCE
set -euo pipefail
cd "$(dirname "$0")/.."
check=0
if [[ "${1:-}" == "--check" ]]; then check=1; shift; fi
src="${1:-../shared/fixtures}"
dst=tests/fixtures
if [[ ! -d "$src" ]]; then
  echo "sync_fixtures: no source folder $src" >&2
  exit 2
fi
if ((check)); then
  if diff -rq "$src" "$dst"; then echo "sync_fixtures: $dst matches $src"; exit 0; fi
  echo "sync_fixtures: $dst differs from $src; run scripts/sync_fixtures.sh" >&2
  exit 1
fi
mkdir -p "$dst"
# Mirror exactly: files removed upstream are removed here too.
rm -rf "${dst:?}"/*
cp -R "$src"/. "$dst"/
chmod -R u+w "$dst"
echo "sync_fixtures: copied $(find "$dst" -type f | wc -l) files from $src to $dst"
