"""AlignProp (Prabhudesai et al. 2023), and DRaFT-K (Clark et al. 2023), which is AlignProp with K fixed.

    x0   <- sample T steps; the first T-K without autograd, the last K with it (each denoiser call
            checkpointed): engine/sampler.py `generate`
    loss =  -reward_mixture(decode(x0)).mean()

K is the plan's draw (train/loop.py): AlignProp's randomized truncation, or DRaFT-K's fixed K; with the
per_step truncation, a mask of the steps that carry gradient. K = 0 (no such step) leaves the batch without
gradient (train.k0).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from alignprop_ray.engine.methods.base import Backward, Method, MicroBatchOutput
from alignprop_ray.engine.sampler import generate
from alignprop_ray.engine.truncation import Draw, KDistribution, grad_steps


@dataclass(frozen=True)
class TruncatedBackpropSettings:
    """AlignProp and DRaFT-K: the distribution of K (DRaFT-K: fixed); `name` says which, for the logs."""

    name: str  # alignprop | draft
    truncation: KDistribution  # truncation (train.k0: redraw wraps it in RedrawZero), or fixed:method.k

    @property
    def draws(self) -> KDistribution:
        return self.truncation


class TruncatedBackprop(Method):
    def __init__(self, name: str = "alignprop"):
        self.name = name

    def micro_batch(self, learner, index, batch, draw: Draw, backward: Backward) -> MicroBatchOutput:
        k = grad_steps(draw)
        with learner.autocast(), nullcontext() if k > 0 else torch.no_grad():
            images = generate(
                learner.parts,
                batch.prompts,
                batch.seeds,
                learner.sampler,
                k=draw,
                resolution=learner.resolution,
            )
            out = learner.reward(images, batch.prompts)
        loss = -out.total.float().mean()
        if k > 0:
            backward(loss)
        return MicroBatchOutput(out, float(loss.detach()), images=len(batch.prompts), grad_steps=k)
