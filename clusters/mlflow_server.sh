#!/usr/bin/env bash
# Start, stop or probe an MLflow tracking server running in the background.
#
#   clusters/mlflow_server.sh start STATE_DIR [mlflow server flags...]
#   clusters/mlflow_server.sh stop  STATE_DIR
#   clusters/mlflow_server.sh status STATE_DIR
#
# STATE_DIR holds only the pid file and the server log; the run database and the artifacts live where
# the flags say (--backend-store-uri, --artifacts-destination). The head node of clusters/aws.yaml and
# clusters/local.yaml and clusters/local_loopback.sh all start their server through this script, so
# `ray up` can be re-run: `start` first stops the server it started before, then waits until the new
# one answers /health (or prints the log and fails), so a bad flag fails `ray up` instead of failing
# the first training run an hour later.
#
# A SQLite store gets one server worker process: `--workers 1` is added when no worker count is given
# (MLflow's default is 4), and any other count is refused (exit 2). SQLite takes one writer at a time;
# four processes writing for concurrent trials collide on its lock ("database is locked"). A
# PostgreSQL store takes concurrent writers, so its worker count is left as given.
set -euo pipefail

usage() {
    echo "usage: $0 start|stop|status STATE_DIR [mlflow server flags...]" >&2
    exit 2
}

[[ $# -ge 2 ]] || usage
action=$1
state_dir=$2
shift 2
pid_file=$state_dir/server.pid
log_file=$state_dir/server.log

# host:port the server answers on, from the flags (mlflow's defaults: 127.0.0.1:5000).
probe_address() {
    local host=127.0.0.1 port=5000
    while [[ $# -gt 0 ]]; do
        case $1 in
            -h | --host) host=$2; shift ;;
            -p | --port) port=$2; shift ;;
        esac
        shift
    done
    # A server bound to every interface also answers on loopback.
    [[ $host == 0.0.0.0 ]] && host=127.0.0.1
    echo "$host:$port"
}

# The value of flag $1 (long form, or short form $2) in the rest of the arguments, or nothing.
flag_value() {
    local long=$1 short=$2
    shift 2
    while [[ $# -gt 0 ]]; do
        case $1 in
            "$long" | "$short") echo "${2:-}"; return ;;
            "$long"=*) echo "${1#*=}"; return ;;
        esac
        shift
    done
}

# Sets server_flags: the flags, plus `--workers 1` for a SQLite store that names no worker count (see
# the header). Like `mlflow server`, reads MLFLOW_BACKEND_STORE_URI and MLFLOW_WORKERS when the flags
# do not say; without a store URI MLflow 3 uses sqlite:///mlflow.db.
with_sqlite_workers() {
    local uri workers
    uri=$(flag_value --backend-store-uri --backend-store-uri "$@")
    uri=${uri:-${MLFLOW_BACKEND_STORE_URI:-sqlite:///mlflow.db}}
    workers=$(flag_value --workers -w "$@")
    workers=${workers:-${MLFLOW_WORKERS:-}}
    server_flags=("$@")
    [[ $uri == sqlite:* ]] || return 0
    if [[ -z $workers ]]; then
        server_flags+=(--workers 1)
    elif [[ $workers != 1 ]]; then
        echo "mlflow_server.sh: --workers $workers with the SQLite store $uri: SQLite takes one writer;" \
            "use --workers 1, or a PostgreSQL store for more workers" >&2
        exit 2
    fi
}

healthy() {
    python - "$1" 2>/dev/null <<'EOF'
import sys
import urllib.request

try:
    urllib.request.urlopen(f"http://{sys.argv[1]}/health", timeout=2).read()
except Exception:
    sys.exit(1)
EOF
}

stop() {
    [[ -f $pid_file ]] || return 0
    local pgid
    pgid=$(cat "$pid_file")
    # The server was started as its own process group (setsid): this ends mlflow and its uvicorn
    # workers and nothing else.
    if kill -0 -- "-$pgid" 2>/dev/null; then
        kill -TERM -- "-$pgid" 2>/dev/null || true
        for _ in $(seq 50); do
            kill -0 -- "-$pgid" 2>/dev/null || break
            sleep 0.2
        done
        kill -KILL -- "-$pgid" 2>/dev/null || true
    fi
    rm -f "$pid_file"
}

start() {
    local address
    # How long to wait for /health, in seconds of wall time (not tries: on a loaded head a probe itself can take
    # seconds, and 120 tries ran out while a PostgreSQL server's 2 workers were still coming up, 2026-12-08).
    local start_timeout_s=${MLFLOW_SERVER_START_TIMEOUT_S:-120}
    if ! [[ $start_timeout_s =~ ^[0-9]+$ ]] || ((start_timeout_s == 0)); then
        echo "mlflow_server.sh: MLFLOW_SERVER_START_TIMEOUT_S=$start_timeout_s: expected a whole number of seconds > 0" >&2
        exit 2
    fi
    with_sqlite_workers "$@"
    set -- "${server_flags[@]}"
    address=$(probe_address "$@")
    mkdir -p "$state_dir"
    stop
    # MLflow 3's job runner (huey consumers for GenAI scorers, unused here) is 7 more processes, about
    # 1.2 GiB on the head (bench/head_memory.py); a value set in the environment wins.
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false} \
        setsid nohup mlflow server "$@" >"$log_file" 2>&1 </dev/null &
    echo $! >"$pid_file"
    local deadline=$((SECONDS + start_timeout_s))
    while ((SECONDS < deadline)); do
        if healthy "$address"; then
            echo "mlflow server answering on http://$address (log: $log_file)"
            return 0
        fi
        kill -0 -- "-$(cat "$pid_file")" 2>/dev/null || break
        sleep 0.5
    done
    echo "mlflow server is not answering on http://$address after ${start_timeout_s} s (MLFLOW_SERVER_START_TIMEOUT_S);" \
        "last lines of $log_file:" >&2
    tail -n 30 "$log_file" >&2 || true
    stop
    return 1
}

case $action in
    start) start "$@" ;;
    stop) stop ;;
    status)
        if [[ -f $pid_file ]] && kill -0 -- "-$(cat "$pid_file")" 2>/dev/null; then
            echo "running (pgid $(cat "$pid_file"))"
        else
            echo "not running"
            exit 1
        fi
        ;;
    *) usage ;;
esac
