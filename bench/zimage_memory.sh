#!/usr/bin/env bash
# Full-size Z-Image-Turbo on this machine, with random weights (bench/make_zimage_full.py):
# ComfyUI's split files with a Q8_0 GGUF transformer and the bf16 Qwen3-4B text encoder,
# served the way `pictor generate` loads them (dtype auto, the machine's memory budget),
# at 512² (2 steps) and 1024² (1 step): load time, encode/denoise/decode times and peak RSS.
# The full bf16 transformer (12.3 GB) with the bf16 encoder (8 GB) is tried first at 512²,
# 1 step, when its file exists (bench/make_zimage_full.py does not make it: disk). Last, the
# 512² run again within a 12 GiB budget, where the encoder and transformer take turns.
#
#   bench/zimage_memory.sh
#
# Results: one line per run on stdout and in ~/.cache/pictor/bench/zimage-memory-results.txt.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE=${PICTOR_BENCH_CACHE:-$HOME/.cache/pictor/bench}
DIR=$CACHE/zimage-full
RESULTS=$CACHE/zimage-memory-results.txt
PICTOR=target/release/pictor

cargo build --release -p pictor >&2
[ -f "$DIR/qwen_3_4b.safetensors" ] || ~/.cache/pictor/venv-zimage/bin/python bench/make_zimage_full.py >&2

log() { echo "$*" | tee -a "$RESULTS"; }

run() { # label model size steps [memory budget]
  local label=$1 model=$2 size=$3 steps=$4 budget=${5:-auto} out
  out=$(mktemp)
  if PICTOR_MEMORY_BUDGET=$budget /usr/bin/time -v "$PICTOR" generate --model "$model" --prompt "a white siamese cat on a red sofa" \
      --size "$size" --steps "$steps" --seed 1 -o "$CACHE/zimage-$label.png" >"$out" 2>&1; then
    local line rss
    line=$(grep -E "^1 image|loaded from" "$out" | tr '\n' ' ' || true)
    rss=$(awk '/Maximum resident set size/ {printf "%.2f GiB", $6/1048576}' "$out")
    log "$(date -u +%FT%TZ) $label: $line; peak RSS $rss; wall $(awk -F': ' '/Elapsed \(wall/ {print $2}' "$out")"
  else
    log "$(date -u +%FT%TZ) $label: FAILED: $(grep -iE "error|refused|memory" "$out" | head -2 | tr '\n' ' ')"
  fi
  rm -f "$out"
}

log "$(date -u +%FT%TZ) CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) threads"
[ -f "$DIR/z_image_turbo_bf16.safetensors" ] && run bf16-512 "$DIR/z_image_turbo_bf16.safetensors" 512x512 1
run q8_0-512 "$DIR/z_image_turbo-Q8_0.gguf" 512x512 2
run q8_0-1024 "$DIR/z_image_turbo-Q8_0.gguf" 1024x1024 1
# A 12 GiB budget: the bf16 text encoder (8.0 GB) and the Q8_0 transformer (6.5 GB) take turns.
run q8_0-512-staged-12GiB "$DIR/z_image_turbo-Q8_0.gguf" 512x512 2 "12 GiB"
