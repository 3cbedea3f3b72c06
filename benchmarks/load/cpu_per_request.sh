#!/usr/bin/env bash
# CPU microseconds per request of each server process under the same wrk load.
#
# Requests/s on this shared 2-core machine swing by 20% or more between rows; the CPU time a server process
# spends per request (utime + stime from /proc, divided by the requests wrk completed) is far steadier, and on
# a saturated machine it is what throughput is the inverse of. Every server is a uvicorn process on loopback;
# the load is bounded (wrk, 32 connections, 5 s per row, two rounds) and stops by itself. Needs wrk.
#
#   bash benchmarks/load/cpu_per_request.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
command -v wrk >/dev/null || { echo "needs wrk (apt-get install wrk)" >&2; exit 1; }
PY=${PYTHON:-python}
base=${BASE_PORT:-18300}
export NEXUS_BENCH_UPSTREAM=http://127.0.0.1:$base
opts=(--log-level warning --no-access-log --no-proxy-headers)
rows=(
  "benchmarks.load.apps:minimal_aiohttp"
  "benchmarks.load.apps:gateway_proxy_aiohttp"
  "sample_gateway.app:bench_app"
)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
"$PY" -m uvicorn --factory benchmarks.load.apps:upstream --port "$base" "${opts[@]}" >/dev/null 2>&1 &
pids+=($!)
for i in "${!rows[@]}"; do
  "$PY" -m uvicorn --factory "${rows[$i]}" --port $((base + 1 + i)) "${opts[@]}" >/dev/null 2>&1 &
  pids+=($!)
done
sleep 5
tick=$(getconf CLK_TCK)
for round in 1 2; do
  for i in "${!rows[@]}"; do
    port=$((base + 1 + i))
    pid=${pids[$((i + 1))]}
    wrk -t2 -c32 -d2s "http://127.0.0.1:$port/x" >/dev/null  # warm the pools
    before=$(awk '{print $14 + $15}' "/proc/$pid/stat")
    served=$(wrk -t2 -c32 -d5s "http://127.0.0.1:$port/x" | awk '/requests in/ {print $1}')
    after=$(awk '{print $14 + $15}' "/proc/$pid/stat")
    printf 'round %d  %-44s %7d requests  %5d µs CPU/request\n' "$round" "${rows[$i]}" "$served" \
      $(((after - before) * 1000000 / tick / served))
  done
done
