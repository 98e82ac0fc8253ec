#!/usr/bin/env bash
# `pictor serve` with the full-size FLUX.1-schnell in Q4_K (made by bench/fullsize.sh):
# one 512² request with 4 steps, then four more 512² requests with 1 step each (same
# parts run, shorter), reading the server's resident memory from /metrics after each, to
# check it stays flat. Prints one line per request and the server's peak RSS.
#
#   bench/fullsize_serve.sh [q4_k|q8_0]
set -euo pipefail
cd "$(dirname "$0")/.."
TYPE=${1:-q4_k}
CACHE=${PICTOR_BENCH_CACHE:-$HOME/.cache/pictor/bench}
MODEL=$CACHE/flux-full-$TYPE
[ -f "$MODEL/flux1-schnell-${TYPE^^}.gguf" ] || { echo "run bench/fullsize.sh $TYPE first" >&2; exit 1; }
cargo build --release -p pictor >&2

WORK=$(mktemp -d)
PORT=$((20000 + RANDOM % 20000))
cat > "$WORK/pictor.toml" <<EOF
listen = "127.0.0.1:$PORT"
data_dir = "$WORK/data"
[limits]
request_timeout_secs = 7200
[models.flux-1-schnell]
path = "$MODEL"
default_size = "512x512"
min_side = 256
max_side = 1024
EOF
/usr/bin/time -v target/release/pictor --config "$WORK/pictor.toml" serve >"$WORK/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true; rm -rf "$WORK"' EXIT
URL=http://127.0.0.1:$PORT
until curl -sf "$URL/readyz" >/dev/null; do
  kill -0 $SERVER 2>/dev/null || { cat "$WORK/server.log"; exit 1; }
  sleep 2
done
rss() { curl -s "$URL/metrics" | awk '/^pictor_process_resident_bytes/ {printf "%.2f GiB", $2/1073741824}'; }
peak() { curl -s "$URL/metrics" | awk '/^pictor_process_peak_resident_bytes/ {printf "%.2f GiB", $2/1073741824}'; }
echo "$(date -u +%FT%TZ) $TYPE ready; resident $(rss)"
curl -s "$URL/v1/models" | jq -c '.data[0].memory | map({part, gb: (.bytes/1e9*100|round/100), storage, resident})'
for i in 1 2 3 4 5; do
  steps=$([ "$i" = 1 ] && echo 4 || echo 1)
  start=$(date +%s.%N)
  code=$(curl -s -o "$WORK/r$i.json" -w '%{http_code}' "$URL/v1/images/generations" \
    -H 'content-type: application/json' \
    -d "{\"model\":\"flux-1-schnell\",\"prompt\":\"a white siamese cat, request $i\",\"size\":\"512x512\",\"steps\":$steps,\"response_format\":\"b64_json\"}")
  end=$(date +%s.%N)
  timings=$(jq -c '.data[0].timings // .data[0].receipt.timings // empty' "$WORK/r$i.json" 2>/dev/null || true)
  printf '%s request %d: HTTP %s, %d step(s), %.1f s; resident %s; %s\n' "$(date -u +%FT%TZ)" "$i" "$code" "$steps" \
    "$(echo "$end - $start" | bc)" "$(rss)" "$timings"
done
echo "server peak RSS (VmHWM): $(peak)"
# /usr/bin/time does not pass signals on: stop the server itself.
pkill -TERM -P $SERVER || true
wait $SERVER || true
