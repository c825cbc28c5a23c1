#!/usr/bin/env bash
# Per-request cost of Lua: the same route with and without an `access` + `header_filter`
# handler, measured as the proxy's CPU time per request (from /proc, so a noisy machine moves it
# less than throughput), alternating plain and Lua over 3 rounds, medians reported.
#
# Usage: bench/lua_cost.sh [seconds-per-run]   (loopback only; each run is bounded by time)
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION="${1:-5}"
ROUNDS=3

. bench/lib.sh
need wrk wrk
cargo build --release --quiet
BIN=target/release/tidegate

WORK=$(mktemp -d)
cleanup() { kill "${PIDS[@]}" 2>/dev/null || true; rm -rf "$WORK"; }
PIDS=()
trap cleanup EXIT

cat > "$WORK/bench.yaml" <<'YAML'
apiVersion: v1
kind: Service
metadata: {name: upstream, namespace: bench}
spec:
  ports: [{name: http, port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: upstream, namespace: bench, labels: {kubernetes.io/service-name: upstream}}
addressType: IPv4
ports: [{name: http, port: 19000}]
endpoints: [{addresses: ["127.0.0.1"]}]
---
apiVersion: tidegate.dev/v1alpha1
kind: LuaRoute
metadata: {name: handlers, namespace: bench}
spec:
  lua:
    access: ngx.req.set_header("X-Bench", "1")
    headerFilter: ngx.header["X-Lua"] = "1"
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: plain, namespace: bench}
spec:
  ingressClassName: tidegate
  rules:
  - host: plain.bench
    http: {paths: [{path: /, pathType: Prefix, backend: {service: {name: upstream, port: {number: 80}}}}]}
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: lua, namespace: bench, annotations: {tidegate.dev/lua-route: handlers}}
spec:
  ingressClassName: tidegate
  rules:
  - host: lua.bench
    http: {paths: [{path: /, pathType: Prefix, backend: {service: {name: upstream, port: {number: 80}}}}]}
YAML

setsid "$BIN" echo --listen 127.0.0.1:19000 --service upstream >/dev/null 2>&1 & PIDS+=($!)
setsid "$BIN" standalone --manifests "$WORK" --workers 1 --no-access-log \
  --http-addr 127.0.0.1:18080 --https-addr 127.0.0.1:18443 --admin-addr 127.0.0.1:19901 >/dev/null 2>"$WORK/proxy.log" & PROXY=$!
PIDS+=("$PROXY")
for _ in $(seq 100); do curl -fs 127.0.0.1:19901/readyz >/dev/null && break; sleep 0.1; done
curl -fs -H 'Host: lua.bench' 127.0.0.1:18080/ -o /dev/null -D - | grep -qi '^x-lua: 1' || { echo "Lua route not answering" >&2; exit 1; }

run() { # host -> "requests cpu_seconds p50_ms p99_ms"
  local reqs p50 p99 user kernel
  read -r reqs _ p50 p99 _ _ user kernel < <(cpu_split "$PROXY" "" -- \
    wrk -t1 -c16 -d"${DURATION}s" --latency -H "Host: $1" http://127.0.0.1:18080/ | wrk_stats)
  echo "$reqs $(python3 -c "print(($user + $kernel) / 1e6)") $p50 $p99"
}

echo "round,variant,requests,cpu_s,us_cpu_per_request,p50_ms,p99_ms" > "$WORK/rows.csv"
for round in $(seq "$ROUNDS"); do
  for variant in plain lua; do
    read -r reqs cpu p50 p99 < <(run "$variant.bench")
    echo "$round,$variant,$reqs,$cpu,$(python3 -c "print(round($cpu * 1e6 / $reqs, 2))"),$p50,$p99" >> "$WORK/rows.csv"
  done
done

python3 - "$WORK/rows.csv" "$DURATION" "$ROUNDS" <<'PY' | tee "bench/results/lua-cost.md"
import csv, statistics, sys, datetime, os
rows = list(csv.DictReader(open(sys.argv[1])))
duration, rounds = sys.argv[2], sys.argv[3]
def med(variant, key): return statistics.median(float(r[key]) for r in rows if r["variant"] == variant)
plain, lua = med("plain", "us_cpu_per_request"), med("lua", "us_cpu_per_request")
rps = lambda v: med(v, "requests") / float(duration)
print(f"Per-request Lua cost, {datetime.date.today()} (`bench/lua_cost.sh {duration}`): {os.cpu_count()} cores shared by")
print(f"wrk (1 thread, 16 connections), the proxy (1 worker) and the upstream; {rounds} alternating rounds of {duration} s, medians.\n")
print("| route | proxy CPU per request | requests/s | p50 | p99 |")
print("|---|---|---|---|---|")
for v, name in (("plain", "plain Ingress"), ("lua", "Ingress + LuaRoute access and header_filter handlers")):
    print(f"| {name} | {med(v, 'us_cpu_per_request'):.1f} µs | {rps(v):,.0f} | {med(v, 'p50_ms'):.2f} ms | {med(v, 'p99_ms'):.2f} ms |")
print(f"\n**Lua adds {lua - plain:.1f} µs of proxy CPU per request** (access + header_filter, each its own entry coroutine, taken from the VM's pool).")
PY
