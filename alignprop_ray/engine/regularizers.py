"""Two regularizers of the LoRA update, shared by the methods (train.kl_weight, train.ema_decay).

**KL to the base model** (DPOK, Fan et al. 2023, Section 4.2): along the sampled trajectory, the squared
difference between the adapted denoiser's prediction and the base denoiser's at the same x_t,

    kl = sum over the steps that carry gradient of  mean over latent elements (pred(x_t) - base(x_t))^2

averaged over the batch; the method minimizes -reward + train.kl_weight x kl. The base denoiser is the same
model with its LoRA adapter switched off. Both predictions are the guided ones the sampler steps with. For
two Gaussian steps of equal variance (DDIM with eta > 0, Flow-GRPO's SDE) the KL is the squared difference
of their means over 2 std^2, and each mean is linear in the prediction, so this is each step's KL up to a
per-step factor, which DPOK drops: `gaussian_kl` (engine/flow_sde.py) with 2 std^2 = 1 computes it, the one
helper for every KL-to-base term.

Only the steps whose denoiser call carries gradient carry the term (AlignProp and DRaFT-K: the last K;
DRaFT-LV: the re-noised last step of each copy; ReFL: its one step): at the others no gradient reaches
LoRA, so the term would cost a denoiser call and change nothing. The gradient is the pathwise derivative
of the term as computed: x_t carries the graph of the steps before it (AlignProp), so the base call is
differentiated with respect to its input too (its weights are frozen); it is checkpointed like the step's
own call. Cost per gradient step: one more denoiser forward, and where x_t carries a graph its backward
(bench/regularizers.py measures it).

**EMA of the LoRA weights**: after every optimizer update, ema <- d ema + (1 - d) w with d = train.ema_decay,
starting from the initial adapter (B = 0: the base model), whose share after n updates is d^n; no warm-up,
so d means the same in a run of 20 steps as in one of 2000. Evaluation and every saved adapter (the
checkpoint's, the run's logged one) hold the EMA; training continues from the weights, which a checkpoint
keeps in its training state.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from alignprop_ray.engine.families.base import Conditioning, DiffusionParts
from alignprop_ray.engine.flow_sde import gaussian_kl
from alignprop_ray.engine.sampler import guided_prediction


@dataclass(frozen=True)
class Regularizers:
    """The experiment's train.kl_weight and train.ema_decay (0 and None: off)."""

    kl_weight: float = 0.0
    ema_decay: float | None = None


# gaussian_kl divides the squared difference by 2 std^2: with this std it is the squared difference itself
UNIT_STD = math.sqrt(0.5)


def kl_to_base(
    parts: DiffusionParts,
    latents: torch.Tensor,
    t: torch.Tensor,
    cond: Conditioning,
    guidance_scale: float,
    prediction: torch.Tensor,
    checkpointed: bool = False,
) -> torch.Tensor:
    """DPOK's penalty at one step, per image, shape (B,): the mean over latent elements of the squared
    difference between `prediction` (the adapted denoiser's guided prediction at x_t = `latents`, with its
    graph) and the base denoiser's at the same x_t (differentiable in x_t where it carries a graph)."""
    base = guided_prediction(parts, latents, t, cond, guidance_scale, checkpointed=checkpointed, base=True)
    dtype = torch.promote_types(prediction.dtype, torch.float32)  # fp16/bf16 -> fp32; float64 stays
    return gaussian_kl(prediction.to(dtype), base.to(dtype), UNIT_STD)


class KLAccumulator:
    """Adds up the per-step penalty of one micro-batch (a `generate` on_gradient_step hook, or called by a
    method at its own gradient step); `total` is the batch mean of the sum over steps (0: no step)."""

    def __init__(self, parts: DiffusionParts, guidance_scale: float):
        self.parts, self.guidance_scale = parts, guidance_scale
        self.total: torch.Tensor | float = 0.0

    def __call__(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        cond: Conditioning,
        prediction: torch.Tensor,
        checkpointed: bool = False,
    ) -> None:
        step = kl_to_base(self.parts, latents, t, cond, self.guidance_scale, prediction, checkpointed)
        self.total = self.total + step.mean()

    def value(self) -> float:
        """The sum so far, as a number to log (train/kl)."""
        return float(torch.as_tensor(self.total).detach())


class LoraEMA:
    """An exponential moving average of the LoRA parameters (fp32 copies beside them)."""

    def __init__(self, params: Sequence[torch.nn.Parameter], decay: float):
        self.params, self.decay = list(params), decay
        self.weights = [p.detach().clone() for p in self.params]
        self.updates = 0  # EMA updates so far

    @torch.no_grad()
    def update(self) -> None:
        """Move the average toward the parameters (after an optimizer update)."""
        self.updates += 1
        for average, p in zip(self.weights, self.params, strict=True):
            average.lerp_(p.detach(), 1.0 - self.decay)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The block sees the EMA weights in the parameters; the trained weights come back after it."""
        with torch.no_grad():
            saved = [p.detach().clone() for p in self.params]
            for p, average in zip(self.params, self.weights, strict=True):
                p.copy_(average)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, weights in zip(self.params, saved, strict=True):
                    p.copy_(weights)

    def state_dict(self) -> dict:
        """The average and the trained weights: a checkpoint's adapter holds the average (what a user takes
        from it), so the weights training continues from are kept here."""
        return {
            "weights": [w.clone() for w in self.weights],
            "trained": [p.detach().clone() for p in self.params],
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for average, saved in zip(self.weights, state["weights"], strict=True):
                average.copy_(saved)
            for p, saved in zip(self.params, state["trained"], strict=True):
                p.copy_(saved)
        self.updates = int(state["updates"])
