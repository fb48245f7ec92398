"""The experiment schema: one pydantic model per YAML section, unknown keys rejected.

Defaults follow the AlignProp paper's code for Stable Diffusion 1.5 (mihirp1998/AlignProp,
config/align_prop.py and main.py) unless a comment says otherwise.

Validating a model directly (``ExperimentConfig.model_validate(d)``) checks types and ranges only. Paths are
resolved and checked, and cross-field rules (K <= T, intervals, reward names) applied, by
``parse_experiment`` / ``load_experiment``, which pass a ``PathContext`` in the validation context.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Callable
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from alignprop_ray.config import paths as _paths
from alignprop_ray.config.aliases import move_aliases
from alignprop_ray.engine.families.registry import (
    AUTO,
    FAMILIES,
    TINY_FAMILY,
    check_family,
    family_row,
    local_model_index,
)
from alignprop_ray.engine.methods.configs import MethodConfig
from alignprop_ray.engine.methods.registry import (
    DEFAULT_METHOD,
    METHODS,
    MethodRow,
    get_method,
    key_aliases,
    method_rows,
)
from alignprop_ray.fields import Float, Int
from alignprop_ray.presets import TINY

PATHS_KEY = "paths"  # validation-context key holding a PathContext


Dtype = Literal["float32", "float16", "bfloat16"]


def _activation_budget(value: Any) -> float | str | None:
    """model.activation_budget_mb: MiB >= 0, `auto` or null, with one message for anything else."""
    if value is None or value == "auto":
        return value
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0:
        return float(value)
    raise ValueError(f"must be a number of MiB >= 0, auto or null (got {value!r})")


ActivationBudget = Annotated[
    float | str | None,
    PlainValidator(_activation_budget),
    WithJsonSchema({"anyOf": [{"type": "number", "minimum": 0}, {"const": "auto"}, {"type": "null"}]}),
]


def _context_paths(info: ValidationInfo) -> _paths.PathContext | None:
    return (info.context or {}).get(PATHS_KEY)


def _resolved(
    resolve: Callable[[str, _paths.PathContext], str], check: Callable[[str], None] | None = None
) -> AfterValidator:
    """A path or URI field's validator: with a PathContext in the validation context (`parse_experiment`),
    `resolve` checks the value and makes it absolute; without one (a resolved config read again, e.g. on a
    worker), `check` alone, if any, applies. Either raises ValueError without the field's name."""

    def validate(value: str, info: ValidationInfo) -> str:
        context = _context_paths(info)
        if context is not None:
            return resolve(value, context)
        if check is not None:
            check(value)
        return value

    return AfterValidator(validate)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class LoraConfig(Section):
    # Rank 4: the paper's LoRA (diffusers LoRAAttnProcessor default rank) on the attention projections.
    rank: Int = Field(4, ge=1, description="LoRA rank r of each adapted projection")
    alpha: Float | None = Field(
        None,
        gt=0,
        description="LoRA alpha; the update is scaled by alpha / rank. Default: equal to rank (scale 1, as the "
        "paper's LoRA, which had no alpha)",
    )
    # null: the model family's attention projections, listed once in its row (engine/families/registry.py)
    target_modules: list[str] | None = Field(
        None,
        min_length=1,
        description="denoiser module names (peft target_modules) that get an adapter; default (null): the "
        "family's attention projections (docs/model_families.md)",
    )
    # gaussian: diffusers' LoRA training scripts; B starts at zero either way, so step 0 is the base model.
    init: Literal["gaussian", "default"] = Field(
        "gaussian", description="peft init of the A factor: gaussian or default (Kaiming uniform)"
    )

    @model_validator(mode="after")
    def _alpha_defaults_to_rank(self) -> LoraConfig:
        if self.alpha is None:
            self.alpha = float(self.rank)
        return self


