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

head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$dir/lmk.hex"
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$dir/kek.hex"
printf 'admin:%s\n' "$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')" > "$dir/tokens"
case $backend in
    sqlite) url="sqlite://$dir/bench.db" ;;
    postgres) url=${DATABASE:?set DATABASE to a postgres:// URL} ;;
    *) echo "usage: $0 sqlite|postgres" >&2; exit 2 ;;
esac

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
iso=$(free_port); admin=$(free_port); metrics=$(free_port)
# Every simulated ATM connects from 127.0.0.1 and is provisioned with one token, so the
# per-address connection cap and the admin rate limits are lifted for the benchmark.
SWITCHYARD_ISO8583__LISTEN=127.0.0.1:$iso \
SWITCHYARD_ISO8583__MAX_CONNECTIONS_PER_IP=1000000 \
SWITCHYARD_ADMIN__RATE_LIMIT_PER_SECOND=100000 \
SWITCHYARD_ADMIN__RATE_LIMIT_BURST=100000 \
SWITCHYARD_ADMIN__LISTEN=127.0.0.1:$admin \
SWITCHYARD_METRICS__LISTEN=127.0.0.1:$metrics \
SWITCHYARD_ADMIN__TOKENS_FILE=$dir/tokens \
SWITCHYARD_KEYS__LMK_FILE=$dir/lmk.hex \
SWITCHYARD_KEYS__KEK_FILE=$dir/kek.hex \
SWITCHYARD_DATABASE__URL=$url \
SWITCHYARD_DATABASE__MAX_CONNECTIONS=${POOL:-32} \
SWITCHYARD_ROUTING__ON_US='["6011"]' \
RUST_LOG=warn "$bin/switchyard-switch" serve --migrate --log-format json > "$dir/switch.log" 2>&1 &
pid=$!
for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$metrics/readyz" >/dev/null && break
    sleep 0.1
done

for scenario in $scenarios; do
    echo "== $backend $scenario, $connections connections, $duration"
    "$bin/switchyard-atm" --iso "127.0.0.1:$iso" --admin "http://127.0.0.1:$admin" \
        --token-file "$dir/tokens" --kek-file "$dir/kek.hex" \
        load --connections "$connections" --duration "$duration" --scenario "$scenario" ${RATE:+--rate "$RATE"}
done
