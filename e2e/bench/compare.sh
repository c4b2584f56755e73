#!/usr/bin/env bash
# Our authorization path against the database's own ceiling for the same work, side by side in
# one run on one machine, with ratios (issue 11; BENCHMARKS.md "Side by side").
#
#   e2e/bench/compare.sh                # SQLite and PostgreSQL (a throwaway cluster from .ci/postgres.sh)
#   BACKENDS=sqlite e2e/bench/compare.sh
#
# For each backend:
#   1. the ceiling: the same transactions issued by the database's own tools —
#      PostgreSQL: pgbench with a withdrawal-shaped script (journal insert + guarded balance
#      update + daily total upsert, one commit each) and a balance-shaped one (balance read +
#      journal insert); SQLite: Python's sqlite3 module (WAL, synchronous=FULL), one commit per
#      withdrawal, in as many threads as the machine has cores;
#   2. the switch: `switchyard-atm load` against a release `switchyard-switch serve` on the same
#      database, every request a MACed 0200 with a format 4 PIN block;
#   3. the ratio, and the CPU the load generator used (so it is seen not to be the bottleneck);
#   4. the p99 at an open-loop rate of half the switch's maximum, and on PostgreSQL pgbench's
#      own p99 for its same-shaped transaction paced at half pgbench's maximum (`pgbench -R`),
#      so the tail this machine allows the database itself is printed beside ours.
#
# Env: CONNECTIONS (64), DURATION (seconds, 10), SCENARIOS ("balance withdrawal"), POOL (the
# switch's database connections, 32), PROFILE (release; `debug` only checks the script itself,
# its figures mean nothing), SKIP_BUILD (set: use the binaries already built).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
connections=${CONNECTIONS:-64}
seconds=${DURATION:-10}
scenarios=${SCENARIOS:-balance withdrawal}
backends=${BACKENDS:-sqlite postgres}

profile=${PROFILE:-release}
if [[ -n ${SKIP_BUILD:-} ]]; then
    :
elif [[ $profile == release ]]; then
    cargo build --release --locked -q -p switchyard-switch --bins
else
    cargo build --locked -q -p switchyard-switch --bins
fi
bin=${CARGO_TARGET_DIR:-target}/$profile
dir=$(mktemp -d /tmp/switchyard-compare.XXXXXX)
# outside $dir (mode 0700): the server runs as another user, which must reach its directory
pg_dir=/tmp/switchyard-compare-pg.$$
cleanup() {
    kill "${pid:-}" 2>/dev/null || true
    wait "${pid:-}" 2>/dev/null || true
    [[ -d $pg_dir ]] && bash .ci/postgres.sh stop "$pg_dir" >/dev/null 2>&1 || true
    rm -rf "$dir" "$pg_dir"
}
trap cleanup EXIT

# shared with load.sh and traces.sh: keys and token in $dir, free_port, serve, stop_switch, load
source e2e/bench/lib.sh
bench_keys

# --- the ceilings -------------------------------------------------------------------------

