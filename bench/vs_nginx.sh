#!/usr/bin/env bash
# tidegate side by side with nginx (Debian's nginx + libnginx-mod-http-lua) on the same machine,
# in the same run, alternating A B A B, medians reported with ratios.
#
# Scenarios: keep-alive GET (plain, and with Lua: access sets a request header and increments a
# shared dict, header_filter sets a response header), a new connection per request, HTTP/2
# (h2c with prior knowledge, h2load), and memory per idle keep-alive connection. Both
# proxies run 2 workers and keep connections to the same fixed-response upstream (an nginx
# `return 200`), which is also measured directly: the ceiling. Both send it the same request:
# nginx sets the X-Forwarded-* and X-Real-IP headers tidegate adds, as ingress-nginx does.
#
# Usage: bench/vs_nginx.sh [seconds-per-run] [rounds]   (loopback only; every run is bounded by time)
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION="${1:-5}"
ROUNDS="${2:-3}"
CONNECTIONS=${CONNECTIONS:-64}

. bench/lib.sh
# TIDEGATE_BIN: a tidegate binary to measure instead of this tree's release build.
bench_setup

UPSTREAM=127.0.0.1:19100
TIDEGATE=127.0.0.1:18180
NGINX=127.0.0.1:18181
NGINX_H2=127.0.0.1:18182
NGINX_TLS=127.0.0.1:18183
TIDEGATE_TLS=127.0.0.1:18543
IDLE=${IDLE:-5000}
IDLE_TLS=${IDLE_TLS:-2000}

cat > "$WORK/upstream.conf" <<NGX
worker_processes 1;
pid $WORK/upstream.pid;
error_log $WORK/upstream.err warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  server { listen $UPSTREAM reuseport; location / { return 200 "ok\n"; } }
}
NGX

# nginx's certificate is of the kind tidegate generates for itself (ECDSA P-256).
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=plain.bench \
  -keyout "$WORK/tls.key" -out "$WORK/tls.crt" 2>/dev/null

# The request headers tidegate adds upstream, as ingress-nginx's generated configuration sets
# them too: both proxies send the upstream the same request.
FORWARDED='proxy_set_header X-Forwarded-For $remote_addr; proxy_set_header X-Real-IP $remote_addr;
      proxy_set_header X-Forwarded-Proto $scheme; proxy_set_header X-Forwarded-Host $host;
      proxy_set_header X-Forwarded-Port $server_port;'
cat > "$WORK/proxy.conf" <<NGX
load_module /usr/lib/nginx/modules/ndk_http_module.so;
load_module /usr/lib/nginx/modules/ngx_http_lua_module.so;
worker_processes 2;
pid $WORK/proxy.pid;
error_log $WORK/proxy.err warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  lua_shared_dict hits 1m;
  upstream backend { server $UPSTREAM; keepalive 64; keepalive_requests 1000000; }
  server {
    listen $NGINX reuseport;
    server_name plain.bench;
    location / {
      proxy_pass http://backend; proxy_http_version 1.1;
      proxy_set_header Connection ""; proxy_set_header Host \$host;
      $FORWARDED
    }
  }
  server {
    listen $NGINX_TLS ssl;
    ssl_certificate $WORK/tls.crt;
    ssl_certificate_key $WORK/tls.key;
    location / {
      proxy_pass http://backend; proxy_http_version 1.1;
      proxy_set_header Connection ""; proxy_set_header Host \$host;
      $FORWARDED
    }
  }
  server {
    listen $NGINX_H2 http2;
    location / {
      proxy_pass http://backend; proxy_http_version 1.1;
      proxy_set_header Connection ""; proxy_set_header Host \$host;
      $FORWARDED
    }
  }
  server {
    listen $NGINX;
    server_name lua.bench;
    location / {
      access_by_lua_block {
        ngx.req.set_header("X-Bench", "1")
        ngx.shared.hits:incr("n", 1, 0)
      }
      header_filter_by_lua_block { ngx.header["X-Lua"] = "1" }
      proxy_pass http://backend; proxy_http_version 1.1;
      proxy_set_header Connection ""; proxy_set_header Host \$host;
      $FORWARDED
    }
  }
}
NGX

