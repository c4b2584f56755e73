#!/usr/bin/env bash
# Where a paced withdrawal's time goes in PostgreSQL (BENCHMARKS.md "Side by side"): a fresh
# throwaway cluster (.ci/postgres.sh), a release `serve` on it, a closed-loop withdrawal run for
# the maximum, then an open-loop run at RATE while pg_stat_activity is sampled every 10 ms
# (wait event of every active backend) and the machine's busy share is read from /proc/stat.
#
#   e2e/bench/pg_waits.sh                 # RATE=1200, 64 connections, 15 s
#
# Env: RATE (1200), CONNECTIONS (64), DURATION (seconds of the paced run, 15), SKIP_BUILD.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
connections=${CONNECTIONS:-64}
rate=${RATE:-1200}
[[ -n ${SKIP_BUILD:-} ]] || cargo build --release --locked -q -p switchyard-switch --bins
bin=${CARGO_TARGET_DIR:-target}/release
dir=$(mktemp -d /tmp/switchyard-pgwaits.XXXXXX)
pg_dir=/tmp/switchyard-pgwaits-pg.$$
cleanup() {
    kill "${pid:-}" 2>/dev/null || true
    wait 2>/dev/null || true
    [[ -d $pg_dir ]] && bash .ci/postgres.sh stop "$pg_dir" >/dev/null 2>&1 || true
    rm -rf "$dir" "$pg_dir"
}
trap cleanup EXIT
source e2e/bench/lib.sh
bench_keys
eval "$(bash .ci/postgres.sh start "$pg_dir" 2>/dev/null | grep -v '^postgres.sh')"
url=$SWITCHYARD_TEST_DATABASE_URL
serve "$url"

seconds=10
read -r max p99 _ < <(load withdrawal)
echo "closed loop: $max withdrawals/s, p99 $p99 ms"

# samples start 3 s into the paced run and last 8 s
python3 - "$url" > "$dir/waits.txt" <<'PY' &
import collections, subprocess, sys, time
time.sleep(3)
query = ("SELECT coalesce(wait_event_type, 'CPU') || ':' || coalesce(wait_event, '-') "
         "FROM pg_stat_activity WHERE datname = current_database() "
         "AND pid <> pg_backend_pid() AND state = 'active'")
psql = subprocess.Popen(["psql", "-XAtq", sys.argv[1]], stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE, text=True, bufsize=1)
seen, samples, end = collections.Counter(), 0, time.time() + 8
while time.time() < end:
    psql.stdin.write(query + ";\nSELECT '--';\n")
    psql.stdin.flush()
    while (line := psql.stdout.readline().strip()) != "--":
        if line:
            seen[line] += 1
    samples += 1
    time.sleep(0.01)
print(f"{samples} samples; active backends per sample, by what they wait on:")
for what, n in seen.most_common(12):
    print(f"  {n / samples:6.2f}  {what}")
PY
sampler=$!
busy() { awk '/^cpu / {s = 0; for (i = 2; i <= 9; i++) s += $i; print s, $5 + $6}' /proc/stat; }
( sleep 3; read -r t0 i0 < <(busy); sleep 8; read -r t1 i1 < <(busy)
  awk -v a="$t0" -v b="$t1" -v c="$i0" -v d="$i1" \
      'BEGIN {printf "machine busy %.0f %% over those 8 s\n", 100 - (d - c) * 100 / (b - a)}' ) > "$dir/cpu.txt" &
cpu_pid=$!
seconds=${DURATION:-15}
read -r _ paced_p99 _ < <(load withdrawal "$rate")
wait "$sampler" "$cpu_pid"
echo "open loop at $rate/s: p99 $paced_p99 ms"
sed -n 's/.*\(latency p50.*\)/  \1/p' "$dir/load.out"
cat "$dir/cpu.txt" "$dir/waits.txt"
