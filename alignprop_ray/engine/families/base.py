"""The model-family interface, and the loaded parts of one pipeline.

The sampler (engine/sampler.py) is one loop for every family. It asks the family only what differs
between models: how prompts become the denoiser's conditioning, how the denoiser is called, how initial
noise and model inputs are scaled for its scheduler, how latents map back to the VAE, which modules get
LoRA, and which diffusers pipeline class reads and writes its LoRA files. The scheduler step itself is
diffusers' own `scheduler.step` (engine/schedulers.py), which is differentiable for DDIM, Euler and
flow-matching Euler alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from alignprop_ray.engine.families.registry import FamilyRow


@dataclass(frozen=True)
class Conditioning:
    """The denoiser's inputs besides latents and t, for one batch.

    Under guidance (`guided`) every tensor is stacked [unconditional; conditional] along the batch, as
    diffusers' pipelines stack them; the keys are the denoiser's keyword arguments (family-specific).
    """

    tensors: dict[str, torch.Tensor]
    guided: bool


@dataclass
class DiffusionParts:
    """The pieces of one diffusers pipeline used for sampling and training, and the family they form."""

    family: Family
    tokenizers: list[Any]  # one per text encoder, in the pipeline's order
    text_encoders: list[torch.nn.Module]
    denoiser: torch.nn.Module  # UNet2DConditionModel (sd, sdxl), SD3/FluxTransformer2DModel (sd3, flux)
    vae: torch.nn.Module
    scheduler: Any  # a diffusers scheduler the family samples with
    pipeline_config: dict[str, Any] = field(default_factory=dict)  # model_index.json's own settings

    @property
    def text_encoder(self) -> torch.nn.Module:
        return self.text_encoders[0]

    @property
    def tokenizer(self) -> Any:
        return self.tokenizers[0]

    @property
    def modules(self) -> list[torch.nn.Module]:
        return [*self.text_encoders, self.denoiser, self.vae]

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The frozen base's dtype (LoRA parameters stay float32)."""
        return self.denoiser.dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_resolution(self) -> int:
        """The pipeline's default image side (its `height`/`width` when none is given)."""
        return self.family.native_resolution(self)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> DiffusionParts:
        for module in self.modules:
            module.to(device)
            if dtype is not None and module.dtype != dtype:
                if getattr(module, "_keep_in_fp32_modules", None):
                    module.to(dtype=dtype)  # diffusers keeps the named modules in fp32 (and warns)
                else:  # diffusers warns on every cast, even for classes that keep nothing in fp32
                    torch.nn.Module.to(module, dtype=dtype)
        return self

    def freeze(self) -> DiffusionParts:
        for module in self.modules:
            module.requires_grad_(False)
            module.eval()
        return self


