"""Stable Diffusion 1.x/2.x: one CLIP text encoder, a UNet, DDIM (the AlignProp paper's model).

Prompt encoding and the UNet call are `StableDiffusionPipeline`'s; sampling always uses DDIM built from
the directory's scheduler config (SD 1.5 ships PNDM), as the paper did.
"""

from __future__ import annotations

import torch

from alignprop_ray.engine.families.base import Conditioning, DiffusionParts, Family
from alignprop_ray.engine.families.tiny import clip_text_config, clip_tokenizer, seeded


class UNetFamily(Family):
    """What the UNet families (sd, sdxl) share: CLIP tokens and a UNet called with (x, t, embeddings)."""

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
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel

        tiny = self.row.tiny
        with seeded(seed):
            unet = UNet2DConditionModel(**tiny["unet"])
            vae = AutoencoderKL(**tiny["vae"])
            text_encoder = CLIPTextModel(clip_text_config(**tiny["text_encoder"]))
        return DiffusionParts(self, [clip_tokenizer()], [text_encoder], unet, vae, self.tiny_scheduler(), {})

    def pipeline(self, parts: DiffusionParts):
        return sd_pipeline(parts.tokenizer, parts.text_encoder, parts.denoiser, parts.vae, parts.scheduler)

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


def sd_pipeline(tokenizer, text_encoder, unet, vae, scheduler):
    """A `StableDiffusionPipeline` of these components, without safety checker or feature extractor (the
    one builder: the tiny preset, bench/gpu.py's SD 1.5-shaped model, the toy model)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
