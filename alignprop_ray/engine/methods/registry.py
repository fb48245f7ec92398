"""Every training method by name, one row each, readable without torch (the config layer reads it).

A row holds what the rest of the package needs to know of a method: its config class (engine/methods/
configs.py: its settings, their checks and defaults), its label, its flags (does it backpropagate the
reward; which schedulers and model families it can train), its own metrics, and its implementation,
named by import path (``module:callable``, called with the validated config; imported, with torch, when
a run builds the method). The table's order is the order reports list methods in.

    row = get_method("ddpo"); row.reward_gradient, row.metric_names, row.build(cfg.method)

Like rewards (alignprop_ray/rewards/registry.py), a method may live outside this package: a config names
it by import path (``method: {name: my_pkg.methods:ROW}``, where ROW is a MethodRow), or by the name an
installed package registers in the ``alignprop_ray.methods`` entry-point group. A new method is one module
and one row; docs/extending.md walks through it.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from alignprop_ray.engine.families.registry import DDIM
from alignprop_ray.engine.methods import configs

ENTRY_POINT_GROUP = "alignprop_ray.methods"


@dataclass(frozen=True)
class MethodRow:
    name: str  # the config's method.name
    label: str  # as its paper writes it (reports, error messages)
    summary: str  # what it backpropagates, in one line (docs/methods.md)
    config: type[configs.MethodConfig]  # its settings (engine/methods/configs.py)
    implementation: str  # "module:callable": callable(config) -> Method (engine/methods/base.py)
    # Backpropagates the reward into the sampler, so every training term must be differentiable; False:
    # it needs reward values only (a policy gradient), and any reward can train it.
    reward_gradient: bool
    gradient_steps: str  # which steps carry gradient (or log-probabilities), in words
    # It adds train.kl_weight x a KL-to-base term to its loss (alignprop, draft, refl: DPOK's penalty over
    # the steps that carry gradient, engine/regularizers.py); False: a nonzero train.kl_weight is refused.
    kl_to_base: bool = False
    schedulers: tuple[str, ...] | None = None  # the scheduler classes it can train with; None: any
    families: tuple[str, ...] | None = None  # the model families it can train; None: every family
    limited_because: str = ""  # why schedulers/families are limited, in words (the refusal says it)
    metrics: tuple[str, ...] = ()  # its own, logged every step as train/<name>/<metric>
    # An older spelling of one of its settings (a dotted experiment key) -> the setting. The older key is
    # still accepted, and stays the setting's MLflow param name, so runs logged before the move resume.
    aliases: Mapping[str, str] = field(default_factory=dict)
    plugin: bool = False  # defined outside this package

    @property
    def settings(self) -> list[str]:
        """The names of its settings (`name` excluded)."""
        return [f.name for f in dataclasses.fields(self.config) if f.name != "name"]

    @property
    def metric_names(self) -> tuple[str, ...]:
        return tuple(f"train/{self.name}/{metric}" for metric in self.metrics)

    def check(self, sections: configs.Sections) -> list[str]:
        """Its settings' problems against the other validated sections (config/checks.py adds the flags')."""
        method = sections.get("method")
        return method.check(sections) if method is not None else []

    def build(self, config: configs.MethodConfig) -> Any:
        """The engine's method for `config` (a `Method`; imports the implementation, and torch)."""
        return _load(self.implementation)(config)


def _load(path: str) -> Any:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


_METHODS = "alignprop_ray.engine.methods"
_ROWS = [
    MethodRow(
        name="alignprop",
        label="AlignProp",
        summary="the reward through the last K steps of the chain, K drawn per batch from method.truncation",
        config=configs.AlignPropConfig,
        implementation=f"{_METHODS}.alignprop:TruncatedBackprop",
        reward_gradient=True,
        gradient_steps="alignprop backpropagates through the last K steps, K drawn from method.truncation",
        kl_to_base=True,
        aliases={"truncation": "truncation", "train.k0": "k0"},
    ),
    MethodRow(
        name="draft",
        label="DRaFT",
        summary="DRaFT-K: the last K steps, every batch; DRaFT-LV: the last step from n re-noised copies",
        config=configs.DraftConfig,
        implementation=f"{_METHODS}.draft:build",
        reward_gradient=True,
        gradient_steps="draft backpropagates through the last method.k steps (DRaFT-LV: the last one)",
        kl_to_base=True,
    ),
    MethodRow(
        name="refl",
        label="ReFL",
        summary="one denoiser call with gradient at a random step, its x0 prediction scored directly",
        config=configs.ReflConfig,
        implementation=f"{_METHODS}.refl:Refl",
        reward_gradient=True,
        gradient_steps="refl backpropagates through one step drawn from method.step_range",
        kl_to_base=True,
        metrics=("step",),  # the 0-based index of the step that carried gradient (mean over batches)
    ),
    MethodRow(
        name="ddpo",
        label="DDPO",
        summary="PPO-clip on the DDIM chain's log-probabilities, no reward gradient",
        config=configs.DdpoConfig,
        implementation=f"{_METHODS}.ddpo:Ddpo",
        reward_gradient=False,
        gradient_steps="ddpo trains on the log-probabilities of int(T x method.timestep_fraction) steps",
        schedulers=(DDIM,),
        limited_because="its policy is DDIM's Gaussian step, eta > 0, whose log-density it needs",
        metrics=("clip_fraction", "approx_kl"),  # PPO diagnostics (ddpo-pytorch's)
    ),
]
_REGISTRY = {row.name: row for row in _ROWS}
METHODS = tuple(_REGISTRY)
DEFAULT_METHOD = "alignprop"  # the experiment's `method:` when it names none


def method_rows() -> list[MethodRow]:
    """The built-in methods' rows, in report order."""
    return list(_ROWS)


def get_method(name: str) -> MethodRow | None:
    """The built-in method `name`, else the plugin row at import path `name` (``module:attr``), else the row
    an installed package registers as `name`; None if there is none. A plugin row takes `name` as its name
    (what the config and the MLflow params say)."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    target = name if ":" in name else _entry_points().get(name)
    if target is None:
        return None
    try:
        row = _load(target)
    except (ImportError, AttributeError, ValueError):
        return None
    if not isinstance(row, MethodRow):
        return None
    return dataclasses.replace(row, name=name, plugin=True)


def key_aliases() -> dict[str, str]:
    """Every older experiment key of a built-in method's setting -> its place (`method.<setting>`)."""
    return {old: f"method.{setting}" for row in _ROWS for old, setting in row.aliases.items()}


def alias_owner(key: str) -> MethodRow | None:
    """The built-in method whose older key `key` is."""
    return next((row for row in _ROWS if key in row.aliases), None)


def _entry_points() -> dict[str, str]:
    from importlib.metadata import entry_points

    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
