# One virtualenv in the repo; every target sets it up first (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU box keeps these wheels on disk; other torch/torchvision pairs do not import together there.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

.PHONY: setup test demo bench lint format clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/alignprop-ray demo

bench: setup
	bash bench/run.sh

lint: setup
	$(VENV)/bin/ruff check alignprop_ray tests notebooks bench
	$(VENV)/bin/ruff format --check alignprop_ray tests notebooks bench

format: setup
	$(VENV)/bin/ruff format alignprop_ray tests notebooks bench
	$(VENV)/bin/ruff check --fix alignprop_ray tests

clean:
	rm -rf $(VENV) build *.egg-info
