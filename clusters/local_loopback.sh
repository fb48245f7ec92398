#!/usr/bin/env bash
# A real two-node Ray cluster on this machine, on loopback, plus an MLflow server: the multi-node
# setup of clusters/aws.yaml in miniature (separate head and worker processes, job driver on the head,
# trials on either node, MLflow over HTTP, checkpoints in a storage path both nodes can reach).
#
#   clusters/local_loopback.sh start     # MLflow, Ray head, Ray worker; waits until all answer
#   eval "$(clusters/local_loopback.sh env)"
#   ray job submit --working-dir . -- alignprop-ray sweep sweeps/smoke.yaml
#   clusters/local_loopback.sh restart-worker   # a worker node again, after it was lost
#   clusters/local_loopback.sh stop      # ends exactly the processes `start` started
#
# The head is 127.0.0.2 and the worker 127.0.0.3: loopback addresses (all of 127.0.0.0/8 is), but not
# 127.0.0.1, which `ray start --node-ip-address` replaces with the machine's routable address. Two
# addresses also keep the nodes apart the way two machines are. Ports are not Ray's defaults, and Ray
# keeps its files under $LOOPBACK_DIR instead of /tmp/ray, so it can run beside another Ray instance.
# Stopping kills the process groups this script started (never `ray stop`, which would end every Ray
# instance on the machine); a `start` that fails stops what it had started.
#
# Token authentication is on, with a token of its own in $LOOPBACK_DIR (not ~/.ray/auth_token, which
# other local Ray instances may create or use); `env` prints the variables that let `ray job submit`
# and the Python client present it.
#
# Knobs (environment): LOOPBACK_DIR, GCS_PORT, DASHBOARD_PORT, MLFLOW_PORT, HEAD_CPUS, WORKER_CPUS,
# OBJECT_STORE_BYTES. CPUs are logical: a sweep whose trial needs more than one CPU (the trial itself
# plus its Train workers) needs HEAD_CPUS/WORKER_CPUS above 1 even on a two-core machine. The Python
# environment on PATH must have ray[default] (dashboard and job server) and this project.
set -euo pipefail

LOOPBACK_DIR=${LOOPBACK_DIR:-/tmp/alignprop-loopback}
HEAD_IP=${HEAD_IP:-127.0.0.2}
WORKER_IP=${WORKER_IP:-127.0.0.3}
GCS_PORT=${GCS_PORT:-6390}
DASHBOARD_PORT=${DASHBOARD_PORT:-8275}
# Outside Ray's worker port range (10002-19999).
CLIENT_PORT=${CLIENT_PORT:-6392}
HEAD_AGENT_PORT=${HEAD_AGENT_PORT:-52375}
WORKER_AGENT_PORT=${WORKER_AGENT_PORT:-52376}
MLFLOW_PORT=${MLFLOW_PORT:-5055}
HEAD_CPUS=${HEAD_CPUS:-1}
WORKER_CPUS=${WORKER_CPUS:-1}
# Small object stores: two nodes share this machine's /dev/shm and memory.
OBJECT_STORE_BYTES=${OBJECT_STORE_BYTES:-300000000}

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

print_env() {
    echo "export RAY_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT"
    echo "export RAY_AUTH_MODE=token"
    echo "export RAY_AUTH_TOKEN_PATH=$LOOPBACK_DIR/auth_token"
    echo "export ALIGNPROP_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT"
    echo "export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT"
    echo "export ALIGNPROP_STORAGE_PATH=$LOOPBACK_DIR/ray-results"
}

require_ray_default() {
    python -c "import aiohttp_cors, opencensus, prometheus_client" 2>/dev/null && return 0
    echo "local_loopback.sh: this Python lacks ray[default] (dashboard, job server):" >&2
    echo "  pip install 'ray[default]==$(python -c 'import ray; print(ray.__version__)')'" >&2
    exit 1
}

# Runs until it succeeds or $1 seconds pass; the rest of the arguments are the command.
wait_for() {
    local deadline=$((SECONDS + $1))
    shift
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS > deadline)); then
            echo "local_loopback.sh: timed out waiting for: $*" >&2
            return 1
        fi
        sleep 1
    done
}

# alive_nodes at_least|at_most N: whether the cluster has at least (at most) N live nodes.
alive_nodes() {
    python - "$HEAD_IP:$GCS_PORT" "$1" "$2" <<'EOF'
import sys

import ray

ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
alive, bound = sum(n["Alive"] for n in ray.nodes()), int(sys.argv[3])
sys.exit(0 if (alive >= bound if sys.argv[2] == "at_least" else alive <= bound) else 1)
EOF
}

