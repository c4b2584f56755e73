#!/usr/bin/env bash
# Two-switch figures for BENCHMARKS.md, on PostgreSQL: an acquirer routing BIN 4111 to an issuer
# (release binaries, loopback).
#
#   DATABASE=postgres://… e2e/bench/upstream.sh
#
# 1. Routed vs on-us latency: `switchyard-atm load` withdrawals at the acquirer, once with on-us
#    cards (BIN 6011, the acquirer's ledger) and once with cards routed to the issuer (BIN 4111,
#    created on the issuer), at the same paced rate.
# 2. SAF drain throughput: ADVICES 0220 advices queued at the acquirer, then DRAINERS
#    `switchyard-switch drain` processes (each run: 1 and 3) deliver them; advices/s is the
#    backlog divided by the time until it is empty. The issuer books every advice.
#
# Env: CONNECTIONS (50), DURATION (10s), RATE (500), ADVICES (20000), DRAINER_COUNTS ("1 3"),
# BIN (a directory holding the switchyard-switch and switchyard-atm to run instead of building
# them: e.g. an older build, to compare two commits side by side).
# The two switches get their own schemas (bench_issuer, bench_acquirer) in DATABASE, dropped first.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
base=${DATABASE:?set DATABASE to a postgres:// URL}
connections=${CONNECTIONS:-50}
duration=${DURATION:-10s}
rate=${RATE:-500}
advices=${ADVICES:-20000}
drainer_counts=${DRAINER_COUNTS:-1 3}

if [[ -n ${BIN:-} ]]; then
    bin=$BIN
else
    cargo build --release --locked -q -p switchyard-switch --bins
    bin=${CARGO_TARGET_DIR:-target}/release
fi
dir=$(mktemp -d /tmp/switchyard-upstream.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT

hex() { head -c "$1" /dev/urandom | od -An -tx1 | tr -d ' \n'; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
sep='?'; [[ $base == *\?* ]] && sep='&'
schema_url() { printf '%s%soptions=-c%%20search_path%%3D%s' "$base" "$sep" "$1"; }
for s in bench_issuer bench_acquirer; do
    psql -q "$base" -c "DROP SCHEMA IF EXISTS $s CASCADE" -c "CREATE SCHEMA $s" >/dev/null
done

# name → files and ports
node() {
    local name=$1
    mkdir -p "$dir/$name"
    hex 32 > "$dir/$name/lmk.hex"
    hex 32 > "$dir/$name/kek.hex"
    printf 'admin:%s\n' "$(hex 16)" > "$dir/$name/tokens"
    eval "${name}_iso=$(free_port) ${name}_admin=$(free_port) ${name}_metrics=$(free_port)"
}
config() {
    local name=$1 iso admin metrics
    iso=${name}_iso admin=${name}_admin metrics=${name}_metrics
    cat <<EOF
[iso8583]
listen = "127.0.0.1:${!iso}"
max_connections_per_ip = 1000000
[admin]
listen = "127.0.0.1:${!admin}"
tokens_file = "$dir/$name/tokens"
[metrics]
listen = "127.0.0.1:${!metrics}"
[database]
url = "$(schema_url "bench_$name")"
max_connections = 32
[keys]
lmk_file = "$dir/$name/lmk.hex"
kek_file = "$dir/$name/kek.hex"
EOF
}
start() { # name args…
    local name=$1; shift
    local metrics=${name}_metrics
    RUST_LOG=warn "$bin/switchyard-switch" --config "$dir/$name/switch.toml" --log-format json "$@" \
        >> "$dir/$name/$1.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 100); do
        curl -sf "http://127.0.0.1:${!metrics}/readyz" >/dev/null && return 0
        sleep 0.1
    done
    echo "$name did not become ready" >&2; exit 1
}
atm() { # name args…
    local name=$1; shift
    local iso=${name}_iso admin=${name}_admin
    "$bin/switchyard-atm" --iso "127.0.0.1:${!iso}" --admin "http://127.0.0.1:${!admin}" \
        --token-file "$dir/$name/tokens" --kek-file "$dir/$name/kek.hex" "$@"
}
api() { # name method path [json]
    local admin=${1}_admin token
    token=$(sed -n 's/^admin://p' "$dir/$1/tokens")
    curl -sf -X "$2" -H "Authorization: Bearer $token" -H 'Content-Type: application/json' \
        "http://127.0.0.1:${!admin}$3" ${4:+-d "$4"}
}

node issuer
node acquirer
{ config issuer; printf '[routing]\non_us = ["4111"]\n'; } > "$dir/issuer/switch.toml"
start issuer serve --migrate
atm issuer station --id ACQ001 --tmk-out "$dir/acquirer/station.tmk" >/dev/null
{
    config acquirer
    cat <<EOF
[routing]
on_us = ["6011"]
[[routing.routes]]
prefix = "4111"
upstream = "issuer-b"
[[upstreams]]
name = "issuer-b"
endpoints = ["127.0.0.1:$issuer_iso"]
station_id = "ACQ001"
tmk_file = "$dir/acquirer/station.tmk"
[saf]
batch_size = 200
in_process_drainer = false
EOF
} > "$dir/acquirer/switch.toml"
start acquirer serve --migrate
for _ in $(seq 100); do
    curl -s "http://127.0.0.1:$acquirer_metrics/metrics" | grep -q '^switchyard_upstream_up{upstream="issuer-b"} 1' && break
    sleep 0.1
done

echo "== latency: withdrawals at $rate/s over $connections connections, $duration"
echo "-- on-us (acquirer ledger)"
atm acquirer load --scenario withdrawal --bin 6011 --connections "$connections" --duration "$duration" --rate "$rate"
echo "-- routed to the issuer (PIN translation, link MAC, issuer ledger)"
atm acquirer load --scenario withdrawal --bin 4111 --connections "$connections" --duration "$duration" --rate "$rate" \
    --card-admin "http://127.0.0.1:$issuer_admin" --card-token-file "$dir/issuer/tokens"

# 100 issuer accounts and cards the advices book against (spreads row locks like real traffic)
for i in $(seq -w 0 99); do
    api issuer POST /v1/accounts "{\"id\":\"SAF-$i\",\"currency\":\"360\",\"balance\":0,\"dailyWithdrawalLimit\":0}" >/dev/null
    api issuer POST /v1/cards "{\"pan\":\"41115000000000$i\",\"expiry\":\"2812\",\"accountId\":\"SAF-$i\",\"pin\":\"1234\"}" >/dev/null
done

run=0
for drainers in $drainer_counts; do
    run=$((run + 1))
    # queue the advices (unique STANs per run: 1 + run*100000 …); the PAN goes in clear, the
    # form rows of older versions have: opening a sealed one costs the drainer microseconds
    psql -q "$(schema_url bench_acquirer)" >/dev/null <<SQL
INSERT INTO saf_messages (destination, priority, mti, idempotency_key, payload, next_attempt_at, created_at)
SELECT 'issuer-b', 1, '0220', 'ACQ001:' || stan || ':bench$run',
       jsonb_build_object('2', '41115000000000' || lpad((g % 100)::text, 2, '0'), '3', '010000',
                          '4', '000000000100', '7', to_char(now() AT TIME ZONE 'UTC', 'MMDDHH24MISS'),
                          '11', stan, '14', '2812', '41', 'ACQ001  ', '49', '360'),
       now(), now() + g * interval '1 microsecond'
FROM generate_series(1, $advices) AS g,
     LATERAL (SELECT lpad(($run * 100000 + g)::text, 6, '0') AS stan) s;
SQL
    started=$(date +%s.%N)
    drain_pids=()
    for i in $(seq "$drainers"); do
        SWITCHYARD_METRICS__LISTEN=127.0.0.1:$(free_port) RUST_LOG=warn \
            "$bin/switchyard-switch" --config "$dir/acquirer/switch.toml" --log-format json drain \
            >> "$dir/acquirer/drain.log" 2>&1 &
        drain_pids+=($!)
        pids+=($!)
    done
    while :; do
        left=$(psql -Atq "$(schema_url bench_acquirer)" -c "SELECT count(*) FROM saf_messages WHERE status = 'queued'")
        [[ $left == 0 ]] && break
        sleep 0.2
    done
    finished=$(date +%s.%N)
    for p in "${drain_pids[@]}"; do kill "$p"; done
    wait "${drain_pids[@]}" 2>/dev/null || true
    dead=$(psql -Atq "$(schema_url bench_acquirer)" -c "SELECT count(*) FROM saf_messages WHERE status = 'dead'")
    booked=$(psql -Atq "$(schema_url bench_issuer)" -c "SELECT count(*) FROM journal WHERE mti = '0220' AND response_code = '00'")
    python3 -c "
n=$advices; t=$finished-$started
print(f'== SAF drain, $drainers drainer(s): {n} advices in {t:.2f} s = {n/t:,.0f} advices/s (dead letters: $dead; issuer has booked $booked 0220s in all)')"
done
