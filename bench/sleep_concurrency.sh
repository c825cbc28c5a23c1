#!/usr/bin/env bash
# 10,000 concurrent requests whose access handler does ngx.sleep(0.1), on one worker: how long
# until all are answered, and what each in-flight request costs in memory. Loopback only;
# bounded by the request count.
#
# Usage: bench/sleep_concurrency.sh [requests]
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-10000}"
ulimit -n "$(ulimit -Hn)"
cargo build --release --quiet --bin tidegate --example sleep_concurrency
WORK=$(mktemp -d)
PIDS=()
cleanup() { kill "${PIDS[@]}" 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
cat > "$WORK/sleep.yaml" <<'YAML'
apiVersion: tidegate.dev/v1alpha1
kind: LuaRoute
metadata: {name: sleepy, namespace: bench}
spec:
  hosts: [sleep.bench]
  routes:
  - name: sleep
    match: {path: {type: Prefix, value: /}}
    lua:
      access: ngx.sleep(0.1)
      content: ngx.say("ok")
YAML
target/release/tidegate standalone --manifests "$WORK" --workers 1 --no-access-log \
  --http-addr 127.0.0.1:18080 --https-addr 127.0.0.1:18443 --admin-addr 127.0.0.1:19901 >/dev/null 2>"$WORK/proxy.log" & PROXY=$!
PIDS+=("$PROXY")
for _ in $(seq 100); do curl -fs 127.0.0.1:19901/readyz >/dev/null && break; sleep 0.1; done
RESULT=$(target/release/examples/sleep_concurrency 127.0.0.1:18080 sleep.bench "$N" "$PROXY" 127.0.0.1:19901)
python3 - "$RESULT" <<'PY' | tee bench/results/sleep-concurrency.md
import json, sys, datetime, os
r = json.loads(sys.argv[1])
n = r["requests"]
rss = (r["rss_peak_kib"] - r["rss_idle_kib"]) * 1024 / n
lua = (r["lua_peak_bytes"] - r["lua_idle_bytes"]) / n
print(f"Concurrent sleeping requests, {datetime.date.today()} (`bench/sleep_concurrency.sh {n}`): {os.cpu_count()} cores shared by")
print("the client and the proxy (1 worker); connections opened first, then one request on each at once.\n")
print("| requests | answered 200 | wall time (sleep is 100 ms) | proxy memory per in-flight request | of which Lua |")
print("|---|---|---|---|---|")
print(f"| {n:,} | {r['ok']:,} | {r['wall_ms']:.0f} ms | {rss/1024:.1f} KiB | {lua/1024:.2f} KiB |")
PY
