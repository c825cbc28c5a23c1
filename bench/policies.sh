#!/usr/bin/env bash
# Route policies side by side with nginx, in one run: what the request pipeline costs a route
# without policies (this build against an earlier tidegate binary, and nginx), and what each
# policy costs against nginx's own version of it. Keep-alive GETs (wrk, 2 threads), tidegate
# and nginx with 2 workers each, the same fixed-response upstream (an nginx `return 200`);
# rounds alternate the targets, medians reported with the proxy's CPU per request
# (user + kernel, from /proc), which moves less with the machine's load than throughput does.
#
# Scenarios:
#   plain       no policy                    (nginx: proxy_pass)
#   ip-allow    allowlist with the client    (nginx: allow 127.0.0.0/8; deny all;)
#   basic-auth  Basic auth, an htpasswd -m (apr1) user, right password on every request
#               (nginx: auth_basic with auth_basic_user_file)
#   limit-req   a per-client request rate high enough to refuse nothing: the cost of counting
#               (nginx: limit_req_zone $binary_remote_addr ... limit_req ... nodelay)
#
# Usage: BEFORE=path/to/earlier/tidegate [TIDEGATE_BIN=path] bench/policies.sh [seconds-per-run] [rounds]
# (BEFORE is optional: without it the "plain, before" row is left out; loopback only; every run
# is bounded by time)
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION="${1:-5}"
ROUNDS="${2:-5}"
CONNECTIONS=${CONNECTIONS:-64}

. bench/lib.sh
need wrk wrk
need nginx nginx
need htpasswd apache2-utils
# TIDEGATE_BIN: a tidegate binary to measure instead of this tree's release build.
[ -n "${TIDEGATE_BIN:-}" ] || cargo build --release --quiet
BIN=${TIDEGATE_BIN:-$PWD/target/release/tidegate}

WORK=$(mktemp -d)
PIDS=()
cleanup() {
  kill "${PIDS[@]}" 2>/dev/null || true
  for conf in upstream proxy; do [ -f "$WORK/$conf.pid" ] && kill "$(cat "$WORK/$conf.pid")" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

UPSTREAM=127.0.0.1:19200
TIDEGATE=127.0.0.1:18280
BEFORE_ADDR=127.0.0.1:18281
NGINX=127.0.0.1:18282

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

htpasswd -cbm "$WORK/htpasswd" bench bench-password 2>/dev/null
# nginx's workers run as an unprivileged user: they must reach the file.
chmod 755 "$WORK" && chmod 644 "$WORK/htpasswd"
AUTHORIZATION="Authorization: Basic $(printf 'bench:bench-password' | base64)"

FORWARDED='proxy_set_header X-Forwarded-For $remote_addr; proxy_set_header X-Real-IP $remote_addr;
      proxy_set_header X-Forwarded-Proto $scheme; proxy_set_header X-Forwarded-Host $host;
      proxy_set_header X-Forwarded-Port $server_port;'
PASS="proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_set_header Host \$host; $FORWARDED"
cat > "$WORK/proxy.conf" <<NGX
worker_processes 2;
pid $WORK/proxy.pid;
error_log $WORK/proxy.err warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  upstream backend { server $UPSTREAM; keepalive 64; keepalive_requests 1000000; }
  limit_req_zone \$binary_remote_addr zone=bench:10m rate=1000000r/s;
  server { listen $NGINX reuseport; server_name plain.bench; location / { $PASS } }
  server { listen $NGINX; server_name ip-allow.bench; location / { allow 127.0.0.0/8; deny all; $PASS } }
  server { listen $NGINX; server_name basic-auth.bench; location / { auth_basic "bench"; auth_basic_user_file $WORK/htpasswd; $PASS } }
  server { listen $NGINX; server_name limit-req.bench; location / { limit_req zone=bench burst=5000000 nodelay; $PASS } }
}
NGX

mkdir "$WORK/manifests" "$WORK/before"
ingress() { # name [annotations, as YAML flow-mapping entries]
  local meta="{name: $1, namespace: bench}"
  [ -n "${2:-}" ] && meta="{name: $1, namespace: bench, annotations: {$2}}"
  cat <<YAML
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: $meta
spec:
  ingressClassName: tidegate
  rules:
  - host: $1.bench
    http: {paths: [{path: /, pathType: Prefix, backend: {service: {name: upstream, port: {number: 80}}}}]}
YAML
}
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
$(ingress plain)
$(ingress ip-allow 'nginx.ingress.kubernetes.io/whitelist-source-range: "127.0.0.0/8"')
$(ingress basic-auth 'nginx.ingress.kubernetes.io/auth-type: basic, nginx.ingress.kubernetes.io/auth-secret: users')
$(ingress limit-req 'nginx.ingress.kubernetes.io/limit-rps: "1000000"')
---
apiVersion: v1
kind: Secret
metadata: {name: users, namespace: bench}
type: Opaque
stringData: {auth: "$(cat "$WORK/htpasswd")"}
YAML
# The earlier binary gets only the plain route: it may not know the policies.
python3 - "$WORK/manifests/bench.yaml" "$WORK/before/bench.yaml" <<'PY'
import sys
docs = open(sys.argv[1]).read().split("\n---\n")
open(sys.argv[2], "w").write("\n---\n".join(d for d in docs if "annotations" not in d and "kind: Secret" not in d))
PY

