"""Stable Diffusion XL: two CLIP text encoders (penultimate hidden states, concatenated) plus CLIP-G's
pooled embedding, micro-conditioning on `add_time_ids` (original size, crop, target size), and a UNet.

Encoding is `StableDiffusionXLPipeline.encode_prompt` with one prompt for both encoders and no crop:
original and target size are the image size. With no negative prompt and the pipeline's
`force_zeros_for_empty_prompt` (SDXL base: true) the unconditional branch is all zeros. Sampling uses the
directory's scheduler: EulerDiscrete (SDXL base) or DDIM.
"""

from __future__ import annotations

import torch

from alignprop_ray.engine.families.base import Conditioning, DiffusionParts
from alignprop_ray.engine.families.sd import UNetFamily, clip_tokens, takes_time_ids
from alignprop_ray.engine.families.tiny import clip_text_config, clip_tokenizer, seeded


class SDXL(UNetFamily):
    def load(self, source: str, dtype: torch.dtype, model_index: dict) -> DiffusionParts:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        from alignprop_ray.engine.schedulers import load_scheduler

        return DiffusionParts(
            family=self,
            tokenizers=[
                CLIPTokenizer.from_pretrained(source, subfolder=f) for f in ("tokenizer", "tokenizer_2")
            ],
            text_encoders=[
                CLIPTextModel.from_pretrained(source, subfolder="text_encoder", dtype=dtype),
                CLIPTextModelWithProjection.from_pretrained(source, subfolder="text_encoder_2", dtype=dtype),
            ],
            denoiser=UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=dtype),
            vae=AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=dtype),
            scheduler=load_scheduler(source, self.schedulers),
            pipeline_config=model_index,
        )

    def build_tiny(self, seed: int) -> DiffusionParts:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        tiny = self.row.tiny
        with seeded(seed):
            unet = UNet2DConditionModel(**tiny["unet"])
            vae = AutoencoderKL(**tiny["vae"])
            clip_l = CLIPTextModel(clip_text_config(**tiny["text_encoder"]))
            clip_g = CLIPTextModelWithProjection(clip_text_config(**tiny["text_encoder_2"]))
        return DiffusionParts(
            family=self,
            tokenizers=[clip_tokenizer(), clip_tokenizer(pad_token="!")],
            text_encoders=[clip_l, clip_g],
            denoiser=unet,
            vae=vae,
            scheduler=self.tiny_scheduler(),
            pipeline_config={"force_zeros_for_empty_prompt": True},
        )

    def pipeline(self, parts: DiffusionParts):
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(
            vae=parts.vae,
            text_encoder=parts.text_encoders[0],
            text_encoder_2=parts.text_encoders[1],
            tokenizer=parts.tokenizers[0],
            tokenizer_2=parts.tokenizers[1],
            unet=parts.denoiser,
            scheduler=parts.scheduler,
            force_zeros_for_empty_prompt=parts.pipeline_config.get("force_zeros_for_empty_prompt", True),
            add_watermarker=False,
        )

    def encode(self, parts, prompts, negative_prompt, guided, resolution) -> Conditioning:
        embeds, pooled = self._embed(parts, prompts)
        time_ids = self.time_ids(parts, resolution, len(prompts))
        if guided:
            if negative_prompt is None and parts.pipeline_config.get("force_zeros_for_empty_prompt", True):
                uncond, uncond_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
            else:
                uncond, uncond_pooled = self._embed(parts, [negative_prompt or ""] * len(prompts))
            embeds, pooled = torch.cat([uncond, embeds]), torch.cat([uncond_pooled, pooled])
            time_ids = torch.cat([time_ids, time_ids])
        dtype = parts.dtype
        tensors = {"encoder_hidden_states": embeds, "text_embeds": pooled, "time_ids": time_ids}
        return Conditioning({k: v.to(dtype) for k, v in tensors.items()}, guided)

    @staticmethod
    def _embed(parts, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Both encoders' penultimate hidden states, concatenated; the last encoder's pooled projection."""
        hidden, pooled = [], None
        with torch.no_grad():
            for tokenizer, encoder in zip(parts.tokenizers, parts.text_encoders, strict=True):
                out = encoder(clip_tokens(tokenizer, prompts, parts.device), output_hidden_states=True)
                pooled = out[0]  # kept from the last encoder: CLIP-G's projected pooled output
                hidden.append(out.hidden_states[-2])
        return torch.cat(hidden, dim=-1), pooled

    @staticmethod
    def time_ids(parts, resolution: int, batch: int) -> torch.Tensor:
        """(original height, width, crop top, left, target height, width) per image: no crop, square."""
        unet = parts.denoiser
        projection = parts.text_encoders[-1].config.projection_dim
        expected = unet.add_embedding.linear_1.in_features
        if unet.config.addition_time_embed_dim * 6 + projection != expected:
            raise ValueError(
                f"SDXL UNet expects {expected} added-embedding features, the text encoder gives {projection} "
                f"+ 6 x {unet.config.addition_time_embed_dim}"
            )
        ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], device=parts.device)
        return ids.repeat(batch, 1)

    def denoise(self, denoiser, model_input, t, cond) -> torch.Tensor:
        tensors = dict(cond.tensors)
        added = {"text_embeds": tensors.pop("text_embeds"), "time_ids": tensors.pop("time_ids")}
        return denoiser(model_input, t, **tensors, added_cond_kwargs=added, return_dict=False)[0]

    def is_denoiser(self, denoiser: torch.nn.Module) -> bool:
        return type(denoiser).__name__ == "UNet2DConditionModel" and takes_time_ids(denoiser)

    def vae_input(self, vae, latents: torch.Tensor) -> torch.Tensor:
        config = vae.config
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is None or std is None:
            return latents / config.scaling_factor
        shape = (1, len(mean), 1, 1)
        mean = torch.tensor(mean).view(shape).to(latents.device, latents.dtype)
        std = torch.tensor(std).view(shape).to(latents.device, latents.dtype)
        return latents * std / config.scaling_factor + mean
