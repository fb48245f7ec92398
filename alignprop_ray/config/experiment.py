"""Load and validate an experiment: YAML + env + ``--set`` -> a resolved ExperimentConfig, or every error."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from functools import cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

from alignprop_ray.config.aliases import move_aliases, written_as
from alignprop_ray.config.checks import run_checks
from alignprop_ray.config.overrides import apply_env, collect_overrides, read_yaml, tracking_uri_from_env
from alignprop_ray.config.paths import PathContext
from alignprop_ray.config.schema import PATHS_KEY, ExperimentConfig
from alignprop_ray.errors import ConfigError
from alignprop_ray.problems import format_validation_error, section_model, unknown_field


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
    _fill_tracking_uri(merged, data, env)
    merged, alias_problems, moved = move_aliases(merged)
    context = (
        {PATHS_KEY: PathContext(Path(base_dir) if base_dir is not None else None)} if check_files else None
    )
    sections, section_problems = _validate_sections(merged, context)
    problems += alias_problems + [written_as(p, moved) for p in section_problems + run_checks(sections)]
    if problems:
        raise ConfigError(problems)
    return ExperimentConfig.model_validate(sections)


def tracking_uri_source(
    path: str | os.PathLike, overrides: Iterable[str] = (), env: Mapping[str, str] = os.environ
) -> str:
    """Where the experiment file's tracking.uri comes from, in words (for the run header)."""
    data = read_yaml(Path(path).expanduser())
    merged, _ = collect_overrides(apply_env(data, env), overrides, ExperimentConfig)
    return _fill_tracking_uri(merged, data, env)


def _fill_tracking_uri(merged: dict[str, Any], data: dict[str, Any], env: Mapping[str, str]) -> str:
    """Where tracking.uri comes from: the command line (--set), the file, the environment, or the default.

    Precedence: --set > the experiment file > ALIGNPROP_TRACKING_URI > MLFLOW_TRACKING_URI > default.
    An environment value is written into `merged`.
    """
    tracking = merged.get("tracking")
    if isinstance(tracking, dict) and "uri" in tracking:
        in_file = isinstance(data.get("tracking"), dict) and data["tracking"].get("uri") == tracking["uri"]
        return "the config file" if in_file else "--set"
    found = tracking_uri_from_env(env)
    if found is None:
        return "the default"
    if tracking is None:
        tracking = merged["tracking"] = {}
    if isinstance(tracking, dict):  # otherwise the section's own validation reports it
        tracking["uri"] = found[0]
    return found[1]


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


def field_problems(dotted: str, value: Any) -> list[str]:
    """What the schema says of `value` as the field `dotted` (e.g. `sampling.eta`): one line per problem,
    without the field's name (`must be <= 1 (got 2.0)`); empty if the field takes it.

    Only the field's own rules (type, bounds): what a command-line flag that stands for the field must
    meet too, so that both follow one rule set.
    """
    *sections, name = dotted.split(".")
    model: Any = ExperimentConfig
    for section in sections:
        model = section_model(model.model_fields[section].annotation)
    try:
        TypeAdapter(_field_type(model.model_fields[name])).validate_python(value)
    except ValidationError as err:
        return [
            line.removeprefix(f"{dotted}: ") for line in format_validation_error(err, (), model, (dotted,))
        ]
    return []


@cache
def _adapter(name: str) -> TypeAdapter:
    return TypeAdapter(_field_type(ExperimentConfig.model_fields[name]))


def _field_type(field: FieldInfo) -> Any:
    """A field's type with its constraints (Field(ge=...) and the like), as TypeAdapter takes it."""
    if not field.metadata:
        return field.annotation
    return Annotated.__class_getitem__((field.annotation, *field.metadata))
