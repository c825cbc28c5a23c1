#!/usr/bin/env bash
# Route policies, and the request pipeline they live in, side by side with nginx in one run:
# what the pipeline costs the paths that have no policy (this build against an earlier tidegate
# binary, and nginx), and what each policy costs against nginx's own version of it. Tidegate and
# nginx have 2 workers each and the same fixed-response upstream (an nginx `return 200`); rounds
# alternate the targets; medians are reported with the proxy's CPU per request (user + kernel,
# from /proc), which moves less with the machine's load than throughput does.
#
# Scenarios (keep-alive GETs by wrk, 2 threads, unless said):
#   plain       no policy                          (nginx: proxy_pass)
#   lua         access handler (request header, shared dict), header_filter (response header)
#               (nginx: access_by_lua_block, header_filter_by_lua_block)
#   h2          h2c with prior knowledge, h2load, 10 streams per connection
#   tls-new     a new TLS connection per request (the handshake path)
#   ip-allow    allowlist with the client          (nginx: allow 127.0.0.0/8; deny all;)
#   basic-auth  Basic auth, an htpasswd -m (apr1) user, right password on every request
#               (nginx: auth_basic with auth_basic_user_file)
#   limit-req   a per-client request rate high enough to refuse nothing: the cost of counting
#               (nginx: limit_req_zone $binary_remote_addr ... limit_req ... nodelay)
#   ext-auth    external auth answered 200 by the upstream (nginx: auth_request to it)
#   lua-content a Lua content handler answers "ok" itself (nginx: content_by_lua_block)
#   subrequest  a Lua content handler answers with the body of a subrequest to a route whose
#               content handler says "ok" (nginx: ngx.location.capture to an internal
#               location); minus lua-content, the cost of one subrequest
#   lua-balancer Lua picks the upstream peer (nginx: balancer_by_lua_block in an upstream with
#               keepalive 64); minus plain, the cost of the balancer handler
# The earlier binary runs the scenarios that need no policy (plain, lua, h2, tls-new).
#
# Usage: BEFORE=path/to/earlier/tidegate [TIDEGATE_BIN=path] [SCENARIOS="plain h2"] bench/policies.sh [seconds-per-run] [rounds]
# (BEFORE is optional; loopback only; every run is bounded by time)
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION="${1:-5}"
ROUNDS="${2:-5}"
CONNECTIONS=${CONNECTIONS:-64}

. bench/lib.sh
need htpasswd apache2-utils
# TIDEGATE_BIN: a tidegate binary to measure instead of this tree's release build.
bench_setup

UPSTREAM=127.0.0.1:19200
TIDEGATE=127.0.0.1:18280
TIDEGATE_TLS=127.0.0.1:18283
BEFORE_ADDR=127.0.0.1:18281
BEFORE_TLS=127.0.0.1:18284
NGINX=127.0.0.1:18282
NGINX_H2=127.0.0.1:18285
NGINX_TLS=127.0.0.1:18286

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
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=plain.bench \
  -keyout "$WORK/tls.key" -out "$WORK/tls.crt" 2>/dev/null
# nginx's workers run as an unprivileged user: they must reach the files.
chmod 755 "$WORK" && chmod 644 "$WORK/htpasswd" "$WORK/tls.key" "$WORK/tls.crt"
AUTHORIZATION="Authorization: Basic $(printf 'bench:bench-password' | base64)"

FORWARDED='proxy_set_header X-Forwarded-For $remote_addr; proxy_set_header X-Real-IP $remote_addr;
      proxy_set_header X-Forwarded-Proto $scheme; proxy_set_header X-Forwarded-Host $host;
      proxy_set_header X-Forwarded-Port $server_port;'
