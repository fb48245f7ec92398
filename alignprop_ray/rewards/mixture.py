"""A weighted mixture of rewards: the objective AlignProp maximizes, with every term reported separately."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from alignprop_ray.errors import UserError
from alignprop_ray.rewards.base import Reward, RewardOutput
from alignprop_ray.rewards.options import RewardTerm
from alignprop_ray.rewards.registry import get_entry
from alignprop_ray.rewards.spec import parse_reward_spec
from alignprop_ray.rewards.weights import WeightsError


class _ByTermName(nn.ModuleDict):
    """A ModuleDict keyed by term names, which may hold dots (a plugin's import path, `my_pkg.rewards:fn`)
    where torch's module names may not: stored with each dot escaped, read back by the term's name."""

    _DOT = "%2E"

    def __getitem__(self, name: str) -> nn.Module:
        return super().__getitem__(name.replace(".", self._DOT))

    def __setitem__(self, name: str, module: nn.Module) -> None:
        super().__setitem__(name.replace(".", self._DOT), module)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and super().__contains__(name.replace(".", self._DOT))

    def __iter__(self):
        return (key.replace(self._DOT, ".") for key in super().__iter__())

    def keys(self):
        return list(iter(self))

    def items(self):
        return list(zip(self.keys(), self.values(), strict=True))


class RewardMixture(nn.Module):
    """Sum over terms of ``weight * r`` (maximize) or ``-weight * |target - r|`` (target); always frozen.

    Call it with images in [0, 1] (B, 3, H, W) and one prompt per image. Non-differentiable terms run
    without autograd; the total is differentiable w.r.t. the images when every weighted term is.
    """

    def __init__(self, terms: Mapping[str, RewardTerm], rewards: dict[str, Reward]):
        super().__init__()
        self.terms = dict(terms)
        self.rewards = _ByTermName(rewards)
        self.requires_grad_(False)
        self.train(False)

    @property
    def term_names(self) -> list[str]:
        return list(self.terms)

    @property
    def differentiable(self) -> bool:
        return all(self.rewards[name].differentiable for name, t in self.terms.items() if t.weight != 0)

    def train(self, mode: bool = True) -> RewardMixture:
        """Reward models stay in eval mode (dropout off) whatever the caller's mode."""
        return super().train(False)

    def forward(self, images: Tensor, prompts: Sequence[str]) -> RewardOutput:
        if images.ndim != 4 or images.shape[1] != 3 or len(prompts) != images.shape[0]:
            raise ValueError(
                f"expected images (B, 3, H, W) and B prompts, got {tuple(images.shape)}, {len(prompts)}"
            )
        total = torch.zeros(images.shape[0], device=images.device, dtype=torch.float32)
        terms: dict[str, Tensor] = {}
        for name, term in self.terms.items():
            value = self._term(name, images, prompts).to(images.device)
            terms[name] = value
            total = total + term.weight * objective(term, value)
        return RewardOutput(total, terms)

    def _term(self, name: str, images: Tensor, prompts: Sequence[str]) -> Tensor:
        reward = self.rewards[name]
        if reward.differentiable:
            return reward(images, prompts)
        with torch.no_grad():
            return reward(images.detach(), prompts)

    @torch.no_grad()
    def image_features(self, images: Tensor) -> Tensor | None:
        """Unit-norm CLIP image embeddings (B, D) from the first term that has a CLIP model, else None."""
        for reward in self.rewards.values():
            features = reward.image_features(images)
            if features is not None:
                return features
        return None


def objective(term: RewardTerm, value: Tensor) -> Tensor:
    """The quantity a term maximizes: ``r``, or ``-|target - r|`` (the paper's aesthetic objective)."""
    return -(term.target - value).abs() if term.mode == "target" else value


def build_reward(
    spec: Any,
    *,
    device: torch.device | str,
    dtype: torch.dtype,
    for_training: bool = True,
    served: Callable[[str, RewardTerm], Reward] | None = None,
) -> RewardMixture:
    """Validate ``spec`` and construct every term once, frozen, on ``device``/``dtype``.

    A term with ``serve`` settings is built by `served` (the Ray layer passes its Ray Serve client,
    alignprop_ray/serving/), which returns a reward without weights here; without `served` it is built
    in this process like any other. Raises UserError with one line (all problems joined by '; ') for a
    bad spec or unusable weights.
    """
    terms, problems = parse_reward_spec(spec, for_training=for_training)
    if problems:
        raise UserError("; ".join(problems))
    device = torch.device(device)
    rewards: dict[str, Reward] = {}
    for name, term in terms.items():
        if term.serve is not None and served is not None:
            rewards[name] = served(name, term)
        else:
            rewards[name] = build_term(name, term, device, dtype)
    return RewardMixture(terms, rewards).to(device)


def build_term(name: str, term: RewardTerm, device: torch.device, dtype: torch.dtype) -> Reward:
    """The reward model of one validated term, frozen, on `device` (what a served reward's replica runs)."""
    entry = get_entry(name)
    if entry.plugin:
        from alignprop_ray.rewards.plugins import PluginError, load_plugin

        try:
            return load_plugin(entry.factory, term, device=device, dtype=dtype)
        except PluginError as err:
            raise UserError(f"reward.{name}: {err}") from None
    try:
        return entry.load_factory()(term, device=device, dtype=dtype)
    except WeightsError as err:
        raise UserError(f"reward.{name}.{err.option}: {err.message}") from err
