# Shared by the bench scripts (sourced): installing tools, and reading wrk's output.

# need COMMAND PACKAGE...: installs the Debian packages when COMMAND is missing.
need() { command -v "$1" >/dev/null || { apt-get update -qq && apt-get install -y -qq "${@:2}"; }; }

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
