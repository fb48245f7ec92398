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
The `validate` command itself lives in the CLI layer (alignprop_ray/cli.py): it also reads sweep files.
"""

from __future__ import annotations

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
    "load_experiment",
    "parse_experiment",
    "parse_yaml",
    "read_yaml",
]