PASS="proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_set_header Host \$host; $FORWARDED"
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
  limit_req_zone \$binary_remote_addr zone=bench:10m rate=1000000r/s;
  server { listen $NGINX reuseport; server_name plain.bench; location / { $PASS } }
  server { listen $NGINX_H2 http2; location / { $PASS } }
  server {
    listen $NGINX_TLS ssl; ssl_certificate $WORK/tls.crt; ssl_certificate_key $WORK/tls.key;
    location / { $PASS }
  }
  server {
    listen $NGINX; server_name lua.bench;
    location / {
      access_by_lua_block {
        ngx.req.set_header("X-Bench", "1")
        ngx.shared.hits:incr("n", 1, 0)
      }
      header_filter_by_lua_block { ngx.header["X-Lua"] = "1" }
      $PASS
    }
  }
  server {
    listen $NGINX; server_name lua-content.bench;
    location / { content_by_lua_block { ngx.say("ok") } }
  }
  server {
    listen $NGINX; server_name subrequest.bench;
    location / { content_by_lua_block { local r = ngx.location.capture("/_sub") ngx.print(r.body) } }
    location = /_sub { internal; content_by_lua_block { ngx.say("ok") } }
  }
  upstream lua_backend {
    server 0.0.0.1;
    balancer_by_lua_block { require("ngx.balancer").set_current_peer("127.0.0.1", ${UPSTREAM#*:}) }
    keepalive 64; keepalive_requests 1000000;
  }
  server {
    listen $NGINX; server_name lua-balancer.bench;
    location / { ${PASS/backend/lua_backend} }
  }
  server { listen $NGINX; server_name ip-allow.bench; location / { allow 127.0.0.0/8; deny all; $PASS } }
  server { listen $NGINX; server_name basic-auth.bench; location / { auth_basic "bench"; auth_basic_user_file $WORK/htpasswd; $PASS } }
  server { listen $NGINX; server_name limit-req.bench; location / { limit_req zone=bench burst=5000000 nodelay; $PASS } }
  server {
    listen $NGINX; server_name ext-auth.bench;
    location / { auth_request /_auth; $PASS }
    location = /_auth {
      internal;
      proxy_pass http://backend/auth; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_pass_request_body off; proxy_set_header Content-Length "";
      proxy_set_header X-Original-URL \$scheme://\$http_host\$request_uri;
      proxy_set_header X-Original-Method \$request_method;
    }
  }
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
apiVersion: tidegate.dev/v1alpha1
kind: LuaRoute
metadata: {name: answers, namespace: bench}
spec:
  hosts: [lua-content.bench]
  routes:
  - {name: ok, match: {path: {type: Prefix, value: /}}, lua: {content: 'ngx.say("ok")'}}
---
apiVersion: tidegate.dev/v1alpha1
kind: LuaRoute
metadata: {name: subrequests, namespace: bench}
spec:
  hosts: [subrequest.bench]
  routes:
  - {name: main, match: {path: {type: Prefix, value: /}}, lua: {content: 'local r = ngx.location.capture("/_sub") ngx.print(r.body)'}}
  - {name: sub, match: {path: {type: Exact, value: /_sub}}, lua: {content: 'ngx.say("ok")'}}
---
apiVersion: tidegate.dev/v1alpha1
kind: LuaRoute
metadata: {name: balancer, namespace: bench}
spec:
  hosts: [lua-balancer.bench]
  routes:
  - {name: picked, match: {path: {type: Prefix, value: /}}, lua: {balancer: 'require("ngx.balancer").set_current_peer("127.0.0.1", ${UPSTREAM#*:})'}}
$(ingress plain)
$(ingress lua 'tidegate.dev/lua-route: handlers')
$(ingress ip-allow 'nginx.ingress.kubernetes.io/whitelist-source-range: "127.0.0.0/8"')
$(ingress basic-auth 'nginx.ingress.kubernetes.io/auth-type: basic, nginx.ingress.kubernetes.io/auth-secret: users')
$(ingress limit-req 'nginx.ingress.kubernetes.io/limit-rps: "1000000"')
$(ingress ext-auth "nginx.ingress.kubernetes.io/auth-url: \"http://$UPSTREAM/auth\"")
---
apiVersion: v1
kind: Secret
metadata: {name: users, namespace: bench}
type: Opaque
stringData: {auth: "$(cat "$WORK/htpasswd")"}
YAML
# The earlier binary gets the routes without policy: it may not know the policies.
python3 - "$WORK/manifests/bench.yaml" "$WORK/before/bench.yaml" <<'PY'
import sys
docs = open(sys.argv[1]).read().split("\n---\n")
keep = [d for d in docs if "nginx.ingress.kubernetes.io" not in d and "kind: Secret" not in d
        and "hosts: [" not in d]
open(sys.argv[2], "w").write("\n---\n".join(keep))
PY

start_tidegate() { # binary manifests address tls-address admin-port -> pid
  setsid "$1" standalone --manifests "$2" --workers 2 --no-access-log \
    --http-addr "$3" --https-addr "$4" --admin-addr "127.0.0.1:$5" >/dev/null 2>"$WORK/tidegate-$5.log" &
  echo $!
}
nginx -p "$WORK" -c "$WORK/upstream.conf" -e "$WORK/upstream.err"
nginx -p "$WORK" -c "$WORK/proxy.conf" -e "$WORK/proxy.err"
TIDEGATE_PID=$(start_tidegate "$BIN" "$WORK/manifests" $TIDEGATE $TIDEGATE_TLS 19921)
PIDS+=("$TIDEGATE_PID")
BEFORE_PID=""
if [ -n "${BEFORE:-}" ]; then
  BEFORE_PID=$(start_tidegate "$BEFORE" "$WORK/before" $BEFORE_ADDR $BEFORE_TLS 19922)
  PIDS+=("$BEFORE_PID")
fi
for port in 19921 ${BEFORE_PID:+19922}; do
  for _ in $(seq 100); do curl -fs "127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.1; done
done
NGINX_PIDS=$( (cat "$WORK/proxy.pid"; pgrep -P "$(cat "$WORK/proxy.pid")") | paste -sd,)
UPSTREAM_PIDS=$( (cat "$WORK/upstream.pid"; pgrep -P "$(cat "$WORK/upstream.pid")") | paste -sd,)

header() { # host -> the extra request header its scenario sends
  case $1 in basic-auth.bench) echo "$AUTHORIZATION" ;; *) echo "X-Bench: 1" ;; esac
}
# Each target answers each scenario as expected before anything is measured.
check() { # address host status
  local got
  got=$(curl -s -o /dev/null -w '%{http_code}' -H "Host: $2" -H "$(header "$2")" "http://$1/")
  [ "$got" = "$3" ] || { echo "$2 on $1 answered $got, not $3" >&2; cat "$WORK"/*.err "$WORK"/*.log >&2; exit 1; }
}
for target in $TIDEGATE $NGINX; do
  for scenario in plain lua ip-allow basic-auth limit-req ext-auth lua-content subrequest lua-balancer; do
    check "$target" "$scenario.bench" 200
  done
  [ "$(curl -s -o /dev/null -w '%{http_code}' -H 'Host: basic-auth.bench' "http://$target/")" = 401 ] \
    || { echo "basic-auth.bench on $target does not ask for credentials" >&2; exit 1; }
done
if [ -n "$BEFORE_PID" ]; then check $BEFORE_ADDR plain.bench 200; check $BEFORE_ADDR lua.bench 200; fi

# Each runner prints "requests rps p99_ms user_us kernel_us" (the proxy's CPU over the run).
run() { # address host proxy-pids
  cpu_split "$3" "$UPSTREAM_PIDS" -- wrk -t2 -c"$CONNECTIONS" -d"${DURATION}s" --latency -H "Host: $2" -H "$(header "$2")" "http://$1/" \
    | wrk_stats | awk '{print $1, $2, $4, $7, $8}'
}
run_tls() { # address proxy-pids: a new TLS connection per request
  cpu_split "$2" "$UPSTREAM_PIDS" -- wrk -t2 -c"$CONNECTIONS" -d"${DURATION}s" --latency -H "Host: plain.bench" \
    -H "Connection: close" "https://$1/" | wrk_stats | awk '{print $1, $2, $4, $7, $8}'
}
run_h2() { # address proxy-pids
  cpu_split "$2" "$UPSTREAM_PIDS" -- h2load -D "$DURATION" -c "$CONNECTIONS" -m 10 -t 2 \
    -H ':authority: plain.bench' "http://$1/" | h2load_stats
}

echo "round,scenario,target,requests,rps,p99_ms,user_us,kernel_us" > "$WORK/rows.csv"
for round in $(seq "$ROUNDS"); do
  for scenario in ${SCENARIOS:-plain lua h2 tls-new ip-allow basic-auth limit-req ext-auth lua-content subrequest lua-balancer}; do
    targets="tidegate nginx"
    case $scenario in plain | lua | h2 | tls-new) [ -n "$BEFORE_PID" ] && targets="before tidegate nginx" ;; esac
    for target in $targets; do
      case $target in
        tidegate) addr=$TIDEGATE; tls=$TIDEGATE_TLS; h2=$TIDEGATE; pids=$TIDEGATE_PID ;;
        before) addr=$BEFORE_ADDR; tls=$BEFORE_TLS; h2=$BEFORE_ADDR; pids=$BEFORE_PID ;;
        nginx) addr=$NGINX; tls=$NGINX_TLS; h2=$NGINX_H2; pids=$NGINX_PIDS ;;
      esac
      case $scenario in
        h2) line=$(run_h2 "$h2" "$pids") ;;
        tls-new) line=$(run_tls "$tls" "$pids") ;;
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
print(f"Route policies, `bench/policies.sh {sys.argv[2]} {sys.argv[3]}`: wrk 2 threads, 64 connections (h2load:")
print("64 connections, 10 streams each); each proxy 2 workers; medians of the rounds. CPU is the proxy's")
print("(user + kernel) per request; p99 is wrk's (none from h2load).\n")
print("| scenario | proxy | req/s | p99 ms | proxy CPU µs/request | CPU vs nginx | CPU vs tidegate before |")
print("|---|---|---|---|---|---|---|")
for scenario in ["plain", "lua", "h2", "tls-new", "ip-allow", "basic-auth", "limit-req", "ext-auth",
                 "lua-content", "subrequest", "lua-balancer"]:
    base = med(scenario, "nginx", cpu)
    before = med(scenario, "before", cpu)
    for target in ["before", "tidegate", "nginx"]:
        c = med(scenario, target, cpu)
        if c is None:
            continue
        vs_before = f"{c / before:.3f}×" if before and target == "tidegate" else ""
        p99 = med(scenario, target, lambda r: float(r["p99_ms"]))
        print(f"| {scenario} | {target} | {med(scenario, target, lambda r: float(r['rps'])):,.0f} | "
              f"{p99:.2f} | {c:.2f} | {c / base:.2f}× | {vs_before} |")
# What one feature adds to its base scenario, per request.
increments = [("a subrequest", "subrequest", "lua-content"), ("a Lua balancer handler", "lua-balancer", "plain")]
lines = []
for name, scenario, base_scenario in increments:
    added = {}
    for target in ["tidegate", "nginx"]:
        with_it, without = med(scenario, target, cpu), med(base_scenario, target, cpu)
        if with_it is not None and without is not None:
            added[target] = with_it - without
    if len(added) == 2:
        lines.append(f"| {name} | {scenario} − {base_scenario} | {added['tidegate']:.2f} | {added['nginx']:.2f} |")
if lines:
    print("\n| what it adds | scenarios | tidegate µs/request | nginx µs/request |")
    print("|---|---|---|---|")
    print("\n".join(lines))
PY
