"""Reading YAML, and the two ways to change a file's values without editing it: env vars and ``--set``.

Precedence, highest first: ``--set a.b=value`` > environment variable > YAML file > schema default.
"""

from __future__ import annotations

import copy
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, PlainValidator

from alignprop_ray.config.aliases import drop_twin
from alignprop_ray.config.schema import DEFAULT_METHOD, ExperimentConfig
from alignprop_ray.errors import ConfigError, UserError
from alignprop_ray.files import read_text
from alignprop_ray.problems import section_model, unknown_field

# A cluster-wide setting that overrides the experiment file (clusters point checkpoints at shared storage).
ENV_OVERRIDES = {"ALIGNPROP_STORAGE_PATH": "storage.path"}
# Where runs are logged when neither the command line nor the file says, first match wins: ours (set by
# our cluster configs), then MLflow's own (which an MLflow user already has), then the schema default.
TRACKING_URI_ENV = ("ALIGNPROP_TRACKING_URI", "MLFLOW_TRACKING_URI")


def tracking_uri_from_env(env: Mapping[str, str]) -> tuple[str, str] | None:
    """(uri, variable) of the first TRACKING_URI_ENV variable set (and non-empty), else None."""
    return next(((env[var], var) for var in TRACKING_URI_ENV if env.get(var)), None)


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-3` as a float (YAML 1.2; PyYAML's 1.1 needs `1.0e-3`) and rejects duplicate keys."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: merged keys may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str, source: str = "<string>") -> Any:
    """Parse YAML text; a syntax error becomes one UserError line with the position."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise UserError(f"{source}: invalid YAML{where}: {' '.join(str(problem).split())}") from None


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML file whose top level is a mapping (an empty file is {})."""
    path = Path(path).expanduser()
    data = parse_yaml(read_text(path), str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: the top level must be a mapping of sections (model:, train:, ...)")
    return data


def parse_value(text: str) -> Any:
    """A ``--set`` value: a YAML scalar or flow collection (`3e-4`, `true`, `[a, b]`, `{kind: full}`)."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError:
        return text  # e.g. `a: b` with a space: keep the raw string


def apply_env(data: dict[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    """A copy of `data` with the ENV_OVERRIDES variables that are set (and non-empty) applied as strings."""
    out = copy.deepcopy(data)
    for var, dotted in ENV_OVERRIDES.items():
        if env.get(var):
            _set(out, dotted.split("."), env[var])
    return out


def apply_overrides(
    data: dict[str, Any], overrides: Iterable[str], schema: type[BaseModel] | None = ExperimentConfig
) -> dict[str, Any]:
    """A copy of `data` with each ``a.b=value`` applied; raises ConfigError naming every bad key.

    Keys must name fields of `schema` (default: the experiment schema), or an older key it still accepts
    (`truncation`); inside free-form fields (`reward`, `method`, `scaling.resources_per_worker`) any sub-key
    is allowed. With schema=None (e.g. for a sweep file, whose own module checks it) any key is set.
    """
    out, problems = collect_overrides(data, overrides, schema)
    if problems:
        raise ConfigError(problems)
    return out


def collect_overrides(
    data: dict[str, Any], overrides: Iterable[str], schema: type[BaseModel] | None
) -> tuple[dict[str, Any], list[str]]:
    """Like apply_overrides, but returns (result, problems) so callers can report them with others."""
    out, problems = copy.deepcopy(data), []
    for item in overrides:
        key, sep, text = item.partition("=")
        path = key.strip().split(".")
        if not sep or not all(path):
            problems.append(f"--set {item}: expected KEY=VALUE with a dotted key, e.g. --set train.lr=3e-4")
            continue
        problem = _check_key(path, schema, item) if schema is not None else None
        if problem is None:
            setter = set_experiment_field if schema is ExperimentConfig else _set
            problem = setter(out, path, parse_value(text))
        if problem:
            problems.append(problem)
    return out, problems


def set_experiment_field(data: dict[str, Any], path: list[str], value: Any) -> str | None:
    """Set a dotted field of experiment data: a setting inside a method given by name alone, or by default
    (`method: draft`, then `method.k=2`), makes it a mapping; and the setting's other spelling (an older
    key such as `truncation`, or its place `method.truncation`) is removed, so this value counts."""
    if len(path) > 1 and path[0] == "method" and not isinstance(data.get("method"), dict):
        data["method"] = {"name": data.get("method") or DEFAULT_METHOD}
    problem = _set(data, path, value)
    if problem is None:
        drop_twin(data, ".".join(path))
    return problem


def _check_key(path: list[str], schema: type[BaseModel], item: str) -> str | None:
    return check_field_path(path, schema, suffix=f" (in --set {item})")


def check_field_path(
    path: list[str], schema: type[BaseModel], *, prefix: str = "", suffix: str = ""
) -> str | None:
    """A one-line problem if the dotted `path` is not a field of `schema` (free-form mappings accept anything).

    `prefix` is prepended to the dotted name (e.g. `space.`), `suffix` appended to the message.
    """
    dotted = ".".join(path)
    older_keys = schema.key_aliases() if hasattr(schema, "key_aliases") else {}
    if any(dotted == old or dotted.startswith(old + ".") for old in older_keys):
        return None  # an older key the schema still reads (`truncation`), moved where it belongs later
    model: type[BaseModel] | None = schema
    for i, part in enumerate(path):
        if model is None:  # inside a free-form field: anything goes
            return None
        dotted = prefix + ".".join(path[: i + 1])
        field = model.model_fields.get(part)
        if field is None:
            return unknown_field(dotted, list(model.model_fields), suffix)
        model = section_model(field.annotation)
        if model is None and i < len(path) - 1 and not free_form(field.annotation):
            return f"{dotted}: is a value, not a section{suffix}"
    return None


def free_form(annotation: Any) -> bool:
    """True for fields that hold arbitrary mappings (`reward`, `resources_per_worker`) or parse their
    own (`truncation`, whose PlainValidator takes `{kind: uniform, low: 0, high: 50}`)."""
    if annotation is Any or typing.get_origin(annotation) is dict:
        return True
    if typing.get_origin(annotation) is typing.Annotated:
        return any(isinstance(m, PlainValidator) for m in annotation.__metadata__)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(free_form(arg) for arg in typing.get_args(annotation))
    return False


def _set(data: dict[str, Any], path: list[str], value: Any) -> str | None:
    node = data
    for i, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            dotted = ".".join(path[: i + 1])
            return f"{dotted}: holds {child!r}, not a mapping; set it whole, e.g. --set {dotted}=..."
        node = child
    node[path[-1]] = value
    return None
