# Shared by the bench scripts (sourced): installing tools, and reading wrk's output.

# need COMMAND PACKAGE...: installs the Debian packages when COMMAND is missing.
need() { command -v "$1" >/dev/null || { apt-get update -qq && apt-get install -y -qq "${@:2}"; }; }

# The scripts start tidegate with `setsid`: in a session of its own, as a service manager would,
# and as nginx puts itself when it daemonizes. Linux schedules each session as a group
# (autogroup), so a proxy left in the script's session would share one CPU share with the load
# generator while nginx had one to itself: that alone put tidegate's p99 at 4.5 ms against
# nginx's 1.9 ms. (A background job of a script is no group leader, so setsid does not fork and
# `$!` stays the proxy's pid.)

# wrk_stats: reads `wrk --latency` output on stdin and prints
# "requests requests_per_second p50_ms p99_ms", followed by the words of a `cpu_split` line
# when there is one.
wrk_stats() {
  python3 -c '
import re, sys
out = sys.stdin.read()
def ms(label):
    value, unit = re.search(label + r"\s+([\d.]+)(us|ms|s)", out).groups()
    return float(value) * {"us": 0.001, "ms": 1, "s": 1000}[unit]
requests = int(re.search(r"(\d+) requests in", out).group(1))
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
cpu = re.search(r"^cpu (.*)$", out, re.M)
print(requests, rps, ms("50%"), ms("99%"), cpu.group(1) if cpu else "")
'
}

# cpu_split PROXY_PIDS UPSTREAM_PIDS -- COMMAND...: runs COMMAND (wrk) and prints its standard
# output, then one last line "cpu wrk_us upstream_us proxy_user_us proxy_kernel_us": the CPU
# time each spent over the run in microseconds, from /proc (the proxy's and the upstream's
# processes, all threads) and from the command's own resource usage. PIDS are comma-separated.
cpu_split() {
  python3 - "$@" <<'PY'
import os, resource, subprocess, sys
proxy, upstream, command = [p for p in sys.argv[1].split(",") if p], [p for p in sys.argv[2].split(",") if p], sys.argv[4:]
tick = 1e6 / os.sysconf("SC_CLK_TCK")
def times(pids):
    user = kernel = 0
    for pid in pids:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        user, kernel = user + int(fields[11]), kernel + int(fields[12])
    return user * tick, kernel * tick
def own():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (usage.ru_utime + usage.ru_stime) * 1e6
p0, u0, c0 = times(proxy), times(upstream), own()
sys.stdout.write(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
p1, u1, c1 = times(proxy), times(upstream), own()
print("cpu", round(c1 - c0), round(sum(u1) - sum(u0)), round(p1[0] - p0[0]), round(p1[1] - p0[1]))
PY
}

# bench_setup: what the side-by-side scripts share. Installs the load generators and nginx with
# its Lua module; takes TIDEGATE_BIN, or builds this tree's release binary, as $BIN; makes
# $WORK, a scratch folder, and $PIDS, processes to stop, both cleaned up on exit (with the
# nginx instances whose pid files are $WORK/upstream.pid and $WORK/proxy.pid).
bench_setup() {
  need wrk wrk
  need h2load nghttp2-client
  need nginx nginx libnginx-mod-http-lua
  need openssl openssl
  [ -f /usr/lib/nginx/modules/ngx_http_lua_module.so ] || apt-get install -y -qq libnginx-mod-http-lua
  [ -n "${TIDEGATE_BIN:-}" ] || cargo build --release --quiet
  BIN=${TIDEGATE_BIN:-$PWD/target/release/tidegate}
  WORK=$(mktemp -d)
  PIDS=()
  trap bench_cleanup EXIT
}

bench_cleanup() {
  kill "${PIDS[@]}" 2>/dev/null || true
  for conf in upstream proxy; do [ -f "$WORK/$conf.pid" ] && kill "$(cat "$WORK/$conf.pid")" 2>/dev/null || true; done
  rm -rf "$WORK"
}

# h2load_stats: reads h2load's output followed by a `cpu_split` line on stdin and prints
# "requests requests_per_second 0 proxy_user_us proxy_kernel_us" (h2load reports no p99);
# requests are those answered 2xx.
h2load_stats() {
  python3 -c '
import re, sys
out = sys.stdin.read()
rps = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1))
done = int(re.search(r"status codes: (\d+) 2xx", out).group(1))
cpu = re.search(r"^cpu (.*)$", out, re.M).group(1).split()
print(done, rps, 0, cpu[2], cpu[3])'
}
