#!/usr/bin/env bash
# Seconds per image of the shipped model (pictor-tiny) at its native 128x128, 4 steps, on
# this machine: `pictor generate` (release build) with n = 1 and n = 4, RUNS times each,
# printing the median of each phase per image. Usage: bench/tiny.sh [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-5}"
cargo build -q --release -p pictor
bin=target/release/pictor
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
for n in 1 4; do
  for i in $(seq 1 "$runs"); do
    "$bin" generate --model pictor-tiny -p "a small red circle on a blue background in the top left" \
      --size 128x128 --steps 4 --seed "$i" -n "$n" -o "$out/x.png" 2>&1 | grep -E '^[0-9]+ image' || true
  done | python3 -c '
import re, statistics, sys
n = int(sys.argv[1])
rows = [list(map(float, re.findall(r"(encode|denoise|decode) ([0-9.]+)s", l) and
        [m[1] for m in re.findall(r"(encode|denoise|decode) ([0-9.]+)s", l)])) for l in sys.stdin]
rows = [r for r in rows if len(r) == 3]
med = [statistics.median(c) / n for c in zip(*rows)]
print(f"n={n}: per image {sum(med):.3f} s (encode {med[0]:.3f}, denoise {med[1]:.3f}, decode {med[2]:.3f}); "
      f"median of {len(rows)} runs")
' "$n"
done
