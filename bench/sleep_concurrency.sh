#!/usr/bin/env bash
# 10,000 concurrent requests whose access handler does ngx.sleep(0.1), on one worker, tidegate
# side by side with nginx + lua-nginx-module (Debian's nginx and libnginx-mod-http-lua, the same
# handlers as access_by_lua_block/content_by_lua_block), alternating over rounds, medians
# reported with ratios:
#   - HTTP/1.1: 10,000 connections opened first, then one request on each at once
#     (bench/sleep_concurrency.rs): wall time until every answer is in, and proxy memory per
#     in-flight request (RSS at its peak minus RSS before, and tidegate's Lua heap, sampled while
#     the requests are in flight);
#   - HTTP/2 (h2c): h2load, 100 connections x 100 concurrent streams = 10,000 requests in flight;
#   - for both, the CPU time each proxy spent per request, user and kernel, over all rounds (for
#     HTTP/1.1 from the first request to the last answer, without accepting the connections).
# Each proxy serves every round from the same process, as a long-running proxy would. Loopback
# only; bounded by the request count.
#
# Usage: bench/sleep_concurrency.sh [requests] [rounds]
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-10000}"
ROUNDS="${2:-3}"
ulimit -n "$(ulimit -Hn)"

. bench/lib.sh
need h2load nghttp2-client
need nginx nginx libnginx-mod-http-lua
[ -f /usr/lib/nginx/modules/ngx_http_lua_module.so ] || apt-get install -y -qq libnginx-mod-http-lua
cargo build --release --quiet --bin tidegate --example sleep_concurrency
CLIENT=target/release/examples/sleep_concurrency

