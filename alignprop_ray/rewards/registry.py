"""Every reward by name: the built-ins, readable without torch, and plugins.

A built-in entry names its factory by import path (``module:function``), so validating a config imports
neither torch nor any model library: the factory's module is imported when the reward is built. A factory
is ``factory(term, *, device, dtype) -> Reward``, where ``term`` is the validated term of the reward's
options model (alignprop_ray/rewards/options.py): its ``weight``/``objective``/``target`` and its own
options, e.g. ``{aesthetic: {weight: 1.0, path: ...}}``.

A plugin is a user's reward outside this package (alignprop_ray/rewards/plugins.py has its contract): a
config names it by import path (``reward: {my_pkg.rewards:sharpness: 1.0}``), or by the name an installed
package registers in the ``alignprop_ray.rewards`` entry-point group.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from alignprop_ray.rewards import options as opt


@dataclass(frozen=True)
class RewardEntry:
    name: str
    factory: str  # "module:function"
    summary: str  # what the reward rewards, in one line (shown in docs/rewards.md and errors)
    options: type[opt.RewardTerm] = opt.RewardTerm
    differentiable: bool = True  # only differentiable rewards can be training objectives
    plugin: bool = False  # checked by calling it (plugins.check_plugin), which imports torch

    def load_factory(self) -> Callable:
        module, _, function = self.factory.partition(":")
        return getattr(importlib.import_module(module), function)


_SIMPLE, _CLIP = "alignprop_ray.rewards.simple", "alignprop_ray.rewards.clip_rewards"
_ENTRIES = [
    RewardEntry(
        "saturation",
        f"{_SIMPLE}:saturation",
        "Mean chroma: vivid, saturated colors (offline, differentiable).",
    ),
    RewardEntry(
        "contrast",
        f"{_SIMPLE}:contrast",
        "Standard deviation of luma: global contrast (offline, differentiable).",
    ),
    RewardEntry(
        "sharpness",
        f"{_SIMPLE}:sharpness",
        "Mean absolute Laplacian of luma: edge energy (offline, differentiable; noise also scores).",
    ),
    RewardEntry(
        "compressibility",
        f"{_SIMPLE}:compressibility",
        "Minus estimated JPEG bits per DCT coefficient: small files (offline, differentiable surrogate).",
    ),
    RewardEntry(
        "jpeg_compressibility",
        f"{_SIMPLE}:jpeg_compressibility",
        "Minus true JPEG size in kB at quality 95 (offline, NOT differentiable: eval metric only).",
        differentiable=False,
    ),
    RewardEntry(
        "hue",
        "alignprop_ray.rewards.colour:hue",
        "Mean chroma toward a target hue (option `colour`): the whole image shifts to it (offline, differentiable).",
        opt.HueTerm,
    ),
    RewardEntry(
        "aesthetic",
        "alignprop_ray.rewards.aesthetic:aesthetic",
        "LAION aesthetic predictor v2 on CLIP ViT-L/14: how beautiful the image looks (learned).",
        opt.AestheticTerm,
    ),
    RewardEntry(
        "hpsv2",
        f"{_CLIP}:hpsv2",
        "HPS v2 / v2.1 human preference score: how much people would prefer the image for its prompt (learned).",
        opt.HpsTerm,
    ),
    RewardEntry(
        "clip_score",
        f"{_CLIP}:clip_score",
        "Cosine of CLIP image and prompt embeddings: text-image alignment with any open_clip model (learned).",
        opt.OpenClipTerm,
    ),
    RewardEntry(
        "pickscore",
        f"{_CLIP}:pickscore",
        "PickScore: Pick-a-Pic human preference for the image given its prompt, logit-scaled (learned).",
        opt.PickScoreTerm,
    ),
]
_REGISTRY = {entry.name: entry for entry in _ENTRIES}


ENTRY_POINT_GROUP = "alignprop_ray.rewards"


def available_rewards() -> list[str]:
    """Built-in reward names and those of installed plugin packages, sorted."""
    return sorted({*_REGISTRY, *_entry_points()})


def get_entry(name: str) -> RewardEntry | None:
    """The built-in reward `name`, else the plugin at import path `name` (``module:attr``), else the
    plugin an installed package registers as `name`; None if there is none."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    target = name if ":" in name else _entry_points().get(name)
    if target is None:
        return None
    return RewardEntry(name, target, f"plugin {target}", opt.PluginTerm, plugin=True)


def _entry_points() -> dict[str, str]:
    from importlib.metadata import entry_points

    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
