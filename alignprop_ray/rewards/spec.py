"""The ``reward:`` section of a config: parsed into typed terms, with every problem found at once.

Accepted forms (YAML)::

    reward: {saturation: 1.0}                              # name: weight
    reward:
      aesthetic: {weight: 1.0, objective: target, target: 10.0, path: ..., clip_path: ...}
      compressibility: 0.5
    reward: {aesthetic.weight: 0.3}                        # dotted keys, as a sweep sets them

A term contributes ``weight * r`` (``objective: maximize``, the default) or ``-weight * |target - r|``
(``objective: target``, the paper's aesthetic objective; implied when ``target`` is given). Weights may be
negative (penalties). A non-differentiable reward may sit in the training mixture of a method that
backpropagates the reward (alignprop, draft, refl) only with weight 0, where it is computed and logged but
adds nothing to the objective; ddpo needs only reward values and trains on any. Each term is validated by its reward's
pydantic model (alignprop_ray/rewards/options.py); problems read like the config's, one line each.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from alignprop_ray.problems import format_validation_error
from alignprop_ray.rewards.options import RewardTerm
from alignprop_ray.rewards.registry import available_rewards, get_entry


def validate_reward_spec(
    spec: Any, *, for_training: bool = True, gradient_method: str | None = "AlignProp"
) -> list[str]:
    """All problems with a ``reward:`` spec, one line each, starting with the dotted field name.

    Loads no weights (it checks that weight files exist). ``for_training`` with a `gradient_method` (the
    training method's name, when it backpropagates the reward) rejects non-differentiable terms with a
    nonzero weight; None: the method needs reward values only (DDPO).
    """
    return parse_reward_spec(spec, for_training=for_training, gradient_method=gradient_method)[1]


def parse_reward_spec(
    spec: Any, *, for_training: bool = True, gradient_method: str | None = "AlignProp"
) -> tuple[dict[str, RewardTerm], list[str]]:
    """({name: validated term}, problems); the terms are only meaningful when problems is empty."""
    raw, problems = _term_mappings(spec)
    terms: dict[str, RewardTerm] = {}
    needs_gradient = gradient_method if for_training else None
    for name, fields in raw.items():
        term, term_problems = _parse_term(name, fields, needs_gradient)
        problems += term_problems
        if term is not None:
            terms[name] = term
    if not raw and not problems:
        problems.append(f"reward: no reward terms (valid: {', '.join(available_rewards())})")
    elif terms and len(terms) == len(raw) and all(t.weight == 0 for t in terms.values()):
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
    for key, value in sorted(spec.items(), key=lambda kv: bool(split_key(str(kv[0]))[1])):  # plain first
        name, field = split_key(str(key))
        fields = terms.setdefault(name, {})
        if field:
            _set_dotted(fields, field, value)
        elif value is None:
            continue  # `aesthetic:` alone means weight 1 with defaults
        elif isinstance(value, Mapping):
            fields.update({str(k): v for k, v in value.items()})
        elif isinstance(value, int | float) and not isinstance(value, bool):
            fields["weight"] = value
        else:
            problems.append(f"reward.{name}: expected a weight or a mapping of options, got {value!r}")
    return terms, problems


def _set_dotted(fields: dict[str, Any], dotted: str, value: Any) -> None:
    """`serve.max_replicas` -> fields["serve"]["max_replicas"] (a nested setting of a term)."""
    *parents, last = dotted.split(".")
    for part in parents:
        inner = fields.get(part)
        if inner is True:  # `serve: true` with one setting changed
            inner = {}
        fields[part] = inner = dict(inner) if isinstance(inner, Mapping) else {}
        fields = inner
    fields[last] = value


def split_key(key: str) -> tuple[str, str]:
    """`aesthetic.weight` -> (aesthetic, weight); a plugin's import path keeps its dots:
    `my_pkg.rewards:hue.weight` -> (my_pkg.rewards:hue, weight)."""
    if ":" in key:
        module, _, rest = key.partition(":")
        attr, _, field = rest.partition(".")
        return f"{module}:{attr}", field
    name, _, field = key.partition(".")
    return name, field


def _parse_term(
    name: str, fields: dict[str, Any], gradient_method: str | None
) -> tuple[RewardTerm | None, list[str]]:
    entry = get_entry(name)
    if entry is None:
        return None, [f"reward.{name}: unknown reward (valid: {', '.join(available_rewards())})"]
    try:
        term = entry.options.model_validate(fields)
    except ValidationError as err:
        return None, format_validation_error(err, (), entry.options, label=("reward", name))
    problems = [f"reward.{name}.{problem}" for problem in term.check()]
    differentiable = entry.differentiable
    # A plugin is checked by calling it, which imports torch and the plugin; a served one is checked where it
    # runs (its replicas build and probe it), since its packages may be only in its runtime_env.
    if entry.plugin and not problems and term.serve is None:
        from alignprop_ray.rewards.plugins import probe_plugin

        problem, differentiable = probe_plugin(entry.factory, term)
        problems += [f"reward.{name}: {problem}"] if problem else []
    if gradient_method and not differentiable and term.weight != 0 and not problems:
        article = "an" if gradient_method[0] in "AEIOU" else "a"
        problems.append(
            f"reward.{name}: not differentiable, cannot be {article} {gradient_method} training objective "
            "(use it as an eval metric); method ddpo trains on any reward"
        )
    return (None, problems) if problems else (term, [])
