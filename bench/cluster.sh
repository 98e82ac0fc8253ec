#!/usr/bin/env bash
# Bench (a) of issue 20: jobs per second of real model workers, one thread each
# (RAYON_NUM_THREADS=1), 1 against 2 workers behind one API node, over PostgreSQL and
# SeaweedFS (scripts/services), through tests/clients/cluster.sh and its model (the tiny
# FLUX.1-schnell fixture) at 256x256 and 8 steps: JOBS requests (default 40), 8 at a time.
# Usage: bench/cluster.sh [JOBS]
set -euo pipefail
cd "$(dirname "$0")/.."
jobs="${1:-40}"
cargo build -q --release -p pictor
export PICTOR_BIN="$PWD/target/release/pictor" RAYON_NUM_THREADS=1
for workers in 1 2; do
  out="$(tests/clients/cluster.sh 1 "$workers")"
  python3 - "$jobs" "$workers" "$out" << 'PY'
import json, sys, time, urllib.request
from concurrent.futures import ThreadPoolExecutor
jobs, workers, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
key = next(l.split()[1] for l in out.splitlines() if l.startswith("KEY "))
api = next(l.split()[1] for l in out.splitlines() if l.startswith("API "))
def one(i):
    body = json.dumps({"model": "tiny-flux-schnell", "prompt": f"bench {i}", "size": "256x256",
                       "steps": 8, "seed": i, "response_format": "b64_json"}).encode()
    req = urllib.request.Request(api + "/v1/images/generations", body,
                                 {"Authorization": "Bearer " + key, "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        assert r.status == 200
one(jobs)  # warm up
start = time.time()
with ThreadPoolExecutor(8) as pool:
    list(pool.map(one, range(jobs)))
secs = time.time() - start
print(f"{workers} worker(s): {jobs} jobs in {secs:.1f} s, {jobs / secs:.2f} jobs/s")
PY
  for pid in $(echo "$out" | awk '$1 == "API" {print $3} $1 == "WORKER" {print $2}'); do
    kill "$pid" 2> /dev/null || true
  done
  sleep 1
done
