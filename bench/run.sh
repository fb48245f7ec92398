#!/usr/bin/env bash
# `make bench`: every benchmark in bench/, then BENCHMARKS.md and bench/results.json.
# Arguments go to bench/run.py: --quick (smoke run), --only floor trl memory ray user_path gpu.
# Env: BENCH_REPS, BENCH_ITERS, BENCH_THREADS (see bench/run.py), BENCH_WORKDIR (scratch, default /tmp).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PY=$VENV/bin/python
# The CPU box keeps these wheels on disk: naming them keeps pip from ever resolving another torch.
TORCH_PINS="torch==2.14.1 torchvision==0.29.1"
WORK=${BENCH_WORKDIR:-/tmp/alignprop-bench}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_TRAIN_V2_ENABLED=1

# 1. The project's virtualenv, exactly as `make setup` builds it.
make --no-print-directory setup VENV="$VENV"

# 2. TRL 0.23.1 (the `bench` extra) in the same venv. Its requirements (accelerate>=1.4, datasets>=3,
#    transformers>=4.56.1) do not conflict with the project's pins, and it runs on transformers 5 /
#    diffusers 0.42, so both sides of the comparison use the very same torch/diffusers/peft builds.
#    Only the extra's requirements are installed: the editable project is not reinstalled.
if ! "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('trl') != '0.23.1')" 2>/dev/null; then
    BENCH_REQS=$("$PY" -c "import tomllib; print(' '.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['bench']))")
    # shellcheck disable=SC2086
    "$PY" -m pip install -q $TORCH_PINS $BENCH_REQS
fi

# 3. The tiny model as a diffusers pipeline directory: both trainers load this same directory.
mkdir -p "$WORK"
if [ ! -f "$WORK/tiny/model_index.json" ]; then
    "$VENV/bin/alignprop-ray" make-tiny-model "$WORK/tiny"
fi

if pgrep -f "pytest" >/dev/null; then
    echo "[bench] warning: a pytest run is active on this machine; timings will be disturbed" >&2
fi
echo "[bench] load average: $(cut -d' ' -f1-3 /proc/loadavg)"
exec "$PY" bench/run.py --pipeline "$WORK/tiny" --workdir "$WORK" --trl-python "$PY" "$@"