sqlite_ceiling() { # prints withdrawals/s
    python3 - "$dir/ceiling.db" "$seconds" "$(nproc)" <<'PY'
import sqlite3, sys, threading, time, uuid
path, seconds, threads = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
db = sqlite3.connect(path)
db.executescript("""
PRAGMA journal_mode=WAL;
CREATE TABLE accounts (id TEXT PRIMARY KEY, balance INTEGER NOT NULL, lim INTEGER NOT NULL);
CREATE TABLE daily (account_id TEXT, day TEXT, total INTEGER, PRIMARY KEY (account_id, day));
CREATE TABLE journal (id TEXT PRIMARY KEY, account_id TEXT, amount INTEGER, code TEXT,
                      balance INTEGER, created_at INTEGER);
""")
db.executemany("INSERT INTO accounts VALUES (?, 1000000000000, 1000000000000)",
               [(f"acct-{i}",) for i in range(256)])
db.commit(); db.close()
done = [0] * threads
stop = time.monotonic() + seconds
def worker(n):
    c = sqlite3.connect(path, isolation_level=None, timeout=30)
    c.execute("PRAGMA synchronous=FULL")
    i = 0
    while time.monotonic() < stop:
        acct = f"acct-{(n * 7919 + i) % 256}"
        c.execute("BEGIN IMMEDIATE")
        bal, lim = c.execute("SELECT balance, lim FROM accounts WHERE id = ?", (acct,)).fetchone()
        total = c.execute("SELECT COALESCE((SELECT total FROM daily WHERE account_id = ? AND day = '2026-11-30'), 0)", (acct,)).fetchone()[0]
        if bal >= 100 and total + 100 <= lim:
            c.execute("UPDATE accounts SET balance = balance - 100 WHERE id = ?", (acct,))
            c.execute("INSERT INTO daily VALUES (?, '2026-11-30', 100) ON CONFLICT (account_id, day) DO UPDATE SET total = total + 100", (acct,))
        c.execute("INSERT INTO journal VALUES (?, ?, 100, '00', ?, ?)", (str(uuid.uuid4()), acct, bal - 100, time.time_ns()))
        c.execute("COMMIT")
        i += 1
    done[n] = i
ts = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
start = time.monotonic()
[t.start() for t in ts]; [t.join() for t in ts]
print(f"{sum(done) / (time.monotonic() - start):.0f}")
PY
}

pg_ceiling() { # $1: withdrawal|balance; prints tps
    local shape=$1 script=$dir/pgbench-$1.sql
    if [[ $shape == withdrawal ]]; then
        cat > "$script" <<'SQL'
\set a random(1, 256)
BEGIN;
SELECT pg_advisory_xact_lock(hashtextextended('bench' || :client_id || ':' || :a, 0));
INSERT INTO bench_journal (account_id, amount, code) VALUES (:a, 100, '96') RETURNING id;
SELECT balance, lim FROM bench_accounts WHERE id = :a FOR NO KEY UPDATE;
UPDATE bench_accounts SET balance = balance - 100 WHERE id = :a AND balance >= 100 RETURNING balance;
INSERT INTO bench_daily VALUES (:a, current_date, 100) ON CONFLICT (account_id, day) DO UPDATE SET total = bench_daily.total + 100;
UPDATE bench_journal SET code = '00' WHERE id = currval('bench_journal_id_seq');
COMMIT;
SQL
    else
        cat > "$script" <<'SQL'
\set a random(1, 256)
BEGIN;
INSERT INTO bench_journal (account_id, amount, code) VALUES (:a, 0, '96') RETURNING id;
SELECT balance FROM bench_accounts WHERE id = :a FOR NO KEY UPDATE;
UPDATE bench_journal SET code = '00' WHERE id = currval('bench_journal_id_seq');
COMMIT;
SQL
    fi
    pgbench -n -c "$connections" -j 2 -T "$seconds" -f "$script" "$pg_url" 2>/dev/null \
        | awk '/^tps/ {printf "%.0f\n", $3}'
}

settle() { psql -q "$pg_url" -c "VACUUM ANALYZE" -c "CHECKPOINT" >/dev/null; }

pg_paced_p99() { # $1: withdrawal|balance, $2: rate; prints pgbench's own p99 (ms) at that rate
    rm -f "$dir"/pglog.*
    pgbench -n -c "$connections" -j 2 -T "$seconds" -R "$2" -l --log-prefix="$dir/pglog" \
        -f "$dir/pgbench-$1.sql" "$pg_url" >/dev/null 2>&1
    # per-transaction log: column 3 is the latency in µs (schedule lag included, as in ours)
    cat "$dir"/pglog.* | awk '{print $3}' | sort -n \
        | awk '{v[NR] = $1} END {if (NR) printf "%.1f", v[int(NR * 0.99)] / 1000; else print "?"}'
}

