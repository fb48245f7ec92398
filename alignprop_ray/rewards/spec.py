"""The ``reward:`` section of a config: parsed into typed terms, with every problem found at once.

Accepted forms (YAML)::

    reward: {saturation: 1.0}                              # name: weight
    reward:
      aesthetic: {weight: 1.0, objective: target, target: 10.0, path: ..., clip_path: ...}
      compressibility: 0.5
    reward: {aesthetic.weight: 0.3}                        # dotted keys, as a sweep sets them

A term contributes ``weight * r`` (``objective: maximize``, the default) or ``-weight * |target - r|``
(``objective: target``, the paper's aesthetic objective; implied when ``target`` is given). Weights may be
negative (penalties). A non-differentiable reward may sit in a training mixture only with weight 0, where
it is computed and logged but adds nothing to the objective.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from alignprop_ray.rewards.registry import RewardOptions, available_rewards, get_entry, parse_options

OBJECTIVES = ("maximize", "target")


@dataclass(frozen=True)
class TermSpec:
    """One validated term of a reward mixture."""

    name: str
    weight: float
    objective: str  # "maximize" or "target"
    target: float | None
    options: RewardOptions


def validate_reward_spec(spec: Any, *, for_training: bool = True) -> list[str]:
    """All problems with a ``reward:`` spec, one line each, starting with the dotted field name.

    Loads no weights (it checks that weight files exist). ``for_training`` rejects non-differentiable
    terms with a nonzero weight, since AlignProp needs gradients.
    """
    return parse_reward_spec(spec, for_training=for_training)[1]


def parse_reward_spec(spec: Any, *, for_training: bool = True) -> tuple[list[TermSpec], list[str]]:
    """(terms, problems); terms are only meaningful when problems is empty."""
    raw, problems = _term_mappings(spec)
    terms: list[TermSpec] = []
    for name, fields in raw.items():
        term, term_problems = _parse_term(name, fields, for_training)
        problems += term_problems
        if term is not None:
            terms.append(term)
    valid_names = f"valid: {', '.join(available_rewards())}"
    if not raw and not problems:
        problems.append(f"reward: no reward terms ({valid_names})")
    elif raw and all(fields.get("weight", 1.0) == 0 for fields in raw.values()):
        problems.append("reward: total weight is zero")
    return terms, problems


def _term_mappings(spec: Any) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Normalize the spec to {name: {field: value}}; dotted keys (``aesthetic.weight``) override nested ones."""
    if isinstance(spec, str):
        spec = {spec: {}}
    if not isinstance(spec, Mapping):
        return {}, [
            f"reward: expected a mapping of reward names to weights, e.g. {{aesthetic: 1.0}}, got {spec!r}"
        ]
    terms: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    for key, value in sorted(spec.items(), key=lambda kv: "." in str(kv[0])):  # plain keys first
        name, _, field = str(key).partition(".")
        fields = terms.setdefault(name, {})
        if field:
            fields[field] = value
        elif value is None:
            continue  # `aesthetic:` alone means weight 1 with defaults
        elif isinstance(value, Mapping):
            fields.update({str(k): v for k, v in value.items()})
        elif isinstance(value, int | float) and not isinstance(value, bool):
            fields["weight"] = value
        else:
            problems.append(f"reward.{name}: expected a weight or a mapping of options, got {value!r}")
    return terms, problems


def _parse_term(name: str, fields: dict[str, Any], for_training: bool) -> tuple[TermSpec | None, list[str]]:
    entry = get_entry(name)
    if entry is None:
        return None, [f"reward.{name}: unknown reward (valid: {', '.join(available_rewards())})"]
    fields = dict(fields)
    weight, problems = _number(name, "weight", fields.pop("weight", 1.0))
    objective, target, objective_problems = _objective(name, fields)
    problems += objective_problems
    options, option_problems = parse_options(entry.options, fields)
    problems += [f"reward.{name}.{p}" for p in option_problems]
    if for_training and not entry.differentiable and weight not in (None, 0):
        problems.append(
            f"reward.{name}: not differentiable, cannot be an AlignProp training objective (use it as an eval metric)"
        )
    if problems or options is None or weight is None:
        return None, problems
    return TermSpec(name, weight, objective, target, options), []


def _objective(name: str, fields: dict[str, Any]) -> tuple[str, float | None, list[str]]:
    """Pop ``objective`` and ``target``; giving a target implies ``objective: target``."""
    objective = fields.pop("objective", "target" if "target" in fields else "maximize")
    target, problems = _number(name, "target", fields.pop("target", None), optional=True)
    if objective not in OBJECTIVES:
        problems.append(
            f"reward.{name}.objective: expected one of {', '.join(OBJECTIVES)}, got {objective!r}"
        )
    elif objective == "maximize" and target is not None:
        problems.append(f"reward.{name}.target: only used with objective: target")
    elif objective == "target" and target is None and not problems:
        problems.append(f"reward.{name}.target: required with objective: target")
    return objective, target, problems


def _number(name: str, field: str, value: Any, *, optional: bool = False) -> tuple[float | None, list[str]]:
    if value is None and optional:
        return None, []
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value), []
    return None, [f"reward.{name}.{field}: expected a finite number, got {value!r}"]