mkdir "$WORK/manifests"
cat > "$WORK/manifests/bench.yaml" <<YAML
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
ports: [{name: http, port: ${UPSTREAM#*:}}]
endpoints: [{addresses: ["127.0.0.1"]}]
---
apiVersion: tidegate.dev/v1alpha1
kind: LuaRoute
metadata: {name: handlers, namespace: bench}
spec:
  sharedDicts: [{name: hits, size: 1Mi}]
  lua:
    access: |
      ngx.req.set_header("X-Bench", "1")
      ngx.shared.hits:incr("n", 1, 0)
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

nginx -p "$WORK" -c "$WORK/upstream.conf" -e "$WORK/upstream.err"
nginx -p "$WORK" -c "$WORK/proxy.conf" -e "$WORK/proxy.err"
setsid "$BIN" standalone --manifests "$WORK/manifests" --workers 2 --no-access-log \
  --http-addr $TIDEGATE --https-addr $TIDEGATE_TLS --admin-addr 127.0.0.1:19911 >/dev/null 2>"$WORK/tidegate.log" &
TIDEGATE_PID=$!
PIDS+=("$TIDEGATE_PID")
for _ in $(seq 100); do curl -fs 127.0.0.1:19911/readyz >/dev/null && break; sleep 0.1; done
for target in $TIDEGATE $NGINX; do
  curl -fs -H 'Host: lua.bench' "http://$target/" -o /dev/null -D - | grep -qi '^x-lua: 1' \
    || { echo "the Lua route on $target is not answering" >&2; cat "$WORK"/*.err "$WORK/tidegate.log" >&2; exit 1; }
done

# run address host extra-header proxy-pids
#   -> "requests requests_per_s p50_ms p99_ms wrk_us upstream_us proxy_user_us proxy_kernel_us"
# (the CPU each spent over the run, see `cpu_split`; pids comma-separated)
run() {
  cpu_split "$4" "$UPSTREAM_PIDS" -- \
    wrk -t2 -c"$CONNECTIONS" -d"${DURATION}s" --latency -H "Host: $2" ${3:+-H "$3"} "http://$1/" | wrk_stats
}

h2() { # address -> "requests_per_s mean_ms"
  local out
  out=$(h2load -D "$DURATION" -c "$CONNECTIONS" -m 10 -t 2 -H ':authority: plain.bench' "http://$1/" 2>&1)
  python3 - <<PY
import re
out = """$out"""
rps = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1))
mean, unit = re.search(r"time for request:\s+\S+\s+\S+\s+([\d.]+)(us|ms|s)", out).groups()
failed = int(re.search(r"(\d+) failed", out).group(1))
assert failed == 0, out
print(rps, float(mean) * {"us": 0.001, "ms": 1, "s": 1000}[unit])
PY
}

idle() { # [tls:]address count pids... -> KiB of proxy RSS per idle keep-alive connection
  local addr=$1 count=$2; shift 2
  python3 - "$addr" "$count" "$@" <<'PY'
import resource, socket, ssl, sys, time
addr, count, pids = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
tls = addr.startswith("tls:")
addr = addr.removeprefix("tls:")
context = ssl.create_default_context()
context.check_hostname = False
context.verify_mode = ssl.CERT_NONE
context.set_alpn_protocols(["http/1.1"])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, count + 1024), hard))
def rss():
    return sum(int(l.split()[1]) for p in pids for l in open(f"/proc/{p}/status") if l.startswith("VmRSS:"))
host, port = addr.split(":")
time.sleep(0.5)
before = rss()
conns = []
for _ in range(count):
    s = socket.create_connection((host, int(port)))
    if tls:
        s = context.wrap_socket(s, server_hostname="plain.bench")
    s.sendall(b"GET / HTTP/1.1\r\nHost: plain.bench\r\n\r\n")
    data = b""
    while b"ok\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            sys.exit("connection closed before the answer")
        data += chunk
    conns.append(s)
time.sleep(1)
after = rss()
print(round((after - before) / count, 2))
for s in conns:
    s.close()
PY
}

# Memory per idle keep-alive connection, measured first, on fresh processes (after load, freed
# memory the allocator kept would hide the growth): RSS of the whole proxy (nginx: master and
# workers).
NGINX_PIDS=$(cat "$WORK/proxy.pid"; pgrep -P "$(cat "$WORK/proxy.pid")")
UPSTREAM_PIDS=$( (cat "$WORK/upstream.pid"; pgrep -P "$(cat "$WORK/upstream.pid")") | paste -sd,)
echo "idle,tidegate,$(idle $TIDEGATE "$IDLE" "$TIDEGATE_PID")" > "$WORK/idle.csv"
# shellcheck disable=SC2086
echo "idle,nginx,$(idle $NGINX "$IDLE" $NGINX_PIDS)" >> "$WORK/idle.csv"
echo "idle_tls,tidegate,$(idle "tls:$TIDEGATE_TLS" "$IDLE_TLS" "$TIDEGATE_PID")" >> "$WORK/idle.csv"
# shellcheck disable=SC2086
echo "idle_tls,nginx,$(idle "tls:$NGINX_TLS" "$IDLE_TLS" $NGINX_PIDS)" >> "$WORK/idle.csv"

echo "round,scenario,target,rps,p50_ms,p99_ms,requests,wrk_us,upstream_us,user_us,kernel_us" > "$WORK/rows.csv"
for round in $(seq "$ROUNDS"); do
  read -r requests rps p50 p99 cpu < <(run "$UPSTREAM" plain.bench "" "")
  echo "$round,keepalive,ceiling,$rps,$p50,$p99,$requests,${cpu// /,}" >> "$WORK/rows.csv"
  for scenario in keepalive lua newconn; do
    host=plain.bench; header=""
    [ "$scenario" = lua ] && host=lua.bench
    [ "$scenario" = newconn ] && header="Connection: close"
    # A B A B: the order of the two proxies alternates between rounds.
    order="tidegate nginx"; [ $((round % 2)) -eq 0 ] && order="nginx tidegate"
    for target in $order; do
      addr=$TIDEGATE; pids=$TIDEGATE_PID
      [ "$target" = nginx ] && addr=$NGINX && pids=$(echo "$NGINX_PIDS" | paste -sd,)
      read -r requests rps p50 p99 cpu < <(run "$addr" "$host" "$header" "$pids")
      echo "$round,$scenario,$target,$rps,$p50,$p99,$requests,${cpu// /,}" >> "$WORK/rows.csv"
    done
  done
  for target in $order; do
    addr=$TIDEGATE; [ "$target" = nginx ] && addr=$NGINX_H2
    read -r rps mean < <(h2 "$addr")
    echo "$round,h2,$target,$rps,$mean,0,,,,," >> "$WORK/rows.csv"
  done
done


python3 - "$WORK/rows.csv" "$DURATION" "$ROUNDS" "$CONNECTIONS" "$WORK/idle.csv" "$IDLE" "$IDLE_TLS" <<'PY' | tee bench/results/vs-nginx.md
import csv, statistics, sys, datetime, os
rows = list(csv.DictReader(open(sys.argv[1])))
duration, rounds, conns = sys.argv[2], sys.argv[3], sys.argv[4]
def med(scenario, target, key):
    return statistics.median(float(r[key]) for r in rows if r["scenario"] == scenario and r["target"] == target)
ceiling = med("keepalive", "ceiling", "rps")
print(f"tidegate vs nginx, {datetime.date.today()} (`bench/vs_nginx.sh {duration} {rounds}`): {os.cpu_count()} cores shared by")
print(f"wrk (2 threads, {conns} connections), the proxy (2 workers each) and the upstream (an nginx `return 200`, 1 worker);")
print(f"{rounds} rounds of {duration} s, tidegate and nginx alternating, medians. Upstream alone: {ceiling:,.0f} requests/s.\n")
print("| scenario | tidegate req/s | nginx req/s | tidegate / nginx | tidegate / ceiling | p50 tidegate / nginx | p99 tidegate / nginx |")
print("|---|---|---|---|---|---|---|")
names = {"keepalive": "keep-alive GET", "lua": "keep-alive GET + Lua (access, shared dict, header_filter)", "newconn": "new connection per request"}
for s in ("keepalive", "lua", "newconn"):
    t, n = med(s, "tidegate", "rps"), med(s, "nginx", "rps")
    print(f"| {names[s]} | {t:,.0f} | {n:,.0f} | **{t / n:.2f}×** | {t / ceiling:.2f} | "
          f"{med(s, 'tidegate', 'p50_ms'):.2f} / {med(s, 'nginx', 'p50_ms'):.2f} ms | {med(s, 'tidegate', 'p99_ms'):.2f} / {med(s, 'nginx', 'p99_ms'):.2f} ms |")
t, n = med("h2", "tidegate", "rps"), med("h2", "nginx", "rps")
print(f"| HTTP/2 (h2c, h2load, 10 streams per connection) | {t:,.0f} | {n:,.0f} | **{t / n:.2f}×** | – | "
      f"mean {med('h2', 'tidegate', 'p50_ms'):.2f} / {med('h2', 'nginx', 'p50_ms'):.2f} ms | – |")
def per_request(scenario, target, key):
    return statistics.median(float(r[key]) / int(r["requests"]) for r in rows if r["scenario"] == scenario and r["target"] == target)
print("\nWhere the time goes: CPU per request in µs (medians), of wrk, the upstream, and the proxy in user")
print("space and in the kernel (`/proc/PID/stat`; wrk's own resource usage). The proxy's own CPU per request")
print("moves less with the machine's load than throughput does; its ratio is tidegate's over nginx's. The last")
print("column is what a proxy that spent no user time at all, and nginx's kernel time, would serve relative to")
print("nginx here: nginx's total over that total without nginx's user time.\n")
print("| scenario | proxy | wrk | upstream | proxy user | proxy kernel | proxy CPU (vs nginx) | total | zero-user bound |")
print("|---|---|---|---|---|---|---|---|---|")
for s in ("keepalive", "lua", "newconn"):
    cpu = {t: per_request(s, t, "user_us") + per_request(s, t, "kernel_us") for t in ("tidegate", "nginx")}
    for target in ("tidegate", "nginx"):
        parts = [per_request(s, target, k) for k in ("wrk_us", "upstream_us", "user_us", "kernel_us")]
        bound = f"{sum(parts) / (sum(parts) - parts[2]):.2f}× nginx" if target == "nginx" else ""
        ratio = f" ({cpu['tidegate'] / cpu['nginx']:.2f}×)" if target == "tidegate" else ""
        print(f"| {names[s]} | {target} | " + " | ".join(f"{p:.2f}" for p in parts)
              + f" | {cpu[target]:.2f}{ratio} | {sum(parts):.2f} | {bound} |")
idle = {(row[0], row[1]): float(row[2]) for row in csv.reader(open(sys.argv[5]))}
for kind, label, count in (("idle", "", sys.argv[6]), ("idle_tls", " TLS (HTTP/1.1)", sys.argv[7])):
    t, n = idle[(kind, "tidegate")], idle[(kind, "nginx")]
    print(f"\nMemory per idle{label} keep-alive connection ({count} connections, growth of the whole proxy's RSS): "
          f"tidegate {t:.1f} KiB, nginx {n:.1f} KiB" + (f" (**{t / n:.2f}×**)." if n >= 0.1 else "."))
PY
