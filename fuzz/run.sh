#!/usr/bin/env bash
# Runs each fuzz target for a bounded time (default 60 s; the closing figure to aim for is
# 3600) with libFuzzer, from the seed corpus in fuzz/corpus/<target>. Installs cargo-fuzz first
# when it is missing; needs the nightly toolchain. A crash leaves its input in
# fuzz/artifacts/<target>/: add it to the corpus once fixed, so that `cargo test` replays it.
#
# Usage: fuzz/run.sh [seconds-per-target] [target...]
set -euo pipefail
cd "$(dirname "$0")"
SECONDS_PER_TARGET="${1:-60}"
shift || true
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(request_head chunked response_head proxy_protocol manifests lua_headers)
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
rustup toolchain list | grep -q nightly || { echo "fuzz/run.sh needs the nightly toolchain (rustup toolchain install nightly)" >&2; exit 1; }
for target in "${TARGETS[@]}"; do
  echo "-- $target for ${SECONDS_PER_TARGET}s"
  # The corpus grows in a scratch copy; the committed seeds stay small.
  work="$(mktemp -d)"
  cp -r "corpus/$target/." "$work/"
  cargo +nightly fuzz run "$target" "$work" -- -max_total_time="$SECONDS_PER_TARGET" -rss_limit_mb=2048 2>&1 \
    | grep -E "^#[0-9]+.*(DONE|pulse)|Done [0-9]+ runs|ERROR|panicked|SUMMARY" || true
  rm -rf "$work"
done
