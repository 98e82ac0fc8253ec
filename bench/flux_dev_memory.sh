#!/usr/bin/env bash
# Full-size FLUX.1-dev beside FLUX.1-schnell on this machine, both Q8_0 with random weights:
# the dev transformer from bench/make_flux_dev_gguf.py, the schnell files, T5, CLIP and
# autoencoder from bench/fullsize.sh. `pictor generate` at 512², 2 steps (dev with guidance
# 3.5), one after the other in one run: per-step time, load, decode and peak RSS.
#
#   bench/flux_dev_memory.sh
#
# Results: one line per run on stdout and in ~/.cache/pictor/bench/fullsize-results.txt.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE=${PICTOR_BENCH_CACHE:-$HOME/.cache/pictor/bench}
RESULTS=$CACHE/fullsize-results.txt
PICTOR=target/release/pictor
cargo build --release -p pictor >&2
[ -f "$CACHE/flux-full-q8_0/flux1-schnell-Q8_0.gguf" ] || PICTOR_FULLSIZE_FILES_ONLY=1 bench/fullsize.sh q8_0 >&2
[ -f "$CACHE/flux-full-q8_0-dev/flux1-dev-Q8_0.gguf" ] || ~/.cache/pictor/venv-zimage/bin/python bench/make_flux_dev_gguf.py >&2

log() { echo "$*" | tee -a "$RESULTS"; }
run() { # label dir [generate flags]
  local label=$1 dir=$2 out
  shift 2
  out=$(mktemp)
  if /usr/bin/time -v "$PICTOR" generate --model "$dir" --prompt "a white siamese cat on a red sofa" \
      --size 512x512 --steps 2 --seed 1 -o "$CACHE/fullsize-$label.png" "$@" >"$out" 2>&1; then
    log "$(date -u +%FT%TZ) $label: $(grep -E "^1 image" "$out"); peak RSS $(awk '/Maximum resident set size/ {printf "%.2f GiB", $6/1048576}' "$out")"
  else
    log "$(date -u +%FT%TZ) $label: FAILED: $(grep -iE "^error" "$out" | head -1)"
  fi
  rm -f "$out"
}
run schnell-q8_0-2steps "$CACHE/flux-full-q8_0"
run dev-q8_0-2steps "$CACHE/flux-full-q8_0-dev" --guidance 3.5
