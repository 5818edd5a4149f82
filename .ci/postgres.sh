#!/usr/bin/env bash
# A throwaway PostgreSQL server for the distributed-study tests (tests/study/test_distributed.py and the storage tests of tests/study/test_storage.py).
#
#   export TRANSFERLAB_TEST_POSTGRES_URL=$(bash .ci/postgres.sh | tail -1)
#
# Installs PostgreSQL from the Debian packages when no server binaries are found, starts a
# cluster in $TRANSFERLAB_PG_DIR (default /tmp/transferlab-pg) listening on 127.0.0.1 only, port
# $TRANSFERLAB_PG_PORT (default 55432), trust authentication (loopback only), creates the database
# transferlab_test and prints its SQLAlchemy URL as the last line of stdout. Run it again and it
# only prints the URL (starting the server if it has stopped). It returns as soon as the server
# accepts connections; the server keeps running in the background.
#   stop:  pg_ctl -D /tmp/transferlab-pg/data stop   (as the postgres user when run as root)
set -euo pipefail

PORT="${TRANSFERLAB_PG_PORT:-55432}"
BASE="${TRANSFERLAB_PG_DIR:-/tmp/transferlab-pg}"
DATA="$BASE/data"
DB=transferlab_test
URL="postgresql+psycopg2://postgres@127.0.0.1:$PORT/$DB"

say() { echo "postgres.sh: $*" >&2; }

find_bin() {
    local dir
    dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
    if [ -n "$dir" ] && [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ]; then
        echo "$dir"
    elif command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
        dirname "$(command -v pg_ctl)"
    fi
}

BIN=$(find_bin)
if [ -z "$BIN" ]; then
    say "no PostgreSQL server binaries found; installing the Debian package"
    if [ "$(id -u)" -ne 0 ]; then
        say "installing needs root (apt-get); install the 'postgresql' package and run again"
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq postgresql >&2
    BIN=$(find_bin)
    [ -n "$BIN" ] || { say "postgresql installed but initdb/pg_ctl not found"; exit 1; }
fi

# The server refuses to run as root: as root, run it as the 'postgres' user.
as_owner() {
    if [ "$(id -u)" -eq 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

ready() { "$BIN/pg_isready" -q -h 127.0.0.1 -p "$PORT" -t 2 >/dev/null 2>&1; }

if ! ready; then
    mkdir -p "$BASE"
    [ "$(id -u)" -eq 0 ] && chown postgres: "$BASE"
    if [ ! -s "$DATA/PG_VERSION" ]; then
        say "initialising a cluster in $DATA"
        as_owner "$BIN/initdb" -D "$DATA" -U postgres --auth=trust --no-locale --encoding=UTF8 >"$BASE/initdb.log" 2>&1 \
            || { cat "$BASE/initdb.log" >&2; exit 1; }
    fi
    say "starting the server on 127.0.0.1:$PORT (log $BASE/server.log)"
    # -w waits until it accepts connections (bounded by -t); every output goes to files, so a caller
    # reading our stdout through a pipe is not kept waiting by the background server.
    as_owner "$BIN/pg_ctl" -D "$DATA" -l "$BASE/server.log" -w -t 60 \
        -o "-p $PORT -c listen_addresses=127.0.0.1 -k $BASE" start </dev/null >"$BASE/pg_ctl.log" 2>&1 \
        || { cat "$BASE/pg_ctl.log" "$BASE/server.log" >&2 2>/dev/null; exit 1; }
    ready || { say "server did not become ready"; exit 1; }
fi

if ! "$BIN/psql" -h 127.0.0.1 -p "$PORT" -U postgres -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$DB'" | grep -q 1; then
    "$BIN/psql" -h 127.0.0.1 -p "$PORT" -U postgres -d postgres -qc "CREATE DATABASE $DB" >&2
fi

echo "$URL"
