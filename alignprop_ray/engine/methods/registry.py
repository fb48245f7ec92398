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

from alignprop_ray.engine.families.registry import DDIM, FLOW_EULER
from alignprop_ray.engine.methods import configs

ENTRY_POINT_GROUP = "alignprop_ray.methods"

# A reference setting -> the experiment field it fills where the experiment leaves that field unset.
APPLIED = {
    "lr": "train.lr",
    "adam_betas": "train.adam_betas",
    "weight_decay": "train.weight_decay",
    "loss_scale": "train.loss_scale",
    "max_grad_norm": "train.max_grad_norm",
    "guidance_scale": "sampling.guidance_scale",
}


@dataclass(frozen=True)
class Reference:
    """A method's settings as its reference code runs them, each with its source (`sources`: setting -> the
    file and line, or paper section; docs/methods.md lists them). The APPLIED ones fill the experiment's
    fields that the experiment does not set (config/schema.py); None: the schema's default (AlignProp's).
    `eta` and `images_per_update` are the reference's, stated for comparison: the training eta is a method
    setting where the method has one (DDPO's `method.eta`), and images per update depend on the cluster
    (workers x train.batch_size x train.grad_accum)."""

    lr: float | None = None
    adam_betas: tuple[float, float] | None = None
    weight_decay: float | None = None
    loss_scale: float | None = None
    max_grad_norm: float | None = None
    guidance_scale: float | None = None
    eta: float | None = None  # DDIM eta of the training samples (1.0: DDPM-like ancestral sampling)
    images_per_update: int | None = None  # images per optimizer step, every GPU together
    sources: Mapping[str, str] = field(default_factory=dict)

    def applied(self) -> dict[str, Any]:
        """Experiment key (`train.lr`) -> value, for every APPLIED setting the reference has."""
        return {key: getattr(self, name) for name, key in APPLIED.items() if getattr(self, name) is not None}


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
    # its reference settings (optimizer, loss scale, clip, guidance), applied where the experiment is silent
    reference: Reference = field(default_factory=Reference)
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


# Each method's reference settings, with their sources (docs/methods.md prints them).
ALIGNPROP_REFERENCE = Reference(
    lr=1e-3,
    adam_betas=(0.9, 0.999),
    weight_decay=0.1,
    loss_scale=0.01,
    max_grad_norm=5.0,
    guidance_scale=7.5,
    images_per_update=8,
    sources={
        "lr": "mihirp1998/AlignProp config/align_prop.py aesthetic(): train.learning_rate = 1e-3",
        "adam_betas": "config/align_prop.py general(): train.adam_beta1 = 0.9, train.adam_beta2 = 0.999",
        "weight_decay": "config/align_prop.py aesthetic(): train.adam_weight_decay = 0.1",
        "loss_scale": "config/align_prop.py aesthetic(): train.loss_coeff = 0.01",
        "max_grad_norm": "config/align_prop.py aesthetic(): train.max_grad_norm = 5.0",
        "guidance_scale": "config/align_prop.py general(): sd_guidance_scale = 7.5",
        "images_per_update": "config/align_prop.py aesthetic(): set_config_batch(total_batch_size=8)",
    },
)

REFL_REFERENCE = Reference(
    lr=1e-5,
    adam_betas=(0.9, 0.999),
    weight_decay=1e-2,
    loss_scale=1e-3,
    max_grad_norm=1.0,
    guidance_scale=1.0,
    eta=1.0,
    images_per_update=64,
    sources={
        "lr": "THUDM/ImageReward scripts/train_refl.sh: --learning_rate=1e-05 (the whole UNet, not LoRA)",
        "adam_betas": "ImageReward/ReFL.py: --adam_beta1 default 0.9, --adam_beta2 default 0.999",
        "weight_decay": "ImageReward/ReFL.py: --adam_weight_decay default 1e-2",
        "loss_scale": "scripts/train_refl.sh: --grad_scale 0.001 (ReFL.py: loss.mean() * args.grad_scale)",
        "max_grad_norm": "scripts/train_refl.sh: --max_grad_norm=1",
        "guidance_scale": "ImageReward/ReFL.py: the chain and the gradient call take the text "
        "condition only, no classifier-free guidance",
        "eta": "ImageReward/ReFL.py: DDPMScheduler, 40 steps",
        "images_per_update": "scripts/train_refl.sh: --train_batch_size=2 "
        "--gradient_accumulation_steps=4 --num_processes=8",
    },
)

