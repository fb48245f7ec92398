"""Each training method's config: its `method:` mapping, validated, without torch (`validate` reads it).

    method: {name: ddpo, clip_range: 1.0e-3}      ->  DdpoConfig(name="ddpo", clip_range=0.001, ...)

A method's config class lists the settings a user writes under `method:`, each with its default (from the
method's reference code) and a description. Three hooks connect it to the rest of the experiment, all
given the other validated sections (`Sections`: section name -> its validated value; a section that failed
validation is absent, and a hook whose inputs are missing does nothing):

- `check(sections) -> problems`: rules that involve other sections (K <= T), one line each;
- `resolve(sections)`: defaults that depend on them (AlignProp's truncation: uniform:0:T);
- `draw_rule`: what the plan draws for each micro-batch, the same on every worker (engine/truncation.py).

The engine's method (engine/methods/<name>.py) reads the validated config directly; the method's row in
registry.py ties the class to its name, flags and implementation.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
)
from pydantic.dataclasses import dataclass

from alignprop_ray.engine.truncation import (
    DrawRule,
    NoDraw,
    RedrawZero,
    StepRange,
    Truncation,
    parse_truncation,
    positive_k_problem,
)
from alignprop_ray.fields import Float, Int

Sections = dict[str, Any]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def captioned_images(folder: Path) -> list[tuple[Path, Path]]:
    """(image, caption file) of every image in `folder` with a .txt of the same name, sorted by name."""
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return [(p, p.with_suffix(".txt")) for p in images if p.with_suffix(".txt").is_file()]


# Parsed from its YAML forms once, here; written back in its short form (`uniform:0:50`) everywhere.
TruncationField = Annotated[
    Truncation,
    PlainValidator(parse_truncation),
    PlainSerializer(Truncation.describe, return_type=str),
    WithJsonSchema({"type": "string"}),
]


def method_config(cls: type) -> type:
    """Make `cls` a method config: a frozen pydantic dataclass that refuses unknown settings."""
    return dataclass(config=ConfigDict(extra="forbid", validate_default=True), frozen=True)(cls)


def _steps(sections: Sections) -> int | None:
    """T = sampling.steps, or None when the sampling section did not validate."""
    sampling = sections.get("sampling")
    return sampling.steps if sampling is not None else None


@method_config
class MethodConfig:
    """A method without settings (subclasses add theirs, with defaults, after `name`)."""

    name: str

    def check(self, sections: Sections) -> list[str]:
        """One-line problems of this method's settings against the other sections."""
        return []

    def resolve(self, sections: Sections) -> MethodConfig:
        """This config with the defaults that depend on other sections filled in."""
        return self

    @property
    def draw_rule(self) -> DrawRule:
        """What the plan draws per micro-batch (engine/step.py `plan_step`): nothing by default."""
        return NoDraw()


@method_config
class AlignPropConfig(MethodConfig):
    """AlignProp (Prabhudesai et al. 2023): backprop through the last K steps, K drawn per batch."""

    name: str = "alignprop"
    truncation: TruncationField | None = Field(
        None,
        description="distribution of K, the trailing steps that carry gradient, drawn once per batch: 'fixed:K', "
        "'uniform:LOW:HIGH', 'normal:MEAN:STD', 'full', 'gaussian_index:MEAN:STD' (the paper's v2 code); or "
        "'per_step:LOW:HIGH' (the v1 code and TRL: step i carries gradient iff i >= its own draw from "
        "LOW..HIGH); or a mapping {kind: ...}. Default: uniform:0:T. Also written as the top-level `truncation:`",
    )
    # skip: the distribution as written; redraw: K | K >= 1 (engine/truncation.py RedrawZero).
    k0: Literal["skip", "redraw"] = Field(
        "skip",
        description="what a batch that draws K=0 (no step carries gradient) does: skip: its images are scored "
        "but add no gradient (a step whose batches all drew K=0 makes no update; train/k0_skipped counts "
        "such batches); redraw: K is drawn again until K >= 1. Also written as `train.k0`",
    )

    def check(self, sections: Sections) -> list[str]:
        """The distribution can be drawn with T steps (no K > T; gaussian_index lands in 1..T-1), and
        k0: redraw has a K >= 1 to redraw toward (its own shape was checked when it parsed)."""
        steps = _steps(sections)
        if self.truncation is None or steps is None:
            return []
        try:
            self.truncation.validate(steps)
        except ValueError as err:
            return [f"method.truncation: {err}"]
        problem = positive_k_problem(self.truncation, steps) if self.k0 == "redraw" else None
        return [f"method.k0: {problem}"] if problem else []

    def resolve(self, sections: Sections) -> AlignPropConfig:
        """Unset truncation: uniform:0:T, the paper's randomized truncation over all T steps."""
        steps = _steps(sections)
        if self.truncation is not None or steps is None:
            return self
        return dataclasses.replace(self, truncation=Truncation("uniform", low=0, high=steps))

    @property
    def draw_rule(self) -> DrawRule:
        return RedrawZero(self.truncation) if self.k0 == "redraw" else self.truncation


