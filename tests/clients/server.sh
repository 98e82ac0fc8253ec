#!/usr/bin/env bash
# Starts `pictor serve` for the SDK client tests, on a free loopback port with a fresh
# data dir and one API key, and prints `URL KEY PID DIR`. The caller kills PID.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
bin="${PICTOR_BIN:-$root/target/debug/pictor}"
dir="$(mktemp -d)"
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
cat > "$dir/pictor.toml" <<TOML
listen = "127.0.0.1:$port"
data_dir = "$dir/data"
lora_dir = "$root/tests/data/tiny-loras"
[limits]
queue_depth = 1
[models.tiny-flux-schnell]
path = "$root/tests/data/tiny-flux-schnell"
aliases = ["gpt-image-1"]
default_size = "64x64"
min_side = 32
[models.tiny-flux-dev]
path = "$root/tests/data/tiny-flux-dev"
default_size = "64x64"
min_side = 32
[models.tiny-z-image]
path = "$root/tests/data/tiny-z-image-turbo-split/z_image_turbo-Q8_0.gguf"
default_size = "64x64"
min_side = 32
TOML
# The playground's test also serves the model shipped in the binary.
if [ -n "${PICTOR_TEST_WITH_SHIPPED:-}" ]; then
  cat >> "$dir/pictor.toml" <<TOML
[models.pictor-tiny]
path = "pictor-tiny"
default_size = "128x128"
min_side = 128
max_side = 128
TOML
fi
key="$("$bin" --config "$dir/pictor.toml" keys create --name sdk-tests 2>"$dir/keys.log")" || { cat "$dir/keys.log" >&2; exit 1; }
"$bin" --config "$dir/pictor.toml" serve > "$dir/serve.log" 2>&1 &
pid=$!
for _ in $(seq 1 300); do
  if curl -fs "http://127.0.0.1:$port/readyz" > /dev/null 2>&1; then
    echo "http://127.0.0.1:$port $key $pid $dir"
    exit 0
  fi
  sleep 0.1
done
echo "pictor did not become ready; log:" >&2
cat "$dir/serve.log" >&2
kill "$pid" 2>/dev/null || true
exit 1
