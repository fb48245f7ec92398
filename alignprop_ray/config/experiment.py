"""Load and validate an experiment: YAML + env + ``--set`` -> a resolved ExperimentConfig, or every error."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from functools import cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import TypeAdapter, ValidationError

from alignprop_ray.config.checks import run_checks
from alignprop_ray.config.overrides import apply_env, collect_overrides, read_yaml
from alignprop_ray.config.paths import PathContext
from alignprop_ray.config.problems import format_validation_error, section_model, unknown_field
from alignprop_ray.config.schema import PATHS_KEY, ExperimentConfig
from alignprop_ray.errors import ConfigError


def load_experiment(
    path: str | os.PathLike, overrides: Iterable[str] = (), env: Mapping[str, str] = os.environ
) -> ExperimentConfig:
    """Read an experiment YAML and validate it; relative input paths resolve against its directory first."""
    path = Path(os.path.abspath(Path(path).expanduser()))
    return parse_experiment(read_yaml(path), path.parent, overrides, env)


def parse_experiment(
    data: dict[str, Any],
    base_dir: str | os.PathLike | None = None,
    overrides: Iterable[str] = (),
    env: Mapping[str, str] = os.environ,
    *,
    check_files: bool = True,
) -> ExperimentConfig:
    """Validate experiment data (as read from YAML) after applying env vars, then ``--set`` overrides.

    Collects every problem before raising ConfigError (one line each, starting with the dotted field).
    With `check_files` (the driver), paths are resolved to absolute and must exist, prompt files must hold
    prompts; pass False where the files may not exist (e.g. re-validating a resolved config on a worker).
    """
    if not isinstance(data, dict):
        raise ConfigError(["(top level): must be a mapping of sections (model:, train:, ...)"])
    merged, problems = collect_overrides(apply_env(data, env), overrides, ExperimentConfig)
    context = (
        {PATHS_KEY: PathContext(Path(base_dir) if base_dir is not None else None)} if check_files else None
    )
    sections, section_problems = _validate_sections(merged, context)
    problems += section_problems + run_checks(sections)
    if problems:
        raise ConfigError(problems)
    if sections["truncation"] is None:  # the paper's randomized truncation over the whole chain
        sections["truncation"] = f"uniform:0:{sections['sampling'].steps}"
    return ExperimentConfig.model_validate(sections)


def _validate_sections(data: dict[str, Any], context: dict | None) -> tuple[dict[str, Any], list[str]]:
    """Validate each top-level field on its own, so one bad section does not hide problems in another."""
    fields = ExperimentConfig.model_fields
    problems = [unknown_field(str(key), list(fields)) for key in data if key not in fields]
    values: dict[str, Any] = {}
    for name, field in fields.items():
        if name not in data and field.is_required():
            problems.append(f"{name}: required ({field.description})")
            continue
        is_section = section_model(field.annotation) is not None
        raw = data[name] if name in data else (None if is_section else field.default)
        if raw is None and is_section:
            raw = {}  # absent, or `train:` with everything commented out: validate defaults with the context
        try:
            values[name] = _adapter(name).validate_python(raw, context=context)
        except ValidationError as err:
            problems += format_validation_error(err, (name,), ExperimentConfig)
    return values, problems


@cache
def _adapter(name: str) -> TypeAdapter:
    field = ExperimentConfig.model_fields[name]
    if not field.metadata:
        return TypeAdapter(field.annotation)
    return TypeAdapter(Annotated.__class_getitem__((field.annotation, *field.metadata)))
