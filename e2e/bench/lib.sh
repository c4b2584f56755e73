# Shared by the single-switch benchmarks (compare.sh, load.sh, traces.sh); sourced, not run.
# Expects: $dir (a scratch directory), $bin (where switchyard-switch and switchyard-atm are),
# $connections and $seconds (load shape). serve/load set and read $iso, $admin, $metrics, $pid.

bench_keys() { # a fresh LMK, KEK and admin token in $dir
    head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$dir/lmk.hex"
    head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$dir/kek.hex"
    printf 'admin:%s\n' "$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')" > "$dir/tokens"
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

serve() { # $1: database URL; the caller's SWITCHYARD_* environment (e.g. [telemetry]) applies too
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
    SWITCHYARD_DATABASE__URL=$1 \
    SWITCHYARD_DATABASE__MAX_CONNECTIONS=${POOL:-32} \
    SWITCHYARD_ROUTING__ON_US='["6011"]' \
    RUST_LOG=warn "$bin/switchyard-switch" serve --migrate --log-format json > "$dir/switch.log" 2>&1 &
    pid=$!
    for _ in $(seq 200); do
        curl -sf "http://127.0.0.1:$metrics/readyz" >/dev/null && return 0
        sleep 0.1
    done
    echo "the switch did not become ready; its log:" >&2
    tail -20 "$dir/switch.log" >&2
    exit 1
}

stop_switch() {
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    pid=
}

load() { # $1: scenario, $2: open-loop rate (empty: closed loop); prints "rate p99 cpu%"
    local out=$dir/load.out
    /usr/bin/time -f '%U %S' -o "$dir/time.out" \
        "$bin/switchyard-atm" --iso "127.0.0.1:$iso" --admin "http://127.0.0.1:$admin" \
        --token-file "$dir/tokens" --kek-file "$dir/kek.hex" \
        load --connections "$connections" --duration "${seconds}s" --scenario "$1" \
        ${2:+--rate "$2"} > "$out" 2>&1
    local rate p99 cpu
    rate=$(sed -n 's/.*= \([0-9]*\)\/s.*/\1/p' "$out" | tail -1)
    p99=$(sed -n 's/.*p99 \([0-9.]*\) ms.*/\1/p' "$out" | tail -1)
    cpu=$(awk -v s="$seconds" '{printf "%.0f", ($1 + $2) * 100 / s}' "$dir/time.out")
    echo "${rate:-0} ${p99:-?} $cpu"
}
