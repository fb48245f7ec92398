"""The search space: dotted experiment fields mapped to a domain, and how a sampled point edits a config.

    space:
      train.lr: {loguniform: [1.0e-4, 1.0e-2]}      # log-uniform on [lo, hi)
      truncation: {grid: [fixed:1, full]}           # every value, crossed with other grids
      reward.aesthetic.weight: {uniform: [0, 1]}    # uniform on [lo, hi)
      model.lora.rank: {choice: [4, 8]}             # one value per sample
      train.seed: {randint: [0, 100]}               # integer in [lo, hi), as tune.randint

Keys are experiment fields (alignprop_ray/config/schema.py); inside free-form fields (`reward`,
`truncation` mappings, `scaling.resources_per_worker`) any sub-key is accepted and checked when the
resulting experiment is validated. `name`, `tracking` and `storage` are set by the sweep for every trial.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from typing import Any

from alignprop_ray.config import ExperimentConfig
from alignprop_ray.config.aliases import drop_twin
from alignprop_ray.config.overrides import check_field_path
from alignprop_ray.problems import section_model

LISTS = ("choice", "grid")  # a list of values
RANGES = ("loguniform", "uniform", "randint")  # [lo, hi)
KINDS = LISTS + RANGES
SET_BY_SWEEP = ("name", "tracking", "storage")
SHAPES = "{choice: [...]}, {grid: [...]}, {loguniform: [lo, hi]}, {uniform: [lo, hi]} or {randint: [lo, hi]}"
Scalar = str | int | float | bool | None


@dataclass(frozen=True)
class Domain:
    """One searched field: `kind` is a key of KINDS; `values` the listed values, or (lo, hi) for a range."""

    field: str
    kind: str
    values: tuple[Any, ...]

    def candidates(self) -> list[Any]:
        """Values that validation tries: every listed value, or both ends of a range."""
        if self.kind in LISTS:
            return list(self.values)
        lo, hi = self.values
        return [lo, hi - 1] if self.kind == "randint" else [lo, hi]

    def first(self) -> Any:
        return self.candidates()[0]

    def describe(self) -> str:
        """`grid[fixed:1, full]`, `loguniform(0.0001, 0.01)`: for MLflow params and the console."""
        if self.kind in LISTS:
            return f"{self.kind}[{', '.join(_text(v) for v in self.values)}]"
        return f"{self.kind}({self.values[0]:g}, {self.values[1]:g})"

    def tune_values(self) -> list[Scalar]:
        """Listed values as Tune/Optuna accept them: mappings and lists become JSON text (see `decode`)."""
        return [v if _is_scalar(v) else json.dumps(v, sort_keys=True) for v in self.values]

    def to_tune(self):
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(self.tune_values())
        if self.kind == "choice":
            return tune.choice(self.tune_values())
        return {"loguniform": tune.loguniform, "uniform": tune.uniform, "randint": tune.randint}[self.kind](
            *self.values
        )

    def decode(self, sampled: Any) -> Any:
        """The config value for what Tune sampled (undoing `tune_values`)."""
        if self.kind in LISTS:
            encoded = self.tune_values()
            return self.values[encoded.index(sampled)] if sampled in encoded else sampled
        return int(sampled) if self.kind == "randint" else float(sampled)


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def parse_space(raw: Any) -> tuple[list[Domain], list[str]]:
    """Domains from the `space:` mapping, and one problem line per bad entry (prefixed `space.`)."""
    if not isinstance(raw, dict) or not raw:
        return [], [
            f"space: must map dotted experiment fields to {SHAPES}, e.g. "
            "train.lr: {loguniform: [1.0e-4, 1.0e-2]} (got " + repr(raw)[:60] + ")"
        ]
    domains, problems = [], []
    for key, spec in raw.items():
        name = f"space.{key}"
        problem = check_field(str(key)) or _check_spec(name, spec)
        if problem:
            problems.append(problem)
            continue
        kind, values = next(iter(spec.items()))
        domains.append(Domain(str(key), kind, tuple(values)))
    return domains, problems


def check_field(key: str) -> str | None:
    """A problem if `key` is not a searchable experiment field (unknown, a section, or set by the sweep)."""
    path = key.split(".")
    if not all(path):
        return f"space.{key}: not a dotted field name"
    if path[0] in SET_BY_SWEEP:
        return f"space.{key}: set by the sweep for every trial; it cannot be searched"
    return check_field_path(path, ExperimentConfig, prefix="space.")


def _check_spec(name: str, spec: Any) -> str | None:
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
        return f"{name}: expected one of {SHAPES} (got {repr(spec)[:60]})"
    kind, values = next(iter(spec.items()))
    if kind in LISTS:
        if not isinstance(values, list):
            return f"{name}: {kind} must be a list of values, e.g. {{{kind}: [a, b]}} (got {values!r})"
        if not values:
            return f"{name}: {kind} is empty; list at least one value, e.g. {{{kind}: [a, b]}}"
        return None
    return _check_range(name, kind, values)


def _check_range(name: str, kind: str, values: Any) -> str | None:
    numbers = isinstance(values, list) and len(values) == 2 and all(_finite(v) for v in values)
    if not numbers:
        return f"{name}: {kind} takes [lo, hi], two finite numbers (got {values!r})"
    lo, hi = values
    if kind == "randint" and not all(isinstance(v, int) for v in values):
        return f"{name}: randint takes two integers [lo, hi) (got {values!r})"
    if lo >= hi:
        return f"{name}: {kind} needs lo < hi (got [{lo}, {hi}])"
    if kind == "loguniform" and lo <= 0:
        return f"{name}: loguniform needs lo > 0 (got {lo})"
    return None


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def apply_point(data: dict[str, Any], point: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A copy of experiment `data` with each dotted field of `point` set; problems for fields it cannot set."""
    out, problems = copy.deepcopy(data), []
    for key, value in point.items():
        problem = _set_field(out, key.split("."), value)
        if problem:
            problems.append(f"space.{key}: {problem}")
        else:
            drop_twin(out, key)  # `truncation` searched: the base's method.truncation gives way
    return out, problems


