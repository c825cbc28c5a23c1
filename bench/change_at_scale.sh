#!/usr/bin/env bash
# Applying a change at 100, 1,000 and 10,000 Ingresses, tidegate vs nginx (-t plus reload): the
# time until the new host answers, and the proxies' RSS. See bench/change_at_scale.py.
# With SCENARIO=annotations: plain against annotated Ingresses, two tidegates side by side.
# Usage: [SCENARIO=annotations] bench/change_at_scale.sh [counts...]   (ROUNDS=3; loopback only; every wait is bounded)
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
need nginx nginx
cargo build --release --quiet

WORK=$(mktemp -d)
UPSTREAM=127.0.0.1:19200
cat > "$WORK/upstream.conf" <<NGX
worker_processes 1;
pid $WORK/upstream.pid;
error_log $WORK/upstream.err warn;
events { worker_connections 4096; }
http { access_log off; server { listen $UPSTREAM; location / { return 200 "ok\n"; } } }
NGX
nginx -p "$WORK" -c "$WORK/upstream.conf" -e "$WORK/upstream.err"
trap 'kill "$(cat "$WORK/upstream.pid")" 2>/dev/null || true; rm -rf "$WORK"' EXIT

mkdir -p bench/results
OUT=bench/results/change-at-scale.md
[ "${SCENARIO:-}" = annotations ] && OUT=bench/results/change-at-scale-annotations.md
python3 bench/change_at_scale.py "$PWD/target/release/tidegate" "$UPSTREAM" "$@" | tee "$OUT"
