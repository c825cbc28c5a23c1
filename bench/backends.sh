#!/usr/bin/env bash
# Backends side by side with nginx in one run: HTTPS upstreams and gRPC, each against nginx's
# own way of doing it, and plain HTTP/1.1 keep-alive as the guard (against an earlier tidegate
# binary too, when BEFORE names one). Tidegate and nginx have 2 workers each and the same
# upstreams (nginx): rounds alternate the targets; medians are reported with the proxy's CPU per
# request (user + kernel, from /proc), which moves less with the machine's load than throughput.
#
# Scenarios:
#   plain   keep-alive GETs to an HTTP/1.1 upstream (wrk, 2 threads)
#           (nginx: proxy_pass with keepalive)
#   https   keep-alive GETs to an HTTPS upstream, certificate not verified (wrk, 2 threads)
#           (nginx: proxy_pass https:// with keepalive and proxy_ssl_session_reuse on)
#   grpc    unary gRPC calls over h2c from the client and to the upstream (h2load, 10 streams
#           per connection; the upstream answers each with an empty message and grpc-status 0)
#           (nginx: grpc_pass grpc:// with keepalive)
#
# Usage: [BEFORE=path/to/earlier/tidegate] [TIDEGATE_BIN=path] [SCENARIOS="grpc https"] bench/backends.sh [seconds-per-run] [rounds]
# (loopback only; every run is bounded by time)
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION="${1:-5}"
ROUNDS="${2:-5}"
CONNECTIONS=${CONNECTIONS:-64}

. bench/lib.sh
# TIDEGATE_BIN: a tidegate binary to measure instead of this tree's release build.
bench_setup

UP_HTTP=127.0.0.1:19300
UP_TLS=127.0.0.1:19301
UP_GRPC=127.0.0.1:19302
TIDEGATE=127.0.0.1:18380
BEFORE_ADDR=127.0.0.1:18381
NGINX=127.0.0.1:18382
NGINX_GRPC=127.0.0.1:18383

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=upstream.bench \
  -keyout "$WORK/tls.key" -out "$WORK/tls.crt" 2>/dev/null
chmod 755 "$WORK" && chmod 644 "$WORK/tls.key" "$WORK/tls.crt"
# One unary call: a gRPC frame holding an empty message.
printf '\0\0\0\0\0' > "$WORK/call.bin"

cat > "$WORK/upstream.conf" <<NGX
load_module /usr/lib/nginx/modules/ndk_http_module.so;
load_module /usr/lib/nginx/modules/ngx_http_lua_module.so;
worker_processes 1;
pid $WORK/upstream.pid;
error_log $WORK/upstream.err warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  server { listen $UP_HTTP reuseport; location / { return 200 "ok\n"; } }
  server {
    listen $UP_TLS ssl; ssl_certificate $WORK/tls.crt; ssl_certificate_key $WORK/tls.key;
    location / { return 200 "ok\n"; }
  }
  server {
    listen $UP_GRPC http2;
    location / {
      add_trailer grpc-status 0 always;
      content_by_lua_block { ngx.header["content-type"] = "application/grpc"; ngx.print("\0\0\0\0\0") }
    }
  }
}
NGX

