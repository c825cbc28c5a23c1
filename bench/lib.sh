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
# "requests requests_per_second p50_ms p99_ms".
wrk_stats() {
  python3 -c '
import re, sys
out = sys.stdin.read()
def ms(label):
    value, unit = re.search(label + r"\s+([\d.]+)(us|ms|s)", out).groups()
    return float(value) * {"us": 0.001, "ms": 1, "s": 1000}[unit]
requests = int(re.search(r"(\d+) requests in", out).group(1))
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
print(requests, rps, ms("50%"), ms("99%"))
'
}