WORK=$(mktemp -d)
PIDS=()
cleanup() {
  kill "${PIDS[@]}" 2>/dev/null || true
  [ -f "$WORK/nginx.pid" ] && kill "$(cat "$WORK/nginx.pid")" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

mkdir "$WORK/manifests"
cat > "$WORK/manifests/sleep.yaml" <<'YAML'
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
cat > "$WORK/nginx.conf" <<NGX
load_module /usr/lib/nginx/modules/ndk_http_module.so;
load_module /usr/lib/nginx/modules/ngx_http_lua_module.so;
worker_processes 1;
worker_rlimit_nofile $((N * 2 + 1024));
pid $WORK/nginx.pid;
error_log $WORK/nginx.err warn;
events { worker_connections $((N + 1024)); }
http {
  access_log off;
  server {
    listen 127.0.0.1:18190 backlog=4096;
    listen 127.0.0.1:18191 http2;
    server_name sleep.bench;
    location / {
      access_by_lua_block { ngx.sleep(0.1) }
      content_by_lua_block { ngx.say("ok") }
    }
  }
}
NGX

setsid target/release/tidegate standalone --manifests "$WORK/manifests" --workers 1 --no-access-log \
  --http-addr 127.0.0.1:18080 --https-addr 127.0.0.1:18443 --admin-addr 127.0.0.1:19901 >/dev/null 2>"$WORK/proxy.log" &
TIDEGATE=$!
PIDS+=("$TIDEGATE")
nginx -p "$WORK" -c "$WORK/nginx.conf" -e "$WORK/nginx.err"
for _ in $(seq 100); do curl -fs 127.0.0.1:19901/readyz >/dev/null && break; sleep 0.1; done
for _ in $(seq 50); do [ -s "$WORK/nginx.pid" ] && break; sleep 0.1; done
NGINX_WORKER=$(pgrep -P "$(cat "$WORK/nginx.pid")" | head -1)
for addr in 127.0.0.1:18080 127.0.0.1:18190; do
  [ "$(curl -fs -H 'Host: sleep.bench' "http://$addr/")" = ok ] || { echo "no answer from $addr" >&2; cat "$WORK"/*.err "$WORK/proxy.log" >&2; exit 1; }
done

h2() { # address proxy_pid -> "wall_ms user_us kernel_us" for N requests, 100 connections x N/100 streams each
  local out
  out=$(cpu_split "$2" "" -- h2load -c 100 -m $((N / 100)) -n "$N" -H ':authority: sleep.bench' "http://$1/" 2>&1)
  python3 - "$out" "$N" <<'PY'
import re, sys
out, n = sys.argv[1], int(sys.argv[2])
assert re.search(rf"{n} succeeded", out) and re.search(rf"status codes: {n} 2xx", out), out
value, unit = re.search(r"finished in ([\d.]+)(us|ms|s),", out).groups()
user, kernel = re.search(r"^cpu \d+ \d+ (\d+) (\d+)$", out, re.M).groups()
print(float(value) * {"us": 0.001, "ms": 1, "s": 1000}[unit], user, kernel)
PY
}

: > "$WORK/results"
for round in $(seq "$ROUNDS"); do
  echo "round $round/$ROUNDS" >&2
  echo "tidegate h1 $($CLIENT 127.0.0.1:18080 sleep.bench "$N" "$TIDEGATE" 127.0.0.1:19901)" >> "$WORK/results"
  sleep 1
  echo "nginx h1 $($CLIENT 127.0.0.1:18190 sleep.bench "$N" "$NGINX_WORKER" -)" >> "$WORK/results"
  sleep 1
  echo "tidegate h2 $(h2 127.0.0.1:18080 "$TIDEGATE")" >> "$WORK/results"
  sleep 1
  echo "nginx h2 $(h2 127.0.0.1:18191 "$NGINX_WORKER")" >> "$WORK/results"
  sleep 1
done
# tidegate gives freed memory back after 10 s without requests (nginx keeps it).
sleep 12
rss() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
echo "idle tidegate $(rss "$TIDEGATE")" >> "$WORK/results"
echo "idle nginx $(rss "$NGINX_WORKER")" >> "$WORK/results"

python3 - "$WORK/results" "$N" "$ROUNDS" <<'PY' | tee bench/results/sleep-concurrency.md
import json, sys, datetime, os, statistics
lines = [l.split(" ", 2) for l in open(sys.argv[1]).read().splitlines() if not l.startswith("idle ")]
n, rounds = int(sys.argv[2]), int(sys.argv[3])
def runs(proxy, proto):
    return [v for p, k, v in lines if p == proxy and k == proto]
tick_us = 1e6 / os.sysconf("SC_CLK_TCK")
def h1(proxy):
    rs = [json.loads(v) for v in runs(proxy, "h1")]
    assert all(r["ok"] == n for r in rs), rs
    wall = statistics.median(r["wall_ms"] for r in rs)
    # CPU over all rounds together: a round's CPU time is a few dozen clock ticks.
    cpu = [sum(r[k] for r in rs) * tick_us / (n * len(rs)) for k in ("user_ticks", "kernel_ticks")]
    # Memory from the first round, when both processes are fresh: later rounds reuse what the
    # first one allocated.
    rss = (rs[0]["rss_peak_kib"] - rs[0]["rss_idle_kib"]) / n
    lua = (rs[0]["lua_peak_bytes"] - rs[0]["lua_idle_bytes"]) / n / 1024
    return wall, rss, lua, cpu
def h2(proxy):
    rs = [[float(x) for x in v.split()] for v in runs(proxy, "h2")]
    return statistics.median(r[0] for r in rs), [sum(r[i] for r in rs) / (n * len(rs)) for i in (1, 2)]
t1, n1 = h1("tidegate"), h1("nginx")
t2, n2 = h2("tidegate"), h2("nginx")
print(f"Concurrent sleeping requests, {datetime.date.today()} (`bench/sleep_concurrency.sh {n} {rounds}`): medians of {rounds} rounds,")
print(f"alternating tidegate and nginx + lua-nginx-module, 1 worker each; {os.cpu_count()} cores shared by the load")
print("generator and the proxy. Each request sleeps 100 ms in its access handler, then says `ok`.\n")
print("| | tidegate | nginx + Lua | tidegate / nginx |")
print("|---|---|---|---|")
print(f"| HTTP/1.1, {n:,} connections, one request each: wall time | {t1[0]:.0f} ms | {n1[0]:.0f} ms | {t1[0] / n1[0]:.2f}x |")
print(f"| HTTP/2, 100 connections x {n // 100} streams: wall time | {t2[0]:.0f} ms | {n2[0]:.0f} ms | {t2[0] / n2[0]:.2f}x |")
def cpu(t, g, label):
    ts, gs = sum(t), sum(g)
    print(f"| {label}: proxy CPU per request, user + kernel | {ts:.1f} µs ({t[0]:.1f} + {t[1]:.1f}) | {gs:.1f} µs ({g[0]:.1f} + {g[1]:.1f}) | {ts / gs:.2f}x |")
cpu(t1[3], n1[3], "HTTP/1.1")
cpu(t2[1], n2[1], "HTTP/2")
print(f"| proxy memory per in-flight request (HTTP/1.1, first round) | {t1[1]:.1f} KiB | {n1[1]:.1f} KiB | {t1[1] / n1[1]:.2f}x |")
print(f"| of which the Lua heap | {t1[2]:.2f} KiB | | |")
idle = dict(l.split()[1:] for l in open(sys.argv[1]).read().splitlines() if l.startswith("idle "))
t, g = int(idle["tidegate"]) / 1024, int(idle["nginx"]) / 1024
print(f"| RSS once idle again, 12 s after the last round | {t:.0f} MiB | {g:.0f} MiB | {t / g:.2f}x |")
print(f"\nAll {n:,} requests answered 200 in every run.")
PY
