"""The comparison protocol as a file: methods compared at equal training time, each at its own picked lr.

    name: methods
    base: {...}                         # the experiment every trial shares (train.max_wall_seconds set)
    compare:
      methods: [alignprop, {name: draft, k: 1}, {method: ddpo, set: {train.grad_accum: 4}}]
      lr_scales: [0.5, 1, 2]            # x each method's reference lr (train.lr unset)
      seeds: [0, 1, 2]                  # the first picks the scale; its trials are reused
    tune: {metric: eval/reward, max_concurrent_trials: 1}   # the objective; tune.select: the rule
    stop: {nan: true}

`alignprop-ray compare FILE` runs it in two rounds of ordinary sweeps, one sweep per method and round:

- selection, `<name>-select-<label>`: the method at every `lr_scales` value, seed `seeds[0]`. Its scale is
  the one the sweep's own selection picks (alignprop_ray/selection.py: the best objective among the trials
  that keep `tune.select`'s constraints, by default not collapsed).
- seeds, `<name>-seeds-<label>`: the method at the picked scale with `seeds[1:]`. The selection trial at
  the picked scale is its `seeds[0]` run: same settings, same seed, so it is not run twice.

Every trial gets the same `train.max_wall_seconds` (seconds spent in training steps). A method entry may set
other fields for that method only (`set:`; DDPO's images per update, say), `compare.set` for all of them.
This module only reads and checks the file (no Ray, no torch); sweep/compare.py runs it.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from alignprop_ray.config import read_yaml
from alignprop_ray.config.overrides import parse_value
from alignprop_ray.engine.methods.registry import variant_label
from alignprop_ray.errors import ConfigError
from alignprop_ray.problems import format_validation_error
from alignprop_ray.sweep.config import Sweep, parse_sweep

SECTIONS = ("name", "base", "compare", "tune", "stop")
SELECT, SEEDS = "select", "seeds"  # the two rounds, in the order they run
# Fields the protocol sets for every trial: no `set:` may.
PROTOCOL_FIELDS = {
    "method": "set by the protocol (compare.methods)",
    "train.lr_scale": "set by the protocol (compare.lr_scales)",
    "train.seed": "set by the protocol (compare.seeds)",
}
# A method's own time budget would break the protocol; one lr for all would skip each method's own.
SHARED_ONLY = {"train.max_wall_seconds": "the same for every method: set it in base or compare.set"}
NOT_SHARED = {
    "train.lr": "leave it unset: the protocol scales each method's own reference lr (a method without one: "
    "its entry's set)"
}
# Tune settings the rounds fix: each round is a grid run once, every trial to its time budget.
FIXED_TUNE = {
    "algorithm": "grid",
    "num_samples": 1,
    "scheduler": "none",
    "objectives": None,
}
LABEL = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MethodEntry(_Section):
    """One compared method: `method` as an experiment's `method:` names it, fields set for it alone."""

    method: str | dict[str, Any] = Field(description="the method: a name or {name: ..., settings}")
    label: str | None = Field(
        None, pattern=LABEL, description="its name in sweeps, tags and the report; default e.g. draft-K1"
    )
    set: dict[str, Any] = Field(
        default_factory=dict, description="dotted experiment field -> value, for this method's trials only"
    )

    @model_validator(mode="before")
    @classmethod
    def _short_form(cls, data: Any) -> Any:
        """`alignprop` or `{name: draft, k: 1}` alone: the method, nothing else."""
        if isinstance(data, str) or (isinstance(data, dict) and "method" not in data):
            return {"method": data}
        return data


class CompareSettings(_Section):
    methods: list[MethodEntry] = Field(min_length=1, description="the methods compared, in report order")
    lr_scales: list[Annotated[float, Field(gt=0)]] = Field(
        default_factory=lambda: [0.5, 1.0, 2.0],
        min_length=1,
        description="train.lr_scale values of the selection round (x each method's reference lr)",
    )
    seeds: list[int] = Field(
        default_factory=lambda: [0, 1, 2],
        min_length=2,
        description="train.seed of each method's runs at its picked scale; the first also runs the "
        "selection round (its trial at the picked scale is reused)",
    )
    set: dict[str, Any] = Field(
        default_factory=dict, description="dotted experiment field -> value, for every method's trials"
    )

    @model_validator(mode="after")
    def _distinct(self) -> CompareSettings:
        for name in ("lr_scales", "seeds"):
            values = getattr(self, name)
            if len(set(values)) != len(values):
                raise ValueError(f"{name} lists a value twice: {values}")
        return self


