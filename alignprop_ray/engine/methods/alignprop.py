"""AlignProp (Prabhudesai et al. 2023), and DRaFT-K (Clark et al. 2023), which is AlignProp with K fixed.

    x0   <- sample T steps; the first T-K without autograd, the last K with it (each denoiser call
            checkpointed): engine/sampler.py `generate`
    loss =  -reward_mixture(decode(x0)).mean()  [+ train.kl_weight x the KL to the base model over the K steps]

K is the plan's draw (the config's `draw_rule`, engine/methods/configs.py): AlignProp's randomized
truncation, or DRaFT-K's fixed K; with the per_step truncation, a mask of the steps that carry gradient.
K = 0 (no such step) leaves the batch without gradient (method.k0).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from alignprop_ray.engine.methods.base import Backward, Method, MicroBatchOutput
from alignprop_ray.engine.sampler import generate
from alignprop_ray.engine.truncation import Draw, grad_steps


class TruncatedBackprop(Method):
    """AlignProp, and DRaFT-K (its config: `draft` without lv_samples); K comes with each micro-batch."""

    def micro_batch(self, learner, index, batch, draw: Draw, backward: Backward) -> MicroBatchOutput:
        k = grad_steps(draw)
        kl = learner.kl_term()  # train.kl_weight: the KL-to-base term over the K steps (regularizers.py)
        with learner.autocast(), nullcontext() if k > 0 else torch.no_grad():
            images = generate(
                learner.parts,
                batch.prompts,
                batch.seeds,
                learner.sampler,
                k=draw,
                resolution=learner.resolution,
                on_gradient_step=kl,
            )
            out = learner.reward(images, batch.prompts)
        loss = -out.total.float().mean()
        if kl is not None:
            loss = loss + learner.kl_weight * kl.total
        if k > 0:
            backward(loss)
        return MicroBatchOutput(
            out,
            float(loss.detach()),
            images=len(batch.prompts),
            grad_steps=k,
            kl=None if kl is None else kl.value(),
        )
