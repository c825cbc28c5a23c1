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