@dataclass
class Comparison:
    """A validated comparison: its settings and, per method, the two rounds' sweep files as data."""

    name: str
    settings: CompareSettings
    labels: list[str]  # one per method entry
    data: dict[str, Any]  # the file's name/base/tune/stop, overrides applied
    base_dir: str
    overrides: list[str]  # --set items for the rounds' sweeps (base, tune, stop)
    source: str | None = None
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))

    @property
    def scales(self) -> list[float]:
        return list(self.settings.lr_scales)

    @property
    def seeds(self) -> list[int]:
        return list(self.settings.seeds)

    def round_name(self, round_: str, label: str) -> str:
        return f"{self.name}-{round_}-{label}"

    def selection_sweep(self, index: int) -> Sweep:
        """Method `index` at every lr scale, the first seed."""
        return self._sweep(index, SELECT, self.scales, self.seeds[:1])

    def seeds_sweep(self, index: int, scale: float) -> Sweep:
        """Method `index` at its picked `scale`, every seed but the first."""
        return self._sweep(index, SEEDS, [scale], self.seeds[1:])

    def _sweep(self, index: int, round_: str, scales: list[float], seeds: list[int]) -> Sweep:
        data = round_data(self, index, round_, scales, seeds)
        return parse_sweep(
            data, self.base_dir, self.overrides, self.env, default_name=self.name, source=self.source
        )


def is_comparison(data: Mapping[str, Any]) -> bool:
    return "compare" in data


def load_comparison(
    path: str | os.PathLike, overrides: Iterable[str] = (), env: Mapping[str, str] = os.environ
) -> Comparison:
    """Read and check a comparison file and every sweep it will run; all problems as one ConfigError."""
    path = Path(os.path.abspath(Path(path).expanduser()))
    return parse_comparison(
        read_yaml(path), path.parent, overrides, env, default_name=path.stem, source=str(path)
    )


def parse_comparison(
    data: dict[str, Any],
    base_dir: str | os.PathLike,
    overrides: Iterable[str] = (),
    env: Mapping[str, str] = os.environ,
    *,
    default_name: str = "compare",
    source: str | None = None,
) -> Comparison:
    data, own, overrides, problems = _split_overrides(copy.deepcopy(data), list(overrides))
    problems += _check_sections(data)
    settings, settings_problems = _settings(data.get("compare"))
    problems += settings_problems
    labels, label_problems = _labels(settings) if settings is not None else ([], [])
    problems += label_problems
    if problems or settings is None:
        raise ConfigError(problems)
    name = own.get("name", data.get("name")) or re.sub(r"[^A-Za-z0-9._-]", "-", default_name)
    comparison = Comparison(str(name), settings, labels, data, str(base_dir), overrides, source, dict(env))
    problems = _check_rounds(comparison)
    if problems:
        raise ConfigError(problems)
    return comparison


def _split_overrides(data: dict, overrides: list[str]) -> tuple[dict, dict, list[str], list[str]]:
    """Apply `--set compare.KEY=V` (tune., stop. too) and `name=V` to the file's data; `space.` has no place
    here. The other items are the rounds' sweeps' (the base experiment's)."""
    own, problems, rest = {}, [], []
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if key == "name":
            own["name"] = parse_value(text)
        elif key.split(".")[0] in ("compare", "tune", "stop") and "." in key:
            head, *parents, last = key.split(".")
            node = data.setdefault(head, {})
            for part in parents:
                node = node.setdefault(part, {}) if isinstance(node, dict) else None
            if not isinstance(node, dict):
                problems.append(f"--set {item}: {key.rpartition('.')[0]} is not a mapping")
                continue
            node[last] = parse_value(text)
        elif key.split(".")[0] == "space":
            problems.append(f"--set {item}: a comparison has no space (compare.methods, .lr_scales, .seeds)")
        else:
            rest.append(item)
    return data, own, rest, problems


def _check_sections(data: dict) -> list[str]:
    problems = []
    for key in data:
        if key == "space":
            problems.append(
                "space: a comparison has no space; its axes are compare.methods, compare.lr_scales and "
                "compare.seeds (a field for every trial: compare.set)"
            )
        elif key not in SECTIONS:
            problems.append(f"{key}: unknown field (a comparison has {', '.join(SECTIONS)})")
    tune = data.get("tune") if isinstance(data.get("tune"), dict) else {}
    for key in FIXED_TUNE:
        if key in tune:
            problems.append(f"tune.{key}: set by the protocol (each round is a grid, every trial run once)")
    if "asha" in tune:
        problems.append("tune.asha: set by the protocol (no scheduler: every trial gets its training time)")
    if data.get("base") is None:
        problems.append("base: required (an experiment YAML path, or the experiment inline)")
    return problems