class ModelConfig(Section):
    pretrained: Annotated[str, _resolved(_paths.resolve_pretrained)] = Field(
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        description="'tiny' (offline test model of the family), a hub id (org/name) or a local diffusers "
        "pipeline directory",
    )
    # Kept as written (auto is not replaced by what was detected): whether a hub model is in the local cache
    # must not change the logged params a resumed run is compared against.
    family: Literal[(AUTO, *FAMILIES)] = Field(
        AUTO,
        description="model family: sd (SD 1.x/2.x), sdxl, sd3 (SD3/3.5), flux (FLUX.1); auto: read from the "
        "pipeline's model_index.json (tiny: sd)",
    )
    resolution: Annotated[Int, Field(gt=0, multiple_of=8)] | None = Field(
        None,
        description="image side in pixels, a multiple of 8 (the VAE's downsampling; 16 for sd3 and flux, "
        "whose transformers take 2x2 latent patches); default: the model's native size (512 for SD 1.5, 1024 "
        "for SDXL, SD3 and FLUX.1)",
    )
    # float32 by default so every model works everywhere (CPU too, and bit-comparable with diffusers); the paper
    # ran the frozen base in fp16: set float16/bfloat16 on GPUs (sweeps/sd15_aesthetic.yaml does).
    dtype: Dtype = Field(
        "float32", description="dtype of the frozen base (UNet, VAE, text encoder); LoRA is fp32"
    )
    lora: LoraConfig = Field(default_factory=LoraConfig, description="the trained LoRA adapter on the UNet")
    gradient_checkpointing: bool = Field(
        True,
        description="checkpoint each UNet call that carries gradient (memory O(latents x K), not O(activations x K))",
    )
    # Both are speed levers that leave the math alone: compile changes kernels (same images within fp
    # tolerance), the budget only which calls are recomputed in backward (the gradient is the same).
    compile: bool = Field(
        False,
        description="wrap the denoiser (UNet/transformer) in torch.compile: compiled once per worker on the "
        "first step (minutes), cached on disk across restarts by torch's inductor cache; pays off on long runs",
    )
    activation_budget_mb: ActivationBudget = Field(
        None,
        description="MiB of device memory for the activations of gradient-carrying denoiser calls: the last "
        "calls whose activations fit are kept (no recompute in backward), the others checkpointed, decided "
        "per batch from K; a call's size is measured once per run by a probe. auto: free device memory at the "
        "probe less a margin (10% of total). null: checkpoint them all (needs gradient_checkpointing: true)",
    )

    @field_validator("family")
    @classmethod
    def _family_matches_the_pipeline(cls, value: str, info: ValidationInfo) -> str:
        """An explicit family must be the one in the pipeline's model_index.json (when it is on this machine)."""
        pretrained = info.data.get("pretrained")
        if pretrained and pretrained != TINY:
            check_family(value, pretrained, local_model_index(pretrained))
        return value

    @field_validator("dtype")
    @classmethod
    def _a_dtype_the_family_takes(cls, value: str, info: ValidationInfo) -> str:
        """The family's row may refuse a dtype (SDXL: float16), when the family is known here."""
        pretrained, family = info.data.get("pretrained"), info.data.get("family")
        if family is None or pretrained is None:
            return value
        index = local_model_index(pretrained) if pretrained != TINY else None
        used_as = check_family(family, pretrained, index)
        if used_as == AUTO and pretrained == TINY:
            used_as = TINY_FAMILY
        why = family_row(used_as).refused_dtypes.get(value) if used_as != AUTO else None
        if why:
            raise ValueError(f"{value} with an {used_as.upper()} model: {why}")
        return value


class SamplingConfig(Section):
    steps: Int = Field(50, ge=1, le=1000, description="DDIM steps T per image (the paper: 50)")
    # The paper's code calls DDIMScheduler.step without eta, i.e. eta=0: deterministic DDIM. (TRL's AlignProp
    # port defaults to 1.0; ddpo-pytorch needs 1.0 for log-probs, which reward backprop does not.)
    eta: Float = Field(0.0, ge=0, le=1, description="DDIM eta: 0 deterministic, 1 DDPM-like noise")
    guidance_scale: Float = Field(
        7.5,
        ge=0,
        description="classifier-free guidance weight (1 = no guidance). Unset: the method's reference "
        "(AlignProp: 7.5, DDPO: 5.0, ReFL: 1, its code has none)",
    )
    negative_prompt: str = Field("", description="prompt of the unconditional branch of guidance")


# --- training methods: `method: NAME`, or `method: {name: NAME, <its settings>}` ---------------------------
# One mapping per method (rather than a section per method) so that a sweep's grid over `method` carries each
# method's settings with it, and a setting of another method is an unknown key, not a silent no-op. Each
# method's settings are its config class (engine/methods/configs.py), listed in its row of the method
# registry (engine/methods/registry.py) with its defaults from the method's reference code; docs/methods.md.


