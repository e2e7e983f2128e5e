#!/usr/bin/env bash
# Fresh-environment build, before and after the lock, in one run: `make env` of a clean clone of
# BEFORE (default 1fce62a: pip, setup.cfg's open ranges) and of AFTER (default HEAD: uv, exactly
# requirements.lock), each with its own empty download cache (PIP_CACHE_DIR, UV_CACHE_DIR), so
# both fetch every package from the index; prints the wall time of each and their ratio.
#   bash bench/env_build.sh [BEFORE] [AFTER]
set -euo pipefail
cd "$(dirname "$0")/.."
before=${1:-1fce62a}
after=${2:-HEAD}
work=$(mktemp -d /tmp/env_build.XXXX)
trap 'rm -rf "$work"' EXIT
build() {  # build NAME COMMIT: seconds of `make env` in a clean clone with cold caches
  local dir="$work/$1"
  git clone -q . "$dir" && git -C "$dir" checkout -q "$2"
  mkdir -p "$work/cache-$1"
  local start end
  start=$(date +%s.%N)
  (cd "$dir" && PIP_CACHE_DIR="$work/cache-$1/pip" UV_CACHE_DIR="$work/cache-$1/uv" make env > "$work/$1.log" 2>&1) || { tail -20 "$work/$1.log"; exit 1; }
  end=$(date +%s.%N)
  echo "$end - $start" | bc
}
t_before=$(build before "$before")
t_after=$(build after "$after")
printf 'make env, fresh clone, cold cache: %s (%s) %.0f s; %s (%s) %.0f s; ratio %.2f\n' \
  "$before" "pip" "$t_before" "$after" "uv + lock" "$t_after" "$(echo "$t_before / $t_after" | bc -l)"
