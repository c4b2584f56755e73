#!/usr/bin/env bash
# What tracing costs (issue 15, BENCHMARKS.md "Tracing"): withdrawal throughput and p99 with
# export off, with `sample_ratio` 0.01 and 1.0, side by side in one run. The settings take turns
# (ROUNDS rounds of off → 0.01 → 1.0), each on a fresh switch and database, so a noisy
# neighbour hits them alike.
#
#   e2e/bench/traces.sh
#   DATABASE=postgres://… e2e/bench/traces.sh     # PostgreSQL instead of the SQLite default
#
# Each run: a release `switchyard-switch serve`, `switchyard-atm load --scenario withdrawal`
# closed loop (throughput, p99), then open loop at a fixed rate (p99 where nothing queues: RATE,
# default half the first export-off figure). The spans go to a local OTLP/HTTP sink (Python,
# answers every batch at once, counts batches and bytes), so export really happens; the table
# shows what the sink received, the spans the switch dropped, and the CPU of the load generator
# and the sink (neither should be the bottleneck).
#
# Env: CONNECTIONS (64), DURATION (seconds, 10), ROUNDS (2), RATIOS ("off 0.01 1.0"), RATE,
# DATABASE, SKIP_BUILD (set: use the release binaries already built).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
connections=${CONNECTIONS:-64}
seconds=${DURATION:-10}
rounds=${ROUNDS:-2}
ratios=${RATIOS:-off 0.01 1.0}

[[ -n ${SKIP_BUILD:-} ]] || cargo build --release --locked -q -p switchyard-switch --bins
bin=${CARGO_TARGET_DIR:-target}/release
dir=$(mktemp -d /tmp/switchyard-traces.XXXXXX)
cleanup() {
    kill "${pid:-}" "${sink_pid:-}" 2>/dev/null || true
    wait 2>/dev/null || true
    [[ -n ${DATABASE:-} ]] && psql -q "$DATABASE" -c "DROP SCHEMA IF EXISTS bench_traces CASCADE" 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT
source e2e/bench/lib.sh
bench_keys

# --- the OTLP/HTTP sink -------------------------------------------------------------------
sink=$(free_port)
python3 - "$sink" <<'PY' > "$dir/sink.log" 2>&1 &
import http.server, sys, threading
stats = {"batches": 0, "bytes": 0}
lock = threading.Lock()
class Sink(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        n = int(self.headers.get("Content-Length", 0))
        self.rfile.read(n)
        with lock:
            stats["batches"] += 1
            stats["bytes"] += n
        # an empty ExportTraceServiceResponse: everything accepted
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()
    def do_GET(self):
        with lock:
            body = f'{stats["batches"]} {stats["bytes"]}'.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Sink).serve_forever()
PY
sink_pid=$!
for _ in $(seq 50); do curl -sf "http://127.0.0.1:$sink/" >/dev/null && break; sleep 0.1; done

sink_stats() { curl -sf "http://127.0.0.1:$sink/"; echo; }
sink_cpu() { awk '{print $14 + $15}' "/proc/$sink_pid/stat"; } # clock ticks
dropped() { # spans the switch dropped, all reasons
    curl -sf "http://127.0.0.1:$metrics/metrics" \
        | awk '/^switchyard_trace_spans_dropped_total/ {n += $2} END {printf "%d", n}'
}

database() { # $1: run number
    if [[ -n ${DATABASE:-} ]]; then
        psql -q "$DATABASE" -c "DROP SCHEMA IF EXISTS bench_traces CASCADE; CREATE SCHEMA bench_traces" >/dev/null
        local sep='?'; [[ $DATABASE == *\?* ]] && sep='&'
        echo "${DATABASE}${sep}options=-c%20search_path%3Dbench_traces"
    else
        echo "sqlite://$dir/switch-$1.db"
    fi
}

printf '%-6s %-8s %12s %10s %22s %12s %10s %10s %9s\n' round export "withdrawals/s" "p99 ms" "p99 at fixed rate" "sink batches" "sink KiB" dropped "CPU atm/sink"
run=0
for round in $(seq "$rounds"); do
    for ratio in $ratios; do
        run=$((run + 1))
        if [[ $ratio == off ]]; then
            unset SWITCHYARD_TELEMETRY__OTLP_ENDPOINT SWITCHYARD_TELEMETRY__SAMPLE_RATIO
        else
            export SWITCHYARD_TELEMETRY__OTLP_ENDPOINT=http://127.0.0.1:$sink
            export SWITCHYARD_TELEMETRY__SAMPLE_RATIO=$ratio
        fi
        serve "$(database "$run")"
        read -r b0 k0 < <(sink_stats)
        t0=$(sink_cpu)
        read -r rate p99 cpu < <(load withdrawal)
        fixed=${RATE:-${fixed:-$((rate / 2))}}
        read -r _ fixed_p99 _ < <(load withdrawal "$fixed")
        sleep 1 # the last batch leaves within the 500 ms schedule
        read -r b1 k1 < <(sink_stats)
        sink_pct=$(awk -v a="$t0" -v b="$(sink_cpu)" -v s="$seconds" -v hz="$(getconf CLK_TCK)" \
            'BEGIN {printf "%.0f", (b - a) * 100 / hz / (2 * s)}')
        printf '%-6s %-8s %12s %10s %22s %12s %10s %10s %9s\n' "$round" "$ratio" "$rate" "$p99" \
            "$fixed_p99 ms @ $fixed/s" "$((b1 - b0))" "$(((k1 - k0) / 1024))" "$(dropped)" "$cpu/$sink_pct %"
        stop_switch
    done
done
unset SWITCHYARD_TELEMETRY__OTLP_ENDPOINT SWITCHYARD_TELEMETRY__SAMPLE_RATIO