def parse_method(value: Any, info: ValidationInfo) -> MethodConfig:
    """`ddpo` or `{name: ddpo, clip_range: 1.0e-3}` -> the method's config; every problem one pydantic error.
    The validation context (a config file's PathContext) reaches the method's own validators (its paths)."""
    if isinstance(value, MethodConfig):
        return value
    fields = {"name": value} if isinstance(value, str) else value
    if not isinstance(fields, dict):
        raise ValueError(f"expected a method name or {{name: ..., <settings>}}, got {value!r}")
    name = fields.get("name")
    if name is None:
        raise ValueError(
            f"name the method with its settings, e.g. {{name: draft, k: 2}} (one of {', '.join(METHODS)})"
        )
    row = get_method(str(name))
    if row is None:
        close = difflib.get_close_matches(str(name), METHODS, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise ValueError(
            f"unknown method {name!r}{hint} (valid: {', '.join(METHODS)}, or a plugin module:attr)"
        )
    known = {key: v for key, v in fields.items() if key == "name" or key in row.settings}
    problems = [
        {"type": "value_error", "loc": (key,), "input": v, "ctx": {"error": _not_a_setting(row, key)}}
        for key, v in fields.items()
        if key not in known
    ]
    try:
        parsed = TypeAdapter(row.config).validate_python({**known, "name": str(name)}, context=info.context)
    except ValidationError as err:
        problems += [{k: e[k] for k in ("type", "loc", "input", "ctx") if k in e} for e in err.errors()]
    if problems:
        raise ValidationError.from_exception_data("method", problems)
    return parsed


def _not_a_setting(row: MethodRow, key: str) -> ValueError:
    owners = [other.name for other in method_rows() if key in other.settings]
    where = f" (a setting of {', '.join(owners)})" if owners else ""
    own = ", ".join(row.settings) or "none"
    return ValueError(f"not a setting of method {row.name}{where}; {row.name}'s settings: {own}")


def _dump_method(config: MethodConfig) -> dict:
    return TypeAdapter(type(config)).dump_python(config, mode="json")


MethodField = Annotated[
    Any,  # a MethodConfig; `Any` keeps the field free-form for dotted overrides (`--set method.k=2`)
    PlainValidator(parse_method),
    PlainSerializer(_dump_method, return_type=dict),
    WithJsonSchema({"anyOf": [{"type": "string", "enum": list(METHODS)}, {"type": "object"}]}),
]


PromptSpec = Annotated[str, _resolved(_paths.resolve_prompts)]


class PromptsConfig(Section):
    train: PromptSpec = Field(
        "animals", description="training prompts: a built-in set name or a text file path"
    )
    eval: PromptSpec = Field(
        "eval_animals", description="held-out evaluation prompts: a built-in set name or a file"
    )
    eval_seeds: Int = Field(
        4,
        ge=2,
        description="images per eval prompt, each with its own fixed seed (image j of prompt i: 10000 + i x "
        "eval_seeds + j, the same at every evaluation); >= 2 so within-prompt diversity is defined",
    )


class TrainConfig(Section):
    steps: Int = Field(100, ge=1, description="optimizer steps")
    # 2 images per GPU per pass: the paper's aesthetic run on 48 GB GPUs (per_gpu_capacity=2).
    batch_size: Int = Field(2, ge=1, description="images generated per worker per forward/backward pass")
    grad_accum: Int = Field(1, ge=1, description="passes accumulated per optimizer step (per worker)")
    lr: Float = Field(
        1e-3,
        gt=0,
        description="AdamW learning rate of the LoRA parameters. Unset: the method's reference (docs/methods.md; "
        "AlignProp: 1e-3, DDPO: 3e-4, ReFL: 1e-5)",
    )
    lr_scale: Float = Field(
        1.0,
        gt=0,
        description="the optimizer's lr is lr x lr_scale: a relative axis, so one sweep can search {0.5, 1, 2} x "
        "each method's own reference lr (leave lr unset)",
    )
    lr_schedule: Literal["constant", "linear_warmup", "cosine"] = Field(
        "constant",
        description="constant (the paper); linear_warmup: lr x (step + 1) / warmup_steps, then lr; cosine: the "
        "same warmup, then a half cosine down to 0 at the last step. Stepped once per optimizer step",
    )
    warmup_steps: Int = Field(
        0, ge=0, description="optimizer steps of linear warm-up (linear_warmup, cosine)"
    )
    weight_decay: Float = Field(
        0.1,
        ge=0,
        description="AdamW weight decay. Unset: the method's reference (AlignProp's aesthetic/HPS configs: 0.1; "
        "DDPO: 1e-4; ReFL: 1e-2)",
    )
    adam_betas: tuple[Float, Float] = Field(
        (0.9, 0.999), description="AdamW (beta1, beta2). Unset: the method's reference (all: 0.9, 0.999)"
    )
    adam_eps: Float = Field(1e-8, gt=0, description="AdamW epsilon (the paper's code: 1e-8, torch's default)")
    # The official code backpropagates loss_coeff x loss (0.01 in its aesthetic and HPS configs) and clips that
    # gradient at 5.0. Adam cancels a constant loss scale, but not the clip: with the scale at 1 the same 5.0
    # would clip 100x tighter. docs/fidelity.md.
    loss_scale: Float = Field(
        0.01,
        gt=0,
        description="the objective (minus the reward mixture) is multiplied by this before backward, so "
        "max_grad_norm and adam_eps act on the gradient of loss_scale x objective; train/loss logs the "
        "unscaled objective. Unset: the method's reference (AlignProp's code: loss_coeff 0.01; DDPO: 1; ReFL: "
        "grad_scale 1e-3)",
    )
    max_grad_norm: Float | None = Field(
        5.0,
        gt=0,
        description="clip the global norm of the LoRA gradient of loss_scale x objective to this (train/grad_norm "
        "is that norm before clipping); null: no clipping. Unset: the method's reference (AlignProp's code: 5.0 "
        "with loss_scale 0.01, a clip at 500 on the gradient of the unscaled objective; DDPO, ReFL: 1.0)",
    )
    seed: Int = Field(42, description="base random seed (the paper: 42)")
    eval_every: Int = Field(
        10,
        ge=1,
        description="evaluate on the eval prompts every this many optimizer steps, and at the last step",
    )
    checkpoint_every: Int = Field(
        10, ge=1, description="report a Ray checkpoint every this many optimizer steps, and at the last step"
    )
    max_wall_seconds: Float | None = Field(
        None,
        gt=0,
        description="end training at the first step after which perf/wall_seconds (seconds spent in training "
        "steps; evaluation, logging and checkpoints excluded; kept across resumes) reaches this; that step "
        "evaluates and checkpoints like the last one. null: train.steps alone. Gives every method the same "
        "compute budget in a comparison (sweeps/methods.yaml)",
    )
    max_nonfinite_in_row: Int = Field(
        3,
        ge=1,
        description="fail the run after this many NaN/inf losses in a row (each one skips its update)",
    )
    # One weight for both KL-to-base terms: DPOK's penalty on the reward-gradient methods (issue 25, section
    # 5) and Flow-GRPO's KL to the base policy (issue 26). The base model is the denoiser, adapter disabled.
    kl_weight: Float = Field(
        0.0,
        ge=0,
        description="weight of a KL-to-base term; 0: off. alignprop, draft, refl: the squared difference of "
        "the adapted and the base denoiser's predictions along the sampled steps (DPOK's regularizer); "
        "flow_grpo: the KL of its Gaussian SDE steps to the base model's (the same quantity over the step "
        "variance). The base model is the same denoiser with the LoRA adapter disabled",
    )
    # Evaluation and every saved adapter (a checkpoint's, the run's logged one that `--register` takes) hold
    # the average; training continues from the weights, which the checkpoint's training state keeps.
    ema_decay: Float | None = Field(
        None,
        gt=0,
        lt=1,
        description="EMA of the LoRA weights: after each update ema <- d ema + (1 - d) weights, from the "
        "initial adapter (engine/regularizers.py); evaluation and the saved adapter use the EMA. null: off",
    )


class ScalingConfig(Section):
    num_workers: Int = Field(1, ge=1, description="Ray Train workers (data-parallel replicas, one GPU each)")
    # True: the defaults describe an SD 1.5 run; CPU configs (sweeps/tiny.yaml) say use_gpu: false.
    use_gpu: bool = Field(True, description="one GPU per worker")
    resources_per_worker: dict[str, Annotated[Float, Field(ge=0)]] | None = Field(
        None, description="Ray resources per worker, e.g. {CPU: 4, GPU: 1}; default: Ray's (1 CPU, +1 GPU)"
    )
    # What a config's memory assumptions (per-GPU batch, K) need, said where Ray can enforce it.
    accelerator_type: str | None = Field(
        None,
        min_length=1,
        description="GPU model every worker needs, as Ray names it (A10G, L40S, A100-80G, ...): workers "
        "only go to nodes advertising the resource accelerator_type:<name>; None: any GPU",
    )


class TrackingConfig(Section):
    uri: Annotated[str, _resolved(_paths.resolve_tracking_uri, _paths.check_tracking_uri)] = Field(
        "sqlite:///mlflow.db",
        description="MLflow tracking URI: sqlite:///FILE (relative to the cwd; one machine only), "
        "http(s)://HOST for a shared server, or databricks. Precedence: --set, this file, "
        "ALIGNPROP_TRACKING_URI, MLFLOW_TRACKING_URI, this default",
    )
    experiment: str = Field("alignprop", min_length=1, description="MLflow experiment name")
    # 30 minutes: a tracking server restarted by hand or by its supervisor is back well within it, and
    # training keeps going meanwhile (rank 0 queues its logs); the issue's floor is a 5-minute outage.
    outage_limit_s: Float = Field(
        1800.0,
        gt=0,
        description="seconds the MLflow store may keep failing before the run stops with an error; until "
        "then training continues and rank 0 queues its metrics, images and tables, sent when the store is "
        "back (RELIABILITY.md)",
    )


class StorageConfig(Section):
    path: Annotated[str, _resolved(_paths.resolve_storage_path, _paths.check_storage_path)] = Field(
        "./runs",
        description="Ray storage_path for checkpoints: a local folder (relative to the cwd) or s3:// / gs:// "
        "(shared storage is needed on a multi-node cluster). Env: ALIGNPROP_STORAGE_PATH",
    )


class DiversityConfig(Section):
    """The feature space of the eval diversity metrics: fixed here, never taken from the training reward, so
    runs trained on different rewards report comparable diversity."""

    space: Literal["pixels", "clip"] = Field(
        "pixels",
        description="pixels: images area-downsampled to 32x32 (no weights); clip: unit image embeddings of the "
        "open_clip model `arch` with weights `path`",
    )
    arch: str = Field(
        "ViT-L-14-quickgelu", description="open_clip architecture (space: clip), or `tiny` for tests"
    )
    path: str | None = Field(
        None,
        description="open_clip checkpoint (space: clip): a path or hf:// ref, e.g. "
        "hf://timm/vit_large_patch14_clip_224.openai/open_clip_model.safetensors; not with arch: tiny",
    )
    seed: Int = Field(0, description="random init with arch: tiny")


class BaseFidelityConfig(DiversityConfig):
    """eval/base_fidelity: how close each eval image stays to the base model's image of the same prompt and
    seed (the step-0 evaluation), 1 - the diversity metrics' distance in this space. A drift measure: it
    falls as training moves away from the base model, whether for better or worse; not a quality measure,
    not a reward."""


class EvalConfig(Section):
    """What each evaluation measures besides the trained reward (prompts and seeds: the prompts: section)."""

    # Reward over-optimization shows as a trained reward that rises while rewards it never saw fall.
    rewards: dict[str, Any] = Field(
        default_factory=dict,
        description="held-out rewards: evaluated on the eval images, never trained on, logged as "
        "eval/heldout/<name> (the raw value); written like reward: terms without weight/objective/target, "
        "e.g. {hpsv2: {path: ...}, pickscore: {path: ...}}",
    )
    diversity: DiversityConfig = Field(
        default_factory=DiversityConfig,
        description="feature space of eval/diversity, eval/diversity_across_prompts, eval/vendi and "
        "eval/vendi_across_prompts",
    )
    base_fidelity: BaseFidelityConfig | None = Field(
        None,
        description="log eval/base_fidelity, the similarity of each eval image to the base model's (step 0) "
        "in this feature space ({space: pixels} or a CLIP model): a drift measure, not a quality measure",
    )


class FailureConfig(Section):
    max_failures: Int = Field(
        2, ge=-1, description="worker-group restarts from the last checkpoint; -1: unlimited"
    )
    # 15 minutes: time for an autoscaler to replace a lost spot node. Ray Train alone would wait forever.
    wait_for_workers_s: Float = Field(
        900.0,
        gt=0,
        description="seconds a run waits for the cluster to have room for all its workers again when they "
        "restart after a failure (a lost node not yet replaced); then it fails, saying how to resume",
    )
    # No limit by default: a sweep with more trials than the cluster holds at once queues them; a trial
    # that has no room yet waits (visibly), it does not fail (alignprop_ray/train/placement.py).
    wait_for_room_s: Float | None = Field(
        None,
        gt=0,
        description="seconds a run waits for room for its workers when they first start (trials queued "
        "behind others, nodes the autoscaler is adding); null: no limit",
    )


class ExperimentConfig(Section):
    """One training run. Sections mirror the YAML file; see each field's description for units."""

    name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="run name (MLflow run and storage folder); rerunning with the same name resumes",
    )
    model: ModelConfig = Field(default_factory=ModelConfig, description="base model and LoRA adapter")
    sampling: SamplingConfig = Field(
        default_factory=SamplingConfig, description="DDIM sampling with guidance"
    )
    method: MethodField = Field(
        DEFAULT_METHOD,
        description=f"training method: {', '.join(METHODS)}, or {{name: ..., <its settings>}} "
        "(e.g. {name: draft, lv_samples: 2}); docs/methods.md. AlignProp's settings `truncation` and `k0` may "
        "also be written as the top-level `truncation:` and `train.k0`",
    )
    reward: dict[str, Any] = Field(
        description="reward mixture, reward name -> weight or settings, e.g. {aesthetic: 1.0, hpsv2: 0.5}"
    )
    prompts: PromptsConfig = Field(
        default_factory=PromptsConfig, description="training and evaluation prompts"
    )
    train: TrainConfig = Field(
        default_factory=TrainConfig, description="optimization, evaluation, checkpoints"
    )
    eval: EvalConfig = Field(
        default_factory=EvalConfig, description="held-out rewards and the diversity feature space"
    )
    scaling: ScalingConfig = Field(
        default_factory=ScalingConfig, description="Ray Train workers and resources"
    )
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow tracking")
    storage: StorageConfig = Field(default_factory=StorageConfig, description="where Ray keeps checkpoints")
    failure: FailureConfig = Field(default_factory=FailureConfig, description="restarts after a worker fails")

    @property
    def images_per_step(self) -> int:
        """Images per optimizer step: workers x per-worker batch x accumulation."""
        return self.scaling.num_workers * self.train.batch_size * self.train.grad_accum

    @model_validator(mode="before")
    @classmethod
    def _older_keys(cls, data: Any) -> Any:
        """`truncation:` and `train.k0` are AlignProp's settings, moved into `method:` (`move_aliases`)."""
        if not isinstance(data, dict):
            return data
        data, problems, _ = move_aliases(data)
        if problems:
            raise ValueError("; ".join(problems))
        return data

    @model_validator(mode="after")
    def _method_defaults(self) -> ExperimentConfig:
        """The method's reference settings where the experiment leaves the field unset (its row's
        `reference`: lr, Adam, loss scale, clip, guidance), then its defaults that depend on other sections
        (AlignProp: truncation uniform:0:T; ReFL: its step range [3T/4, T-1]). The resolved values are the
        config's, so `to_dict` and the MLflow params hold what the run uses."""
        row = get_method(self.method.name)
        for key, value in (row.reference.applied() if row is not None else {}).items():
            section_name, name = key.split(".")
            section = getattr(self, section_name)
            if name not in section.model_fields_set:
                setattr(self, section_name, section.model_copy(update={name: value}))
        self.method = self.method.resolve(self.sections())
        return self

    @classmethod
    def key_aliases(cls) -> dict[str, str]:
        """Older keys still accepted -> where their setting lives now (`truncation` -> `method.truncation`)."""
        return key_aliases()

    def sections(self) -> dict[str, Any]:
        """Section name -> its validated value (what the methods' checks and defaults read)."""
        return {name: getattr(self, name) for name in type(self).model_fields}

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain YAML/JSON-able data (absolute paths, defaults filled in)."""
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)

    def flat_params(self) -> dict[str, str]:
        """Dotted keys -> strings, for MLflow params; truncation in its canonical short form. A method setting
        that moved keeps its older key as its name (`truncation`, `train.k0`), so runs logged before still
        resume."""
        params = dict(_flatten(self.to_dict()))
        row = get_method(self.method.name)
        for old, setting in (row.aliases if row else {}).items():
            params[old] = params.pop(f"method.{setting}")
        return params


def _flatten(data: Any, prefix: str = ""):
    if isinstance(data, dict) and data:
        for key, value in data.items():
            yield from _flatten(value, f"{prefix}{key}.")
        return
    yield prefix[:-1], _param_text(data)


def _param_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)
