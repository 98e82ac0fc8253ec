#!/usr/bin/env bash
# Z-Image-Turbo's transformer at full width (bench/make_fullwidth.py --zimage: 3840 wide, 30
# heads, 2 main blocks and 1 refiner block each for the image and the caption), one forward
# with a 128-token caption, Pictor against diffusers 0.40 side by side in one run: each
# size and dtype alternated over `ROUNDS` rounds of `REPS` repetitions, 2 threads.
#
#   bench/zimage_parts.sh [SIZES (default "512 1024")] [DTYPES (default "f32 bf16")]
#
# Prints one JSON line per engine, size, dtype and round (times, median, memory).
set -euo pipefail
cd "$(dirname "$0")/.."

SIZES=${1:-512 1024}
DTYPES=${2:-f32 bf16}
ROUNDS=${ROUNDS:-2}
REPS=${REPS:-2}
MODEL=${MODEL:-$HOME/.cache/pictor/bench/zimage-fullwidth-2l1r}
PY=${PY:-$HOME/.cache/pictor/venv-zimage/bin/python}

[ -d "$MODEL" ] || "$PY" bench/make_fullwidth.py --zimage --double 2 --single 1 >&2
cargo bench -p pictor-engine --bench components --no-run >&2
for size in $SIZES; do
  for dtype in $DTYPES; do
    for round in $(seq 1 "$ROUNDS"); do
      echo "# size $size dtype $dtype round $round"
      RAYON_NUM_THREADS=2 cargo bench -q -p pictor-engine --bench components -- --model "$MODEL" \
        --part zimage --size "$size" --reps "$REPS" --dtype "$dtype" 2> /dev/null | tail -1
      "$PY" bench/diffusers_part.py --model "$MODEL" --part zimage --size "$size" --reps "$REPS" \
        --dtype "$dtype" --threads 2 2> /dev/null | tail -1
    done
  done
done