def _set_field(data: dict[str, Any], path: list[str], value: Any) -> str | None:
    older = _older_key(path)
    node, model = data, ExperimentConfig
    for i, part in enumerate(path[:-1]):
        if older is not None and i == len(older) - 1:  # inside an older key's value (a truncation mapping)
            return _set_free_form(node, part, path[i + 1 :], copy.deepcopy(value))
        field = model.model_fields[part]
        sub = section_model(field.annotation)
        if sub is None:  # a free-form field: the rest of the path is inside its mapping
            return _set_free_form(node, part, path[i + 1 :], copy.deepcopy(value))
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node, model = node[part], sub
    node[path[-1]] = copy.deepcopy(value)
    return None


def _older_key(path: list[str]) -> list[str] | None:
    """The older key (`truncation`, `train.k0`) that `path` names or lies inside, as its parts; else None."""
    for old in ExperimentConfig.key_aliases():
        parts = old.split(".")
        if path[: len(parts)] == parts:
            return parts
    return None


def _set_free_form(node: dict[str, Any], name: str, rest: list[str], value: Any) -> str | None:
    container = node.get(name)
    if container is None:
        container = node[name] = {}
    if not isinstance(container, dict):
        return f"{name} is {container!r} in the base experiment, not a mapping; search {name} as a whole"
    if name == "reward":  # `aesthetic: 1.0` is shorthand for `aesthetic: {weight: 1.0}`
        term = container.get(rest[0])
        if len(rest) > 1 and not isinstance(term, dict):
            container[rest[0]] = {} if term is None else {"weight": term}
    for i, part in enumerate(rest[:-1]):
        child = container.get(part)
        if child is None:
            child = container[part] = {}
        if not isinstance(child, dict):
            return f"{name}.{'.'.join(rest[: i + 1])} is {child!r}, not a mapping"
        container = child
    container[rest[-1]] = value
    return None