start_tidegate() { # binary manifests address admin-port -> pid
  setsid "$1" standalone --manifests "$2" --workers 2 --no-access-log \
    --http-addr "$3" --https-addr 127.0.0.1:0 --admin-addr "127.0.0.1:$4" >/dev/null 2>"$WORK/tidegate-$4.log" &
  echo $!
}
nginx -p "$WORK" -c "$WORK/upstream.conf" -e "$WORK/upstream.err"
nginx -p "$WORK" -c "$WORK/proxy.conf" -e "$WORK/proxy.err"
TIDEGATE_PID=$(start_tidegate "$BIN" "$WORK/manifests" $TIDEGATE 19921)
PIDS+=("$TIDEGATE_PID")
BEFORE_PID=""
if [ -n "${BEFORE:-}" ]; then
  BEFORE_PID=$(start_tidegate "$BEFORE" "$WORK/before" $BEFORE_ADDR 19922)
  PIDS+=("$BEFORE_PID")
fi
for port in 19921 ${BEFORE_PID:+19922}; do
  for _ in $(seq 100); do curl -fs "127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.1; done
done
NGINX_PIDS=$( (cat "$WORK/proxy.pid"; pgrep -P "$(cat "$WORK/proxy.pid")") | paste -sd,)
UPSTREAM_PIDS=$( (cat "$WORK/upstream.pid"; pgrep -P "$(cat "$WORK/upstream.pid")") | paste -sd,)

# Each target answers each scenario as expected before anything is measured.
check() { # address host status
  local got
  got=$(curl -s -o /dev/null -w '%{http_code}' -H "Host: $2" -H "$(header "$2")" "http://$1/")
  [ "$got" = "$3" ] || { echo "$2 on $1 answered $got, not $3" >&2; cat "$WORK"/*.err "$WORK"/*.log >&2; exit 1; }
}
header() { # host -> the extra request header its scenario sends
  case $1 in basic-auth.bench) echo "$AUTHORIZATION" ;; *) echo "X-Bench: 1" ;; esac
}
for target in $TIDEGATE $NGINX; do
  for scenario in plain ip-allow basic-auth limit-req; do check "$target" "$scenario.bench" 200; done
  [ "$(curl -s -o /dev/null -w '%{http_code}' -H 'Host: basic-auth.bench' "http://$target/")" = 401 ] \
    || { echo "basic-auth.bench on $target does not ask for credentials" >&2; exit 1; }
done
[ -n "$BEFORE_PID" ] && check $BEFORE_ADDR plain.bench 200

run() { # address host proxy-pids -> "requests rps p50 p99 wrk_us upstream_us user_us kernel_us"
  cpu_split "$3" "$UPSTREAM_PIDS" -- wrk -t2 -c"$CONNECTIONS" -d"${DURATION}s" --latency -H "Host: $2" -H "$(header "$2")" "http://$1/" | wrk_stats
}

echo "round,scenario,target,rps,p99_ms,requests,user_us,kernel_us" > "$WORK/rows.csv"
for round in $(seq "$ROUNDS"); do
  for scenario in plain ip-allow basic-auth limit-req; do
    targets="tidegate nginx"
    [ "$scenario" = plain ] && [ -n "$BEFORE_PID" ] && targets="before tidegate nginx"
    for target in $targets; do
      case $target in
        tidegate) addr=$TIDEGATE; pids=$TIDEGATE_PID ;;
        before) addr=$BEFORE_ADDR; pids=$BEFORE_PID ;;
        nginx) addr=$NGINX; pids=$NGINX_PIDS ;;
      esac
      read -r requests rps _p50 p99 _wrk _up user kernel < <(run "$addr" "$scenario.bench" "$pids")
      echo "$round,$scenario,$target,$rps,$p99,$requests,$user,$kernel" >> "$WORK/rows.csv"
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
print(f"Route policies, `bench/policies.sh {sys.argv[2]} {sys.argv[3]}`: keep-alive GET, wrk 2 threads, 64 connections;")
print("each proxy 2 workers; medians of the rounds. CPU is the proxy's (user + kernel) per request.\n")
print("| scenario | proxy | req/s | p99 ms | proxy CPU µs/request | CPU vs nginx | CPU vs tidegate before |")
print("|---|---|---|---|---|---|---|")
for scenario in ["plain", "ip-allow", "basic-auth", "limit-req"]:
    base = med(scenario, "nginx", cpu)
    before = med(scenario, "before", cpu)
    for target in ["before", "tidegate", "nginx"]:
        c = med(scenario, target, cpu)
        if c is None:
            continue
        vs_before = f"{c / before:.3f}×" if before and target == "tidegate" else ""
        print(f"| {scenario} | {target} | {med(scenario, target, lambda r: float(r['rps'])):,.0f} | "
              f"{med(scenario, target, lambda r: float(r['p99_ms'])):.2f} | {c:.2f} | {c / base:.2f}× | {vs_before} |")
PY
