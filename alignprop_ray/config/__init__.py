"""Experiment config: typed schema, YAML loading, env and ``--set`` overrides, validation, `validate` command.

    cfg = load_experiment("sweeps/tiny.yaml", ["train.lr=3e-4", "truncation=fixed:5"])
    cfg.train.lr, cfg.to_dict(), cfg.flat_params()

Precedence: ``--set a.b=value`` > env (ALIGNPROP_TRACKING_URI, ALIGNPROP_STORAGE_PATH) > YAML > default.
Every problem is collected before anything runs and raised as one ConfigError, one line per problem, each
starting with the dotted field name (``train.lr: must be > 0 (got -0.001)``).

Paths: prompt files and a local model directory resolve against the YAML file's directory, then the cwd;
the tracking SQLite file and the storage folder against the cwd. The resolved config holds them absolute.
Prompt files are read on the driver (``alignprop_ray.prompts.load_prompts``); workers get prompt lists.

Importing this package does not import torch, Ray or MLflow, so ``alignprop-ray validate`` is fast.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from alignprop_ray.config.experiment import load_experiment, parse_experiment
from alignprop_ray.config.overrides import ENV_OVERRIDES, apply_overrides, parse_yaml, read_yaml
from alignprop_ray.config.schema import (
    ExperimentConfig,
    FailureConfig,
    LoraConfig,
    ModelConfig,
    PromptsConfig,
    SamplingConfig,
    ScalingConfig,
    StorageConfig,
    TrackingConfig,
    TrainConfig,
)

SWEEP_KEYS = ("tune", "space")  # a top-level key that marks a sweep file, not an experiment

__all__ = [
    "ENV_OVERRIDES",
    "ExperimentConfig",
    "FailureConfig",
    "LoraConfig",
    "ModelConfig",
    "PromptsConfig",
    "SamplingConfig",
    "ScalingConfig",
    "StorageConfig",
    "TrackingConfig",
    "TrainConfig",
    "apply_overrides",
    "cmd_validate",
    "is_sweep",
    "load_experiment",
    "parse_experiment",
    "parse_yaml",
    "read_yaml",
]


def is_sweep(data: dict) -> bool:
    """True for a sweep file (top-level `tune:` or `space:`)."""
    return any(key in data for key in SWEEP_KEYS)


def cmd_validate(args: argparse.Namespace) -> int:
    """`alignprop-ray validate FILE [--set k=v ...]`: print `OK: FILE (experiment|sweep)` or raise ConfigError."""
    path = Path(args.config)
    overrides = list(getattr(args, "overrides", None) or [])
    data = read_yaml(path)
    if is_sweep(data):
        _validate_sweep(path, overrides)
        kind = "sweep"
    else:
        parse_experiment(data, os.path.abspath(path.expanduser().parent), overrides)
        kind = "experiment"
    print(f"OK: {args.config} ({kind})")
    return 0


def _validate_sweep(path: Path, overrides: list[str]) -> None:
    from alignprop_ray.sweep.config import load_sweep  # lazily: the sweep layer imports this package

    load_sweep(path, overrides)
