# One virtualenv in the repo; every target sets it up first (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU box keeps these wheels on disk; other torch/torchvision pairs do not import together there.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

.PHONY: setup test test-profile test-fast test-soak demo toy-model bench bench-scale head-memory gpu-check lint format clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

# Everything but the soak tier (the README's test command and CI): the Ray tests, and beside them at idle
# priority the others (tests/run_tiers.py); each tier prints its 15 slowest tests.
test: setup
	$(PY) tests/run_tiers.py $(PYTEST_ARGS)

# `make test` with tests/cpu_profile.py in both tiers, then its summary: CPU-seconds by test file and test, the
# Ray tests' counted across every process of the machine (records in cpu-profile/; exit status: the tests').
test-profile: setup
	rm -rf cpu-profile
	$(PY) tests/run_tiers.py -p tests.cpu_profile $(PYTEST_ARGS); status=$$?; \
		$(PY) tests/cpu_profile.py cpu-profile; exit $$status

# The inner loop: unit tests without Ray and without the slow end-to-end ones, two test files at once, one
# torch thread each (pytest-xdist; about 2 minutes on 2 cores).
FAST_WORKERS ?= 2
test-fast: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -p no:cacheprovider -n $(FAST_WORKERS) \
		--dist loadfile -m "not ray and not own_ray and not slow and not soak" $(PYTEST_ARGS)

# The soak tier: long forms of fault tests whose short forms run in `make test`.
test-soak: setup
	$(PY) -m pytest -q -p no:cacheprovider -m soak --durations=15 $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/alignprop-ray demo

# Retrain a toy model: FAMILY=sd (the demo's committed models/toy-shapes, about 77 minutes on this 2-core box)
# or FAMILY=sd3 (its committed flow-matching twin, models/toy-shapes-sd3: 4,135 CPU s). Seeded, 1 CPU thread;
# each directory's training_log.json has the measured times and every setting.
FAMILY ?= sd
toy-model: setup
	$(PY) -m alignprop_ray.toy.train --family $(FAMILY) --seed 0

bench: setup
	bash bench/run.sh

# One sweep of 4 trials per simulated node on a Ray cluster on this machine, MLflow on a throwaway
# PostgreSQL; with SCALE_ARGS=--kill, the sweep driver is killed half-way and resumed (RELIABILITY.md).
SCALE_ARGS ?= --nodes 8
bench-scale: setup
	$(PY) bench/scale.py $(SCALE_ARGS)

# What each running trial keeps in memory on the head node (USS by process; docs/clusters.md).
head-memory: setup
	$(PY) bench/head_memory.py

# The GPU acceptance check (CUDA, no downloads, budget 8 minutes on one H200/A100-class GPU): tests/test_gpu.py,
# 20 SD 1.5-architecture steps at 512 px (peak memory, images/s), bench/gpu.py. GPU_CHECK_ARGS=--smoke: on CPU.
gpu-check: setup
	$(PY) bench/gpu_check.py $(GPU_CHECK_ARGS)

lint: setup
	$(VENV)/bin/ruff check alignprop_ray tests notebooks bench
	$(VENV)/bin/ruff format --check alignprop_ray tests notebooks bench

format: setup
	$(VENV)/bin/ruff format alignprop_ray tests notebooks bench
	$(VENV)/bin/ruff check --fix alignprop_ray tests

clean:
	rm -rf $(VENV) build *.egg-info
