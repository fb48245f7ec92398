"""One optimizer step of any training method, single process or one worker of many (no Ray, no MLflow here).

method.begin_step(micro-batches)             (DDPO: sample the round, normalize rewards over workers)
for each of grad_accum micro-batches:
    draw <- drawn once for the micro-batch (the same on every worker): K for AlignProp/DRaFT-K
    the method generates, scores, and backpropagates its loss x loss_scale / grad_accum
    (AlignProp: x0 sampled with gradient through the last K steps, loss = -reward_mixture(x0).mean(),
    plus train.kl_weight x the KL-to-base term over those steps: engine/regularizers.py)
average LoRA gradients over workers; skip the update if anything is NaN/inf; clip; AdamW step;
move the EMA of the LoRA weights (train.ema_decay), which evaluation and the saved adapter use

The methods are in engine/methods/; everything else here is shared by all of them.

loss_scale is the paper's code's `loss_coeff` (0.01): Adam cancels a constant scale of the loss, but the
gradient clip and Adam's epsilon see it, so the official update needs both (docs/fidelity.md).
"""

from __future__ import annotations

import math
import random
import re
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from alignprop_ray.engine.distributed import average_gradients, mean_across_workers
from alignprop_ray.engine.families.base import DiffusionParts
from alignprop_ray.engine.methods.alignprop import TruncatedBackprop
from alignprop_ray.engine.methods.base import Batch, Method, MicroBatchOutput
from alignprop_ray.engine.methods.configs import AlignPropConfig
from alignprop_ray.engine.models import compile_denoiser
from alignprop_ray.engine.regularizers import KLAccumulator, LoraEMA, Regularizers
from alignprop_ray.engine.sampler import SamplerSettings, generate
from alignprop_ray.engine.truncation import Draw, DrawRule
from alignprop_ray.rewards.base import RewardModel


@dataclass(frozen=True)
class OptimSettings:
    """AdamW on the LoRA parameters; every value comes from the experiment config (train: section)."""

    lr: float
    weight_decay: float
    loss_scale: float  # the loss is multiplied by this before backward (train.loss_scale)
    max_grad_norm: float | None  # clips the gradient of loss_scale x loss; None: no clipping
    betas: tuple[float, float]
    eps: float
    schedule: str  # "constant", "linear_warmup" or "cosine": see lr_factor
    warmup_steps: int
    total_steps: int  # optimizer steps of the run (the cosine reaches 0 at the last one)