job_api_up() {
    python - "http://127.0.0.1:$DASHBOARD_PORT/api/version" "$LOOPBACK_DIR/auth_token" <<'EOF'
import sys
import urllib.request

token = open(sys.argv[2]).read().strip()
request = urllib.request.Request(sys.argv[1], headers={"Authorization": f"Bearer {token}"})
urllib.request.urlopen(request, timeout=2).read()
EOF
}

# setsid: each node is its own process group, so `stop` can end it and everything it spawned.
start_node() {
    local name=$1
    shift
    setsid ray start --block --num-gpus=0 \
        --object-store-memory="$OBJECT_STORE_BYTES" --disable-usage-stats \
        --temp-dir="$LOOPBACK_DIR/ray-$name" "$@" >"$LOOPBACK_DIR/$name.log" 2>&1 </dev/null &
    echo $! >"$LOOPBACK_DIR/$name.pid"
}

start() {
    require_ray_default
    if [[ -f $LOOPBACK_DIR/head.pid ]]; then
        echo "local_loopback.sh: already started (run stop first); $LOOPBACK_DIR/head.pid exists" >&2
        exit 1
    fi
    mkdir -p "$LOOPBACK_DIR/mlflow" "$LOOPBACK_DIR/ray-results"
    trap stop EXIT  # undone below once everything answers
    (umask 077 && python -c "import secrets; print(secrets.token_hex(32), end='')" >"$LOOPBACK_DIR/auth_token")
    eval "$(print_env)"
    unset RAY_ADDRESS  # `ray start` must not try to join some other cluster

    # One uvicorn worker (SQLite takes one writer) and no job runner (this machine has few cores).
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false bash "$here/mlflow_server.sh" start "$LOOPBACK_DIR/mlflow" \
        --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
        --backend-store-uri "sqlite:///$LOOPBACK_DIR/mlflow/mlflow.db" \
        --artifacts-destination "$LOOPBACK_DIR/mlflow/artifacts" --serve-artifacts

    # The exported ALIGNPROP_* variables reach every job driver and trial through the raylets.
    start_node head --head --node-ip-address="$HEAD_IP" --port="$GCS_PORT" --num-cpus="$HEAD_CPUS" \
        --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
        --ray-client-server-port="$CLIENT_PORT" --dashboard-agent-listen-port="$HEAD_AGENT_PORT"
    wait_for 90 ray health-check --address "$HEAD_IP:$GCS_PORT"
    start_worker
    wait_for 60 job_api_up
    trap - EXIT
    echo "2 Ray nodes up (GCS $HEAD_IP:$GCS_PORT, jobs http://127.0.0.1:$DASHBOARD_PORT)," \
        "MLflow http://127.0.0.1:$MLFLOW_PORT, files under $LOOPBACK_DIR"
}

start_worker() {
    start_node worker --node-ip-address="$WORKER_IP" --address="$HEAD_IP:$GCS_PORT" \
        --num-cpus="$WORKER_CPUS" \
        --dashboard-agent-listen-port="$WORKER_AGENT_PORT"
    wait_for 90 alive_nodes at_least 2
}

# A worker node again after it was lost (tests/test_cluster_loopback.py kills its raylet): what is left
# of the old one is ended first.
restart_worker() {
    eval "$(print_env)"
    unset RAY_ADDRESS
    stop_group worker
    wait_for 90 alive_nodes at_most 1  # the head has marked the lost node dead
    start_worker
}

stop_group() {
    local pid_file=$LOOPBACK_DIR/$1.pid pgid
    [[ -f $pid_file ]] || return 0
    pgid=$(cat "$pid_file")
    kill -TERM -- "-$pgid" 2>/dev/null || true
    for _ in $(seq 30); do
        kill -0 -- "-$pgid" 2>/dev/null || break
        sleep 0.5
    done
    kill -KILL -- "-$pgid" 2>/dev/null || true
    rm -f "$pid_file"
}

stop() {
    stop_group worker
    stop_group head
    bash "$here/mlflow_server.sh" stop "$LOOPBACK_DIR/mlflow"
}

case ${1:-} in
    start) start ;;
    restart-worker) restart_worker ;;
    stop) stop ;;
    env) print_env ;;
    *)
        echo "usage: $0 start|restart-worker|stop|env" >&2
        exit 2
        ;;
esac
