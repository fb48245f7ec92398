"""What differs between families when a toy pipeline is trained from scratch: the networks and their sizes,
the latent normalization, how captions condition the denoiser (with gradient: the text encoders train too),
the noising and its regression target, and the scheduler the saved pipeline samples with.

A recipe is a frozen dataclass of its settings plus these methods; `train.py` runs the same two stages
(VAE, then denoiser + text encoders) for every family. `SDToy` is Stable Diffusion's (epsilon prediction on
SD's DDPM schedule, the committed models/toy-shapes); `SD3Toy` (toy/sd3.py) is the flow-matching twin.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cache
from typing import Any, ClassVar

import torch

from alignprop_ray.engine.families import get_family
from alignprop_ray.engine.families.base import Conditioning, DiffusionParts, Family
from alignprop_ray.engine.families.registry import SD_SCHEDULE
from alignprop_ray.engine.families.sd import clip_tokens
from alignprop_ray.engine.families.tiny import clip_tokenizer, seeded


@dataclass
class ToyModels:
    """The trainable networks of one toy pipeline, and its tokenizers (one per text encoder)."""

    tokenizers: list[Any]
    text_encoders: list[torch.nn.Module]
    denoiser: torch.nn.Module
    vae: torch.nn.Module


@dataclass(frozen=True)
class ToySettings:
    """Sizes and optimization shared by every family's toy. Iterations are sized to the 2-core CPU box."""

    family: ClassVar[str]
    resolution: int = 64
    images: int = 20_000  # fixed training set: ~120 images per caption
    vae_channels: tuple[int, ...] = (16, 32, 64)  # 3 levels: 64 px -> 16 x 16 latents
    vae_iters: int = 1500
    vae_batch: int = 32
    vae_crop: int = 32
    vae_lr: float = 1e-3  # peak; both stages warm up linearly, then decay on a cosine to 0
    kl_weight: float = 1e-4  # per-element KL vs per-pixel L1: latents stay smooth, reconstructions sharp
    denoiser_iters: int = 4000
    denoiser_batch: int = 64
    denoiser_lr: float = 1e-3
    warmup: int = 200
    ema_decay: float = 0.999
    caption_dropout: float = 0.1  # SD's 10%: the unconditional branch of guidance
    max_grad_norm: float = 1.0
    log_every: int = 100

    @property
    def pipeline_family(self) -> Family:
        return get_family(self.family)

    def tiny(self) -> ToySettings:
        """The same code path at test size: minutes -> a second."""
        return replace(
            self,
            resolution=32,
            images=16,
            vae_channels=(8, 8),
            vae_iters=2,
            vae_batch=4,
            vae_crop=16,
            denoiser_iters=2,
            denoiser_batch=4,
            warmup=1,
            log_every=1,
        )

    # --- what each family supplies --------------------------------------------------------------------

    def build(self, seed: int) -> ToyModels:
        """Random-init networks, deterministic in `seed` (the VAE first, then the denoiser, then text)."""
        from diffusers import AutoencoderKL

        with seeded(seed):
            vae = AutoencoderKL(**self.vae_config())
            denoiser, text_encoders = self.networks()
        return ToyModels(self.tokenizers(), text_encoders, denoiser, vae)

    def vae_config(self) -> dict:
        """AutoencoderKL without attention: fully convolutional, so random crops teach it everything."""
        return dict(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            block_out_channels=self.vae_channels,
            layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * len(self.vae_channels),
            up_block_types=("UpDecoderBlock2D",) * len(self.vae_channels),
            norm_num_groups=8,
            sample_size=self.resolution,
            mid_block_add_attention=False,
        )

    @property
    def latent_size(self) -> int:
        return self.resolution // 2 ** (len(self.vae_channels) - 1)

    def networks(self) -> tuple[torch.nn.Module, list[torch.nn.Module]]:
        """The denoiser and the text encoders, random-init (called inside `build`'s seeded block)."""
        raise NotImplementedError

    def tokenizers(self) -> list[Any]:
        raise NotImplementedError

    def normalize_latents(self, vae, latents: torch.Tensor) -> torch.Tensor:
        """Set the VAE's latent scaling (as the family's pipeline reads it) from the training set's latents;
        the latents as the denoiser sees them."""
        raise NotImplementedError

    def tokenize(self, models: ToyModels, captions: list[str]) -> list[torch.Tensor]:
        """Token ids of `captions` for each tokenizer, padded as the pipeline pads them."""
        return [clip_tokens(tokenizer, captions, torch.device("cpu")) for tokenizer in models.tokenizers]

    def condition(self, models: ToyModels, tokens: list[torch.Tensor]) -> Conditioning:
        """The denoiser's conditioning for a batch of token ids, with gradient into the text encoders."""
        raise NotImplementedError

    def noise(
        self, x0: torch.Tensor, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(noisy latents, timesteps, regression target) for a batch of clean latents."""
        raise NotImplementedError

    def scheduler(self):
        """The sampling scheduler the saved pipeline ships."""
        raise NotImplementedError

    def training(self, denoiser: torch.nn.Module):
        """A context in which the denoiser trains (the default: nothing changes)."""
        from contextlib import nullcontext

        return nullcontext()

    def parts(self, models: ToyModels) -> DiffusionParts:
        """The trained networks as a family's pipeline parts (the family's `pipeline()` writes them)."""
        return DiffusionParts(
            self.pipeline_family,
            models.tokenizers,
            models.text_encoders,
            models.denoiser,
            models.vae,
            self.scheduler(),
            {},
        )


@dataclass(frozen=True)
class SDToy(ToySettings):
    """Stable Diffusion's shape: a UNet with cross-attention and one CLIP text encoder over the real CLIP
    tokenizer, epsilon prediction on SD's DDPM schedule with offset noise; sampled with DDIM."""

    family: ClassVar[str] = "sd"
    unet_channels: tuple[int, ...] = (32, 64, 64)  # 16 -> 8 -> 4; no attention at 16 x 16 (too costly)
    text_width: int = 32  # CLIP hidden size = UNet cross_attention_dim
    # Offset noise (a per-image, per-channel constant added to the noise). SD's schedule leaves signal at
    # the first DDIM step (sqrt(alpha_bar) = 0.12 at t = 901), and in these flat scenes the latents'
    # channel means (the background colour) vary across images by up to 1.35: without the offset the model
    # reads the background from the mean of the starting noise and ignores the prompt's background word
    # (measured). 0.3 buries that leak under noise the model cannot tell from it.
    offset_noise: float = 0.3

    def tiny(self) -> SDToy:
        return replace(super().tiny(), unet_channels=(16, 16), text_width=16)

    def networks(self):
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        levels = len(self.unet_channels)
        unet = UNet2DConditionModel(
            sample_size=self.latent_size,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=self.unet_channels,
            down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
            up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
            cross_attention_dim=self.text_width,
            attention_head_dim=8,
            norm_num_groups=8,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=self.text_width,
                intermediate_size=4 * self.text_width,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                vocab_size=49408,
                bos_token_id=49406,
                eos_token_id=49407,
                pad_token_id=49407,
                projection_dim=self.text_width,
            )
        )
        return unet, [text_encoder]

    def tokenizers(self):
        return [clip_tokenizer()]

    def normalize_latents(self, vae, latents):
        # 1 / std of the latents, as SD's 0.18215 was: the UNet sees unit-variance latents.
        vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
        return latents * vae.config.scaling_factor

    def condition(self, models, tokens):
        (ids,) = tokens
        return Conditioning({"encoder_hidden_states": models.text_encoders[0](ids)[0]}, guided=False)

    def noise(self, x0, gen):
        schedule = _ddpm()
        offset = torch.randn(*x0.shape[:2], 1, 1, generator=gen)
        noise = torch.randn(x0.shape, generator=gen) + self.offset_noise * offset
        t = torch.randint(schedule.config.num_train_timesteps, (len(x0),), generator=gen)
        return schedule.add_noise(x0, noise, t), t, noise

    def scheduler(self):
        from diffusers import DDIMScheduler

        return DDIMScheduler(**SD_SCHEDULE)

    def parts(self, models):
        family = self.pipeline_family
        (tokenizer,), (text_encoder,) = models.tokenizers, models.text_encoders
        return DiffusionParts(
            family, [tokenizer], [text_encoder], models.denoiser, models.vae, self.scheduler(), {}
        )


@cache
def _ddpm():
    """SD's DDPM training schedule (what add_noise needs; DDIM samples on the same alphas)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**{k: v for k, v in SD_SCHEDULE.items() if k != "set_alpha_to_one"})
