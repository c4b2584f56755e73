#!/usr/bin/env bash
# End-to-end load figures for BENCHMARKS.md: a release switch on loopback, then
# `switchyard-atm load` for each scenario.
#
#   e2e/bench/load.sh sqlite                 # embedded SQLite in a temp dir
#   DATABASE=postgres://… e2e/bench/load.sh postgres
#
# Env: CONNECTIONS (200), DURATION (10s), SCENARIOS ("echo balance withdrawal"), RATE (unset =
# closed loop). Builds the release binaries first.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
backend=${1:-sqlite}
connections=${CONNECTIONS:-200}
duration=${DURATION:-10s}
scenarios=${SCENARIOS:-echo balance withdrawal}

cargo build --release --locked -q -p switchyard-switch --bins
bin=${CARGO_TARGET_DIR:-target}/release
dir=$(mktemp -d /tmp/switchyard-bench.XXXXXX)
trap 'kill "${pid:-}" 2>/dev/null || true; wait "${pid:-}" 2>/dev/null || true; rm -rf "$dir"' EXIT

source e2e/bench/lib.sh
bench_keys
case $backend in
    sqlite) url="sqlite://$dir/bench.db" ;;
    postgres) url=${DATABASE:?set DATABASE to a postgres:// URL} ;;
    *) echo "usage: $0 sqlite|postgres" >&2; exit 2 ;;
esac
serve "$url"

for scenario in $scenarios; do
    echo "== $backend $scenario, $connections connections, $duration"
    "$bin/switchyard-atm" --iso "127.0.0.1:$iso" --admin "http://127.0.0.1:$admin" \
        --token-file "$dir/tokens" --kek-file "$dir/kek.hex" \
        load --connections "$connections" --duration "$duration" --scenario "$scenario" ${RATE:+--rate "$RATE"}
done
