"""Older keys of a method's settings: AlignProp's `truncation` and `k0` were the top-level `truncation:` and
`train.k0` before they moved into `method:`. Experiments and sweeps that write them keep working: the keys
are read, moved where they belong, and problems are named as the user wrote them. Each method row lists its
older keys (engine/methods/registry.py `aliases`), which also stay their settings' MLflow param names.
"""

from __future__ import annotations

import copy
from typing import Any

from alignprop_ray.engine.methods.registry import DEFAULT_METHOD, alias_owner, get_method, key_aliases


def move_aliases(data: dict[str, Any]) -> tuple[dict[str, Any], list[str], dict[str, str]]:
    """Experiment `data` with each older key of a method's setting (`truncation`, `train.k0`: the row's
    `aliases`) moved into `method:` when that method is the one the experiment trains.

    Returns (data, problems, {setting's place: the older key} for each key moved, so that problems of the
    setting are reported under the name the user wrote). A key given for another method is a problem, unless
    it holds its setting's default (`train.k0: skip`, which every other method does anyway); null is unset.
    `data` is returned as is when it has none of the keys.
    """
    present = [old for old in key_aliases() if _has(data, old)]
    if not present:
        return data, [], {}
    out, problems, moved = copy.deepcopy(data), [], {}
    for old in present:
        value, owner = _pop(out, old), alias_owner(old)
        setting = owner.aliases[old]
        if value is None:
            continue
        method = out.get("method", DEFAULT_METHOD)
        name = method.get("name") if isinstance(method, dict) else method
        if name == owner.name:
            if isinstance(method, str):
                method = out["method"] = {"name": method}
            if setting in method:
                problems.append(f"{old}: also set as method.{setting}; keep one")
            else:
                method[setting] = value
                moved[f"method.{setting}"] = old
            continue
        row = get_method(name) if isinstance(name, str) else None
        if row is not None and value != owner.config.__pydantic_fields__[setting].default:
            problems.append(f"{old}: only used with method {owner.name}; {row.gradient_steps}")
    return out, problems, moved


def written_as(problem: str, moved: dict[str, str]) -> str:
    """`problem` named by the key the user wrote, for a setting `move_aliases` moved."""
    for place, old in moved.items():
        if problem.startswith((place + ":", place + ".")):
            return old + problem[len(place) :]
    return problem


def drop_twin(data: dict[str, Any], dotted: str) -> None:
    """After setting `dotted` in experiment data, remove the other spelling of a setting it now holds (an
    older key such as `truncation`, or its place `method.truncation`), so the value just set is the one that
    counts: `--set truncation=...` over a file's `method: {truncation: ...}`, and the reverse."""
    for old, place in key_aliases().items():
        if _within(place, dotted) and _has(data, place):
            _pop(data, old)
        elif _within(old, dotted) and _has(data, old):
            _pop(data, place)


def _within(key: str, dotted: str) -> bool:
    return key == dotted or key.startswith(dotted + ".")


def _has(data: dict[str, Any], dotted: str) -> bool:
    *parents, last = dotted.split(".")
    for part in parents:
        data = data.get(part) if isinstance(data, dict) else None
    return isinstance(data, dict) and last in data


def _pop(data: dict[str, Any], dotted: str) -> Any:
    *parents, last = dotted.split(".")
    for part in parents:
        data = data.get(part) if isinstance(data, dict) else None
    return data.pop(last, None) if isinstance(data, dict) else None
