#!/usr/bin/env bash
# Starts a cluster for the client tests: PostgreSQL and S3 through scripts/services, then
# API nodes and workers as separate `pictor` processes on loopback (`pictor serve --role
# api|worker`), on a database and a store prefix of their own. Prints, one per line:
# `KEY <key>`, `DIR <dir>`, `DATABASE <url>`, `ENV <NAME>=<value>` (what a node of
# this cluster needs in its environment), then `API <url> <pid>` and
# `WORKER <pid> <log> <url>` (its /healthz and /metrics) for each process. The caller
# kills the PIDs.
# Usage: cluster.sh [API_NODES] [WORKERS]
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
bin="${PICTOR_BIN:-$root/target/debug/pictor}"
apis="${1:-2}"
workers="${2:-2}"
"$root/scripts/services" up >&2
eval "$("$root/scripts/services" env)"
dir="$(mktemp -d)"
name="pictor_cluster_$(od -An -N4 -tx4 /dev/urandom | tr -d ' ')"
base="${PICTOR_DATABASE_URL%/*}"
psql "$PICTOR_DATABASE_URL" -qc "CREATE DATABASE $name" >&2
export PICTOR_DATABASE_URL="$base/$name"
export PICTOR_STORAGE__URL="s3://pictor/$name"
cat > "$dir/pictor.toml" << TOML
shutdown_grace_secs = 5
lora_dir = "$root/tests/data/tiny-loras"
[limits]
queue_depth = 16
[models.tiny-flux-schnell]
path = "$root/tests/data/tiny-flux-schnell"
aliases = ["gpt-image-1"]
default_size = "64x64"
min_side = 32
max_steps = 200
TOML
key="$(PICTOR_DATA_DIR="$dir/keys" "$bin" --config "$dir/pictor.toml" keys create --name cluster-tests 2> "$dir/keys.log")" \
  || { cat "$dir/keys.log" >&2; exit 1; }
echo "KEY $key"
echo "DIR $dir"
echo "DATABASE $PICTOR_DATABASE_URL"
# What a node of this cluster needs in its environment (to start more of them).
for var in PICTOR_DATABASE_URL PICTOR_STORAGE__URL PICTOR_STORAGE__ENDPOINT \
  PICTOR_STORAGE__REGION AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY; do
  echo "ENV $var=${!var}"
done
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
for i in $(seq 1 "$workers"); do
  port="$(free_port)"
  PICTOR_DATA_DIR="$dir/worker$i" "$bin" --config "$dir/pictor.toml" serve --role worker \
    --listen "127.0.0.1:$port" > "$dir/worker$i.log" 2>&1 &
  echo "WORKER $! $dir/worker$i.log http://127.0.0.1:$port"
done
urls=()
for i in $(seq 1 "$apis"); do
  port="$(free_port)"
  PICTOR_DATA_DIR="$dir/api$i" "$bin" --config "$dir/pictor.toml" serve --role api \
    --listen "127.0.0.1:$port" > "$dir/api$i.log" 2>&1 &
  echo "API http://127.0.0.1:$port $!"
  urls+=("http://127.0.0.1:$port")
done
# Ready when every API node serves the model, which needs a worker to advertise it.
for url in "${urls[@]}"; do
  for _ in $(seq 1 600); do
    if curl -fs "$url/readyz" > /dev/null 2>&1; then continue 2; fi
    sleep 0.1
  done
  echo "the cluster did not become ready; logs in $dir" >&2
  tail -5 "$dir"/*.log >&2
  exit 1
done
