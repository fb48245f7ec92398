"""The one interface every reward implements."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol

import torch
from torch import Tensor, nn


class RewardOutput(NamedTuple):
    total: Tensor  # (B,) weighted objective to MAXIMIZE (the training loss is -total.mean())
    terms: dict[str, Tensor]  # raw per-term reward values (B,), before weighting and objective


class RewardModel(Protocol):
    """What training and evaluation need of a reward (a `RewardMixture` is one)."""

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> RewardOutput:
        """Images in [0, 1], (B, 3, H, W), and one prompt per image -> the objective and each term (B,)."""

    def image_features(self, images: Tensor) -> Tensor | None:
        """Unit-norm embeddings (B, D) for the diversity metrics, or None (pixels are used instead)."""


class Reward(nn.Module):
    """A frozen scorer: images in [0, 1], shape (B, 3, H, W), and their prompts -> float32 rewards (B,).

    Higher is better. ``differentiable`` says whether the value carries gradient to the images (only such
    rewards can be AlignProp training objectives). Rewards that embed images with a CLIP model expose the
    unit-norm embeddings through ``image_features`` (used by the diversity metrics); others return None.
    """

    differentiable: bool = True

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        raise NotImplementedError

    def image_features(self, images: Tensor) -> Tensor | None:
        return None


def luma(images: Tensor) -> Tensor:
    """ITU-R BT.601 luma (the Y of JPEG's YCbCr) of RGB images in [0, 1]: (B, 3, H, W) -> (B, H, W)."""
    weights = torch.tensor([0.299, 0.587, 0.114], device=images.device, dtype=images.dtype)
    return torch.einsum("bchw,c->bhw", images, weights)
