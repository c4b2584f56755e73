#!/usr/bin/env bash
# Throwaway PostgreSQL cluster for the store stories, here and in CI.
#
#   eval "$(bash .ci/postgres.sh start DIR)"   # prints: export SWITCHYARD_TEST_DATABASE_URL=…
#   bash .ci/postgres.sh stop DIR
#
# Installs Debian's postgresql when no initdb is found, runs the server as a non-root user
# (creating the `switchyard-ci` system user when started as root), listens on a free port on
# 127.0.0.1 only, with password (SCRAM) authentication over TCP. Everything but the final
# `export` line goes to stderr so the output can be eval'd.
set -euo pipefail

CI_USER=switchyard-ci
DB_NAME=switchyard_test
DB_USER=switchyard

log() { printf 'postgres.sh: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

usage() { die "usage: $0 start|stop|url DIR"; }

[[ $# -eq 2 ]] || usage
cmd=$1
dir=$2

find_bin() {
    local d
    # newest major version first
    for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k4 -n -r); do
        if [[ -x $d/initdb ]]; then
            printf '%s\n' "$d"
            return 0
        fi
    done
    return 1
}

install_postgres() {
    [[ $(id -u) -eq 0 ]] || die "PostgreSQL is not installed and we are not root; install the postgresql package"
    log "installing PostgreSQL from the Debian archive"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends postgresql >&2
}

# Runs a command as the cluster owner.
as_owner() {
    if [[ $(id -u) -eq 0 ]]; then
        if command -v runuser >/dev/null; then
            runuser -u "$CI_USER" -- "$@"
        else
            su -s /bin/bash "$CI_USER" -c "$(printf '%q ' "$@")"
        fi
    else
        "$@"
    fi
}

port_in_use() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

print_url() {
    # shellcheck disable=SC1091
    source "$dir/cluster.env"
    printf 'export SWITCHYARD_TEST_DATABASE_URL=postgres://%s:%s@127.0.0.1:%s/%s\n' \
        "$DB_USER" "$PGPASS" "$PGPORT" "$DB_NAME"
}

start() {
    local bin
    bin=$(find_bin) || { install_postgres; bin=$(find_bin) || die "initdb not found after installing postgresql"; }
    log "using $bin"

    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    if [[ $(id -u) -eq 0 ]]; then
        if ! id "$CI_USER" >/dev/null 2>&1; then
            log "creating system user $CI_USER"
            useradd --system --no-create-home --shell /usr/sbin/nologin "$CI_USER"
        fi
        chown "$CI_USER" "$dir"
    fi

    if [[ -f $dir/cluster.env ]] && as_owner "$bin/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
        log "already running"
        print_url
        return 0
    fi

    if [[ ! -f $dir/data/PG_VERSION ]]; then
        local pass
        pass=$(od -An -tx1 -N12 /dev/urandom | tr -d ' \n')
        printf '%s\n' "$pass" >"$dir/pwfile"
        [[ $(id -u) -eq 0 ]] && chown "$CI_USER" "$dir/pwfile"
        chmod 600 "$dir/pwfile"
        log "initdb in $dir/data"
        as_owner "$bin/initdb" -D "$dir/data" -U "$DB_USER" --pwfile="$dir/pwfile" \
            --auth-local=trust --auth-host=scram-sha-256 -E UTF8 --locale=C.UTF-8 >&2 \
            || as_owner "$bin/initdb" -D "$dir/data" -U "$DB_USER" --pwfile="$dir/pwfile" \
                --auth-local=trust --auth-host=scram-sha-256 -E UTF8 --locale=C >&2
        printf 'PGPASS=%s\n' "$pass" >"$dir/cluster.env"
        rm -f "$dir/pwfile"
    fi
    as_owner mkdir -p "$dir/run"

    local port attempt started=0
    for attempt in $(seq 1 20); do
        port=$((20000 + RANDOM % 40000))
        port_in_use "$port" && continue
        if as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
            -o "-c listen_addresses=127.0.0.1 -c port=$port -c unix_socket_directories=$dir/run -c max_connections=300" \
            start >&2; then
            started=1
            break
        fi
        log "start on port $port failed (attempt $attempt), trying another"
    done
    [[ $started -eq 1 ]] || { tail -n 20 "$dir/server.log" >&2 || true; die "could not start PostgreSQL"; }
    sed -i '/^PGPORT=/d' "$dir/cluster.env"
    printf 'PGPORT=%s\n' "$port" >>"$dir/cluster.env"

    local i
    for i in $(seq 1 60); do
        if as_owner "$bin/pg_isready" -q -h 127.0.0.1 -p "$port"; then break; fi
        sleep 0.5
    done
    as_owner "$bin/pg_isready" -q -h 127.0.0.1 -p "$port" || die "PostgreSQL did not become ready"

    if ! as_owner "$bin/psql" -h "$dir/run" -p "$port" -U "$DB_USER" -d postgres -tAc \
        "SELECT 1 FROM pg_database WHERE datname = '$DB_NAME'" | grep -q 1; then
        as_owner "$bin/psql" -h "$dir/run" -p "$port" -U "$DB_USER" -d postgres -q \
            -c "CREATE DATABASE $DB_NAME" >&2
    fi
    log "ready on 127.0.0.1:$port, database $DB_NAME"
    print_url
}

stop() {
    local bin
    bin=$(find_bin) || die "initdb not found"
    [[ -d $dir/data ]] || { log "no cluster in $dir"; return 0; }
    if as_owner "$bin/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
        as_owner "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >&2
    else
        log "not running"
    fi
}

case $cmd in
    start) start ;;
    stop) stop ;;
    url) print_url ;;
    *) usage ;;
esac
