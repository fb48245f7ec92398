"""A reward scored elsewhere (a Ray Serve replica: alignprop_ray/serving/), differentiable through the call.

Pure torch: the network is the `Scorer` callable handed in. The design, in two halves:

* the server (`score_with_pixel_gradient`) computes each image's reward r_b and, when asked, its gradient
  with respect to that image's pixels, g_b = dr_b/dx_b, as one vector-Jacobian product: the gradient of
  sum_b r_b w.r.t. the batch. The reward model's weights are frozen, so nothing else gets a gradient.
* the worker (`RemoteReward`) wraps the call in an autograd function whose forward returns r and whose
  backward returns grad_r[b] * g_b: exactly the vector-Jacobian product the local reward would give, with
  no reward weights or activations on the worker.

The two halves meet in one contract: each image's reward depends on that image (and its prompt) alone, so
d(sum_b r_b)/dx_b = dr_b/dx_b. Every built-in reward keeps it (CLIP towers, heads and pixel statistics see
one image at a time; eval mode, no batch statistics), and it is what batching requests from many workers
into one forward pass needs anyway. tests/test_served_rewards.py checks the design with gradcheck in float64.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from alignprop_ray.rewards.base import Reward

# (images float32 (B, 3, H, W), prompts, whether the pixel gradient is wanted) -> (r (B,), dr/dx or None)
Scorer = Callable[[np.ndarray, list[str], bool], tuple[np.ndarray, np.ndarray | None]]


class RemoteReward(Reward):
    """A reward computed by `scorer`; differentiable w.r.t. the images when the scored reward is."""

    def __init__(self, scorer: Scorer, differentiable: bool):
        super().__init__()
        self.scorer = scorer
        self.differentiable = differentiable

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        if self.differentiable and images.requires_grad and torch.is_grad_enabled():
            return _ScoreWithGradient.apply(images, self.scorer, list(prompts))
        values, _ = self.scorer(_to_numpy(images), list(prompts), False)
        return torch.tensor(values, device=images.device)  # a copy: what arrives may be read-only


class _ScoreWithGradient(torch.autograd.Function):
    """forward: r from the scorer, which also returns dr_b/dx_b; backward: grad_r[b] * dr_b/dx_b."""

    @staticmethod
    def forward(ctx, images: Tensor, scorer: Scorer, prompts: list[str]) -> Tensor:
        values, grads = scorer(_to_numpy(images), prompts, True)
        ctx.save_for_backward(torch.tensor(grads, device=images.device, dtype=images.dtype))
        return torch.tensor(values, device=images.device)

    @staticmethod
    def backward(ctx, grad_values: Tensor):
        (pixel_grads,) = ctx.saved_tensors
        scale = grad_values.to(pixel_grads.dtype).reshape(-1, *([1] * (pixel_grads.ndim - 1)))
        return scale * pixel_grads, None, None


def _to_numpy(images: Tensor) -> np.ndarray:
    """What travels: float32 (the local reward's dtype: train/build.py builds rewards in float32) on the CPU;
    float64 stays float64 (tests)."""
    images = images.detach()
    if images.dtype != torch.float64:
        images = images.float()
    return images.cpu().numpy()


def score_with_pixel_gradient(
    reward: Reward, images: Tensor, prompts: Sequence[str], want_gradient: bool
) -> tuple[Tensor, Tensor | None]:
    """The server's half: rewards (B,) and, if wanted, dr_b/dx_b (B, 3, H, W) as one VJP (see the module doc).

    The reward's weights are frozen (requires_grad False), so the backward pass reaches only the pixels.
    """
    if not want_gradient:
        with torch.no_grad():
            return reward(images, prompts), None
    pixels = images.detach().requires_grad_(True)
    with torch.enable_grad():
        values = reward(pixels, prompts)
        (grads,) = torch.autograd.grad(values.sum(), pixels)
    return values.detach(), grads
