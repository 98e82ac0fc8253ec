#!/usr/bin/env bash
# Pictor against stable-diffusion.cpp on this CPU, on the same full-size FLUX.1-schnell
# GGUF files with random weights (bench/fullsize.sh makes them: the transformer and T5
# quantized by `pictor quantize`, CLIP-L in F16, the full-size autoencoder): 512², 4
# steps, the same thread count, one engine at a time. For each it records load, text
# encoding, seconds per step, decoding, wall time and peak RSS (/usr/bin/time).
#
#   bench/cpu_vs_sdcpp.sh [q8_0] [q4_k]       (default both; THREADS=2, RUNS=1)
#
# sd-cli comes from bench/sdcpp.sh. Results: one line per run on stdout and in
# ~/.cache/pictor/bench/sdcpp-results.txt. Nothing else may run meanwhile.
set -euo pipefail
cd "$(dirname "$0")/.."
TYPES=("$@")
[ ${#TYPES[@]} -gt 0 ] || TYPES=(q8_0 q4_k)
threads=${THREADS:-2}
runs=${RUNS:-1}
CACHE=${PICTOR_BENCH_CACHE:-$HOME/.cache/pictor/bench}
SD=${PICTOR_SDCPP_CACHE:-$HOME/.cache/pictor/sdcpp}/bin/sd-cli
PICTOR=target/release/pictor
RESULTS=$CACHE/sdcpp-results.txt
PROMPT="a white siamese cat on a red sofa"
[ -x "$SD" ] || { echo "no $SD: run bench/sdcpp.sh first" >&2; exit 1; }
cargo build --release -q -p pictor

log() { echo "$*" | tee -a "$RESULTS"; }
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')
flags=$(grep -m1 '^flags' /proc/cpuinfo | grep -oE 'avx512_bf16|avx512_vnni|avx512f|avx2|amx_bf16' | sort -u | tr '\n' ' ')
log "$(date -u +%FT%TZ) $cpu ($flags), $threads threads; sd-cli $(cut -c1-60 "$(dirname "$(dirname "$SD")")/VERSION")"

for t in "${TYPES[@]}"; do
    T=${t^^}
    dir=$CACHE/flux-full-$t
    transformer=$dir/flux1-schnell-$T.gguf
    t5=$dir/t5xxl-$T.gguf
    [ -f "$transformer" ] && [ -f "$t5" ] || { echo "no $dir files: run bench/fullsize.sh $t first" >&2; exit 1; }
    vae=$(readlink -f "$dir/vae")/diffusion_pytorch_model.safetensors
    for i in $(seq 1 "$runs"); do
        out=$(mktemp)
        # Pictor: `generate` prints load, encode, per-step denoise and decode.
        if RAYON_NUM_THREADS=$threads /usr/bin/time -v "$PICTOR" generate --model "$dir" -p "$PROMPT" \
            --size 512x512 --steps 4 --seed 1 -o "$CACHE/sdcpp-pictor-$t.png" > "$out" 2>&1; then
            line=$(grep -E "^(loaded|1 image)" "$out" | tr '\n' ' ')
        else
            line="FAILED: $(grep -E '^error' "$out" | head -1)"
        fi
        log "pictor $T run $i: $line; peak RSS $(awk '/Maximum resident/ {printf "%.2f GiB", $6/1048576}' "$out"); wall $(awk -F': ' '/Elapsed \(wall/ {print $2}' "$out")"
        # stable-diffusion.cpp: -v prints each phase's time and each step's.
        if /usr/bin/time -v "$SD" --diffusion-model "$transformer" --t5xxl "$t5" \
            --clip_l "$dir/clip_l.safetensors" --vae "$vae" -p "$PROMPT" --cfg-scale 1.0 \
            --sampling-method euler --steps 4 -W 512 -H 512 -t "$threads" --seed 1 \
            -o "$CACHE/sdcpp-sd-$t.png" -v > "$out" 2>&1; then
            # Weights load lazily, per phase: the diffusion model's load is inside
            # "sampling"; the progress bar's last s/it is its mean over the steps.
            line="$(grep -aiE "loading tensors completed|get_learned_condition completed|sampling completed|decode_first_stage completed|generate_image completed" "$out" | sed -E 's/^\[[A-Z]+ *\] *[a-z_.]+:[0-9]+ *- *//' | tr '\n' ';') last progress $(grep -aoE '[0-9.]+s/it' "$out" | tail -1)"
        else
            line="FAILED: $(grep -iE 'error|fail' "$out" | head -3 | tr '\n' ' ')"
            cp "$out" "$CACHE/sdcpp-failed-$t.log"
        fi
        log "sd.cpp $T run $i: $line peak RSS $(awk '/Maximum resident/ {printf "%.2f GiB", $6/1048576}' "$out"); wall $(awk -F': ' '/Elapsed \(wall/ {print $2}' "$out")"
        rm -f "$out"
    done
done
