#!/usr/bin/env bash
# Full-size FLUX.1-schnell on this machine, with random weights (the real ones cannot be
# downloaded here): the files users hold (bf16 transformer, fp16 T5-XXL, CLIP-L, an AE),
# `pictor quantize` to Q8_0 and Q4_K, then `pictor generate` at 512², 4 steps, with load
# time, seconds per step, decode time, total and peak RSS for each. bf16 is tried first:
# on a 24 GiB machine it must be refused before loading, not killed.
#
#   bench/fullsize.sh [--prune] [q8_0] [q4_k]      (default: both)
#
# Files live in ~/.cache/pictor/bench (about 21 GB with --prune, which deletes each bf16/fp16
# source once its quantized copies exist; 54 GB without). Every step is skipped when its
# output exists, so an interrupted run resumes. Results: one line per run on stdout and in
# ~/.cache/pictor/bench/fullsize-results.txt.
set -euo pipefail
cd "$(dirname "$0")/.."

PRUNE=0
TYPES=()
for a in "$@"; do
  case "$a" in
    --prune) PRUNE=1 ;;
    *) TYPES+=("$a") ;;
  esac
done
[ ${#TYPES[@]} -gt 0 ] || TYPES=(q8_0 q4_k)

CACHE=${PICTOR_BENCH_CACHE:-$HOME/.cache/pictor/bench}
SRC=$CACHE/flux-full
RESULTS=$CACHE/fullsize-results.txt
PICTOR=target/release/pictor
mkdir -p "$SRC"

cargo build --release -p pictor -p pictor-engine --example random_flux --bin pictor >&2

# The autoencoder: the full-size decoder the engine bench already made (diffusers layout).
if [ ! -e "$SRC/vae" ]; then
  [ -d "$CACHE/flux-fullwidth-2d4s-t5x2/vae" ] || ~/.cache/pictor/venv-tools/bin/python bench/make_fullwidth.py >&2
  ln -sfn ../flux-fullwidth-2d4s-t5x2/vae "$SRC/vae"
fi

have_sources() { [ -f "$SRC/flux1-schnell.safetensors" ] && [ -f "$SRC/t5xxl_fp16.safetensors" ]; }
need_quant() {
  for t in "${TYPES[@]}"; do
    [ -f "$CACHE/flux-full-$t/flux1-schnell-${t^^}.gguf" ] || return 0
  done
  return 1
}

if need_quant || [ "$PRUNE" = 0 ]; then
  target/release/examples/random_flux "$SRC" clip t5 transformer >&2
fi

log() { echo "$*" | tee -a "$RESULTS"; }

run() { # label model-dir [extra generate flags]
  local label=$1 dir=$2 out
  shift 2
  out=$(mktemp)
  if /usr/bin/time -v "$PICTOR" generate --model "$dir" --prompt "a white siamese cat on a red sofa" \
      --size 512x512 --steps 4 --seed 1 -o "$CACHE/fullsize-$label.png" "$@" >"$out" 2>&1; then
    local line rss
    line=$(grep -E "^1 image" "$out" || true)
    rss=$(awk '/Maximum resident set size/ {printf "%.2f GiB", $6/1048576}' "$out")
    log "$(date -u +%FT%TZ) $label: $line; peak RSS $rss; wall $(awk -F': ' '/Elapsed \(wall/ {print $2}' "$out")"
  else
    log "$(date -u +%FT%TZ) $label: FAILED: $(grep -E "^error" "$out" | head -1)"
  fi
  rm -f "$out"
}

# PICTOR_FULLSIZE_FILES_ONLY=1: make the files (for bench/cpu_vs_sdcpp.sh), run nothing.
files_only=${PICTOR_FULLSIZE_FILES_ONLY:-}

if [ -z "$files_only" ] && have_sources && [ ! -f "$CACHE/flux-full-bf16.done" ]; then
  run bf16 "$SRC" --dtype bf16 && touch "$CACHE/flux-full-bf16.done"
fi

for t in "${TYPES[@]}"; do
  T=${t^^}
  dir=$CACHE/flux-full-$t
  mkdir -p "$dir"
  ln -sfn "$SRC/clip_l.safetensors" "$dir/clip_l.safetensors"
  ln -sfn ../flux-fullwidth-2d4s-t5x2/vae "$dir/vae"
  if [ ! -f "$dir/t5xxl-$T.gguf" ]; then
    /usr/bin/time -f "quantize t5 $T: %e s, peak RSS %M kB" "$PICTOR" quantize "$SRC/t5xxl_fp16.safetensors" --to "$t" -o "$dir/t5xxl-$T.gguf" 2>&1 | tee -a "$RESULTS"
  fi
done
[ "$PRUNE" = 1 ] && rm -f "$SRC/t5xxl_fp16.safetensors"
for t in "${TYPES[@]}"; do
  T=${t^^}
  dir=$CACHE/flux-full-$t
  if [ ! -f "$dir/flux1-schnell-$T.gguf" ]; then
    /usr/bin/time -f "quantize transformer $T: %e s, peak RSS %M kB" "$PICTOR" quantize "$SRC/flux1-schnell.safetensors" --to "$t" -o "$dir/flux1-schnell-$T.gguf" 2>&1 | tee -a "$RESULTS"
  fi
done
[ "$PRUNE" = 1 ] && rm -f "$SRC/flux1-schnell.safetensors"

[ -n "$files_only" ] && exit 0
for t in "${TYPES[@]}"; do
  run "$t" "$CACHE/flux-full-$t"
done