def _settings(raw: Any) -> tuple[CompareSettings | None, list[str]]:
    try:
        settings = CompareSettings.model_validate(raw)
    except ValidationError as err:
        return None, format_validation_error(err, ("compare",), CompareSettings)
    problems = []
    for where, values, refused in [("compare.set", settings.set, {**PROTOCOL_FIELDS, **NOT_SHARED})] + [
        (f"compare.methods.{i}.set", entry.set, {**PROTOCOL_FIELDS, **SHARED_ONLY})
        for i, entry in enumerate(settings.methods)
    ]:
        for key in values:
            if key in refused:
                problems.append(f"{where}.{key}: {refused[key]}")
    return settings, problems


def _labels(settings: CompareSettings) -> tuple[list[str], list[str]]:
    labels = [entry.label or method_entry_label(entry.method) for entry in settings.methods]
    problems = []
    for i, label in enumerate(labels):
        if labels.index(label) != i:
            problems.append(
                f"compare.methods.{i}: its label {label!r} is method {labels.index(label)}'s too; "
                "give one of them a label:"
            )
        elif not re.match(LABEL, label):
            problems.append(f"compare.methods.{i}: label {label!r}: use letters, digits, '.', '_' and '-'")
    return labels, problems


def method_entry_label(method: str | Mapping[str, Any]) -> str:
    """`alignprop`, `draft-K1`, `draft-LV2`: the label a method gets in a comparison and in reports."""
    settings = {"name": method} if isinstance(method, str) else dict(method)
    return variant_label(settings)


def round_data(
    comparison: Comparison, index: int, round_: str, scales: list[float], seeds: list[int]
) -> dict:
    """The sweep file of method `index`'s round: the comparison's base, tune and stop, and a grid over the
    method (one value), the lr scales and the seeds, with `set:` fields as one-value grids."""
    entry = comparison.settings.methods[index]
    fixed = {**comparison.settings.set, **entry.set}
    space = {
        "method": {"grid": [entry.method]},
        "train.lr_scale": {"grid": list(scales)},
        "train.seed": {"grid": list(seeds)},
        **{key: {"grid": [value]} for key, value in fixed.items()},
    }
    tune = {**(comparison.data.get("tune") or {}), **{k: v for k, v in FIXED_TUNE.items() if v is not None}}
    data = {
        "name": comparison.round_name(round_, comparison.labels[index]),
        "base": comparison.data["base"],
        "space": space,
        "tune": tune,
    }
    if comparison.data.get("stop") is not None:
        data["stop"] = comparison.data["stop"]
    return data


def _check_rounds(comparison: Comparison) -> list[str]:
    """Build every sweep the comparison runs (the seeds round at the first scale: the selection round
    checks the others), and the protocol's own rules on the base: each problem once."""
    problems: list[str] = []
    for index in range(len(comparison.labels)):
        for round_, seeds in ((SELECT, comparison.seeds[:1]), (SEEDS, comparison.seeds[1:])):
            scales = comparison.scales if round_ == SELECT else comparison.scales[:1]
            try:
                sweep = comparison._sweep(index, round_, scales, seeds)
            except ConfigError as err:
                problems += [_attributed(p, index, comparison) for p in err.problems]
                break
            problems += _protocol_problems(sweep)
    return list(dict.fromkeys(problems))


def _attributed(problem: str, index: int, comparison: Comparison) -> str:
    """A problem of a round's sweep, named by the comparison's field (`space.method` -> compare.methods.0)."""
    entry = comparison.settings.methods[index]
    where = {
        "space.method": f"compare.methods.{index}",
        "space.train.lr_scale": "compare.lr_scales",
        "space.train.seed": "compare.seeds",
        **{f"space.{k}": f"compare.methods.{index}.set.{k}" for k in entry.set},
        **{f"space.{k}": f"compare.set.{k}" for k in comparison.settings.set if k not in entry.set},
    }
    for prefix in sorted(where, key=len, reverse=True):
        if problem.startswith((prefix + ":", prefix + " ", prefix + ".")):
            return where[prefix] + problem[len(prefix) :]
    if problem.startswith("space: the combination"):
        return f"compare.methods.{index}: {problem.removeprefix('space: ')}"
    return problem


def _protocol_problems(sweep: Sweep) -> list[str]:
    problems = []
    if sweep.reference.train.max_wall_seconds is None:
        problems.append(
            "base.train.max_wall_seconds: required: the protocol gives every trial the same seconds of "
            "training steps"
        )
    if "lr" in (sweep.base.get("train") or {}):
        problems.append(
            "base.train.lr: leave it unset: the protocol scales each method's own reference lr "
            "(compare.lr_scales; a method without one: its entry's set: {train.lr: ...})"
        )
    return problems