class Family:
    """What one model family supplies in code; its data (pipeline class, schedulers, LoRA targets, tiny
    preset) is its row in engine/families/registry.py. Subclasses implement the abstract methods."""

    # Classifier-free guidance: with a guidance scale above 1 the denoiser runs on [uncond; cond] and the
    # sampler mixes the two. A guidance-distilled family (FLUX.1) samples without it: the scale is an input
    # of the denoiser instead (`guidance_input`).
    classifier_free_guidance: ClassVar[bool] = True

    def __init__(self, row: FamilyRow):
        self.row = row

    @property
    def name(self) -> str:
        return self.row.name

    @property
    def pipeline_class(self) -> str:
        """The diffusers pipeline (model_index.json `_class_name`)."""
        return self.row.pipeline_class

    @property
    def denoiser_name(self) -> str:
        """unet | transformer: the denoiser's subfolder, and the prefix of its LoRA keys."""
        return self.row.denoiser

    @property
    def schedulers(self) -> tuple[str, ...]:
        """Scheduler classes sampled with as shipped; any other is replaced by the first."""
        return self.row.schedulers

    @property
    def lora_targets(self) -> tuple[str, ...]:
        """Default LoRA target modules (peft names)."""
        return self.row.lora_targets

    def tiny_scheduler(self):
        """The tiny preset's scheduler, built from its row."""
        import diffusers

        name, config = self.row.tiny_scheduler
        return getattr(diffusers, name)(**config)

    def __repr__(self) -> str:
        return f"<family {self.name}>"

    # --- building and loading ----------------------------------------------------------------------

    def load(self, source: str, dtype: torch.dtype, model_index: dict) -> DiffusionParts:
        """The parts of the pipeline at `source` (a local directory or a hub id), in `dtype`."""
        raise NotImplementedError

    def build_tiny(self, seed: int) -> DiffusionParts:
        """A random-init miniature of the family (deterministic in `seed`), small enough for CPU tests."""
        raise NotImplementedError

    def pipeline(self, parts: DiffusionParts):
        """The diffusers pipeline made of `parts` (to write a pipeline directory)."""
        raise NotImplementedError

    # --- sampling ------------------------------------------------------------------------------------

    def encode(
        self,
        parts: DiffusionParts,
        prompts: list[str],
        negative_prompt: str | None,
        guided: bool,
        resolution: int,
    ) -> Conditioning:
        """The pipeline's prompt encoding (no grad: the text encoders are frozen).

        `negative_prompt=None` means none given: the pipeline's own default for the unconditional branch.
        """
        raise NotImplementedError

    def guidance_input(
        self, parts: DiffusionParts, cond: Conditioning, guidance_scale: float
    ) -> Conditioning:
        """`cond` with the guidance scale as the denoiser reads it (guidance-distilled models); by default
        unchanged: classifier-free guidance applies the scale outside the denoiser."""
        return cond

    def denoise(
        self, denoiser: torch.nn.Module, model_input: torch.Tensor, t: torch.Tensor, cond: Conditioning
    ) -> torch.Tensor:
        """One denoiser call on the (possibly doubled) batch; the raw prediction."""
        raise NotImplementedError

    def native_resolution(self, parts: DiffusionParts) -> int:
        """The pipeline's default image side: the denoiser's sample size in pixels."""
        return parts.denoiser.config.sample_size * parts.vae_scale_factor

    def resolution_multiple(self, parts: DiffusionParts) -> int:
        """What an image side must be a multiple of: the VAE's downsampling times the denoiser's patch."""
        return parts.vae_scale_factor * getattr(parts.denoiser.config, "patch_size", 1)

    def noise_shape(self, parts: DiffusionParts, resolution: int) -> tuple[int, ...]:
        """The shape of one image's initial noise, as the pipeline's `prepare_latents` draws it."""
        size = resolution // parts.vae_scale_factor
        return (parts.denoiser.config.in_channels, size, size)

    def timestep_options(self, parts: DiffusionParts, steps: int, resolution: int) -> dict[str, Any]:
        """Keyword arguments of `scheduler.set_timesteps` beyond the step count, as the pipeline passes
        them (a flow-matching scheduler with dynamic shifting needs `mu`, from the image's token count)."""
        return {}

    def initial_latents(self, noise: torch.Tensor, scheduler) -> torch.Tensor:
        """x_T from standard normal noise (the pipeline's `prepare_latents`)."""
        return noise * scheduler.init_noise_sigma

    def model_input(self, scheduler, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The latents as the denoiser sees them at t (`scheduler.scale_model_input`)."""
        return scheduler.scale_model_input(latents, t)

    def vae_input(self, vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
        """Denoised latents in the VAE's space (undo the latent scaling, and shift)."""
        return latents / vae.config.scaling_factor

    # --- LoRA files ----------------------------------------------------------------------------------

    def pipeline_type(self):
        import diffusers

        return getattr(diffusers, self.pipeline_class)

    def save_lora(self, directory: str, state: dict[str, torch.Tensor], config: dict) -> None:
        """Write the diffusers LoRA file with the pipeline's own `save_lora_weights`."""
        self.pipeline_type().save_lora_weights(
            directory,
            **{
                f"{self.denoiser_name}_lora_layers": state,
                f"{self.denoiser_name}_lora_adapter_metadata": config,
            },
            safe_serialization=True,
        )

    def load_lora_like_diffusers(self, denoiser: torch.nn.Module, directory: str) -> None:
        """Load a LoRA file into the denoiser exactly as the pipeline's `load_lora_weights` does."""
        raise NotImplementedError

    def is_denoiser(self, denoiser: torch.nn.Module) -> bool:
        """Whether `denoiser` is this family's (read off its class and config)."""
        raise NotImplementedError