@method_config
class DraftConfig(MethodConfig):
    """DRaFT (Clark et al. 2023): DRaFT-K, or DRaFT-LV with lv_samples."""

    name: str = "draft"
    k: Int = Field(
        1,
        ge=1,
        description="DRaFT-K: gradient through the last k steps, every batch (truncation fixed:k); "
        "1 = DRaFT-1, the paper's recommendation",
    )
    lv_samples: Int | None = Field(
        None,
        ge=1,
        description="DRaFT-LV: sample without gradient, then backprop the last step from this many re-noised "
        "copies of the final latent and average their reward gradients (the paper: 2); k is then 1. "
        "null: DRaFT-K",
    )

    def check(self, sections: Sections) -> list[str]:
        steps = _steps(sections)
        if self.lv_samples is not None and self.k != 1:
            return [
                "method.k: DRaFT-LV (method.lv_samples) backpropagates through the last step only; "
                "k does not apply (drop it, or lv_samples for DRaFT-K)"
            ]
        if steps is not None and self.k > steps:
            return [f"method.k: K={self.k} but sampling has {steps} steps"]
        return []

    @property
    def draw_rule(self) -> DrawRule:
        return NoDraw() if self.lv_samples is not None else Truncation("fixed", k=self.k)


@method_config
class ReflConfig(MethodConfig):
    """ReFL (Xu et al. 2023, ImageReward): score the x0 predicted by one step with gradient."""

    name: str = "refl"
    # ImageReward's ReFL: 40 steps, gradient at a step drawn from 30..39; the default is that share of T.
    step_range: tuple[Int, Int] | None = Field(
        None,
        description="[low, high]: 0-based index of the one step that carries gradient, drawn uniformly per "
        "batch; the steps before it run without gradient and its x0 prediction is scored. Default: "
        "[3T/4 rounded down, T-1] (ImageReward: 30..39 of 40)",
    )

    pretrain_weight: Float = Field(
        0.0,
        ge=0,
        description="weight of ReFL's pre-training loss (ImageReward, Algorithm 1): the denoiser's noise-"
        "prediction MSE on caption-image pairs from method.pretrain_data, added to the reward loss of each "
        "micro-batch (as many pairs as it has images); 0: none (ImageReward's released ReFL.py has none)",
    )
    pretrain_data: str | None = Field(
        None,
        description="folder of caption-image pairs for the pre-training loss: each image (.png, .jpg, .jpeg, "
        ".webp) with a .txt of the same name holding its caption (models/toy-shapes/pretrain: the toy "
        "shapes); resized to model.resolution",
    )

    @field_validator("pretrain_data")
    @classmethod
    def _folder(cls, value: str | None, info: ValidationInfo) -> str | None:
        """An existing folder with at least one captioned image, made absolute when a config file is read
        (its validation context's PathContext, `paths`: the file's directory, then the cwd)."""
        if value is None:
            return None
        paths = (info.context or {}).get("paths")
        if paths is None:  # a resolved config read again (a worker): checked when it was written
            return value
        found = paths.find(value)
        if found is None or not found.is_dir():
            raise ValueError(f"folder {value!r} not found (looked in {paths.looked_in()})")
        if not captioned_images(found):
            raise ValueError(f"{found} holds no image with a caption (.txt of the same name)")
        return str(found)

    def check(self, sections: Sections) -> list[str]:
        if self.pretrain_weight > 0 and self.pretrain_data is None:
            return ["method.pretrain_weight: needs method.pretrain_data, a folder of caption-image pairs"]
        steps = _steps(sections)
        if steps is None or self.step_range is None:
            return []
        low, high = self.step_range
        if 0 <= low <= high <= steps - 1:
            return []
        return [
            f"method.step_range: [{low}, {high}] must satisfy 0 <= low <= high <= T-1 = {steps - 1} "
            "(0-based step indices of the T = sampling.steps chain)"
        ]

    def resolve(self, sections: Sections) -> ReflConfig:
        """Unset: [3T/4, T-1], the share of the chain ImageReward draws from (30..39 of 40)."""
        steps = _steps(sections)
        if self.step_range is not None or steps is None:
            return self
        return dataclasses.replace(self, step_range=(3 * steps // 4, steps - 1))

    @property
    def draw_rule(self) -> DrawRule:
        return StepRange(*self.step_range)


@method_config
class DdpoConfig(MethodConfig):
    """DDPO (Black et al. 2023), PPO-clip on the DDIM chain's log-probabilities; trains on any reward."""

    name: str = "ddpo"
    # Defaults: kvablack/ddpo-pytorch config/base.py.
    eta: Float = Field(
        1.0,
        gt=0,
        le=1,
        description="DDIM eta of the training samples (the policy's noise; evaluation keeps sampling.eta)",
    )
    clip_range: Float = Field(1e-4, gt=0, description="PPO ratio clip epsilon")
    adv_clip_max: Float = Field(
        5.0,
        gt=0,
        description="advantages are clipped to [-adv_clip_max, adv_clip_max] (TRL's DDPOConfig: 5)",
    )
    timestep_fraction: Float = Field(
        1.0, gt=0, le=1, description="share of the T steps trained on per batch (int(T x fraction) of them)"
    )
    # TRL's DDPOConfig and ddpo-pytorch config/base.py: sample_num_batches_per_epoch 2 with one image per
    # sample batch and per train batch, no accumulation: 2 optimizer steps per round (config/dgx.py: 4).
    updates_per_round: Int = Field(
        2,
        ge=1,
        description="optimizer steps per pass over a sampled round: a round samples this many per-update "
        "batches (train.batch_size x train.grad_accum images per worker each) with the adapter of its first "
        "step, and each update trains on a disjoint minibatch of them, so the PPO ratio and its clip act from "
        "the second update on (ddpo-pytorch: sample.num_batches_per_epoch x sample.batch_size / "
        "(train.batch_size x gradient_accumulation_steps)). 1, with inner_epochs 1: each sample is trained on "
        "once by the adapter that drew it, the ratio is always 1 and nothing is clipped: REINFORCE",
    )
    inner_epochs: Int = Field(
        1,
        ge=1,
        description="passes over each sampled round (ddpo-pytorch's num_inner_epochs): a round lasts "
        "updates_per_round x inner_epochs optimizer steps, its minibatches reshuffled each pass",
    )
    per_prompt_stats: bool = Field(
        True, description="normalize each reward by its prompt's recent rewards (else by the whole batch's)"
    )
    stat_buffer: Int = Field(16, ge=1, description="rewards kept per prompt (per_prompt_stats)")
    stat_min_count: Int = Field(
        16, ge=1, description="rewards a prompt needs before its own statistics replace the batch's"
    )

    def check(self, sections: Sections) -> list[str]:
        steps = _steps(sections)
        if steps is None or int(steps * self.timestep_fraction) >= 1:
            return []
        return [
            f"method.timestep_fraction: {self.timestep_fraction:g} of {steps} steps trains on none "
            "(int(T x fraction) must be >= 1)"
        ]


def _images_per_step(sections: Sections) -> int | None:
    """Images of one optimizer step over every worker, or None when a section it needs did not validate."""
    train, scaling = sections.get("train"), sections.get("scaling")
    if train is None or scaling is None:
        return None
    return scaling.num_workers * train.batch_size * train.grad_accum


@method_config
class FlowGrpoConfig(MethodConfig):
    """Flow-GRPO (Liu et al. 2025, arXiv 2505.05470): GRPO on the SDE of a flow-matching sampler; with
    `window`, Flow-GRPO-Fast. Defaults: the authors' code (yifan123/flow_grpo config/base.py, grpo.py)."""

    name: str = "flow_grpo"
    noise_level: Float = Field(
        0.7,
        gt=0,
        description="a in the SDE's noise schedule sigma_t = a sqrt(t / (1 - t)) (the paper: 0.7); "
        "evaluation samples the ODE (noise 0)",
    )
    group_size: Int = Field(
        24,
        ge=2,
        description="G: images per prompt in a round, each from its own seed; an image's advantage is its "
        "reward less its group's mean, over the group's std (the paper's SD3.5 runs: 24). Groups are taken "
        "over every worker's images, so G must divide workers x train.batch_size x train.grad_accum",
    )
    clip_range: Float = Field(1e-4, gt=0, description="PPO ratio clip epsilon (the authors' code: 1e-4)")
    adv_clip_max: Float = Field(
        5.0, gt=0, description="advantages are clipped to [-adv_clip_max, adv_clip_max] (the authors': 5)"
    )
    updates_per_round: Int = Field(
        1,
        ge=1,
        description="optimizer steps per sampled round: the first samples it, the next ones reuse it (the "
        "PPO ratio is 1 on the first; clipping acts from the second)",
    )
    steps: Int | None = Field(
        None,
        ge=1,
        description="denoising steps of the training rollouts; evaluation keeps sampling.steps (the paper's "
        "denoising reduction: 10 in training, 40 in evaluation). null: sampling.steps",
    )
    window: Int | None = Field(
        None,
        ge=1,
        description="Flow-GRPO-Fast: SDE steps (and trained steps) per rollout, a window of consecutive steps "
        "placed at random per round, the other steps sampled by the ODE (the authors' Fast configs: 2). "
        "null: Flow-GRPO, every step but the last is an SDE step and trained on",
    )
    window_range: tuple[Int, Int] | None = Field(
        None,
        description="[low, high]: the window's steps lie in low..high-1 (its first step drawn uniformly from "
        "low..high-window); only with window. null: [0, T], T the training steps (the authors': (0, 10))",
    )
    cfg: bool = Field(
        True,
        description="train with classifier-free guidance at sampling.guidance_scale, as the rollouts sample; "
        "false: CFG-free training, rollouts and training at guidance 1 (the conditional branch only); "
        "evaluation keeps sampling.guidance_scale",
    )
    same_latent: bool = Field(
        False,
        description="the images of a group start from the same noise x_T (their first image's seed) and differ "
        "by their SDE noise only (the authors' sample.same_latent, default False)",
    )
    global_std: bool = Field(
        False,
        description="divide the advantages by the std of every reward of the round instead of the group's "
        "(the paper's formula: the group's; the authors' SD3 configs set global_std True)",
    )

    def train_steps(self, sections: Sections) -> int | None:
        """T of the training rollouts: `steps`, else sampling.steps."""
        return self.steps if self.steps is not None else _steps(sections)

    def check(self, sections: Sections) -> list[str]:
        problems = []
        steps = self.train_steps(sections)
        where = "method.steps" if self.steps is not None else "sampling.steps"
        if steps is not None and self.window is None and steps < 2:
            problems.append(
                f"{where}: Flow-GRPO needs T >= 2 (it trains on every step but the last; T={steps})"
            )
        if self.window_range is not None and self.window is None:
            problems.append("method.window_range: only used with method.window (Flow-GRPO-Fast)")
        if steps is not None and self.window is not None:
            low, high = self.window_range if self.window_range is not None else (0, steps)
            if not 0 <= low < high <= steps:
                problems.append(
                    f"method.window_range: [{low}, {high}] must satisfy 0 <= low < high <= T = {steps}"
                )
            elif self.window > high - low:
                problems.append(
                    f"method.window: {self.window} steps do not fit in window_range [{low}, {high}]"
                )
        images = _images_per_step(sections)
        if images is not None and images % self.group_size:
            problems.append(
                f"method.group_size: {self.group_size} images per prompt must divide the {images} images of "
                "an optimizer step (scaling.num_workers x train.batch_size x train.grad_accum)"
            )
        return problems
