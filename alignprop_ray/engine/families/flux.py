"""FLUX.1 [dev] and [schnell]: a flow-matching MMDiT (FluxTransformer2DModel) with CLIP-L (pooled) and
T5 text encoders, sampled as `FluxPipeline` samples it.

What differs from SD3, and how the sampler sees it:
- Encoding (`FluxPipeline.encode_prompt`): CLIP-L contributes only its pooled output; T5's last hidden
  state over 512 tokens is the whole text sequence. Rotary positions: `txt_ids` (all zeros) for the text,
  `img_ids` (row, column) for the image tokens.
- Latents are packed: the VAE's 16 x h x w latents become (h/2 x w/2) tokens of 2 x 2 x 16 = 64 features.
  The sampler keeps them packed from the initial noise (drawn unpacked, as `prepare_latents` draws it) to
  the VAE, which gets them unpacked (`vae_input`). The scheduler step and the x0 prediction are
  elementwise, so they apply to packed latents unchanged.
- Guidance: [dev] is guidance-distilled: no classifier-free guidance (one denoiser call per step, no
  negative prompt); the guidance scale is an input of the transformer's guidance embedding. [schnell] has
  no guidance embedding and ignores the scale, as FluxPipeline does.
- Schedule: FluxPipeline passes sigmas linspace(1, 1/T, T) and, for dynamic shifting ([dev]), `mu` from
  the image's token count (`timestep_options`). Timesteps reach the transformer divided by 1000.

Flow-GRPO (its own issue) needs nothing FLUX-specific beyond this: its SDE step and log-probability are
elementwise in the (packed) latents, and its rollouts use `encode`, `initial_latents`, `start` and
`guided_prediction` as every method does; the family's row must then list it among FLUX's methods.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from alignprop_ray.engine import schedulers
from alignprop_ray.engine.families.base import Conditioning, DiffusionParts, Family
from alignprop_ray.engine.families.registry import FLUX_SCHEDULES
from alignprop_ray.engine.families.sd import clip_tokens
from alignprop_ray.engine.families.tiny import clip_text_config, clip_tokenizer, seeded, t5_tokenizer

T5_TOKENS = 512  # FluxPipeline's max_sequence_length default
SAMPLE_SIZE = 128  # FluxPipeline.default_sample_size: 128 latents a side, 1024 px with the 8x VAE
VARIANTS = ("dev", "schnell")


class Flux(Family):
    classifier_free_guidance = False  # guidance-distilled ([dev]) or guidance-free ([schnell])

    def load(self, source: str, dtype: torch.dtype, model_index: dict) -> DiffusionParts:
        from diffusers import AutoencoderKL, FluxTransformer2DModel
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5Tokenizer

        from alignprop_ray.engine.schedulers import load_scheduler

        return DiffusionParts(
            family=self,
            tokenizers=[
                CLIPTokenizer.from_pretrained(source, subfolder="tokenizer"),
                T5Tokenizer.from_pretrained(source, subfolder="tokenizer_2"),
            ],
            text_encoders=[
                CLIPTextModel.from_pretrained(source, subfolder="text_encoder", dtype=dtype),
                T5EncoderModel.from_pretrained(source, subfolder="text_encoder_2", dtype=dtype),
            ],
            denoiser=FluxTransformer2DModel.from_pretrained(
                source, subfolder="transformer", torch_dtype=dtype
            ),
            vae=AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=dtype),
            scheduler=load_scheduler(source, self.schedulers),
            pipeline_config=model_index,
        )

    def build_tiny(self, seed: int, variant: str = "dev") -> DiffusionParts:
        """The tiny FLUX.1 of `variant`: dev (guidance embedding, dynamic shifting) or schnell (neither)."""
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
        from transformers import CLIPTextModel, T5Config, T5EncoderModel

        if variant not in VARIANTS:
            raise ValueError(f"unknown FLUX.1 variant {variant!r} (known: {', '.join(VARIANTS)})")
        tiny = self.row.tiny
        t5_tok = t5_tokenizer()
        with seeded(seed):
            transformer = FluxTransformer2DModel(**tiny["transformer"], guidance_embeds=variant == "dev")
            vae = AutoencoderKL(**tiny["vae"])
            clip = CLIPTextModel(clip_text_config(**tiny["text_encoder"]))
            t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), **tiny["text_encoder_2"]))
        scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULES[variant])
        return DiffusionParts(self, [clip_tokenizer(), t5_tok], [clip, t5], transformer, vae, scheduler, {})

    def pipeline(self, parts: DiffusionParts):
        from diffusers import FluxPipeline

        return FluxPipeline(
            scheduler=parts.scheduler,
            vae=parts.vae,
            text_encoder=parts.text_encoders[0],
            tokenizer=parts.tokenizers[0],
            text_encoder_2=parts.text_encoders[1],
            tokenizer_2=parts.tokenizers[1],
            transformer=parts.denoiser,
        )

    # --- sampling ------------------------------------------------------------------------------------

    def encode(self, parts, prompts, negative_prompt, guided, resolution) -> Conditioning:
        """CLIP's pooled output and T5's hidden states, with the rotary position ids of text and image
        (no negative prompt: `sampler.check_settings` refuses one)."""
        device = parts.device
        (clip_tok, t5_tok), (clip, t5) = parts.tokenizers, parts.text_encoders
        with torch.no_grad():
            pooled = clip(clip_tokens(clip_tok, prompts, device), output_hidden_states=False).pooler_output
            ids = t5_tok(
                list(prompts),
                padding="max_length",
                max_length=T5_TOKENS,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            embeds = t5(ids.to(device))[0].to(t5.dtype)
        tensors = {
            "encoder_hidden_states": embeds,
            "pooled_projections": pooled.to(clip.dtype),
            "txt_ids": torch.zeros(embeds.shape[1], 3, device=device, dtype=clip.dtype),
            "img_ids": image_ids(resolution // parts.vae_scale_factor // 2, device, embeds.dtype),
        }
        return Conditioning(tensors, guided=False)

    def guidance_input(self, parts, cond: Conditioning, guidance_scale: float) -> Conditioning:
        """[dev]: the scale for the guidance embedding (float32, as FluxPipeline makes it); [schnell]: none."""
        if not parts.denoiser.config.guidance_embeds:
            return cond
        guidance = torch.full([1], guidance_scale, device=parts.device, dtype=torch.float32)
        return Conditioning({**cond.tensors, "guidance": guidance}, cond.guided)

    def denoise(self, denoiser, model_input, t, cond) -> torch.Tensor:
        batch = model_input.shape[0]
        tensors = dict(cond.tensors)
        if "guidance" in tensors:
            tensors["guidance"] = tensors["guidance"].expand(batch)
        timestep = t.expand(batch).to(model_input.dtype) / 1000  # the transformer multiplies by 1000 again
        return denoiser(hidden_states=model_input, timestep=timestep, **tensors, return_dict=False)[0]

    def native_resolution(self, parts: DiffusionParts) -> int:
        return SAMPLE_SIZE * parts.vae_scale_factor

    def resolution_multiple(self, parts: DiffusionParts) -> int:
        return parts.vae_scale_factor * 2  # 2 x 2 latent patches are packed into one token

    def noise_shape(self, parts: DiffusionParts, resolution: int) -> tuple[int, ...]:
        """Unpacked latents (16 channels), as FluxPipeline.prepare_latents draws them before packing."""
        size = resolution // parts.vae_scale_factor
        return (parts.denoiser.config.in_channels // 4, size, size)

    def timestep_options(self, parts: DiffusionParts, steps: int, resolution: int) -> dict[str, Any]:
        """FluxPipeline's schedule: sigmas linspace(1, 1/T, T) (unless the scheduler makes its own flow
        sigmas) and `mu` from the packed token count (used when the scheduler shifts dynamically)."""
        config = parts.scheduler.config
        tokens = (resolution // parts.vae_scale_factor // 2) ** 2
        options: dict[str, Any] = {"mu": schedulers.dynamic_shift(config, tokens, default_max_shift=1.15)}
        if not config.get("use_flow_sigmas"):
            options["sigmas"] = np.linspace(1.0, 1 / steps, steps)
        return options

    def initial_latents(self, noise: torch.Tensor, scheduler) -> torch.Tensor:
        return pack(noise)  # flow matching starts from pure noise at sigma = 1

    def model_input(self, scheduler, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return latents

    def vae_input(self, vae, latents: torch.Tensor) -> torch.Tensor:
        return unpack(latents) / vae.config.scaling_factor + vae.config.shift_factor

    # --- LoRA files ----------------------------------------------------------------------------------

    def load_lora_like_diffusers(self, denoiser: torch.nn.Module, directory: str) -> None:
        pipeline = self.pipeline_type()
        state, alphas, metadata = pipeline.lora_state_dict(
            directory, return_alphas=True, return_lora_metadata=True
        )
        pipeline.load_lora_into_transformer(
            state, network_alphas=alphas, transformer=denoiser, metadata=metadata
        )

    def is_denoiser(self, denoiser: torch.nn.Module) -> bool:
        return type(denoiser).__name__ == "FluxTransformer2DModel"


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): each 2 x 2 patch one token, its features (C, row, col) in order."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(latents: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack` for square latents (the project's images are square)."""
    b, tokens, features = latents.shape
    side = int(round(tokens**0.5))
    patches = latents.view(b, side, side, features // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, features // 4, side * 2, side * 2)


def image_ids(side: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(side^2, 3) rotary position ids of the packed image tokens: (0, row, column), row-major."""
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(side * side, 3)
    return ids.to(device=device, dtype=dtype)
