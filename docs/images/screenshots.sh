#!/usr/bin/env bash
# Remake the screenshots of docs/mlflow_ui.md from a real run: the smoke sweep on the offline tiny model
# (a few minutes on 2 CPU cores), its store served by the `mlflow ui` command it printed, the links it
# printed opened in headless Chromium (Debian package `chromium`).
#   bash docs/images/screenshots.sh            # from the repository root, with .venv set up (make setup)
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
work=$(mktemp -d)
trap 'kill -- "-${server:-0}" 2>/dev/null || true; rm -rf "$work"' EXIT

# 127.0.0.2, not 127.0.0.1: MLflow 3.17 opens its assistant panel over the page on a first visit from a
# localhost address; any other loopback address shows the page as a returning user sees it.
host=127.0.0.2
port=$(.venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.2", 0)); print(s.getsockname()[1])')
url="http://$host:$port"

(cd "$work" && HF_HUB_OFFLINE=1 "$root/.venv/bin/alignprop-ray" sweep "$root/sweeps/smoke.yaml" --ui-url "$url") |
    tee "$work/sweep.log"
link() { grep -m1 "^  $1:" "$work/sweep.log" | sed "s/^  $1: *//"; }

# The UI is served by the `mlflow ui` command the sweep printed, as a user runs it. For an address other
# than 127.0.0.1 that command names it with --host, --allowed-hosts and --cors-allowed-origins: MLflow's
# security middleware answers 403 ("Cross-origin request blocked") to the UI's own API calls when the
# page's origin is not a localhost one (its default: localhost, 127.0.0.1, [::1]), and the UI then shows
# INTERNAL_ERROR instead of the tables; and --workers 1 for the SQLite store.
command=$(link 'open the UI')
echo "+ $command"
PATH="$root/.venv/bin:$PATH" setsid bash -c "exec $command" >"$work/server.log" 2>&1 &
server=$!  # the server's process group: setsid made it one
for _ in $(seq 120); do curl -sf "$url/health" >/dev/null && break; sleep 1; done

shot() {  # shot OUT.png URL WIDTHxHEIGHT
    chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
        --disable-component-update --disable-sync --user-data-dir="$work/profile" --hide-scrollbars \
        --virtual-time-budget=30000 --window-size="${3/x/,}" --screenshot="$root/docs/images/$1" "$2"
}
shot runs_table.png "$(link 'runs table')" 1600x700
shot compare_runs.png "$(link 'compare trials')" 1600x1500