cat > "$WORK/proxy.conf" <<NGX
worker_processes 2;
pid $WORK/proxy.pid;
error_log $WORK/proxy.err warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  upstream plain_up { server $UP_HTTP; keepalive 64; keepalive_requests 1000000; }
  upstream tls_up { server $UP_TLS; keepalive 64; keepalive_requests 1000000; }
  upstream grpc_up { server $UP_GRPC; keepalive 64; keepalive_requests 1000000; }
  server {
    listen $NGINX reuseport; server_name plain.bench;
    location / { proxy_pass http://plain_up; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
  server {
    listen $NGINX; server_name https.bench;
    location / {
      proxy_pass https://tls_up; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_ssl_session_reuse on;
    }
  }
  server { listen $NGINX_GRPC http2; location / { grpc_pass grpc://grpc_up; } }
}
NGX

mkdir "$WORK/manifests" "$WORK/before"
service() { # name port
  cat <<YAML
---
apiVersion: v1
kind: Service
metadata: {name: $1, namespace: bench}
spec:
  ports: [{name: p, port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: $1, namespace: bench, labels: {kubernetes.io/service-name: $1}}
addressType: IPv4
ports: [{name: p, port: $2}]
endpoints: [{addresses: ["127.0.0.1"]}]
YAML
}
ingress() { # name service [annotations]
  local meta="{name: $1, namespace: bench}"
  [ -n "${3:-}" ] && meta="{name: $1, namespace: bench, annotations: {$3}}"
  cat <<YAML
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: $meta
spec:
  ingressClassName: tidegate
  rules:
  - host: $1.bench
    http: {paths: [{path: /, pathType: Prefix, backend: {service: {name: $2, port: {number: 80}}}}]}
YAML
}
{
  service plain "${UP_HTTP#*:}"
  service tls "${UP_TLS#*:}"
  service grpc "${UP_GRPC#*:}"
  ingress plain plain
  ingress https tls 'nginx.ingress.kubernetes.io/backend-protocol: HTTPS'
  ingress grpc grpc 'nginx.ingress.kubernetes.io/backend-protocol: GRPC'
} > "$WORK/manifests/bench.yaml"
{ service plain "${UP_HTTP#*:}"; ingress plain plain; } > "$WORK/before/bench.yaml"

start_tidegate() { # binary manifests address admin-port -> pid
  setsid "$1" standalone --manifests "$2" --workers 2 --no-access-log \
    --http-addr "$3" --https-addr 127.0.0.1:0 --admin-addr "127.0.0.1:$4" >/dev/null 2>"$WORK/tidegate-$4.log" &
  echo $!
}
nginx -p "$WORK" -c "$WORK/upstream.conf" -e "$WORK/upstream.err"
nginx -p "$WORK" -c "$WORK/proxy.conf" -e "$WORK/proxy.err"
TIDEGATE_PID=$(start_tidegate "$BIN" "$WORK/manifests" $TIDEGATE 19931)
PIDS+=("$TIDEGATE_PID")
BEFORE_PID=""
if [ -n "${BEFORE:-}" ]; then
  BEFORE_PID=$(start_tidegate "$BEFORE" "$WORK/before" $BEFORE_ADDR 19932)
  PIDS+=("$BEFORE_PID")
fi
for port in 19931 ${BEFORE_PID:+19932}; do
  for _ in $(seq 100); do curl -fs "127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.1; done
done
NGINX_PIDS=$( (cat "$WORK/proxy.pid"; pgrep -P "$(cat "$WORK/proxy.pid")") | paste -sd,)
UPSTREAM_PIDS=$( (cat "$WORK/upstream.pid"; pgrep -P "$(cat "$WORK/upstream.pid")") | paste -sd,)

# Each target answers each scenario as expected before anything is measured.
fail() { echo "$1" >&2; cat "$WORK"/*.err "$WORK"/*.log >&2; exit 1; }
for target in $TIDEGATE $NGINX ${BEFORE_PID:+$BEFORE_ADDR}; do
  scenarios="plain https"; [ "$target" = "$BEFORE_ADDR" ] && scenarios=plain
  for scenario in $scenarios; do
    got=$(curl -s -H "Host: $scenario.bench" "http://$target/")
    [ "$got" = "ok" ] || fail "$scenario.bench on $target answered $got"
  done
done
for target in "$TIDEGATE grpc.bench" "$NGINX_GRPC grpc.bench"; do
  read -r addr host <<< "$target"
  got=$(curl -s --http2-prior-knowledge -o /dev/null -w '%{http_version} %{http_code}' -H "content-type: application/grpc" \
    -H "te: trailers" --data-binary @"$WORK/call.bin" -H "Host: $host" "http://$addr/test.Echo/Unary")
  [ "$got" = "2 200" ] || fail "gRPC on $addr answered $got"
done

# Each runner prints "requests rps p99_ms user_us kernel_us" (the proxy's CPU over the run).
run() { # address host proxy-pids
  cpu_split "$3" "$UPSTREAM_PIDS" -- wrk -t2 -c"$CONNECTIONS" -d"${DURATION}s" --latency -H "Host: $2" "http://$1/" \
    | wrk_stats | awk '{print $1, $2, $4, $7, $8}'
}
run_grpc() { # address proxy-pids
  cpu_split "$2" "$UPSTREAM_PIDS" -- h2load -D "$DURATION" -c "$CONNECTIONS" -m 10 -t 2 -d "$WORK/call.bin" \
    -H ':authority: grpc.bench' -H 'content-type: application/grpc' -H 'te: trailers' \
    "http://$1/test.Echo/Unary" | h2load_stats
}

echo "round,scenario,target,requests,rps,p99_ms,user_us,kernel_us" > "$WORK/rows.csv"
for round in $(seq "$ROUNDS"); do
  for scenario in ${SCENARIOS:-plain https grpc}; do
    targets="tidegate nginx"
    [ "$scenario" = plain ] && [ -n "$BEFORE_PID" ] && targets="before tidegate nginx"
    for target in $targets; do
      case $target in
        tidegate) addr=$TIDEGATE; grpc=$TIDEGATE; pids=$TIDEGATE_PID ;;
        before) addr=$BEFORE_ADDR; grpc=$BEFORE_ADDR; pids=$BEFORE_PID ;;
        nginx) addr=$NGINX; grpc=$NGINX_GRPC; pids=$NGINX_PIDS ;;
      esac
      case $scenario in
        grpc) line=$(run_grpc "$grpc" "$pids") ;;
        *) line=$(run "$addr" "$scenario.bench" "$pids") ;;
      esac
      read -r requests rps p99 user kernel <<< "$line"
      echo "$round,$scenario,$target,$requests,$rps,$p99,$user,$kernel" >> "$WORK/rows.csv"
    done
  done
done

python3 - "$WORK/rows.csv" "$DURATION" "$ROUNDS" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
def med(scenario, target, f):
    values = [f(r) for r in rows if r["scenario"] == scenario and r["target"] == target]
    return statistics.median(values) if values else None
cpu = lambda r: (float(r["user_us"]) + float(r["kernel_us"])) / int(r["requests"])
rps = lambda r: float(r["rps"])
print(f"Backends, `bench/backends.sh {sys.argv[2]} {sys.argv[3]}`: wrk 2 threads, 64 connections (h2load: 64")
print("connections, 10 streams each); each proxy 2 workers; medians of the rounds. CPU is the proxy's")
print("(user + kernel) per request; p99 is wrk's (none from h2load).\n")
print("| scenario | proxy | req/s | req/s vs nginx | p99 ms | proxy CPU µs/request | CPU vs nginx | CPU vs tidegate before |")
print("|---|---|---|---|---|---|---|---|")
for scenario in ["plain", "https", "grpc"]:
    base, base_rps, before = med(scenario, "nginx", cpu), med(scenario, "nginx", rps), med(scenario, "before", cpu)
    for target in ["before", "tidegate", "nginx"]:
        c = med(scenario, target, cpu)
        if c is None or base is None:
            continue
        vs_before = f"{c / before:.3f}×" if before and target == "tidegate" else ""
        r = med(scenario, target, rps)
        p99 = med(scenario, target, lambda r: float(r["p99_ms"]))
        print(f"| {scenario} | {target} | {r:,.0f} | {r / base_rps:.2f}× | {p99:.2f} | {c:.2f} | {c / base:.2f}× | {vs_before} |")
PY