DDPO_REFERENCE = Reference(
    lr=3e-4,
    adam_betas=(0.9, 0.999),
    weight_decay=1e-4,
    loss_scale=1.0,
    max_grad_norm=1.0,
    guidance_scale=5.0,
    eta=1.0,
    sources={
        "lr": "trl 0.23.1 DDPOConfig: train_learning_rate = 3e-4",
        "adam_betas": "DDPOConfig: train_adam_beta1 = 0.9, train_adam_beta2 = 0.999",
        "weight_decay": "DDPOConfig: train_adam_weight_decay = 1e-4 (ddpo-pytorch config/base.py: "
        "train.adam_weight_decay = 1e-4)",
        "loss_scale": "DDPOConfig / ddpo-pytorch scripts/train.py: the PPO loss is backpropagated unscaled",
        "max_grad_norm": "DDPOConfig: train_max_grad_norm = 1.0 (config/base.py: train.max_grad_norm = 1.0)",
        "guidance_scale": "DDPOConfig: sample_guidance_scale = 5.0 (config/base.py: "
        "sample.guidance_scale = 5.0)",
        "eta": "DDPOConfig: sample_eta = 1.0 (method.eta)",
        "images_per_update": "DDPOConfig: train_batch_size 1 x train_gradient_accumulation_steps 1 "
        "per process, any number of processes (so not stated as a total); "
        "sample_num_batches_per_epoch 2 (method.updates_per_round)",
    },
)

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
        reference=ALIGNPROP_REFERENCE,
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
        # the 0-based index of the step that carried gradient (mean over batches); the pre-training loss,
        # unweighted (0 without method.pretrain_weight)
        metrics=("step", "pretrain_loss"),
        reference=REFL_REFERENCE,
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
        reference=DDPO_REFERENCE,
        limited_because="its policy is DDIM's Gaussian step, eta > 0, whose log-density it needs",
        metrics=("clip_fraction", "approx_kl"),  # PPO diagnostics (ddpo-pytorch's)
    ),
    MethodRow(
        name="flow_grpo",
        label="Flow-GRPO",
        summary="GRPO (PPO-clip, group-relative advantages) on the SDE of a flow-matching sampler, no reward "
        "gradient",
        config=configs.FlowGrpoConfig,
        implementation=f"{_METHODS}.flow_grpo:FlowGrpo",
        reward_gradient=False,
        kl_to_base=True,
        gradient_steps="flow_grpo trains on the log-probabilities of its SDE steps (every step but the last, "
        "or method.window of them)",
        schedulers=(FLOW_EULER,),
        families=("sd3", "flux"),
        limited_because="its policy is the SDE of a flow-matching Euler sampler, whose step it needs",
        # PPO diagnostics (the authors'); the KL to the base model, when train.kl_weight > 0, is train/kl
        metrics=("clip_fraction", "approx_kl"),
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


def variant_label(settings: Mapping[str, Any]) -> str:
    """A run's method in one word, as reports and comparisons name it: `alignprop`, `draft-K1`, `draft-LV2`,
    `refl`, `ddpo`. `settings`: the method's name and settings (`method:` as a mapping; text values, as
    MLflow params hold them, are read too); a DRaFT run without `k` is DRaFT-1 (its default)."""
    name = str(settings.get("name") or DEFAULT_METHOD)
    if name != "draft":
        return name
    lv, k = _given(settings.get("lv_samples")), _given(settings.get("k"))
    return f"draft-LV{lv}" if lv is not None else f"draft-K{1 if k is None else k}"


def _given(value: Any) -> str | None:
    """A setting's value as text, None where it is unset (None, NaN, `null`, empty)."""
    text = "" if value is None else str(value)
    return None if text in ("", "null", "None", "nan") else text


def key_aliases() -> dict[str, str]:
    """Every older experiment key of a built-in method's setting -> its place (`method.<setting>`)."""
    return {old: f"method.{setting}" for row in _ROWS for old, setting in row.aliases.items()}


def alias_owner(key: str) -> MethodRow | None:
    """The built-in method whose older key `key` is."""
    return next((row for row in _ROWS if key in row.aliases), None)


def _entry_points() -> dict[str, str]:
    from importlib.metadata import entry_points

    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