def lr_factor(step: int, optim: OptimSettings) -> float:
    """The multiple of `optim.lr` used at optimizer step `step` (0-based).

    linear_warmup: (step + 1) / warmup_steps for the first warmup_steps steps, then 1. cosine: the same
    warmup, then half a cosine from 1 down to 0 at the run's last step. constant: 1 throughout.
    """
    if optim.schedule == "constant":
        return 1.0
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.schedule == "linear_warmup":
        return 1.0
    decay_steps = max(optim.total_steps - optim.warmup_steps - 1, 1)
    progress = min((step - optim.warmup_steps) / decay_steps, 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class StepResult:
    reward: float  # mean weighted reward mixture over all workers' scored images
    terms: dict[str, float]  # mean raw value of each reward term
    loss: float  # mean over workers of the unscaled objective the method minimized (-reward for AlignProp)
    k: float  # mean over micro-batches of the denoising steps per image whose gradient reached LoRA
    grad_norm: float  # of the gradient of loss_scale x loss, before clipping; nan when no update happened
    updated: bool
    nonfinite: bool  # loss or gradient was NaN/inf: the update was skipped
    images: int  # denoising chains this worker sampled from fresh noise
    ks: list[int] = field(default_factory=list)  # per micro-batch, steps with gradient (0: none)
    lr: float = math.nan  # the learning rate this step used
    kl: float = math.nan  # mean over workers and micro-batches of the KL-to-base term; nan when off
    metrics: dict[str, float] = field(default_factory=dict)  # the method's own, averaged over workers


def plan_step(
    prompts: Sequence[str],
    rule: DrawRule,
    steps: int,
    *,
    step: int,
    seed: int,
    batch_size: int,
    grad_accum: int,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[list[Batch], list[Draw]]:
    """The micro-batches of one optimizer step and the method's draw for each, a pure function of its
    arguments. `rule` is the method config's `draw_rule`: AlignProp's truncation (K, or a per-step mask),
    DRaFT-K's fixed K, ReFL's step range, or nothing.

    Each worker draws its prompts from its own shard (prompts[rank::world_size]) and its noise seeds
    from a stream keyed by (seed, step, rank); the draws are keyed by (seed, step, micro-batch) only, so
    all workers backpropagate through the same steps and stay in lock-step.
    """
    shard = list(prompts[rank::world_size]) or list(prompts)
    rng = random.Random(f"{seed}:batch:{step}:{rank}")
    batches = [
        Batch(
            [rng.choice(shard) for _ in range(batch_size)], [rng.randrange(2**31) for _ in range(batch_size)]
        )
        for _ in range(grad_accum)
    ]
    draws = [rule.draw(steps, random.Random(f"{seed}:k:{step}:{m}")) for m in range(grad_accum)]
    return batches, draws


class Learner:
    """Owns the LoRA parameters' optimizer and performs optimizer steps of any method on generated batches."""

    def __init__(
        self,
        parts: DiffusionParts,
        lora_params: list[torch.nn.Parameter],
        reward: RewardModel,
        sampler: SamplerSettings,
        optim: OptimSettings,
        resolution: int | None = None,
        method: Method | None = None,
        regularizers: Regularizers | None = None,
    ):
        self.parts, self.params, self.reward = parts, lora_params, reward
        regularizers = regularizers or Regularizers()
        self.kl_weight = regularizers.kl_weight
        self.ema = LoraEMA(lora_params, regularizers.ema_decay) if regularizers.ema_decay else None
        self.sampler, self.optim, self.resolution = sampler, optim, resolution
        # None: AlignProp, with the K the caller planned
        self.method = method or TruncatedBackprop(AlignPropConfig())
        if sampler.compile:  # here too, not only in generate: methods also call the denoiser directly
            compile_denoiser(parts.denoiser)
        self.optimizer = torch.optim.AdamW(
            lora_params, lr=optim.lr, weight_decay=optim.weight_decay, betas=optim.betas, eps=optim.eps
        )
        # stepped once per optimizer step, update or not, so the schedule follows the step count
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, optim)
        )
        self.device = lora_params[0].device
        # what `plan_step` gives any optimizer step on this worker (train/build.py sets it for a run);
        # DDPO samples the batches of its round's later steps at the round's first
        self.plan: Callable[[int], Sequence[Batch]] | None = None
        self.amp_dtype = parts.dtype if parts.dtype != torch.float32 else None
        # fp16 gradients underflow without loss scaling; bf16 and fp32 do not need it (a disabled scaler
        # passes everything through unchanged).
        fp16 = self.amp_dtype == torch.float16 and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=fp16)

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def kl_term(self) -> KLAccumulator | None:
        """A fresh sum of the KL-to-base term for one micro-batch (methods add each gradient step to it);
        None when train.kl_weight is 0."""
        if not self.kl_weight:
            return None
        return KLAccumulator(self.parts, self.sampler.guidance_scale)

    def evaluation_weights(self):
        """The block sees the weights evaluation and the saved adapter use: the EMA when train.ema_decay is
        set (the trained weights come back after it), else the trained weights."""
        return self.ema.applied() if self.ema is not None else nullcontext()

    @property
    def step(self) -> int:
        """Optimizer steps taken so far, updates or not (the schedule's count, kept in checkpoints)."""
        return self.scheduler.last_epoch

    def train_step(self, batches: Sequence[Batch], draws: Sequence[Draw]) -> StepResult:
        """Accumulate the method's gradients over the micro-batches, sync them, and update unless non-finite.

        `draws` holds what the plan drew per micro-batch (`plan_step`): K for AlignProp and DRaFT-K, the
        gradient step for ReFL.
        """
        for p in self.params:
            p.grad = None
        self._finite, scale = True, self.optim.loss_scale / len(batches)

        def backward(loss: torch.Tensor) -> None:
            self._finite &= bool(torch.isfinite(loss))
            if self._finite:  # after a NaN nothing more is accumulated: the update is skipped anyway
                self._backward(loss * scale)

        self.method.begin_step(self, batches, draws)
        outputs = []
        for index, (batch, draw) in enumerate(zip(batches, draws, strict=True)):
            outputs.append(self.method.micro_batch(self, index, batch, draw, backward))
            self._finite &= math.isfinite(outputs[-1].loss)
        lr = self.optimizer.param_groups[0]["lr"]
        result = self._finish_step(outputs, self._finite)
        with warnings.catch_warnings():  # a skipped update (K=0, NaN) still advances the schedule: intended
            warnings.filterwarnings(
                "ignore", message=re.escape("Detected call of `lr_scheduler.step()` before")
            )
            self.scheduler.step()
        result.lr = lr
        return result

    def _backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def _finish_step(self, outputs: list[MicroBatchOutput], local_finite: bool) -> StepResult:
        """Average the step's statistics over workers (one collective); update unless a worker saw NaN/inf
        or no micro-batch anywhere carried gradient (K=0 everywhere)."""
        scored = sum(len(o.reward.total) for o in outputs)
        reward = sum(float(o.reward.total.detach().float().sum()) for o in outputs) / scored
        terms = {
            name: sum(float(o.reward.terms[name].detach().float().sum()) for o in outputs) / scored
            for name in sorted(outputs[0].reward.terms)
        }
        metrics = {
            name: sum(o.metrics[name] for o in outputs) / len(outputs) for name in sorted(outputs[0].metrics)
        }
        # every worker has the same weight; nan when it is 0 (no KL term computed)
        kl = sum(o.kl or 0.0 for o in outputs) / len(outputs) if self.kl_weight else math.nan
        ks = [o.grad_steps for o in outputs]
        local = [
            reward,
            sum(o.loss for o in outputs) / len(outputs),
            float(not local_finite),
            float(max(ks) > 0),
            kl,
            *terms.values(),
            *metrics.values(),
        ]
        stats = mean_across_workers(torch.tensor(local, dtype=torch.float64)).tolist()
        reward, loss, any_nonfinite, any_gradient = stats[0], stats[1], stats[2] > 0, stats[3] > 0
        kl, shared = stats[4], 5
        terms = dict(zip(terms, stats[shared : shared + len(terms)], strict=True))
        metrics = dict(zip(metrics, stats[shared + len(terms) :], strict=True))
        images = sum(o.images for o in outputs)
        result = StepResult(
            reward,
            terms,
            loss,
            sum(ks) / len(ks),
            math.nan,
            False,
            any_nonfinite,
            images,
            ks,
            metrics=metrics,
            kl=kl,
        )
        if any_nonfinite or not any_gradient:  # e.g. K=0 everywhere: no gradient reached the adapter
            return result
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        average_gradients(self.params)
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.optim.max_grad_norm or math.inf)
        result.grad_norm = float(norm)
        if not math.isfinite(result.grad_norm):
            # with fp16 loss scaling this is an overflow: the scaler lowers its scale and the step is skipped
            result.nonfinite = not self.scaler.is_enabled()
            self.scaler.update()
            return result
        self.scaler.step(self.optimizer)
        self.scaler.update()
        result.updated = True
        if self.ema is not None:
            self.ema.update()
        return result

    def state_dict(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "method": self.method.state_dict(),
            **({"ema": self.ema.state_dict()} if self.ema is not None else {}),
        }

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):  # empty when saved with the scaler disabled
            self.scaler.load_state_dict(state["scaler"])
        if "scheduler" in state:  # checkpoints from before schedules: constant
            self.scheduler.load_state_dict(state["scheduler"])
        self.method.load_state_dict(state.get("method", {}))  # checkpoints from before methods: none
        if self.ema is not None and "ema" in state:  # none before train.ema_decay: it starts here
            self.ema.load_state_dict(state["ema"])


@torch.no_grad()
def generate_eval(
    learner: Learner, prompts: Sequence[str], seeds: Sequence[int], batch_size: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """No-grad images for (prompt, seed) pairs, with each reward term and the weighted total per image;
    drawn with the evaluation weights (the EMA when train.ema_decay is set)."""
    with learner.evaluation_weights():
        return _generate_eval(learner, prompts, seeds, batch_size)


def _generate_eval(
    learner: Learner, prompts: Sequence[str], seeds: Sequence[int], batch_size: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    images, terms, totals = [], {}, []
    for start in range(0, len(prompts), batch_size):
        chunk_p, chunk_s = list(prompts[start : start + batch_size]), list(seeds[start : start + batch_size])
        with learner.autocast():
            batch = generate(
                learner.parts, chunk_p, chunk_s, learner.sampler, k=0, resolution=learner.resolution
            )
            out = learner.reward(batch, chunk_p)
        images.append(batch.float().cpu())
        totals.append(out.total.float().cpu())
        for name, value in out.terms.items():
            terms.setdefault(name, []).append(value.float().cpu())
    return torch.cat(images), {t: torch.cat(v) for t, v in terms.items()}, torch.cat(totals)
