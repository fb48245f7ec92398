"""The experiment schema: one pydantic model per YAML section, unknown keys rejected.

Defaults follow the AlignProp paper's code for Stable Diffusion 1.5 (mihirp1998/AlignProp,
config/align_prop.py and main.py) unless a comment says otherwise.

Validating a model directly (``ExperimentConfig.model_validate(d)``) checks types and ranges only. Paths are
resolved and checked, and cross-field rules (K <= T, intervals, reward names) applied, by
``parse_experiment`` / ``load_experiment``, which pass a ``PathContext`` in the validation context.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from alignprop_ray.config import paths as _paths

PATHS_KEY = "paths"  # validation-context key holding a PathContext


def _no_bool(value: Any) -> Any:
    if isinstance(value, bool):  # YAML `yes`/`true` must not become 1
        raise ValueError(f"must be a number, not a boolean (got {value!r})")
    return value


Int = Annotated[int, BeforeValidator(_no_bool)]
Float = Annotated[float, BeforeValidator(_no_bool)]
Dtype = Literal["float32", "float16", "bfloat16"]


def _context_paths(info: ValidationInfo) -> _paths.PathContext | None:
    return (info.context or {}).get(PATHS_KEY)


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
    target_modules: list[str] = Field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"],
        min_length=1,
        description="UNet module names (peft target_modules) that get an adapter: the attention projections",
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
    pretrained: str = Field(
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        description="'tiny' (offline test model), a hub id (org/name) or a local diffusers pipeline directory",
    )
    resolution: Annotated[Int, Field(gt=0, multiple_of=8)] | None = Field(
        None,
        description="image side in pixels, a multiple of 8 (the VAE's downsampling); default: the model's "
        "native size (512 for SD 1.5)",
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

    @field_validator("pretrained")
    @classmethod
    def _resolve_pretrained(cls, value: str, info: ValidationInfo) -> str:
        context = _context_paths(info)
        return _paths.resolve_pretrained(value, context) if context else value


class SamplingConfig(Section):
    steps: Int = Field(50, ge=1, le=1000, description="DDIM steps T per image (the paper: 50)")
    # The paper's code calls DDIMScheduler.step without eta, i.e. eta=0: deterministic DDIM. (TRL's AlignProp
    # port defaults to 1.0; ddpo-pytorch needs 1.0 for log-probs, which reward backprop does not.)
    eta: Float = Field(0.0, ge=0, le=1, description="DDIM eta: 0 deterministic, 1 DDPM-like noise")
    guidance_scale: Float = Field(7.5, ge=0, description="classifier-free guidance weight (1 = no guidance)")
    negative_prompt: str = Field("", description="prompt of the unconditional branch of guidance")


class PromptsConfig(Section):
    train: str = Field("animals", description="training prompts: a built-in set name or a text file path")
    eval: str = Field(
        "eval_animals", description="held-out evaluation prompts: a built-in set name or a file"
    )
    eval_seeds: Int = Field(
        4,
        ge=2,
        description="images per eval prompt, with fixed seeds; >= 2 so within-prompt diversity is defined",
    )

    @field_validator("train", "eval")
    @classmethod
    def _resolve(cls, value: str, info: ValidationInfo) -> str:
        context = _context_paths(info)
        return _paths.resolve_prompts(value, context) if context else value


class TrainConfig(Section):
    steps: Int = Field(100, ge=1, description="optimizer steps")
    # 2 images per GPU per pass: the paper's aesthetic run on 48 GB GPUs (per_gpu_capacity=2).
    batch_size: Int = Field(2, ge=1, description="images generated per worker per forward/backward pass")
    grad_accum: Int = Field(1, ge=1, description="passes accumulated per optimizer step (per worker)")
    lr: Float = Field(1e-3, gt=0, description="AdamW learning rate of the LoRA parameters (the paper: 1e-3)")
    weight_decay: Float = Field(
        0.1, ge=0, description="AdamW weight decay (the paper's aesthetic/HPS configs: 0.1)"
    )
    max_grad_norm: Float | None = Field(
        5.0,
        gt=0,
        description="clip the global LoRA gradient norm to this (the paper: 5.0); null: no clipping",
    )
    seed: Int = Field(42, description="base random seed (the paper: 42)")
    eval_every: Int = Field(
        10, ge=1, description="evaluate on the eval prompts every this many optimizer steps"
    )
    checkpoint_every: Int = Field(
        10, ge=1, description="report a Ray checkpoint every this many optimizer steps"
    )
    max_nonfinite_in_row: Int = Field(
        3,
        ge=1,
        description="fail the run after this many NaN/inf losses in a row (each one skips its update)",
    )


class ScalingConfig(Section):
    num_workers: Int = Field(1, ge=1, description="Ray Train workers (data-parallel replicas, one GPU each)")
    # True: the defaults describe an SD 1.5 run; CPU configs (sweeps/tiny.yaml) say use_gpu: false.
    use_gpu: bool = Field(True, description="one GPU per worker")
    resources_per_worker: dict[str, Annotated[Float, Field(ge=0)]] | None = Field(
        None, description="Ray resources per worker, e.g. {CPU: 4, GPU: 1}; default: Ray's (1 CPU, +1 GPU)"
    )


class TrackingConfig(Section):
    uri: str = Field(
        "sqlite:///mlflow.db",
        description="MLflow tracking URI: sqlite:///FILE (relative to the cwd; one machine only), "
        "http(s)://HOST for a shared server, or databricks. Env: ALIGNPROP_TRACKING_URI",
    )
    experiment: str = Field("alignprop", min_length=1, description="MLflow experiment name")

    @field_validator("uri")
    @classmethod
    def _resolve_uri(cls, value: str, info: ValidationInfo) -> str:
        context = _context_paths(info)
        if context is None:
            _paths.check_tracking_uri(value)
            return value
        return _paths.resolve_tracking_uri(value, context)


class StorageConfig(Section):
    path: str = Field(
        "./runs",
        description="Ray storage_path for checkpoints: a local folder (relative to the cwd) or s3:// / gs:// "
        "(shared storage is needed on a multi-node cluster). Env: ALIGNPROP_STORAGE_PATH",
    )

    @field_validator("path")
    @classmethod
    def _resolve_path(cls, value: str, info: ValidationInfo) -> str:
        context = _context_paths(info)
        if context is None:
            _paths.check_storage_path(value)
            return value
        return _paths.resolve_storage_path(value, context)


class FailureConfig(Section):
    max_failures: Int = Field(
        2, ge=-1, description="worker-group restarts from the last checkpoint; -1: unlimited"
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
    # Default (null): uniform:0:T, the paper's randomized truncation over the whole chain, resolved on load.
    truncation: Any = Field(
        None,
        description="distribution of K, the trailing DDIM steps that carry gradient: 'fixed:K', "
        "'uniform:LOW:HIGH', 'normal:MEAN:STD', 'full', or a mapping {kind: ...}. Default: uniform:0:T",
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

    def truncation_spec(self):
        """The parsed truncation (``alignprop_ray.engine.truncation.Truncation``)."""
        from alignprop_ray.engine.truncation import parse_truncation

        spec = self.truncation if self.truncation is not None else f"uniform:0:{self.sampling.steps}"
        return parse_truncation(spec)

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain YAML/JSON-able data (absolute paths, defaults filled in)."""
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)

    def flat_params(self) -> dict[str, str]:
        """Dotted keys -> strings, for MLflow params; truncation in its canonical short form."""
        data = self.to_dict()
        data["truncation"] = self.truncation_spec().describe()
        return dict(_flatten(data))


def _flatten(data: Any, prefix: str = ""):
    if isinstance(data, dict) and data:
        for key, value in data.items():
            yield from _flatten(value, f"{prefix}{key}.")
        return
    yield prefix[:-1], _param_text(data)


def _param_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)