pg_prepare() {
    eval "$(bash .ci/postgres.sh start "$pg_dir")"
    pg_url=$SWITCHYARD_TEST_DATABASE_URL
    psql -q "$pg_url" <<'SQL'
CREATE TABLE bench_accounts (id INT PRIMARY KEY, balance BIGINT NOT NULL, lim BIGINT NOT NULL);
CREATE TABLE bench_daily (account_id INT, day DATE, total BIGINT, PRIMARY KEY (account_id, day));
CREATE TABLE bench_journal (id BIGSERIAL PRIMARY KEY, account_id INT, amount BIGINT, code TEXT,
                            created_at TIMESTAMPTZ DEFAULT now());
INSERT INTO bench_accounts SELECT g, 1000000000000, 1000000000000 FROM generate_series(1, 256) g;
SQL
}

# --- the switch ---------------------------------------------------------------------------

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.0f %%", a * 100 / b; else print "n/a" }'; }

# PostgreSQL only: database transactions committed per answered request. Outside a transaction
# every statement is its own, so this counts the switch's round trips per request (plus the
# load generator's provisioning through the admin API, a few hundred in all).
xacts() { psql -tA "$pg_url" -c "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()"; }

printf '%-10s %-11s %12s %10s %10s %8s %14s %10s %22s %26s\n' backend scenario switch/s "p99 ms" ceiling/s share "atm-load CPU" "xacts/req" "p99 at half rate" "db's p99 at half its rate"
for backend in $backends; do
    case $backend in
        sqlite)
            ceiling_withdrawal=$(sqlite_ceiling)
            ceiling_balance=$ceiling_withdrawal
            serve "sqlite://$dir/switch.db"
            ;;
        postgres)
            pg_prepare
            ceiling_withdrawal=$(pg_ceiling withdrawal)
            ceiling_balance=$(pg_ceiling balance)
            # the database's own tail at half its own maximum (pgbench -R), before the switch
            # runs: what this machine allows. Each paced run, and the switch, start on a
            # settled database: a full-speed run leaves dirty buffers and dead row versions
            # whose clean-up (checkpoint, vacuum) would land in the next run's tail.
            settle
            db_p99_withdrawal="$(pg_paced_p99 withdrawal $((ceiling_withdrawal / 2))) ms @ $((ceiling_withdrawal / 2))/s"
            settle
            db_p99_balance="$(pg_paced_p99 balance $((ceiling_balance / 2))) ms @ $((ceiling_balance / 2))/s"
            settle
            serve "$pg_url"
            ;;
        *) echo "unknown backend $backend" >&2; exit 2 ;;
    esac
    for scenario in $scenarios; do
        [[ $backend == postgres ]] && x0=$(xacts)
        read -r rate p99 cpu < <(load "$scenario")
        per=-
        if [[ $backend == postgres ]]; then
            sleep 1 # the statistics collector flushes each backend's counts within a second
            per=$(awk -v a="$x0" -v b="$(xacts)" -v r="$rate" -v s="$seconds" \
                'BEGIN { if (r > 0) printf "%.2f", (b - a) / (r * s); else print "n/a" }')
        fi
        # latency at an open-loop rate of half the maximum just measured
        half=$((rate / 2))
        read -r _ half_p99 _ < <(load "$scenario" "$half")
        ceiling=$ceiling_withdrawal
        [[ $scenario == balance ]] && ceiling=$ceiling_balance
        db_p99=-
        if [[ $backend == postgres ]]; then
            db_p99=$db_p99_withdrawal
            [[ $scenario == balance ]] && db_p99=$db_p99_balance
        fi
        printf '%-10s %-11s %12s %10s %10s %8s %13s%% %10s %22s %26s\n' "$backend" "$scenario" "$rate" "$p99" \
            "$ceiling" "$(ratio "$rate" "$ceiling")" "$cpu" "$per" "$half_p99 ms @ $half/s" "$db_p99"
    done
    stop_switch
done
