"""Rewards by name: each is a factory with one typed signature, plus its typed options.

A factory is ``factory(options, *, device, dtype) -> Reward``; ``options`` is an instance of the reward's
``RewardOptions`` dataclass, whose fields are the YAML keys that may sit next to ``weight`` in the spec
(``{aesthetic: {weight: 1.0, path: ...}}``). ``RewardOptions.check`` finds problems such as missing weight
files without loading anything, so ``alignprop-ray validate`` stays cheap.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from alignprop_ray.rewards.base import Reward

TINY = "tiny"  # the `arch` value that selects a seeded random-init miniature of a learned reward


@dataclass(frozen=True)
class RewardOptions:
    """Options of a reward that takes none. Subclasses add typed fields with defaults."""

    def check(self) -> list[str]:
        """Problems found without loading weights, each ``"<option>: <message>"``."""
        return []


class RewardFactory(Protocol):
    def __call__(self, options: Any, *, device: torch.device, dtype: torch.dtype) -> Reward: ...


@dataclass(frozen=True)
class RewardEntry:
    name: str
    factory: RewardFactory
    options: type[RewardOptions]
    differentiable: bool
    summary: str  # first line of the factory's docstring: what the reward rewards


_REGISTRY: dict[str, RewardEntry] = {}


def register_reward(
    name: str, *, options: type[RewardOptions] = RewardOptions, differentiable: bool = True
) -> Callable[[RewardFactory], RewardFactory]:
    """Decorator adding a factory to the registry under ``name``."""

    def add(factory: RewardFactory) -> RewardFactory:
        if name in _REGISTRY:
            raise ValueError(f"reward {name!r} is already registered")
        summary = (factory.__doc__ or name).strip().splitlines()[0]
        _REGISTRY[name] = RewardEntry(name, factory, options, differentiable, summary)
        return factory

    return add


def available_rewards() -> list[str]:
    """Registered reward names, sorted."""
    return sorted(_REGISTRY)


def get_entry(name: str) -> RewardEntry | None:
    return _REGISTRY.get(name)


def option_names(cls: type[RewardOptions]) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def parse_options(cls: type[RewardOptions], raw: Mapping[str, Any]) -> tuple[RewardOptions | None, list[str]]:
    """Typed options from a YAML mapping; problems are ``"<option>: <message>"`` lines."""
    hints = typing.get_type_hints(cls)
    known = option_names(cls)
    values: dict[str, Any] = {}
    problems: list[str] = []
    for key, value in raw.items():
        if key not in known:
            valid = ", ".join(["weight", "objective", "target", *known])
            problems.append(f"{key}: unknown option (valid: {valid})")
            continue
        try:
            values[key] = _coerce(value, hints[key])
        except TypeError as err:
            problems.append(f"{key}: {err}")
    if problems:
        return None, problems
    options = cls(**values)
    return options, options.check()


def _coerce(value: Any, annotation: Any) -> Any:
    """Check ``value`` against a simple annotation (str, int, float, bool, X | None)."""
    allowed = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    if value is None and type(None) in allowed:
        return None
    if isinstance(value, bool):  # YAML `yes` is a bool, never a number or a path
        if bool in allowed:
            return value
    elif int in allowed and isinstance(value, int):
        return value
    elif float in allowed and isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    elif str in allowed and isinstance(value, str):
        return value
    names = " or ".join("null" if a is type(None) else a.__name__ for a in allowed)
    raise TypeError(f"expected {names}, got {value!r}")
