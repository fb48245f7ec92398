"""Stable Diffusion 1.x/2.x: one CLIP text encoder, a UNet, DDIM (the AlignProp paper's model).

Prompt encoding and the UNet call are `StableDiffusionPipeline`'s; sampling always uses DDIM built from
the directory's scheduler config (SD 1.5 ships PNDM), as the paper did.
"""

from __future__ import annotations

import torch

from alignprop_ray.engine.families.base import Conditioning, DiffusionParts, Family
from alignprop_ray.engine.families.tiny import clip_tokenizer, seeded

TINY_UNET = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=8,
)
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    norm_num_groups=8,
    sample_size=64,
)
TINY_TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    vocab_size=49408,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
    projection_dim=32,
)
# Stable Diffusion's own DDPM training schedule; sampling uses DDIM on top of it.
SD_SCHEDULE = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)


class UNetFamily(Family):
    """What the UNet families (sd, sdxl) share: CLIP tokens and a UNet called with (x, t, embeddings)."""

    denoiser_name = "unet"

    def load_lora_like_diffusers(self, denoiser: torch.nn.Module, directory: str) -> None:
        pipeline = self.pipeline_type()
        state, alphas, metadata = pipeline.lora_state_dict(
            directory, unet_config=denoiser.config, return_lora_metadata=True
        )
        pipeline.load_lora_into_unet(state, alphas, denoiser, metadata=metadata)

    def is_denoiser(self, denoiser: torch.nn.Module) -> bool:
        return type(denoiser).__name__ == "UNet2DConditionModel" and not takes_time_ids(denoiser)


def takes_time_ids(unet: torch.nn.Module) -> bool:
    """SDXL's UNet: its added embedding is the pooled text plus the size/crop micro-conditioning."""
    return getattr(unet.config, "addition_embed_type", None) == "text_time"


def clip_tokens(tokenizer, prompts: list[str], device: torch.device, max_length: int | None = None):
    """Token ids padded to the tokenizer's length (77), as every pipeline tokenizes for CLIP."""
    return tokenizer(
        list(prompts),
        padding="max_length",
        max_length=max_length or tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)


class SD(UNetFamily):
    name = "sd"
    pipeline_class = "StableDiffusionPipeline"
    schedulers = ("DDIMScheduler",)

    def load(self, source: str, dtype: torch.dtype, model_index: dict) -> DiffusionParts:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        from alignprop_ray.engine.schedulers import load_scheduler

        return DiffusionParts(
            family=self,
            tokenizers=[CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")],
            text_encoders=[CLIPTextModel.from_pretrained(source, subfolder="text_encoder", dtype=dtype)],
            denoiser=UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=dtype),
            vae=AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=dtype),
            scheduler=load_scheduler(source, self.schedulers),
            pipeline_config=model_index,
        )

    def build_tiny(self, seed: int) -> DiffusionParts:
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        with seeded(seed):
            unet = UNet2DConditionModel(**TINY_UNET)
            vae = AutoencoderKL(**TINY_VAE)
            text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_TEXT))
        return self.parts(clip_tokenizer(), text_encoder, unet, vae, DDIMScheduler(**SD_SCHEDULE))

    def parts(self, tokenizer, text_encoder, unet, vae, scheduler) -> DiffusionParts:
        """Parts of a Stable Diffusion pipeline from its components."""
        return DiffusionParts(self, [tokenizer], [text_encoder], unet, vae, scheduler, {})

    def pipeline(self, parts: DiffusionParts):
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(
            vae=parts.vae,
            text_encoder=parts.text_encoder,
            tokenizer=parts.tokenizer,
            unet=parts.denoiser,
            scheduler=parts.scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    def encode(self, parts, prompts, negative_prompt, guided, resolution) -> Conditioning:
        """CLIP's last hidden state, as StableDiffusionPipeline.encode_prompt computes it."""
        device = parts.device
        with torch.no_grad():
            embeds = parts.text_encoder(clip_tokens(parts.tokenizer, prompts, device))[0]
            if guided:
                negatives = [negative_prompt or ""] * len(prompts)
                uncond = parts.text_encoder(clip_tokens(parts.tokenizer, negatives, device))[0]
                embeds = torch.cat([uncond, embeds])
        return Conditioning({"encoder_hidden_states": embeds.to(parts.dtype)}, guided)

    def denoise(self, denoiser, model_input, t, cond) -> torch.Tensor:
        return denoiser(model_input, t, **cond.tensors, return_dict=False)[0]
